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
import re
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import uuid4

import pydantic

from gorch import clock
from gorch.check import CheckReport, Progress, check_op
from gorch.codec import dumps, loads
from gorch.errors import (
    Conflict,
    DAGFailed,
    DefinitionError,
    EventNotFound,
    GorchError,
    InvalidWorkflowData,
    InvalidWorkflowId,
    SetupError,
    StaleEvent,
    StepFailed,
    StoreError,
    StoreUnavailable,
    TimerNotSendable,
    UnknownWorkflow,
    WorkflowExists,
    WorkflowFinishedError,
    WorkflowNotActive,
    WorkflowNotFound,
    summarize_validation,
)
from gorch.handlers import discard
from gorch.history import History, HistoryEntry, Recorder, entry, jsonable
from gorch.idempotency import (
    START_KEY,
    check_key,
    check_repeated_start,
    key_id,
    remember_send,
    repeated_send,
    start_digest,
)
from gorch.interpreter import cancel as cancel_state
from gorch.interpreter import find_statement, handle_event
from gorch.interpreter import run as run_state
from gorch.snapshot import (
    ACTIVE_STATUSES,
    STATUS_OF,
    DueResult,
    EventInfo,
    EventTypes,
    InstanceStatus,
    ListPage,
    Snapshot,
    Summary,
    ThreadInfo,
    event_types,
    json_schema_of,
    snapshot_of,
)
from gorch.state import ACTIVE_EVENT, CheckpointKind, State, ThreadStatus, WorkflowStatus, new_state
from gorch.statements import Select, Timeout
from gorch.stores.base import DEFAULT_HISTORY_LIMIT, HistoryLog, Page, Record, Store
from gorch.timers import due_events, due_time, next_wakeup
from gorch.workflow import Workflow

try:  # the ``otel`` extra: spans and metrics, no-ops until the application sets up an SDK
    from gorch import otel as _otel
except ImportError:  # pragma: no cover - exercised without the extra
    _otel = None  # type: ignore[assignment]

__all__ = [
    "DueResult",
    "Engine",
    "EngineCore",
    "EventInfo",
    "EventTypes",
    "InstanceStatus",
    "ListPage",
    "Snapshot",
    "Summary",
    "ThreadInfo",
    "event_types",
    "initial_data",
    "json_schema_of",
    "key_id",
]

log = logging.getLogger("gorch")

_CREATED_BY = "gorch.created"
"""``State.meta`` entry of a just-created record: the creating call's nonce (dropped at the
first save)."""
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")
_T = TypeVar("_T")


# --------------------------------------------------------------------------- requests


@dataclass(slots=True)
class StoreCall:
    """Call ``method(*args)`` on the store and send back what it returns."""

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Pause:
    """Sleep ``seconds`` (time.sleep or asyncio.sleep)."""

    seconds: float


@dataclass(slots=True)
class Idle:
    """A worker's wait between polls: ``seconds``, or less if a stop is requested.

    The sync driver sleeps in short slices and checks ``should_stop``; the async
    driver also wakes at once when its stop event is set.
    """

    seconds: float
    should_stop: Callable[[], bool]


@dataclass(slots=True)
class Awaited:
    """An awaitable from user code the operation waits for (async driver only)."""

    awaitable: Awaitable[Any]


@dataclass(slots=True)
class Resume:
    """Run the core on ``cur`` until every thread blocks, calling ``checkpoint`` as it goes.

    ``checkpoint(kind)`` is itself an operation (it saves), run by the same driver.
    """

    cur: _Loaded
    reason: str
    checkpoint: Callable[[CheckpointKind], Op[None]]
    restore: Callable[[], None]


@dataclass(slots=True)
class HandleEvent:
    """Run the handler of ``event`` on ``wf``/``state``; send back its output."""

    wf: Workflow
    state: State
    event: str
    input: Any
    thread_id: str | None
    pc: int | None
    now: datetime | None = None
    """For a timer: the time it is fired at (``run_due``'s ``now``); None for the clock."""


@dataclass(slots=True)
class Cancel:
    """Tear down ``state``'s awaited events and end its threads."""

    wf: Workflow
    state: State


Request = StoreCall | Pause | Idle | Awaited | Resume | HandleEvent | Cancel
Op = Generator[Request, Any, _T]
"""An engine operation: yields requests, gets their results sent back, returns ``_T``."""


@dataclass(slots=True)
class _Loaded:
    rec: Record
    wf: Workflow
    state: State
    lease_until: datetime | None = None
    """Set when run_due claimed the record: our claim lasts until then."""
    history: builtins.list[HistoryEntry] = field(default_factory=builtins.list)
    """Entries that go to the store with the next save (then cleared)."""


def _seconds(v: timedelta | float) -> timedelta:
    return v if isinstance(v, timedelta) else timedelta(seconds=v)


def _now() -> datetime:
    return clock.now()


def _backoff(n: int, base: float = 0.05, cap: float = 2.0) -> float:
    """The pause before retry ``n + 1``: capped exponential backoff with full jitter."""
    return random.uniform(0, min(cap, base * 2**n))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def initial_data(
    name: str, cls: type[Workflow], data: Mapping[str, Any] | Workflow | str | bytes | None
) -> Workflow:
    """A new instance of workflow ``name`` from a dict, JSON, or an instance (as is)."""
    if isinstance(data, cls):
        return data
    try:
        if isinstance(data, (bytes, str)):
            return cls.model_validate_json(data)
        return cls.model_validate(dict(data or {}))
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False, include_context=False)
        raise InvalidWorkflowData(name, summarize_validation(errors), errors) from e
    except (TypeError, ValueError) as e:
        raise InvalidWorkflowData(name, str(e)) from e


# --------------------------------------------------------------------------- the rules


class EngineCore:
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

    # ------------------------------------------------------------------ operations

    def _start(
        self,
        name: str,
        id: str | None,
        data: Mapping[str, Any] | Workflow | None,
        key: str | None,
        by: str | None = None,
    ) -> Op[Snapshot]:
        cls = self._cls(name)
        wf = initial_data(name, cls, data)
        started = entry("started", name=name, by=by, input=wf.model_dump(mode="json"))
        if id is not None:
            wid = self._check_id(id)
        elif key is not None:
            wid = key_id(name, key)
        else:
            wid = _new_id()
        state = new_state(wid, name)
        # Makes this call's first blob unique: if the create's reply is lost, reading the
        # record back tells our create from a concurrent start's (same id, same data).
        state.meta[_CREATED_BY] = uuid4().hex
        digest = ""
        if key is not None:
            digest = start_digest(key, wf)
            state.meta[START_KEY] = digest
        blob = dumps(wf, state)
        # Inline, the record is leased to this call while it runs the first steps;
        # deferred, it is due at once for run_due.
        wake = _now() if self.defer_resume else _now() + self.lease
        try:
            rec = yield from self._put(
                Record(wid, name, InstanceStatus.RESUMING, b"", 0, None),
                blob,
                wake,
                self._annex([started], state),
            )
        except WorkflowExists:
            if key is None:
                raise
            cur = yield from self._load(wid)
            check_repeated_start(wid, key, cur.state.meta.get(START_KEY), digest)
            return self._snapshot(cur)
        cur = _Loaded(rec, wf, state, lease_until=None if self.defer_resume else wake)
        if self.defer_resume:
            return self._snapshot(cur)
        try:
            yield from self._drive(cur, "start", keep_on_error=False)
        except StepFailed:
            pass  # saved as failed: the snapshot shows it
        except Conflict:  # a worker took over (our lease ran out): report what it saved
            log.warning("gorch: start of %r: another runner took it over", wid)
            return (yield from self._last_saved(cur.rec))
        except StoreError as e:
            log.warning("gorch: start of %r: %s; run_due carries on", wid, _one_line(e))
            return (yield from self._last_saved(cur.rec))
        except GorchError as e:
            if cur.rec.version == rec.version:  # nothing ran and nothing else was saved
                yield from self._discard(cur.rec)
                raise
            log.error("gorch: start of %r: %s", wid, e)
            with contextlib.suppress(GorchError):
                yield from self._write(cur, InstanceStatus.RESUMING, _now() + self.error_backoff)
            return (yield from self._last_saved(cur.rec))
        return self._snapshot(cur)

    def _send(
        self,
        id: str,
        event: str,
        input: Any,
        thread_id: str | None,
        pc: int | None,
        key: str | None,
    ) -> Op[Any]:
        if key is not None:
            check_key(key)
        for n in range(self.conflict_retries):
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
                delivered = self._event_entry(cur, event, input, None, thread_id, pc)
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
            delivered.output = jsonable(out)
            cur.history.append(delivered)
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

    def _retry(self, id: str) -> Op[Snapshot]:
        for n in range(self.conflict_retries):
            yield from self._conflict_pause(n)
            cur = yield from self._load(id)
            if cur.rec.status not in (InstanceStatus.FAILED, InstanceStatus.RETRYING):
                raise WorkflowNotActive(id, cur.rec.status)
            for t in cur.state.threads:
                t.attempts = 0
            cur.history.append(entry("retried"))
            try:
                yield from self._write(cur, InstanceStatus.RESUMING)
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

    def _cancel(self, id: str) -> Op[Snapshot]:
        for n in range(self.conflict_retries):
            yield from self._conflict_pause(n)
            cur = yield from self._load(id)
            status = cur.rec.status
            if status in (InstanceStatus.FINISHED, InstanceStatus.CANCELLED):
                raise WorkflowNotActive(id, status)
            yield Cancel(cur.wf, cur.state)
            cur.history.append(entry("cancelled"))
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
        fixed = None if now is None else (now if now.tzinfo else now.replace(tzinfo=UTC))
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
                if not claimed or claimed[0].id in seen:
                    break  # nothing due (or only what this call already ran, due again)
                seen.add(claimed[0].id)
                results.append((yield from self._process_due(claimed[0], at, due)))
        return results

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
            log.info("gorch: run_due: %r was taken over by another runner", rec.id)
            return DueResult(id=rec.id, action=action, outcome="skipped")
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

    def _load(self, id: str) -> Op[_Loaded]:
        rec: Record = yield from self._read("load", (self._check_id(id),))
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
        blob: bytes,
        wake: datetime | None,
        annex: dict[str, Any] | None = None,
    ) -> Op[Record]:
        """Create (``rec.version == 0``) or compare-and-swap ``rec`` with ``blob`` and ``wake``.

        A write that fails with ``StoreUnavailable`` may still have committed (the
        connection dropped after the statement reached the server). The record is
        read back: if it holds our blob, the write happened and its record is
        returned; if it is unchanged, the write is tried again; if another writer
        changed it, ``Conflict`` (or ``WorkflowExists`` for a create). Only when
        the store stays unavailable is ``StoreUnavailable`` raised, and then the
        outcome is unknown to the caller.
        """
        status = rec.status
        for n in range(self.store_retries + 1):
            try:
                saved: Record
                if not rec.version:
                    saved = yield StoreCall(
                        "create", (rec.id, rec.workflow, status, blob, wake), annex or {}
                    )
                else:
                    saved = yield StoreCall(
                        "save", (rec.id, rec.version, status, blob, wake), annex or {}
                    )
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
        state.meta.pop(_CREATED_BY, None)  # only the created record needs it
        if status is None:
            status = STATUS_OF[state.status]
        if wake is True:
            wake = self._wake(state, status, driving)
            if (
                driving
                and status is InstanceStatus.RESUMING
                and cur.lease_until is not None
                and wake is not None
            ):  # keep run_due's claim while we run it, not a timer set up meanwhile
                wake = max(wake, cur.lease_until)
            elif (
                status is InstanceStatus.RESUMING
                and cur.rec.status == InstanceStatus.RESUMING
                and cur.rec.wake_at is not None
                and wake is not None
            ):  # another process may be running it: keep its lease
                wake = max(wake, cur.rec.wake_at)
        elif wake is False:
            wake = None
        blob = dumps(cur.wf, state)
        rec = cur.rec
        if status != rec.status and status in (InstanceStatus.FINISHED, InstanceStatus.FAILED):
            error = next((t.error for t in state.threads if t.error), "")
            ended = entry("finished" if status is InstanceStatus.FINISHED else "failed")
            if status is InstanceStatus.FAILED and error:
                ended.error = error
            if not any(e.kind == ended.kind for e in cur.history):
                cur.history.append(ended)
        if blob == rec.blob and status == rec.status and wake == rec.wake_at and not cur.history:
            return  # nothing changed: keep the version (an idle resume writes nothing)
        try:
            cur.rec = yield from self._put(
                Record(rec.id, rec.workflow, status, rec.blob, rec.version, rec.wake_at),
                blob,
                wake,
                self._annex(cur.history, state),
            )
            cur.history.clear()
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

    # ------------------------------------------------------------------ running the core

    def _drive(
        self, cur: _Loaded, reason: str = "resume", *, keep_on_error: bool = True
    ) -> Op[None]:
        """Resume with a save at every checkpoint; apply retry policies to failed steps.

        A failed step (or a hook around it) may have changed the data before
        raising: the data saved with the failure is the data the step started
        from (every earlier change was saved before the step ran).

        ``keep_on_error=False`` leaves a definition problem to the caller
        instead of saving the instance for a later look (``start`` removes
        a record that nothing ran on).
        """

        def checkpoint(kind: CheckpointKind) -> Op[None]:
            # Setups run right before the final AFTER_RESUME, with no step in
            # between: that save covers them (a crash re-runs setups, which are
            # at-least-once like steps).
            if kind is not CheckpointKind.AFTER_SETUP:
                yield from self._write(cur, driving=True)

        self._recorder.watch(cur.rec.id, cur.history)
        try:
            yield Resume(cur, reason, checkpoint, lambda: self._restore_data(cur))
        except StepFailed as e:
            if not isinstance(e, DAGFailed):
                self._restore_data(cur)
            step = find_statement(cur.wf, e.step)
            policy = getattr(step, "retry", None)
            if policy is not None and not policy.exhausted(e.attempts):
                yield from self._write(
                    cur, InstanceStatus.RETRYING, _now() + policy.delay(e.attempts)
                )
                log.info("gorch: step %r of %r failed (%s); retrying", e.step, cur.rec.id, e.error)
                return
            yield from self._write(cur, InstanceStatus.FAILED, False)
            if self.telemetry is not None:
                self.telemetry.record_completed(cur.rec.workflow, "failed")
            if policy is None:
                raise
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

    # ------------------------------------------------------------------ history and retention

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
        if self._keeps_history:
            self.middleware = (*self.middleware, self._recorder)  # innermost: times the step

    def _annex(self, entries: builtins.list[HistoryEntry], state: State) -> dict[str, Any]:
        """What a create or save writes next to the blob: history entries and cursor names."""
        if not self._keeps_history:
            return {}
        return {
            "history": [e.model_dump_json(exclude_none=True) for e in entries],
            "history_limit": self.history_limit,
            "cursors": [t.cur_step for t in state.threads if t.cur_step],
        }

    def _history(self, id: str) -> Op[History]:
        log: HistoryLog = yield from self._read("history", (self._check_id(id),))
        return History([HistoryEntry.model_validate_json(e) for e in log.entries], log.dropped)

    def _purge(self, before: datetime, statuses: Sequence[str], batch: int) -> Op[int]:
        """Delete in batches of ``batch``, each its own short write; the number deleted."""
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
        cur: _Loaded, event: str, input: Any, out: Any, thread_id: str | None, pc: int | None
    ) -> HistoryEntry:
        """The entry of a delivered event, at the wait it was delivered to."""
        for t in cur.state.threads:
            if t.status is not ThreadStatus.WAITING_EVENT or thread_id not in (None, t.id):
                continue
            for we in t.wait_events:
                if we.req.name == event and we.status in ACTIVE_EVENT and pc in (None, we.req.pc):
                    thread_id, pc = t.id, we.req.pc
                    break
        return entry("event", name=event, input=input, output=out, thread_id=thread_id, pc=pc)

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
        waits = [
            we
            for t in cur.state.threads
            if t.status is ThreadStatus.WAITING_EVENT and (thread_id is None or t.id == thread_id)
            for we in t.wait_events
            if we.req.name == event
            and we.status in ACTIVE_EVENT
            and (pc is None or we.req.pc == pc)
        ]
        if waits and all(_is_timer(cur.wf, we.select, event) for we in waits):
            raise TimerNotSendable(cur.rec.id, event)

    def _wake(self, state: State, status: InstanceStatus, driving: bool) -> datetime | None:
        if status is InstanceStatus.RESUMING:
            return _now() + self.lease if driving else _now()
        if status is not InstanceStatus.WAITING:
            return None
        wake = next_wakeup(state)
        setup_failed = any(
            we.status == "setup_error"
            for t in state.threads
            for we in t.wait_events
            if we.status in ACTIVE_EVENT
        )
        if setup_failed:  # setups are retried on the next resume
            retry_at = _now() + self.error_backoff
            wake = retry_at if wake is None else min(wake, retry_at)
        return wake

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


def _is_timer(wf: Workflow, select: str, event: str) -> bool:
    try:
        st = find_statement(wf, select)
    except GorchError:
        return False
    hit = st.case(event) if isinstance(st, Select) else None
    return hit is not None and isinstance(hit[1], Timeout)


def _new_id() -> str:
    return uuid4().hex


RETAINED_STATUSES = (InstanceStatus.FINISHED.value, InstanceStatus.CANCELLED.value)
"""What ``Engine.purge`` (and the ``retention`` policy) removes unless told otherwise."""


def _takes_history(store: object) -> bool:
    """Whether ``store.save`` accepts the history and cursors of this version."""
    try:
        params = inspect.signature(store.save).parameters  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return False
    return "history" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# --------------------------------------------------------------------------- the sync driver


class Engine(EngineCore):
    """Runs registered workflow classes against a store.

    ``store`` is a :class:`gorch.stores.Store` or a URL (``sqlite:///gorch.db``,
    ``postgresql://...``, ``redis://...``, ``memory://``). With
    ``defer_resume=True``, ``send`` only applies the event and leaves the resume
    to ``run_due`` (a worker), keeping webhook requests short.

    A store that fails (a dropped connection, a lock held too long) is retried
    ``store_retries`` times with backoff; a write whose outcome is unknown (the
    connection dropped after the statement was sent) is settled by reading
    the record back, so a committed write is never reported as failed.
    """

    def __init__(
        self,
        store: Store | str,
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
    ) -> None:
        if isinstance(store, str):
            from gorch.stores import open_store

            store = open_store(store)
        self.store: Store = store
        super().__init__(
            workflows,
            defer_resume=defer_resume,
            lease=lease,
            conflict_retries=conflict_retries,
            error_backoff=error_backoff,
            middleware=middleware,
            store_retries=store_retries,
            idempotency_keys=idempotency_keys,
            history_limit=history_limit,
            retention=retention,
            retention_every=retention_every,
        )

    # ------------------------------------------------------------------ public API

    def start(
        self,
        name: str,
        id: str | None = None,
        data: Mapping[str, Any] | Workflow | None = None,
        *,
        key: str | None = None,
        by: str | None = None,
    ) -> Snapshot:
        """Create an instance, run it until it blocks (unless deferred), return its snapshot.

        Atomic: ``start`` raises only if no record was created. The record is
        created first, with a lease, so that a concurrent start of the same id
        fails with ``WorkflowExists`` before any step runs; once it exists,
        whatever happens in the first resume (a step failing, the store
        dropping) is the instance's, and ``start`` returns its snapshot (status
        ``failed``, or ``resuming`` for ``run_due`` to carry on).

        ``key`` makes a retried start apply nothing twice: without ``id``, the
        id is derived from ``name`` and ``key``; a repeat with the same key
        returns the existing instance's snapshot, and the same key with other
        data raises ``IdempotencyKeyReused``.

        ``by`` (a user, a service) is written to the ``started`` entry of the
        instance's history.
        """
        return self._run(self._start(name, id, data, key, by))

    def send(
        self,
        id: str,
        event: str,
        input: Any = None,
        *,
        thread_id: str | None = None,
        pc: int | None = None,
        key: str | None = None,
    ) -> Any:
        """Deliver an event and return the handler's output.

        The event is applied to the latest version exactly once (a lost
        compare-and-swap re-applies it to the new version). Once the event's
        save has committed, ``send`` returns the output whatever happens next:
        a step failing in the resume that follows, the store failing, another
        runner taking over. The instance carries the outcome (``get`` shows
        it) and, if the resume could not finish, ``run_due`` carries on when
        the lease of this call runs out.

        ``key`` (an idempotency key) makes a retried send apply nothing twice:
        a repeated key returns the first output (as JSON-decoded data) and
        leaves the instance alone; the same key with another event or input
        raises ``IdempotencyKeyReused``. The last ``idempotency_keys`` keys of
        each instance are kept in its record.

        A ``Timeout`` case's name is refused with ``TimerNotSendable``: timers
        fire when due, through ``run_due``.
        """
        return self._run(self._send(id, event, input, thread_id, pc, key))

    def resume(self, id: str) -> Snapshot:
        """Run a pending (or failed) instance until it blocks; return its snapshot."""
        return self._run(self._resume(id))

    def retry(self, id: str) -> Snapshot:
        """Re-arm a failed instance: reset attempt counts and resume it now."""
        return self._run(self._retry(id))

    def get(self, id: str) -> Snapshot:
        """The instance's data, status, threads, awaited events and next wake-up."""
        return self._run(self._get(id))

    def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> ListPage:
        """Instances in id order, filtered by workflow name and status."""
        return self._run(self._list(workflow, status, limit, after))

    def cancel(self, id: str) -> Snapshot:
        """Tear down the awaited events and mark the instance cancelled."""
        return self._run(self._cancel(id))

    def history(self, id: str) -> History:
        """What happened to the instance, oldest first (``.dropped``: older entries cut off).

        Each save writes its entries in the same write as the state, so the
        history never tells of a step, event or timer the state does not
        reflect. At most ``history_limit`` entries are kept per instance.
        """
        return self._run(self._history(id))

    def purge(
        self,
        *,
        finished_before: datetime,
        statuses: Sequence[str] = RETAINED_STATUSES,
        batch: int = 500,
    ) -> int:
        """Delete instances in ``statuses`` not updated since ``finished_before``; how many.

        Runs in batches of ``batch``, each its own short write (no table lock),
        and a record is deleted only if it still matches at that moment, so an
        instance that a concurrent call just moved (a retry of a failed one)
        stays. Their history goes with them.
        """
        return self._run(self._purge(finished_before, statuses, batch))

    def check(self, *, page_size: int = 100, progress: Progress | None = None) -> CheckReport:
        """Which in-flight instances the current code would strand (see :mod:`gorch.check`)."""
        return self._run(check_op(self, page_size, progress))

    def run_due(
        self,
        now: datetime | None = None,
        limit: int | None = 100,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> builtins.list[DueResult]:
        """Fire due timers, retry failed steps whose backoff is over, finish pending resumes.

        Call it from cron, a queue consumer or :meth:`work`. Each instance is
        claimed with a lease just before it runs (never a batch at once, so a
        slow step cannot make the lease of instances still waiting run out), and
        concurrent callers never process the same one. ``limit=None`` drains
        everything due (each instance at most once per call).

        Every claimed instance gets a :class:`DueResult` whose ``outcome`` says
        what happened: ``processed``, ``skipped`` (another runner took it over)
        or ``failed`` (``error`` says why; the instance is left for a later
        call). A store error while claiming is tried again with backoff; if the
        store stays unavailable, ``StoreUnavailable`` is raised when nothing was
        processed yet, else the results so far are returned (and the error logged).
        """
        return self._run(self._run_due(now, limit, should_stop))

    def work(
        self,
        *,
        poll: float = 1.0,
        batch: int = 10,
        should_stop: Callable[[], bool] = lambda: False,
        on_result: Callable[[DueResult], None] | None = None,
        max_backoff: float = 30.0,
    ) -> int:
        """Loop on :meth:`run_due` until ``should_stop()``; return how many were processed.

        ``should_stop`` is checked between instances, so a stop request never
        leaves one half-saved. A store that fails does not end the loop: the
        error is logged (one line) and polling goes on with capped exponential
        backoff and jitter (up to ``max_backoff`` seconds) until the store answers.
        """
        return self._run(self._work(poll, batch, should_stop, on_result, max_backoff))

    @staticmethod
    def _pause(seconds: float, should_stop: Callable[[], bool]) -> None:
        """Sleep ``seconds``, waking early when asked to stop."""
        deadline = time.monotonic() + seconds
        while not should_stop() and time.monotonic() < deadline:
            time.sleep(min(0.05, seconds))

    # ------------------------------------------------------------------ the driver

    def _run(self, op: Op[_T]) -> _T:
        """Perform ``op``'s requests with blocking calls until it returns."""
        result: Any = None
        error: Exception | None = None
        while True:
            try:
                request = op.send(result) if error is None else op.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            result, error = None, None
            try:
                result = self._perform(request)
            except Exception as e:
                error = e

    def _perform(self, request: Request) -> Any:
        if isinstance(request, StoreCall):
            return getattr(self.store, request.method)(*request.args, **request.kwargs)
        if isinstance(request, Resume):
            cur = request.cur
            run_state(
                cur.wf,
                cur.state,
                lambda kind: self._run(request.checkpoint(kind)),
                lazy_steps=True,
                middleware=self.middleware,
                reason=request.reason,
                restore=request.restore,
            )
            return None
        if isinstance(request, HandleEvent):
            return handle_event(
                request.wf,
                request.state,
                request.event,
                request.input,
                thread_id=request.thread_id,
                pc=request.pc,
                middleware=self.middleware,
                now=request.now,
            )
        if isinstance(request, Pause):
            time.sleep(request.seconds)
            return None
        if isinstance(request, Idle):
            self._pause(request.seconds, request.should_stop)
            return None
        if isinstance(request, Awaited):
            discard(request.awaitable)
            raise TypeError(
                "a callback of Engine returned an awaitable: use gorch.AsyncEngine "
                "for async callbacks"
            )
        if isinstance(request, Cancel):
            cancel_state(request.wf, request.state)
            return None
        raise TypeError(f"unknown engine request {request!r}")
