"""PostgreSQL for asyncio: psycopg 3's ``AsyncConnection`` through a bounded pool.

The tables, statements and the locking they rely on (the compare-and-swap
``UPDATE``, ``FOR UPDATE SKIP LOCKED`` claims, token-checked ``remember``) are
:class:`~gorch.stores.postgres_sql.PostgresSQL`'s, the ones
:class:`~gorch.stores.postgres.PostgresStore` runs, so a sync and an async
store on one table are the same store; this module only awaits them.

Connections come from a ``psycopg_pool.AsyncConnectionPool`` (``pool_min`` kept
open, at most ``pool_max``; a call waits up to ``pool_timeout`` seconds for a
free one): an event loop serving many requests shares a few connections
instead of opening one per task. The first call connects once on its own to
create the schema, so a server that is down or refuses the login is reported at
once, with libpq's reason, instead of after the pool's wait.

Faults follow the sync store: every write is one statement in autocommit (one
round trip; statements prepared on first use); a connection that died while
idle in the pool is replaced before a statement is sent on it; a read whose
connection is lost runs once more; a write whose connection is lost has an
unknown outcome and ``StoreUnavailable`` says so (unless it is safe to repeat);
other faults end the statement uncommitted and say nothing was written. A pool
belongs to the event loop that first used it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gorch.stores._ops import AsyncConnectorStore, Op, arun_steps
from gorch.stores._options import (
    DEFAULT_POOL_MAX,
    DEFAULT_POOL_MIN,
    DEFAULT_POOL_TIMEOUT,
    DEFAULT_PREPARE_THRESHOLD,
    check_pool,
)
from gorch.stores.base import DEFAULT_HISTORY_LIMIT, Record
from gorch.stores.postgres import connect_options, idle_connection_died
from gorch.stores.postgres_sql import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TABLE,
    PURGE_BATCH,
    Copy,
    Enqueue,
    KeepsCursor,
    PostgresSQL,
    Statement,
    Steps,
    TransactionHook,
    cursor_for,
)

_Conn = psycopg.AsyncConnection[TupleRow]


class _PooledConnection(KeepsCursor, psycopg.AsyncConnection[TupleRow]):
    """A connection of the store's pool (see :class:`KeepsCursor`)."""


_T = TypeVar("_T")

__all__ = ["DEFAULT_POOL_MAX", "DEFAULT_POOL_MIN", "DEFAULT_POOL_TIMEOUT", "AsyncPostgresStore"]


class AsyncPostgresStore(AsyncConnectorStore):
    """An :class:`AsyncStore` in the table :class:`PostgresStore` uses (``gorch_workflows``
    unless ``table`` says otherwise), and ``{table}_seen`` for :meth:`remember`."""

    def __init__(
        self,
        dsn: str,
        *,
        table: str = DEFAULT_TABLE,
        connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
        pool_min: int = DEFAULT_POOL_MIN,
        pool_max: int = DEFAULT_POOL_MAX,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
        prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD,
    ) -> None:
        """``dsn`` is a libpq URL or key=value string; ``table`` may be schema-qualified;
        the pool options are :class:`~gorch.stores.postgres.PostgresStore`'s."""
        self._ops: PostgresSQL = PostgresSQL(dsn, table)
        check_pool(pool_min, pool_max, pool_timeout)
        self._dsn = dsn
        self.url = self._ops.url
        self.table = table
        self.pool_min, self.pool_max, self.pool_timeout = pool_min, pool_max, pool_timeout
        self.prepare_threshold = prepare_threshold
        self._options = connect_options(dsn, connect_timeout, prepare_threshold)
        self._pool: AsyncConnectionPool[_Conn] | None = None
        self._lock = asyncio.Lock()
        self._migrated = False

    # -- connections -----------------------------------------------------------------

    async def _connect(self) -> _Conn:
        """One connection outside the pool, its failure reported with libpq's reason."""
        try:
            return await psycopg.AsyncConnection.connect(self._dsn, **self._options)
        except psycopg.Error as exc:
            raise self._ops.unavailable(exc) from exc

    async def _ready(self) -> AsyncConnectionPool[_Conn]:
        """The open pool, the schema created first (once per store)."""
        if self._pool is not None and self._migrated:
            return self._pool
        async with self._lock:
            if not self._migrated:
                await self.migrate()
            if self._pool is None:
                pool: AsyncConnectionPool[_Conn] = AsyncConnectionPool(
                    self._dsn,
                    kwargs=self._options,
                    min_size=self.pool_min,
                    max_size=self.pool_max,
                    timeout=self.pool_timeout,
                    configure=self._configure,
                    open=False,
                    name=f"gorch {self.url}",
                    connection_class=_PooledConnection,
                )
                await pool.open(wait=False)
                self._pool = pool
        return self._pool

    async def _configure(self, conn: _Conn) -> None:
        """Called with every pooled connection the store opens (a hook for tests)."""

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Conn]:
        """A pooled connection that is alive as far as can be told without a round trip
        (see :meth:`PostgresStore._checkout`); a pool that cannot give one says why."""
        pool = await self._ready()
        conn = await self._getconn(pool)
        for _ in range(self.pool_max):
            if not (conn.closed or conn.broken or idle_connection_died(conn.fileno())):
                break
            await conn.close()
            await pool.putconn(conn)
            conn = await self._getconn(pool)
        try:
            yield conn
        finally:
            await pool.putconn(conn)

    def connection(self) -> AbstractAsyncContextManager[_Conn]:
        """A connection of the store's pool for the ``async with`` block (see
        :meth:`PostgresStore.connection`)."""
        return self._connection()

    async def _getconn(self, pool: AsyncConnectionPool[_Conn]) -> _Conn:
        try:
            return await pool.getconn()
        except PoolTimeout as exc:
            await self._explain_timeout(exc)

    async def _explain_timeout(self, exc: PoolTimeout) -> NoReturn:
        """No connection within ``pool_timeout``: the server is gone, or the pool is busy."""
        probe = await self._connect()  # raises StoreUnavailable with the server's reason
        await probe.close()
        raise self._ops.unavailable(
            exc,
            f"; all {self.pool_max} pooled connections stayed busy for {self.pool_timeout:g} s"
            " (raise pool_max or pool_timeout in the URL); nothing was written",
        ) from exc

    async def _run(self, op: Op[_T]) -> _T:
        """``op`` on a pooled connection; run once more on another when
        :meth:`PostgresSQL.settle` says so (the pool replaces a lost one)."""
        for attempt in (1, 2):
            async with self._connection() as conn:
                try:
                    if op.batch:
                        async with conn.transaction():
                            return await _execute(conn, op.steps())
                    return await _execute(conn, op.steps())
                except psycopg.Error as exc:
                    lost = conn.broken or conn.closed
                    self._ops.settle(exc, op, lost=lost, last=attempt == 2)
        raise AssertionError("unreachable")

    async def migrate(self) -> None:
        """Create the tables and their indexes if they are missing (safe to run concurrently)."""
        conn = await self._connect()
        try:
            async with conn.transaction():
                await _execute(conn, self._ops.schema())
            self._migrated = True
        except psycopg.Error as exc:
            self._ops.settle(exc, None, lost=False, last=True)
        finally:
            await conn.close()

    # -- beyond the protocol -----------------------------------------------------------

    async def create(
        self,
        id: str,
        workflow: str,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        *,
        history: Sequence[str] = (),
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        cursors: Sequence[str] = (),
        enqueue: TransactionHook | None = None,
    ) -> Record:
        """:meth:`PostgresStore.create`, awaited."""
        op = self._ops.create(
            id, workflow, status, blob, wake_at, history, history_limit, cursors, enqueue
        )
        return await self._run(op)

    async def save(
        self,
        id: str,
        expected_version: int,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        *,
        history: Sequence[str] = (),
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        cursors: Sequence[str] = (),
        enqueue: TransactionHook | None = None,
    ) -> Record:
        """:meth:`PostgresStore.save`, awaited."""
        op = self._ops.save(
            id, expected_version, status, blob, wake_at, history, history_limit, cursors, enqueue
        )
        return await self._run(op)

    async def using(self, conn: Any) -> AsyncPostgresStore:
        """This store with its calls run on ``conn``, the caller's ``psycopg.AsyncConnection``
        (see :meth:`PostgresStore.using`)."""
        if not isinstance(conn, psycopg.AsyncConnection):
            raise TypeError(
                f"{type(self).__name__}.using() takes a psycopg.AsyncConnection, got"
                f" {type(conn).__name__} (a sync Connection goes to PostgresStore)"
            )
        if not self._migrated:
            async with self._lock:
                if not self._migrated:
                    await self.migrate()
        return _OnConnection(self, conn)

    async def remember(self, key: str, until: datetime) -> bool:
        recorded = await super().remember(key, until)
        if self._ops.purge_due():
            await self.purge_expired()
        return recorded

    async def purge_expired(self, limit: int = PURGE_BATCH) -> int:
        """Delete up to ``limit`` expired keys of :meth:`remember`; how many went."""
        return await self._run(self._ops.purge_expired(limit))

    async def close(self) -> None:
        """Close the pool and its connections; the next call would open a new one."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


class _OnConnection(AsyncPostgresStore):
    """An :class:`AsyncPostgresStore` whose calls run on one connection of the caller's."""

    def __init__(self, store: AsyncPostgresStore, conn: _Conn) -> None:
        self.__dict__.update(store.__dict__)  # the same table, statements and wake-up floor
        self._conn = conn

    async def _run(self, op: Op[_T]) -> _T:
        conn = self._conn
        try:
            intrans = conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            if conn.autocommit or intrans:  # see PostgresStore's _OnConnection
                async with conn.transaction():
                    return await _execute(conn, op.steps())
            return await _execute(conn, op.steps())
        except psycopg.Error as exc:
            self._ops.settle(exc, op, lost=conn.closed or conn.broken, last=True)
        raise AssertionError("unreachable")

    async def using(self, conn: Any) -> AsyncPostgresStore:
        raise TypeError("this store already runs on a connection of the caller's")

    async def close(self) -> None:
        """Nothing to release: the connection is the caller's, the pool the store's."""


async def _execute(conn: _Conn, steps: Steps[_T]) -> _T:
    """Run each statement ``steps`` yields on ``conn``, awaited."""

    async def send(statement: Statement | Copy | Enqueue) -> Any:
        if isinstance(statement, Enqueue):
            await statement.hook.aenqueue(conn, statement.ids)
            return None
        if isinstance(statement, Copy):
            async with conn.cursor().copy(statement.query) as copy:
                for row in statement.rows:
                    await copy.write_row(row)
            return None
        cursor = await cursor_for(conn, statement).execute(statement.query, statement.params)
        if statement.fetch == "one":
            return await cursor.fetchone()
        return await cursor.fetchall() if statement.fetch == "all" else cursor.rowcount

    return await arun_steps(steps, send)
