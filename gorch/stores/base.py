"""The store protocol: what every backend implements, and nothing more.

A store keeps one record per workflow instance: the msgpack blob written by
``gorch.dumps``, a version for compare-and-swap, the workflow name and status
for listing, and the next wake-up time (a timer, a retry backoff, a deferred
resume) for ``Engine.run_due``. The Engine owns all workflow logic; a store
only stores bytes safely.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gorch.errors import WorkflowExists

DEFAULT_HISTORY_LIMIT = 200
"""How many history entries a record keeps unless the caller says otherwise."""


@dataclass(frozen=True, slots=True)
class Record:
    """One stored workflow instance."""

    id: str
    workflow: str
    status: str
    blob: bytes
    version: int
    """Starts at 1 on create; every successful save or claim adds 1."""
    wake_at: datetime | None
    """UTC, timezone-aware; None when nothing is scheduled."""

    def __init__(
        self,
        id: str,
        workflow: str,
        status: str,
        blob: bytes,
        version: int,
        wake_at: datetime | None,
    ) -> None:
        # The frozen dataclass's own __init__, with each slot set through its descriptor
        # instead of object.__setattr__ (a record is made at every load and save).
        _set_id(self, id)
        _set_workflow(self, workflow)
        _set_status(self, status)
        _set_blob(self, blob)
        _set_version(self, version)
        _set_wake_at(self, wake_at)


# (The slots' member descriptors, as Record's __init__ uses them.)
_set_id, _set_workflow, _set_status, _set_blob, _set_version, _set_wake_at = (
    vars(Record)[name].__set__
    for name in ("id", "workflow", "status", "blob", "version", "wake_at")
)


@dataclass(frozen=True, slots=True)
class NewRecord:
    """One record for :meth:`Store.create_many`: what :meth:`Store.create` takes, as a value."""

    id: str
    workflow: str
    status: str
    blob: bytes
    wake_at: datetime | None
    history: Sequence[str] = ()
    cursors: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Page:
    """A page of records in id order; pass ``next_cursor`` as ``after`` for the next."""

    records: builtins.list[Record]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class HistoryLog:
    """A record's history as stored: JSON texts, oldest first, and how many were dropped."""

    entries: builtins.list[str] = field(default_factory=builtins.list)
    """Each entry one JSON object, as the Engine wrote it."""
    dropped: int = 0
    """Entries removed to keep the log under its cap (the oldest go first)."""


class UnsupportedByStore(NotImplementedError):
    """A store (a custom one) that does not implement history or purging: a setup
    mistake to fix in code, not a runtime condition, hence no ``GorchError``."""

    def __init__(self, store: object, what: str, instead: str = "") -> None:
        super().__init__(
            f"{type(store).__name__} does not implement {what}: "
            + (
                instead
                or "use one of gorch's stores (memory, SQLite, PostgreSQL, Redis) or implement it"
            )
        )


_USING_INSTEAD = (
    "only the SQLite and PostgreSQL stores write with a connection of the caller's"
    " (SQLiteStore: a sqlite3.Connection to the same file; PostgresStore: a"
    " psycopg.Connection; AsyncPostgresStore: a psycopg.AsyncConnection)"
)


class Store(abc.ABC):
    """A key-value store of workflow records with compare-and-swap and a wake-up index.

    Every method is safe to call from several threads and processes at once
    (for Postgres and Redis: from several machines). Datetimes passed in are
    timezone-aware; naive ones are taken as UTC.
    """

    url: str = ""
    """The URL the store was opened from, without any password."""

    @abc.abstractmethod
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
        """Insert a new record at version 1; ``WorkflowExists`` if the id is taken.

        ``history``: JSON texts that start the record's history log, in the same
        write (at most ``history_limit`` are kept). ``cursors``: the statement
        names the instance's threads stand on, kept as a plain column where the
        backend has columns, so SQL can filter on them.
        """

    def create_many(
        self, records: Sequence[NewRecord], *, history_limit: int = DEFAULT_HISTORY_LIMIT
    ) -> builtins.list[str]:
        """Insert every record at version 1 in one atomic write; the ids already taken.

        All or nothing: when some ids are taken, nothing is written and those
        ids are returned (an empty list: every record was inserted). The ids
        must be distinct. gorch's stores write a batch at once (PostgreSQL:
        ``COPY`` in one transaction; SQLite: one transaction; Redis: one
        script). This default, for other stores, calls :meth:`create` for
        each record and is not atomic: a taken id leaves the records before it
        created.
        """
        taken: builtins.list[str] = []
        for r in records:
            try:
                self.create(
                    r.id,
                    r.workflow,
                    r.status,
                    r.blob,
                    r.wake_at,
                    history=r.history,
                    history_limit=history_limit,
                    cursors=r.cursors,
                )
            except WorkflowExists:
                taken.append(r.id)
        return taken

    @abc.abstractmethod
    def load(self, id: str) -> Record:
        """The current record; ``WorkflowNotFound`` if there is none."""

    @abc.abstractmethod
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
        """Replace the record if it is still at ``expected_version``; return it at version + 1.

        ``Conflict`` when the version differs (or the record was deleted):
        nothing is written. ``history`` is appended to the record's log in the
        same atomic write; the oldest entries beyond ``history_limit`` are
        dropped (and counted). ``cursors`` replaces the record's cursor names.
        """

    @abc.abstractmethod
    def delete(self, id: str) -> None:
        """Remove the record; ``WorkflowNotFound`` if there is none."""

    @abc.abstractmethod
    def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        """Records matching the filters, in id order, ids greater than ``after``."""

    @abc.abstractmethod
    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        """Atomically claim up to ``limit`` records with ``wake_at <= now``, earliest first.

        Claiming moves each record's ``wake_at`` to ``now + lease`` and bumps
        its version, so no other caller can claim it until the lease runs out
        (a crashed worker's claim expires by itself); the claimer saves with the
        returned version. Uses the wake-up index: the cost does not grow with
        records that are not due.
        """

    @abc.abstractmethod
    def remember(self, key: str, until: datetime) -> bool:
        """Record ``key`` until ``until``; False if it is already recorded and not expired.

        Atomic across processes (and machines, for server stores): of concurrent
        callers with one key, exactly one gets True. Expired keys count as absent
        and are purged by later calls. The HTTP app uses it to refuse a replayed
        signature in every process that shares the store.
        """

    def history(self, id: str) -> HistoryLog:
        """The record's history log; ``WorkflowNotFound`` if there is no record."""
        raise UnsupportedByStore(self, "history")

    def purge(self, before: datetime, statuses: Sequence[str], limit: int) -> builtins.list[str]:
        """Delete up to ``limit`` records in one of ``statuses`` not updated since ``before``;
        their ids.

        Each record is deleted only if it still matches when it is deleted (the
        status and update-time test is part of the delete itself), so a record
        that a concurrent save moved to another status, or just touched, stays.
        One call is one short write (one transaction, one script): callers loop
        in batches instead of locking the table.
        """
        raise UnsupportedByStore(self, "purge")

    def using(self, conn: Any) -> Store:
        """This store with its calls run on ``conn``, a database connection of the caller's,
        so a write joins the transaction open on it (``Engine.start(..., conn=...)``).

        Only stores over a database the application also writes to have it
        (SQLite, PostgreSQL); the others raise :class:`UnsupportedByStore`.
        """
        raise UnsupportedByStore(self, "writing on a connection of the caller's", _USING_INSTEAD)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStore(abc.ABC):
    """:class:`Store` for asyncio: the same contract, every method a coroutine.

    An async web app or worker awaits the store instead of blocking its event
    loop. Semantics (versions, errors, atomicity, the wake-up index, expiry of
    remembered keys) are exactly those of :class:`Store`; one contract suite
    checks both.
    """

    url: str = ""
    """The URL the store was opened from, without any password."""

    @abc.abstractmethod
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
    ) -> Record:
        """:meth:`Store.create`."""

    async def create_many(
        self, records: Sequence[NewRecord], *, history_limit: int = DEFAULT_HISTORY_LIMIT
    ) -> builtins.list[str]:
        """:meth:`Store.create_many` (this default is not atomic, as there)."""
        taken: builtins.list[str] = []
        for r in records:
            try:
                await self.create(
                    r.id,
                    r.workflow,
                    r.status,
                    r.blob,
                    r.wake_at,
                    history=r.history,
                    history_limit=history_limit,
                    cursors=r.cursors,
                )
            except WorkflowExists:
                taken.append(r.id)
        return taken

    @abc.abstractmethod
    async def load(self, id: str) -> Record:
        """:meth:`Store.load`."""

    @abc.abstractmethod
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
    ) -> Record:
        """:meth:`Store.save`."""

    @abc.abstractmethod
    async def delete(self, id: str) -> None:
        """:meth:`Store.delete`."""

    @abc.abstractmethod
    async def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        """:meth:`Store.list`."""

    @abc.abstractmethod
    async def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        """:meth:`Store.claim_due`."""

    @abc.abstractmethod
    async def remember(self, key: str, until: datetime) -> bool:
        """:meth:`Store.remember`."""

    async def history(self, id: str) -> HistoryLog:
        """:meth:`Store.history`."""
        raise UnsupportedByStore(self, "history")

    async def purge(
        self, before: datetime, statuses: Sequence[str], limit: int
    ) -> builtins.list[str]:
        """:meth:`Store.purge`."""
        raise UnsupportedByStore(self, "purge")

    async def using(self, conn: Any) -> AsyncStore:
        """:meth:`Store.using` (awaited: a store may create its table first)."""
        raise UnsupportedByStore(self, "writing on a connection of the caller's", _USING_INSTEAD)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
