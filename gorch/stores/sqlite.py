"""SQLite, the embedded default: one file, shared safely by the processes of one machine.

WAL mode lets readers run while one writer commits. Most writes are one
statement, committed on its own: compare-and-swap is ``UPDATE ... WHERE id = ?
AND version = ?`` (no read first), a create an ``INSERT``; SQLite takes the
write lock for the statement, waiting up to ``busy_timeout`` for another
writer. Writes of several statements (claims, ``remember``, a batch of
``create_many``) run under ``BEGIN IMMEDIATE``, which takes the write lock up
front, so two writers never interleave and never deadlock upgrading a read
lock. Instants are stored as integer microseconds since the epoch (UTC), so
the index on ``wake_at`` orders them exactly.

Durability is the ``synchronous`` setting (``sqlite:///app.db?synchronous=normal``):
``full`` by default, so a committed write survives a power cut.
"""

from __future__ import annotations

import builtins
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from gorch import clock
from gorch.errors import Conflict, StoreUnavailable, WorkflowExists, WorkflowNotFound
from gorch.stores._common import (
    PerThread,
    append_history,
    check_history_limit,
    check_limit,
    check_purge,
    from_micros,
    opt_utc,
    page_cursor,
    to_micros,
    to_utc,
)
from gorch.stores._options import DEFAULT_SYNCHRONOUS, synchronous_level
from gorch.stores.base import DEFAULT_HISTORY_LIMIT, HistoryLog, NewRecord, Page, Record, Store

TERMINAL = ("finished", "cancelled", "failed")
"""Statuses an instance ends in: the only rows the purge index holds."""
TERMINAL_SQL = "(status = 'finished' OR status = 'cancelled' OR status = 'failed')"
"""The purge index's predicate, spelled as comparisons: SQLite evaluates it on every write
that sets ``status``, and codes ``IN`` of three or more values as a temporary table built
each time (a third of a save's work), but an ``OR`` of comparisons in place."""

_SCHEMA = {  # every table and index, by name
    "gorch_workflows": """CREATE TABLE IF NOT EXISTS gorch_workflows (
        id TEXT PRIMARY KEY,
        workflow TEXT NOT NULL,
        status TEXT NOT NULL,
        blob BLOB NOT NULL,
        version INTEGER NOT NULL,
        wake_at INTEGER,
        updated_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000
            AS INTEGER)),
        cursors TEXT NOT NULL DEFAULT '[]',
        history TEXT NOT NULL DEFAULT '[]',
        history_dropped INTEGER NOT NULL DEFAULT 0,
        history_count INTEGER NOT NULL DEFAULT 0
    )""",
    # Each index is written by every insert, and by every update that changes its columns,
    # so there are only two beside the primary key (the schema docs say the same):
    # * the wake-up index: run_due's claims read only the due records; partial, so
    #   finished instances (wake_at NULL) are not in it;
    # * the purge index: retention deletes old ended instances, oldest first; partial, so
    #   an instance is written to it once, by the save that ends it (not by every save,
    #   as updated_at changes each time). Its predicate is TERMINAL_SQL (see there why
    #   it is not an IN list).
    # list(workflow=..., status=...) walks the primary key in id order: a page costs up
    # to a scan of the table when matches are rare (an admin's query, not a hot path).
    "gorch_workflows_wake_at": """CREATE INDEX IF NOT EXISTS gorch_workflows_wake_at
        ON gorch_workflows (wake_at, id) WHERE wake_at IS NOT NULL""",
    "gorch_workflows_ended": "CREATE INDEX IF NOT EXISTS gorch_workflows_ended"
    " ON gorch_workflows (status, updated_at) WHERE " + TERMINAL_SQL,
    "gorch_seen": """CREATE TABLE IF NOT EXISTS gorch_seen (
        key TEXT PRIMARY KEY,
        until INTEGER NOT NULL
    )""",
    "gorch_seen_until": "CREATE INDEX IF NOT EXISTS gorch_seen_until ON gorch_seen (until)",
}
_OBSOLETE_INDEXES = ("gorch_workflows_workflow", "gorch_workflows_status", "gorch_workflows_purge")
"""Indexes of earlier versions, dropped when a store opens the file: they cost every write."""
_REBUILT_INDEXES = {"gorch_workflows_ended": TERMINAL_SQL}
"""Indexes whose definition changed, by the text the current one holds: an index of an
earlier version without it (the ended index's ``status IN (...)``) is built again."""
_ADDED_COLUMNS = {  # columns of later versions, added to a table created before them
    "created_at": "INTEGER NOT NULL DEFAULT 0",
    "cursors": "TEXT NOT NULL DEFAULT '[]'",
    "history": "TEXT NOT NULL DEFAULT '[]'",
    "history_dropped": "INTEGER NOT NULL DEFAULT 0",
    # The entries in ``history``: a save tells from it whether to trim, without parsing
    # the log (filled in from the log when added; see _SAVE_HISTORY for a lagging one).
    "history_count": "INTEGER NOT NULL DEFAULT 0",
}
_PURGE_BATCH = 100  # expired keys removed per remember(): bounded work, and enough to keep up
_ID_CHUNK = 500  # ids per IN (...) test: well under SQLite's limit of bound parameters
# A batch inserts with no conflict clause: a taken id fails (and rolls back) the batch.
_INSERT_ALL = (
    "INSERT INTO gorch_workflows (id, workflow, status, blob, version, wake_at, updated_at,"
    " created_at, cursors, history, history_dropped, history_count)"
    " VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT = (
    "INSERT INTO gorch_workflows (id, workflow, status, blob, version, wake_at, updated_at,"
    " created_at, cursors, history, history_dropped, history_count)"
    " VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO NOTHING"
)
_SAVE = (
    "UPDATE gorch_workflows SET status = :status, blob = :blob, version = version + 1,"
    " wake_at = :wake, updated_at = :now, cursors = :cursors"
    " WHERE id = :id AND version = :expected RETURNING workflow, version"
)
# The history log grows by :new (a JSON array text of :n entries) in the same statement,
# by joining the two array texts. Whether entries must go is read from history_count,
# so a save below the cap never parses the log. Past :limit entries the oldest are cut
# off (json_each gives the entries in order, key = position) and counted in
# history_dropped; that branch counts the log itself, so a count left behind by a
# writer that did not keep it (an older version, during an upgrade) is exact again at
# the next trim. (SET expressions all read the row as it was before the UPDATE.)
_JOINED = (
    "CASE WHEN history = '[]' THEN :new"
    " ELSE substr(history, 1, length(history) - 1) || ',' || substr(:new, 2) END"
)
_FITS = "history_count + :n <= :limit"
_SAVE_HISTORY = (
    "UPDATE gorch_workflows SET status = :status, blob = :blob, version = version + 1,"
    " wake_at = :wake, updated_at = :now, cursors = :cursors,"
    f" history = CASE WHEN {_FITS} THEN {_JOINED}"
    f" ELSE (SELECT json_group_array(json(value)) FROM json_each({_JOINED})"
    " WHERE key >= json_array_length(history) + :n - :limit) END,"
    f" history_dropped = history_dropped + CASE WHEN {_FITS} THEN 0"
    " ELSE max(0, json_array_length(history) + :n - :limit) END,"
    f" history_count = CASE WHEN {_FITS} THEN history_count + :n"
    " ELSE min(json_array_length(history) + :n, :limit) END"
    " WHERE id = :id AND version = :expected RETURNING workflow, version"
)
_COLUMNS = "id, workflow, status, blob, version, wake_at"


def _record(row: tuple[Any, ...]) -> Record:
    id, workflow, status, blob, version, wake_at = row
    return Record(
        id,
        workflow,
        status,
        bytes(blob),
        version,
        None if wake_at is None else from_micros(wake_at),
    )


def _json_array(entries: builtins.list[str]) -> str:
    """Entries (each a JSON text) as one JSON array text."""
    return "[" + ",".join(entries) + "]"


def _history_columns(history: Sequence[str], limit: int) -> tuple[str, int, int]:
    """A new record's history log, dropped count and entry count, as columns."""
    if len(history) <= limit:
        return _json_array(list(history)), 0, len(history)
    entries, dropped = append_history([], 0, history, limit)
    return _json_array(entries), dropped, len(entries)


@functools.lru_cache(maxsize=1024)
def _cursors_text(cursors: tuple[str, ...]) -> str:
    """The ``cursors`` column of a record standing on these statements: a workflow's
    records stand on a few sets of statements, so each is encoded once, not per save."""
    return json.dumps(list(cursors))


def _micros_or_none(when: datetime | None) -> int | None:
    return None if when is None else to_micros(when)


def _now_micros() -> int:
    return time.time_ns() // 1000


class SQLiteStore(Store):
    """A store in one SQLite file, created with its schema on first use.

    Each thread gets its own connection (sqlite3 connections must not be shared
    between threads); a child process after ``fork`` opens its own as well.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 30.0,
        synchronous: str = DEFAULT_SYNCHRONOUS,
    ) -> None:
        """``timeout`` is how long, in seconds, a writer waits for another one to finish.

        ``synchronous`` is SQLite's ``PRAGMA synchronous`` for this store's
        connections: ``full`` (the default) syncs the WAL to disk at every
        commit, so a committed write survives a power cut; ``normal`` syncs
        only at checkpoints: still no corruption, but the last commits before
        a power cut (not a process crash) may be lost; ``off`` leaves syncing
        to the OS; ``extra`` is ``full`` plus a sync of the directory.
        """
        self.synchronous = synchronous_level(synchronous)
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file::memory:"):
            raise ValueError(
                "an in-memory SQLite database is private to one connection; use MemoryStore"
            )
        self.url = f"sqlite:///{self.path}"
        if self.synchronous != "FULL":
            self.url += f"?synchronous={self.synchronous.lower()}"
        self.timeout = timeout
        self._conns = PerThread(self._open)
        self._lock = threading.Lock()
        self._schema_ready = False

    def _open(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.timeout,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,  # so close() can close every thread's connection
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")  # per connection
            if not self._schema_ready:
                with self._lock:
                    if not self._schema_ready:
                        self._enable_wal(conn)
                        self._create_schema(conn)
                        self._schema_ready = True
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            if not _is_fault(exc):
                raise
            raise self._unavailable(exc) from exc
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL (persistent: once per process is enough).

        Changing the journal mode does not wait on the busy handler, so while
        another process opens the same new file it may answer "locked" at
        once: retry until the busy timeout has passed.
        """
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        """Create what is missing; skipped without the write lock when everything exists,
        so readers can open the store while another process holds a long write."""
        names = (*_SCHEMA, *_OBSOLETE_INDEXES)
        marks = ", ".join("?" * len(names))
        found = {
            row[0]
            for row in conn.execute(
                f"SELECT name FROM sqlite_master WHERE name IN ({marks})", names
            )
        }
        if (
            found == set(_SCHEMA)
            and not self._stale_indexes(conn)
            and not self._missing_columns(conn)
        ):
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_SCHEMA["gorch_workflows"])
            for column in self._missing_columns(conn):  # an older table: migrate it
                conn.execute(
                    f"ALTER TABLE gorch_workflows ADD COLUMN {column} {_ADDED_COLUMNS[column]}"
                )
                if column == "created_at":  # the best guess for records made before
                    conn.execute("UPDATE gorch_workflows SET created_at = updated_at")
                if column == "history_count":
                    conn.execute(
                        "UPDATE gorch_workflows SET history_count = json_array_length(history)"
                    )
            for index in self._stale_indexes(conn):  # built again below, as defined now
                conn.execute(f"DROP INDEX IF EXISTS {index}")
            for statement in _SCHEMA.values():
                conn.execute(statement)
            for index in _OBSOLETE_INDEXES:
                conn.execute(f"DROP INDEX IF EXISTS {index}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @staticmethod
    def _stale_indexes(conn: sqlite3.Connection) -> builtins.list[str]:
        """The indexes of :data:`_REBUILT_INDEXES` defined as an earlier version did."""
        marks = ", ".join("?" * len(_REBUILT_INDEXES))
        return [
            name
            for name, sql in conn.execute(
                f"SELECT name, sql FROM sqlite_master WHERE name IN ({marks})",
                tuple(_REBUILT_INDEXES),
            )
            if _REBUILT_INDEXES[name] not in sql
        ]

    @staticmethod
    def _missing_columns(conn: sqlite3.Connection) -> builtins.list[str]:
        """The columns of :data:`_ADDED_COLUMNS` the table lacks (none if it does not exist)."""
        have = {row[1] for row in conn.execute("PRAGMA table_info(gorch_workflows)")}
        return [c for c in _ADDED_COLUMNS if have and c not in have]

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailable:
        """``StoreUnavailable`` saying what went wrong and what to do about it."""
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith("SQLITE_BUSY") or "database is locked" in str(exc):
            reason = (
                f"the database is locked: another connection held its write lock longer than"
                f" the busy timeout ({self.timeout:g} s); nothing was written, try again later"
                " (or open the store with a longer timeout)"
            )
        elif name in ("SQLITE_FULL", "SQLITE_IOERR_WRITE"):
            # SQLite says FULL for ENOSPC but IOERR_WRITE for EFBIG (a file-size limit,
            # ``ulimit -f``): either way the transaction was rolled back.
            reason = (
                f"a write to the database file failed ({name}: {exc}): the disk is full or"
                " the process hit its file-size limit (ulimit -f); nothing was written,"
                " free some space (or raise the limit) and try again"
            )
        elif name.startswith("SQLITE_IOERR"):
            reason = (
                f"disk I/O error ({name}): check the disk and the file system; the last"
                " write may or may not have been applied"
            )
        else:
            reason = str(exc)
        return StoreUnavailable(f"SQLite store {self.url} is unavailable: {reason}")

    def _conn(self) -> sqlite3.Connection:
        """The connection this thread's calls run on."""
        return self._conns.get()

    def using(self, conn: Any) -> SQLiteStore:
        """This store with its calls run on ``conn``, the caller's ``sqlite3.Connection`` to
        the same file, so a write joins the caller's transaction.

        A single-statement write (``create``, ``save``) runs as any statement of
        the caller's would: in Python's default transaction handling it opens
        the caller's transaction (or joins the one open) and commits when the
        caller commits. A write of several statements runs in a savepoint of
        that transaction. ``conn`` stays the caller's: nothing here commits or
        closes it.
        """
        if not isinstance(conn, sqlite3.Connection):
            raise TypeError(
                f"{type(self).__name__}.using() takes a sqlite3.Connection, got"
                f" {type(conn).__name__}"
            )
        try:
            files = {row[1]: row[2] for row in conn.execute("PRAGMA database_list")}
            theirs = files.get("main") or ""
            if not theirs or os.path.realpath(theirs) != os.path.realpath(self.path):
                raise ValueError(
                    f"the connection given to {type(self).__name__}.using() is to"
                    f" {theirs or 'a private in-memory database'!r}, not to the store's file"
                    f" {self.path!r}"
                )
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'gorch_workflows'"
            ).fetchall()
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        if not found and conn.in_transaction:
            # Creating it needs the write lock, which the caller's transaction may hold.
            raise ValueError(
                f"the store's table does not exist yet in {self.path!r}: open the store once"
                " (any call, or `gorch migrate`) before writing in a transaction of your own"
            )
        self._conns.get()  # the schema, created on a connection of the store's if missing
        return _OnConnection(self, conn)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database's write lock from its first statement.

        SQLite rolls back whatever fails, so a failed write never leaves half a record:
        ``StoreUnavailable`` from here means nothing was written.
        """
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if not _is_fault(exc):
                raise
            raise self._unavailable(exc) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            self._rollback(conn)
            if isinstance(exc, sqlite3.Error) and _is_fault(exc):
                raise self._unavailable(exc) from exc
            raise

    def _rollback(self, conn: sqlite3.Connection) -> None:
        """Undo an open transaction; a connection that cannot even roll back is dropped."""
        try:
            if conn.in_transaction:  # SQLite may already have rolled back (disk full, I/O)
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._conns.discard()  # closing it rolls back whatever is left

    def _write1(self, sql: str, params: tuple[Any, ...] | dict[str, Any]) -> sqlite3.Cursor:
        """One write statement, committed by itself (autocommit): SQLite takes the write
        lock for it (waiting up to the busy timeout, as ``BEGIN IMMEDIATE`` would) and
        rolls it back whole if it fails. Read a ``RETURNING`` cursor to the end: the
        statement commits when it is done."""
        try:
            return self._conn().execute(sql, params)
        except sqlite3.Error as exc:
            if not _is_fault(exc):
                raise
            raise self._unavailable(exc) from exc

    def _read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            if not _is_fault(exc):
                raise
            raise self._unavailable(exc) from exc

    # -- the protocol -----------------------------------------------------------------

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
    ) -> Record:
        check_history_limit(history_limit)
        wake = opt_utc(wake_at)
        log, dropped, count = _history_columns(history, history_limit)
        stamp = _now_micros()
        cur = self._write1(
            _INSERT,
            (
                id,
                workflow,
                status,
                bytes(blob),
                _micros_or_none(wake),
                stamp,
                stamp,
                _cursors_text(tuple(cursors)),
                log,
                dropped,
                count,
            ),
        )
        if cur.rowcount != 1:
            raise WorkflowExists(id)
        return Record(id, workflow, status, bytes(blob), 1, wake)

    def create_many(
        self, records: Sequence[NewRecord], *, history_limit: int = DEFAULT_HISTORY_LIMIT
    ) -> builtins.list[str]:
        check_history_limit(history_limit)
        stamp = _now_micros()
        rows = []
        for r in records:
            rows.append(
                (
                    r.id,
                    r.workflow,
                    r.status,
                    bytes(r.blob),
                    _micros_or_none(opt_utc(r.wake_at)),
                    stamp,
                    stamp,
                    _cursors_text(tuple(r.cursors)),
                    *_history_columns(r.history, history_limit),
                )
            )
        try:
            with self._write() as conn:  # one transaction: all or nothing
                conn.executemany(_INSERT_ALL, rows)
            return []
        except sqlite3.IntegrityError as exc:  # an id is taken: rolled back; say which
            refused = exc
        ids = [r.id for r in records]
        taken: builtins.list[str] = []
        for i in range(0, len(ids), _ID_CHUNK):
            chunk = ids[i : i + _ID_CHUNK]
            marks = ", ".join("?" * len(chunk))
            found = self._read(f"SELECT id FROM gorch_workflows WHERE id IN ({marks})", chunk)
            taken.extend(row[0] for row in found)
        if not taken:  # not a taken id after all (or its holder is gone again): as it is
            raise refused
        return taken

    def load(self, id: str) -> Record:
        rows = self._read(f"SELECT {_COLUMNS} FROM gorch_workflows WHERE id = ?", (id,))
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
        *,
        history: Sequence[str] = (),
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        cursors: Sequence[str] = (),
    ) -> Record:
        check_history_limit(history_limit)
        wake = opt_utc(wake_at)
        params: dict[str, Any] = {
            "status": status,
            "blob": bytes(blob),
            "wake": _micros_or_none(wake),
            "now": _now_micros(),
            "cursors": _cursors_text(tuple(cursors)),
            "id": id,
            "expected": expected_version,
        }
        if history:  # the log is rewritten only when it grows
            params.update(new=_json_array(list(history)), n=len(history), limit=history_limit)
        # One conditional UPDATE: the version test and the write are one statement.
        rows = self._write1(_SAVE_HISTORY if history else _SAVE, params).fetchall()
        if not rows:
            found = self._read("SELECT version FROM gorch_workflows WHERE id = ?", (id,))
            raise Conflict(id, expected_version, found[0][0] if found else None)
        workflow, version = rows[0]
        return Record(id, workflow, status, bytes(blob), version, wake)

    def delete(self, id: str) -> None:
        if self._write1("DELETE FROM gorch_workflows WHERE id = ?", (id,)).rowcount != 1:
            raise WorkflowNotFound(id)

    def history(self, id: str) -> HistoryLog:
        rows = self._read(
            "SELECT history, history_dropped FROM gorch_workflows WHERE id = ?", (id,)
        )
        if not rows:
            raise WorkflowNotFound(id)
        return HistoryLog([json.dumps(e) for e in json.loads(rows[0][0])], rows[0][1])

    def purge(self, before: datetime, statuses: Sequence[str], limit: int) -> builtins.list[str]:
        wanted = check_purge(statuses, limit)
        marks = ", ".join("?" * len(wanted))
        before_us = to_micros(before)
        # Spelled as the purge index's predicate, so SQLite uses it (ended statuses only;
        # others are not in it: a table scan).
        ended = f" AND {TERMINAL_SQL}" if set(wanted) <= set(TERMINAL) else ""
        # One statement: the test and the delete run under one write lock.
        rows = self._write1(
            f"DELETE FROM gorch_workflows WHERE id IN (SELECT id FROM gorch_workflows"
            f" WHERE status IN ({marks}) AND updated_at < ?{ended} ORDER BY updated_at"
            f" LIMIT ?) AND status IN ({marks}) AND updated_at < ? RETURNING id",
            (*wanted, before_us, limit, *wanted, before_us),
        ).fetchall()
        return [row[0] for row in rows]

    def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        check_limit(limit)
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        for condition, value in (
            ("workflow = ?", workflow),
            ("status = ?", status),
            ("id > ?", after),
        ):
            if value is not None:
                where.append(condition)
                params.append(value)
        sql = f"SELECT {_COLUMNS} FROM gorch_workflows"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._read(sql + " ORDER BY id LIMIT ?", (*params, limit + 1))
        records = [_record(row) for row in rows]
        return Page(records[:limit], page_cursor([r.id for r in records], limit))

    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        if limit < 1:
            return []
        now = to_utc(now)
        until = now + lease
        until_us = to_micros(until)
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM gorch_workflows"
                " WHERE wake_at IS NOT NULL AND wake_at <= ? ORDER BY wake_at, id LIMIT ?",
                (to_micros(now), limit),
            ).fetchall()
            stamp = _now_micros()
            conn.executemany(
                "UPDATE gorch_workflows SET version = version + 1, wake_at = ?, updated_at = ?"
                " WHERE id = ?",
                [(until_us, stamp, row[0]) for row in rows],
            )
        return [
            Record(id, workflow, status, bytes(blob), version + 1, until)
            for id, workflow, status, blob, version, _ in rows
        ]

    def remember(self, key: str, until: datetime) -> bool:
        now_us = to_micros(clock.now())
        with self._write() as conn:
            conn.execute(  # purge a bounded batch of expired keys, oldest first
                "DELETE FROM gorch_seen WHERE key IN"
                " (SELECT key FROM gorch_seen WHERE until <= ? ORDER BY until LIMIT ?)",
                (now_us, _PURGE_BATCH),
            )
            cur = conn.execute(
                "INSERT INTO gorch_seen (key, until) VALUES (?, ?) ON CONFLICT (key)"
                " DO UPDATE SET until = excluded.until WHERE gorch_seen.until <= ?",
                (key, to_micros(until), now_us),
            )
            return cur.rowcount == 1

    def close(self) -> None:
        """Close the connections this process opened, in every thread."""
        self._conns.close_all()


class _OnConnection(SQLiteStore):
    """A :class:`SQLiteStore` whose calls run on one connection of the caller's."""

    def __init__(self, store: SQLiteStore, conn: sqlite3.Connection) -> None:
        self.__dict__.update(store.__dict__)
        self._caller = conn

    def _conn(self) -> sqlite3.Connection:
        return self._caller

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A savepoint in the caller's transaction (opened first, as Python would before a
        write, unless the connection is in autocommit mode)."""
        conn = self._caller
        try:
            if not conn.in_transaction and conn.isolation_level is not None:
                conn.execute("BEGIN")
            conn.execute("SAVEPOINT gorch_write")
        except sqlite3.Error as exc:
            if not _is_fault(exc):
                raise
            raise self._unavailable(exc) from exc
        try:
            yield conn
            conn.execute("RELEASE gorch_write")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK TO gorch_write")
                conn.execute("RELEASE gorch_write")
            if isinstance(exc, sqlite3.Error) and _is_fault(exc):
                raise self._unavailable(exc) from exc
            raise

    def using(self, conn: Any) -> SQLiteStore:
        raise TypeError("this store already runs on a connection of the caller's")

    def close(self) -> None:
        """Nothing to release: the connection is the caller's."""


def _is_fault(exc: sqlite3.Error) -> bool:
    """Whether a driver error means the database cannot be used now (locked, full, I/O,
    unopenable, "file is not a database") rather than misuse (a bug), left as it is."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError
