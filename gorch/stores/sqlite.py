"""SQLite, the embedded default: one file, shared safely by the processes of one machine.

WAL mode lets readers run while one writer commits; every write that must
read first (compare-and-swap, claims) runs under ``BEGIN IMMEDIATE``, which
takes the database's write lock up front, so two writers never interleave and
never deadlock upgrading a read lock. Writers queue on ``busy_timeout``.
Instants are stored as integer microseconds since the epoch (UTC), so the
index on ``wake_at`` orders them exactly.
"""

from __future__ import annotations

import builtins
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from gorch.errors import Conflict, StoreUnavailable, WorkflowExists, WorkflowNotFound
from gorch.stores._common import (
    PerThread,
    check_limit,
    from_micros,
    opt_utc,
    page_cursor,
    to_micros,
    to_utc,
)
from gorch.stores.base import Page, Record, Store

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS gorch_workflows (
        id TEXT PRIMARY KEY,
        workflow TEXT NOT NULL,
        status TEXT NOT NULL,
        blob BLOB NOT NULL,
        version INTEGER NOT NULL,
        wake_at INTEGER,
        updated_at INTEGER NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS gorch_workflows_wake_at
        ON gorch_workflows (wake_at, id) WHERE wake_at IS NOT NULL""",
    "CREATE INDEX IF NOT EXISTS gorch_workflows_workflow ON gorch_workflows (workflow, id)",
    "CREATE INDEX IF NOT EXISTS gorch_workflows_status ON gorch_workflows (status, id)",
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


def _micros_or_none(when: datetime | None) -> int | None:
    return None if when is None else to_micros(when)


def _now_micros() -> int:
    return time.time_ns() // 1000


class SQLiteStore(Store):
    """A store in one SQLite file, created with its schema on first use.

    Each thread gets its own connection (sqlite3 connections must not be shared
    between threads); a child process after ``fork`` opens its own as well.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        """``timeout`` is how long, in seconds, a writer waits for another one to finish."""
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file::memory:"):
            raise ValueError(
                "an in-memory SQLite database is private to one connection; use MemoryStore"
            )
        self.url = f"sqlite:///{self.path}"
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
            conn.execute("PRAGMA journal_mode = WAL")
            if not self._schema_ready:
                with self._lock:
                    if not self._schema_ready:
                        self._create_schema(conn)
                        self._schema_ready = True
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise self._unavailable(exc) from exc
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailable:
        return StoreUnavailable(f"SQLite store {self.url} failed: {exc}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database's write lock from its first statement."""
        conn = self._conns.get()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._unavailable(exc) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:  # SQLite may already have rolled back (disk full, I/O)
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise self._unavailable(exc) from exc
            raise

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._conns.get().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise self._unavailable(exc) from exc

    # -- the protocol -----------------------------------------------------------------

    def create(
        self, id: str, workflow: str, status: str, blob: bytes, wake_at: datetime | None
    ) -> Record:
        wake = opt_utc(wake_at)
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO gorch_workflows (id, workflow, status, blob, version, wake_at,"
                " updated_at) VALUES (?, ?, ?, ?, 1, ?, ?) ON CONFLICT (id) DO NOTHING",
                (id, workflow, status, bytes(blob), _micros_or_none(wake), _now_micros()),
            )
            if cur.rowcount != 1:
                raise WorkflowExists(id)
        return Record(id, workflow, status, bytes(blob), 1, wake)

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
    ) -> Record:
        wake = opt_utc(wake_at)
        with self._write() as conn:
            row = conn.execute(
                "SELECT workflow, version FROM gorch_workflows WHERE id = ?", (id,)
            ).fetchone()
            if row is None or row[1] != expected_version:
                raise Conflict(id, expected_version, None if row is None else row[1])
            conn.execute(
                "UPDATE gorch_workflows SET status = ?, blob = ?, version = ?, wake_at = ?,"
                " updated_at = ? WHERE id = ?",
                (
                    status,
                    bytes(blob),
                    expected_version + 1,
                    _micros_or_none(wake),
                    _now_micros(),
                    id,
                ),
            )
        return Record(id, row[0], status, bytes(blob), expected_version + 1, wake)

    def delete(self, id: str) -> None:
        with self._write() as conn:
            cur = conn.execute("DELETE FROM gorch_workflows WHERE id = ?", (id,))
            if cur.rowcount != 1:
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

    def close(self) -> None:
        """Close the connections this process opened, in every thread."""
        self._conns.close_all()
