"""PostgreSQL (psycopg 3): one table shared by any number of processes and machines.

Compare-and-swap is a single ``UPDATE ... WHERE id = %s AND version = %s``:
the row lock serialises concurrent savers and the loser re-checks the version
and matches nothing. Claims pick due rows through the partial index on
``wake_at`` with ``FOR UPDATE SKIP LOCKED``, so concurrent workers split the due
rows between them instead of queueing on the same ones.

``id`` uses the "C" collation so that pages come in code-point order, as in
the other stores, whatever the database's default collation is.

Connections come from a bounded ``psycopg_pool.ConnectionPool`` (``pool_min``
kept open, at most ``pool_max``; a call waits up to ``pool_timeout`` seconds for
a free one), shared by every thread of the process: a web server's forty
worker threads share ten connections instead of opening forty. Each connection
is in autocommit mode and every write is one statement, so a write costs one
round trip and commits as soon as it succeeds; statements are prepared on
first use (``prepare_threshold``). A connection that died while idle (a server
restart, an idle timeout) is noticed and replaced before a statement is sent
on it. A connection lost *during* a write leaves its outcome unknown, and
``StoreUnavailable`` says so (the Engine reads the record back to settle it);
a read is simply run again. Remembered keys live in a second table,
``{table}_seen``, and expire by the server's clock.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from gorch.stores._ops import ConnectorStore, Op, run_steps
from gorch.stores._options import (
    DEFAULT_POOL_MAX,
    DEFAULT_POOL_MIN,
    DEFAULT_POOL_TIMEOUT,
    DEFAULT_PREPARE_THRESHOLD,
    check_pool,
)
from gorch.stores.base import DEFAULT_HISTORY_LIMIT, Record
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

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_POOL_MAX",
    "DEFAULT_POOL_MIN",
    "DEFAULT_POOL_TIMEOUT",
    "DEFAULT_TABLE",
    "PostgresStore",
]

_Conn = psycopg.Connection[TupleRow]
_T = TypeVar("_T")


class _PooledConnection(KeepsCursor, psycopg.Connection[TupleRow]):
    """A connection of the store's pool (see :class:`KeepsCursor`)."""


def connect_options(
    dsn: str, connect_timeout: int, prepare_threshold: int | None
) -> dict[str, Any]:
    """What every connection of a store is opened with (sync and async alike)."""
    options: dict[str, Any] = {"autocommit": True, "prepare_threshold": prepare_threshold}
    if "connect_timeout" not in conninfo_to_dict(dsn):
        options["connect_timeout"] = connect_timeout
    return options


def idle_connection_died(fileno: int) -> bool:
    """Whether an idle connection has something to read: a server that ends a session
    (a restart, ``pg_terminate_backend``, an idle timeout) sends its reason and closes,
    so an idle socket that turns readable is most likely a dead one."""
    try:
        ready, _, _ = select.select([fileno], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(ready)


class PostgresStore(ConnectorStore):
    """A store in one PostgreSQL table (``gorch_workflows`` unless ``table`` says otherwise),
    and ``{table}_seen`` for :meth:`remember`.

    The schema is created on first use (or ahead of time with :meth:`migrate`),
    on a connection of its own, so a server that is down or refuses the login
    is reported at once with libpq's reason. The statements and the retry rule
    are :class:`~gorch.stores.postgres_sql.PostgresSQL`'s; this class only runs
    them, blocking, on pooled connections.
    """

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
        """``dsn`` is a libpq URL or key=value string; ``table`` may be schema-qualified.

        ``pool_min`` connections are kept open, at most ``pool_max`` are opened
        at once, and a call waits up to ``pool_timeout`` seconds for a free one.
        """
        self._ops: PostgresSQL = PostgresSQL(dsn, table)
        check_pool(pool_min, pool_max, pool_timeout)
        self._dsn = dsn
        self.url = self._ops.url
        self.table = table
        self.pool_min, self.pool_max, self.pool_timeout = pool_min, pool_max, pool_timeout
        self.prepare_threshold = prepare_threshold
        self._options = connect_options(dsn, connect_timeout, prepare_threshold)
        self._pool: ConnectionPool[_Conn] | None = None
        self._pid = os.getpid()
        self._inherited: list[object] = []
        self._lock = threading.Lock()
        self._migrated = False

    # -- connections -----------------------------------------------------------------

    def _connect(self) -> _Conn:
        """One connection outside the pool, its failure reported with libpq's reason."""
        try:
            return psycopg.connect(self._dsn, **self._options)
        except psycopg.Error as exc:
            raise self._ops.unavailable(exc) from exc

    def _configure(self, conn: _Conn) -> None:
        """Called with every connection the pool opens (a hook for subclasses and tests)."""

    def _ready(self) -> ConnectionPool[_Conn]:
        """The open pool (opened on first use; a new one in a child process after ``fork``)."""
        if self._pid != os.getpid():
            self._after_fork()
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._pool is None:
                pool = ConnectionPool(
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
                pool.open(wait=False)
                self._pool = pool
            return self._pool

    def _after_fork(self) -> None:
        """In a child process: never touch the parent's pool (closing its connections would
        end the parent's sessions, and its worker threads did not survive the fork); keep
        it referenced, unused, and open a pool of our own on next use."""
        self._inherited.append(self._pool)
        self._pool = None
        self._lock = threading.Lock()  # the parent's may have been held by another thread
        self._pid = os.getpid()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[_Conn]:
        """A pooled connection that is alive as far as can be told without a round trip."""
        pool = self._ready()
        conn = self._checkout(pool)
        try:
            yield conn
        finally:
            pool.putconn(conn)

    def _checkout(self, pool: ConnectionPool[_Conn]) -> _Conn:
        """A connection of ``pool`` whose session has not ended, to hand back with putconn.

        A pooled connection whose session ended while it was idle is closed and
        handed back (the pool opens another in its place), so that no write is
        ever sent on a connection already dead: its outcome would be unknown.
        """
        conn = self._getconn(pool)
        for _ in range(self.pool_max):
            if not (conn.closed or conn.broken or idle_connection_died(conn.fileno())):
                break
            conn.close()
            pool.putconn(conn)
            conn = self._getconn(pool)
        return conn

    def connection(self) -> contextlib.AbstractContextManager[_Conn]:
        """A connection of the store's pool for the block, handed back when it ends.

        For work that belongs in the store's database next to its writes (a job
        queue in the same PostgreSQL enqueues on it): its database, user and
        ``search_path`` are the store's. It is in autocommit mode; open a
        transaction with ``conn.transaction()`` for more than one statement.
        """
        return self._connection()

    def _getconn(self, pool: ConnectionPool[_Conn]) -> _Conn:
        try:
            return pool.getconn()
        except PoolTimeout as exc:
            self._explain_timeout(exc)

    def _explain_timeout(self, exc: PoolTimeout) -> NoReturn:
        """No connection within ``pool_timeout``: the server is gone, or the pool is busy."""
        self._connect().close()  # raises StoreUnavailable with the server's reason
        raise self._ops.unavailable(
            exc,
            f"; all {self.pool_max} pooled connections stayed busy for {self.pool_timeout:g} s"
            " (raise pool_max or pool_timeout in the URL); nothing was written",
        ) from exc

    def _run(self, op: Op[_T]) -> _T:
        """``op`` on a pooled connection; run once more on another when
        :meth:`PostgresSQL.settle` says so."""
        self._ensure_schema()
        for attempt in (1, 2):
            pool = self._ready()
            conn = self._checkout(pool)  # (not _connection(): a context manager costs)
            try:
                if op.batch:
                    with conn.transaction():
                        return _execute(conn, op.steps())
                return _execute(conn, op.steps())
            except psycopg.Error as exc:
                lost = conn.closed or conn.broken
                self._ops.settle(exc, op, lost=lost, last=attempt == 2)
            finally:
                pool.putconn(conn)
        raise AssertionError("unreachable")

    def _ensure_schema(self) -> None:
        if self._migrated:
            return
        with self._lock:
            if not self._migrated:
                self.migrate()

    def migrate(self) -> None:
        """Create the tables and their indexes if they are missing (safe to run concurrently)."""
        for attempt in (1, 2):  # a connection lost on the way is replaced once
            conn = self._connect()
            try:
                with conn.transaction():
                    _execute(conn, self._ops.schema())
                self._migrated = True
                return
            except psycopg.Error as exc:
                self._ops.settle(exc, None, lost=conn.closed or conn.broken, last=attempt == 2)
            finally:
                conn.close()

    # -- beyond the protocol -----------------------------------------------------------

    def create(
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
        """:meth:`Store.create`; ``enqueue`` is told of the record in the insert's transaction."""
        op = self._ops.create(
            id, workflow, status, blob, wake_at, history, history_limit, cursors, enqueue
        )
        return self._run(op)

    def save(
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
        """:meth:`Store.save`; ``enqueue`` is told of the record in the update's transaction
        (a conflict enqueues nothing)."""
        op = self._ops.save(
            id, expected_version, status, blob, wake_at, history, history_limit, cursors, enqueue
        )
        return self._run(op)

    def using(self, conn: Any) -> PostgresStore:
        """This store with its calls run on ``conn``, the caller's ``psycopg.Connection``.

        A write joins the transaction open on ``conn`` (as a savepoint, so a
        refused write leaves the caller's transaction usable) and commits or
        rolls back with it; on a connection in autocommit mode without a
        transaction, each write is a transaction of its own. The table is
        created first, on a connection of the store's. ``conn`` stays the
        caller's: nothing here commits it or closes it.
        """
        if not isinstance(conn, psycopg.Connection):
            raise TypeError(
                f"{type(self).__name__}.using() takes a psycopg.Connection, got"
                f" {type(conn).__name__} (an AsyncConnection goes to AsyncPostgresStore)"
            )
        self._ensure_schema()
        return _OnConnection(self, conn)

    def remember(self, key: str, until: datetime) -> bool:
        recorded = super().remember(key, until)
        if self._ops.purge_due():
            self.purge_expired()
        return recorded

    def purge_expired(self, limit: int = PURGE_BATCH) -> int:
        """Delete up to ``limit`` expired keys of :meth:`remember`; how many went.

        ``remember`` calls it every half minute or so; a cron job may call it too.
        """
        return self._run(self._ops.purge_expired(limit))

    def close(self) -> None:
        """Close the pool and its connections (in a child after ``fork``: only the child's);
        the next call opens a new pool."""
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


class _OnConnection(PostgresStore):
    """A :class:`PostgresStore` whose calls run on one connection of the caller's."""

    def __init__(self, store: PostgresStore, conn: _Conn) -> None:
        self.__dict__.update(store.__dict__)  # the same table, statements and wake-up floor
        self._conn = conn
        self._migrated = True

    def _run(self, op: Op[_T]) -> _T:
        conn = self._conn
        try:
            # In a transaction (or with none to join, in autocommit): a savepoint (or a
            # transaction) of our own. Idle outside autocommit: the statement opens the
            # caller's transaction, as any statement of theirs would.
            if (
                conn.autocommit
                or conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            ):
                with conn.transaction():
                    return _execute(conn, op.steps())
            return _execute(conn, op.steps())
        except psycopg.Error as exc:
            self._ops.settle(exc, op, lost=conn.closed or conn.broken, last=True)
        raise AssertionError("unreachable")

    def using(self, conn: Any) -> PostgresStore:
        raise TypeError("this store already runs on a connection of the caller's")

    def close(self) -> None:
        """Nothing to release: the connection is the caller's, the pool the store's."""


def _execute(conn: _Conn, steps: Steps[_T]) -> _T:
    """Run each statement ``steps`` yields on ``conn``, blocking."""

    def send(statement: Statement | Copy | Enqueue) -> Any:
        if isinstance(statement, Enqueue):
            statement.hook.enqueue(conn, statement.ids)
            return None
        if isinstance(statement, Copy):
            with conn.cursor().copy(statement.query) as copy:
                for row in statement.rows:
                    copy.write_row(row)
            return None
        cursor = cursor_for(conn, statement).execute(statement.query, statement.params)
        if statement.fetch == "one":
            return cursor.fetchone()
        return cursor.fetchall() if statement.fetch == "all" else cursor.rowcount

    return run_steps(steps, send)
