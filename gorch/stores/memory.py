"""An in-process store: for tests, demos and single-process tools.

Records live in a dict guarded by one lock, so every operation is atomic with
respect to other threads; nothing survives the process and other processes
cannot see it. Remembered keys expire by :func:`gorch.clock.now`, so a test
clock (``gorch.testing``) moves them too.
"""

from __future__ import annotations

import builtins
import heapq
import threading
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from gorch import clock
from gorch.errors import Conflict, WorkflowExists, WorkflowNotFound
from gorch.stores._common import (
    append_history,
    check_history_limit,
    check_limit,
    check_purge,
    matches,
    opt_utc,
    page_cursor,
    to_utc,
)
from gorch.stores.base import DEFAULT_HISTORY_LIMIT, HistoryLog, NewRecord, Page, Record, Store

_Wakeup = tuple[datetime, str]


class MemoryStore(Store):
    """Dict + lock, with a heap of wake-ups so ``claim_due`` only looks at due records.

    The heap is pruned lazily: an entry whose record was deleted or rescheduled
    is dropped when it reaches the top, and the heap is rebuilt when stale
    entries outnumber live ones.
    """

    def __init__(self) -> None:
        self.url = "memory://"
        self._lock = threading.Lock()
        self._records: dict[str, Record] = {}
        # Every id, for paging in id order: appended as created, sorted when next read
        # (a create stays O(1) however many records there are; Timsort merges the runs).
        self._ids: list[str] = []
        self._ids_sorted = True
        self._wakeups: list[_Wakeup] = []
        self._scheduled = 0  # records whose wake_at is not None
        self._seen: dict[str, datetime] = {}  # remembered key -> until
        self._expiries: list[tuple[datetime, str]] = []  # heap, to purge expired keys
        self._history: dict[str, HistoryLog] = {}
        self._updated: dict[str, datetime] = {}  # by gorch.clock, so a test clock moves it

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
        if history_limit < 1:
            check_history_limit(history_limit)
        if type(blob) is not bytes:
            blob = bytes(blob)
        record = Record(id, workflow, status, blob, 1, opt_utc(wake_at))
        entries = list(history)
        dropped = max(0, len(entries) - history_limit)
        log = HistoryLog(entries[dropped:] if dropped else entries, dropped)
        now = clock.now()
        with self._lock:
            if id in self._records:
                raise WorkflowExists(id)
            self._records[id] = record
            self._history[id] = log
            self._updated[id] = now
            self._ids.append(id)
            self._ids_sorted = False
            self._schedule(None, record)
        return record

    def create_many(
        self, records: Sequence[NewRecord], *, history_limit: int = DEFAULT_HISTORY_LIMIT
    ) -> builtins.list[str]:
        check_history_limit(history_limit)
        made = [
            (
                Record(r.id, r.workflow, r.status, bytes(r.blob), 1, opt_utc(r.wake_at)),
                HistoryLog(*append_history([], 0, r.history, history_limit)),
            )
            for r in records
        ]
        with self._lock:  # the test and the inserts under one lock: all or nothing
            taken = [record.id for record, _ in made if record.id in self._records]
            if taken:
                return taken
            now = clock.now()
            for record, log in made:
                self._records[record.id] = record
                self._history[record.id] = log
                self._updated[record.id] = now
                self._schedule(None, record)
            # Two sorted runs: Timsort merges them in one pass.
            self._ids.extend(record.id for record, _ in made)
            self._ids_sorted = False
        return []

    def load(self, id: str) -> Record:
        with self._lock:
            record = self._records.get(id)
        if record is None:
            raise WorkflowNotFound(id)
        return record

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
        if history_limit < 1:
            check_history_limit(history_limit)
        wake_at = opt_utc(wake_at)
        if type(blob) is not bytes:
            blob = bytes(blob)
        now = clock.now()
        with self._lock:
            old = self._records.get(id)
            if old is None or old.version != expected_version:
                raise Conflict(id, expected_version, None if old is None else old.version)
            new = Record(id, old.workflow, status, blob, expected_version + 1, wake_at)
            if history:
                log = self._history[id]  # a copy is handed out by history(): append in place
                log.entries.extend(history)
                excess = len(log.entries) - history_limit
                if excess > 0:
                    del log.entries[:excess]
                    self._history[id] = HistoryLog(log.entries, log.dropped + excess)
            self._records[id] = new
            self._updated[id] = now
            self._schedule(old, new)
        return new

    def delete(self, id: str) -> None:
        with self._lock:
            if id not in self._records:
                raise WorkflowNotFound(id)
            self._drop(id)

    def _drop(self, id: str) -> None:
        """Remove record ``id`` (the lock held)."""
        old = self._records.pop(id)
        self._history.pop(id, None)
        self._updated.pop(id, None)
        ids = self._sorted_ids()
        del ids[bisect_right(ids, id) - 1]
        if old.wake_at is not None:
            self._scheduled -= 1  # its heap entry goes stale and is pruned later

    def history(self, id: str) -> HistoryLog:
        with self._lock:
            log = self._history.get(id)
        if log is None:
            raise WorkflowNotFound(id)
        return HistoryLog(list(log.entries), log.dropped)

    def purge(self, before: datetime, statuses: Sequence[str], limit: int) -> builtins.list[str]:
        wanted = set(check_purge(statuses, limit))
        before = to_utc(before)
        with self._lock:  # the test and the delete under one lock: nothing changes between
            old = sorted(
                (at, id)
                for id, at in self._updated.items()
                if at < before and self._records[id].status in wanted
            )[:limit]
            for _, id in old:
                self._drop(id)
        return [id for _, id in old]

    def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        check_limit(limit)
        found: builtins.list[Record] = []
        with self._lock:
            ids = self._sorted_ids()
            start = 0 if after is None else bisect_right(ids, after)
            for i in range(start, len(ids)):
                record = self._records[ids[i]]
                if matches(record, workflow, status):
                    found.append(record)
                    if len(found) > limit:
                        break
        cursor = page_cursor([r.id for r in found], limit)
        return Page(found[:limit], cursor)

    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        now = to_utc(now)
        until = now + lease
        claimed: builtins.list[Record] = []
        seen: set[str] = set()
        with self._lock:
            heap = self._wakeups
            while heap and len(claimed) < limit and heap[0][0] <= now:
                wake, id = heapq.heappop(heap)
                record = self._records.get(id)
                if record is None or record.wake_at != wake or id in seen:
                    continue  # stale entry (deleted, rescheduled or a duplicate)
                new = replace(record, version=record.version + 1, wake_at=until)
                self._records[id] = new
                self._updated[id] = clock.now()
                seen.add(id)
                claimed.append(new)
            # Pushed only now: with a zero lease the new entries would be due again at once.
            for record in claimed:
                heapq.heappush(heap, (until, record.id))
        return claimed

    def remember(self, key: str, until: datetime) -> bool:
        until = to_utc(until)
        now = clock.now()
        with self._lock:
            heap = self._expiries
            while heap and heap[0][0] <= now:  # purge: each key is dropped at most once
                expired, old = heapq.heappop(heap)
                if self._seen.get(old) == expired:
                    del self._seen[old]
            current = self._seen.get(key)
            if current is not None and current > now:
                return False
            if until > now:  # a key that is already expired is not worth keeping
                self._seen[key] = until
                heapq.heappush(heap, (until, key))
            else:
                self._seen.pop(key, None)
            return True

    def _sorted_ids(self) -> builtins.list[str]:
        """Every id in order (the lock held)."""
        if not self._ids_sorted:
            self._ids.sort()
            self._ids_sorted = True
        return self._ids

    def _schedule(self, old: Record | None, new: Record) -> None:
        """Keep the heap and the live count in step with a record's new ``wake_at``."""
        old_wake = None if old is None else old.wake_at
        self._scheduled += (new.wake_at is not None) - (old_wake is not None)
        if new.wake_at is not None and new.wake_at != old_wake:
            heapq.heappush(self._wakeups, (new.wake_at, new.id))
        if len(self._wakeups) > 2 * self._scheduled + 64:
            # Rebuilt from the heap itself, not from every record: the cost stays in
            # proportion to the entries pushed since the last rebuild, however many
            # finished records the store holds.
            records = self._records
            live = {
                (wake, id)
                for wake, id in self._wakeups
                if (r := records.get(id)) is not None and r.wake_at == wake
            }
            self._wakeups = list(live)
            heapq.heapify(self._wakeups)
