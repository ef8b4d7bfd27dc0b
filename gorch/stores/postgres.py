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

import builtins
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from gorch.errors import Conflict, StoreUnavailable, WorkflowExists, WorkflowNotFound
from gorch.stores._common import (
    PerThread,
    check_limit,
    opt_utc,
    page_cursor,
    redact_url,
    scrub,
    to_utc,
)
from gorch.stores.base import Page, Record, Store

_Conn = psycopg.Connection[TupleRow]
_T = TypeVar("_T")
_FAULTS = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.InternalError)
"""Driver errors that mean the store cannot be used now: connection lost or refused, disk
full, out of memory, lock or statement timeout, server shutting down, read-only server."""
_FAULT_STATES = frozenset({"42501", "42P01"})  # permission denied, table dropped under us
_PURGE_EVERY = 30.0  # seconds between two purges of expired keys by one store
_PURGE_BATCH = 1000

DEFAULT_TABLE = "gorch_workflows"
DEFAULT_CONNECT_TIMEOUT = 10

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {t} (
        id text COLLATE "C" PRIMARY KEY,
        workflow text NOT NULL,
        status text NOT NULL,
        blob bytea NOT NULL,
        version bigint NOT NULL,
        wake_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    "CREATE INDEX IF NOT EXISTS {wake_idx} ON {t} (wake_at, id) WHERE wake_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS {workflow_idx} ON {t} (workflow, id)",
    "CREATE INDEX IF NOT EXISTS {status_idx} ON {t} (status, id)",
    """CREATE TABLE IF NOT EXISTS {seen} (
        key text COLLATE "C" PRIMARY KEY,
        token text NOT NULL,
        until timestamptz NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS {seen_idx} ON {seen} (until)",
)
_COLUMNS = sql.SQL("id, workflow, status, blob, version, wake_at")


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _record(row: TupleRow) -> Record:
    id, workflow, status, blob, version, wake_at = row
    return Record(id, workflow, status, bytes(blob), version, _utc(wake_at))


def _is_fault(exc: psycopg.Error) -> bool:
    """Whether a driver error means the store is unusable now, rather than a bug of ours."""
    return isinstance(exc, _FAULTS) or exc.sqlstate in _FAULT_STATES


class PostgresStore(Store):
    """A store in one PostgreSQL table (``gorch_workflows`` unless ``table`` says otherwise),
    and ``{table}_seen`` for :meth:`remember`.

    The schema is created on first use (or ahead of time with :meth:`migrate`).
    Each thread uses its own connection, in autocommit mode with explicit
    transactions, so no connection idles inside a transaction between calls.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = DEFAULT_TABLE,
        connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        """``dsn`` is a libpq URL or key=value string; ``table`` may be schema-qualified."""
        parts = table.split(".")
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise ValueError(f"table must be 'name' or 'schema.name', got {table!r}")
        self._dsn = dsn
        self.url = redact_url(dsn)
        self.table = table
        self._connect_timeout = connect_timeout
        self._conns = PerThread(self._open)
        self._lock = threading.Lock()
        self._migrated = False
        self._q = self._queries(parts)
        self._next_purge = 0.0  # time.monotonic() after which remember() purges expired keys

    @staticmethod
    def _queries(parts: builtins.list[str]) -> dict[str, sql.Composed]:
        """Every statement, composed once with the (quoted) table and index names."""
        base = parts[-1]
        names = {
            "t": sql.Identifier(*parts),
            "cols": _COLUMNS,
            "wake_idx": sql.Identifier(f"{base}_wake_at_idx"),
            "workflow_idx": sql.Identifier(f"{base}_workflow_idx"),
            "status_idx": sql.Identifier(f"{base}_status_idx"),
            "seen": sql.Identifier(*parts[:-1], f"{base}_seen"),
            "seen_idx": sql.Identifier(f"{base}_seen_until_idx"),
        }
        texts = {
            **{f"schema{i}": text for i, text in enumerate(_SCHEMA)},
            "insert": "INSERT INTO {t} (id, workflow, status, blob, version, wake_at)"
            " VALUES (%s, %s, %s, %s, 1, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
            "load": "SELECT {cols} FROM {t} WHERE id = %s",
            "save": "UPDATE {t} SET status = %s, blob = %s, wake_at = %s,"
            " version = version + 1, updated_at = now()"
            " WHERE id = %s AND version = %s RETURNING workflow, version",
            "version": "SELECT version FROM {t} WHERE id = %s",
            "delete": "DELETE FROM {t} WHERE id = %s RETURNING id",
            "claim": "WITH due AS ("
            " SELECT id, wake_at FROM {t} WHERE wake_at <= %s"
            " ORDER BY wake_at, id LIMIT %s FOR UPDATE SKIP LOCKED)"
            " UPDATE {t} AS w SET wake_at = %s, version = w.version + 1, updated_at = now()"
            " FROM due WHERE w.id = due.id"
            " RETURNING w.id, w.workflow, w.status, w.blob, w.version, due.wake_at",
            # A live key is left alone (no row returned); an absent or expired one is
            # taken. Concurrent callers queue on the key's row lock: one wins.
            "remember": "INSERT INTO {seen} AS s (key, token, until) VALUES (%s, %s, %s)"
            " ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token, until = EXCLUDED.until"
            " WHERE s.until <= clock_timestamp() RETURNING token",
            "token": "SELECT token FROM {seen} WHERE key = %s",
            # SKIP LOCKED: a purge never waits for (or deadlocks with) a remember().
            "purge": "DELETE FROM {seen} WHERE key IN (SELECT key FROM {seen}"
            " WHERE until <= clock_timestamp() ORDER BY until LIMIT %s FOR UPDATE SKIP LOCKED)",
        }
        return {key: sql.SQL(text).format(**names) for key, text in texts.items()}

    # -- connections -----------------------------------------------------------------

    def _open(self) -> _Conn:
        options: dict[str, Any] = {"autocommit": True}
        try:
            if "connect_timeout" not in conninfo_to_dict(self._dsn):
                options["connect_timeout"] = self._connect_timeout
            return psycopg.connect(self._dsn, **options)
        except psycopg.Error as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException, context: str = "") -> NoReturn:
        message = scrub(" ".join(str(exc).split()), self._dsn)  # libpq's text spans lines
        raise StoreUnavailable(
            f"PostgreSQL store {self.url} is unavailable: {message}{context}"
        ) from exc

    def _read(self, query: sql.Composed, params: tuple[Any, ...]) -> builtins.list[TupleRow]:
        """One SELECT in autocommit; tried once more on a new connection if this one was
        lost (a restart, an idle timeout, a dropped network): a read is safe to repeat."""
        self._ensure_schema()
        for attempt in (1, 2):
            conn = self._conns.get()
            try:
                return conn.execute(query, params).fetchall()
            except psycopg.Error as exc:
                lost = self._lost(conn)
                if not _is_fault(exc):
                    raise
                if not lost or attempt == 2:
                    self._fail(exc)
        raise AssertionError("unreachable")

    def _write(self, work: Callable[[_Conn], _T], *, idempotent: bool = False) -> _T:
        """``work`` in one transaction, so that a failure before COMMIT applies nothing.

        A connection lost before COMMIT was sent (idle, at BEGIN, in the middle of
        a statement) is replaced and ``work`` runs once more: its transaction ended
        with the session, uncommitted. A connection lost during COMMIT may or may
        not have committed: ``StoreUnavailable`` says the outcome is unknown (read
        the record back to settle it), unless ``work`` is ``idempotent`` (running
        it again after it committed gives the same answer), when it is run again.
        Other faults (disk full, a lock timeout) roll back, and
        ``StoreUnavailable`` says nothing was written.
        """
        self._ensure_schema()
        for attempt in (1, 2):
            conn = self._conns.get()
            committing = False
            try:
                with conn.transaction():
                    result = work(conn)
                    committing = True  # leaving the block sends COMMIT
                return result
            except psycopg.Error as exc:
                lost = self._lost(conn)
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
                if not _is_fault(exc):
                    raise
                if not lost or attempt == 2:
                    self._fail(exc)

    def migrate(self) -> None:
        """Create the tables and their indexes if they are missing (safe to run concurrently)."""
        conn = self._conns.get()
        try:
            self._migrate(conn, again=True)
        except psycopg.Error as exc:
            self._lost(conn)
            if not _is_fault(exc):
                raise
            self._fail(exc)

    def _migrate(self, conn: _Conn, *, again: bool) -> None:
        with self._lock:
            if self._migrated and not again:
                return  # another thread did it while this one waited
            with conn.transaction():
                # CREATE ... IF NOT EXISTS still races on the catalog; serialise it.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
                for i in range(len(_SCHEMA)):
                    conn.execute(self._q[f"schema{i}"])
            self._migrated = True

    # -- the protocol -----------------------------------------------------------------

    def create(
        self, id: str, workflow: str, status: str, blob: bytes, wake_at: datetime | None
    ) -> Record:
        wake = opt_utc(wake_at)
        params = (id, workflow, status, blob, wake)
        row = self._write(lambda conn: conn.execute(self._q["insert"], params).fetchone())
        if row is None:
            raise WorkflowExists(id)
        return Record(id, workflow, status, bytes(blob), 1, wake)

    def load(self, id: str) -> Record:
        rows = self._read(self._q["load"], (id,))
        if not rows:
            raise WorkflowNotFound(id)
        return _record(rows[0])

    def save(
        self,
        id: str,
        expected_version: int,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
    ) -> Record:
        wake = opt_utc(wake_at)

        def work(conn: _Conn) -> TupleRow:
            row = conn.execute(
                self._q["save"], (status, blob, wake, id, expected_version)
            ).fetchone()
            if row is None:
                current = conn.execute(self._q["version"], (id,)).fetchone()
                raise Conflict(id, expected_version, None if current is None else current[0])
            return row

        workflow, version = self._write(work)
        return Record(id, workflow, status, bytes(blob), version, wake)

    def delete(self, id: str) -> None:
        row = self._write(lambda conn: conn.execute(self._q["delete"], (id,)).fetchone())
        if row is None:
            raise WorkflowNotFound(id)

    def list(
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
        query = sql.SQL("SELECT {cols} FROM {t}").format(
            cols=_COLUMNS, t=sql.Identifier(*self.table.split("."))
        )
        if where:
            query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
        query += sql.SQL(" ORDER BY id LIMIT %s")
        records = [_record(row) for row in self._read(query, (*params, limit + 1))]
        return Page(records[:limit], page_cursor([r.id for r in records], limit))

    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        if limit < 1:
            return []
        now = to_utc(now)
        until = now + lease
        params = (now, limit, until)
        rows = self._write(lambda conn: conn.execute(self._q["claim"], params).fetchall())
        # UPDATE ... RETURNING has no order: restore "earliest first" from the old wake_at.
        rows.sort(key=lambda row: (row[5], row[0]))
        return [
            Record(id, workflow, status, bytes(blob), version, until)
            for id, workflow, status, blob, version, _ in rows
        ]

    def remember(self, key: str, until: datetime) -> bool:
        token = uuid.uuid4().hex  # tells our own earlier, committed attempt from a rival's

        def work(conn: _Conn) -> bool:
            if conn.execute(self._q["remember"], (key, token, to_utc(until))).fetchone():
                return True
            row = conn.execute(self._q["token"], (key,)).fetchone()
            return row is not None and row[0] == token

        recorded = self._write(work, idempotent=True)
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + _PURGE_EVERY
            self.purge_expired()
        return recorded

    def purge_expired(self, limit: int = _PURGE_BATCH) -> int:
        """Delete up to ``limit`` expired keys of :meth:`remember`; how many went.

        ``remember`` calls it every half minute or so; a cron job may call it too.
        """
        return self._write(
            lambda conn: conn.execute(self._q["purge"], (limit,)).rowcount, idempotent=True
        )

    def close(self) -> None:
        """Close the connections this process opened, in every thread."""
        self._conns.close_all()
