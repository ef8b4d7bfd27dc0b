"""The Engine: the stateless core, a store, compare-and-swap and a wake-up index.

Every write goes through the store's compare-and-swap, so any number of web
requests, cron jobs and workers can share one store:

* ``send`` applies an event to the version it loaded and saves it with CAS; if
  another writer got there first, it reloads and applies the event to the new
  version (the handler runs again on fresh data; the first run was never saved).
* ``resume`` saves at every checkpoint of the core, so a crash re-runs at most
  the step that was in flight (steps are at-least-once).
* ``run_due`` claims due records with a lease: two workers never fire the same
  timer, and a crashed worker's claims expire by themselves.

A record's wake-up time says when ``run_due`` must look at it: a timer's due
time, a retry's backoff, or "now" for a resume that is pending (deferred, or
interrupted by a crash).

How one set of rules serves both :class:`Engine` and :class:`gorch.AsyncEngine`:
each operation is written once, in :class:`EngineCore`, as a generator that
*yields* what it needs done (a store call, a resume, an event's handler, a
pause) and gets the result sent back. :class:`Engine` performs those requests
with blocking calls; :class:`gorch.AsyncEngine` awaits them. Only the drivers
differ, never the rules.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from gorch import clock
from gorch.bulk import BulkStart
from gorch.codec import dumps, loads
from gorch.engine_history import HistoryRules
from gorch.engine_save import SaveRules
from gorch.errors import (
    Conflict,
    DAGFailed,
    DefinitionError,
    EventNotFound,
    GorchError,
    InvalidWorkflowId,
    SetupError,
    StaleEvent,
    StepFailed,
    StoreError,
    TimerNotSendable,
    UnknownWorkflow,
    WorkflowExists,
    WorkflowFinishedError,
    WorkflowNotActive,
    WorkflowNotFound,
)
from gorch.history import entry
from gorch.idempotency import (
    START_KEY,
    check_key,
    check_repeated_start,
    key_id,
    remember_send,
    repeated_send,
    start_digest,
)
from gorch.interpreter import find_statement
from gorch.snapshot import (
    ACTIVE_STATUSES,
    DueResult,
    InstanceStatus,
    ListPage,
    Snapshot,
    Summary,
    snapshot_of,
)
from gorch.state import (
    ACTIVE_EVENT,
    CheckpointKind,
    EventStatus,
    ThreadStatus,
    WorkflowStatus,
    new_state,
)
from gorch.stores._common import opt_utc, to_utc
from gorch.stores.base import DEFAULT_HISTORY_LIMIT, Page, Record
from gorch.timers import due_events, due_time
from gorch.workflow import Workflow

if TYPE_CHECKING:
    from gorch.dispatch.base import Dispatcher

try:  # the ``otel`` extra: spans and metrics, no-ops until the application sets up an SDK
    from gorch import otel as _otel
except ImportError:  # pragma: no cover - exercised without the extra
    _otel = None  # type: ignore[assignment]


from gorch.engine_ops import (
    _CREATED_BY,
    _ID_RE,
    Awaited,
    Cancel,
    DryRun,
    HandleEvent,
    Idle,
    Op,
    ReportFailure,
    Resume,
    SetupHalt,
    Written,
    _as_data,
    _is_timer,
    _Loaded,
    _new_id,
    _nonce,
    _now,
    _one_line,
    _seconds,
    effect_ahead,
    initial_data,
)

__all__ = ["EngineCore"]

log = logging.getLogger("gorch")

_BYTES = (bytes, bytearray, memoryview)


# --------------------------------------------------------------------------- the rules


class EngineCore(BulkStart, HistoryRules, SaveRules):
    """The Engine's rules, written once; :class:`Engine` and ``AsyncEngine`` drive them.

    ``store`` is a store object whose methods the driver calls (blocking or
    awaited); everything else is configuration shared by both drivers.
    """

    store: Any

    def __init__(
        self,
        workflows: Mapping[str, type[Workflow]],
        *,
        defer_resume: bool = False,
        lease: timedelta | float = 60.0,
        conflict_retries: int = 100,
        error_backoff: timedelta | float = 60.0,
        middleware: Sequence[object] = (),
        store_retries: int = 3,
        idempotency_keys: int = 100,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        retention: timedelta | float | None = None,
        retention_every: timedelta | float = 3600.0,
        run_deadline: timedelta | float | None = None,
        dispatch: Dispatcher | None = None,
    ) -> None:
        self.workflows = dict(workflows)
        for name, cls in self.workflows.items():
            if not (isinstance(cls, type) and issubclass(cls, Workflow)):
                raise TypeError(f"workflow {name!r} must be a gorch.Workflow subclass, got {cls!r}")
        if store_retries < 0:
            raise ValueError(f"store_retries must be 0 or more, got {store_retries}")
        if idempotency_keys < 1:
            raise ValueError(f"idempotency_keys must be at least 1, got {idempotency_keys}")
        self.defer_resume = defer_resume
        self.lease = _seconds(lease)
        self.conflict_retries = conflict_retries
        self.error_backoff = _seconds(error_backoff)
        #: How long one run of an instance (a start, a send, a due resume) may go on
        #: starting steps; past it the instance is saved ``resuming``, due at once, and
        #: ``run_due`` carries on in a later call (``None``: no limit).
        self.run_deadline = None if run_deadline is None else _seconds(run_deadline)
        if self.run_deadline is not None and self.run_deadline <= timedelta(0):
            raise ValueError(f"run_deadline must be more than 0 seconds, got {run_deadline!r}")
        #: How often a store call that failed with ``StoreUnavailable`` is tried again
        #: (with capped exponential backoff and jitter) before the error is reported.
        self.store_retries = store_retries
        #: How many idempotency keys of sends each instance remembers.
        self.idempotency_keys = idempotency_keys
        self.telemetry = None
        if _otel is not None:  # OpenTelemetry first (outermost), unless passed explicitly
            self.telemetry, middleware = _otel.with_telemetry(middleware)
        #: Wraps every resume, step and handler call (see :mod:`gorch.hooks`).
        self.middleware: tuple[object, ...] = tuple(middleware)
        self._setup_history(history_limit, retention, retention_every)
        #: By workflow class: whether its handlers' setups are all timers' (dry runs).
        self._plain_setups: dict[type[Workflow], bool] = {}
        #: By workflow class: whether it has lifecycle hooks run when it blocks.
        self._hooked: dict[type[Workflow], bool] = {}
        self._setup_halt = SetupHalt(effect_ahead)
        #: Told of every instance a save leaves due now (see :mod:`gorch.dispatch`).
        self.dispatch = dispatch
        if dispatch is not None:
            dispatch.attach(self)

    # ------------------------------------------------------------------ operations

    def _start(
        self,
        name: str,
        id: str | None,
        data: Mapping[str, Any] | Workflow | None,
        key: str | None,
        by: str | None = None,
        callers_transaction: bool = False,
    ) -> Op[Snapshot]:
        cls = self._cls(name)
        wf = initial_data(name, cls, data)
        fields = {"at": clock.now(), "name": name, "by": by, "input": wf}  # its JSON form
        started = Written.of("started", fields)
        if id is not None:
            wid = self._check_id(id)
        elif key is not None:
            wid = key_id(name, key)
        else:
            wid = _new_id()
        # Makes this call's first blob unique: if the create's reply is lost, reading the
        # record back tells our create from a concurrent start's (same id, same data).
        meta = {_CREATED_BY: _nonce()}
        digest = ""
        if key is not None:
            digest = meta[START_KEY] = start_digest(key, wf)
        state = new_state(wid, name)
        state.meta.update(meta)
        cur = _Loaded(Record(wid, name, InstanceStatus.RESUMING, b"", 0, None), wf, state)
        cur.callers_transaction = callers_transaction
        cur.history.append(started)
        try:
            if self.defer_resume:  # created due at once, for run_due
                yield from self._write(cur, InstanceStatus.RESUMING, _now())
                return self._snapshot(cur)
            # The record is created as late as possible: when the instance blocks before
            # any step (or handler setup other than a timer's), at the end, in the state it
            # blocks in (one write); else right before that step, leased to this call.
            dry, halt = self._dry_run_of(cls, wf)
            if dry:
                # Nothing is watching the resume (no middleware, no lifecycle hook): run
                # it as the bare core does, as far as it goes without effects.
                [blocked] = yield DryRun([(wf, state)], halt)
                if isinstance(blocked, GorchError):
                    raise blocked
                if blocked:
                    yield from self._write(cur)
                    return self._snapshot(cur)
                cur.state = state = new_state(wid, name)  # an effect ahead: from the start
                state.meta.update(meta)
            if callers_transaction:  # nothing with effects runs before the caller commits
                yield from self._write(cur, InstanceStatus.RESUMING, _now())
                return self._snapshot(cur)
            yield from self._drive(cur, "start", keep_on_error=False, create_first=True)
        except WorkflowExists:  # raised by the create: nothing of ours was stored
            if key is None:
                raise
            again = yield from self._load(wid)
            check_repeated_start(wid, key, again.state.meta.get(START_KEY), digest)
            return self._snapshot(again)
        except StepFailed:
            pass  # saved as failed: the snapshot shows it
        except Conflict:  # a worker took over (our lease ran out): report what it saved
            log.warning("gorch: start of %r: another runner took it over", wid)
            return (yield from self._last_saved(cur.rec))
        except StoreError as e:
            if not cur.rec.version:  # the create failed: start raises, as nothing was made
                raise
            log.warning("gorch: start of %r: %s; run_due carries on", wid, _one_line(e))
            return (yield from self._last_saved(cur.rec))
        except GorchError as e:
            if cur.rec.version <= 1:  # nothing saved but the record as created: remove it
                if cur.rec.version:
                    yield from self._discard(cur.rec)
                raise
            log.error("gorch: start of %r: %s", wid, e)
            with contextlib.suppress(GorchError):
                yield from self._write(cur, InstanceStatus.RESUMING, _now() + self.error_backoff)
            return (yield from self._last_saved(cur.rec))
        return self._snapshot(cur)

    def _create_first(self, cur: _Loaded) -> Op[None]:
        """Create the record of a start about to run its first step, leased to this call."""
        if cur.rec.version:
            return
        lease = _now() + self.lease
        yield from self._write(cur, InstanceStatus.RESUMING, lease)
        cur.lease_until = lease

    def _send(
        self,
        id: str,
        event: str,
        input: Any,
        thread_id: str | None,
        pc: int | None,
        key: str | None,
        by: str | None = None,
    ) -> Op[Any]:
        if key is not None:
            check_key(key)
        for n in range(self.conflict_retries):
            if n:
                yield from self._conflict_pause(n)
            cur = yield from self._load(id)
            if key is not None:
                repeated, first = repeated_send(cur.state, key, event, input)
                if repeated:
                    log.info("gorch: %r to %r repeats key %r: not applied again", event, id, key)
                    return first
            try:
                self._check_active(cur)
                self._refuse_timer(cur, event, thread_id, pc)
                delivered = self._event_entry(cur, event, input, thread_id, pc)
                if by is not None:
                    delivered["by"] = by
                out = yield HandleEvent(cur.wf, cur.state, event, input, thread_id, pc)
            except EventNotFound as e:
                # A resume is pending (another event's case body has not run yet, so
                # the thread has not reached its Select): run it, then try again.
                # If another process holds a lease (it is running the instance), wait
                # for it rather than run the same steps at the same time. A failed
                # step waiting for its retry is not caught up here: run_due retries it.
                if (
                    cur.state.status is not WorkflowStatus.RESUMING
                    or cur.rec.status != InstanceStatus.RESUMING
                ):
                    self._rejected(cur, event, e)
                    raise
                if cur.rec.wake_at is not None and cur.rec.wake_at > _now():
                    continue  # leased: the next attempt reloads after a short pause
                with contextlib.suppress(Conflict):
                    yield from self._drive(cur)
                continue
            except GorchError as e:
                self._rejected(cur, event, e)
                raise
            # Serialized now, by Written.of (its repr where JSON cannot hold it).
            delivered["output"] = _as_data(out) if isinstance(out, _BYTES) else out
            cur.history.append(Written.of("event", delivered))
            if key is not None:
                remember_send(cur.state, key, event, input, out, self.idempotency_keys)
            try:
                yield from self._write(cur, driving=not self.defer_resume)
            except Conflict:
                continue
            # Committed: from here on the event is delivered, whatever happens.
            if not self.defer_resume:
                yield from self._drive_after_event(cur, event)
            return out
        raise Conflict(id, -1, None)

    def _drive_after_event(self, cur: _Loaded, event: str) -> Op[None]:
        """Resume after a committed event; report failures on the instance, not to the sender."""
        id = cur.rec.id
        try:
            yield from self._drive(cur, "event")
        except Conflict:
            log.debug("gorch: resume of %r after %r left to a later writer", id, event)
        except StepFailed as e:
            # The event is delivered and saved: its sender did its part. The
            # failure is the instance's (status failed, ``get`` shows the error).
            log.warning("gorch: %s (workflow %r, after event %r)", e, id, event)
        except GorchError as e:
            log.warning(
                "gorch: resume of %r after event %r stopped: %s; run_due carries on",
                id,
                event,
                _one_line(e),
            )
        except Exception:  # a bug in middleware or a hook: still the instance's problem
            log.exception("gorch: resume of %r after event %r failed", id, event)

    def _resume(self, id: str) -> Op[Snapshot]:
        for n in range(self.conflict_retries):
            if n:
                yield from self._conflict_pause(n)
            cur = yield from self._load(id)
            status = InstanceStatus(cur.rec.status)
            if status is InstanceStatus.FINISHED:
                raise WorkflowFinishedError(id)
            if status is InstanceStatus.CANCELLED:
                raise WorkflowNotActive(id, status)
            try:
                yield from self._drive(cur)
            except Conflict:
                continue
            return self._snapshot(cur)
        raise Conflict(id, -1, None)

    def _retry(self, id: str, by: str | None = None) -> Op[Snapshot]:
        for n in range(self.conflict_retries):
            if n:
                yield from self._conflict_pause(n)
            cur = yield from self._load(id)
            if cur.rec.status not in (InstanceStatus.FAILED, InstanceStatus.RETRYING):
                raise WorkflowNotActive(id, cur.rec.status)
            for t in cur.state.threads:
                t.attempts = 0
            cur.history.append(entry("retried", by=by))
            try:
                # Leased to this call, which runs it next (not due at once for a worker).
                yield from self._write(cur, InstanceStatus.RESUMING, driving=True)
                yield from self._drive(cur, "retry")
            except Conflict:
                continue
            return self._snapshot(cur)
        raise Conflict(id, -1, None)

    def _get(self, id: str) -> Op[Snapshot]:
        return self._snapshot((yield from self._load(id)))

    def _list(
        self, workflow: str | None, status: str | None, limit: int, after: str | None
    ) -> Op[ListPage]:
        page: Page = yield from self._read(
            "list", (), {"workflow": workflow, "status": status, "limit": limit, "after": after}
        )
        items = [
            Summary(
                id=r.id, workflow=r.workflow, status=r.status, version=r.version, wake_at=r.wake_at
            )
            for r in page.records
        ]
        return ListPage(items=items, next_cursor=page.next_cursor)

    def _cancel(self, id: str, by: str | None = None) -> Op[Snapshot]:
        for n in range(self.conflict_retries):
            if n:
                yield from self._conflict_pause(n)
            cur = yield from self._load(id)
            status = cur.rec.status
            if status in (InstanceStatus.FINISHED, InstanceStatus.CANCELLED):
                raise WorkflowNotActive(id, status)
            yield Cancel(cur.wf, cur.state)
            cur.history.append(entry("cancelled", by=by))
            try:
                yield from self._write(cur, InstanceStatus.CANCELLED)
            except Conflict:
                continue
            if self.telemetry is not None:
                self.telemetry.record_completed(cur.rec.workflow, "cancelled")
            return self._snapshot(cur)
        raise Conflict(id, -1, None)

    def _run_due(
        self, now: datetime | None, limit: int | None, should_stop: Callable[[], bool] | None
    ) -> Op[builtins.list[DueResult]]:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 (or None for all), got {limit}")
        fixed = opt_utc(now)
        yield from self._apply_retention()
        results: builtins.list[DueResult] = []
        seen: set[str] = set()
        with contextlib.ExitStack() as stack:
            due = stack.enter_context(self.telemetry.run_due_span()) if self.telemetry else None
            while limit is None or len(results) < limit:
                if should_stop is not None and should_stop():
                    break
                at = _now() if fixed is None else fixed
                try:
                    claimed = yield from self._read("claim_due", (at, 1, self.lease))
                except StoreError as e:
                    if not results:
                        raise
                    log.warning("gorch: run_due stopped early: %s", _one_line(e))
                    break
                if not claimed:
                    break  # nothing due
                if claimed[0].id in seen:
                    # Only what this call already ran is due again (it reached its run
                    # deadline, or a retry is due at once): leave it to the next call,
                    # due now rather than leased to a call that is ending.
                    yield from self._unclaim(claimed[0], at)
                    break
                seen.add(claimed[0].id)
                results.append((yield from self._process_due(claimed[0], at, due)))
        return results

    def _rewake(self, rec: Record, wake: datetime) -> Op[Record]:
        """Save ``rec`` as it is with another wake-up: a claim (the end of a lease), or a
        claim given back (due again); ``Conflict`` if another runner changed it."""
        wf, state = loads(rec.blob, self._cls(rec.workflow))
        cur = _Loaded(rec, wf, state)
        yield from self._write(cur, InstanceStatus(rec.status), wake)
        return cur.rec

    def _unclaim(self, rec: Record, at: datetime) -> Op[None]:
        """Give back a claim this call will not use: the record is due at ``at`` again."""
        try:
            yield from self._rewake(rec, at)
        except GorchError as e:  # another runner has it, or the store failed: the lease ends
            log.info("gorch: run_due could not give back its claim of %r: %s", rec.id, e)

    def _resume_due(self, id: str, now: datetime | None) -> Op[DueResult | None]:
        """Claim instance ``id`` if it is due, and process it as ``run_due`` would; None when
        it is not due (already resumed, claimed by another runner, gone).

        The claim is a compare-and-swap of the record as it is, with its wake-up
        moved to the end of a lease: of two callers for one instance, one claims
        it and the other gets None; a runner that dies holding it leaves it to
        ``run_due`` once the lease runs out.
        """
        at = _now() if now is None else to_utc(now)
        try:
            rec: Record = yield from self._read("load", (self._check_id(id),))
        except WorkflowNotFound:
            return None
        if rec.wake_at is None or rec.wake_at > at:
            return None
        try:
            claimed = yield from self._rewake(rec, at + self.lease)
        except Conflict:
            return None  # another runner claimed or saved it first
        return (yield from self._process_due(claimed, at))

    def _process_due(self, rec: Record, now: datetime, due: Any = None) -> Op[DueResult]:
        action = "resume"
        try:
            wf, state = loads(rec.blob, self._cls(rec.workflow))
            if due is not None:
                due.link(rec.id, state)
            cur = _Loaded(rec, wf, state, lease_until=rec.wake_at)
            if rec.status not in ACTIVE_STATUSES:  # nothing to do: clear the wake-up
                yield from self._write(cur, InstanceStatus(rec.status), False)
                return DueResult(id=rec.id, action="none", status=rec.status)
            if rec.status == InstanceStatus.RETRYING:
                action = "retry"
            fired: list[str] = []
            if state.status is WorkflowStatus.WAITING:
                for req in due_events(state, now):
                    try:
                        yield HandleEvent(wf, state, req.name, None, req.thread_id, req.pc, now)
                    except (StaleEvent, EventNotFound):
                        continue  # an earlier timer of the same wait ended it
                    fired.append(req.name)
                    cur.history.append(
                        entry("timer", name=req.name, thread_id=req.thread_id, pc=req.pc)
                    )
                    due_at = due_time(req)
                    if self.telemetry is not None and due_at is not None:
                        lag = (_now() - due_at).total_seconds()
                        self.telemetry.record_timer_lag(rec.workflow, req.name, lag)
                if fired:  # save the firing first: a timer is delivered once
                    action = "timer"
                    yield from self._write(cur, driving=True)
            if state.status is not WorkflowStatus.FINISHED:
                reason = "retry" if action == "retry" else "timer" if fired else "resume"
                yield from self._drive(cur, reason)
            return DueResult(id=rec.id, action=action, fired=fired, status=cur.rec.status)
        except Conflict:
            # Cancelled meanwhile, or taken over by another runner: say what it is now.
            status = ""
            with contextlib.suppress(GorchError):
                status = (yield from self._read("load", (rec.id,))).status
            if status == InstanceStatus.CANCELLED:
                log.info("gorch: run_due: %r was cancelled while it ran", rec.id)
            else:
                log.info("gorch: run_due: %r was taken over by another runner", rec.id)
            return DueResult(id=rec.id, action=action, status=status, outcome="skipped")
        except GorchError as e:
            log.warning("gorch: run_due could not process %r: %s", rec.id, _one_line(e))
            error = f"{type(e).__name__}: {_one_line(e)}"
            return DueResult(id=rec.id, action=action, outcome="failed", error=error)
        except Exception as e:
            log.exception("gorch: run_due could not process %r", rec.id)
            error = f"{type(e).__name__}: {e}"
            return DueResult(id=rec.id, action=action, outcome="failed", error=error)

    def _work(
        self,
        poll: float,
        batch: int,
        should_stop: Callable[[], bool],
        on_result: Callable[[DueResult], Any] | None,
        max_backoff: float,
    ) -> Op[int]:
        """The worker loop of both drivers: ``run_due`` until stopped, riding out store errors.

        ``on_result`` may return an awaitable (async driver only): it is awaited
        before the next instance is looked at.
        """
        done = 0
        failures = 0
        while not should_stop():
            try:
                results = yield from self._run_due(None, batch, should_stop)
            except StoreError as e:
                failures += 1
                yield Idle(self._work_failed(e, failures, poll, max_backoff), should_stop)
                continue
            if failures:
                log.warning("gorch: worker: the store answers again")
                failures = 0
            for r in results:
                if on_result is not None:
                    out = on_result(r)
                    if out is not None and inspect.isawaitable(out):
                        yield Awaited(out)
            done += sum(r.outcome == "processed" for r in results)
            if not results:
                yield Idle(poll, should_stop)
        return done

    def _work_failed(self, e: StoreError, failures: int, poll: float, max_backoff: float) -> float:
        """Log a worker's store error (one line) and say how long to wait before polling again."""
        wait: float = random.uniform(0.5, 1.0) * min(max_backoff, poll * 2 ** min(failures, 16))
        log.warning("gorch: worker: store error (%s); retrying in %.1f s", _one_line(e), wait)
        return wait

    # ------------------------------------------------------------------ store access

    # ------------------------------------------------------------------ running the core

    def _drive(
        self,
        cur: _Loaded,
        reason: str = "resume",
        *,
        keep_on_error: bool = True,
        create_first: bool = False,
    ) -> Op[None]:
        """Resume with a save at every checkpoint; apply retry policies to failed steps.

        A failed step (or a hook around it) may have changed the data before
        raising: the data saved with the failure is the data the step started
        from (every earlier change was saved before the step ran).

        ``keep_on_error=False`` leaves a definition problem to the caller
        instead of saving the instance for a later look (``start`` removes
        a record that nothing ran on). ``create_first``: the record does not
        exist yet; it is created right before the first step runs (the first
        checkpoint creates it otherwise).
        """

        def checkpoint(kind: CheckpointKind) -> Op[None]:
            # Setups run right before the final AFTER_RESUME, with no step in
            # between: that save covers them (a crash re-runs setups, which are
            # at-least-once like steps).
            if kind is not CheckpointKind.AFTER_SETUP:
                yield from self._write(cur, driving=True)

        self._recorder.watch(cur.rec.id, cur.history)
        deadline = None if self.run_deadline is None else clock.now() + self.run_deadline
        try:
            create = (lambda: self._create_first(cur)) if create_first else None
            restore = lambda: self._restore_data(cur)  # noqa: E731
            yield Resume(cur, reason, checkpoint, restore, create, deadline)
            if deadline is not None and cur.state.status is WorkflowStatus.RESUMING:
                # The run's deadline passed with steps left: due at once, for run_due
                # (the last checkpoint kept our lease, as if we were still running it).
                log.info("gorch: run of %r reached its deadline; run_due carries on", cur.rec.id)
                yield from self._write(cur, InstanceStatus.RESUMING, _now())
        except StepFailed as e:
            if not isinstance(e, DAGFailed):
                self._restore_data(cur)
            # The core worked the policy out (the step's own, its DAG's or Parallel's,
            # the workflow's default_retry): ``retry_at`` is set while attempts are left.
            if e.retry_at is not None:
                yield from self._write(cur, InstanceStatus.RETRYING, e.retry_at)
                log.info("gorch: step %r of %r failed (%s); retrying", e.step, cur.rec.id, e.error)
                return
            yield from self._write(cur, InstanceStatus.FAILED, False)
            if self.telemetry is not None:
                self.telemetry.record_completed(cur.rec.workflow, "failed")
            # on_failed hooks hear of it once the failure is saved (the core's resumes
            # run with report_failures=False).
            yield ReportFailure(cur.wf, cur.state, e)
            step = find_statement(cur.wf, e.step)
            if getattr(step, "retry", None) is None and type(cur.wf).default_retry is None:
                raise  # no policy: resume and retry tell their caller
            log.warning("gorch: step %r of %r failed for good: %s", e.step, cur.rec.id, e.error)
        except SetupError as e:
            # The final checkpoint saved the state; its wake-up retries the setups.
            log.warning("gorch: %s (workflow %r)", e, cur.rec.id)
        except (Conflict, StoreError):
            raise
        except GorchError as e:
            if not keep_on_error:
                raise
            if isinstance(e, DefinitionError) and dumps(cur.wf, cur.state) == cur.rec.blob:
                # Refused before anything ran (an async workflow under the sync Engine,
                # a definition that does not build): the record stays byte-identical.
                log.error("gorch: resume of %r refused: %s", cur.rec.id, e)
                raise
            # A definition or code-change problem: keep the state, look again later.
            log.error("gorch: resume of %r failed: %s", cur.rec.id, e)
            yield from self._write(cur, InstanceStatus.RESUMING, _now() + self.error_backoff)
            raise
        finally:
            self._recorder.unwatch(cur.rec.id, cur.history)

    # ------------------------------------------------------------------ pure helpers

    def _cls(self, name: str) -> type[Workflow]:
        try:
            return self.workflows[name]
        except KeyError:
            raise UnknownWorkflow(name, list(self.workflows)) from None

    @staticmethod
    def _check_id(id: object) -> str:
        if not isinstance(id, str) or not _ID_RE.fullmatch(id):
            raise InvalidWorkflowId(id)
        return id

    @staticmethod
    def _check_active(cur: _Loaded) -> None:
        status = cur.rec.status
        if status == InstanceStatus.FINISHED:
            raise WorkflowFinishedError(cur.rec.id)
        if status not in ACTIVE_STATUSES:
            raise WorkflowNotActive(cur.rec.id, status)

    def _refuse_timer(
        self, cur: _Loaded, event: str, thread_id: str | None, pc: int | None
    ) -> None:
        """``TimerNotSendable`` if the awaited ``event`` is a ``Timeout`` case."""
        waits = []
        for t in cur.state.threads:
            if t.status is not ThreadStatus.WAITING_EVENT or thread_id not in (None, t.id):
                continue
            for we in t.wait_events:
                if (
                    we.req.name != event
                    or we.status not in ACTIVE_EVENT
                    or pc not in (None, we.req.pc)
                ):
                    continue
                # A Timeout's wait, once set up, holds its due time: a set-up wait without
                # one is no timer, and the definition need not be rebuilt to tell (the
                # common case).
                if we.status is EventStatus.SETUP and not due_time(we.req):
                    return
                waits.append(we)
        if waits and all(_is_timer(cur.wf, we.select, event) for we in waits):
            raise TimerNotSendable(cur.rec.id, event)

    def _rejected(self, cur: _Loaded, event: str, e: GorchError) -> None:
        """Count an event refused before its handler ran (invalid input is counted by it)."""
        if self.telemetry is None or _otel is None:
            return
        outcome = _otel.rejection_outcome(e)
        if outcome is not None and outcome != "invalid":
            self.telemetry.record_event_rejected(cur.rec.workflow, event, outcome)

    @staticmethod
    def _restore_data(cur: _Loaded) -> None:
        """Put back the data last saved (a DAG node's step failed after changing it).

        In place, because step functions are bound to this instance. The last
        save is the data the step started from: it was saved just before the
        step ran.
        """
        if not cur.rec.blob:
            return
        saved = loads(cur.rec.blob, type(cur.wf))[0]
        for name in type(cur.wf).model_fields:
            object.__setattr__(cur.wf, name, getattr(saved, name))

    @staticmethod
    def _snapshot(cur: _Loaded) -> Snapshot:
        return snapshot_of(cur.rec, cur.wf, cur.state)
