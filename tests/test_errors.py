"""One test per error of SPEC §2: type, actionable message, and the state left as promised."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field

import gorch
from gorch import (
    Break,
    Continue,
    For,
    Go,
    If,
    On,
    Return,
    S,
    Select,
    Step,
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


class Approval(gorch.Workflow):
    status: str = "new"
    log: list[str] = Field(default_factory=list)

    def on_decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        return {"status": self.status}

    def definition(self) -> gorch.Section:
        return S(
            For(
                "rounds",
                self.status != "approved",
                Select(
                    "await decision",
                    On("decide", self.on_decide),
                    On("cancel", Return()),
                ),
            ),
            Select("archive", On("archive")),
        )


@contextlib.contextmanager
def unchanged(wf: gorch.Workflow, state: gorch.State) -> Iterator[None]:
    """Assert that ``dumps(wf, state)`` is byte-identical after the block."""
    before = gorch.dumps(wf, state)
    yield
    assert gorch.dumps(wf, state) == before


def started(wf: gorch.Workflow) -> gorch.State:
    state = gorch.new_state(f"{type(wf).__name__}-1", type(wf).__name__)
    gorch.resume(wf, state)
    return state


def workflow_of(build: Callable[[Any], gorch.Section]) -> gorch.Workflow:
    """An instance of a fresh workflow class whose definition is ``build(self)``."""

    class Adhoc(gorch.Workflow):
        n: int = 0

        def definition(self) -> gorch.Section:
            return build(self)

    return Adhoc()


def awaited_pc(state: gorch.State, thread_id: str = MAIN) -> int:
    t = state.thread(thread_id)
    assert t is not None and t.status is TS.WAITING_EVENT
    return t.wait_events[-1].req.pc


def noop() -> None:
    pass


# --------------------------------------------------------------------------- hierarchy

ALL_ERRORS = [
    gorch.AmbiguousEvent,
    gorch.CursorNotFound,
    gorch.DefinitionError,
    gorch.EventNotFound,
    gorch.HandlerFailed,
    gorch.InvalidEventInput,
    gorch.ResumeLimitError,
    gorch.SerializationError,
    gorch.SetupError,
    gorch.StaleEvent,
    gorch.StepFailed,
    gorch.ThreadExists,
    gorch.WorkflowFinishedError,
]


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_derives_from_gorch_error(cls: type) -> None:
    assert issubclass(cls, gorch.GorchError)
    assert issubclass(gorch.GorchError, Exception)


# --------------------------------------------------------------------------- EventNotFound


def test_unknown_event_lists_what_is_awaited() -> None:
    wf = Approval()
    state = started(wf)
    with unchanged(wf, state), pytest.raises(gorch.EventNotFound) as ei:
        gorch.handle_event(wf, state, "approve")
    msg = str(ei.value)
    assert "approve" in msg
    assert "decide" in msg and "cancel" in msg


def test_unknown_event_at_the_current_pc_is_not_found_rather_than_stale() -> None:
    wf = Approval()
    state = started(wf)
    with unchanged(wf, state), pytest.raises(gorch.EventNotFound) as ei:
        gorch.handle_event(wf, state, "approve", pc=awaited_pc(state))
    assert "approve" in str(ei.value) and "decide" in str(ei.value)


def test_event_for_a_thread_that_does_not_await_it() -> None:
    wf = Approval()
    state = started(wf)
    with unchanged(wf, state), pytest.raises(gorch.EventNotFound) as ei:
        gorch.handle_event(wf, state, "decide", {"approved": True, "by": "a"}, thread_id="nobody")
    assert "decide" in str(ei.value)


def test_event_already_handled_before_resume_is_not_found() -> None:
    wf = Approval()
    state = started(wf)
    gorch.handle_event(wf, state, "decide", {"approved": False, "by": "a"})
    with unchanged(wf, state), pytest.raises(gorch.EventNotFound):
        gorch.handle_event(wf, state, "decide", {"approved": False, "by": "a"})


# --------------------------------------------------------------------------- WorkflowFinishedError


def test_finished_workflow_rejects_events_and_resume() -> None:
    wf = Approval()
    state = started(wf)
    gorch.handle_event(wf, state, "cancel")
    assert gorch.resume(wf, state) is WS.FINISHED
    with unchanged(wf, state), pytest.raises(gorch.WorkflowFinishedError) as ei:
        gorch.handle_event(wf, state, "decide", {"approved": True, "by": "a"})
    assert state.id in str(ei.value)
    with unchanged(wf, state), pytest.raises(gorch.WorkflowFinishedError):
        gorch.resume(wf, state)


# --------------------------------------------------------------------------- InvalidEventInput


@pytest.mark.parametrize(
    ("payload", "mentions"),
    [
        ({"approved": "maybe", "by": "a"}, "approved"),
        ({"approved": True}, "by"),
        (b'{"approved": true, "by": ', "json"),
        (b"\xff\xfe", "json"),
        ('{"approved": tru}', "json"),
        ('{"approved": true}', "by"),
        ("[1, 2]", "decide"),
        (42, "decide"),
    ],
    ids=[
        "dict-bad-type",
        "dict-missing",
        "bytes-truncated",
        "bytes-garbage",
        "str-bad-json",
        "str-missing",
        "str-wrong-shape",
        "int",
    ],
)
def test_invalid_input_for_typed_handler(payload: Any, mentions: str) -> None:
    wf = Approval()
    state = started(wf)
    with unchanged(wf, state), pytest.raises(gorch.InvalidEventInput) as ei:
        gorch.handle_event(wf, state, "decide", payload)
    assert isinstance(ei.value.__cause__, pydantic.ValidationError)
    msg = str(ei.value).lower()
    assert "decide" in msg
    assert mentions in msg
    assert wf.status == "new"  # the handler did not run
    assert gorch.handle_event(wf, state, "decide", {"approved": True, "by": "a"}) == {
        "status": "approved"
    }


class Typed(gorch.Handler):
    input_type = Decision

    def handle(self, req: gorch.EventRequest, input: Decision) -> str:
        return input.by


def test_invalid_input_for_a_handler_subclass_with_input_type() -> None:
    wf = workflow_of(lambda w: S(Select("wait", On("decide", Typed()))))
    state = started(wf)
    with unchanged(wf, state), pytest.raises(gorch.InvalidEventInput) as ei:
        gorch.handle_event(wf, state, "decide", b'{"approved": "perhaps"}')
    assert "decide" in str(ei.value) and "approved" in str(ei.value)
    assert gorch.handle_event(wf, state, "decide", '{"approved": true, "by": "ann"}') == "ann"


# --------------------------------------------------------------------------- StaleEvent


def test_wrong_pc_is_stale_and_names_the_current_wait() -> None:
    wf = Approval()
    state = started(wf)
    pc = awaited_pc(state)
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent) as ei:
        gorch.handle_event(wf, state, "decide", {"approved": True, "by": "a"}, pc=pc + 1)
    msg = str(ei.value)
    assert "decide" in msg and str(pc + 1) in msg and str(pc) in msg


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=10_000))
def test_any_pc_but_the_current_one_is_stale(pc: int) -> None:
    wf = Approval()
    state = started(wf)
    current = awaited_pc(state)
    if pc == current:
        return
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, "cancel", pc=pc)
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, "cancel", thread_id=MAIN, pc=pc)


def test_replayed_delivery_with_old_pc_is_stale() -> None:
    wf = Approval()
    state = started(wf)
    old = awaited_pc(state)
    reject = {"approved": False, "by": "a"}
    gorch.handle_event(wf, state, "decide", reject, thread_id=MAIN, pc=old)
    # replayed before resume: the thread no longer waits at all
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, "decide", reject, thread_id=MAIN, pc=old)
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, "decide", reject, pc=old)
    # replayed after resume: the loop waits in the same Select again, with a new pc
    gorch.resume(wf, state)
    assert awaited_pc(state) > old
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, "decide", reject, thread_id=MAIN, pc=old)
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, "decide", reject, pc=old)


def test_stale_event_wins_over_event_not_found() -> None:
    wf = Approval()
    state = started(wf)
    stale = awaited_pc(state) + 7
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, "no such event", pc=stale)
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, "no such event", thread_id=MAIN, pc=stale)
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, "decide", thread_id="gone", pc=stale)


class Respawn(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(
            For(
                "again",
                True,
                Go("job", Select("job wait", On("done")), id="worker"),
                Select("next", On("next")),
            )
        )


def test_old_pc_is_stale_for_a_new_thread_reusing_the_id() -> None:
    wf = Respawn()
    state = started(wf)
    old = awaited_pc(state, "worker")
    gorch.handle_event(wf, state, "done", thread_id="worker")
    gorch.resume(wf, state)  # the first "worker" thread ends
    gorch.handle_event(wf, state, "next")
    gorch.resume(wf, state)  # a new "worker" thread waits again
    assert awaited_pc(state, "worker") > old
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, "done", thread_id="worker", pc=old)


class Timed(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(
            For("rounds", True, Select("wait", On("answer"), Timeout("expired", 60))),
        )


def test_late_timer_is_stale() -> None:
    wf = Timed()
    state = started(wf)
    (req,) = gorch.due_events(state, now=datetime.now(UTC) + timedelta(hours=1))
    gorch.handle_event(wf, state, "answer")
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, req.name, thread_id=req.thread_id, pc=req.pc)
    gorch.resume(wf, state)  # waits again, with a new timer
    assert gorch.due_events(state, now=datetime.now(UTC) + timedelta(hours=1))[0].pc > req.pc
    with unchanged(wf, state), pytest.raises(gorch.StaleEvent):
        gorch.handle_event(wf, state, req.name, thread_id=req.thread_id, pc=req.pc)


# --------------------------------------------------------------------------- AmbiguousEvent


class TwoWorkersOneBody(gorch.Workflow):
    n: int = 0

    def definition(self) -> gorch.Section:
        return S(
            For(
                "spawn",
                self.n < 2,
                Step("inc", lambda: setattr(self, "n", self.n + 1)),
                Go("worker", Select("work", On("cancel", Return())), id=lambda: f"w{self.n}"),
            ),
            Select("main", On("stop")),
        )


def test_ambiguous_event_names_the_threads_and_thread_id_disambiguates() -> None:
    wf = TwoWorkersOneBody()
    state = started(wf)
    with unchanged(wf, state), pytest.raises(gorch.AmbiguousEvent) as ei:
        gorch.handle_event(wf, state, "cancel")
    msg = str(ei.value)
    assert "cancel" in msg and "w1" in msg and "w2" in msg and "thread_id" in msg
    gorch.handle_event(wf, state, "cancel", thread_id="w2")
    gorch.resume(wf, state)
    assert [t.id for t in state.threads] == [MAIN, "w1"]
    gorch.handle_event(wf, state, "cancel")  # no longer ambiguous
    gorch.resume(wf, state)
    assert [t.id for t in state.threads] == [MAIN]


# --------------------------------------------------------------------------- DefinitionError

DUPLICATES: dict[str, tuple[str, Callable[[Any], gorch.Section]]] = {
    "step": ("twice", lambda w: S(Step("twice", noop), Step("twice", noop))),
    "for": ("loop", lambda w: S(For("loop", False), S(For("loop", False)))),
    "select": ("wait", lambda w: S(Select("wait", On("a")), Select("wait", On("b")))),
    "waitfor": ("cond", lambda w: S(WaitFor("cond", True), If(True, WaitFor("cond", True)))),
    "go": ("job", lambda w: S(Go("job", Step("x", noop)), Go("job", Step("y", noop), id="j2"))),
    "across kinds": ("same", lambda w: S(Step("same", noop), Select("same", On("e")))),
    "nested in go": ("inner", lambda w: S(Step("inner", noop), Go("g", Step("inner", noop)))),
    "event on/on": ("e", lambda w: S(Select("wait", On("e"), On("e")))),
    "event on/timeout": ("e", lambda w: S(Select("wait", On("e"), Timeout("e", 5)))),
}


@pytest.mark.parametrize("case", list(DUPLICATES), ids=list(DUPLICATES))
def test_duplicate_names_are_a_definition_error(case: str) -> None:
    name, build = DUPLICATES[case]
    wf = workflow_of(build)
    state = gorch.new_state("d", "d")
    with unchanged(wf, state), pytest.raises(gorch.DefinitionError) as ei:
        gorch.resume(wf, state)
    assert repr(name) in str(ei.value) or f'"{name}"' in str(ei.value)


def test_same_event_in_two_selects_is_allowed() -> None:
    wf = workflow_of(
        lambda w: S(
            Select("first", On("cancel", Return()), On("next")),
            Select("second", On("cancel", Return()), On("done")),
        )
    )
    state = started(wf)
    gorch.handle_event(wf, state, "next")
    gorch.resume(wf, state)
    gorch.handle_event(wf, state, "cancel")
    assert gorch.resume(wf, state) is WS.FINISHED


@pytest.mark.parametrize("stmt", [Break, Continue])
def test_break_or_continue_outside_for_is_a_definition_error(stmt: type) -> None:
    wf = workflow_of(lambda w: S(Step("a", noop), If(True, stmt())))
    state = gorch.new_state("d", "d")
    with unchanged(wf, state), pytest.raises(gorch.DefinitionError) as ei:
        gorch.resume(wf, state)
    assert stmt.__name__ in str(ei.value)


def _raises(w: Any) -> gorch.Section:
    raise LookupError("no such approver table")


INVALID: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "function instead of Step": ("noop", lambda w: S(noop)),
    "Step without callable": ("'x'", lambda w: S(Step("x", 5))),  # type: ignore[arg-type]
    "Select without cases": ("'s'", lambda w: S(Select("s"))),
    "handler neither Handler nor callable": ("'e'", lambda w: S(Select("s", On("e", 42)))),
    "Timeout without duration": ("soon", lambda w: S(Select("s", Timeout("t", "soon")))),  # type: ignore[arg-type]
    "definition() raises": ("no such approver table", _raises),
    "definition() returns None": ("None", lambda w: None),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_definition_is_a_definition_error(case: str) -> None:
    mentions, build = INVALID[case]
    wf = workflow_of(build)
    state = gorch.new_state("d", "d")
    with unchanged(wf, state), pytest.raises(gorch.DefinitionError) as ei:
        gorch.resume(wf, state)
    assert mentions in str(ei.value)


class PerItem(gorch.Workflow):
    items: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(*[Step(x, noop) for x in self.items], Select("wait", On("go")))


def test_duplicate_names_in_a_data_dependent_definition() -> None:
    ok = PerItem(items=["a", "b"])
    started(ok)  # a valid instance of the class ran first
    # The first build with a duplicate is refused where the ambiguous cursor
    # would be committed (README: "How definitions are read")...
    first = PerItem(items=["a", "a"])
    with pytest.raises(gorch.DefinitionError) as ei:
        gorch.resume(first, gorch.new_state("d0", "d"))
    assert "'a'" in str(ei.value)
    # ...and from then on, before anything runs: the state is untouched.
    wf = PerItem(items=["b", "b"])
    state = gorch.new_state("d", "d")
    with unchanged(wf, state), pytest.raises(gorch.DefinitionError) as ei:
        gorch.resume(wf, state)
    assert "'b'" in str(ei.value)
    assert started(PerItem(items=["a", "b"])).status is gorch.WorkflowStatus.WAITING


# --------------------------------------------------------------------------- ResumeLimitError


def test_loop_that_never_blocks_hits_the_limit() -> None:
    wf = workflow_of(lambda w: S(For("spin", True, If(lambda: False, Step("never", noop)))))
    state = gorch.new_state("r", "r")
    with unchanged(wf, state), pytest.raises(gorch.ResumeLimitError) as ei:
        gorch.resume(wf, state)
    msg = str(ei.value)
    assert "spin" in msg
    assert any(n in msg for n in ("100000", "100_000", "100,000"))


def test_loop_of_steps_hits_a_custom_limit() -> None:
    def build(w: Any) -> gorch.Section:
        return S(For("spin", True, Step("inc", lambda: setattr(w, "n", w.n + 1))))

    wf = workflow_of(build)
    with pytest.raises(gorch.ResumeLimitError) as ei:
        gorch.resume(wf, gorch.new_state("r", "r"), max_units=50)
    assert 0 < wf.n <= 50  # type: ignore[attr-defined]
    assert "50" in str(ei.value)


@pytest.mark.parametrize(("steps", "hits"), [(10, False), (11, True)])
def test_limit_counts_more_than_max_units_steps(steps: int, hits: bool) -> None:
    wf = workflow_of(lambda w: S(*[Step(f"s{i}", noop) for i in range(steps)]))
    if hits:
        with pytest.raises(gorch.ResumeLimitError):
            gorch.resume(wf, gorch.new_state("r", "r"), max_units=10)
    else:
        assert gorch.resume(wf, gorch.new_state("r", "r"), max_units=10) is WS.FINISHED


def test_fifty_thousand_steps_in_a_row_do_not_hit_the_default_limit() -> None:
    class Long(gorch.Workflow):
        n: int = 0

        def inc(self) -> None:
            self.n += 1

        def definition(self) -> gorch.Section:
            return S(*[Step(f"s{i}", self.inc) for i in range(50_000)])

    wf = Long()
    assert gorch.resume(wf, gorch.new_state("l", "l")) is WS.FINISHED
    assert wf.n == 50_000


# --------------------------------------------------------------------------- HandlerFailed


class Fragile(gorch.Workflow):
    def explode(self, d: Decision) -> None:
        raise KeyError(f"no approver {d.by}")

    def definition(self) -> gorch.Section:
        return S(Select("wait", On("decide", self.explode), On("other")))


def test_handler_raising_is_handler_failed_and_state_unchanged() -> None:
    wf = Fragile()
    state = started(wf)
    pc = awaited_pc(state)
    with unchanged(wf, state), pytest.raises(gorch.HandlerFailed) as ei:
        gorch.handle_event(wf, state, "decide", {"approved": True, "by": "zed"}, pc=pc)
    assert isinstance(ei.value.__cause__, KeyError)
    assert "decide" in str(ei.value) and "zed" in str(ei.value)
    # the event is still awaited, with the same pc
    assert (MAIN, "decide", pc) in gorch.awaited_events(state)
    assert state.thread(MAIN).status is TS.WAITING_EVENT  # type: ignore[union-attr]
    gorch.handle_event(wf, state, "other", pc=pc)


class FailingHandler(gorch.Handler):
    def handle(self, req: gorch.EventRequest, input: Any) -> Any:
        raise RuntimeError("handle boom")


def test_handler_subclass_raising_is_handler_failed() -> None:
    wf = workflow_of(lambda w: S(Select("wait", On("e", FailingHandler()))))
    state = started(wf)
    with unchanged(wf, state), pytest.raises(gorch.HandlerFailed) as ei:
        gorch.handle_event(wf, state, "e")
    assert isinstance(ei.value.__cause__, RuntimeError)
    assert "handle boom" in str(ei.value)


# --------------------------------------------------------------------------- StepFailed


class Broken(gorch.Workflow):
    ran: list[str] = Field(default_factory=list)

    def ok(self) -> None:
        self.ran.append("ok")

    def charge(self) -> None:
        self.ran.append("charge")
        raise TimeoutError("payment gateway timed out")

    def definition(self) -> gorch.Section:
        return S(Step("ok", self.ok), Step("charge card", self.charge))


def test_step_raising_is_step_failed() -> None:
    wf = Broken()
    state = gorch.new_state("s", "s")
    with pytest.raises(gorch.StepFailed) as ei:
        gorch.resume(wf, state)
    err = ei.value
    assert err.step == "charge card"
    assert isinstance(err.__cause__, TimeoutError)
    assert "charge card" in str(err) and "payment gateway timed out" in str(err)
    t = state.thread(MAIN)
    assert t is not None
    assert (t.status, t.cur_step, t.attempts) == (TS.EXECUTING, "charge card", 1)
    assert "payment gateway timed out" in t.error
    with pytest.raises(gorch.StepFailed) as again:
        gorch.resume(wf, state)
    assert again.value.step == "charge card"
    assert t.attempts == 2
    assert wf.ran == ["ok", "charge", "charge"]


# --------------------------------------------------------------------------- SetupError


class Flaky(gorch.Handler):
    def __init__(self) -> None:
        self.failures = 0
        self.setups: list[str] = []
        self.teardowns: list[str] = []

    def setup(self, req: gorch.EventRequest) -> str:
        self.setups.append(req.name)
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError(f"cannot register {req.name}")
        return "registered"

    def teardown(self, req: gorch.EventRequest, handled: bool) -> None:
        self.teardowns.append(req.name)


FLAKY = Flaky()


class NeedsSetup(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(
            Select("wait", On("hook", FLAKY), On("other", FLAKY)),
            Select("after", On("done")),
        )


@pytest.fixture
def flaky() -> Flaky:
    FLAKY.__init__()  # type: ignore[misc]
    return FLAKY


def test_setup_raising_is_setup_error_after_the_final_checkpoint(flaky: Flaky) -> None:
    flaky.failures = 2
    wf = NeedsSetup()
    state = gorch.new_state("s", "s")
    kinds: list[CK] = []
    with pytest.raises(gorch.SetupError) as ei:
        gorch.resume(wf, state, kinds.append)
    assert flaky.setups == ["hook", "other"]  # all were tried before raising
    assert kinds[-1] is CK.AFTER_RESUME and kinds.count(CK.AFTER_RESUME) == 1
    assert state.status is WS.WAITING
    msg = str(ei.value)
    assert "hook" in msg and "other" in msg and "cannot register" in msg
    t = state.thread(MAIN)
    assert t is not None
    assert [we.status for we in t.wait_events] == [ES.SETUP_ERROR, ES.SETUP_ERROR]
    assert all("cannot register" in we.error for we in t.wait_events)


def test_failed_setup_is_retried_on_next_resume(flaky: Flaky) -> None:
    flaky.failures = 1
    wf = NeedsSetup()
    state = gorch.new_state("s", "s")
    with pytest.raises(gorch.SetupError):
        gorch.resume(wf, state)
    wf, state = gorch.loads(gorch.dumps(wf, state), NeedsSetup)
    assert gorch.resume(wf, state) is WS.WAITING
    assert flaky.setups == ["hook", "other", "hook"]
    t = state.thread(MAIN)
    assert t is not None
    assert [(we.status, we.req.setup_data) for we in t.wait_events] == [
        (ES.SETUP, "registered"),
        (ES.SETUP, "registered"),
    ]


def test_event_whose_setup_failed_is_deliverable_and_dropped_without_teardown(
    flaky: Flaky,
) -> None:
    flaky.failures = 1
    wf = NeedsSetup()
    state = gorch.new_state("s", "s")
    with pytest.raises(gorch.SetupError):
        gorch.resume(wf, state)
    gorch.handle_event(wf, state, "hook")
    gorch.resume(wf, state)
    assert flaky.teardowns == ["other"]  # "hook" never set up: no teardown
    assert state.thread(MAIN).cur_step == "after"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- CursorNotFound


class V1(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Step("prepare", noop), Select("review", On("approve")), Step("pay", noop))


class V2(gorch.Workflow):  # the deploy renamed "review"
    def definition(self) -> gorch.Section:
        return S(Step("prepare", noop), Select("manager review", On("approve")), Step("pay", noop))


def test_cursor_missing_after_a_definition_change() -> None:
    v1 = V1()
    blob = gorch.dumps(v1, started(v1))
    wf, state = gorch.loads(blob, V2)
    with unchanged(wf, state), pytest.raises(gorch.CursorNotFound) as ei:
        gorch.resume(wf, state)
    assert MAIN in str(ei.value) and "review" in str(ei.value)
    with unchanged(wf, state), pytest.raises(gorch.CursorNotFound) as ei:
        gorch.handle_event(wf, state, "approve")
    assert MAIN in str(ei.value) and "review" in str(ei.value)


class Spawns1(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Go("job", Step("work", noop)), Step("m1", noop), Select("wait", On("go")))


class Spawns2(gorch.Workflow):  # the deploy renamed the Go
    def definition(self) -> gorch.Section:
        return S(Go("new job", Step("work", noop)), Step("m1", noop), Select("wait", On("go")))


def test_cursor_missing_for_a_spawned_thread_that_has_not_started() -> None:
    wf1 = Spawns1()
    state1 = gorch.new_state("s", "s")
    saved: list[bytes] = []
    gorch.resume(wf1, state1, lambda kind: saved.append(gorch.dumps(wf1, state1)))
    wf, state = gorch.loads(saved[0], Spawns2)  # saved after "m1": "job" not started yet
    assert [(t.id, t.cur_step) for t in state.threads] == [(MAIN, "m1"), ("job", "")]
    with unchanged(wf, state), pytest.raises(gorch.CursorNotFound) as ei:
        gorch.resume(wf, state)
    assert "'job'" in str(ei.value)


class Jobs(gorch.Workflow):
    jobs: list[str] = Field(default_factory=lambda: ["build", "test"])

    def definition(self) -> gorch.Section:
        return S(
            *[Go(j, Select(f"{j} result", On("done"))) for j in self.jobs],
            Select("main", On("stop")),
        )


def test_cursor_missing_in_a_data_dependent_definition() -> None:
    wf = Jobs()
    state = started(wf)
    wf.jobs = ["build"]  # "test result" is gone from the definition
    with unchanged(wf, state), pytest.raises(gorch.CursorNotFound) as ei:
        gorch.resume(wf, state)
    assert "'test'" in str(ei.value) and "test result" in str(ei.value)
    with unchanged(wf, state), pytest.raises(gorch.CursorNotFound) as ei:
        gorch.handle_event(wf, state, "done", thread_id="test")
    assert "'test'" in str(ei.value) and "test result" in str(ei.value)


# --------------------------------------------------------------------------- ThreadExists


def test_go_with_the_main_thread_id() -> None:
    wf = workflow_of(lambda w: S(Go("impostor", Step("x", noop), id=MAIN)))
    state = gorch.new_state("t", "t")
    with unchanged(wf, state), pytest.raises(gorch.ThreadExists) as ei:
        gorch.resume(wf, state)
    assert repr(MAIN) in str(ei.value)


def test_go_with_an_id_spawned_earlier_in_the_same_unit() -> None:
    wf = workflow_of(
        lambda w: S(
            Go("first", Select("w1", On("e")), id="dup"),
            Go("second", Select("w2", On("e")), id=lambda: "dup"),
            Select("main", On("stop")),
        )
    )
    state = gorch.new_state("t", "t")
    with unchanged(wf, state), pytest.raises(gorch.ThreadExists) as ei:
        gorch.resume(wf, state)
    assert "'dup'" in str(ei.value)


def test_go_with_an_id_still_running_leaves_the_state_before_that_unit() -> None:
    def build(w: Any) -> gorch.Section:
        return S(
            For(
                "spawn",
                w.n < 2,
                Step("inc", lambda: setattr(w, "n", w.n + 1)),
                Go("job", Select("job wait", On("stop")), id="worker"),
            ),
            Select("main", On("stop")),
        )

    wf = workflow_of(build)
    state = gorch.new_state("t", "t")
    saved: list[bytes] = []
    with pytest.raises(gorch.ThreadExists) as ei:
        gorch.resume(wf, state, lambda kind: saved.append(gorch.dumps(wf, state)))
    assert "'worker'" in str(ei.value)
    assert gorch.dumps(wf, state) == saved[-1]  # the state after the last step
    assert [t.id for t in state.threads] == [MAIN, "worker"]


# --------------------------------------------------------------------------- SerializationError


def _good_blob() -> bytes:
    wf = Approval()
    return gorch.dumps(wf, started(wf))


def _corruptions() -> dict[str, bytes]:
    good = _good_blob()
    header, version, state, data = msgpack.unpackb(good, raw=False)
    return {
        "empty": b"",
        "garbage": b"\xc1\x00not msgpack",
        "truncated": good[: len(good) // 2],
        "trailing bytes": good + b"\x00",
        "foreign msgpack": msgpack.packb({"id": 1, "name": "x"}),
        "wrong magic": msgpack.packb(["gorc", version, state, data]),
        "future version": msgpack.packb([header, version + 1, state, data]),
        "bad state": msgpack.packb([header, version, ["x"], data]),
        "bad data": msgpack.packb([header, version, state, {"status": ["not", "a", "str"]}]),
        "ext type": msgpack.packb([header, version, state, msgpack.ExtType(1, b"x")]),
    }


@pytest.mark.parametrize("case", list(_corruptions()))
def test_corrupt_blob_is_a_serialization_error(case: str) -> None:
    with pytest.raises(gorch.SerializationError):
        gorch.loads(_corruptions()[case], Approval)


def test_blob_of_another_class_that_does_not_validate() -> None:
    class Strict(gorch.Workflow):
        amount: float

        def definition(self) -> gorch.Section:
            return S()

    with pytest.raises(gorch.SerializationError) as ei:
        gorch.loads(_good_blob(), Strict)
    assert "amount" in str(ei.value)


def test_non_bytes_blob_is_a_serialization_error() -> None:
    with pytest.raises(gorch.SerializationError):
        gorch.loads("not bytes", Approval)  # type: ignore[arg-type]


def test_data_that_would_not_load_back_is_a_serialization_error() -> None:
    wf = Approval()
    state = started(wf)
    wf.status = 12  # type: ignore[assignment]  # a step put an int into a str field
    with pytest.raises(gorch.SerializationError) as ei:
        gorch.dumps(wf, state)
    assert "status" in str(ei.value)
