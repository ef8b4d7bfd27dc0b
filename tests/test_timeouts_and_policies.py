"""Per-step timeouts, retry policies of DAGs and Parallels, and isolated DAG nodes."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pydantic
import pytest

import gorch
from gorch import DAG, Parallel, S, Step
from gorch.interpreter import retry_policy

WS = gorch.WorkflowStatus


class Slow(gorch.Workflow):
    ran: list[str] = pydantic.Field(default_factory=list)
    delay: float = 0.05

    def definition(self) -> gorch.Section:
        return S(Step("plain", self.plain, timeout=0.01), Step("after", self.after))

    def plain(self) -> str:
        time.sleep(self.delay)
        self.ran.append("plain")
        return "late"

    def after(self) -> None:
        self.ran.append("after")


def test_a_plain_step_returning_late_fails_and_its_result_is_dropped() -> None:
    wf = Slow()
    state = gorch.new_state("t-1", "slow")
    with pytest.raises(gorch.StepFailed) as info:
        gorch.resume(wf, state)
    cause = info.value.__cause__
    assert isinstance(cause, gorch.StepTimeout)
    assert cause.step == "plain" and cause.timeout == 0.01 and cause.took is not None
    assert "over its timeout of 0.01 s" in str(cause)
    assert state.results == {} and wf.ran == ["plain"]  # it ran, but failed: not recorded
    wf.delay = 0
    assert gorch.resume(wf, state) is WS.FINISHED
    assert state.results == {"plain": "late"}


class Watched(Slow):
    """``Slow`` with step hooks: they must hear of the timeout as a failure."""

    heard: list[str] = pydantic.Field(default_factory=list)

    def on_step_end(self, ctx: gorch.StepContext) -> None:
        self.heard.append(f"end {ctx.step}")

    def on_step_error(self, ctx: gorch.StepContext, error: Exception) -> None:
        self.heard.append(f"error {ctx.step} {type(error).__name__}")


class Outcomes(gorch.Middleware):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def around_step(self, ctx: gorch.StepContext, call_next: Any) -> Any:
        self.seen.append(f"{ctx.step} has timeout={ctx.timeout}")
        try:
            out = call_next()
        except Exception as e:
            self.seen.append(f"{ctx.step} raised {type(e).__name__}")
            raise
        self.seen.append(f"{ctx.step} returned {out!r}")
        return out


@pytest.mark.parametrize("api", ["sync", "async"])
def test_hooks_middleware_and_history_see_a_late_step_fail(api: str, tmp_path: Any) -> None:
    mw = Outcomes()
    wf, state = Watched(), gorch.new_state("t-1", "watched")
    with pytest.raises(gorch.StepFailed):
        if api == "sync":
            gorch.resume(wf, state, middleware=[mw])
        else:
            asyncio.run(gorch.aresume(wf, state, middleware=[mw]))
    assert wf.heard == ["error plain StepTimeout"]  # never "end plain"
    assert mw.seen == ["plain has timeout=0.01", "plain raised StepTimeout"]
    engine = gorch.Engine(f"sqlite:///{tmp_path}/t.db", {"watched": Watched})
    assert engine.start("watched", "t-2").status == "failed"
    [step] = [e for e in engine.history("t-2") if e.kind == "step"]
    assert step.name == "plain" and step.error is not None and "StepTimeout" in step.error


class AsyncSlow(gorch.Workflow):
    cancelled: list[str] = pydantic.Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            Step("alone", self.slow("alone"), timeout=timedelta(milliseconds=20)),
        )

    def slow(self, name: str) -> Any:
        async def step() -> None:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                self.cancelled.append(name)
                raise

        return step


def test_an_async_step_is_cancelled_at_its_timeout() -> None:
    wf = AsyncSlow()
    began = time.monotonic()
    with pytest.raises(gorch.StepFailed) as info:
        asyncio.run(gorch.aresume(wf, gorch.new_state("t-1", "a")))
    assert time.monotonic() - began < 2
    assert isinstance(info.value.__cause__, gorch.StepTimeout)
    assert wf.cancelled == ["alone"]


def test_a_concurrent_step_times_out_alone_and_its_sibling_commits() -> None:
    class Branches(AsyncSlow):
        def definition(self) -> gorch.Section:
            return S(
                Step("slow", self.slow("slow"), timeout=0.02) | Step("quick", self.quick),
            )

        async def quick(self) -> str:
            return "q"

    wf = Branches()
    state = gorch.new_state("t-1", "b")
    with pytest.raises(gorch.ParallelFailed) as info:
        asyncio.run(gorch.aresume(wf, state))
    assert "StepTimeout" in info.value.failed["slow"]
    assert state.results == {"quick": "q"}


@pytest.mark.parametrize("bad", [0, -1, "1s", True])
def test_a_bad_timeout_is_refused_where_the_step_is_written(bad: object) -> None:
    with pytest.raises(gorch.DefinitionError, match="Step timeout"):
        Step("s", lambda: None, timeout=bad)  # type: ignore[arg-type]


class Policies(gorch.Workflow):
    default_retry = gorch.Retry(attempts=9)

    def definition(self) -> gorch.Section:
        return S(
            Step("top", self.nop),
            DAG(
                "d",
                Step("node", self.nop),
                Step("own", self.nop, retry=gorch.Retry(attempts=1)),
                retry=gorch.Retry(attempts=4),
            ),
            Parallel("p", Step("branch", self.nop), retry=gorch.Retry(attempts=2)),
        )

    def nop(self) -> None:
        return None


def test_a_step_takes_its_own_policy_else_its_dags_or_parallels_else_the_class_default() -> None:
    wf = Policies()
    assert retry_policy(wf, "own") == gorch.Retry(attempts=1)
    assert retry_policy(wf, "node") == gorch.Retry(attempts=4)
    assert retry_policy(wf, "branch") == gorch.Retry(attempts=2)
    assert retry_policy(wf, "top") == gorch.Retry(attempts=9)


def test_a_dag_policy_retries_its_nodes() -> None:
    class Flaky(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(DAG("d", Step("n", self.n), retry=gorch.Retry(attempts=2, backoff=0)))

        def n(self, ctx: gorch.StepContext) -> None:
            if ctx.attempt == 1:
                raise RuntimeError("first attempt")

    state = gorch.new_state("f", "f")
    with pytest.raises(gorch.StepFailed) as info:
        gorch.resume(Flaky(), state)
    assert info.value.retry_at is not None  # the DAG's policy: one attempt left
    assert gorch.resume(Flaky(), state) is WS.FINISHED


class Isolated(gorch.Workflow):
    seen: dict[str, Any] = pydantic.Field(default_factory=dict)

    def definition(self) -> gorch.Section:
        return S(
            Step("input", lambda: "in"),
            DAG(
                "d",
                Step("a", lambda: "A"),
                Step("b", lambda: "B"),
                Step("c", self.c, after=["a"]),
                isolated=True,
            ),
        )

    def c(self, ctx: gorch.StepContext) -> None:
        self.seen = dict(ctx.results)
        ctx.result("b")


def test_an_isolated_dag_node_reads_its_ancestors_and_the_flow_input_only() -> None:
    wf = Isolated()
    with pytest.raises(gorch.DAGFailed) as info:
        gorch.resume(wf, gorch.new_state("i", "i"))
    assert wf.seen == {"input": "in", "a": "A"}  # not b: a sibling
    assert "the result of 'b' is not visible here" in info.value.failed["c"]
