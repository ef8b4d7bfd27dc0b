"""OpenTelemetry spans and metrics (``gorch.otel``, the ``gorch[otel]`` extra).

Every test builds its own SDK providers (the global ones can be set only once)
with the SDK's in-memory span exporter and metric reader. Without
opentelemetry-sdk the module is skipped on a developer's machine and fails
under CI (``CI`` or ``GORCH_REQUIRE_SERVICES`` set), like the store servers.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pytest
from stores.store_support import services_required

import gorch
from gorch import For, On, S, Select, Step, Timeout
from gorch.clock import use_clock
from gorch.hooks import CallNext, EventContext, Middleware

try:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    from opentelemetry.trace import StatusCode

    from gorch import otel
except ImportError as exc:  # pragma: no cover - depends on the environment
    reason = f"opentelemetry-sdk is not installed ({exc}): pip install -e '.[dev,otel]'"
    if services_required():
        pytest.fail(f"{reason}; CI must not skip the telemetry tests", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

# --------------------------------------------------------------------------- workflows


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Approval(gorch.Workflow):
    """Notify, wait for a decision (or escalate after an hour), then close."""

    status: str = "new"

    def definition(self) -> gorch.Section:
        return S(
            Step("notify", self.notify),
            Select(
                "await decision",
                On("decide", self.on_decide),
                Timeout("expired", timedelta(hours=1), Step("escalate", self.escalate)),
            ),
            Step("close", self.close),
        )

    def notify(self) -> None:
        pass

    def on_decide(self, d: Decision) -> str:
        self.status = "approved" if d.approved else "rejected"
        return self.status

    def escalate(self) -> None:
        self.status = "escalated"

    def close(self) -> None:
        pass


class Flaky(gorch.Workflow):
    """A step that fails until ``ok`` is set."""

    ok: bool = False

    def definition(self) -> gorch.Section:
        return S(Step("charge", self.charge))

    def charge(self) -> None:
        if not self.ok:
            raise ValueError("card declined")


class Spin(gorch.Workflow):
    """A loop that never blocks: ``ResumeLimitError``."""

    i: int = 0

    def definition(self) -> gorch.Section:
        return S(For("spin", lambda: True, Step("inc", self.inc)))

    def inc(self) -> None:
        self.i += 1


# --------------------------------------------------------------------------- SDK helpers


@dataclass
class Sdk:
    telemetry: otel.Telemetry
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, (name, [s.name for s in self.finished()])
        return found[0]

    def metric(self, name: str) -> tuple[str | None, list[Any]]:
        """(unit, data points) of metric ``name``."""
        data = self.reader.get_metrics_data()
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        assert sm.scope.name == "gorch"
                        return m.unit, list(m.data.data_points)
        raise AssertionError(f"no metric {name!r}")

    def point(self, name: str, **attrs: Any) -> Any:
        """The one data point of ``name`` whose attributes are exactly ``attrs``."""
        _, points = self.metric(name)
        want = {k.replace("__", "."): v for k, v in attrs.items()}
        hits = [p for p in points if dict(p.attributes) == want]
        assert len(hits) == 1, (want, [dict(p.attributes) for p in points])
        return hits[0]


def make_sdk(**tracer_kw: Any) -> Sdk:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider(**tracer_kw)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    return Sdk(otel.Telemetry(tracer_provider, meter_provider), spans, reader)


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    yield make_sdk()


class PassState(Middleware):
    """Hands the state to ``around_event`` through ``ctx.extra`` (core calls only).

    ``Telemetry`` reads ``ctx.state`` when ``EventContext`` has it, else
    ``ctx.extra["state"]``; outside the Engine the caller knows the state.
    """

    def __init__(self, state: gorch.State) -> None:
        self.state = state

    def around_event(self, ctx: EventContext, call_next: CallNext) -> Any:
        ctx.extra.setdefault("state", self.state)
        return call_next()


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def link_map(span: ReadableSpan) -> dict[str, int]:
    """Links by their ``gorch.link`` kind, to the span ids they point at."""
    return {str((link.attributes or {})[otel.LINK]): link.context.span_id for link in span.links}


def traceparent_of(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def approved() -> dict[str, Any]:
    return {"approved": True, "by": "ann"}


# --------------------------------------------------------------------------- spans


def test_resume_span_with_step_and_setup_children(sdk: Sdk) -> None:
    wf, state = Approval(), gorch.new_state("exp-1", "approval")
    assert gorch.resume(wf, state, middleware=[sdk.telemetry]) is gorch.WorkflowStatus.WAITING

    resume = sdk.one("gorch.resume approval")
    assert parent_id(resume) is None
    assert attrs(resume) == {
        "gorch.workflow.id": "exp-1",
        "gorch.workflow.type": "approval",
        "gorch.resume.reason": "resume",
        "gorch.resume.outcome": "waiting",
    }
    assert resume.status.status_code is StatusCode.UNSET
    step = sdk.one("gorch.step notify")
    assert parent_id(step) == resume.context.span_id
    assert step.context.trace_id == resume.context.trace_id
    assert attrs(step) == {
        "gorch.workflow.id": "exp-1",
        "gorch.workflow.type": "approval",
        "gorch.thread.id": gorch.MAIN_THREAD,
        "gorch.step.name": "notify",
        "gorch.step.attempt": 1,
        "gorch.step.outcome": "completed",
    }
    setup = sdk.one("gorch.setup expired")  # the Timeout's setup stores its due time
    assert parent_id(setup) == resume.context.span_id
    assert attrs(setup)["gorch.event.name"] == "expired"
    assert attrs(setup)["gorch.event.pc"] == state.threads[0].wait_events[0].req.pc
    # The resume's context is kept with the state, as W3C traceparent.
    assert state.meta == {"traceparent": traceparent_of(resume)}


def test_failing_step_sets_error_type_on_step_and_resume(sdk: Sdk) -> None:
    wf, state = Flaky(), gorch.new_state("pay-1", "flaky")
    with pytest.raises(gorch.StepFailed):
        gorch.resume(wf, state, middleware=[sdk.telemetry])

    step = sdk.one("gorch.step charge")
    assert step.status.status_code is StatusCode.ERROR
    assert attrs(step)["error.type"] == "ValueError"
    assert attrs(step)["gorch.step.outcome"] == "failed"
    assert [e.name for e in step.events] == ["exception"]
    resume = sdk.one("gorch.resume flaky")
    assert resume.status.status_code is StatusCode.ERROR
    assert attrs(resume)["error.type"] == "gorch.errors.StepFailed"
    assert attrs(resume)["gorch.resume.outcome"] == "failed"
    assert parent_id(step) == resume.context.span_id
    # A failed step is a change of state the caller saves: the context stays.
    assert state.meta["traceparent"] == traceparent_of(resume)

    # The retry is attempt 2 and links to the failed resume.
    wf.ok = True
    sdk.spans.clear()
    gorch.resume(wf, state, middleware=[sdk.telemetry])
    retry = sdk.one("gorch.resume flaky")
    assert attrs(sdk.one("gorch.step charge"))["gorch.step.attempt"] == 2
    assert link_map(retry) == {"resume": resume.context.span_id}
    assert attrs(retry)["gorch.resume.outcome"] == "finished"


def test_three_day_approval_reads_as_linked_spans(sdk: Sdk) -> None:
    """start -> wait -> event (in another process, days later) -> finish."""
    tel = sdk.telemetry
    wf, state = Approval(), gorch.new_state("exp-2", "approval")
    gorch.resume(wf, state, middleware=[tel])
    blob = gorch.dumps(wf, state)
    first = sdk.one("gorch.resume approval")

    wf, state = gorch.loads(blob, Approval)  # the trace context travelled with the blob
    assert state.meta == {"traceparent": traceparent_of(first)}
    sdk.spans.clear()
    out = gorch.handle_event(wf, state, "decide", approved(), middleware=[PassState(state), tel])
    assert out == "approved"
    event = sdk.one("gorch.handle_event decide")
    assert attrs(event)["gorch.event.outcome"] == "handled"
    assert attrs(event)["gorch.workflow.id"] == "exp-2"
    assert link_map(event) == {"resume": first.context.span_id}
    assert state.meta["event.traceparent"] == traceparent_of(event)
    blob = gorch.dumps(wf, state)

    wf, state = gorch.loads(blob, Approval)
    assert gorch.resume(wf, state, middleware=[tel]) is gorch.WorkflowStatus.FINISHED
    last = sdk.one("gorch.resume approval")
    assert attrs(last)["gorch.resume.outcome"] == "finished"
    # Linked to the call that left the workflow waiting and to the event that woke it.
    assert link_map(last) == {"resume": first.context.span_id, "event": event.context.span_id}
    assert {s.name for s in sdk.finished() if parent_id(s) == last.context.span_id} == {
        "gorch.step close"
    }
    assert state.meta == {"traceparent": traceparent_of(last)}


def test_engine_reasons_and_links_through_the_store(sdk: Sdk) -> None:
    engine = gorch.Engine("memory://", {"approval": Approval}, middleware=[sdk.telemetry])
    engine.start("approval", "exp-3", {})
    engine.send("exp-3", "decide", approved())
    engine.start("approval", "exp-4", {})
    later = datetime.now(UTC) + timedelta(hours=2)
    [due] = engine.run_due(now=later)
    assert due.fired == ["expired"]

    resumes = sdk.named("gorch.resume approval")
    by = {(attrs(s)["gorch.workflow.id"], attrs(s)["gorch.resume.reason"]): s for s in resumes}
    assert sorted(by) == [
        ("exp-3", "event"),
        ("exp-3", "start"),
        ("exp-4", "start"),
        ("exp-4", "timer"),
    ]
    assert attrs(by["exp-3", "start"])["gorch.resume.outcome"] == "waiting"
    assert attrs(by["exp-3", "event"])["gorch.resume.outcome"] == "finished"
    # The context saved by the first resume came back from the store.
    assert link_map(by["exp-3", "event"])["resume"] == by["exp-3", "start"].context.span_id
    assert link_map(by["exp-4", "timer"])["resume"] == by["exp-4", "start"].context.span_id
    assert {attrs(s)["gorch.event.name"] for s in sdk.named("gorch.handle_event expired")} == {
        "expired"
    }
    escalate = sdk.one("gorch.step escalate")
    assert parent_id(escalate) == by["exp-4", "timer"].context.span_id
    if "state" in EventContext.__dataclass_fields__:  # the Engine can hand the state over
        decide = sdk.one("gorch.handle_event decide")
        assert link_map(decide) == {"resume": by["exp-3", "start"].context.span_id}
        assert link_map(by["exp-3", "event"])["event"] == decide.context.span_id


def test_invalid_event_input_is_an_error_span_and_leaves_the_state(sdk: Sdk) -> None:
    wf, state = Approval(), gorch.new_state("exp-5", "approval")
    gorch.resume(wf, state, middleware=[sdk.telemetry])
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.InvalidEventInput):
        gorch.handle_event(
            wf, state, "decide", {"approved": "maybe"}, middleware=[PassState(state), sdk.telemetry]
        )
    span = sdk.one("gorch.handle_event decide")
    assert span.status.status_code is StatusCode.ERROR
    assert attrs(span)["gorch.event.outcome"] == "invalid"
    assert attrs(span)["error.type"] == "gorch.errors.InvalidEventInput"
    assert gorch.dumps(wf, state) == before
    point = sdk.point(
        "gorch.event.received",
        gorch__workflow__type="approval",
        gorch__event__name="decide",
        gorch__event__outcome="invalid",
    )
    assert point.value == 1


def test_a_resume_that_changes_nothing_keeps_the_stored_context(sdk: Sdk) -> None:
    wf, state = Approval(), gorch.new_state("exp-6", "approval")
    gorch.resume(wf, state, middleware=[sdk.telemetry])
    before = gorch.dumps(wf, state)
    first = sdk.one("gorch.resume approval")
    sdk.spans.clear()
    gorch.resume(wf, state, middleware=[sdk.telemetry])  # still waiting: nothing to run
    idle = sdk.one("gorch.resume approval")
    assert link_map(idle) == {"resume": first.context.span_id}
    assert gorch.dumps(wf, state) == before  # the Engine writes nothing for it


def test_an_error_that_leaves_the_state_restores_the_context(sdk: Sdk) -> None:
    wf, state = Spin(), gorch.new_state("spin-1", "spin")
    state.meta["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    state.meta["owner"] = "billing"
    with pytest.raises(gorch.ResumeLimitError):
        gorch.resume(wf, state, max_units=5, middleware=[sdk.telemetry])
    assert state.meta == {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "owner": "billing",
    }
    resume = sdk.one("gorch.resume spin")
    assert attrs(resume)["error.type"] == "gorch.errors.ResumeLimitError"
    [link] = resume.links
    assert f"{link.context.span_id:016x}" == "b7ad6b7169203331"


def test_run_due_span_is_the_parent_and_links_each_workflow(sdk: Sdk) -> None:
    tel = sdk.telemetry
    waiting = []
    for wid in ("exp-7", "exp-8"):
        wf, state = Approval(), gorch.new_state(wid, "approval")
        gorch.resume(wf, state, middleware=[tel])
        waiting.append((wf, state))
    started = {attrs(s)["gorch.workflow.id"]: s for s in sdk.named("gorch.resume approval")}
    sdk.spans.clear()
    later = max(gorch.next_wakeup(state) or T0 for _, state in waiting)

    with tel.run_due_span() as due:
        for wf, state in waiting:
            due.link(state.id, state)
            (req,) = gorch.due_events(state, now=later)
            gorch.handle_event(wf, state, req.name, pc=req.pc, middleware=[tel], now=later)
            gorch.resume(wf, state, middleware=[tel])
    assert due.count == 2
    run_due = sdk.one("gorch.run_due")
    assert attrs(run_due) == {"gorch.run_due.instances": 2}
    assert [
        ((link.attributes or {})["gorch.workflow.id"], link.context.span_id)
        for link in run_due.links
    ] == [(wid, started[wid].context.span_id) for wid in ("exp-7", "exp-8")]
    children = [s for s in sdk.finished() if parent_id(s) == run_due.context.span_id]
    assert sorted(s.name for s in children) == [
        "gorch.handle_event expired",
        "gorch.handle_event expired",
        "gorch.resume approval",
        "gorch.resume approval",
    ]
    assert run_due.start_time is not None and all(
        s.start_time is not None and s.start_time >= run_due.start_time for s in children
    )


def test_run_due_with_nothing_to_do_exports_no_span(sdk: Sdk) -> None:
    with sdk.telemetry.run_due_span() as due:
        pass
    assert due.count == 0
    assert sdk.finished() == []


# --------------------------------------------------------------------------- metrics


def test_metrics_have_their_units_and_attributes(sdk: Sdk) -> None:
    engine = gorch.Engine("memory://", {"approval": Approval}, middleware=[sdk.telemetry])
    engine.start("approval", "exp-9", {})
    engine.send("exp-9", "decide", approved())

    unit, _ = sdk.metric("gorch.workflow.resume.duration")
    assert unit == "s"
    start = sdk.point(
        "gorch.workflow.resume.duration",
        gorch__workflow__type="approval",
        gorch__resume__reason="start",
        gorch__resume__outcome="waiting",
    )
    assert start.count == 1 and 0 < start.sum < 10
    finish = sdk.point(
        "gorch.workflow.resume.duration",
        gorch__workflow__type="approval",
        gorch__resume__reason="event",
        gorch__resume__outcome="finished",
    )
    assert finish.count == 1
    assert sdk.metric("gorch.step.duration")[0] == "s"
    for step in ("notify", "close"):
        point = sdk.point(
            "gorch.step.duration",
            gorch__workflow__type="approval",
            gorch__step__name=step,
            gorch__step__outcome="completed",
        )
        assert point.count == 1
    assert sdk.metric("gorch.workflow.completed")[0] == "{workflow}"
    done = sdk.point(
        "gorch.workflow.completed",
        gorch__workflow__type="approval",
        gorch__workflow__outcome="finished",
    )
    assert done.value == 1
    assert sdk.metric("gorch.event.received")[0] == "{event}"
    handled = sdk.point(
        "gorch.event.received",
        gorch__workflow__type="approval",
        gorch__event__name="decide",
        gorch__event__outcome="handled",
    )
    assert handled.value == 1


def test_failed_step_metrics(sdk: Sdk) -> None:
    wf, state = Flaky(), gorch.new_state("pay-2", "flaky")
    for _ in range(2):
        with pytest.raises(gorch.StepFailed):
            gorch.resume(wf, state, middleware=[sdk.telemetry])
    failed = sdk.point(
        "gorch.step.duration",
        gorch__workflow__type="flaky",
        gorch__step__name="charge",
        gorch__step__outcome="failed",
        error__type="ValueError",
    )
    assert failed.count == 2
    resume = sdk.point(
        "gorch.workflow.resume.duration",
        gorch__workflow__type="flaky",
        gorch__resume__reason="resume",
        gorch__resume__outcome="failed",
        error__type="gorch.errors.StepFailed",
    )
    assert resume.count == 2


def test_record_methods_for_the_engine(sdk: Sdk) -> None:
    tel = sdk.telemetry
    tel.record_event_rejected("approval", "decide", "stale")
    tel.record_event_rejected("approval", "decide", "stale")
    tel.record_event_rejected("approval", "nope", "not_awaited")
    tel.record_timer_lag("approval", "expired", 2.5)
    tel.record_timer_lag("approval", "expired", 0.5)
    tel.record_conflict("sqlite")
    tel.record_conflict("redis", "approval")
    tel.record_completed("approval", "failed")
    tel.record_completed("approval", "cancelled")

    stale = sdk.point(
        "gorch.event.received",
        gorch__workflow__type="approval",
        gorch__event__name="decide",
        gorch__event__outcome="stale",
    )
    assert stale.value == 2
    assert (
        sdk.point(
            "gorch.event.received",
            gorch__workflow__type="approval",
            gorch__event__name="nope",
            gorch__event__outcome="not_awaited",
        ).value
        == 1
    )
    assert sdk.metric("gorch.timer.lag")[0] == "s"
    lag = sdk.point(
        "gorch.timer.lag", gorch__workflow__type="approval", gorch__event__name="expired"
    )
    assert (lag.count, lag.sum, lag.max) == (2, 3.0, 2.5)
    assert sdk.metric("gorch.store.conflicts")[0] == "{conflict}"
    assert sdk.point("gorch.store.conflicts", gorch__store="sqlite").value == 1
    conflict = sdk.point(
        "gorch.store.conflicts", gorch__store="redis", gorch__workflow__type="approval"
    )
    assert conflict.value == 1
    for outcome in ("failed", "cancelled"):
        point = sdk.point(
            "gorch.workflow.completed",
            gorch__workflow__type="approval",
            gorch__workflow__outcome=outcome,
        )
        assert point.value == 1


def test_rejection_outcome_maps_the_delivery_errors() -> None:
    assert otel.rejection_outcome(gorch.StaleEvent("decide", 3, [4])) == "stale"
    assert otel.rejection_outcome(gorch.EventNotFound("decide", [])) == "not_awaited"
    assert otel.rejection_outcome(gorch.WorkflowFinishedError("x")) == "not_awaited"
    assert otel.rejection_outcome(gorch.AmbiguousEvent("decide", ["a", "b"])) == "ambiguous"
    assert otel.rejection_outcome(gorch.InvalidEventInput("decide", "bad")) == "invalid"
    assert otel.rejection_outcome(ValueError("x")) is None


# --------------------------------------------------------------------------- without an SDK


def _approval_blobs(middleware: list[object]) -> list[bytes]:
    """The blobs of one approval after each call, at a fixed time (timers store it)."""
    wf, state = Approval(), gorch.new_state("exp-10", "approval")
    blobs = []
    with use_clock(lambda: T0):
        gorch.resume(wf, state, middleware=middleware)
        blobs.append(gorch.dumps(wf, state))
        mw = [PassState(state), *middleware]
        gorch.handle_event(wf, state, "decide", approved(), middleware=mw)
        blobs.append(gorch.dumps(wf, state))
        gorch.resume(wf, state, middleware=middleware)
        blobs.append(gorch.dumps(wf, state))
    assert state.meta == {}
    return blobs


def test_without_an_sdk_nothing_changes() -> None:
    plain = _approval_blobs([])
    noop = otel.Telemetry(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider())
    assert not noop.enabled
    assert _approval_blobs([noop]) == plain
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        # No global SDK in this process: the default telemetry is the API's no-op.
        default = otel.default_telemetry()
        assert not default._tracing()
        assert _approval_blobs([default]) == plain
    with noop.run_due_span() as due:
        due.link("exp-10", gorch.new_state("exp-10", "approval"))
    assert due.count == 1 and due.span is None
    noop.record_conflict("memory")  # no-ops, no errors
    noop.record_timer_lag("approval", "expired", 1.0)


def test_an_unsampled_trace_never_touches_the_state() -> None:
    sdk = make_sdk(sampler=ALWAYS_OFF)
    assert _approval_blobs([sdk.telemetry]) == _approval_blobs([])
    assert sdk.finished() == []
    # Metrics do not depend on sampling.
    assert (
        sdk.point(
            "gorch.workflow.completed",
            gorch__workflow__type="approval",
            gorch__workflow__outcome="finished",
        ).value
        == 1
    )


def test_without_the_extra_the_import_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "gorch.otel")
    with pytest.raises(ImportError, match=re.escape("pip install 'gorch[otel]'")):
        importlib.import_module("gorch.otel")


def test_engine_wiring_helpers() -> None:
    sdk = make_sdk()
    other = Middleware()
    tel, chain = otel.with_telemetry([other, sdk.telemetry])
    assert tel is sdk.telemetry and chain == (other, sdk.telemetry)
    tel, chain = otel.with_telemetry([other])
    assert tel is otel.default_telemetry() is otel.default_telemetry()
    assert chain == (tel, other)
