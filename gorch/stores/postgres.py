"""PostgreSQL (psycopg 3): one table shared by any number of processes and machines.

Compare-and-swap is a single ``UPDATE ... WHERE id = %s AND version = %s``:
the row lock serialises concurrent savers and the loser re-checks the version
and matches nothing. Claims pick due rows through the partial index on
``wake_at`` with ``FOR UPDATE SKIP LOCKED``, so concurrent workers split the due
rows between them instead of queueing on the same ones.

``id`` uses the "C" collation so that pages come in code-point order, as in
the other stores, whatever the database's default collation is.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

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
_LOST = (psycopg.OperationalError, psycopg.InterfaceError)  # the connection is gone or unusable

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
)
_COLUMNS = sql.SQL("id, workflow, status, blob, version, wake_at")


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _record(row: TupleRow) -> Record:
    id, workflow, status, blob, version, wake_at = row
    return Record(id, workflow, status, bytes(blob), version, _utc(wake_at))


class PostgresStore(Store):
    """A store in one PostgreSQL table (``gorch_workflows`` unless ``table`` says otherwise).

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

    def _fail(self, exc: BaseException) -> NoReturn:
        message = scrub(" ".join(str(exc).split()), self._dsn)  # libpq's text spans lines
        raise StoreUnavailable(f"PostgreSQL store {self.url} is unavailable: {message}") from exc

    @contextmanager
    def _tx(self) -> Iterator[_Conn]:
        """A transaction on this thread's connection; a lost connection is dropped and reported."""
        if not self._migrated:
            self._migrate(self._conns.get(), again=False)
        try:
            with ExitStack() as stack:
                yield self._begin(stack)
        except _LOST as exc:
            self._conns.discard()
            self._fail(exc)

    def _begin(self, stack: ExitStack) -> _Conn:
        """BEGIN, reconnecting once if the connection died while idle (a server restart, an
        idle timeout): nothing of the operation has run yet, so the retry cannot apply it twice.
        """
        try:
            conn = self._conns.get()
            stack.enter_context(conn.transaction())
            return conn
        except _LOST:
            self._conns.discard()
        conn = self._conns.get()
        stack.enter_context(conn.transaction())
        return conn

    def migrate(self) -> None:
        """Create the table and its indexes if they are missing (safe to run concurrently)."""
        self._migrate(self._conns.get(), again=True)

    def _migrate(self, conn: _Conn, *, again: bool) -> None:
        with self._lock:
            if self._migrated and not again:
                return  # another thread did it while this one waited
            try:
                with conn.transaction():
                    # CREATE ... IF NOT EXISTS still races on the catalog; serialise it.
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
                    for i in range(len(_SCHEMA)):
                        conn.execute(self._q[f"schema{i}"])
            except _LOST as exc:
                self._conns.discard()
                self._fail(exc)
            self._migrated = True

    # -- the protocol -----------------------------------------------------------------

    def create(
        self, id: str, workflow: str, status: str, blob: bytes, wake_at: datetime | None
    ) -> Record:
        wake = opt_utc(wake_at)
        with self._tx() as conn:
            row = conn.execute(self._q["insert"], (id, workflow, status, blob, wake)).fetchone()
        if row is None:
            raise WorkflowExists(id)
        return Record(id, workflow, status, bytes(blob), 1, wake)

    def load(self, id: str) -> Record:
        with self._tx() as conn:
            row = conn.execute(self._q["load"], (id,)).fetchone()
        if row is None:
            raise WorkflowNotFound(id)
        return _record(row)

    def save(
        self,
        id: str,
        expected_version: int,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
    ) -> Record:
        wake = opt_utc(wake_at)
        with self._tx() as conn:
            row = conn.execute(
                self._q["save"], (status, blob, wake, id, expected_version)
            ).fetchone()
            if row is None:
                current = conn.execute(self._q["version"], (id,)).fetchone()
                raise Conflict(id, expected_version, None if current is None else current[0])
        workflow, version = row
        return Record(id, workflow, status, bytes(blob), version, wake)

    def delete(self, id: str) -> None:
        with self._tx() as conn:
            row = conn.execute(self._q["delete"], (id,)).fetchone()
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
        with self._tx() as conn:
            rows = conn.execute(query, (*params, limit + 1)).fetchall()
        records = [_record(row) for row in rows]
        return Page(records[:limit], page_cursor([r.id for r in records], limit))

    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        if limit < 1:
            return []
        now = to_utc(now)
        until = now + lease
        with self._tx() as conn:
            rows = conn.execute(self._q["claim"], (now, limit, until)).fetchall()
        # UPDATE ... RETURNING has no order: restore "earliest first" from the old wake_at.
        rows.sort(key=lambda row: (row[5], row[0]))
        return [
            Record(id, workflow, status, bytes(blob), version, until)
            for id, workflow, status, blob, version, _ in rows
        ]

    def close(self) -> None:
        """Close the connections this process opened, in every thread."""
        self._conns.close_all()
