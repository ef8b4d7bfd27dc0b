"""Retries without an Engine (plain resume, the test kit) and a deadline for one call."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pydantic
import pytest
from freezegun import freeze_time

import gorch
from gorch import For, S, Step
from gorch.testing import WorkflowEnv

WS = gorch.WorkflowStatus
T0 = datetime(2031, 5, 1, 12, 0, tzinfo=UTC)


class Flaky(gorch.Workflow):
    """Step ``call`` fails ``fail`` times; a class default policy covers it."""

    default_retry = gorch.Retry(attempts=3, backoff=10, multiplier=2)
    fail: int = 0
    tries: int = 0
    done: bool = False

    def definition(self) -> gorch.Section:
        return S(Step("call", self.call), Step("end", self.end))

    def call(self, ctx: gorch.StepContext) -> None:
        self.tries += 1  # (the test kit and the Engine put data back after a failure)
        if ctx.attempt <= self.fail:
            raise ConnectionError(f"attempt {ctx.attempt}")

    def end(self) -> None:
        self.done = True


def test_a_failure_with_attempts_left_says_when_to_retry() -> None:
    wf = Flaky(fail=5)
    state = gorch.new_state("f-1", "flaky")
    with freeze_time(T0), pytest.raises(gorch.StepFailed) as info:
        gorch.resume(wf, state)
    assert info.value.retry_at == T0 + timedelta(seconds=10)  # default_retry's first backoff
    with freeze_time(T0 + timedelta(seconds=10)), pytest.raises(gorch.StepFailed) as info:
        gorch.resume(wf, state)
    assert info.value.retry_at == T0 + timedelta(seconds=30)  # 10 s later, then 20 s
    with freeze_time(T0 + timedelta(seconds=30)), pytest.raises(gorch.StepFailed) as info:
        gorch.resume(wf, state)
    assert info.value.retry_at is None  # 3 attempts: none left


def test_a_step_policy_overrides_the_workflow_default() -> None:
    class Own(Flaky):
        def definition(self) -> gorch.Section:
            return S(Step("call", self.call, retry=gorch.Retry(attempts=1)), Step("end", self.end))

    with pytest.raises(gorch.StepFailed) as info:
        gorch.resume(Own(fail=1), gorch.new_state("f-1", "own"))
    assert info.value.retry_at is None
    assert gorch.interpreter.retry_policy(Own(), "call") == gorch.Retry(attempts=1)
    assert gorch.interpreter.retry_policy(Own(), "end") == Flaky.default_retry


def test_wait_retries_runs_the_step_again_in_the_same_call(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(gorch.interpreter.time, "sleep", slept.append)

    class Quick(Flaky):
        default_retry = gorch.Retry(attempts=3, backoff=0.5, multiplier=1)

    wf = Quick(fail=2)
    with freeze_time(T0):
        assert gorch.resume(wf, gorch.new_state("f-1", "q"), wait_retries=True) is WS.FINISHED
    assert (wf.tries, wf.done, slept) == (3, True, [0.5, 0.5])


def test_wait_retries_gives_up_when_no_attempt_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gorch.interpreter.time, "sleep", lambda s: None)
    wf = Flaky(fail=9)
    with pytest.raises(gorch.StepFailed) as info:
        gorch.resume(wf, gorch.new_state("f-1", "f"), wait_retries=True)
    assert (info.value.attempts, info.value.retry_at, wf.tries) == (3, None, 3)


def test_wait_retries_under_the_async_api() -> None:
    class Quick(Flaky):
        default_retry = gorch.Retry(attempts=2, backoff=0.01, multiplier=1)

    wf = Quick(fail=1)
    state = gorch.new_state("f-1", "q")
    assert asyncio.run(gorch.aresume(wf, state, wait_retries=True)) is WS.FINISHED
    assert (wf.tries, wf.done) == (2, True)


def test_the_test_kit_retries_a_failed_step_when_its_backoff_has_passed() -> None:
    env = WorkflowEnv({"flaky": Flaky})
    with pytest.raises(gorch.StepFailed):
        env.start("flaky", "f-1", data={"fail": 2})
    env.advance(seconds=9)
    assert env.get("f-1").state.threads[0].attempts == 1
    env.advance(seconds=1)  # the first retry (fails again), then 20 s to the next
    assert env.get("f-1").state.threads[0].attempts == 2
    env.advance(seconds=20)
    inst = env.get("f-1")
    assert inst.status is WS.FINISHED and inst.data.done  # type: ignore[attr-defined]


def test_the_test_kit_raises_a_failure_with_no_attempt_left() -> None:
    env = WorkflowEnv({"flaky": Flaky})
    with pytest.raises(gorch.StepFailed):
        env.start("flaky", "f-1", data={"fail": 9})
    with pytest.raises(gorch.StepFailed) as info:
        env.advance(minutes=5)
    assert info.value.attempts == 3


class Long(gorch.Workflow):
    i: int = 0
    clock_step: int = 0  # seconds each step takes on the frozen clock

    def definition(self) -> gorch.Section:
        return S(For("loop", self.i < 5, Step("work", self.work)))

    def work(self) -> None:
        self.i += 1


def test_a_deadline_ends_the_call_between_steps_and_a_later_call_goes_on() -> None:
    with freeze_time(T0) as clock:
        wf = Long()
        state = gorch.new_state("l-1", "long")

        class Ticking(Long):
            def work(self) -> None:
                super().work()
                clock.tick(timedelta(seconds=1))

        wf = Ticking()
        saved: list[bytes] = []
        deadline = T0 + timedelta(seconds=2)
        status = gorch.resume(
            wf, state, lambda k: saved.append(gorch.dumps(wf, state)), deadline=deadline
        )
        assert (status, wf.i) == (WS.RESUMING, 2)  # two steps, then the deadline
        assert gorch.loads(saved[-1], Ticking)[0].i == 2  # the end was saved
        assert gorch.resume(wf, state) is WS.FINISHED
        assert wf.i == 5


def test_a_deadline_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware datetime"):
        gorch.resume(Long(), gorch.new_state("l-1", "long"), deadline=datetime(2031, 1, 1))


def test_an_async_deadline_commits_the_round_in_flight_and_starts_nothing_more() -> None:
    class Branches(gorch.Workflow):
        log: list[str] = pydantic.Field(default_factory=list)

        def definition(self) -> gorch.Section:
            return S(
                S(Step("a1", self.s("a1")), Step("a2", self.s("a2")))
                | S(Step("b1", self.s("b1")), Step("b2", self.s("b2")))
            )

        def s(self, name: str):  # type: ignore[no-untyped-def]
            async def step() -> None:
                await asyncio.sleep(0.05)
                self.log.append(name)

            return step

    wf = Branches()
    state = gorch.new_state("b-1", "b")
    deadline = datetime.now(UTC) + timedelta(seconds=0.02)  # passes while round 1 flies
    assert asyncio.run(gorch.aresume(wf, state, deadline=deadline)) is WS.RESUMING
    assert wf.log == ["a1", "b1"]
    assert asyncio.run(gorch.aresume(wf, state)) is WS.FINISHED
    assert wf.log == ["a1", "b1", "a2", "b2"]


# --------------------------------------------------------------------------- Engine(run_deadline=)


class Slow(gorch.Workflow):
    """Five steps; each takes a second on the clock the test moves."""

    i: int = 0

    def definition(self) -> gorch.Section:
        return S(For("loop", self.i < 5, Step("work", self.work)))

    def work(self) -> None:
        self.i += 1
        _TICK[0] += timedelta(seconds=1)


_TICK = [T0]


def _engine_clock() -> datetime:
    return _TICK[0]


def test_the_engine_run_deadline_leaves_the_rest_to_run_due(tmp_path: object) -> None:
    _TICK[0] = T0
    engine = gorch.Engine(f"sqlite:///{tmp_path}/d.db", {"slow": Slow}, run_deadline=2.5)
    with gorch.clock.use_clock(_engine_clock):
        snap = engine.start("slow", "s-1")
        # Steps at 0 s, 1 s and 2 s started before the deadline (2.5 s); none from 3 s on.
        assert (snap.status, snap.data["i"]) == ("resuming", 3)
        rec = engine.store.load("s-1")
        assert (rec.status, rec.wake_at) == ("resuming", T0 + timedelta(seconds=3))  # due now
        [due] = engine.run_due()  # a fresh run, with a deadline of its own
        assert (due.id, due.status, due.outcome) == ("s-1", "finished", "processed")
    assert engine.get("s-1").data["i"] == 5
    kinds = [e.kind for e in engine.history("s-1")]
    assert kinds.count("step") == 5  # no step ran twice across the two runs


def test_without_a_run_deadline_one_start_runs_to_the_end() -> None:
    _TICK[0] = T0
    engine = gorch.Engine("memory://", {"slow": Slow})
    with gorch.clock.use_clock(_engine_clock):
        assert engine.start("slow", "s-1").status == "finished"


@pytest.mark.parametrize("bad", [0, -1.0, timedelta(0)])
def test_a_run_deadline_must_be_positive(bad: float | timedelta) -> None:
    with pytest.raises(ValueError, match="run_deadline must be more than 0 seconds"):
        gorch.Engine("memory://", {"slow": Slow}, run_deadline=bad)


def test_the_async_engine_honours_the_run_deadline_too() -> None:
    async def main() -> None:
        _TICK[0] = T0
        engine = gorch.AsyncEngine("memory://", {"slow": Slow}, run_deadline=timedelta(seconds=1.5))
        with gorch.clock.use_clock(_engine_clock):
            snap = await engine.start("slow", "s-1")
            assert (snap.status, snap.data["i"]) == ("resuming", 2)
            [due] = await engine.run_due()
            assert due.status == "resuming"  # 2 more steps, then its own deadline
            [due] = await engine.run_due()
            assert due.status == "finished"
        assert (await engine.get("s-1")).data["i"] == 5

    asyncio.run(main())
