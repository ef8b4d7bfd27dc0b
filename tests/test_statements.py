"""One behaviour per statement of SPEC §1, and the resume loop of SPEC §2."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pytest
from freezegun import freeze_time
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field
from typing_extensions import TypedDict

import gorch
from gorch import (
    Break,
    Case,
    Continue,
    Default,
    For,
    Go,
    If,
    On,
    Return,
    S,
    Select,
    Step,
    Switch,
    Timeout,
    WaitFor,
)
from gorch import CheckpointKind as CK
from gorch import EventStatus as ES
from gorch import ThreadStatus as TS
from gorch import WorkflowStatus as WS

MAIN = gorch.MAIN_THREAD


# --------------------------------------------------------------------------- helpers


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Recorder(gorch.Handler):
    """A Handler that records its calls; module-level so every build shares it."""

    input_type = Decision

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.setup_failures = 0
        self.teardown_failures = 0

    def setup(self, req: gorch.EventRequest) -> str:
        self.calls.append(("setup", req.thread_id, req.name, req.pc))
        if self.setup_failures:
            self.setup_failures -= 1
            raise RuntimeError("setup boom")
        return f"data:{req.name}:{req.pc}"

    def handle(self, req: gorch.EventRequest, input: Any) -> Any:
        self.calls.append(("handle", req.name, req.setup_data, input))
        return {"by": input.by}

    def teardown(self, req: gorch.EventRequest, handled: bool) -> None:
        self.calls.append(("teardown", req.thread_id, req.name, req.setup_data, handled))
        if self.teardown_failures:
            self.teardown_failures -= 1
            raise RuntimeError("teardown boom")

    def named(self, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == kind]


HOOK = Recorder()


@pytest.fixture(autouse=True)
def _reset_hook() -> None:
    HOOK.reset()


class Logged(gorch.Workflow):
    log: list[str] = Field(default_factory=list)

    def note(self, what: str) -> Any:
        return lambda: self.log.append(what)


def start(wf: gorch.Workflow, checkpoint: Any = None) -> gorch.State:
    state = gorch.new_state(f"{type(wf).__name__}-1", type(wf).__name__)
    gorch.resume(wf, state, checkpoint)
    return state


def main_thread(state: gorch.State) -> gorch.Thread:
    t = state.thread(MAIN)
    assert t is not None
    return t


def roundtrip(wf: Any, state: gorch.State) -> tuple[Any, gorch.State]:
    return gorch.loads(gorch.dumps(wf, state), type(wf))


# --------------------------------------------------------------------------- S / Step


class Nested(Logged):
    def part(self) -> gorch.Section:  # definitions compose
        return S(Step("c", self.note("c")), S())

    def definition(self) -> gorch.Section:
        return S(
            Step("a step", self.note("a")),
            S(Step("b", self.note("b")), self.part()),
            S(S(Select("wait", On("go")))),
            S(),
            Step("d", self.note("d")),
        )


def test_nested_sections_behave_flattened() -> None:
    wf = Nested()
    state = start(wf)
    assert wf.log == ["a", "b", "c"]
    assert main_thread(state).cur_step == "wait"
    gorch.handle_event(wf, state, "go")
    wf, state = roundtrip(wf, state)
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["a", "b", "c", "d"]


class Counter(Logged):
    n: int = 0

    def inc(self) -> None:
        self.n += 1

    def definition(self) -> gorch.Section:
        return S(Step("inc", self.inc), Select("wait", On("go")), Step("inc again", self.inc))


def test_step_runs_once_and_thread_sits_on_the_blocking_select() -> None:
    wf = Counter()
    state = start(wf)
    assert wf.n == 1
    t = main_thread(state)
    assert (t.status, t.cur_step, t.error, t.attempts) == (TS.WAITING_EVENT, "wait", "", 0)
    assert state.status is WS.WAITING
    assert gorch.resume(wf, state) is WS.WAITING  # nothing to do: the step is not re-run
    assert wf.n == 1
    gorch.handle_event(wf, state, "go")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.n == 2
    assert state.threads == []


# --------------------------------------------------------------------------- If / Switch


class Branchy(Logged):
    target: int = 0
    x: int = 0

    def set_x(self) -> None:
        self.x = self.target

    def definition(self) -> gorch.Section:
        return S(
            Step("set", self.set_x),  # bool conditions below must see this change
            If(self.x == 1, Step("one", self.note("one")))
            .ElseIf(self.x == 2, Step("two", self.note("two")))
            .ElseIf(lambda: self.x == 3, Step("three", self.note("three")))
            .Else(Step("other", self.note("other"))),
            If(self.x > 100, Step("big", self.note("big"))),
            Switch(
                Case(self.x == 1, Step("case one", self.note("case one"))),
                Case(lambda: self.x >= 2, Step("case ge2", self.note("case ge2"))),
                Case(self.x == 2, Step("case two", self.note("case two"))),
                Default(Step("default", self.note("default"))),
            ),
            Switch(Case(self.x < 0, Step("negative", self.note("negative")))),
        )


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (0, ["other", "default"]),
        (1, ["one", "case one"]),
        (2, ["two", "case ge2"]),  # first true case only
        (3, ["three", "case ge2"]),
        (200, ["other", "big", "case ge2"]),
    ],
)
def test_if_elseif_else_and_switch_pick_the_first_true_branch(
    target: int, expected: list[str]
) -> None:
    wf = Branchy(target=target)
    assert gorch.resume(wf, gorch.new_state("b", "b")) is WS.FINISHED
    assert wf.log == expected


# --------------------------------------------------------------------------- For


class Looping(Logged):
    i: int = 0
    n: int = 0

    def inc(self) -> None:
        self.i += 1

    def definition(self) -> gorch.Section:
        return S(For("loop", self.i < 5, Step("inc", self.inc)))


def test_for_with_bool_condition_loops_exactly_five_times() -> None:
    wf = Looping()
    assert gorch.resume(wf, gorch.new_state("l", "l")) is WS.FINISHED
    assert wf.i == 5


class CallableLoop(Looping):
    def definition(self) -> gorch.Section:
        return S(For("loop", lambda: self.i < self.n, Step("inc", self.inc)))


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=40))
def test_for_with_callable_condition_loops_n_times(n: int) -> None:
    wf = CallableLoop(n=n)
    kinds: list[CK] = []
    assert gorch.resume(wf, gorch.new_state("l", "l"), kinds.append) is WS.FINISHED
    assert wf.i == n
    assert kinds.count(CK.AFTER_STEP) == n


class BreakLoop(Looping):
    def definition(self) -> gorch.Section:
        return S(
            For(
                "loop",
                True,
                Step("inc", self.inc),
                If(self.i >= 3, Break()),
                Step("after", self.note("after")),
            ),
            Step("done", self.note("done")),
        )


def test_break_leaves_the_loop() -> None:
    wf = BreakLoop()
    assert gorch.resume(wf, gorch.new_state("l", "l")) is WS.FINISHED
    assert wf.i == 3
    assert wf.log == ["after", "after", "done"]


class ContinueLoop(Looping):
    def definition(self) -> gorch.Section:
        return S(
            For(
                "loop",
                self.i < 6,
                Step("inc", self.inc),
                If(lambda: self.i % 2 == 1, Continue()),
                Step("even", lambda: self.log.append(str(self.i))),
            )
        )


def test_continue_skips_to_the_next_iteration() -> None:
    wf = ContinueLoop()
    assert gorch.resume(wf, gorch.new_state("l", "l")) is WS.FINISHED
    assert wf.i == 6
    assert wf.log == ["2", "4", "6"]


class NestedLoops(Logged):
    i: int = 0
    j: int = 0

    def definition(self) -> gorch.Section:
        return S(
            For(
                "outer",
                self.i < 2,
                Step("inc i", lambda: setattr(self, "i", self.i + 1)),
                Step("reset j", lambda: setattr(self, "j", 0)),
                For(
                    "inner",
                    True,
                    Step("inc j", lambda: setattr(self, "j", self.j + 1)),
                    If(self.j >= 2, Break()),
                ),
                Step("after inner", lambda: self.log.append(f"{self.i}.{self.j}")),
            )
        )


def test_break_leaves_only_the_innermost_loop() -> None:
    wf = NestedLoops()
    assert gorch.resume(wf, gorch.new_state("l", "l")) is WS.FINISHED
    assert wf.log == ["1.2", "2.2"]


class EventLoop(Looping):
    def definition(self) -> gorch.Section:
        return S(
            For("loop", self.i < 3, Select("tick", On("tick", Step("inc", self.inc)))),
            Step("done", self.note("done")),
        )


def test_for_loop_blocking_in_a_select_each_iteration() -> None:
    wf = EventLoop()
    state = start(wf)
    for expected in (1, 2, 3):
        assert state.status is WS.WAITING
        gorch.handle_event(wf, state, "tick")
        wf, state = roundtrip(wf, state)
        gorch.resume(wf, state)
        assert wf.i == expected
    assert state.status is WS.FINISHED
    assert wf.log == ["done"]


# --------------------------------------------------------------------------- Select / On


class Selecting(Logged):
    status: str = "new"
    approver: str = ""

    def on_ping(self) -> str:
        self.log.append("ping")
        return "pong"

    def on_decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        self.approver = d.by
        return {"status": self.status}

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "first",
                On("plain", Step("after plain", self.note("after plain"))),
                On("ping", self.on_ping, Step("after ping", self.note("after ping"))),
                On("decide", self.on_decide),
                On("hook", HOOK, Step("after hook", self.note("after hook"))),
            ),
            Step("end", self.note("end")),
            Select("second", On("done")),
        )


def test_on_without_handler_returns_none_and_runs_its_body() -> None:
    wf = Selecting()
    state = start(wf)
    assert gorch.handle_event(wf, state, "plain") is None
    assert wf.log == []  # the body runs on resume, not in handle_event
    gorch.resume(wf, state)
    assert wf.log == ["after plain", "end"]


def test_on_with_zero_arg_callable_returns_its_output() -> None:
    wf = Selecting()
    state = start(wf)
    assert gorch.handle_event(wf, state, "ping") == "pong"
    assert wf.log == ["ping"]
    gorch.resume(wf, state)
    assert wf.log == ["ping", "after ping", "end"]


@pytest.mark.parametrize(
    "payload",
    [
        {"approved": True, "by": "ann"},
        Decision(approved=True, by="ann"),
        b'{"approved": true, "by": "ann"}',
        '{"approved": true, "by": "ann"}',
    ],
    ids=["dict", "model", "json-bytes", "json-str"],
)
def test_on_with_typed_callable_validates_its_input(payload: Any) -> None:
    wf = Selecting()
    state = start(wf)
    assert gorch.handle_event(wf, state, "decide", payload) == {"status": "approved"}
    assert (wf.status, wf.approver) == ("approved", "ann")
    gorch.resume(wf, state)
    assert wf.log == ["end"]  # no other case's body ran


def test_on_with_handler_subclass_runs_setup_handle_teardown() -> None:
    wf = Selecting()
    state = start(wf)
    hook = next(we for we in main_thread(state).wait_events if we.req.name == "hook")
    assert hook.status is ES.SETUP
    assert hook.req.setup_data == f"data:hook:{hook.req.pc}"
    assert HOOK.calls == [("setup", MAIN, "hook", hook.req.pc)]

    wf, state = roundtrip(wf, state)  # setup_data survives a save
    out = gorch.handle_event(wf, state, "hook", {"approved": False, "by": "bob"})
    assert out == {"by": "bob"}
    assert HOOK.named("handle") == [
        ("handle", "hook", f"data:hook:{hook.req.pc}", Decision(approved=False, by="bob"))
    ]
    assert HOOK.named("teardown") == []  # teardown waits for the next resume
    gorch.resume(wf, state)
    assert HOOK.named("teardown") == [("teardown", MAIN, "hook", f"data:hook:{hook.req.pc}", True)]
    assert wf.log == ["after hook", "end"]
    assert [we.req.name for we in main_thread(state).wait_events] == ["done"]


def test_undelivered_set_up_event_is_torn_down_with_handled_false() -> None:
    wf = Selecting()
    state = start(wf)
    gorch.handle_event(wf, state, "plain")
    hook = next(we for we in main_thread(state).wait_events if we.req.name == "hook")
    assert (hook.status, hook.handled) == (ES.PENDING_TEARDOWN, False)
    assert main_thread(state).status is TS.RESUMING
    assert state.status is WS.RESUMING
    gorch.resume(wf, state)
    assert HOOK.named("teardown") == [("teardown", MAIN, "hook", hook.req.setup_data, False)]
    assert [we.req.name for we in main_thread(state).wait_events] == ["done"]


def test_handle_event_increments_thread_pc_and_waits_take_growing_pcs() -> None:
    wf = Selecting()
    state = start(wf)
    t = main_thread(state)
    first_pc, thread_pc = t.wait_events[0].req.pc, t.pc
    assert {we.req.pc for we in t.wait_events} == {first_pc}
    gorch.handle_event(wf, state, "plain")
    assert main_thread(state).pc == thread_pc + 1
    gorch.resume(wf, state)
    (done,) = main_thread(state).wait_events
    assert done.req.pc > first_pc
    assert state.pc >= done.req.pc


# --------------------------------------------------------------------------- Timeout


class Timed(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Select(
                "wait",
                On("answer", Step("answered", self.note("answered"))),
                Timeout("expired", timedelta(hours=1), Step("escalate", self.note("escalate"))),
                Timeout("later", 7200),
            ),
            Step("end", self.note("end")),
        )


@pytest.mark.parametrize("t0", ["2024-01-01 12:00:00", "2031-06-15 03:30:00"])
def test_timeout_due_time_follows_the_clock_and_fires(t0: str) -> None:
    with freeze_time(t0) as clock:
        start_at = datetime.now(UTC)
        wf = Timed()
        state = start(wf)
        assert gorch.next_wakeup(state) == start_at + timedelta(hours=1)
        assert gorch.due_events(state) == []

        clock.tick(timedelta(minutes=59))
        assert gorch.due_events(state) == []
        clock.tick(timedelta(minutes=1))
        (req,) = gorch.due_events(state)
        assert (req.name, req.thread_id) == ("expired", MAIN)
        assert datetime.fromisoformat(req.setup_data or "") == start_at + timedelta(hours=1)
        later = gorch.due_events(state, now=start_at + timedelta(hours=3))
        assert [r.name for r in later] == ["expired", "later"]  # earliest first
        naive = (start_at + timedelta(hours=3)).replace(tzinfo=None)
        assert [r.name for r in gorch.due_events(state, now=naive)] == ["expired", "later"]

        gorch.handle_event(wf, state, req.name, thread_id=req.thread_id, pc=req.pc)
        assert gorch.resume(wf, state) is WS.FINISHED
        assert wf.log == ["escalate", "end"]
        assert gorch.next_wakeup(state) is None


class TwoStages(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Select("first", On("go")),
            Select("second", Timeout("expired", 3600), On("answer")),
        )


def test_timeout_counts_from_when_its_select_starts_waiting() -> None:
    with freeze_time("2024-01-01 00:00:00") as clock:
        wf = TwoStages()
        state = start(wf)
        assert gorch.next_wakeup(state) is None
        clock.tick(timedelta(hours=5))
        gorch.handle_event(wf, state, "go")
        gorch.resume(wf, state)
        assert gorch.next_wakeup(state) == datetime(2024, 1, 1, 6, tzinfo=UTC)


# --------------------------------------------------------------------------- Go


class Spawner(Logged):
    n: int = 0

    def inc(self) -> None:
        self.n += 1

    def worker(self) -> gorch.Section:
        return S(Select("work", On("finish", Step("finished", self.note("finished")))))

    def definition(self) -> gorch.Section:
        return S(
            Go("solo", Select("solo wait", On("finish"))),
            For(
                "by str",
                self.n < 2,
                Step("inc", self.inc),
                Go("str", self.worker(), id=f"s{self.n}"),
            ),
            For(
                "by callable",
                self.n < 4,
                Step("inc again", self.inc),
                Go("callable", Select("cw", On("finish")), id=lambda: f"c{self.n}"),
            ),
            Select("main wait", On("stop")),
        )


def test_go_thread_ids_default_str_and_callable() -> None:
    wf = Spawner()
    state = start(wf)
    ids = [(t.id, t.name, t.status) for t in state.threads]
    assert ids == [
        (MAIN, MAIN, TS.WAITING_EVENT),
        ("solo", "solo", TS.WAITING_EVENT),
        ("s1", "str", TS.WAITING_EVENT),
        ("s2", "str", TS.WAITING_EVENT),
        ("c3", "callable", TS.WAITING_EVENT),
        ("c4", "callable", TS.WAITING_EVENT),
    ]


def test_several_threads_run_one_body_independently() -> None:
    wf = Spawner()
    state = start(wf)
    gorch.handle_event(wf, state, "finish", thread_id="s2")
    wf, state = roundtrip(wf, state)
    gorch.resume(wf, state)
    assert wf.log == ["finished"]
    assert [t.id for t in state.threads] == [MAIN, "solo", "s1", "c3", "c4"]
    assert state.thread("s1").cur_step == "work"  # type: ignore[union-attr]
    gorch.handle_event(wf, state, "finish", thread_id="s1")
    gorch.resume(wf, state)
    assert wf.log == ["finished", "finished"]
    assert state.status is WS.WAITING


# --------------------------------------------------------------------------- WaitFor / WaitGroup


class Waiter(Logged):
    ready: bool = False

    def set_ready(self) -> None:
        self.ready = True

    def definition(self) -> gorch.Section:
        return S(
            Go(
                "setter", Select("s", On("set", self.set_ready)), Step("set done", self.note("set"))
            ),
            WaitFor("until ready", self.ready, self.note("released")),
            Step("after", self.note("after")),
        )


def test_waitfor_blocks_until_condition_then_runs_handler() -> None:
    wf = Waiter()
    state = start(wf)
    t = main_thread(state)
    assert (t.status, t.cur_step) == (TS.WAITING_CONDITION, "until ready")
    assert state.status is WS.WAITING
    assert gorch.resume(wf, state) is WS.WAITING
    gorch.handle_event(wf, state, "set")
    wf, state = roundtrip(wf, state)
    kinds: list[CK] = []
    assert gorch.resume(wf, state, kinds.append) is WS.FINISHED
    # the condition is re-checked only when no other thread can advance
    assert wf.log == ["set", "released", "after"]
    assert CK.AFTER_CONDITION in kinds


class CallableWaiter(Logged):
    k: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Go(
                "ticker",
                For("ticks", True, Select("t", On("tick", lambda: setattr(self, "k", self.k + 1)))),
            ),
            WaitFor("two ticks", lambda: self.k >= 2),
            Step("after", self.note("after")),
        )


def test_waitfor_with_callable_condition_and_no_handler() -> None:
    wf = CallableWaiter()
    state = start(wf)
    gorch.handle_event(wf, state, "tick")
    assert gorch.resume(wf, state) is WS.WAITING
    assert wf.log == []
    gorch.handle_event(wf, state, "tick")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["after"]


class Group(Logged):
    wg: gorch.WaitGroup = Field(default_factory=gorch.WaitGroup)

    def branch(self, name: str) -> gorch.Go:
        return Go(name, Select(f"{name} wait", On(name)), Step(f"{name} done", self.wg.done))

    def definition(self) -> gorch.Section:
        return S(
            Step("add", lambda: self.wg.add(2)),
            self.branch("a"),
            self.branch("b"),
            self.wg.wait("all done"),
            Step("after", self.note("after")),
        )


def test_waitgroup_waits_for_every_thread() -> None:
    wf = Group()
    state = start(wf)
    assert wf.wg.count == 2
    assert main_thread(state).status is TS.WAITING_CONDITION
    gorch.handle_event(wf, state, "b")
    wf, state = roundtrip(wf, state)
    assert gorch.resume(wf, state) is WS.WAITING
    assert wf.wg.count == 1
    assert wf.log == []
    gorch.handle_event(wf, state, "a")
    wf, state = roundtrip(wf, state)
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["after"]


def test_waitgroup_counter_cannot_go_negative() -> None:
    wg = gorch.WaitGroup()
    wg.add(1)
    wg.done()
    with pytest.raises(ValueError):
        wg.done()
    assert isinstance(wg.wait("w"), gorch.WaitFor)


# --------------------------------------------------------------------------- Return


class Canceller(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Go("bg", Select("bg wait", On("bg event", HOOK))),
            Go("short", Step("s1", self.note("s1")), Return(), Step("s2", self.note("s2"))),
            Select("main wait", On("stop", Return()), On("go on")),
            Step("never", self.note("never")),
        )


def test_return_in_go_thread_ends_only_that_thread() -> None:
    wf = Canceller()
    state = start(wf)
    assert wf.log == ["s1"]
    assert [t.id for t in state.threads] == [MAIN, "bg"]
    assert state.status is WS.WAITING


def test_return_in_main_finishes_and_cancels_other_threads() -> None:
    wf = Canceller()
    state = start(wf)
    (setup,) = HOOK.named("setup")
    gorch.handle_event(wf, state, "stop")
    kinds: list[CK] = []
    assert gorch.resume(wf, state, kinds.append) is WS.FINISHED
    assert state.threads == []
    assert "never" not in wf.log
    assert HOOK.named("teardown") == [
        ("teardown", "bg", "bg event", f"data:bg event:{setup[3]}", False)
    ]
    assert kinds[-1] is CK.AFTER_RESUME
    assert kinds.count(CK.AFTER_RESUME) == 1


def test_failing_teardown_at_cancellation_is_logged_and_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wf = Canceller()
    state = start(wf)
    gorch.handle_event(wf, state, "stop")
    HOOK.teardown_failures = 1
    with caplog.at_level(logging.WARNING, logger="gorch"):
        assert gorch.resume(wf, state) is WS.FINISHED
    assert state.threads == []
    assert any(r.name.startswith("gorch") and "bg event" in r.getMessage() for r in caplog.records)


class MainEnds(Logged):
    def definition(self) -> gorch.Section:
        return S(Go("bg", Select("bg wait", On("x"))), Step("m", self.note("m")))


def test_end_of_main_body_finishes_the_workflow() -> None:
    wf = MainEnds()
    state = start(wf)
    assert state.status is WS.FINISHED
    assert state.threads == []


# --------------------------------------------------------------------------- checkpoints


class Checkpointed(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Step("s1", self.note("s1")),
            Step("s2", self.note("s2")),
            Select("wait", On("go", HOOK)),
            Step("s3", self.note("s3")),
            WaitFor("w", True),
            Step("s4", self.note("s4")),
            Select("end", On("fin", HOOK)),
        )


def test_checkpoint_kinds_and_order() -> None:
    wf = Checkpointed()
    seen: list[tuple[CK, WS, bytes]] = []

    def checkpoint(kind: CK) -> None:
        seen.append((kind, state.status, gorch.dumps(wf, state)))

    state = gorch.new_state("c", "c")
    assert gorch.resume(wf, state, checkpoint) is WS.WAITING
    assert [k for k, _, _ in seen] == [
        CK.AFTER_STEP,
        CK.AFTER_STEP,
        CK.AFTER_SETUP,
        CK.AFTER_RESUME,
    ]
    # the final status is set before the last checkpoint, which saw the final state
    assert seen[-1][1:] == (WS.WAITING, gorch.dumps(wf, state))

    seen.clear()
    gorch.handle_event(wf, state, "go", {"approved": True, "by": "x"})
    assert gorch.resume(wf, state, checkpoint) is WS.WAITING
    assert [k for k, _, _ in seen] == [
        CK.AFTER_TEARDOWN,
        CK.AFTER_STEP,
        CK.AFTER_CONDITION,
        CK.AFTER_STEP,
        CK.AFTER_SETUP,
        CK.AFTER_RESUME,
    ]
    assert seen[-1][1:] == (WS.WAITING, gorch.dumps(wf, state))


def test_checkpoint_on_finish_is_a_single_final_after_resume() -> None:
    wf = Looping()
    seen: list[tuple[CK, WS]] = []
    state = gorch.new_state("c", "c")
    gorch.resume(wf, state, lambda k: seen.append((k, state.status)))
    assert seen == [(CK.AFTER_STEP, WS.RESUMING)] * 5 + [(CK.AFTER_RESUME, WS.FINISHED)]


def test_checkpoint_exception_stops_resume_and_propagates() -> None:
    class Boom(Exception):
        pass

    def checkpoint(kind: CK) -> None:
        raise Boom(kind)

    wf = Checkpointed()
    with pytest.raises(Boom):
        gorch.resume(wf, gorch.new_state("c", "c"), checkpoint)
    assert wf.log == ["s1"]


# --------------------------------------------------------------------------- thread order


class Ordered(Logged):
    wg: gorch.WaitGroup = Field(default_factory=gorch.WaitGroup)

    def worker(self, name: str) -> gorch.Go:
        return Go(
            name,
            Step(f"{name}1", self.note(f"{name}1")),
            Step(f"{name}2", self.note(f"{name}2")),
            Select(f"{name} wait", On("poke", Step(f"{name}3", self.note(f"{name}3")))),
            Step(f"{name} done", self.wg.done),
        )

    def definition(self) -> gorch.Section:
        return S(
            Step("add", lambda: self.wg.add(3)),
            self.worker("a"),
            self.worker("b"),
            self.worker("c"),
            Step("m1", self.note("m1")),
            self.wg.wait("all"),
            Step("m2", self.note("m2")),
        )


def test_threads_advance_in_creation_order() -> None:
    wf = Ordered()
    state = start(wf)
    assert wf.log == ["m1", "a1", "a2", "b1", "b2", "c1", "c2"]
    for tid in ("c", "a"):  # delivered out of order ...
        gorch.handle_event(wf, state, "poke", thread_id=tid)
    gorch.resume(wf, state)
    assert wf.log[7:] == ["a3", "c3"]  # ... but run in creation order
    gorch.handle_event(wf, state, "poke")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log[9:] == ["b3", "m2"]


def test_thread_order_is_deterministic_across_instances() -> None:
    logs = []
    for _ in range(3):
        wf = Ordered()
        state = start(wf)
        gorch.handle_event(wf, state, "poke", thread_id="b")
        gorch.handle_event(wf, state, "poke", thread_id="c")
        gorch.resume(wf, state)
        logs.append((wf.log, gorch.dumps(wf, state)))
    assert logs[0] == logs[1] == logs[2]


# --------------------------------------------------------------------------- setup / teardown


class TwoHooks(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Step("before", self.note("before")),
            Select("wait", On("yes", HOOK), On("no", HOOK)),
            Step("after", self.note("after")),
            Select("second", On("done", HOOK)),
        )


def test_setup_runs_after_blocking_and_teardown_on_next_resume() -> None:
    wf = TwoHooks()
    seen: list[tuple[CK, list[str]]] = []
    state = gorch.new_state("h", "h")
    gorch.resume(wf, state, lambda k: seen.append((k, list(wf.log))))
    # setups run after the thread blocked (after the step before the Select)
    assert [k for k, _ in seen].index(CK.AFTER_SETUP) > [k for k, _ in seen].index(CK.AFTER_STEP)
    events = main_thread(state).wait_events
    assert [(we.req.name, we.status) for we in events] == [("yes", ES.SETUP), ("no", ES.SETUP)]
    for we in events:
        assert we.req.setup_data == f"data:{we.req.name}:{we.req.pc}"
    gorch.handle_event(wf, state, "no", {"approved": False, "by": "z"})
    wf, state = roundtrip(wf, state)
    gorch.resume(wf, state)
    teardowns = {c[2]: c[4] for c in HOOK.named("teardown")}
    assert teardowns == {"yes": False, "no": True}
    assert [c[3] for c in HOOK.named("teardown")] == [
        f"data:{n}:{events[0].req.pc}" for n in ("yes", "no")
    ]


def test_failed_teardown_is_marked_and_retried_on_a_later_resume() -> None:
    wf = TwoHooks()
    state = start(wf)
    gorch.handle_event(wf, state, "yes", {"approved": True, "by": "z"})
    HOOK.teardown_failures = 1
    assert gorch.resume(wf, state) is WS.WAITING  # the workflow goes on regardless
    assert wf.log == ["before", "after"]
    failed = [we for we in main_thread(state).wait_events if we.status is ES.TEARDOWN_ERROR]
    assert [we.req.name for we in failed] == ["yes"]
    assert "teardown boom" in failed[0].error
    wf, state = roundtrip(wf, state)
    gorch.resume(wf, state)
    assert [c[2] for c in HOOK.named("teardown")] == ["yes", "no", "yes"]
    assert [(we.req.name, we.status) for we in main_thread(state).wait_events] == [
        ("done", ES.SETUP)
    ]


# --------------------------------------------------------------------------- failed steps


class Flaky(Logged):
    fail_times: int = 2
    hold: bool = False

    def flaky(self) -> None:
        self.log.append("flaky")
        if self.log.count("flaky") <= self.fail_times:
            raise ConnectionError(f"attempt {self.log.count('flaky')} failed")

    def definition(self) -> gorch.Section:
        return S(
            Step("before", self.note("before")),
            Step("flaky", self.flaky),
            Step("after", self.note("after")),
            If(self.hold, Select("wait", On("go"))),
        )


def test_failed_step_keeps_the_thread_on_it_and_retry_skips_earlier_steps() -> None:
    wf = Flaky()
    state = gorch.new_state("f", "f")
    for attempt in (1, 2):
        with pytest.raises(gorch.StepFailed):
            gorch.resume(wf, state)
        t = main_thread(state)
        assert (t.status, t.cur_step, t.attempts) == (TS.EXECUTING, "flaky", attempt)
        assert f"attempt {attempt} failed" in t.error
        wf, state = roundtrip(wf, state)
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["before", "flaky", "flaky", "flaky", "after"]


def test_successful_retry_clears_error_and_attempts() -> None:
    wf = Flaky(fail_times=1, hold=True)
    state = gorch.new_state("f", "f")
    with pytest.raises(gorch.StepFailed):
        gorch.resume(wf, state)
    gorch.resume(wf, state)
    t = main_thread(state)
    assert (t.status, t.cur_step, t.error, t.attempts) == (TS.WAITING_EVENT, "wait", "", 0)


# --------------------------------------------------------------------------- data-dependent


class PerItem(Logged):
    items: list[str] = Field(default_factory=list)

    def do(self, item: str) -> Any:
        return lambda: self.log.append(item)

    def definition(self) -> gorch.Section:
        return S(
            *[Step(f"do {x}", self.do(x)) for x in self.items],
            Select("wait", On("add", Step("add z", lambda: self.items.append("z")))),
            Select("then", On("go")),
            *[Step(f"again {x}", self.do(x.upper())) for x in self.items],
            Step("end", self.note("end")),
        )


@pytest.mark.parametrize("items", [["a", "b", "c"], [], ["x"]])
def test_data_dependent_definition_has_one_step_per_item(items: list[str]) -> None:
    wf = PerItem(items=items)
    state = start(wf)
    assert wf.log == items
    assert main_thread(state).cur_step == "wait"
    gorch.handle_event(wf, state, "add")
    wf, state = roundtrip(wf, state)
    gorch.resume(wf, state)
    assert main_thread(state).cur_step == "then"  # found by name although it moved
    gorch.handle_event(wf, state, "go")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == [*items, *(x.upper() for x in items), "Z", "end"]


class Growing(Logged):
    items: list[str] = Field(default_factory=lambda: ["a", "b"])

    def definition(self) -> gorch.Section:
        return S(
            Step("grow", lambda: self.items.append("c")),
            *[Step(f"do {x}", (lambda x=x: self.log.append(x))) for x in self.items],
            Select("wait", On("go")),
        )


def test_shape_change_takes_effect_at_the_next_read() -> None:
    wf = Growing()
    state = start(wf)
    # the walk follows the build it has (a, b); the Select's read rebuilds and finds "c"
    assert wf.log == ["a", "b", "c"]
    assert main_thread(state).cur_step == "wait"


class FromData(Logged):
    minutes: int = 10
    flag: bool = False

    def configure(self) -> None:
        self.minutes = 30
        self.flag = True

    def definition(self) -> gorch.Section:
        cases = [On("a")] if self.flag else [On("b")]
        return S(
            Step("configure", self.configure),
            Select("wait", *cases, Timeout("t", timedelta(minutes=self.minutes))),
        )


def test_select_cases_and_timeout_come_from_current_data() -> None:
    with freeze_time("2024-01-01 12:00:00"):
        wf = FromData()
        state = start(wf)
        assert gorch.next_wakeup(state) == datetime(2024, 1, 1, 12, 30, tzinfo=UTC)
        assert sorted(name for _, name, _ in gorch.awaited_events(state)) == ["a", "t"]


class NestedGo(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Go(
                "outer",
                Step("o1", self.note("o1")),
                Go(
                    "inner",
                    For(
                        "inner loop",
                        lambda: self.log.count("i") < 3,
                        Step("i", self.note("i")),
                        Select("inner wait", On("poke")),
                    ),
                ),
                Select("outer wait", On("x", Return())),
                Step("o2", self.note("o2")),
            ),
            Select("main wait", On("stop")),
        )


def test_nested_go_threads_keep_their_own_cursors() -> None:
    wf = NestedGo()
    state = start(wf)
    assert wf.log == ["o1", "i"]
    assert [(t.id, t.cur_step) for t in state.threads] == [
        (MAIN, "main wait"),
        ("outer", "outer wait"),
        ("inner", "inner wait"),
    ]
    gorch.handle_event(wf, state, "x")  # outer returns; inner keeps running
    wf, state = roundtrip(wf, state)
    gorch.resume(wf, state)
    assert [t.id for t in state.threads] == [MAIN, "inner"]
    assert "o2" not in wf.log
    gorch.handle_event(wf, state, "poke")
    gorch.resume(wf, state)
    gorch.handle_event(wf, state, "poke")
    gorch.resume(wf, state)
    assert wf.log == ["o1", "i", "i", "i"]
    assert gorch.handle_event(wf, state, "poke") is None
    gorch.resume(wf, state)
    assert [t.id for t in state.threads] == [MAIN]


class Release1(Logged):
    def definition(self) -> gorch.Section:
        return S(Step("prepare", self.note("prepare")), Select("review", On("approve")))


class Release2(Logged):  # a later deploy: new statements around the same names
    def definition(self) -> gorch.Section:
        return S(
            Step("audit", self.note("audit")),
            Step("prepare", self.note("prepare")),
            If(lambda: True, S(Select("review", On("approve"), On("reject")))),
            Step("pay", self.note("pay")),
        )


def test_cursor_is_found_by_name_in_a_changed_definition() -> None:
    old = Release1()
    blob = gorch.dumps(old, start(old))
    wf, state = gorch.loads(blob, Release2)
    gorch.handle_event(wf, state, "approve")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["prepare", "pay"]


@dataclasses.dataclass
class Point:
    x: int
    y: int


class PointDict(TypedDict):
    x: int
    y: int


class Typed(gorch.Workflow):
    def e_int(self, v: int) -> int:
        return v

    def e_str(self, v: str) -> str:
        return v

    def e_list(self, v: list[int]) -> list[int]:
        return v

    def e_point(self, v: Point) -> Point:
        return v

    def e_dict(self, v: PointDict) -> PointDict:
        return v

    def e_opt(self, v: Decision | None) -> Decision | None:
        return v

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "wait",
                On("int", self.e_int),
                On("str", self.e_str),
                On("list", self.e_list),
                On("point", self.e_point),
                On("dict", self.e_dict),
                On("opt", self.e_opt),
            )
        )


@pytest.mark.parametrize(
    ("event", "payload", "expected"),
    [
        ("int", 7, 7),
        ("int", "7", 7),  # a str goes to pydantic as it is
        ("int", b"7", 7),
        ("str", "hello", "hello"),
        ("str", '"q"', '"q"'),  # not parsed as JSON for a str annotation
        ("list", "[1, 2]", [1, 2]),
        ("list", (1, 2), [1, 2]),
        ("point", '{"x": 1, "y": 2}', Point(1, 2)),
        ("point", {"x": 1, "y": 2}, Point(1, 2)),
        ("dict", '{"x": 1, "y": 2}', {"x": 1, "y": 2}),
        ("opt", '{"approved": true, "by": "a"}', Decision(approved=True, by="a")),
        ("opt", None, None),
    ],
)
def test_typed_handler_input_forms(event: str, payload: Any, expected: Any) -> None:
    wf = Typed()
    state = start(wf)
    assert gorch.handle_event(wf, state, event, payload) == expected


class EndsWithHook(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Go("g", Select("g wait", On("e", HOOK), On("f", HOOK))),
            Select("main wait", On("stop")),
        )


def test_failing_teardown_when_its_thread_ends_is_logged_and_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wf = EndsWithHook()
    state = start(wf)
    gorch.handle_event(wf, state, "e", {"approved": True, "by": "a"})
    HOOK.teardown_failures = 10
    with caplog.at_level(logging.WARNING, logger="gorch"):
        assert gorch.resume(wf, state) is WS.WAITING
    assert [t.id for t in state.threads] == [MAIN]
    assert any("teardown" in r.getMessage() for r in caplog.records)


def test_idle_resume_sets_nothing_up_again_and_checkpoints_once() -> None:
    wf = TwoHooks()
    state = start(wf)
    calls = list(HOOK.calls)
    kinds: list[CK] = []
    before = gorch.dumps(wf, state)
    assert gorch.resume(wf, state, kinds.append) is WS.WAITING
    assert kinds == [CK.AFTER_RESUME]
    assert HOOK.calls == calls
    assert gorch.dumps(wf, state) == before


class Tagged(gorch.Handler):
    """A Handler configured from workflow data; records which configuration was used."""

    calls: list[tuple[str, str]] = []

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def setup(self, req: gorch.EventRequest) -> None:
        Tagged.calls.append(("setup", self.tag))

    def teardown(self, req: gorch.EventRequest, handled: bool) -> None:
        Tagged.calls.append(("teardown", self.tag))


class SwitchesHandler(gorch.Workflow):
    mode: str = "old"

    def definition(self) -> gorch.Section:
        return S(
            Go("bg", Select("bg wait", On("e", Tagged(self.mode)))),
            Select("main wait", On("stop")),
            Step("reconfigure", lambda: setattr(self, "mode", "new")),
            Return(),
        )


def test_handler_object_for_cancellation_teardown_comes_from_current_data() -> None:
    Tagged.calls.clear()
    wf = SwitchesHandler()
    state = start(wf)
    gorch.handle_event(wf, state, "stop")
    assert gorch.resume(wf, state) is WS.FINISHED
    # SPEC §1: a Handler object read from the tree comes from a build made after the
    # last change of data; "reconfigure" ran before the teardown.
    assert Tagged.calls == [("setup", "old"), ("teardown", "new")]


def test_new_state_has_one_runnable_main_thread() -> None:
    state = gorch.new_state("wf-1", "expense")
    assert MAIN == "_main_"
    assert (state.id, state.workflow, state.status) == ("wf-1", "expense", WS.RESUMING)
    assert [(t.id, t.name, t.status) for t in state.threads] == [(MAIN, MAIN, TS.RESUMING)]


class Journey(Logged):
    wg: gorch.WaitGroup = Field(default_factory=gorch.WaitGroup)
    i: int = 0
    flag: bool = False

    def tick(self) -> None:
        self.log.append("m")
        self.i += 1

    def definition(self) -> gorch.Section:
        return S(
            Step("add", lambda: self.wg.add(3)),
            Go(
                "a",
                For("a loop", lambda: self.log.count("a") < 3, Step("a step", self.note("a"))),
                Step("a done", self.wg.done),
            ),
            Go("b", WaitFor("b flag", self.flag, self.note("b")), Step("b done", self.wg.done)),
            Go("c", WaitFor("c flag", self.flag, self.note("c")), Step("c done", self.wg.done)),
            For("main loop", self.i < 2, Step("m", self.tick)),
            Step("raise flag", lambda: setattr(self, "flag", True)),
            self.wg.wait("all"),
            Step("end", self.note("end")),
        )


def test_waitfor_threads_are_released_in_creation_order() -> None:
    wf = Journey()
    assert gorch.resume(wf, gorch.new_state("j", "j")) is WS.FINISHED
    assert wf.log == ["m", "m", "a", "a", "a", "b", "c", "end"]


def test_resuming_from_any_checkpoint_neither_repeats_nor_skips_work() -> None:
    wf = Journey()
    state = gorch.new_state("j", "j")
    saved: list[bytes] = []
    gorch.resume(wf, state, lambda kind: saved.append(gorch.dumps(wf, state)))
    reference = wf.log
    assert len(saved) > 10
    for blob in saved[:-1]:
        crashed, st2 = gorch.loads(blob, Journey)
        assert gorch.resume(crashed, st2) is WS.FINISHED
        assert crashed.log == reference


def test_step_options_read_as_keyword_only_arguments() -> None:
    """``retry``, ``after`` and ``timeout`` behave as keyword-only arguments with defaults."""

    def work() -> None:
        pass

    policy = gorch.Retry(attempts=3)
    plain = Step("w", work)
    assert (plain.retry, plain.after, plain.timeout) == (None, (), None)
    explicit = Step("w", work, retry=None, after=None, timeout=None)
    assert (explicit.retry, explicit.after, explicit.timeout) == (None, (), None)
    full = Step(work, retry=policy, after=["a", work], timeout=timedelta(seconds=2))
    assert (full.name, full.retry, full.after, full.timeout) == ("work", policy, ("a", "work"), 2.0)
    with pytest.raises(
        TypeError, match=r"^Step.__init__\(\) got an unexpected keyword argument 'retries'$"
    ):
        Step("w", work, retries=policy)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="positional argument"):
        Step("w", work, policy)  # type: ignore[call-overload]
    with pytest.raises(gorch.DefinitionError, match="more than 0 seconds"):
        Step("w", work, timeout=0)
