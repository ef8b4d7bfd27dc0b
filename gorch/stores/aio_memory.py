"""The in-process store for asyncio: :class:`MemoryStore` behind coroutines.

Every ``MemoryStore`` operation is a few dict and heap steps under a lock held
for microseconds, so calling it straight from the event loop never blocks it:
this wraps one instead of sending work to a thread. Sharing the instance (see
``store``) lets sync and async code in one process see the same records.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime, timedelta

from gorch.stores.base import (
    DEFAULT_HISTORY_LIMIT,
    AsyncStore,
    HistoryLog,
    NewRecord,
    Page,
    Record,
)
from gorch.stores.memory import MemoryStore


class AsyncMemoryStore(AsyncStore):
    """An :class:`AsyncStore` over a :class:`MemoryStore` (a new one unless given)."""

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = MemoryStore() if store is None else store
        """The sync store underneath, for code that needs both views of the same records."""
        self.url = self.store.url

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
        return self.store.create(
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
        return self.store.create_many(records, history_limit=history_limit)

    async def load(self, id: str) -> Record:
        return self.store.load(id)

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
        return self.store.save(
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
        self.store.delete(id)

    async def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        return self.store.list(workflow=workflow, status=status, limit=limit, after=after)

    async def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        return self.store.claim_due(now, limit, lease)

    async def remember(self, key: str, until: datetime) -> bool:
        return self.store.remember(key, until)

    async def history(self, id: str) -> HistoryLog:
        return self.store.history(id)

    async def purge(
        self, before: datetime, statuses: Sequence[str], limit: int
    ) -> builtins.list[str]:
        return self.store.purge(before, statuses, limit)

    async def close(self) -> None:
        self.store.close()
