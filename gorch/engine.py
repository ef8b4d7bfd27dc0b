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
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar, cast
from uuid import UUID, uuid4, uuid5

import pydantic
import pydantic_core

from gorch import clock
from gorch.codec import dumps, loads
from gorch.errors import (
    Conflict,
    DAGFailed,
    EventNotFound,
    GorchError,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
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
    outcome: str = "processed"
    """``processed``; ``skipped``: another runner took the instance over (its lease
    ran out while a step was slow); ``failed``: ``error`` says why."""


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


_T = TypeVar("_T")


def _sleep_backoff(n: int, base: float = 0.05, cap: float = 2.0) -> None:
    """Sleep before retry ``n + 1``: capped exponential backoff with full jitter."""
    time.sleep(random.uniform(0, min(cap, base * 2**n)))


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


_KEY_PREFIX = "gorch.key:"
"""``State.meta`` entries of idempotency keys of sends: the key → what it did."""
_START_KEY = "gorch.start"
"""``State.meta`` entry of the idempotency key a start was made with, and its data's digest."""
_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
_KEY_NAMESPACE = UUID("5b0c3f4e-2a7d-4f43-9a1e-6f1d2c9b7a10")


def _check_key(key: object) -> str:
    """An idempotency key is 1-255 printable ASCII characters (what an HTTP header carries)."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise InvalidIdempotencyKey(key)
    return key


def key_id(name: str, key: str) -> str:
    """The instance id a keyed start of workflow ``name`` gets: the same for the same key."""
    return uuid5(_KEY_NAMESPACE, f"{name}\x00{_check_key(key)}").hex


def _digest(value: Any) -> str:
    """A short fingerprint of JSON-like data, independent of key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _input_digest(input: Any) -> str:
    """The fingerprint of an event's input: JSON text and the data it parses to are alike."""
    value = input
    if isinstance(input, (bytes, bytearray, str)):
        try:
            value = json.loads(input)
        except ValueError:
            value = bytes(input).hex() if isinstance(input, (bytes, bytearray)) else input
    try:
        return _digest(pydantic_core.to_jsonable_python(value, serialize_unknown=True))
    except (ValueError, TypeError, RecursionError):
        return _digest(repr(value))


class Engine:
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
        if store_retries < 0:
            raise ValueError(f"store_retries must be 0 or more, got {store_retries}")
        if idempotency_keys < 1:
            raise ValueError(f"idempotency_keys must be at least 1, got {idempotency_keys}")
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

    # ------------------------------------------------------------------ public API

    def start(
        self,
        name: str,
        id: str | None = None,
        data: Mapping[str, Any] | Workflow | None = None,
        *,
        key: str | None = None,
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
        """
        cls = self._cls(name)
        wf = initial_data(name, cls, data)
        if id is not None:
            wid = self._check_id(id)
        elif key is not None:
            wid = key_id(name, key)
        else:
            wid = uuid4().hex
        state = new_state(wid, name)
        digest = ""
        if key is not None:
            digest = f"{_check_key(key)} {_digest(wf.model_dump(mode='json'))}"
            state.meta[_START_KEY] = digest
        blob = dumps(wf, state)
        # Inline, the record is leased to this call while it runs the first steps;
        # deferred, it is due at once for run_due.
        wake = _now() if self.defer_resume else _now() + self.lease
        try:
            rec = self._put(Record(wid, name, InstanceStatus.RESUMING, b"", 0, None), blob, wake)
        except WorkflowExists:
            if key is None:
                raise
            return self._repeated_start(wid, key, digest)
        cur = _Loaded(rec, wf, state, lease_until=None if self.defer_resume else wake)
        if self.defer_resume:
            return self._snapshot(cur)
        try:
            self._drive(cur, "start", keep_on_error=False)
        except StepFailed:
            pass  # saved as failed (or retrying): the snapshot shows it
        except Conflict:  # a worker took over (our lease ran out): report what it saved
            log.warning("gorch: start of %r: another runner took it over", wid)
            return self._last_saved(cur.rec)
        except StoreError as e:
            log.warning("gorch: start of %r: %s; run_due carries on after the lease", wid, e)
            return self._last_saved(cur.rec)
        except GorchError as e:
            if cur.rec.version == rec.version:  # nothing ran and nothing else was saved
                self._discard(cur.rec)
                raise
            log.error("gorch: start of %r: %s", wid, e)
            with contextlib.suppress(GorchError):
                self._write(cur, InstanceStatus.RESUMING, _now() + self.error_backoff)
            return self._last_saved(cur.rec)
        return self._snapshot(cur)

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
        if key is not None:
            _check_key(key)
        for _ in self._attempts(id):
            cur = self._load(id)
            if key is not None:
                seen = cur.state.meta.get(_KEY_PREFIX + key)
                if seen is not None:
                    return self._repeated_send(cur, key, seen, event, input)
            try:
                self._check_active(cur)
                self._refuse_timer(cur, event, thread_id, pc)
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
            if key is not None:
                self._remember_key(cur.state, key, event, input, out)
            try:
                self._write(cur, driving=not self.defer_resume)
            except Conflict:
                continue
            # Committed: from here on the event is delivered, whatever happens.
            if not self.defer_resume:
                self._drive_after_event(cur, id, event)
            return out
        raise AssertionError("unreachable")

    def _drive_after_event(self, cur: _Loaded, id: str, event: str) -> None:
        """Resume after a committed event; report failures on the instance, not to the sender."""
        try:
            self._drive(cur, "event")
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
                " ".join(str(e).split()),
            )
        except Exception:  # a bug in middleware or a hook: still the instance's problem
            log.exception("gorch: resume of %r after event %r failed", id, event)

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
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 (or None for all), got {limit}")
        fixed = None if now is None else (now if now.tzinfo else now.replace(tzinfo=UTC))
        results: builtins.list[DueResult] = []
        seen: set[str] = set()
        with contextlib.ExitStack() as stack:
            due = stack.enter_context(self.telemetry.run_due_span()) if self.telemetry else None
            while limit is None or len(results) < limit:
                if should_stop is not None and should_stop():
                    break
                at = _now() if fixed is None else fixed
                try:
                    claimed = self._read(self.store.claim_due, at, 1, self.lease)
                except StoreError as e:
                    if not results:
                        raise
                    log.warning("gorch: run_due stopped early: %s", " ".join(str(e).split()))
                    break
                if not claimed or claimed[0].id in seen:
                    break  # nothing due (or only what this call already ran, due again)
                seen.add(claimed[0].id)
                results.append(self._process_due(claimed[0], at, due))
        return results

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
        done = 0
        failures = 0
        while not should_stop():
            try:
                results = self.run_due(limit=batch, should_stop=should_stop)
            except StoreError as e:
                failures += 1
                wait = random.uniform(0.5, 1.0) * min(max_backoff, poll * 2 ** min(failures, 16))
                log.warning(
                    "gorch: worker: store error (%s); retrying in %.1f s",
                    " ".join(str(e).split()),
                    wait,
                )
                self._pause(wait, should_stop)
                continue
            if failures:
                log.warning("gorch: worker: the store answers again")
                failures = 0
            for r in results:
                if on_result is not None:
                    on_result(r)
            done += sum(r.outcome == "processed" for r in results)
            if not results:
                self._pause(poll, should_stop)
        return done

    @staticmethod
    def _pause(seconds: float, should_stop: Callable[[], bool]) -> None:
        """Sleep ``seconds``, waking early when asked to stop."""
        deadline = time.monotonic() + seconds
        while not should_stop() and time.monotonic() < deadline:
            time.sleep(min(0.05, seconds))

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
        rec = self._read(self.store.load, self._check_id(id))
        wf, state = loads(rec.blob, self._cls(rec.workflow))
        return _Loaded(rec, wf, state)

    def _read(self, fn: Callable[..., _T], *args: Any) -> _T:
        """A store read, tried again with backoff while the store is unavailable (reads are
        safe to repeat)."""
        for n in range(self.store_retries + 1):
            try:
                return fn(*args)
            except StoreUnavailable:
                if n == self.store_retries:
                    raise
                _sleep_backoff(n)
        raise AssertionError("unreachable")

    def _put(self, rec: Record, blob: bytes, wake: datetime | None) -> Record:
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
                if not rec.version:
                    return self.store.create(rec.id, rec.workflow, status, blob, wake)
                return self.store.save(rec.id, rec.version, status, blob, wake)
            except StoreUnavailable as e:
                if n == self.store_retries:
                    raise
                log.warning("gorch: saving %r: %s; trying again", rec.id, " ".join(str(e).split()))
            _sleep_backoff(n)
            try:
                now = self.store.load(rec.id)
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

    def _discard(self, rec: Record) -> None:
        """Delete a record this call created and nothing else touched (a start that failed)."""
        try:
            if self.store.load(rec.id).version == rec.version:
                self.store.delete(rec.id)
        except GorchError as e:
            log.warning("gorch: could not remove the record of failed start %r: %s", rec.id, e)

    def _last_saved(self, rec: Record) -> Snapshot:
        """The snapshot of what is stored, when the in-memory state may be ahead of it."""
        with contextlib.suppress(GorchError):
            rec = self.store.load(rec.id)
        wf, state = loads(rec.blob, self._cls(rec.workflow))
        return self._snapshot(_Loaded(rec, wf, state))

    def _repeated_start(self, wid: str, key: str, digest: str) -> Snapshot:
        cur = self._load(wid)
        first = cur.state.meta.get(_START_KEY)
        if first != digest:
            what = "other data" if first and first.split(" ")[0] == key else "another start"
            raise IdempotencyKeyReused(wid, key, what)
        return self._snapshot(cur)

    def _remember_key(self, state: State, key: str, event: str, input: Any, out: Any) -> None:
        """Keep what a keyed send did, in the state it saves (so both commit together)."""
        meta = state.meta
        keys = [k for k in meta if k.startswith(_KEY_PREFIX)]
        for old in keys[: max(0, len(keys) - self.idempotency_keys + 1)]:
            del meta[old]  # oldest first: dicts keep insertion order, and so does the codec
        try:
            output = pydantic_core.to_jsonable_python(out, serialize_unknown=True)
        except (ValueError, TypeError, RecursionError):
            output = None
        record = {"event": event, "input": _input_digest(input), "output": output}
        meta[_KEY_PREFIX + key] = json.dumps(record, separators=(",", ":"), default=str)

    def _repeated_send(self, cur: _Loaded, key: str, seen: str, event: str, input: Any) -> Any:
        first = json.loads(seen)
        if first.get("event") != event:
            raise IdempotencyKeyReused(cur.rec.id, key, f"event {first.get('event')!r}")
        if first.get("input") != _input_digest(input):
            raise IdempotencyKeyReused(cur.rec.id, key, f"event {event!r} with other input")
        log.info(
            "gorch: %r to %r repeats idempotency key %r: not applied again", event, cur.rec.id, key
        )
        return first.get("output")

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
        if waits and all(self._is_timer(cur.wf, we.select, event) for we in waits):
            raise TimerNotSendable(cur.rec.id, event)

    @staticmethod
    def _is_timer(wf: Workflow, select: str, event: str) -> bool:
        try:
            st = find_statement(wf, select)
        except GorchError:
            return False
        hit = st.case(event) if isinstance(st, Select) else None
        return hit is not None and isinstance(hit[1], Timeout)

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
        if blob == rec.blob and status == rec.status and wake == rec.wake_at:
            return  # nothing changed: keep the version (an idle resume writes nothing)
        try:
            cur.rec = self._put(
                Record(rec.id, rec.workflow, status, rec.blob, rec.version, rec.wake_at), blob, wake
            )
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

    def _drive(self, cur: _Loaded, reason: str = "resume", *, keep_on_error: bool = True) -> None:
        """Resume with a save at every checkpoint; apply retry policies to failed steps.

        A failed step (or a hook around it) may have changed the data before
        raising: the data saved with the failure is the data the step started
        from (every earlier change was saved before the step ran).

        ``keep_on_error=False`` leaves a definition problem to the caller
        instead of saving the instance for a later look (``start`` removes
        a record that nothing ran on).
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
        except (Conflict, StoreError):
            raise
        except GorchError as e:
            if not keep_on_error:
                raise
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
        except Conflict:
            log.info("gorch: run_due: %r was taken over by another runner", rec.id)
            return DueResult(id=rec.id, action=action, outcome="skipped")
        except GorchError as e:
            message = " ".join(str(e).split())
            log.warning("gorch: run_due could not process %r: %s", rec.id, message)
            return DueResult(
                id=rec.id, action=action, outcome="failed", error=f"{type(e).__name__}: {message}"
            )
        except Exception as e:
            log.exception("gorch: run_due could not process %r", rec.id)
            return DueResult(
                id=rec.id, action=action, outcome="failed", error=f"{type(e).__name__}: {e}"
            )

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
