"""PostgreSQL (psycopg 3): one table shared by any number of processes and machines.

Compare-and-swap is a single ``UPDATE ... WHERE id = %s AND version = %s``:
the row lock serialises concurrent savers and the loser re-checks the version
and matches nothing. Claims pick due rows through the partial index on
``wake_at`` with ``FOR UPDATE SKIP LOCKED``, so concurrent workers split the due
rows between them instead of queueing on the same ones.

``id`` uses the "C" collation so that pages come in code-point order, as in
the other stores, whatever the database's default collation is.

Writes run in explicit transactions (``BEGIN`` ... ``COMMIT``). A connection
lost before ``COMMIT`` was sent cannot have applied anything (the server rolls
back the transaction of a session that ends), so the write is tried once more
on a new connection; only a connection lost *during* ``COMMIT`` leaves the
outcome unknown, and ``StoreUnavailable`` says so. Remembered keys live in a
second table, ``{table}_seen``, and expire by the server's clock.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from gorch.stores._common import PerThread
from gorch.stores._ops import ConnectorStore, Op, run_steps
from gorch.stores.postgres_sql import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TABLE,
    PURGE_BATCH,
    PostgresSQL,
    Statement,
    Steps,
)

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_TABLE", "PostgresStore"]

_Conn = psycopg.Connection[TupleRow]
_T = TypeVar("_T")


class PostgresStore(ConnectorStore):
    """A store in one PostgreSQL table (``gorch_workflows`` unless ``table`` says otherwise),
    and ``{table}_seen`` for :meth:`remember`.

    The schema is created on first use (or ahead of time with :meth:`migrate`).
    Each thread uses its own connection, in autocommit mode with explicit
    transactions, so no connection idles inside a transaction between calls.
    The statements and the retry rule are :class:`~gorch.stores.postgres_sql.PostgresSQL`'s;
    this class only runs them, blocking.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = DEFAULT_TABLE,
        connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        """``dsn`` is a libpq URL or key=value string; ``table`` may be schema-qualified."""
        self._ops: PostgresSQL = PostgresSQL(dsn, table)
        self._dsn = dsn
        self.url = self._ops.url
        self.table = table
        self._connect_timeout = connect_timeout
        self._conns = PerThread(self._open)
        self._lock = threading.Lock()
        self._migrated = False

    # -- connections -----------------------------------------------------------------

    def _open(self) -> _Conn:
        options: dict[str, Any] = {"autocommit": True}
        try:
            if "connect_timeout" not in conninfo_to_dict(self._dsn):
                options["connect_timeout"] = self._connect_timeout
            return psycopg.connect(self._dsn, **options)
        except psycopg.Error as exc:
            raise self._ops.unavailable(exc) from exc

    def _run(self, op: Op[_T]) -> _T:
        """``op`` on this thread's connection; a lost one is replaced and ``op`` run
        once more when :meth:`PostgresSQL.settle` says so."""
        self._ensure_schema()
        for attempt in (1, 2):
            conn = self._conns.get()
            committing = False
            try:
                if not op.write:
                    return _execute(conn, op.steps())
                with conn.transaction():
                    result = _execute(conn, op.steps())
                    committing = True  # leaving the block sends COMMIT
                return result
            except psycopg.Error as exc:
                lost = self._lost(conn)
                self._ops.settle(exc, op, lost=lost, committing=committing, last=attempt == 2)
        raise AssertionError("unreachable")

    def _lost(self, conn: _Conn) -> bool:
        """Whether ``conn`` is gone; if so, drop it so that the next call opens a new one."""
        if conn.broken or conn.closed:
            self._conns.discard()
            return True
        return False

    def _ensure_schema(self) -> None:
        if self._migrated:
            return
        for attempt in (1, 2):  # a connection that died while idle is replaced once
            conn = self._conns.get()
            try:
                self._migrate(conn, again=False)
                return
            except psycopg.Error as exc:
                lost = self._lost(conn)
                self._ops.settle(exc, None, lost=lost, last=attempt == 2)

    def migrate(self) -> None:
        """Create the tables and their indexes if they are missing (safe to run concurrently)."""
        conn = self._conns.get()
        try:
            self._migrate(conn, again=True)
        except psycopg.Error as exc:
            self._lost(conn)
            self._ops.settle(exc, None, lost=False, last=True)

    def _migrate(self, conn: _Conn, *, again: bool) -> None:
        with self._lock:
            if self._migrated and not again:
                return  # another thread did it while this one waited
            with conn.transaction():
                _execute(conn, self._ops.schema())
            self._migrated = True

    # -- beyond the protocol -----------------------------------------------------------

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
        """Close the connections this process opened, in every thread."""
        self._conns.close_all()


def _execute(conn: _Conn, steps: Steps[_T]) -> _T:
    """Run each statement ``steps`` yields on ``conn``, blocking."""

    def send(statement: Statement) -> Any:
        cursor = conn.execute(statement.query, statement.params)
        if statement.fetch == "one":
            return cursor.fetchone()
        return cursor.fetchall() if statement.fetch == "all" else cursor.rowcount

    return run_steps(steps, send)
