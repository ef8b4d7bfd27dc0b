"""The Engine's history and retention rules: a part of :class:`gorch.engine.EngineCore`.

Kept apart from the other rules only to keep modules small: what a save
writes next to the blob (history entries and cursor names), the history
reader, ``purge`` in batches and the automatic ``retention`` policy, and
which middleware the core is handed for a call.
"""

from __future__ import annotations

import builtins
import inspect
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from gorch import clock
from gorch.check import Progress
from gorch.engine_ops import (
    RETAINED_STATUSES,
    Awaited,
    Op,
    Written,
    _as_data,
    _Loaded,
    _now,
    _one_line,
    _seconds,
    _takes_history,
)
from gorch.errors import (
    StoreError,
)
from gorch.history import History, HistoryEntry, Recorder
from gorch.snapshot import (
    InstanceStatus,
)
from gorch.state import (
    ACTIVE_EVENT,
    State,
    ThreadStatus,
)
from gorch.stores.base import HistoryLog

log = logging.getLogger("gorch")


class HistoryRules:
    """History, retention and middleware rules, mixed into :class:`EngineCore`."""

    if TYPE_CHECKING:
        store: Any
        telemetry: Any
        middleware: tuple[object, ...]

        def _read(
            self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
        ) -> Op[Any]: ...

        def _check_id(self, id: object) -> str: ...

    def _setup_history(
        self,
        history_limit: int,
        retention: timedelta | float | None,
        retention_every: timedelta | float,
    ) -> None:
        if isinstance(history_limit, bool) or history_limit < 1:
            raise ValueError(f"history_limit must be at least 1, got {history_limit!r}")
        #: How many history entries each instance keeps (the oldest are dropped, and counted).
        self.history_limit = history_limit
        #: Finished and cancelled instances older than this are purged by ``run_due``
        #: (and so by ``work``), at most once per ``retention_every``; None: never.
        self.retention = None if retention is None else _seconds(retention)
        self.retention_every = _seconds(retention_every)
        if self.retention is not None and self.retention <= timedelta(0):
            raise ValueError(f"retention must be positive, got {retention!r}")
        self._next_retention: datetime | None = None
        self._recorder = Recorder()
        # A store whose save takes no history (a custom or wrapping one) gets none.
        self._keeps_history = _takes_history(self.store)
        #: Told of every step attempt by the core (None: the store keeps no history).
        self._step_log = self._recorder.note if self._keeps_history else None
        self._quiet = tuple(m for m in self.middleware if m is not self.telemetry)

    def _live_middleware(self) -> tuple[object, ...]:
        """The middleware to hand the core for one call: telemetry that records nothing
        (no SDK set up) is left out, so the core need not ask it at every step."""
        if self.telemetry is None or self.telemetry.enabled:
            return self.middleware
        return self._quiet

    def _event_middleware(self) -> tuple[object, ...]:
        """:meth:`_live_middleware` for a handler call."""
        return self._live_middleware()

    def _annex(
        self, entries: builtins.list[HistoryEntry | Written], state: State
    ) -> dict[str, Any]:
        """What a create or save writes next to the blob: history entries and cursor names."""
        if not self._keeps_history:
            return {}
        return {
            "history": [
                e if isinstance(e, Written) else e.model_dump_json(exclude_none=True)
                for e in entries
            ],
            "history_limit": self.history_limit,
            "cursors": [t.cur_step for t in state.threads if t.cur_step],
        }

    def _history(self, id: str) -> Op[History]:
        log: HistoryLog = yield from self._read("history", (self._check_id(id),))
        return History([HistoryEntry.model_validate_json(e) for e in log.entries], log.dropped)

    def _purge(
        self,
        before: datetime,
        statuses: Sequence[str],
        batch: int,
        progress: Progress | None = None,
    ) -> Op[int]:
        """Delete in batches of ``batch``, each its own short write; the number deleted.

        ``progress(done, None)`` is called after each batch that deleted something
        (``done``: deleted so far; the total is not known beforehand).
        """
        if isinstance(statuses, str):
            raise TypeError(f"statuses must be a sequence of statuses, not {statuses!r}")
        unknown = [s for s in statuses if s not in {i.value for i in InstanceStatus}]
        if unknown:
            raise ValueError(
                f"unknown status {unknown[0]!r}: use {', '.join(i.value for i in InstanceStatus)}"
            )
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        before = before if before.tzinfo else before.replace(tzinfo=UTC)
        total = 0
        while True:
            ids: builtins.list[str] = yield from self._read(
                "purge", (before, tuple(statuses), batch)
            )
            total += len(ids)
            if ids:
                log.info("gorch: purged %d instances (%d so far)", len(ids), total)
                if progress is not None:
                    out = progress(total, None)
                    if out is not None and inspect.isawaitable(out):
                        yield Awaited(out)
            if len(ids) < batch:
                return total

    def _apply_retention(self) -> Op[None]:
        """The automatic purge of ``retention``: at most once per ``retention_every``."""
        if self.retention is None:
            return
        now = _now()
        if self._next_retention is not None and now < self._next_retention:
            return
        self._next_retention = now + self.retention_every
        try:
            yield from self._purge(now - self.retention, RETAINED_STATUSES, 500)
        except (StoreError, NotImplementedError) as e:
            log.warning("gorch: retention purge failed: %s; next try later", _one_line(e))

    @staticmethod
    def _event_entry(
        cur: _Loaded, event: str, input: Any, thread_id: str | None, pc: int | None
    ) -> dict[str, Any]:
        """The fields of the entry of a delivered event, at the wait it was delivered to
        (the output is added once the handler has run)."""
        for t in cur.state.threads:
            if t.status is not ThreadStatus.WAITING_EVENT or thread_id not in (None, t.id):
                continue
            for we in t.wait_events:
                if we.req.name == event and we.status in ACTIVE_EVENT and pc in (None, we.req.pc):
                    thread_id, pc = t.id, we.req.pc
                    break
        return {
            "at": clock.now(),
            "name": event,
            "thread_id": thread_id,
            "pc": pc,
            "input": _as_data(input),
        }
