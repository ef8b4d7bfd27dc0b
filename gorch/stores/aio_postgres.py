"""PostgreSQL for asyncio: psycopg 3's ``AsyncConnection`` through a bounded pool.

The tables, statements and the locking they rely on (the compare-and-swap
``UPDATE``, ``FOR UPDATE SKIP LOCKED`` claims, token-checked ``remember``) are
those of :class:`~gorch.stores.postgres.PostgresStore`, imported from it, so a
sync and an async store on one table are the same store.

Connections come from a ``psycopg_pool.AsyncConnectionPool`` (``pool_min`` kept
open, at most ``pool_max``; a call waits up to ``pool_timeout`` seconds for a
free one): an event loop serving many requests shares a few connections
instead of opening one per task. The first call connects once on its own to
create the schema, so a server that is down or refuses the login is reported at
once, with libpq's reason, instead of after the pool's wait.

Faults follow the sync store: a connection lost before ``COMMIT`` was sent is
replaced and the call runs once more; lost during ``COMMIT``, the outcome is
unknown and ``StoreUnavailable`` says so; other faults roll back and say
nothing was written. A pool belongs to the event loop that first used it.
"""

from __future__ import annotations

import asyncio
import builtins
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gorch.errors import Conflict, StoreUnavailable, WorkflowExists, WorkflowNotFound
from gorch.stores._common import check_limit, opt_utc, page_cursor, redact_url, scrub, to_utc
from gorch.stores.base import AsyncStore, Page, Record
from gorch.stores.postgres import (
    _COLUMNS,
    _PURGE_BATCH,
    _PURGE_EVERY,
    _SCHEMA,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TABLE,
    PostgresStore,
    _is_fault,
    _record,
)

_Conn = psycopg.AsyncConnection[TupleRow]
_T = TypeVar("_T")

DEFAULT_POOL_MIN = 1
DEFAULT_POOL_MAX = 10
DEFAULT_POOL_TIMEOUT = 30.0


class AsyncPostgresStore(AsyncStore):
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
    ) -> None:
        """``dsn`` is a libpq URL or key=value string; ``table`` may be schema-qualified."""
        parts = table.split(".")
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise ValueError(f"table must be 'name' or 'schema.name', got {table!r}")
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ValueError(
                f"need 0 <= pool_min <= pool_max and pool_max >= 1, got {pool_min}, {pool_max}"
            )
        if pool_timeout <= 0:
            raise ValueError(f"pool_timeout must be positive, got {pool_timeout}")
        self._dsn = dsn
        self.url = redact_url(dsn)
        self.table = table
        self.pool_min, self.pool_max, self.pool_timeout = pool_min, pool_max, pool_timeout
        self._options: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in conninfo_to_dict(dsn):
            self._options["connect_timeout"] = connect_timeout
        self._q = PostgresStore._queries(parts)
        self._list = sql.SQL("SELECT {cols} FROM {t}").format(
            cols=_COLUMNS, t=sql.Identifier(*parts)
        )
        self._pool: AsyncConnectionPool[_Conn] | None = None
        self._lock = asyncio.Lock()
        self._migrated = False
        self._next_purge = 0.0

    # -- connections -----------------------------------------------------------------

    def _fail(self, exc: BaseException, context: str = "") -> NoReturn:
        message = scrub(" ".join(str(exc).split()), self._dsn)  # libpq's text spans lines
        raise StoreUnavailable(
            f"PostgreSQL store {self.url} is unavailable: {message}{context}"
        ) from exc

    async def _connect(self) -> _Conn:
        """One connection outside the pool, its failure reported with libpq's reason."""
        try:
            return await psycopg.AsyncConnection.connect(self._dsn, **self._options)
        except psycopg.Error as exc:
            self._fail(exc)

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
                    open=False,
                    name=f"gorch {self.url}",
                )
                await pool.open(wait=False)
                self._pool = pool
        return self._pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Conn]:
        """A pooled connection; a pool that cannot give one says why."""
        pool = await self._ready()
        try:
            async with pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:  # only getting the connection raises it
            await self._explain_timeout(exc)

    async def _explain_timeout(self, exc: PoolTimeout) -> NoReturn:
        """No connection within ``pool_timeout``: the server is gone, or the pool is busy."""
        probe = await self._connect()  # raises StoreUnavailable with the server's reason
        await probe.close()
        self._fail(
            exc,
            f"; all {self.pool_max} pooled connections stayed busy for {self.pool_timeout:g} s"
            " (raise pool_max or pool_timeout in the URL); nothing was written",
        )

    async def _read(self, query: sql.Composed, params: tuple[Any, ...]) -> builtins.list[TupleRow]:
        """One SELECT in autocommit; once more on a new connection if this one was lost."""
        for attempt in (1, 2):
            conn: _Conn | None = None
            try:
                async with self._connection() as conn:
                    cursor = await conn.execute(query, params)
                    return await cursor.fetchall()
            except psycopg.Error as exc:
                lost = _lost(conn)
                if not _is_fault(exc):
                    raise
                if not lost or attempt == 2:
                    self._fail(exc)
        raise AssertionError("unreachable")

    async def _write(
        self, work: Callable[[_Conn], Awaitable[_T]], *, idempotent: bool = False
    ) -> _T:
        """``work`` in one transaction; see :meth:`PostgresStore._write` for the retry rule."""
        for attempt in (1, 2):
            conn: _Conn | None = None
            committing = False
            try:
                async with self._connection() as conn:
                    async with conn.transaction():
                        result = await work(conn)
                        committing = True  # leaving the block sends COMMIT
                    return result
            except psycopg.Error as exc:
                lost = _lost(conn)
                if not _is_fault(exc):
                    raise
                if lost and committing and not idempotent:
                    self._fail(
                        exc,
                        "; the connection was lost during COMMIT, so the write may or may"
                        " not have been applied",
                    )
                if not lost or attempt == 2:
                    self._fail(exc, "; nothing was written")
        raise AssertionError("unreachable")

    async def migrate(self) -> None:
        """Create the tables and their indexes if they are missing (safe to run concurrently)."""
        conn = await self._connect()
        try:
            async with conn.transaction():
                # CREATE ... IF NOT EXISTS still races on the catalog; serialise it.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
                for i in range(len(_SCHEMA)):
                    await conn.execute(self._q[f"schema{i}"])
            self._migrated = True
        except psycopg.Error as exc:
            if not _is_fault(exc):
                raise
            self._fail(exc)
        finally:
            await conn.close()

    # -- the protocol -----------------------------------------------------------------

    async def create(
        self, id: str, workflow: str, status: str, blob: bytes, wake_at: datetime | None
    ) -> Record:
        wake = opt_utc(wake_at)
        params = (id, workflow, status, blob, wake)

        async def work(conn: _Conn) -> TupleRow | None:
            return await (await conn.execute(self._q["insert"], params)).fetchone()

        if await self._write(work) is None:
            raise WorkflowExists(id)
        return Record(id, workflow, status, bytes(blob), 1, wake)

    async def load(self, id: str) -> Record:
        rows = await self._read(self._q["load"], (id,))
        if not rows:
            raise WorkflowNotFound(id)
        return _record(rows[0])

    async def save(
        self,
        id: str,
        expected_version: int,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
    ) -> Record:
        wake = opt_utc(wake_at)

        async def work(conn: _Conn) -> TupleRow:
            cursor = await conn.execute(self._q["save"], (status, blob, wake, id, expected_version))
            row = await cursor.fetchone()
            if row is None:
                current = await (await conn.execute(self._q["version"], (id,))).fetchone()
                raise Conflict(id, expected_version, None if current is None else current[0])
            return row

        workflow, version = await self._write(work)
        return Record(id, workflow, status, bytes(blob), version, wake)

    async def delete(self, id: str) -> None:
        async def work(conn: _Conn) -> TupleRow | None:
            return await (await conn.execute(self._q["delete"], (id,))).fetchone()

        if await self._write(work) is None:
            raise WorkflowNotFound(id)

    async def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        check_limit(limit)
        where: builtins.list[sql.Composable] = []
        params: builtins.list[Any] = []
        for condition, value in (
            ("workflow = %s", workflow),
            ("status = %s", status),
            ("id > %s", after),
        ):
            if value is not None:
                where.append(sql.SQL(condition))
                params.append(value)
        query = self._list
        if where:
            query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
        query += sql.SQL(" ORDER BY id LIMIT %s")
        records = [_record(row) for row in await self._read(query, (*params, limit + 1))]
        return Page(records[:limit], page_cursor([r.id for r in records], limit))

    async def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        if limit < 1:
            return []
        now = to_utc(now)
        until = now + lease
        params = (now, limit, until)

        async def work(conn: _Conn) -> builtins.list[TupleRow]:
            return await (await conn.execute(self._q["claim"], params)).fetchall()

        rows = await self._write(work)
        # UPDATE ... RETURNING has no order: restore "earliest first" from the old wake_at.
        rows.sort(key=lambda row: (row[5], row[0]))
        return [
            Record(id, workflow, status, bytes(blob), version, until)
            for id, workflow, status, blob, version, _ in rows
        ]

    async def remember(self, key: str, until: datetime) -> bool:
        token = uuid.uuid4().hex  # tells our own earlier, committed attempt from a rival's

        async def work(conn: _Conn) -> bool:
            cursor = await conn.execute(self._q["remember"], (key, token, to_utc(until)))
            if await cursor.fetchone():
                return True
            row = await (await conn.execute(self._q["token"], (key,))).fetchone()
            return row is not None and row[0] == token

        recorded = await self._write(work, idempotent=True)
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + _PURGE_EVERY
            await self.purge_expired()
        return recorded

    async def purge_expired(self, limit: int = _PURGE_BATCH) -> int:
        """Delete up to ``limit`` expired keys of :meth:`remember`; how many went."""

        async def work(conn: _Conn) -> int:
            return (await conn.execute(self._q["purge"], (limit,))).rowcount

        return await self._write(work, idempotent=True)

    async def close(self) -> None:
        """Close the pool and its connections; the next call would open a new one."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


def _lost(conn: _Conn | None) -> bool:
    """Whether a pooled connection is gone (the pool replaces it when it comes back)."""
    return conn is not None and (conn.broken or conn.closed)
