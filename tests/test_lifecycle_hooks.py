"""``on_start`` and ``on_failed``: the run's first and failed-for-good ends, under every API."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pydantic
import pytest

import gorch
from gorch import DAG, On, S, Select, Step

WS = gorch.WorkflowStatus


class Hooked(gorch.Workflow):
    calls: list[Any] = pydantic.Field(default_factory=list)
    fail: int = 0  # how many times step b fails
    attempts: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Step("a", lambda: self.calls.append("a")),
            Step("b", self.b, retry=gorch.Retry(attempts=2, backoff=0)),
            Select("wait", On("go")),
        )

    def b(self) -> None:
        self.attempts += 1
        if self.attempts <= self.fail:
            raise RuntimeError(f"b broke ({self.attempts})")
        self.calls.append("b")

    def on_start(self) -> None:
        self.calls.append("start")

    def on_failed(self, error: Exception) -> None:
        self.calls.append(["failed", type(error).__name__, str(error.__cause__)])


def test_on_start_runs_once_before_the_first_step_under_plain_resume() -> None:
    wf = Hooked()
    state = gorch.new_state("h-1", "hooked")
    assert gorch.resume(wf, state) is WS.WAITING
    gorch.handle_event(wf, state, "go")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.calls == ["start", "a", "b"]


def test_on_start_runs_under_the_async_api_too() -> None:
    wf = Hooked()
    assert asyncio.run(gorch.aresume(wf, gorch.new_state("h-1", "hooked"))) is WS.WAITING
    assert wf.calls == ["start", "a", "b"]


def test_on_start_raising_changes_nothing_and_is_called_again() -> None:
    class Refuses(Hooked):
        def on_start(self) -> None:
            super().on_start()
            if len(self.calls) == 1:
                raise ValueError("not yet")

    wf = Refuses()
    state = gorch.new_state("h-1", "hooked")
    before = gorch.dumps(wf, state)
    with pytest.raises(ValueError, match="not yet"):
        gorch.resume(wf, state)
    assert gorch.dumps(Refuses(), state) == before  # the state: untouched
    assert gorch.resume(wf, state) is WS.WAITING
    assert wf.calls == ["start", "start", "a", "b"]


def test_on_failed_waits_for_the_last_attempt_of_the_policy() -> None:
    wf = Hooked(fail=5)
    state = gorch.new_state("h-1", "hooked")
    with pytest.raises(gorch.StepFailed):
        gorch.resume(wf, state)
    assert wf.calls == ["start", "a"]  # attempt 1 of 2: a retry is left
    with pytest.raises(gorch.StepFailed):
        gorch.resume(wf, state)
    assert wf.calls == ["start", "a", ["failed", "StepFailed", "b broke (2)"]]


def test_a_step_without_a_policy_fails_for_good_at_once_and_a_raising_hook_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class NoPolicy(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(Step("x", self.x))

        def x(self) -> None:
            raise RuntimeError("x broke")

        def on_failed(self, error: Exception) -> None:
            raise KeyError("the hook broke")

    with pytest.raises(gorch.StepFailed) as info:
        gorch.resume(NoPolicy(), gorch.new_state("n-1", "np"))
    assert str(info.value.__cause__) == "x broke"  # the step's failure, not the hook's
    assert "the on_failed hook of workflow 'n-1' raised" in caplog.text


def test_on_failed_gets_the_dag_failure() -> None:
    class Nodes(Hooked):
        def definition(self) -> gorch.Section:
            return S(DAG("d", Step("ok", lambda: None), Step("bad", self.bad)))

        def bad(self) -> None:
            raise RuntimeError("node broke")

    wf = Nodes()
    with pytest.raises(gorch.DAGFailed):
        gorch.resume(wf, gorch.new_state("d-1", "nodes"))
    assert wf.calls[0] == "start"
    assert wf.calls[-1][:2] == ["failed", "DAGFailed"]


def test_the_test_kit_and_the_engine_call_both_hooks() -> None:
    from gorch.testing import WorkflowEnv

    env = WorkflowEnv({"hooked": Hooked})
    inst = env.start("hooked", "h-1")
    assert inst.data.calls == ["start", "a", "b"]  # type: ignore[attr-defined]

    from gorch.stores.memory import MemoryStore

    seen: list[Any] = []

    class Seen(Hooked):  # hooks run after the save: what they record goes elsewhere
        def on_start(self) -> None:
            seen.append("start")

        def on_failed(self, error: Exception) -> None:
            seen.append(["failed", str(error.__cause__)])

    engine = gorch.Engine(MemoryStore(), {"seen": Seen})
    engine.start("seen", "h-2", data={"fail": 5})
    assert seen == ["start"]  # attempt 1 of 2: a retry is left
    engine.run_due(now=gorch.clock.now() + timedelta(minutes=1))
    assert engine.get("h-2").status == "failed"
    assert seen == ["start", ["failed", "b broke (1)"]]  # (the Engine restores the data)


class Alerts(gorch.Middleware):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_failed(self, ctx: gorch.ResumeContext, error: Exception) -> None:
        self.seen.append([ctx.workflow_id, ctx.reason, type(error).__name__])


class AsyncAlerts(Alerts):
    async def on_failed_async(self, ctx: gorch.ResumeContext, error: Exception) -> None:
        await asyncio.sleep(0)
        self.seen.append(["async", type(error).__name__])


def test_middleware_hears_of_a_failure_for_good_after_the_workflow_hook() -> None:
    alerts = Alerts()
    wf = Hooked(fail=5)
    state = gorch.new_state("h-1", "hooked")
    for _ in range(2):
        with pytest.raises(gorch.StepFailed):
            gorch.resume(wf, state, middleware=[alerts])
    assert alerts.seen == [["h-1", "failed", "StepFailed"]]  # once: the second attempt
    assert wf.calls[-1][0] == "failed"


def test_async_middleware_hears_of_it_under_the_async_api() -> None:
    alerts = AsyncAlerts()

    async def go() -> None:
        state = gorch.new_state("h-1", "hooked")
        wf = Hooked(fail=5)
        for _ in range(2):
            with pytest.raises(gorch.StepFailed):
                await gorch.aresume(wf, state, middleware=[alerts])

    asyncio.run(go())
    assert alerts.seen == [["async", "StepFailed"]]


def test_a_caller_that_saves_first_reports_the_failure_itself() -> None:
    alerts = Alerts()
    wf = Hooked(fail=5, attempts=1)  # the second attempt: none left after it
    state = gorch.new_state("h-1", "hooked")
    state.threads[0].attempts = 1
    with pytest.raises(gorch.StepFailed) as info:
        gorch.interpreter.run(wf, state, middleware=[alerts], report_failures=False)
    assert alerts.seen == [] and not any(isinstance(c, list) for c in wf.calls)
    gorch.interpreter.report_failure(wf, state, info.value, [alerts])
    assert alerts.seen == [["h-1", "failed", "StepFailed"]]
    assert wf.calls[-1][0] == "failed"
