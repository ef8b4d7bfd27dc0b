"""Lifecycle hooks on Workflow and middleware on resume / handle_event / Engine (SPEC §5).

Hooks and middleware record into the module-level ``calls`` list (not into
workflow data), so that recording never changes a blob.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pytest
from freezegun import freeze_time
from pydantic import Field

import gorch
from gorch import (
    DAG,
    On,
    Parallel,
    Retry,
    S,
    Select,
    Step,
    Timeout,
    WaitFor,
)
from gorch import CheckpointKind as CK
from gorch import InstanceStatus as IS
from gorch import ThreadStatus as TS
from gorch import WorkflowStatus as WS

MAIN = gorch.MAIN_THREAD
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
calls: list[tuple[Any, ...]] = []


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


class Decision(pydantic.BaseModel):
    ok: bool


def step_ctx(ctx: gorch.StepContext) -> tuple[Any, ...]:
    return (ctx.workflow, ctx.workflow_id, ctx.thread_id, ctx.step, ctx.attempt)


# --------------------------------------------------------------------------- workflow hooks


class Hooked(gorch.Workflow):
    """Every hook records; ``flaky`` fails ``failures`` times."""

    failures: int = 0
    n: int = 0

    def on_step_start(self, ctx: gorch.StepContext) -> None:
        calls.append(("start", *step_ctx(ctx)))

    def on_step_end(self, ctx: gorch.StepContext) -> None:
        calls.append(("end", ctx.step, ctx.attempt))

    def on_step_error(self, ctx: gorch.StepContext, error: Exception) -> None:
        calls.append(("error", ctx.step, ctx.attempt, repr(error)))

    def on_event(self, ctx: gorch.EventContext, output: Any) -> None:
        calls.append(("on_event", ctx.event, ctx.phase, ctx.thread_id, ctx.input, output))

    def on_waiting(self, awaited: list[gorch.EventRequest]) -> None:
        calls.append(("waiting", [(r.thread_id, r.name) for r in awaited]))

    def on_finish(self) -> None:
        calls.append(("finish",))

    def one(self) -> None:
        calls.append(("run", "one"))
        self.n += 1

    def flaky(self) -> None:
        calls.append(("run", "flaky"))
        if self.failures:
            self.failures -= 1
            raise RuntimeError("flaky broke")

    def decide(self, d: Decision) -> dict[str, bool]:
        calls.append(("handler", d.ok))
        return {"ok": d.ok}

    def definition(self) -> gorch.Section:
        return S(
            Step("one", self.one),
            Select("wait", On("decide", self.decide)),
            Step("flaky", self.flaky),
            WaitFor("cond", lambda: True, lambda: calls.append(("run", "cond"))),
        )


def test_workflow_hooks_are_called_in_order_with_their_contexts() -> None:
    wf = Hooked(failures=1)
    state = gorch.new_state("h-1", "hooked")
    assert gorch.resume(wf, state) is WS.WAITING
    assert calls == [
        ("start", "hooked", "h-1", MAIN, "one", 1),
        ("run", "one"),
        ("end", "one", 1),
        ("waiting", [(MAIN, "decide")]),
    ]
    calls.clear()
    assert gorch.handle_event(wf, state, "decide", {"ok": True}) == {"ok": True}
    assert calls == [
        ("handler", True),
        ("on_event", "decide", "handle", MAIN, {"ok": True}, {"ok": True}),
    ]
    calls.clear()
    with pytest.raises(gorch.StepFailed):
        gorch.resume(wf, state)
    assert calls == [
        ("start", "hooked", "h-1", MAIN, "flaky", 1),
        ("run", "flaky"),
        ("error", "flaky", 1, "RuntimeError('flaky broke')"),
    ]
    calls.clear()
    assert gorch.resume(wf, state) is WS.FINISHED
    assert calls == [
        ("start", "hooked", "h-1", MAIN, "flaky", 2),  # the retry is attempt 2
        ("run", "flaky"),
        ("end", "flaky", 2),
        ("start", "hooked", "h-1", MAIN, "cond", 1),  # a WaitFor's handler is wrapped too
        ("run", "cond"),
        ("end", "cond", 1),
        ("finish",),
    ]


def test_on_waiting_and_on_finish_run_after_the_final_checkpoint() -> None:
    wf = Hooked()
    state = gorch.new_state("h-1", "hooked")
    gorch.resume(wf, state, lambda k: calls.append(("checkpoint", k)))
    assert calls[-2:] == [("checkpoint", CK.AFTER_RESUME), ("waiting", [(MAIN, "decide")])]
    gorch.handle_event(wf, state, "decide", {"ok": False})
    calls.clear()
    gorch.resume(wf, state, lambda k: calls.append(("checkpoint", k)))
    assert calls[-2:] == [("checkpoint", CK.AFTER_RESUME), ("finish",)]


class HookedBranches(Hooked):
    def definition(self) -> gorch.Section:
        return S(
            Parallel("par", Step("p1", self.one), Step("p2", self.one)),
            DAG("d", Step("n1", self.one), Step("n2", self.one, after=["n1"])),
        )


def test_step_context_names_the_thread_of_a_branch_or_node() -> None:
    wf = HookedBranches()
    assert gorch.resume(wf, gorch.new_state("hb", "hb")) is WS.FINISHED
    starts = [(c[3], c[4]) for c in calls if c[0] == "start"]
    assert starts == [("par.p1", "p1"), ("par.p2", "p2"), ("d.n1", "n1"), ("d.n2", "n2")]


class FailingHook(gorch.Workflow):
    """``where`` names the hook that raises; ``mutate`` makes it change data first."""

    where: str = ""
    mutate: bool = False
    n: int = 0

    def _maybe(self, hook: str, step: str) -> None:
        if self.where == hook and step == "work":
            if self.mutate:
                self.n += 100
            raise RuntimeError(f"{hook} broke")

    def on_step_start(self, ctx: gorch.StepContext) -> None:
        calls.append(("start", ctx.step, ctx.attempt))
        self._maybe("on_step_start", ctx.step)

    def on_step_end(self, ctx: gorch.StepContext) -> None:
        calls.append(("end", ctx.step, ctx.attempt))
        self._maybe("on_step_end", ctx.step)

    def on_step_error(self, ctx: gorch.StepContext, error: Exception) -> None:
        calls.append(("error", ctx.step, str(error)))

    def bump(self) -> None:
        calls.append(("run", "bump"))
        self.n += 1

    def work(self) -> None:
        calls.append(("run", "work"))
        self.n += 1
        if self.where == "step":
            raise RuntimeError("step broke")

    def definition(self) -> gorch.Section:
        return S(Step("bump", self.bump), Step("work", self.work))


@pytest.mark.parametrize("hook", ["on_step_start", "on_step_end"])
def test_a_raising_hook_is_the_steps_own_failure(hook: str) -> None:
    # the reference: the step itself raises
    ref_wf = FailingHook(where="step")
    ref = gorch.new_state("f-1", "failing")
    with pytest.raises(gorch.StepFailed):
        gorch.resume(ref_wf, ref)
    calls.clear()

    wf = FailingHook(where=hook)
    state = gorch.new_state("f-1", "failing")
    with pytest.raises(gorch.StepFailed) as info:
        gorch.resume(wf, state)
    err = info.value
    assert type(err) is gorch.StepFailed
    assert (err.step, err.attempts) == ("work", 1)
    assert isinstance(err.__cause__, RuntimeError) and str(err.__cause__) == f"{hook} broke"
    t = state.thread(MAIN)
    assert t is not None
    assert (t.status, t.cur_step, t.attempts) == (TS.EXECUTING, "work", 1)
    assert t.error == f"RuntimeError: {hook} broke"
    # nothing half-applied: the state is the one a failing step leaves, error aside
    t.error = ref.threads[0].error
    assert state == ref
    assert ("error", "work", f"{hook} broke") in calls
    assert (("run", "work") in calls) == (hook == "on_step_end")

    wf.where = ""  # the next resume retries the step, as attempt 2
    calls.clear()
    assert gorch.resume(wf, state) is WS.FINISHED
    assert calls == [("start", "work", 2), ("run", "work"), ("end", "work", 2)]


def test_a_hook_that_changes_data_then_raises_leaves_the_failure_in_the_state() -> None:
    wf = FailingHook(where="on_step_end", mutate=True)
    state = gorch.new_state("f-1", "failing")
    with pytest.raises(gorch.StepFailed):
        gorch.resume(wf, state)
    t = state.thread(MAIN)
    assert t is not None
    assert (t.cur_step, t.status, t.attempts) == ("work", TS.EXECUTING, 1)
    assert t.error == "RuntimeError: on_step_end broke"
    # plain resume does not roll data back (documented): wf may hold the change


@pytest.mark.parametrize("retry", [None, Retry(attempts=3)], ids=["no retry", "retry"])
@pytest.mark.parametrize("hook", ["on_step_start", "on_step_end"])
def test_through_the_engine_a_raising_hook_saves_the_data_from_before_the_step(
    hook: str, retry: Retry | None
) -> None:
    class EngineHook(FailingHook):
        def definition(self) -> gorch.Section:
            return S(Step("bump", self.bump), Step("work", self.work, retry=retry))

    engine = gorch.Engine("memory://", {"hooked": EngineHook})
    started = engine.start("hooked", "e-1", {"where": hook, "mutate": True})
    snap = engine.get("e-1")
    assert started == snap  # start reports the failed instance; it does not raise
    assert snap.status is (IS.FAILED if retry is None else IS.RETRYING)
    assert snap.threads[0].cur_step == "work" and snap.threads[0].attempts == 1
    assert f"{hook} broke" in snap.error
    wf, state = gorch.loads(engine.store.load("e-1").blob, EngineHook)
    assert wf.n == 1  # bump's change is kept; work's and the hook's are not
    assert state.threads[0].error == f"RuntimeError: {hook} broke"


class EventHookFails(gorch.Workflow):
    seen: list[str] = Field(default_factory=list)
    hook_fails: bool = True

    def on_event(self, ctx: gorch.EventContext, output: Any) -> None:
        if self.hook_fails:
            raise ValueError("on_event broke")

    def decide(self, d: Decision) -> str:
        self.seen.append(f"ok={d.ok}")
        return "done"

    def definition(self) -> gorch.Section:
        return S(Select("wait", On("decide", self.decide)))


def test_on_event_raising_is_handler_failed_with_the_state_unchanged() -> None:
    wf = EventHookFails()
    state = gorch.new_state("e-1", "event")
    gorch.resume(wf, state)
    before = copy.deepcopy(state)
    with pytest.raises(gorch.HandlerFailed) as info:
        gorch.handle_event(wf, state, "decide", {"ok": True})
    assert isinstance(info.value.__cause__, ValueError)
    assert "on_event broke" in str(info.value)
    assert state == before
    wf.seen = []  # the handler changed data before the hook raised: callers reload
    assert gorch.dumps(wf, state) == gorch.dumps(EventHookFails(), before)
    assert gorch.awaited_events(state) == [(MAIN, "decide", 1)]
    wf.hook_fails = False
    assert gorch.handle_event(wf, state, "decide", {"ok": True}) == "done"


class EndHookFails(gorch.Workflow):
    n: int = 0

    def on_waiting(self, awaited: list[gorch.EventRequest]) -> None:
        raise RuntimeError("on_waiting broke")

    def on_finish(self) -> None:
        raise RuntimeError("on_finish broke")

    def bump(self) -> None:
        self.n += 1

    def definition(self) -> gorch.Section:
        return S(Step("bump", self.bump), Select("wait", On("go")), Step("bump2", self.bump))


def test_on_waiting_and_on_finish_raising_are_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wf = EndHookFails()
    state = gorch.new_state("w-1", "end")
    with caplog.at_level(logging.ERROR, logger="gorch"):
        assert gorch.resume(wf, state) is WS.WAITING
    (rec,) = [r for r in caplog.records if r.exc_info]
    assert rec.name == "gorch" and rec.levelno >= logging.ERROR
    assert str(rec.exc_info[1]) == "on_waiting broke"  # type: ignore[index]
    assert "w-1" in rec.getMessage()
    caplog.clear()
    gorch.handle_event(wf, state, "go")
    with caplog.at_level(logging.ERROR, logger="gorch"):
        assert gorch.resume(wf, state) is WS.FINISHED
    (rec,) = [r for r in caplog.records if r.exc_info]
    assert str(rec.exc_info[1]) == "on_finish broke"  # type: ignore[index]
    assert wf.n == 2 and state.threads == []


# --------------------------------------------------------------------------- middleware


class Recording(gorch.Middleware):
    """Records entry and exit of every call, tagged with its own name."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def around_resume(self, ctx: gorch.ResumeContext, call_next: Callable[[], Any]) -> Any:
        calls.append((self.tag, "resume>", ctx.reason, ctx.workflow_id))
        out = call_next()
        calls.append((self.tag, "resume<", out))
        return out

    def around_step(self, ctx: gorch.StepContext, call_next: Callable[[], Any]) -> Any:
        calls.append((self.tag, "step>", ctx.step, ctx.thread_id, ctx.attempt))
        try:
            return call_next()
        finally:
            calls.append((self.tag, "step<", ctx.step))

    def around_event(self, ctx: gorch.EventContext, call_next: Callable[[], Any]) -> Any:
        calls.append((self.tag, "event>", ctx.event, ctx.phase, ctx.thread_id, ctx.input))
        out = call_next()
        calls.append((self.tag, "event<", ctx.event, out))
        return out


class Plain(gorch.Workflow):
    n: int = 0

    def inc(self) -> None:
        calls.append(("run", "inc"))
        self.n += 1

    def decide(self, d: Decision) -> str:
        calls.append(("handler", d.ok))
        return f"ok={d.ok}"

    def definition(self) -> gorch.Section:
        return S(
            Step("inc", self.inc),
            Select("wait", On("decide", self.decide)),
            Step("inc again", self.inc),
        )


def test_resume_middleware_runs_in_registration_order_outermost_first() -> None:
    wf = Plain()
    state = gorch.new_state("p-1", "plain")
    mw = [Recording("A"), Recording("B")]
    assert gorch.resume(wf, state, middleware=mw) is WS.WAITING
    assert calls == [
        ("A", "resume>", "resume", "p-1"),
        ("B", "resume>", "resume", "p-1"),
        ("A", "step>", "inc", MAIN, 1),
        ("B", "step>", "inc", MAIN, 1),
        ("run", "inc"),
        ("B", "step<", "inc"),
        ("A", "step<", "inc"),
        ("B", "resume<", WS.WAITING),
        ("A", "resume<", WS.WAITING),
    ]
    calls.clear()
    out = gorch.handle_event(wf, state, "decide", {"ok": True}, middleware=mw)
    assert out == "ok=True"
    assert calls == [
        ("A", "event>", "decide", "handle", MAIN, {"ok": True}),
        ("B", "event>", "decide", "handle", MAIN, {"ok": True}),
        ("handler", True),
        ("B", "event<", "decide", "ok=True"),
        ("A", "event<", "decide", "ok=True"),
    ]
    calls.clear()
    assert gorch.resume(wf, state) is WS.FINISHED  # middleware is per call
    assert calls == [("run", "inc")]


class OnlySteps:
    """Not a Middleware subclass: any object with some of the methods will do."""

    def around_step(self, ctx: gorch.StepContext, call_next: Callable[[], Any]) -> Any:
        calls.append(("only", ctx.step))
        return call_next()


def test_middleware_may_be_any_object_with_some_of_the_methods() -> None:
    wf = Plain()
    state = gorch.new_state("p-1", "plain")
    assert gorch.resume(wf, state, middleware=[OnlySteps()]) is WS.WAITING
    gorch.handle_event(wf, state, "decide", {"ok": False}, middleware=[OnlySteps()])
    assert gorch.resume(wf, state, middleware=[OnlySteps()]) is WS.FINISHED
    assert calls == [
        ("only", "inc"),
        ("run", "inc"),
        ("handler", False),
        ("only", "inc again"),
        ("run", "inc"),
    ]


class SetupTeardown(gorch.Handler):
    def setup(self, req: gorch.EventRequest) -> str:
        calls.append(("setup", req.name))
        return "s"

    def teardown(self, req: gorch.EventRequest, handled: bool) -> None:
        calls.append(("teardown", req.name, handled))


SETUP_TEARDOWN = SetupTeardown()


class WithHandler(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Select("wait", On("go", SETUP_TEARDOWN)))


def test_event_middleware_wraps_setup_handle_and_teardown() -> None:
    wf = WithHandler()
    state = gorch.new_state("s-1", "setup")
    mw = [Recording("A")]
    gorch.resume(wf, state, middleware=mw)
    gorch.handle_event(wf, state, "go", 7, middleware=mw)
    gorch.resume(wf, state, middleware=mw)
    assert [c for c in calls if c[1] == "event>"] == [
        ("A", "event>", "go", "setup", MAIN, None),
        ("A", "event>", "go", "handle", MAIN, 7),
        ("A", "event>", "go", "teardown", MAIN, None),
    ]
    assert [c for c in calls if c[0] in ("setup", "teardown")] == [
        ("setup", "go"),
        ("teardown", "go", True),
    ]


class Veto(gorch.Middleware):
    def around_step(self, ctx: gorch.StepContext, call_next: Callable[[], Any]) -> Any:
        if ctx.step == "inc again":
            raise PermissionError(f"no {ctx.step}")
        return call_next()

    def around_event(self, ctx: gorch.EventContext, call_next: Callable[[], Any]) -> Any:
        raise PermissionError(f"no {ctx.event}")


def test_middleware_can_veto_a_step_or_an_event() -> None:
    wf = Plain()
    state = gorch.new_state("p-1", "plain")
    gorch.resume(wf, state, middleware=[Veto()])
    assert calls == [("run", "inc")]

    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.HandlerFailed) as hinfo:
        gorch.handle_event(wf, state, "decide", {"ok": True}, middleware=[Veto()])
    assert isinstance(hinfo.value.__cause__, PermissionError)
    assert gorch.dumps(wf, state) == before
    assert calls == [("run", "inc")]  # the handler never ran

    gorch.handle_event(wf, state, "decide", {"ok": True})
    with pytest.raises(gorch.StepFailed) as sinfo:
        gorch.resume(wf, state, middleware=[Veto()])
    assert sinfo.value.step == "inc again"
    assert isinstance(sinfo.value.__cause__, PermissionError)
    t = state.thread(MAIN)
    assert t is not None
    assert (t.cur_step, t.attempts, t.error) == ("inc again", 1, "PermissionError: no inc again")
    assert wf.n == 1  # the step never ran
    assert gorch.resume(wf, state) is WS.FINISHED  # without the veto it runs
    assert wf.n == 2


class RetryOnce(gorch.Middleware):
    def around_step(self, ctx: gorch.StepContext, call_next: Callable[[], Any]) -> Any:
        try:
            return call_next()
        except RuntimeError:
            calls.append(("retrying", ctx.step))
            return call_next()


def test_middleware_can_retry_a_step_by_calling_call_next_again() -> None:
    wf = Hooked(failures=1)
    state = gorch.new_state("r-1", "hooked")
    gorch.resume(wf, state)
    gorch.handle_event(wf, state, "decide", {"ok": True})
    calls.clear()
    assert gorch.resume(wf, state, middleware=[RetryOnce()]) is WS.FINISHED
    flaky = [c for c in calls if "flaky" in c]
    assert flaky == [
        ("start", "hooked", "r-1", MAIN, "flaky", 1),
        ("run", "flaky"),
        ("error", "flaky", 1, "RuntimeError('flaky broke')"),
        ("retrying", "flaky"),
        ("start", "hooked", "r-1", MAIN, "flaky", 1),
        ("run", "flaky"),
        ("end", "flaky", 1),
    ]


class TimeAndEnrich(gorch.Middleware):
    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    def around_step(self, ctx: gorch.StepContext, call_next: Callable[[], Any]) -> Any:
        ctx.extra["request_id"] = f"req-{ctx.step}"
        t0 = time.perf_counter()
        try:
            return call_next()
        finally:
            self.durations[ctx.step] = time.perf_counter() - t0


class ReadsExtra(gorch.Middleware):
    def around_step(self, ctx: gorch.StepContext, call_next: Callable[[], Any]) -> Any:
        calls.append(("inner sees", ctx.extra.get("request_id")))
        return call_next()


class Sleepy(gorch.Workflow):
    def nap(self) -> None:
        time.sleep(0.02)

    def definition(self) -> gorch.Section:
        return S(Step("nap", self.nap), Step("quick", lambda: None))


def test_middleware_can_time_a_step_and_enrich_its_context() -> None:
    timer = TimeAndEnrich()
    wf = Sleepy()
    assert gorch.resume(wf, gorch.new_state("t", "t"), middleware=[timer, ReadsExtra()])
    assert timer.durations["nap"] >= 0.02
    assert 0 <= timer.durations["quick"] < timer.durations["nap"]
    assert calls == [("inner sees", "req-nap"), ("inner sees", "req-quick")]


def test_middleware_that_raises_after_the_step_ran_fails_the_step() -> None:
    class After(gorch.Middleware):
        def around_step(self, ctx: gorch.StepContext, call_next: Callable[[], Any]) -> Any:
            call_next()
            raise RuntimeError("after")

    wf = Plain()
    state = gorch.new_state("p-1", "plain")
    with pytest.raises(gorch.StepFailed):
        gorch.resume(wf, state, middleware=[After()])
    t = state.thread(MAIN)
    assert t is not None
    assert (t.cur_step, t.status, t.error) == ("inc", TS.EXECUTING, "RuntimeError: after")
    assert gorch.resume(wf, state) is WS.WAITING  # retried: the step runs again
    assert calls == [("run", "inc"), ("run", "inc")]


# --------------------------------------------------------------------------- Engine middleware


class Timed(gorch.Workflow):
    n: int = 0

    def inc(self) -> None:
        calls.append(("run", "inc"))
        self.n += 1

    def definition(self) -> gorch.Section:
        return S(
            Step("inc", self.inc),
            Select("wait", On("go"), Timeout("late", timedelta(hours=1))),
            Step("after", self.inc),
            Select("wait2", On("go2")),
        )


def test_engine_middleware_wraps_everything_the_engine_runs() -> None:
    engine = gorch.Engine("memory://", {"timed": Timed}, middleware=[Recording("A"), OnlySteps()])
    with freeze_time(T0):
        snap = engine.start("timed", "t-1")
    assert snap.status is IS.WAITING
    assert calls == [
        ("A", "resume>", "start", "t-1"),
        ("A", "step>", "inc", MAIN, 1),
        ("only", "inc"),
        ("run", "inc"),
        ("A", "step<", "inc"),
        ("A", "event>", "late", "setup", MAIN, None),
        ("A", "event<", "late", (T0 + timedelta(hours=1)).isoformat()),
        ("A", "resume<", WS.WAITING),
    ]
    calls.clear()
    (result,) = engine.run_due(T0 + timedelta(hours=2))
    assert result.action == "timer" and result.fired == ["late"]
    assert [c[:4] for c in calls if c[0] == "A" and c[1].endswith(">")] == [
        ("A", "event>", "late", "handle"),
        ("A", "resume>", "timer", "t-1"),
        ("A", "step>", "after", MAIN),
    ]
    calls.clear()
    engine.send("t-1", "go2")
    assert [c[:4] for c in calls if c[0] == "A" and c[1].endswith(">")] == [
        ("A", "event>", "go2", "handle"),
        ("A", "resume>", "event", "t-1"),
    ]
    assert engine.get("t-1").status is IS.FINISHED


class Flaky(gorch.Workflow):
    broken: bool = True

    def work(self) -> None:
        calls.append(("run", "work"))
        if self.broken:
            raise RuntimeError("work broke")

    def definition(self) -> gorch.Section:
        return S(Step("work", self.work))


def test_engine_middleware_sees_the_retry_reason_and_can_veto() -> None:
    class VetoAll(gorch.Middleware):
        def around_step(self, ctx: gorch.StepContext, call_next: Callable[[], Any]) -> Any:
            ctx.wf.broken = False  # a change made before vetoing is not saved
            raise PermissionError("vetoed")

    engine = gorch.Engine("memory://", {"flaky": Flaky}, middleware=[Recording("A")])
    assert engine.start("flaky", "f-1").status is IS.FAILED
    assert engine.get("f-1").status is IS.FAILED
    calls.clear()
    with pytest.raises(gorch.StepFailed):
        engine.retry("f-1")
    assert calls[0] == ("A", "resume>", "retry", "f-1")
    assert ("A", "step>", "work", MAIN, 1) in calls  # retry resets the attempts

    vetoing = gorch.Engine(engine.store, {"flaky": Flaky}, middleware=[VetoAll()])
    calls.clear()
    with pytest.raises(gorch.StepFailed) as info:
        vetoing.retry("f-1")
    assert isinstance(info.value.__cause__, PermissionError)
    assert calls == []  # the step never ran
    snap = vetoing.get("f-1")
    assert snap.status is IS.FAILED and snap.error == "PermissionError: vetoed"
    assert snap.data == {"broken": True}


# --------------------------------------------------------------------------- LoggingMiddleware


def test_logging_middleware_logs_steps_events_and_resumes_with_extra_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wf = Plain()
    state = gorch.new_state("l-1", "plain")
    mw = [gorch.LoggingMiddleware()]
    with caplog.at_level(logging.INFO, logger="gorch"):
        gorch.resume(wf, state, middleware=mw)
        gorch.handle_event(wf, state, "decide", {"ok": True}, middleware=mw)
    step = next(r for r in caplog.records if getattr(r, "gorch_step", None) == "inc")
    assert step.name == "gorch" and step.levelno == logging.INFO
    assert step.gorch_workflow == "plain"  # type: ignore[attr-defined]
    assert step.gorch_workflow_id == "l-1"  # type: ignore[attr-defined]
    assert step.gorch_thread == MAIN  # type: ignore[attr-defined]
    assert step.gorch_attempt == 1  # type: ignore[attr-defined]
    assert isinstance(step.gorch_duration, float) and step.gorch_duration >= 0  # type: ignore[attr-defined]
    assert "inc" in step.getMessage()
    resume = next(r for r in caplog.records if hasattr(r, "gorch_reason"))
    assert (resume.gorch_reason, resume.gorch_workflow_id) == ("resume", "l-1")  # type: ignore[attr-defined]
    assert resume.gorch_duration >= step.gorch_duration  # type: ignore[attr-defined]
    event = next(r for r in caplog.records if hasattr(r, "gorch_event"))
    assert (event.gorch_event, event.gorch_phase) == ("decide", "handle")  # type: ignore[attr-defined]
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)


def test_logging_middleware_logs_failures_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    wf = Flaky()
    state = gorch.new_state("l-2", "flaky")
    with caplog.at_level(logging.INFO, logger="app"), pytest.raises(gorch.StepFailed):
        gorch.resume(wf, state, middleware=[gorch.LoggingMiddleware("app")])
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    step = next(r for r in warn if getattr(r, "gorch_step", None) == "work")
    assert step.name == "app"
    assert step.gorch_error == "RuntimeError: work broke"  # type: ignore[attr-defined]
    assert step.gorch_attempt == 1  # type: ignore[attr-defined]
    assert step.gorch_duration >= 0  # type: ignore[attr-defined]
    assert any(hasattr(r, "gorch_reason") for r in warn)  # the resume failed too
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app"), pytest.raises(gorch.StepFailed):
        gorch.resume(wf, state, middleware=[gorch.LoggingMiddleware("app")])
    step = next(r for r in caplog.records if getattr(r, "gorch_step", None) == "work")
    assert step.gorch_attempt == 2  # type: ignore[attr-defined]


def test_logging_middleware_level_and_a_silent_logger(caplog: pytest.LogCaptureFixture) -> None:
    wf = Plain()
    with caplog.at_level(logging.DEBUG, logger="dbg"):
        gorch.resume(
            wf,
            gorch.new_state("l-3", "plain"),
            middleware=[gorch.LoggingMiddleware(logging.getLogger("dbg"), level=logging.DEBUG)],
        )
    levels = {r.levelno for r in caplog.records if r.name == "dbg"}
    assert levels == {logging.DEBUG}
    caplog.clear()
    logging.getLogger("quiet").setLevel(logging.ERROR)
    wf = Plain()
    assert (
        gorch.resume(
            wf, gorch.new_state("l-4", "plain"), middleware=[gorch.LoggingMiddleware("quiet")]
        )
        is WS.WAITING
    )
    assert wf.n == 1
    assert [r for r in caplog.records if r.name == "quiet"] == []


def test_engine_event_middleware_veto_leaves_the_stored_instance_unchanged() -> None:
    engine = gorch.Engine("memory://", {"plain": Plain}, middleware=[Veto()])
    engine.start("plain", "v-1")
    rec = engine.store.load("v-1")
    with pytest.raises(gorch.HandlerFailed) as info:
        engine.send("v-1", "decide", {"ok": True})
    assert isinstance(info.value.__cause__, PermissionError)
    after = engine.store.load("v-1")
    assert (after.version, after.blob, after.status) == (rec.version, rec.blob, rec.status)
    assert calls == [("run", "inc")]  # the handler never ran


def test_a_middleware_whose_enabled_is_false_is_skipped_for_that_call() -> None:
    class Switchable(gorch.Middleware):
        enabled = False
        seen: list[str] = []

        def around_step(self, ctx: gorch.StepContext, call_next: Any) -> Any:
            self.seen.append(ctx.step)
            return call_next()

    class Two(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return gorch.S(gorch.Step("one", noop_step), gorch.Step("two", noop_step))

    mw = Switchable()
    wf, state = Two(), gorch.new_state("t", "two")
    assert gorch.resume(wf, state, middleware=[mw]) is gorch.WorkflowStatus.FINISHED
    assert mw.seen == []  # off: not even entered
    mw.enabled = True
    wf, state = Two(), gorch.new_state("t", "two")
    gorch.resume(wf, state, middleware=[mw])
    assert mw.seen == ["one", "two"]


def noop_step() -> None:
    pass
