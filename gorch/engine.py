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
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, cast
from uuid import uuid4

import pydantic

from gorch import clock
from gorch.codec import dumps, loads
from gorch.errors import (
    Conflict,
    DAGFailed,
    EventNotFound,
    GorchError,
    InvalidWorkflowData,
    InvalidWorkflowId,
    SetupError,
    StaleEvent,
    StepFailed,
    UnknownWorkflow,
    WorkflowExists,
    WorkflowFinishedError,
    WorkflowNotActive,
    WorkflowNotFound,
    summarize_validation,
)
from gorch.handlers import FunctionHandler, Handler, signature_of
from gorch.interpreter import cancel as cancel_state
from gorch.interpreter import find_statement, handle_event
from gorch.interpreter import run as run_state
from gorch.state import ACTIVE_EVENT, CheckpointKind, State, ThreadStatus, WorkflowStatus, new_state
from gorch.statements import On, Select, Timeout
from gorch.stores.base import Record, Store
from gorch.timers import due_events, due_time, next_wakeup
from gorch.workflow import Workflow

try:  # the ``otel`` extra: spans and metrics, no-ops until the application sets up an SDK
    from gorch import otel as _otel
except ImportError:  # pragma: no cover - exercised without the extra
    _otel = None  # type: ignore[assignment]

log = logging.getLogger("gorch")

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")


class InstanceStatus(StrEnum):
    """The status of a stored instance, as ``list`` filters and ``get`` report it."""

    RESUMING = "resuming"
    """Runnable: a resume is pending (deferred, or interrupted by a crash)."""
    WAITING = "waiting"
    """Every thread waits for an event, a timer or a condition."""
    RETRYING = "retrying"
    """A step failed; ``run_due`` retries it when its backoff is over."""
    FAILED = "failed"
    """A step failed for good; ``Engine.retry(id)`` re-arms it."""
    FINISHED = "finished"
    CANCELLED = "cancelled"


_STATUS_OF = {
    WorkflowStatus.RESUMING: InstanceStatus.RESUMING,
    WorkflowStatus.WAITING: InstanceStatus.WAITING,
    WorkflowStatus.FINISHED: InstanceStatus.FINISHED,
}
_ACTIVE = frozenset({InstanceStatus.RESUMING, InstanceStatus.WAITING, InstanceStatus.RETRYING})


class EventInfo(pydantic.BaseModel):
    """An event the instance awaits."""

    name: str
    thread_id: str
    pc: int
    status: str
    due: datetime | None = None
    """For timers: when ``run_due`` fires it."""
    input_schema: dict[str, Any] | None = None
    """JSON schema of the input the event's handler validates (``{}``: any JSON).

    None when the event takes no input (a timer, a case without handler, a
    zero-argument handler) or its case cannot be found in the current definition.
    """


class ThreadInfo(pydantic.BaseModel):
    id: str
    name: str
    status: str
    cur_step: str
    error: str = ""
    attempts: int = 0
    parent: str = ""
    """For a Parallel branch or a DAG node: the thread that joins it."""
    nodes: dict[str, str] = {}
    """While the thread runs a DAG: completed / failed / skipped nodes, by name."""
    node_errors: dict[str, str] = {}


class Snapshot(pydantic.BaseModel):
    """What ``Engine.get`` tells about an instance."""

    id: str
    workflow: str
    status: InstanceStatus
    version: int
    data: dict[str, Any]
    threads: list[ThreadInfo]
    awaited: list[EventInfo]
    next_wakeup: datetime | None
    error: str = ""
    """The last step error, if a thread sits on a failed step."""


class Summary(pydantic.BaseModel):
    id: str
    workflow: str
    status: str
    version: int
    wake_at: datetime | None


class ListPage(pydantic.BaseModel):
    items: list[Summary]
    next_cursor: str | None
    """Pass as ``after=`` for the next page; None on the last page."""


class DueResult(pydantic.BaseModel):
    """What ``run_due`` did with one claimed instance."""

    id: str
    action: str
    """``timer`` (fired timers), ``retry`` (a failed step), ``resume`` (pending resume)."""
    fired: list[str] = []
    status: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class EventTypes:
    """What a Select case's handler takes and returns, read from its annotations.

    Shared by snapshots (the awaited events' input schemas) and the HTTP app
    (one documented operation per event), so both describe an event alike.
    """

    takes_input: bool
    input_type: Any
    """The annotation the input is validated against; ``Any`` when unvalidated."""
    output_type: Any
    """The declared output; ``Any`` when not declared."""

    @property
    def typed(self) -> bool:
        """Whether pydantic validates the input (so JSON text may be passed as bytes)."""
        return self.takes_input and self.input_type is not Any


_NO_INPUT = EventTypes(False, None, type(None))


def event_types(case: On | Timeout) -> EventTypes:
    """The input and output types of ``case``'s handler (``DefinitionError`` if unreadable)."""
    if isinstance(case, Timeout):
        return _NO_INPUT
    h = case.handler
    if h is None:
        return _NO_INPUT
    if isinstance(h, Handler) and not isinstance(h, FunctionHandler):
        out = Any if h.output_type is None else h.output_type
        return EventTypes(True, Any if h.input_type is None else h.input_type, out)
    sig = h.sig if isinstance(h, FunctionHandler) else signature_of(h)
    out = Any if sig.output_type is None else sig.output_type
    if not sig.takes_input:
        return EventTypes(False, None, out)
    return EventTypes(True, Any if sig.input is None else sig.input.type, out)


_schemas: dict[Any, bytes | None] = {}


def json_schema_of(tp: Any) -> dict[str, Any] | None:
    """pydantic's JSON schema for ``tp`` (cached per type); None if it has none.

    Cached as JSON text: every caller gets its own copy, which decoding makes
    several times faster than a deep copy.
    """
    try:
        text = _schemas[tp]
    except KeyError:
        schema = _make_schema(tp)
        text = _schemas[tp] = None if schema is None else json.dumps(schema).encode()
    except TypeError:  # unhashable annotation
        return _make_schema(tp)
    return None if text is None else cast("dict[str, Any]", json.loads(text))


def _make_schema(tp: Any) -> dict[str, Any] | None:
    try:
        return pydantic.TypeAdapter(tp).json_schema()
    except Exception:  # not representable as JSON schema, or not a type pydantic knows
        log.debug("gorch: no JSON schema for %r", tp, exc_info=True)
        return None


@dataclass(slots=True)
class _Loaded:
    rec: Record
    wf: Workflow
    state: State
    lease_until: datetime | None = None
    """Set when run_due claimed the record: our claim lasts until then."""


def _seconds(v: timedelta | float) -> timedelta:
    return v if isinstance(v, timedelta) else timedelta(seconds=v)


def _now() -> datetime:
    return clock.now()


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


class Engine:
    """Runs registered workflow classes against a store.

    ``store`` is a :class:`gorch.stores.Store` or a URL (``sqlite:///gorch.db``,
    ``postgresql://...``, ``redis://...``, ``memory://``). With
    ``defer_resume=True``, ``send`` only applies the event and leaves the resume
    to ``run_due`` (a worker), keeping webhook requests short.
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
    ) -> None:
        if isinstance(store, str):
            from gorch.stores import open_store

            store = open_store(store)
        self.store: Store = store
        self.workflows = dict(workflows)
        for name, cls in self.workflows.items():
            if not (isinstance(cls, type) and issubclass(cls, Workflow)):
                raise TypeError(f"workflow {name!r} must be a gorch.Workflow subclass, got {cls!r}")
        self.defer_resume = defer_resume
        self.lease = _seconds(lease)
        self.conflict_retries = conflict_retries
        self.error_backoff = _seconds(error_backoff)
        self.telemetry = None
        if _otel is not None:  # OpenTelemetry first (outermost), unless passed explicitly
            self.telemetry, middleware = _otel.with_telemetry(middleware)
        #: Wraps every resume, step and handler call (see :mod:`gorch.hooks`).
        self.middleware: tuple[object, ...] = tuple(middleware)

    # ------------------------------------------------------------------ public API

    def start(
        self, name: str, id: str | None = None, data: Mapping[str, Any] | Workflow | None = None
    ) -> Snapshot:
        """Create an instance, run it until it blocks (unless deferred), return its snapshot."""
        cls = self._cls(name)
        wf = initial_data(name, cls, data)
        wid = uuid4().hex if id is None else self._check_id(id)
        state = new_state(wid, name)
        if self.defer_resume:  # stored at once; run_due resumes it
            rec = self.store.create(wid, name, InstanceStatus.RESUMING, dumps(wf, state), _now())
            return self._snapshot(_Loaded(rec, wf, state))
        # Inline: the record is created by the first save of the resume (usually
        # the final one), saving a write. A read refuses a taken id up front;
        # a start racing for the same id loses at that create.
        with contextlib.suppress(WorkflowNotFound):
            self.store.load(wid)
            raise WorkflowExists(wid)
        blob = dumps(wf, state)  # not stored yet: what a failed first step reverts to
        cur = _Loaded(Record(wid, name, InstanceStatus.RESUMING, blob, 0, None), wf, state)
        try:
            self._drive(cur, "start")
        except Conflict:  # a worker took over (our lease ran out): report what it saved
            return self.get(wid)
        return self._snapshot(cur)

    def send(
        self,
        id: str,
        event: str,
        input: Any = None,
        *,
        thread_id: str | None = None,
        pc: int | None = None,
    ) -> Any:
        """Deliver an event and return the handler's output.

        The event is applied to the latest version exactly once (a lost
        compare-and-swap re-applies it to the new version); then the instance
        is resumed, inline or by a worker. A step failing in that resume does
        not make ``send`` fail: the event was delivered, and the instance shows
        the failure (``failed``, or ``retrying`` under a retry policy).
        """
        for _ in self._attempts(id):
            cur = self._load(id)
            try:
                self._check_active(cur)
                out = handle_event(
                    cur.wf,
                    cur.state,
                    event,
                    input,
                    thread_id=thread_id,
                    pc=pc,
                    middleware=self.middleware,
                )
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
                    continue  # leased: the next attempt reloads after a short sleep
                with contextlib.suppress(Conflict):
                    self._drive(cur)
                continue
            except GorchError as e:
                self._rejected(cur, event, e)
                raise
            try:
                self._write(cur, driving=not self.defer_resume)
            except Conflict:
                continue
            if not self.defer_resume:
                try:
                    self._drive(cur, "event")
                except Conflict:
                    log.debug("gorch: resume of %r after %r left to a later writer", id, event)
                except StepFailed as e:
                    # The event is delivered and saved: its sender did its part. The
                    # failure is the instance's (status failed, ``get`` shows the error).
                    log.warning("gorch: %s (workflow %r, after event %r)", e, id, event)
            return out
        raise AssertionError("unreachable")

    def resume(self, id: str) -> Snapshot:
        """Run a pending (or failed) instance until it blocks; return its snapshot."""
        for _ in self._attempts(id):
            cur = self._load(id)
            status = InstanceStatus(cur.rec.status)
            if status is InstanceStatus.FINISHED:
                raise WorkflowFinishedError(id)
            if status is InstanceStatus.CANCELLED:
                raise WorkflowNotActive(id, status)
            try:
                self._drive(cur)
            except Conflict:
                continue
            return self._snapshot(cur)
        raise AssertionError("unreachable")

    def retry(self, id: str) -> Snapshot:
        """Re-arm a failed instance: reset attempt counts and resume it now."""
        for _ in self._attempts(id):
            cur = self._load(id)
            if cur.rec.status not in (InstanceStatus.FAILED, InstanceStatus.RETRYING):
                raise WorkflowNotActive(id, cur.rec.status)
            for t in cur.state.threads:
                t.attempts = 0
            try:
                self._write(cur, InstanceStatus.RESUMING)
                self._drive(cur, "retry")
            except Conflict:
                continue
            return self._snapshot(cur)
        raise AssertionError("unreachable")

    def get(self, id: str) -> Snapshot:
        """The instance's data, status, threads, awaited events and next wake-up."""
        return self._snapshot(self._load(id))

    def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> ListPage:
        """Instances in id order, filtered by workflow name and status."""
        page = self.store.list(workflow=workflow, status=status, limit=limit, after=after)
        items = [
            Summary(
                id=r.id, workflow=r.workflow, status=r.status, version=r.version, wake_at=r.wake_at
            )
            for r in page.records
        ]
        return ListPage(items=items, next_cursor=page.next_cursor)

    def cancel(self, id: str) -> Snapshot:
        """Tear down the awaited events and mark the instance cancelled."""
        for _ in self._attempts(id):
            cur = self._load(id)
            status = cur.rec.status
            if status in (InstanceStatus.FINISHED, InstanceStatus.CANCELLED):
                raise WorkflowNotActive(id, status)
            cancel_state(cur.wf, cur.state)
            try:
                self._write(cur, InstanceStatus.CANCELLED)
            except Conflict:
                continue
            if self.telemetry is not None:
                self.telemetry.record_completed(cur.rec.workflow, "cancelled")
            return self._snapshot(cur)
        raise AssertionError("unreachable")

    def run_due(
        self,
        now: datetime | None = None,
        limit: int = 100,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> builtins.list[DueResult]:
        """Fire due timers, retry failed steps whose backoff is over, finish pending resumes.

        Call it from cron, a queue consumer or :meth:`work`. Records are claimed
        with a lease, so concurrent callers never process the same one.
        """
        now = _now() if now is None else (now if now.tzinfo else now.replace(tzinfo=UTC))
        results: builtins.list[DueResult] = []
        with contextlib.ExitStack() as stack:
            due = stack.enter_context(self.telemetry.run_due_span()) if self.telemetry else None
            for rec in self.store.claim_due(now, limit, self.lease):
                if should_stop is not None and should_stop():
                    break  # the rest stays claimed until its lease runs out
                results.append(self._process_due(rec, now, due))
        return results

    def work(
        self,
        *,
        poll: float = 1.0,
        batch: int = 10,
        should_stop: Callable[[], bool] = lambda: False,
        on_result: Callable[[DueResult], None] | None = None,
    ) -> int:
        """Loop on :meth:`run_due` until ``should_stop()``; return how many were processed.

        ``should_stop`` is checked between instances, so a stop request never
        leaves one half-saved.
        """
        done = 0
        while not should_stop():
            results = self.run_due(limit=batch, should_stop=should_stop)
            for r in results:
                if on_result is not None:
                    on_result(r)
            done += len(results)
            if not results:
                deadline = time.monotonic() + poll
                while not should_stop() and time.monotonic() < deadline:
                    time.sleep(min(0.05, poll))
        return done

    # ------------------------------------------------------------------ internals

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

    def _attempts(self, id: str) -> Iterator[int]:
        """Yield attempt numbers; sleep a little, with jitter, between them."""
        for n in range(self.conflict_retries):
            if n:
                time.sleep(random.uniform(0, min(0.05, 0.0005 * 2**n)))
            yield n
        raise Conflict(id, -1, None)

    def _load(self, id: str) -> _Loaded:
        rec = self.store.load(self._check_id(id))
        wf, state = loads(rec.blob, self._cls(rec.workflow))
        return _Loaded(rec, wf, state)

    @staticmethod
    def _check_active(cur: _Loaded) -> None:
        status = cur.rec.status
        if status == InstanceStatus.FINISHED:
            raise WorkflowFinishedError(cur.rec.id)
        if status not in _ACTIVE:
            raise WorkflowNotActive(cur.rec.id, status)

    def _write(
        self,
        cur: _Loaded,
        status: InstanceStatus | None = None,
        wake: datetime | bool | None = True,
        *,
        driving: bool = False,
    ) -> None:
        """Compare-and-swap the instance; ``wake=True`` derives the wake-up from the state.

        ``driving``: this process is running the instance now, so a pending
        resume is due only when our lease runs out (if we crash), not at once.
        """
        state = cur.state
        if status is None:
            status = _STATUS_OF[state.status]
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
        if not rec.version:  # started inline and not stored yet
            cur.rec = self.store.create(rec.id, rec.workflow, status, blob, wake)
            return
        if blob == rec.blob and status == rec.status and wake == rec.wake_at:
            return  # nothing changed: keep the version (an idle resume writes nothing)
        try:
            cur.rec = self.store.save(rec.id, rec.version, status, blob, wake)
        except Conflict:
            if self.telemetry is not None:
                store = type(self.store).__name__.removesuffix("Store").lower()
                self.telemetry.record_conflict(store, rec.workflow)
            raise

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

    def _drive(self, cur: _Loaded, reason: str = "resume") -> None:
        """Resume with a save at every checkpoint; apply retry policies to failed steps.

        A failed step (or a hook around it) may have changed the data before
        raising: the data saved with the failure is the data the step started
        from (every earlier change was saved before the step ran).
        """

        def checkpoint(kind: CheckpointKind) -> None:
            # Setups run right before the final AFTER_RESUME, with no step in
            # between: that save covers them (a crash re-runs setups, which are
            # at-least-once like steps).
            if kind is not CheckpointKind.AFTER_SETUP:
                self._write(cur, driving=True)

        try:
            run_state(
                cur.wf,
                cur.state,
                checkpoint,
                lazy_steps=True,
                middleware=self.middleware,
                reason=reason,
                restore=lambda: self._restore_data(cur),
            )
        except StepFailed as e:
            if not isinstance(e, DAGFailed):
                self._restore_data(cur)
            step = find_statement(cur.wf, e.step)
            policy = getattr(step, "retry", None)
            if policy is not None and not policy.exhausted(e.attempts):
                self._write(cur, InstanceStatus.RETRYING, _now() + policy.delay(e.attempts))
                log.info("gorch: step %r of %r failed (%s); retrying", e.step, cur.rec.id, e.error)
                return
            self._write(cur, InstanceStatus.FAILED, False)
            if self.telemetry is not None:
                self.telemetry.record_completed(cur.rec.workflow, "failed")
            if policy is None:
                raise
            log.warning("gorch: step %r of %r failed for good: %s", e.step, cur.rec.id, e.error)
        except SetupError as e:
            # The final checkpoint saved the state; its wake-up retries the setups.
            log.warning("gorch: %s (workflow %r)", e, cur.rec.id)
        except Conflict:
            raise
        except GorchError as e:
            # A definition or code-change problem: keep the state, look again later.
            log.error("gorch: resume of %r failed: %s", cur.rec.id, e)
            self._write(cur, InstanceStatus.RESUMING, _now() + self.error_backoff)
            raise

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

    def _process_due(self, rec: Record, now: datetime, due: Any = None) -> DueResult:
        action = "resume"
        try:
            wf, state = loads(rec.blob, self._cls(rec.workflow))
            if due is not None:
                due.link(rec.id, state)
            cur = _Loaded(rec, wf, state, lease_until=rec.wake_at)
            if rec.status not in _ACTIVE:  # nothing to do: clear the wake-up
                self._write(cur, InstanceStatus(rec.status), False)
                return DueResult(id=rec.id, action="none", status=rec.status)
            if rec.status == InstanceStatus.RETRYING:
                action = "retry"
            fired: list[str] = []
            if state.status is WorkflowStatus.WAITING:
                for req in due_events(state, now):
                    try:
                        handle_event(
                            wf,
                            state,
                            req.name,
                            thread_id=req.thread_id,
                            pc=req.pc,
                            middleware=self.middleware,
                        )
                    except (StaleEvent, EventNotFound):
                        continue  # an earlier timer of the same wait ended it
                    fired.append(req.name)
                    due_at = due_time(req)
                    if self.telemetry is not None and due_at is not None:
                        lag = (_now() - due_at).total_seconds()
                        self.telemetry.record_timer_lag(rec.workflow, req.name, lag)
                if fired:  # save the firing first: a timer is delivered once
                    action = "timer"
                    self._write(cur, driving=True)
            if state.status is not WorkflowStatus.FINISHED:
                self._drive(cur, "retry" if action == "retry" else "timer" if fired else "resume")
            return DueResult(id=rec.id, action=action, fired=fired, status=cur.rec.status)
        except Exception as e:
            log.exception("gorch: run_due could not process %r", rec.id)
            return DueResult(id=rec.id, action=action, error=f"{type(e).__name__}: {e}")

    def _snapshot(self, cur: _Loaded) -> Snapshot:
        state = cur.state
        threads = [
            ThreadInfo(
                id=t.id,
                name=t.name,
                status=t.status,
                cur_step=t.cur_step,
                error=t.error,
                attempts=t.attempts,
                parent=t.parent,
                nodes=dict(t.nodes),
                node_errors=dict(t.node_errors),
            )
            for t in state.threads
        ]
        selects: dict[str, Select | None] = {}
        awaited = [
            EventInfo(
                name=we.req.name,
                thread_id=t.id,
                pc=we.req.pc,
                status=we.status,
                due=due_time(we.req),
                input_schema=_input_schema(cur.wf, we.select or t.cur_step, we.req.name, selects),
            )
            for t in state.threads
            if t.status is ThreadStatus.WAITING_EVENT
            for we in t.wait_events
            if we.status in ACTIVE_EVENT
        ]
        error = next((t.error for t in state.threads if t.error), "")
        return Snapshot(
            id=cur.rec.id,
            workflow=cur.rec.workflow,
            status=InstanceStatus(cur.rec.status),
            version=cur.rec.version,
            data=cur.wf.model_dump(mode="json"),
            threads=threads,
            awaited=awaited,
            next_wakeup=cur.rec.wake_at if cur.rec.status != InstanceStatus.RESUMING else None,
            error=error,
        )


def _input_schema(
    wf: Workflow, select: str, event: str, selects: dict[str, Select | None]
) -> dict[str, Any] | None:
    """The input schema of ``event`` in Select ``select``; a snapshot never fails over it."""
    if select not in selects:
        try:
            st = find_statement(wf, select)
        except Exception:  # a definition that fails now is reported by resume, not get
            log.debug("gorch: cannot find Select %r for its input schema", select, exc_info=True)
            st = None
        selects[select] = st if isinstance(st, Select) else None
    st = selects[select]
    hit = st.case(event) if st is not None else None
    if hit is None:
        return None
    try:
        types = event_types(hit[1])
    except GorchError:
        return None
    return json_schema_of(types.input_type) if types.takes_input else None
