"""PostgreSQL's side of the store, written once for the sync and the async connector.

Nothing here does I/O. :class:`PostgresSQL` holds the schema and every
statement composed with one table's quoted names, and describes each store
operation as an :class:`~gorch.stores._ops.Op`: a generator of
:class:`Statement` (the result of each is sent back in) that maps rows to
records and raises the protocol's errors; a write runs in one transaction.
It also holds the rule that decides, after a driver error, whether to try
again on a new connection or what to report (:meth:`PostgresSQL.settle`).
:class:`~gorch.stores.postgres.PostgresStore` and
:class:`~gorch.stores.aio_postgres.AsyncPostgresStore` are the connectors: they
carry the statements out, blocking or awaited, on connections of their own.
"""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.rows import TupleRow

from gorch.errors import Conflict, StoreUnavailable, WorkflowExists, WorkflowNotFound
from gorch.stores._common import (
    append_history,
    check_history_limit,
    check_limit,
    check_purge,
    opt_utc,
    page_cursor,
    redact_url,
    scrub,
    to_utc,
)
from gorch.stores._floor import WakeFloor
from gorch.stores._ops import Op
from gorch.stores.base import HistoryLog, NewRecord, Page, Record

T = TypeVar("T")

FAULTS = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.InternalError)
"""Driver errors that mean the store cannot be used now: connection lost or refused, disk
full, out of memory, lock or statement timeout, server shutting down, read-only server."""
FAULT_STATES = frozenset({"42501", "42P01"})  # permission denied, table dropped under us
PURGE_EVERY = 30.0  # seconds between two purges of expired keys by one store
PURGE_BATCH = 1000

DEFAULT_TABLE = "gorch_workflows"
DEFAULT_CONNECT_TIMEOUT = 10

TERMINAL = ("finished", "cancelled", "failed")
"""Statuses an instance ends in: the only rows the purge index holds."""
TERMINAL_SQL = "status IN ('finished', 'cancelled', 'failed')"

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {t} (
        id text COLLATE "C" PRIMARY KEY,
        workflow text NOT NULL,
        status text NOT NULL,
        blob bytea NOT NULL,
        version bigint NOT NULL,
        wake_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now(),
        created_at timestamptz NOT NULL DEFAULT now(),
        cursors text[] NOT NULL DEFAULT '{{}}',
        history jsonb NOT NULL DEFAULT '[]',
        history_dropped bigint NOT NULL DEFAULT 0
    )""",
    # Every index costs each write an index insert (most saves change wake_at or status,
    # so PostgreSQL cannot update in place), hence only two beside the primary key:
    # * the wake-up index: run_due's claims, which must not read records that are not
    #   due; partial, so finished instances (wake_at NULL) are not in it;
    # * the purge index: retention deletes old ended instances in batches, oldest first;
    #   partial, so only an instance's last save (the one that ends it) writes to it.
    # list(workflow=..., status=...) walks the primary key in id order instead: a page
    # costs up to a scan of the table when matches are rare (an admin's query, not a
    # hot path).
    "CREATE INDEX IF NOT EXISTS {wake_idx} ON {t} (wake_at, id) WHERE wake_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS {purge_idx} ON {t} (status, updated_at) WHERE " + TERMINAL_SQL,
    """CREATE TABLE IF NOT EXISTS {seen} (
        key text COLLATE "C" PRIMARY KEY,
        token text NOT NULL,
        until timestamptz NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS {seen_idx} ON {seen} (until)",
)
OBSOLETE_INDEXES = ("workflow_idx", "status_idx", "status_updated_idx")
"""Indexes of earlier versions (by suffix), dropped by a migration: they cost every write."""
COLUMNS = sql.SQL("id, workflow, status, blob, version, wake_at")
ADDED_COLUMNS = {  # columns of later versions, added to a table created before them
    "created_at": "timestamptz",  # then filled from updated_at, then given its default
    "cursors": "text[] NOT NULL DEFAULT '{{}}'",
    "history": "jsonb NOT NULL DEFAULT '[]'",
    "history_dropped": "bigint NOT NULL DEFAULT 0",
}

_STATEMENTS = {
    # CREATE ... IF NOT EXISTS still races on the catalog: migrations take this lock first.
    "lock": "SELECT pg_advisory_xact_lock(hashtext(%s))",
    "insert": "INSERT INTO {t} (id, workflow, status, blob, version, wake_at, cursors,"
    " history, history_dropped) VALUES (%s, %s, %s, %s, 1, %s, %s::text[], %s::jsonb, %s)"
    " ON CONFLICT (id) DO NOTHING RETURNING id",
    "load": "SELECT {cols} FROM {t} WHERE id = %s",
    "taken": "SELECT id FROM {t} WHERE id = ANY(%s)",
    "copy": "COPY {t} (id, workflow, status, blob, version, wake_at, cursors, history,"
    " history_dropped) FROM STDIN",
    "save": "UPDATE {t} SET status = %s, blob = %s, wake_at = %s,"
    " version = version + 1, updated_at = now(), cursors = %s::text[]"
    " WHERE id = %s AND version = %s RETURNING workflow, version",
    # The same, appending to the history log in the same statement: the newest
    # ``limit`` entries are kept (a jsonpath slice), the rest counted as dropped.
    "save_history": "UPDATE {t} SET status = %(status)s, blob = %(blob)s,"
    " wake_at = %(wake)s, version = version + 1, updated_at = now(),"
    " cursors = %(cursors)s::text[],"
    # (jsonb_array_length reads the array's header: the usual case, under the cap, is a
    # plain concatenation; the jsonpath slice runs only when entries must go.)
    " history = CASE WHEN jsonb_array_length(history) + %(count)s <= %(limit)s"
    " THEN history || %(new)s::jsonb"
    " ELSE jsonb_path_query_array(history || %(new)s::jsonb, '$[$n to last]',"
    " jsonb_build_object('n', jsonb_array_length(history) + %(count)s - %(limit)s)) END,"
    " history_dropped = history_dropped"
    " + greatest(0, jsonb_array_length(history) + %(count)s - %(limit)s)"
    " WHERE id = %(id)s AND version = %(expected)s RETURNING workflow, version",
    "history": "SELECT array(SELECT e::text FROM jsonb_array_elements(history) AS e),"
    " history_dropped FROM {t} WHERE id = %s",
    # The test is repeated in the DELETE itself: a row a concurrent save moved or
    # touched after the inner SELECT read it (and before it was locked) stays.
    # A locking CTE runs once (an IN (subquery) may be rescanned past its LIMIT).
    "purge_records": "WITH doomed AS (SELECT id FROM {t}"
    " WHERE status = ANY(%(statuses)s) AND updated_at < %(before)s"
    " ORDER BY updated_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " DELETE FROM {t} AS w USING doomed WHERE w.id = doomed.id"
    " AND w.status = ANY(%(statuses)s) AND w.updated_at < %(before)s RETURNING w.id",
    # The same for ended statuses only (the usual case): the predicate, spelled as the
    # index's, lets the planner use the purge index whatever the parameters are.
    "purge_ended": "WITH doomed AS (SELECT id FROM {t}"
    " WHERE status = ANY(%(statuses)s) AND updated_at < %(before)s AND "
    + TERMINAL_SQL
    + " ORDER BY updated_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " DELETE FROM {t} AS w USING doomed WHERE w.id = doomed.id"
    " AND w.status = ANY(%(statuses)s) AND w.updated_at < %(before)s RETURNING w.id",
    "indexes": "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
    "current_schema": "SELECT current_schema()",
    "columns": "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s)"
    " AND attnum > 0 AND NOT attisdropped",
    "version": "SELECT version FROM {t} WHERE id = %s",
    "delete": "DELETE FROM {t} WHERE id = %s RETURNING id",
    "claim": "WITH due AS ("
    " SELECT id, wake_at FROM {t} WHERE wake_at <= %(now)s"
    " ORDER BY wake_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " UPDATE {t} AS w SET wake_at = %(until)s, version = w.version + 1, updated_at = now()"
    " FROM due WHERE w.id = due.id"
    " RETURNING w.id, w.workflow, w.status, w.blob, w.version, due.wake_at",
    # The same from a lower bound (see gorch.stores._floor): the index scan starts at the
    # floor instead of stepping over the dead entries fired timers leave below it.
    "claim_from": "WITH due AS ("
    " SELECT id, wake_at FROM {t} WHERE wake_at >= %(floor)s AND wake_at <= %(now)s"
    " ORDER BY wake_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " UPDATE {t} AS w SET wake_at = %(until)s, version = w.version + 1, updated_at = now()"
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
    "select": "SELECT {cols} FROM {t}",
}


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement for a connector to run, and what of its cursor to send back."""

    query: str | sql.Composed
    params: tuple[Any, ...] | dict[str, Any] = ()
    fetch: Literal["one", "all", "rowcount"] = "one"
    #: Its one row may be large (a blob, a history): it is not left in a kept cursor
    #: (see :class:`KeepsCursor`), which would hold it until the connection's next statement.
    large: bool = False

    @property
    def small(self) -> bool:
        """Whether a kept cursor may run it: a row count, or one row that is never large."""
        return not self.large and self.fetch != "all"


@dataclass(frozen=True, slots=True)
class Copy:
    """``COPY ... FROM STDIN`` for a connector to run, with the rows to send (it sends back
    nothing)."""

    query: str
    rows: Sequence[tuple[Any, ...]]


class TransactionHook(Protocol):
    """Work done on the store's own connection, inside the transaction of a write.

    A queue that lives in the same PostgreSQL (``gorch.dispatch.procrastinate``)
    enqueues "resume these instances" here, so the state save and the message
    commit, or roll back, together.
    """

    def enqueue(self, conn: psycopg.Connection[Any], ids: Sequence[str]) -> None:
        """Enqueue, blocking, on ``conn`` (a transaction is open on it)."""

    async def aenqueue(self, conn: psycopg.AsyncConnection[Any], ids: Sequence[str]) -> None:
        """Enqueue, awaited, on ``conn`` (a transaction is open on it)."""


@dataclass(frozen=True, slots=True)
class Enqueue:
    """Call ``hook`` with the connection the operation runs on (it sends back nothing)."""

    hook: TransactionHook
    ids: tuple[str, ...]


Steps: TypeAlias = Generator[Statement | Copy | Enqueue, Any, T]
"""An operation's statements in order; each one's result is sent back in."""


def record(row: TupleRow) -> Record:
    """The record of a row of :data:`COLUMNS`."""
    id, workflow, status, blob, version, wake_at = row
    return Record(id, workflow, status, bytes(blob), version, _utc(wake_at))


def _array(entries: builtins.list[str]) -> str:
    """Entries (each a JSON text) as one JSON array text."""
    return "[" + ",".join(entries) + "]"


class KeepsCursor:
    """Mixed into the connection class of a store's pool: the connection keeps one
    cursor for the store's small statements (see :func:`cursor_for`)."""

    statements: Any = None


def cursor_for(conn: Any, statement: Statement) -> Any:
    """The cursor to run ``statement`` on ``conn`` with.

    ``conn.execute`` makes a new cursor, with adapters of its own, for every
    statement; a pooled connection (a :class:`KeepsCursor`) serves one store
    call at a time, so its calls reuse one instead. A cursor keeps its last
    result until its next statement, so only :attr:`Statement.small` ones run
    there: a row count, or a row that is never large (not a blob, not a
    history). Any other statement, or connection, gets a new cursor.
    """
    if not (statement.small and isinstance(conn, KeepsCursor)):
        return conn.cursor()
    cursor = conn.statements
    if cursor is None or cursor.closed:
        cursor = conn.statements = conn.cursor()  # type: ignore[attr-defined]
    return cursor


def _text_array(items: Sequence[str]) -> str:
    """``items`` as a PostgreSQL array literal, for a ``%s::text[]`` parameter.

    Cheaper than a list parameter, which psycopg adapts element by element in
    Python on every save. Every element is quoted, so none reads as NULL, and
    a backslash or a double quote in it is escaped.
    """
    return (
        "{" + ",".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in items) + "}"
    )


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def is_fault(exc: psycopg.Error) -> bool:
    """Whether a driver error means the store is unusable now, rather than a bug of ours."""
    return isinstance(exc, FAULTS) or exc.sqlstate in FAULT_STATES


class PostgresSQL:
    """The statements of one store table (and its ``_seen`` table) and the rules around them.

    ``dsn`` is kept only to scrub its password from driver errors; ``url`` is
    the redacted one the stores show.
    """

    def __init__(self, dsn: str, table: str) -> None:
        parts = table.split(".")
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise ValueError(f"table must be 'name' or 'schema.name', got {table!r}")
        self.dsn = dsn
        self.url = redact_url(dsn)
        self.table = table
        base = parts[-1]
        names = {
            "t": sql.Identifier(*parts),
            "cols": COLUMNS,
            "wake_idx": sql.Identifier(f"{base}_wake_at_idx"),
            "purge_idx": sql.Identifier(f"{base}_ended_idx"),
            "seen": sql.Identifier(*parts[:-1], f"{base}_seen"),
            "seen_idx": sql.Identifier(f"{base}_seen_until_idx"),
        }
        texts = {**{f"schema{i}": text for i, text in enumerate(SCHEMA)}, **_STATEMENTS}
        for column, definition in ADDED_COLUMNS.items():
            texts[f"add_{column}"] = (
                f"ALTER TABLE {{t}} ADD COLUMN IF NOT EXISTS {column} {definition}"
            )
        texts["fill_created_at"] = "UPDATE {t} SET created_at = updated_at WHERE created_at IS NULL"
        texts["default_created_at"] = (
            "ALTER TABLE {t} ALTER COLUMN created_at SET DEFAULT now(),"
            " ALTER COLUMN created_at SET NOT NULL"
        )
        #: The table's name as ``to_regclass`` reads it (quoted, schema-qualified if given).
        self.regclass = ".".join('"' + part.replace('"', '""') + '"' for part in parts)
        #: Every statement, composed once with the (quoted) table and index names, as
        #: text: psycopg caches what it parses from a text query, while a composed one
        #: is rendered again (every identifier quoted again) on each execute.
        self.q = {key: sql.SQL(text).format(**names).as_string(None) for key, text in texts.items()}
        self._schema_name = parts[0] if len(parts) == 2 else None
        self.base = base
        self._obsolete = {f"{base}_{suffix}" for suffix in OBSOLETE_INDEXES}
        self._drop = {
            name: sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(*parts[:-1], name))
            for name in self._obsolete
        }
        self._next_purge = 0.0  # time.monotonic() after which remember() purges expired keys
        #: Where claims start their index scan (see :mod:`gorch.stores._floor`).
        self.floor = WakeFloor()

    # -- faults ----------------------------------------------------------------------

    def unavailable(self, exc: BaseException, context: str = "") -> StoreUnavailable:
        """The error a fault is reported as: the safe URL, libpq's reason, what it means."""
        message = scrub(" ".join(str(exc).split()), self.dsn)  # libpq's text spans lines
        return StoreUnavailable(f"PostgreSQL store {self.url} is unavailable: {message}{context}")

    def settle(self, exc: psycopg.Error, op: Op[Any] | None, *, lost: bool, last: bool) -> None:
        """After an attempt at ``op`` ended in ``exc``: return to try once more on another
        connection, or raise. ``op`` is None for creating the schema, told as a read is.

        Every write is one statement in autocommit, so the server commits it
        the moment it succeeds. A write whose connection is ``lost`` while it
        runs may have committed just before: ``StoreUnavailable`` says the
        outcome is unknown (read the record back to settle it), unless the
        write is ``idempotent``, which is simply run again. A read is run
        again too. (A connection that died while idle in the pool is replaced
        before a statement is sent on it, see :func:`check_idle`.) Other faults
        (disk full, a lock or statement timeout) end the statement without
        committing it: ``StoreUnavailable`` says nothing was written. An
        error that is no fault (a bug of ours) is raised as it is.
        """
        batch = op is not None and op.batch
        if batch and not last and isinstance(exc, psycopg.errors.UniqueViolation):
            return  # a concurrent insert took an id after our test: test again
        if not is_fault(exc):
            raise exc
        write = op is not None and op.write
        if not lost:
            raise self.unavailable(exc, "; nothing was written" if write else "") from exc
        if not last and (not write or (op is not None and op.idempotent)):
            return
        context = ""
        if write:
            context = (
                "; the connection was lost during the write, so it may or may not have been applied"
            )
        raise self.unavailable(exc, context) from exc

    # -- the operations ----------------------------------------------------------------

    def schema(self) -> Steps[None]:
        """Create the tables and their indexes if they are missing (in one transaction)."""
        yield Statement(self.q["lock"], (self.table,), "rowcount")
        yield Statement(self.q["schema0"], (), "rowcount")
        # A table of an earlier version gets the newer columns. ALTER TABLE locks the
        # whole table, so it runs only when a column is missing, never on every start.
        have = {row[0] for row in (yield Statement(self.q["columns"], (self.regclass,), "all"))}
        missing = [column for column in ADDED_COLUMNS if column not in have]
        for column in missing:
            yield Statement(self.q[f"add_{column}"], (), "rowcount")
        if "created_at" in missing:
            yield Statement(self.q["fill_created_at"], (), "rowcount")
            yield Statement(self.q["default_created_at"], (), "rowcount")
        for i in range(1, len(SCHEMA)):
            yield Statement(self.q[f"schema{i}"], (), "rowcount")
        # Indexes of earlier versions cost every write: drop them (only if present, since
        # DROP INDEX locks the table).
        schema = self._schema_name
        if schema is None:
            schema = (yield Statement(self.q["current_schema"], (), "one"))[0]
        found = yield Statement(self.q["indexes"], (schema, self.base), "all")
        for (name,) in found:
            if name in self._obsolete:
                yield Statement(self._drop[name], (), "rowcount")

    def create(
        self,
        id: str,
        workflow: str,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        history: Sequence[str],
        history_limit: int,
        cursors: Sequence[str],
        enqueue: TransactionHook | None = None,
    ) -> Op[Record]:
        check_history_limit(history_limit)
        wake = opt_utc(wake_at)
        entries, dropped = append_history([], 0, history, history_limit)
        params = (id, workflow, status, blob, wake, _text_array(cursors), _array(entries), dropped)

        def steps() -> Steps[Record]:
            if (yield Statement(self.q["insert"], params)) is None:
                raise WorkflowExists(id)
            if enqueue is not None:
                yield Enqueue(enqueue, (id,))
            self.floor.wrote(wake)
            return Record(id, workflow, status, bytes(blob), 1, wake)

        # With a hook: the insert and the enqueue in one transaction.
        return Op(steps, batch=enqueue is not None)

    def create_many(
        self, records: Sequence[NewRecord], history_limit: int
    ) -> Op[builtins.list[str]]:
        check_history_limit(history_limit)
        ids = [r.id for r in records]
        rows = []
        wakes = []
        for r in records:
            wake = opt_utc(r.wake_at)
            if wake is not None:
                wakes.append(wake)
            entries, dropped = append_history([], 0, r.history, history_limit)
            rows.append(
                (
                    r.id,
                    r.workflow,
                    r.status,
                    r.blob,
                    1,
                    wake,
                    list(r.cursors),
                    _array(entries),
                    dropped,
                )
            )

        attempts = 0

        def steps() -> Steps[builtins.list[str]]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # the COPY met a taken id (and rolled back): say which
                taken = yield Statement(self.q["taken"], (ids,), "all")
                if taken:
                    return [row[0] for row in taken]
            yield Copy(self.q["copy"], rows)
            if wakes:
                self.floor.wrote(min(wakes))
            return []

        # One transaction; a unique violation (an id taken) runs it again, testing first.
        return Op(steps, batch=True)

    def load(self, id: str) -> Op[Record]:
        def steps() -> Steps[Record]:
            row = yield Statement(self.q["load"], (id,), large=True)
            if row is None:
                raise WorkflowNotFound(id)
            return record(row)

        return Op(steps, write=False)

    def save(
        self,
        id: str,
        expected_version: int,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        history: Sequence[str],
        history_limit: int,
        cursors: Sequence[str],
        enqueue: TransactionHook | None = None,
    ) -> Op[Record]:
        check_history_limit(history_limit)
        wake = opt_utc(wake_at)
        update: Statement
        if history:
            params = {
                "status": status,
                "blob": blob,
                "wake": wake,
                "cursors": _text_array(cursors),
                "new": _array(list(history)),
                "count": len(history),
                "limit": history_limit,
                "id": id,
                "expected": expected_version,
            }
            update = Statement(self.q["save_history"], params)
        else:
            update = Statement(
                self.q["save"], (status, blob, wake, _text_array(cursors), id, expected_version)
            )

        def steps() -> Steps[Record]:
            row = yield update
            if row is None:
                current = yield Statement(self.q["version"], (id,))
                raise Conflict(id, expected_version, None if current is None else current[0])
            if enqueue is not None:
                yield Enqueue(enqueue, (id,))
            workflow, version = row
            self.floor.wrote(wake)
            return Record(id, workflow, status, bytes(blob), version, wake)

        # With a hook: the compare-and-swap and the enqueue in one transaction.
        return Op(steps, batch=enqueue is not None)

    def history(self, id: str) -> Op[HistoryLog]:
        def steps() -> Steps[HistoryLog]:
            row = yield Statement(self.q["history"], (id,), large=True)
            if row is None:
                raise WorkflowNotFound(id)
            return HistoryLog(list(row[0]), int(row[1]))

        return Op(steps, write=False)

    def purge(
        self, before: datetime, statuses: Sequence[str], limit: int
    ) -> Op[builtins.list[str]]:
        wanted = check_purge(statuses, limit)
        params = {"statuses": wanted, "before": to_utc(before), "limit": limit}
        # Other statuses than the ended ones are not in the purge index: a table scan.
        query = self.q["purge_ended" if set(wanted) <= set(TERMINAL) else "purge_records"]

        def steps() -> Steps[builtins.list[str]]:
            rows = yield Statement(query, params, "all")
            return [row[0] for row in rows]

        # Repeating it after an unknown outcome deletes only what still matches: safe.
        return Op(steps, idempotent=True)

    def delete(self, id: str) -> Op[None]:
        def steps() -> Steps[None]:
            if (yield Statement(self.q["delete"], (id,))) is None:
                raise WorkflowNotFound(id)

        return Op(steps)

    def list(
        self, workflow: str | None, status: str | None, limit: int, after: str | None
    ) -> Op[Page]:
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
        query = sql.Composed([sql.SQL(self.q["select"])])
        if where:
            query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
        query += sql.SQL(" ORDER BY id LIMIT %s")
        params.append(limit + 1)

        def steps() -> Steps[Page]:
            records = [record(row) for row in (yield Statement(query, tuple(params), "all"))]
            return Page(records[:limit], page_cursor([r.id for r in records], limit))

        return Op(steps, write=False)

    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> Op[builtins.list[Record]]:
        now = to_utc(now)
        until = now + lease

        params = {"now": now, "limit": limit, "until": until}

        def steps() -> Steps[builtins.list[Record]]:
            floor, token = self.floor.bound(now)
            if floor is None:
                rows = yield Statement(self.q["claim"], params, "all")
            else:
                rows = yield Statement(self.q["claim_from"], {**params, "floor": floor}, "all")
            self.floor.claimed(now, floor, len(rows) < limit, token)
            # UPDATE ... RETURNING has no order: restore "earliest first" from the old wake_at.
            rows.sort(key=lambda row: (row[5], row[0]))
            return [
                Record(id, workflow, status, bytes(blob), version, until)
                for id, workflow, status, blob, version, _ in rows
            ]

        return Op(steps)

    def remember(self, key: str, until: datetime) -> Op[bool]:
        token = uuid.uuid4().hex  # tells our own earlier, committed attempt from a rival's
        params = (key, token, to_utc(until))

        def steps() -> Steps[bool]:
            if (yield Statement(self.q["remember"], params)) is not None:
                return True
            row = yield Statement(self.q["token"], (key,))
            return row is not None and row[0] == token

        return Op(steps, idempotent=True)

    def purge_due(self) -> bool:
        """Whether ``remember`` should purge expired keys now (every :data:`PURGE_EVERY` s)."""
        if time.monotonic() < self._next_purge:
            return False
        self._next_purge = time.monotonic() + PURGE_EVERY
        return True

    def purge_expired(self, limit: int) -> Op[int]:
        def steps() -> Steps[int]:
            count: int = yield Statement(self.q["purge"], (limit,), "rowcount")
            return count

        return Op(steps, idempotent=True)
