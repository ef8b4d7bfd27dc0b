"""The Engine's reads and writes of one instance: a part of :class:`gorch.engine.EngineCore`.

Kept apart from the operations that use them (``start``, ``send``, ``resume``,
``run_due``...) to keep modules small. Every write is a compare-and-swap
(a create for a new instance) carrying what goes with the blob (history
entries, cursor names), and a write whose outcome a dropped connection left
unknown is settled by reading the record back; see :meth:`SaveRules._store_put`.
"""

from __future__ import annotations

import contextlib
import logging
import random
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from gorch import clock
from gorch.codec import dumps, loads
from gorch.engine_ops import (
    _CREATED_BY,
    Dispatch,
    Op,
    Pause,
    StoreCall,
    Written,
    _backoff,
    _Loaded,
    _now,
    _one_line,
)
from gorch.errors import (
    Conflict,
    GorchError,
    StoreUnavailable,
    WorkflowExists,
    WorkflowNotFound,
)
from gorch.snapshot import STATUS_OF, InstanceStatus, Snapshot, snapshot_of
from gorch.state import State
from gorch.stores.base import Record
from gorch.timers import wakeup
from gorch.workflow import Workflow

if TYPE_CHECKING:
    from gorch.dispatch.base import Dispatcher
    from gorch.history import HistoryEntry

__all__ = ["SaveRules"]

log = logging.getLogger("gorch")

_ENDED = (InstanceStatus.FINISHED, InstanceStatus.FAILED)


class SaveRules:
    """Loading and saving one instance, mixed into :class:`EngineCore`."""

    if TYPE_CHECKING:
        store: Any
        telemetry: Any
        dispatch: Dispatcher | None
        store_retries: int
        lease: timedelta
        error_backoff: timedelta

        def _cls(self, name: str) -> type[Workflow]: ...

        def _check_id(self, id: object) -> str: ...

        def _annex(self, entries: list[HistoryEntry | Written], state: State) -> dict[str, Any]: ...

    def _load(self, id: str) -> Op[_Loaded]:
        args = (self._check_id(id),)
        for n in range(self.store_retries + 1):  # :meth:`_read`, inlined: one generator less
            try:
                rec: Record = yield StoreCall("load", args)
                break
            except StoreUnavailable:
                if n == self.store_retries:
                    raise
                yield Pause(_backoff(n))
        wf, state = loads(rec.blob, self._cls(rec.workflow))
        return _Loaded(rec, wf, state)

    def _read(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> Op[Any]:
        """A store read, tried again with backoff while the store is unavailable (reads are
        safe to repeat)."""
        for n in range(self.store_retries + 1):
            try:
                return (yield StoreCall(method, args, kwargs or {}))
            except StoreUnavailable:
                if n == self.store_retries:
                    raise
                yield Pause(_backoff(n))
        raise AssertionError("unreachable")

    def _put(
        self,
        rec: Record,
        status: str,
        blob: bytes,
        wake: datetime | None,
        annex: dict[str, Any],
        after_commit: bool = True,
    ) -> Op[Record]:
        """:meth:`_store_put`, then the dispatcher told if the record is due now.

        A dispatcher that enqueues in the save's transaction is handed to the
        store with the save; one that sends after the commit is told once the
        save has committed (not when the commit is the caller's, ``after_commit``
        False: ``run_due`` finds the instance due).
        """
        dispatch = self.dispatch
        if dispatch is None:
            return (yield from self._store_put(rec, status, blob, wake, annex))
        due_now = wake is not None and wake <= _now()
        if due_now and dispatch.in_transaction:
            annex = {**annex, "enqueue": dispatch}
        saved: Record = yield from self._store_put(rec, status, blob, wake, annex)
        if due_now and after_commit and not dispatch.in_transaction:
            yield Dispatch((saved.id,))
        return saved

    def _store_put(
        self,
        rec: Record,
        status: str,
        blob: bytes,
        wake: datetime | None,
        annex: dict[str, Any],
    ) -> Op[Record]:
        """Create (``rec.version == 0``) or compare-and-swap ``rec`` with ``status``,
        ``blob`` and ``wake``.

        A write that fails with ``StoreUnavailable`` may still have committed (the
        connection dropped after the statement reached the server). The record is
        read back: if it holds our blob, the write happened and its record is
        returned; if it is unchanged, the write is tried again; if another writer
        changed it, ``Conflict`` (or ``WorkflowExists`` for a create). Only when
        the store stays unavailable is ``StoreUnavailable`` raised, and then the
        outcome is unknown to the caller.
        """
        if rec.version:
            call = StoreCall("save", (rec.id, rec.version, status, blob, wake), annex)
        else:
            call = StoreCall("create", (rec.id, rec.workflow, status, blob, wake), annex)
        for n in range(self.store_retries + 1):
            try:
                saved: Record = yield call
                return saved
            except StoreUnavailable as e:
                if n == self.store_retries:
                    raise
                log.warning("gorch: saving %r: %s; trying again", rec.id, _one_line(e))
            yield Pause(_backoff(n))
            try:
                now: Record = yield StoreCall("load", (rec.id,))
            except WorkflowNotFound:
                if rec.version:
                    raise Conflict(rec.id, rec.version, None) from None
                continue  # the create did not happen: try it again
            except StoreUnavailable:
                continue
            if now.blob == blob and now.version > rec.version:
                return now  # it did commit (a claim may have bumped the version since)
            if now.version != rec.version:
                if not rec.version:
                    raise WorkflowExists(rec.id)
                raise Conflict(rec.id, rec.version, now.version)
        raise AssertionError("unreachable")

    def _write(
        self,
        cur: _Loaded,
        status: InstanceStatus | None = None,
        wake: datetime | bool | None = True,
        *,
        driving: bool = False,
    ) -> Op[None]:
        """Compare-and-swap the instance; ``wake=True`` derives the wake-up from the state.

        ``driving``: this process is running the instance now, so a pending
        resume is due only when our lease runs out (if we crash), not at once.
        """
        state = cur.state
        rec = cur.rec
        if rec.version and state.meta:
            state.meta.pop(_CREATED_BY, None)  # only the created record needs it
        if status is None:
            status = STATUS_OF[state.status]
        if wake is True:
            wake = self._wake(state, status, driving)
            if status is InstanceStatus.RESUMING and wake is not None:
                if driving and cur.lease_until is not None:
                    # keep run_due's claim while we run it, not a timer set up meanwhile
                    wake = max(wake, cur.lease_until)
                elif rec.status == InstanceStatus.RESUMING and rec.wake_at is not None:
                    # another process may be running it: keep its lease
                    wake = max(wake, rec.wake_at)
        elif wake is False:
            wake = None
        blob = dumps(cur.wf, state)
        history = cur.history
        if status != rec.status and status in _ENDED:
            kind = "finished" if status is InstanceStatus.FINISHED else "failed"
            if not any(e.kind == kind for e in history):
                error = next((t.error for t in state.threads if t.error), "")
                history.append(Written.of(kind, {"at": clock.now(), "error": error or None}))
        elif not history and blob == rec.blob and status == rec.status and wake == rec.wake_at:
            return  # nothing changed: keep the version (an idle resume writes nothing)
        try:
            cur.rec = yield from self._put(
                rec,
                status,
                blob,
                wake,
                self._annex(history, state),
                not cur.callers_transaction,
            )
            history.clear()
        except Conflict:
            if self.telemetry is not None:
                store = type(self.store).__name__.removesuffix("Store").lower()
                self.telemetry.record_conflict(store.removeprefix("async"), rec.workflow)
            raise

    def _discard(self, rec: Record) -> Op[None]:
        """Delete a record this call created and nothing else touched (a start that failed)."""
        try:
            now: Record = yield StoreCall("load", (rec.id,))
            if now.version == rec.version:
                yield StoreCall("delete", (rec.id,))
        except GorchError as e:
            log.warning("gorch: could not remove the record of failed start %r: %s", rec.id, e)

    def _last_saved(self, rec: Record) -> Op[Snapshot]:
        """The snapshot of what is stored, when the in-memory state may be ahead of it."""
        with contextlib.suppress(GorchError):
            rec = yield StoreCall("load", (rec.id,))
        wf, state = loads(rec.blob, self._cls(rec.workflow))
        return snapshot_of(rec, wf, state)

    def _conflict_pause(self, n: int) -> Op[None]:
        """Before attempt ``n`` of a compare-and-swap loop: a short pause, with jitter."""
        if n:
            yield Pause(random.uniform(0, min(0.05, 0.0005 * 2**n)))

    def _wake(self, state: State, status: InstanceStatus, driving: bool) -> datetime | None:
        if status is InstanceStatus.RESUMING:
            return _now() + self.lease if driving else _now()
        if status is not InstanceStatus.WAITING:
            return None
        wake, setup_failed = wakeup(state)
        if setup_failed:  # setups are retried on the next resume
            retry_at = _now() + self.error_backoff
            wake = retry_at if wake is None else min(wake, retry_at)
        return wake
