"""SQLite for asyncio: the sync :class:`SQLiteStore` run on a small private thread pool.

Why not ``aiosqlite``: it also runs sqlite3 on a thread (one per connection),
so it would not make SQLite any less blocking, and it would mean a second copy
of the schema, the WAL switch, the write transactions and the mapping of
"locked" / "disk full" to ``StoreUnavailable``. Running the sync store itself
keeps one implementation: the same file format, the same errors, and a file
that sync and async stores (and other processes) can open at once.

Why a private pool rather than ``asyncio.to_thread``: the sync store keeps one
connection per thread, so the default executor would leave a connection open
in each of its many threads, and an application's slow work there would queue
store calls. Here ``threads`` bounds both; SQLite commits one writer at a time
anyway, while WAL lets readers on other threads go on meanwhile.

Cancelling a call cannot stop its thread: a cancelled ``save`` may still
commit, just as a write whose connection drops may. Callers settle it the same
way, by reading the record back.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from gorch.stores._options import DEFAULT_SYNCHRONOUS
from gorch.stores.base import (
    DEFAULT_HISTORY_LIMIT,
    AsyncStore,
    HistoryLog,
    NewRecord,
    Page,
    Record,
)
from gorch.stores.sqlite import SQLiteStore

_P = ParamSpec("_P")
_T = TypeVar("_T")

DEFAULT_THREADS = 4


class AsyncSQLiteStore(AsyncStore):
    """An :class:`AsyncStore` in one SQLite file, the same file :class:`SQLiteStore` uses."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 30.0,
        synchronous: str = DEFAULT_SYNCHRONOUS,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        """``timeout``: how long a writer waits for another one (seconds); ``synchronous``:
        SQLite's durability setting (see :class:`SQLiteStore`); ``threads``: how many store
        calls run at once (each thread holds one connection)."""
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.store = SQLiteStore(path, timeout=timeout, synchronous=synchronous)
        """The sync store the calls run on."""
        self.url = self.store.url
        self.path = self.store.path
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None

    async def _run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``fn`` on the pool, in a copy of this task's context (so a test clock applies)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="gorch-sqlite")
        context = contextvars.copy_context()
        call = functools.partial(context.run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

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
        return await self._run(
            self.store.create,
            id,
            workflow,
            status,
            blob,
            wake_at,
            history=history,
            history_limit=history_limit,
            cursors=cursors,
        )

    async def create_many(
        self, records: Sequence[NewRecord], *, history_limit: int = DEFAULT_HISTORY_LIMIT
    ) -> builtins.list[str]:
        return await self._run(self.store.create_many, records, history_limit=history_limit)

    async def load(self, id: str) -> Record:
        return await self._run(self.store.load, id)

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
        return await self._run(
            self.store.save,
            id,
            expected_version,
            status,
            blob,
            wake_at,
            history=history,
            history_limit=history_limit,
            cursors=cursors,
        )

    async def delete(self, id: str) -> None:
        await self._run(self.store.delete, id)

    async def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        return await self._run(
            self.store.list, workflow=workflow, status=status, limit=limit, after=after
        )

    async def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        return await self._run(self.store.claim_due, now, limit, lease)

    async def remember(self, key: str, until: datetime) -> bool:
        return await self._run(self.store.remember, key, until)

    async def history(self, id: str) -> HistoryLog:
        return await self._run(self.store.history, id)

    async def purge(
        self, before: datetime, statuses: Sequence[str], limit: int
    ) -> builtins.list[str]:
        return await self._run(self.store.purge, before, statuses, limit)

    async def using(self, conn: Any) -> AsyncSQLiteStore:
        """This store with its calls run on ``conn``, the caller's ``sqlite3.Connection`` to
        the same file (see :meth:`SQLiteStore.using`). They run on the calling thread, the
        one that owns ``conn`` (a sqlite3 connection belongs to its thread), and are short:
        a transaction of the caller's holds SQLite's write lock anyway."""
        store = self.store.using(conn)
        return _OnConnection(self, store)

    async def close(self) -> None:
        """Wait for calls in flight, then close every connection and the pool's threads
        (a later call starts new ones)."""
        executor, self._executor = self._executor, None
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown, executor)

    def _shutdown(self, executor: ThreadPoolExecutor | None) -> None:
        if executor is not None:
            executor.shutdown(wait=True)
        self.store.close()


class _OnConnection(AsyncSQLiteStore):
    """An :class:`AsyncSQLiteStore` whose calls run, inline, on one connection of the
    caller's."""

    def __init__(self, outer: AsyncSQLiteStore, store: SQLiteStore) -> None:
        self.__dict__.update(outer.__dict__)
        self.store = store

    async def _run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return fn(*args, **kwargs)

    async def using(self, conn: Any) -> AsyncSQLiteStore:
        raise TypeError("this store already runs on a connection of the caller's")

    async def close(self) -> None:
        """Nothing to release: the connection is the caller's."""
