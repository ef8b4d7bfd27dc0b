"""OpenTelemetry spans and metrics for gorch (the ``gorch[otel]`` extra).

:class:`Telemetry` is a middleware (see :mod:`gorch.hooks`) built on
``opentelemetry-api`` only. It does nothing until the application configures an
OpenTelemetry SDK (or passes SDK providers): with the API's default providers,
every hook returns ``call_next()`` at once and ``state.meta`` is never touched.
Exporters (OTLP, Prometheus, ...) are the application's choice.

Spans: ``gorch.resume {workflow}`` around each resume, a child
``gorch.step {step}`` per step attempt, ``gorch.handle_event {event}`` around
each handler call, ``gorch.setup {event}`` / ``gorch.teardown {event}`` around
a handler's setup and teardown, and ``gorch.run_due`` (see
:meth:`Telemetry.run_due_span`).

Trace continuity: a resume stores its span's W3C trace context in
``state.meta`` (``traceparent``, and ``tracestate`` when there is one), so the
saves made during the resume keep it with the workflow. The next resume, days
later in another process, links to it; a delivered event links to it too and
stores its own context (``event.traceparent``), which the resume it wakes links
to. A three-day approval reads as one chain of linked spans.

Metrics (durations in seconds): ``gorch.workflow.resume.duration``,
``gorch.step.duration``, ``gorch.workflow.completed``, ``gorch.event.received``,
``gorch.timer.lag`` and ``gorch.store.conflicts``. Timer lag, conflicts, events
refused before their handler runs and ``failed`` / ``cancelled`` completions
happen outside any middleware: the Engine reports them with the ``record_*``
methods of the Telemetry it runs (see :func:`with_telemetry`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, MutableMapping, Sequence
from contextvars import Token
from typing import Any, Literal

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.trace import Link, Span, SpanContext, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("gorch.otel needs the OpenTelemetry API: pip install 'gorch[otel]'") from exc

from gorch.errors import (
    AmbiguousEvent,
    EventNotFound,
    InvalidEventInput,
    SetupError,
    StaleEvent,
    StepFailed,
    WorkflowFinishedError,
    WorkflowNotActive,
)
from gorch.hooks import CallNext, EventContext, Middleware, ResumeContext, StepContext
from gorch.state import State, WorkflowStatus

__all__ = [
    "CompletedOutcome",
    "EventOutcome",
    "RejectedOutcome",
    "RunDueSpan",
    "Telemetry",
    "default_telemetry",
    "rejection_outcome",
    "with_telemetry",
]

# ---------------------------------------------------------------- names (all documented)

INSTRUMENTATION_NAME = "gorch"

WORKFLOW_ID = "gorch.workflow.id"
WORKFLOW_TYPE = "gorch.workflow.type"
WORKFLOW_OUTCOME = "gorch.workflow.outcome"
RESUME_REASON = "gorch.resume.reason"
RESUME_OUTCOME = "gorch.resume.outcome"
THREAD_ID = "gorch.thread.id"
STEP_NAME = "gorch.step.name"
STEP_ATTEMPT = "gorch.step.attempt"
STEP_OUTCOME = "gorch.step.outcome"
EVENT_NAME = "gorch.event.name"
EVENT_PC = "gorch.event.pc"
EVENT_OUTCOME = "gorch.event.outcome"
STORE = "gorch.store"
LINK = "gorch.link"
RUN_DUE_INSTANCES = "gorch.run_due.instances"
ERROR_TYPE = "error.type"

#: ``state.meta`` keys holding W3C trace contexts.
META_TRACEPARENT = "traceparent"
META_TRACESTATE = "tracestate"
META_EVENT_TRACEPARENT = "event.traceparent"
META_EVENT_TRACESTATE = "event.tracestate"

#: ``gorch.event.received`` outcomes.
EventOutcome = Literal["handled", "invalid", "failed", "not_awaited", "stale", "ambiguous"]
#: The outcomes of events refused before their handler runs (reported by the caller).
RejectedOutcome = Literal["not_awaited", "stale", "invalid", "ambiguous"]
#: ``gorch.workflow.completed`` outcomes the caller reports (``finished`` is counted here).
CompletedOutcome = Literal["failed", "cancelled"]

_DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_LAG_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

_PROPAGATOR = TraceContextTextMapPropagator()

# Is a global provider set? The module globals of the API are read directly:
# ``get_tracer_provider()`` looks up an environment variable on every call,
# too slow for a check made around every step.
if hasattr(trace, "_TRACER_PROVIDER"):

    def _global_tracing() -> bool:
        return trace._TRACER_PROVIDER is not None

else:  # pragma: no cover - another API layout

    def _global_tracing() -> bool:
        return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


try:
    from opentelemetry.metrics import _internal as _metrics_internal

    _metrics_internal._METER_PROVIDER  # noqa: B018 - fail here if the layout changed

    def _global_metrics() -> bool:
        return _metrics_internal._METER_PROVIDER is not None

except (ImportError, AttributeError):  # pragma: no cover - another API layout

    def _global_metrics() -> bool:
        return True  # assume set: the instruments are then the API's no-op ones


def _is_proxy_meters(p: metrics.MeterProvider) -> bool:
    return type(p).__name__ == "_ProxyMeterProvider"


def _error_type(e: BaseException) -> str:
    """``error.type``: the exception's class, qualified by its module unless a builtin."""
    cls = type(e)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _linked(meta: MutableMapping[str, str], parent_key: str, state_key: str) -> SpanContext | None:
    """The span context stored under ``parent_key`` in ``meta``, or None."""
    traceparent = meta.get(parent_key)
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    tracestate = meta.get(state_key)
    if tracestate:
        carrier["tracestate"] = tracestate
    sc = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
    return sc if sc.is_valid else None


def _links(meta: MutableMapping[str, str], *, event: bool) -> list[Link]:
    """Links to the stored contexts: the last resume's, and (``event``) the delivering call's."""
    links = []
    sc = _linked(meta, META_TRACEPARENT, META_TRACESTATE)
    if sc is not None:
        links.append(Link(sc, {LINK: "resume"}))
    if event:
        sc = _linked(meta, META_EVENT_TRACEPARENT, META_EVENT_TRACESTATE)
        if sc is not None:
            links.append(Link(sc, {LINK: "event"}))
    return links


def _store(meta: MutableMapping[str, str], span: Span, parent_key: str, state_key: str) -> None:
    """Write ``span``'s W3C context into ``meta`` under the given keys."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    meta[parent_key] = carrier["traceparent"]
    tracestate = carrier.get("tracestate")
    if tracestate:
        meta[state_key] = tracestate
    else:
        meta.pop(state_key, None)


def _fail(span: Span | None, e: BaseException, etype: str) -> None:
    if span is not None and span.is_recording():
        span.record_exception(e)
        span.set_attribute(ERROR_TYPE, etype)
        span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))


def rejection_outcome(e: BaseException) -> RejectedOutcome | None:
    """The ``gorch.event.received`` outcome for an error refusing an event, or None.

    For callers that deliver events (the Engine, the HTTP app): ``EventNotFound``,
    ``WorkflowFinishedError`` and ``WorkflowNotActive`` are ``not_awaited``;
    ``StaleEvent`` is ``stale``; ``AmbiguousEvent`` is ``ambiguous``;
    ``InvalidEventInput`` is ``invalid``.
    """
    if isinstance(e, StaleEvent):
        return "stale"
    if isinstance(e, (EventNotFound, WorkflowFinishedError, WorkflowNotActive)):
        return "not_awaited"
    if isinstance(e, AmbiguousEvent):
        return "ambiguous"
    if isinstance(e, InvalidEventInput):
        return "invalid"
    return None


class RunDueSpan:
    """The ``gorch.run_due`` span of one ``run_due`` call (see :meth:`Telemetry.run_due_span`).

    The span is started lazily, by the first :meth:`link` (back-dated to the
    start of the call): a worker polling an empty store exports nothing.
    """

    __slots__ = ("_count", "_start_ns", "_telemetry", "_token", "span")

    def __init__(self, telemetry: Telemetry | None) -> None:
        self._telemetry = telemetry
        self._start_ns = time.time_ns()
        self._count = 0
        self._token: Token[otel_context.Context] | None = None
        self.span: Span | None = None
        """The span, once the first workflow was linked (None without tracing)."""

    def link(self, workflow_id: str, state: State | None = None) -> None:
        """Record that this run_due processes ``workflow_id``; link its stored trace context.

        Call it for each claimed instance before firing its timers or resuming
        it: the resumes then run as children of the ``gorch.run_due`` span, each
        also linked to the call that left its workflow waiting.
        """
        self._count += 1
        if self._telemetry is None:
            return
        sc = None if state is None else _linked(state.meta, META_TRACEPARENT, META_TRACESTATE)
        attrs = {LINK: "resume", WORKFLOW_ID: workflow_id}
        if self.span is None:
            links = [] if sc is None else [Link(sc, attrs)]
            self.span = self._telemetry._tracer.start_span(
                "gorch.run_due", links=links, start_time=self._start_ns
            )
            self._token = otel_context.attach(trace.set_span_in_context(self.span))
        elif sc is not None:
            self.span.add_link(sc, attrs)

    @property
    def count(self) -> int:
        """How many instances were linked."""
        return self._count

    def _close(self, e: BaseException | None) -> None:
        span = self.span
        if span is None:
            return
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        if span.is_recording():
            span.set_attribute(RUN_DUE_INSTANCES, self._count)
            if e is not None:
                _fail(span, e, _error_type(e))
        span.end()


class Telemetry(Middleware):
    """OpenTelemetry middleware: spans and metrics for resumes, steps and events.

    ``tracer_provider`` / ``meter_provider`` default to the global ones (the
    API's no-op until the application sets an SDK provider; one set later is
    picked up). Put it first in a middleware list so its spans cover the others.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        import gorch

        version: str = getattr(gorch, "__version__", "")
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._tracer = trace.get_tracer(
            INSTRUMENTATION_NAME, version or None, tracer_provider=tracer_provider
        )
        meter = metrics.get_meter(INSTRUMENTATION_NAME, version, meter_provider=meter_provider)
        # None or the global proxy: records once the application sets a global
        # provider. The API's no-op providers: never. Any other: always.
        if tracer_provider is None:
            trace.get_tracer_provider()  # loads one named by OTEL_PYTHON_TRACER_PROVIDER
        if meter_provider is None:
            metrics.get_meter_provider()
        self._tracing_global = tracer_provider is None or isinstance(
            tracer_provider, trace.ProxyTracerProvider
        )
        self._tracing_on = not self._tracing_global and not isinstance(
            tracer_provider, trace.NoOpTracerProvider
        )
        self._metrics_global = meter_provider is None or _is_proxy_meters(meter_provider)
        self._metrics_on = not self._metrics_global and not isinstance(
            meter_provider, metrics.NoOpMeterProvider
        )
        self._resume_duration = meter.create_histogram(
            "gorch.workflow.resume.duration",
            unit="s",
            description="Duration of one resume of a workflow instance.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._step_duration = meter.create_histogram(
            "gorch.step.duration",
            unit="s",
            description="Duration of one attempt of one step.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._completed = meter.create_counter(
            "gorch.workflow.completed",
            unit="{workflow}",
            description="Workflow instances that ended, by outcome.",
        )
        self._events = meter.create_counter(
            "gorch.event.received",
            unit="{event}",
            description="Events delivered to workflow instances, by outcome.",
        )
        self._timer_lag = meter.create_histogram(
            "gorch.timer.lag",
            unit="s",
            description="How late a timer fired: the time it fired minus its due time.",
            explicit_bucket_boundaries_advisory=_LAG_BUCKETS,
        )
        self._conflicts = meter.create_counter(
            "gorch.store.conflicts",
            unit="{conflict}",
            description="Compare-and-swap saves that lost to a concurrent writer.",
        )

    # ------------------------------------------------------------ is anything on?

    def _tracing(self) -> bool:
        if self._tracing_on:
            return True
        if self._tracing_global and _global_tracing():
            self._tracing_on = True  # a global provider, once set, is set for good
        return self._tracing_on

    def _metrics(self) -> bool:
        if self._metrics_on:
            return True
        if self._metrics_global and _global_metrics():
            self._metrics_on = True
        return self._metrics_on

    @property
    def enabled(self) -> bool:
        """Whether spans or metrics are recorded (an SDK provider is in use)."""
        return self._tracing() or self._metrics()

    # ------------------------------------------------------------ middleware

    def around_resume(self, ctx: ResumeContext, call_next: CallNext) -> Any:
        tracing = self._tracing()
        measuring = self._metrics()
        if not (tracing or measuring):
            return call_next()
        state = ctx.state
        span: Span | None = None
        restore: dict[str, str] | None = None
        if tracing:
            attrs = {WORKFLOW_ID: ctx.workflow_id, WORKFLOW_TYPE: ctx.workflow}
            attrs[RESUME_REASON] = ctx.reason
            links = _links(state.meta, event=True) if state.meta else None
            span = self._tracer.start_span(
                f"gorch.resume {ctx.workflow}", attributes=attrs, links=links
            )
            # A resume of a waiting workflow (nothing runnable) did not leave it
            # waiting: keep the context of the call that did.
            if span.is_recording() and state.status is not WorkflowStatus.WAITING:
                restore = dict(state.meta)
                _store(state.meta, span, META_TRACEPARENT, META_TRACESTATE)
                state.meta.pop(META_EVENT_TRACEPARENT, None)
                state.meta.pop(META_EVENT_TRACESTATE, None)
        t0 = time.perf_counter()
        etype = ""
        try:
            with _current(span):
                status = call_next()
        except BaseException as e:
            etype = _error_type(e)
            _fail(span, e, etype)
            if restore is not None and not isinstance(e, (StepFailed, SetupError)):
                # The state is as before the call (or as its checkpoints saved
                # it): the stored context stays the previous call's.
                state.meta.clear()
                state.meta.update(restore)
            raise
        finally:
            elapsed = time.perf_counter() - t0
            outcome = "failed" if etype else _status_str(state.status)
            if span is not None:
                if span.is_recording():
                    span.set_attribute(RESUME_OUTCOME, outcome)
                span.end()
            if measuring:
                m = {WORKFLOW_TYPE: ctx.workflow, RESUME_REASON: ctx.reason}
                m[RESUME_OUTCOME] = outcome
                if etype:
                    m[ERROR_TYPE] = etype
                self._resume_duration.record(elapsed, m)
                if not etype and state.status is WorkflowStatus.FINISHED:
                    self._completed.add(
                        1, {WORKFLOW_TYPE: ctx.workflow, WORKFLOW_OUTCOME: "finished"}
                    )
        return status

    def around_step(self, ctx: StepContext, call_next: CallNext) -> Any:
        tracing = self._tracing()
        measuring = self._metrics()
        if not (tracing or measuring):
            return call_next()
        span: Span | None = None
        if tracing:
            attrs: dict[str, str | int] = {
                WORKFLOW_ID: ctx.workflow_id,
                WORKFLOW_TYPE: ctx.workflow,
                THREAD_ID: ctx.thread_id,
                STEP_NAME: ctx.step,
                STEP_ATTEMPT: ctx.attempt,
            }
            span = self._tracer.start_span(f"gorch.step {ctx.step}", attributes=attrs)
        t0 = time.perf_counter()
        etype = ""
        try:
            with _current(span):
                return call_next()
        except BaseException as e:
            etype = _error_type(e)
            _fail(span, e, etype)
            raise
        finally:
            elapsed = time.perf_counter() - t0
            outcome = "failed" if etype else "completed"
            if span is not None:
                if span.is_recording():
                    span.set_attribute(STEP_OUTCOME, outcome)
                span.end()
            if measuring:
                m = {WORKFLOW_TYPE: ctx.workflow, STEP_NAME: ctx.step, STEP_OUTCOME: outcome}
                if etype:
                    m[ERROR_TYPE] = etype
                self._step_duration.record(elapsed, m)

    def around_event(self, ctx: EventContext, call_next: CallNext) -> Any:
        tracing = self._tracing()
        handle = ctx.phase == "handle"
        measuring = handle and self._metrics()
        if not (tracing or measuring):
            return call_next()
        span: Span | None = None
        state: State | None = None
        if tracing:
            attrs: dict[str, str | int] = {
                WORKFLOW_ID: ctx.workflow_id,
                WORKFLOW_TYPE: ctx.workflow,
                THREAD_ID: ctx.thread_id,
                EVENT_NAME: ctx.event,
                EVENT_PC: ctx.pc,
            }
            links = None
            if handle:
                state = _state_of(ctx)
                if state is not None and state.meta:
                    links = _links(state.meta, event=False)
            kind = "handle_event" if handle else ctx.phase
            span = self._tracer.start_span(
                f"gorch.{kind} {ctx.event}", attributes=attrs, links=links
            )
        outcome: EventOutcome = "handled"
        try:
            with _current(span):
                out = call_next()
            if state is not None and span is not None and span.is_recording():
                # The handler succeeded, so the event is delivered: the resume it
                # wakes (maybe in a worker, later) links to this call.
                _store(state.meta, span, META_EVENT_TRACEPARENT, META_EVENT_TRACESTATE)
        except BaseException as e:
            outcome = "invalid" if isinstance(e, InvalidEventInput) else "failed"
            _fail(span, e, _error_type(e))
            raise
        finally:
            if span is not None:
                if handle and span.is_recording():
                    span.set_attribute(EVENT_OUTCOME, outcome)
                span.end()
            if measuring:
                self._count_event(ctx.workflow, ctx.event, outcome)
        return out

    # ------------------------------------------------------------ for the Engine

    @contextlib.contextmanager
    def run_due_span(self) -> Iterator[RunDueSpan]:
        """Context manager for one ``run_due`` call; ``.link(id, state)`` each instance.

        The ``gorch.run_due`` span starts at the first ``link`` (dated from
        entering the block) and is the current span from then on, so the
        resumes and timer deliveries that follow are its children; each link
        points at the context stored by the call that left that workflow
        waiting. Attribute ``gorch.run_due.instances``: how many were linked.
        """
        due = RunDueSpan(self if self._tracing() else None)
        try:
            yield due
        except BaseException as e:
            due._close(e)
            raise
        due._close(None)

    def record_event_rejected(self, workflow: str, event: str, outcome: RejectedOutcome) -> None:
        """Count an event refused before its handler ran (``gorch.event.received``).

        ``workflow`` is the workflow type. Use :func:`rejection_outcome` to map
        the error. Do not report ``InvalidEventInput`` raised by
        ``handle_event`` itself: this middleware counted it already.
        """
        if self._metrics():
            self._count_event(workflow, event, outcome)

    def record_timer_lag(self, workflow: str, event: str, seconds: float) -> None:
        """Record how late a timer fired: fired minus due, in seconds (``gorch.timer.lag``)."""
        if self._metrics():
            self._timer_lag.record(seconds, {WORKFLOW_TYPE: workflow, EVENT_NAME: event})

    def record_conflict(self, store: str, workflow: str = "") -> None:
        """Count a lost compare-and-swap (``gorch.store.conflicts``).

        ``store`` names the backend (``memory``, ``sqlite``, ``postgres``, ``redis``);
        ``workflow`` is the workflow type when known.
        """
        if self._metrics():
            attrs = {STORE: store}
            if workflow:
                attrs[WORKFLOW_TYPE] = workflow
            self._conflicts.add(1, attrs)

    def record_completed(self, workflow: str, outcome: CompletedOutcome) -> None:
        """Count an instance that ended without finishing (``gorch.workflow.completed``).

        ``failed``: a step failed for good; ``cancelled``: ``Engine.cancel``.
        ``finished`` is counted by :meth:`around_resume`.
        """
        if self._metrics():
            self._completed.add(1, {WORKFLOW_TYPE: workflow, WORKFLOW_OUTCOME: outcome})

    def _count_event(self, workflow: str, event: str, outcome: EventOutcome) -> None:
        self._events.add(1, {WORKFLOW_TYPE: workflow, EVENT_NAME: event, EVENT_OUTCOME: outcome})


_NULL = contextlib.nullcontext()


def _current(span: Span | None) -> contextlib.AbstractContextManager[Any]:
    """Make ``span`` current for the block; it is ended and its error recorded by the caller."""
    if span is None:
        return _NULL
    return trace.use_span(
        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    )


def _status_str(status: WorkflowStatus) -> str:
    return str(status.value)


def _state_of(ctx: EventContext) -> State | None:
    """The state the event is delivered to: ``ctx.state`` when the context has it."""
    state = getattr(ctx, "state", None)
    if state is None:
        state = ctx.extra.get("state")
    return state if isinstance(state, State) else None


@functools.cache
def default_telemetry() -> Telemetry:
    """The shared :class:`Telemetry` on the global providers (no-op until an SDK is set)."""
    return Telemetry()


def with_telemetry(middleware: Sequence[object]) -> tuple[Telemetry, tuple[object, ...]]:
    """The Telemetry to report with, and the middleware to run.

    If ``middleware`` holds a :class:`Telemetry`, that one and ``middleware``
    unchanged; otherwise :func:`default_telemetry` and ``middleware`` with it
    first (outermost).
    """
    for m in middleware:
        if isinstance(m, Telemetry):
            return m, tuple(middleware)
    tel = default_telemetry()
    return tel, (tel, *middleware)
