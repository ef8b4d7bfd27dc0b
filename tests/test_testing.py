"""``gorch.testing``: the in-process WorkflowEnv on a virtual clock, and the fixture."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar

import pydantic
import pytest
from pydantic import Field

import gorch
from gorch import For, If, On, Return, S, Select, Step, Timeout
from gorch.clock import now as clock_now
from gorch.clock import use_clock
from gorch.errors import (
    EventNotFound,
    GorchError,
    InvalidEventInput,
    SerializationError,
    StepFailed,
    UnknownWorkflow,
    WorkflowExists,
    WorkflowNotFound,
)
from gorch.hooks import Middleware, ResumeContext
from gorch.testing import (
    DEFAULT_START,
    Entry,
    RoundTripError,
    TimerLimitError,
    WorkflowEnv,
    gorch_env,  # noqa: F401
)

T0 = DEFAULT_START

# --------------------------------------------------------------------------- workflows


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Expense(gorch.Workflow):
    """The README's three-day approval."""

    amount: float
    status: str = "new"
    approver: str = ""
    notified_at: datetime | None = None

    def definition(self) -> gorch.Section:
        return S(
            Step("notify manager", self.notify),
            Select(
                "await decision",
                On("decide", self.on_decide),
                Timeout("escalate", timedelta(days=3), Step("escalate", self.escalate), Return()),
            ),
            If(self.status == "approved", Step("pay", self.pay)).Else(
                Step("tell requester", self.reject)
            ),
        )

    def notify(self) -> None:
        self.notified_at = clock_now()  # the virtual clock, inside the env

    def on_decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        self.approver = d.by
        return {"status": self.status}

    def escalate(self) -> None:
        self.status = "escalated"

    def pay(self) -> None:
        self.status = "paid"

    def reject(self) -> None:
        self.status = "told"


class Reminder(gorch.Workflow):
    """Waits ``hours``, then records when it woke up."""

    hours: float
    woke_at: datetime | None = None

    def definition(self) -> gorch.Section:
        return S(
            Select("sleep", Timeout("wake", timedelta(hours=self.hours))),
            Step("record", self.record),
        )

    def record(self) -> None:
        self.woke_at = clock_now()


class Ticker(gorch.Workflow):
    """A timer per iteration: each is set up while ``advance`` runs."""

    every: float = 1.0
    ticks: list[datetime] = Field(default_factory=list)
    limit: int = 3

    def definition(self) -> gorch.Section:
        return S(
            For(
                "loop",
                len(self.ticks) < self.limit,
                Select("nap", Timeout("tick", timedelta(hours=self.every))),
                Step("count", self.count),
            ),
        )

    def count(self) -> None:
        self.ticks.append(clock_now())


class Mixed(gorch.Workflow):
    """A step, an event, a step, a timer, a step: one of each kind for history."""

    got: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Step("prepare", self.noop),
            Select("await go", On("go", self.on_go)),
            Step("middle", self.noop),
            Select("pause", Timeout("rested", timedelta(minutes=30))),
            Step("done", self.noop),
        )

    def noop(self) -> None:
        pass

    def on_go(self, n: int) -> int:
        self.got = n
        return n * 2


class Lossy(gorch.Workflow):
    """Data that pydantic writes but does not read back as it was (and some it does)."""

    meta: dict[str, Any] = Field(default_factory=dict)
    scratch: str = Field(default="", exclude=True)
    tags: set[str] = Field(default_factory=set)
    price: Decimal = Decimal("0")
    ratio: float = 0.0

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "what",
                On("stamp", self.stamp),
                On("scribble", self.scribble),
                On("harmless", self.harmless),
                On("nan", self.nan),
            ),
        )

    def stamp(self) -> None:
        self.meta["when"] = datetime(2030, 1, 2, tzinfo=UTC)  # comes back as a str

    def scribble(self) -> None:
        self.scratch = "lost"  # exclude=True: never written

    def harmless(self) -> None:
        self.tags = {"b", "a"}  # written as a sorted list, read back as a set
        self.price = Decimal("1.10")
        self.ratio = 3  # read back as 3.0, which == 3
        self.meta["n"] = [1, {"k": "v"}]

    def nan(self) -> None:
        self.meta["n"] = float("nan")  # JSON has no NaN: pydantic writes null


class BadType(gorch.Workflow):
    """A step that puts an int in a str field: the blob could not be loaded."""

    name: str = ""

    def definition(self) -> gorch.Section:
        return S(Step("set name", self.set_name), Select("wait", On("never")))

    def set_name(self) -> None:
        self.name = 5  # type: ignore[assignment]


class Flaky(gorch.Workflow):
    """``charge`` fails on its first attempt, after changing data."""

    fail: ClassVar[list[bool]] = []
    prepared: int = 0
    charged: int = 0

    def definition(self) -> gorch.Section:
        return S(Step("prepare", self.prepare), Step("charge", self.charge))

    def prepare(self) -> None:
        self.prepared += 1

    def charge(self) -> None:
        self.charged += 1
        if Flaky.fail:
            Flaky.fail.pop()
            raise RuntimeError("card declined")


class Spinner(gorch.Workflow):
    """Zero-length timers forever: ``advance`` must stop it, not hang."""

    def definition(self) -> gorch.Section:
        return S(For("spin", True, Select("nap", Timeout("now", 0))))


def expense_env(**kw: Any) -> WorkflowEnv:
    return WorkflowEnv(workflows={"expense": Expense}, **kw)


def names(entries: list[Entry]) -> list[str]:
    return [e.name for e in entries]


# --------------------------------------------------------------------------- three-day approval


def test_approval_decided_in_time() -> None:
    env = expense_env()
    inst = env.start("expense", "e1", {"amount": 120})
    assert inst.status is gorch.WorkflowStatus.WAITING
    assert inst.waiting_on == ["decide", "escalate"]
    assert inst.next_wakeup == T0 + timedelta(days=3)
    assert env.data("e1", Expense).notified_at == T0

    assert env.advance(days=2) == []  # not due yet: nothing fires
    assert env.send("e1", "decide", {"approved": True, "by": "ann"}) == {"status": "approved"}

    assert env.status("e1") is gorch.WorkflowStatus.FINISHED
    assert env.waiting_on("e1") == []
    assert env.next_wakeup("e1") is None
    data = env.get("e1").data
    assert isinstance(data, Expense)
    assert (data.status, data.approver) == ("paid", "ann")
    assert names(env.history("e1")) == ["notify manager", "decide", "pay", "finish"]
    assert env.advance(days=5) == []  # the timer of the finished wait never fires


def test_approval_escalated_after_three_days() -> None:
    env = expense_env()
    env.start("expense", "e1", {"amount": 120})
    assert env.advance(timedelta(days=3) - timedelta(seconds=1)) == []
    fired = env.advance(seconds=1)

    assert [(e.kind, e.name, e.at) for e in fired] == [
        ("timer", "escalate", T0 + timedelta(days=3))
    ]
    assert env.data("e1", Expense).status == "escalated"
    assert env.status("e1") is gorch.WorkflowStatus.FINISHED
    assert [(e.kind, e.name) for e in env.history("e1")] == [
        ("step", "notify manager"),
        ("timer", "escalate"),
        ("step", "escalate"),
        ("finish", "finish"),
    ]
    with pytest.raises(gorch.WorkflowFinishedError):
        env.send("e1", "decide", {"approved": True, "by": "ann"})


# --------------------------------------------------------------------------- advance


def test_timers_of_several_instances_fire_in_due_time_order() -> None:
    env = WorkflowEnv(workflows={"reminder": Reminder})
    for id, hours in [("late", 5), ("early", 1), ("mid", 3), ("tie", 3)]:
        env.start("reminder", id, {"hours": hours})
    assert env.next_wakeup() == T0 + timedelta(hours=1)

    fired = env.advance(hours=4)

    assert [(e.workflow_id, e.at - T0) for e in fired] == [
        ("early", timedelta(hours=1)),
        ("mid", timedelta(hours=3)),  # started before "tie": ties go to the first started
        ("tie", timedelta(hours=3)),
    ]
    for id, hours in [("early", 1), ("mid", 3), ("tie", 3)]:
        assert env.data(id, Reminder).woke_at == T0 + timedelta(hours=hours)
    assert env.status("late") is gorch.WorkflowStatus.WAITING
    assert env.now == T0 + timedelta(hours=4)
    assert [e.workflow_id for e in env.advance(hours=1)] == ["late"]


def test_a_timer_set_during_advance_fires_if_due_before_the_target() -> None:
    env = WorkflowEnv(workflows={"ticker": Ticker, "reminder": Reminder})
    env.start("ticker", "t", {"every": 1.0})
    env.start("reminder", "r", {"hours": 1.5})

    fired = env.advance(hours=10)

    hours = [(e.workflow_id, (e.at - T0) / timedelta(hours=1)) for e in fired]
    assert hours == [("t", 1.0), ("r", 1.5), ("t", 2.0), ("t", 3.0)]
    ticker = env.get("t").data
    assert isinstance(ticker, Ticker)
    assert ticker.ticks == [T0 + timedelta(hours=h) for h in (1, 2, 3)]
    assert env.status("t") is gorch.WorkflowStatus.FINISHED
    assert env.now == T0 + timedelta(hours=10)


def test_advance_stops_before_a_timer_set_during_advance_that_is_due_later() -> None:
    env = WorkflowEnv(workflows={"ticker": Ticker})
    env.start("ticker", "t", {"every": 1.0})
    assert len(env.advance(minutes=150)) == 2  # ticks at 1h and 2h; the 3h one waits
    assert env.next_wakeup("t") == T0 + timedelta(hours=3)
    assert env.now == T0 + timedelta(minutes=150)


@pytest.mark.parametrize(
    "call",
    [
        lambda env: env.advance(timedelta(days=-1)),
        lambda env: env.advance(-5),
        lambda env: env.advance(hours=-1),
        lambda env: env.advance(timedelta(days=3), days=-4),
        lambda env: env.advance_to(T0 - timedelta(seconds=1)),
    ],
)
def test_advance_backwards_is_refused_and_changes_nothing(call: Any) -> None:
    env = expense_env()
    env.start("expense", "e1", {"amount": 120})
    env.advance(hours=1)
    before = (env.now, env.get("e1").state, env.get("e1").data, env.history())

    with pytest.raises(ValueError, match="never goes back"):
        call(env)

    assert (env.now, env.get("e1").state, env.get("e1").data, env.history()) == before


def test_advance_rejects_a_non_duration() -> None:
    env = expense_env()
    with pytest.raises(TypeError, match="timedelta or seconds"):
        env.advance("3 days")  # type: ignore[arg-type]
    assert env.now == T0


def test_a_timer_loop_that_never_ends_is_stopped() -> None:
    env = WorkflowEnv(workflows={"spinner": Spinner}, max_timers=50)
    env.start("spinner", "s")
    with pytest.raises(TimerLimitError, match="more than 50 timers"):
        env.advance(seconds=1)
    assert isinstance(TimerLimitError(1, T0), GorchError)
    assert len(env.history("s", kind="timer")) == 50


def test_no_real_time_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"slept {seconds}s")

    monkeypatch.setattr(time, "sleep", no_sleep)
    env = WorkflowEnv(workflows={"ticker": Ticker})
    env.start("ticker", "t", {"every": 24 * 30, "limit": 12})  # a year of monthly ticks
    t0 = time.perf_counter()
    assert len(env.advance(days=365)) == 12
    assert time.perf_counter() - t0 < 1.0
    assert env.status("t") is gorch.WorkflowStatus.FINISHED


# --------------------------------------------------------------------------- storage round trip


def test_a_value_that_changes_type_in_storage_is_caught() -> None:
    env = WorkflowEnv(workflows={"lossy": Lossy})
    env.start("lossy", "l")
    with pytest.raises(RoundTripError) as info:
        env.send("l", "stamp")
    err = info.value
    assert isinstance(err, SerializationError)
    assert err.field == "meta['when']"
    assert err.before == datetime(2030, 1, 2, tzinfo=UTC)
    assert err.after == "2030-01-02T00:00:00Z"
    assert "a datetime became a str" in str(err)
    assert "after event 'stamp'" in str(err)
    # Kept as a store keeps it: the next call sees the str.
    assert env.data("l", Lossy).meta == {"when": "2030-01-02T00:00:00Z"}


def test_an_excluded_field_is_caught() -> None:
    env = WorkflowEnv(workflows={"lossy": Lossy})
    env.start("lossy", "l")
    with pytest.raises(RoundTripError, match="exclude=True") as info:
        env.send("l", "scribble")
    assert (info.value.field, info.value.before, info.value.after) == ("scratch", "lost", "")


def test_excluded_data_given_at_start_is_caught() -> None:
    env = WorkflowEnv(workflows={"lossy": Lossy})
    with pytest.raises(RoundTripError, match="as started"):
        env.start("lossy", "l", {"scratch": "given"})


def test_a_nan_that_comes_back_as_none_is_caught() -> None:
    env = WorkflowEnv(workflows={"lossy": Lossy})
    env.start("lossy", "l")
    with pytest.raises(RoundTripError, match="a float became a NoneType") as info:
        env.send("l", "nan")
    assert (info.value.field, info.value.after) == ("meta['n']", None)


class NaNs(gorch.Workflow):
    model_config = pydantic.ConfigDict(ser_json_inf_nan="constants")
    x: float = float("nan")

    def definition(self) -> gorch.Section:
        return S(Select("wait", On("never")))


def test_values_that_load_back_equal_are_not_flagged() -> None:
    env = WorkflowEnv(workflows={"lossy": Lossy, "nans": NaNs})
    env.start("lossy", "l")
    env.send("l", "harmless")
    data = env.get("l").data
    assert isinstance(data, Lossy)
    assert (data.tags, data.price, data.ratio) == ({"a", "b"}, Decimal("1.10"), 3.0)
    assert env.status("l") is gorch.WorkflowStatus.FINISHED
    # NaN != NaN, yet a model that writes NaN reads it back: not a difference.
    env.start("nans", "n")
    assert math.isnan(env.data("n", NaNs).x)


def test_the_check_can_be_turned_off() -> None:
    env = WorkflowEnv(workflows={"lossy": Lossy}, check_round_trip=False)
    env.start("lossy", "l")
    env.send("l", "scribble")
    assert env.data("l", Lossy).scratch == ""


def test_data_that_cannot_be_stored_names_the_step() -> None:
    env = WorkflowEnv(workflows={"bad": BadType})
    with pytest.raises(SerializationError, match="after step 'set name'"):
        env.start("bad", "b")
    assert env.data("b", BadType).name == ""


# --------------------------------------------------------------------------- history


def test_history_lists_steps_events_and_timers_in_order() -> None:
    env = WorkflowEnv(workflows={"mixed": Mixed, "expense": Expense})
    env.start("mixed", "m")
    env.start("expense", "other", {"amount": 1})
    env.advance(minutes=5)
    assert env.send("m", "go", 21) == 42
    env.advance(hours=1)

    hist = env.history("m")
    assert [(e.kind, e.name, e.at - T0) for e in hist] == [
        ("step", "prepare", timedelta(0)),
        ("event", "go", timedelta(minutes=5)),
        ("step", "middle", timedelta(minutes=5)),
        ("timer", "rested", timedelta(minutes=35)),
        ("step", "done", timedelta(minutes=35)),
        ("finish", "finish", timedelta(minutes=35)),
    ]
    go = hist[1]
    assert (go.input, go.output, go.thread_id) == (21, 42, gorch.MAIN_THREAD)
    assert all(e.attempt == 1 for e in hist if e.kind == "step")
    assert names(env.history("m", kind="step")) == ["prepare", "middle", "done"]
    # Without an id: every instance, interleaved as it happened.
    assert [(e.workflow_id, e.name) for e in env.history()][:3] == [
        ("m", "prepare"),
        ("other", "notify manager"),
        ("m", "go"),
    ]
    with pytest.raises(WorkflowNotFound):
        env.history("nope")


def test_a_failed_step_propagates_is_kept_and_is_retried_by_resume() -> None:
    Flaky.fail[:] = [True]
    env = WorkflowEnv(workflows={"flaky": Flaky})
    with pytest.raises(StepFailed) as info:
        env.start("flaky", "f")
    assert info.value.step == "charge"

    inst = env.get("f")
    assert inst.status is gorch.WorkflowStatus.RESUMING
    assert inst.state.threads[0].error == "RuntimeError: card declined"
    assert (env.data("f", Flaky).prepared, env.data("f", Flaky).charged) == (1, 0)
    assert [(e.name, e.attempt, e.error) for e in env.history("f")] == [
        ("prepare", 1, ""),
        ("charge", 1, "RuntimeError: card declined"),
    ]

    assert env.resume("f").status is gorch.WorkflowStatus.FINISHED
    assert (env.data("f", Flaky).prepared, env.data("f", Flaky).charged) == (1, 1)
    assert [(e.name, e.attempt) for e in env.history("f", kind="step")][-1] == ("charge", 2)


# --------------------------------------------------------------------------- API details


def test_delivery_errors_leave_the_instance_unchanged() -> None:
    env = expense_env()
    env.start("expense", "e1", {"amount": 120})
    before = (env.get("e1").state, env.get("e1").data, env.history())
    with pytest.raises(InvalidEventInput):
        env.send("e1", "decide", {"approved": "maybe"})
    with pytest.raises(EventNotFound):
        env.send("e1", "pay")
    with pytest.raises(WorkflowNotFound):
        env.send("nope", "decide")
    assert (env.get("e1").state, env.get("e1").data, env.history()) == before


def test_start_checks_name_id_and_data() -> None:
    env = expense_env()
    with pytest.raises(UnknownWorkflow, match="expense"):
        env.start("expnse")
    with pytest.raises(gorch.InvalidWorkflowData, match="amount"):
        env.start("expense", "e1", {})
    env.start("expense", "e1", {"amount": 1})
    with pytest.raises(WorkflowExists):
        env.start("expense", "e1", {"amount": 2})
    assert env.start("expense", data=Expense(amount=3)).id == "expense-1"
    assert env.start("expense", data={"amount": 4}).id == "expense-2"


def test_custom_start_time_and_clock() -> None:
    start = datetime(2031, 6, 1, 9, 30, tzinfo=UTC)
    env = expense_env(start=start)
    env.start("expense", "e1", {"amount": 120})
    assert env.next_wakeup("e1") == start + timedelta(days=3)
    with use_clock(env.clock):
        assert clock_now() == start
    env.advance(hours=2)
    assert env.clock() == env.now == start + timedelta(hours=2)


def test_middleware_sees_why_each_resume_runs() -> None:
    reasons: list[str] = []

    class Reasons(Middleware):
        def around_resume(self, ctx: ResumeContext, call_next: Any) -> Any:
            reasons.append(ctx.reason)
            return call_next()

    env = expense_env(middleware=[Reasons()])
    env.start("expense", "e1", {"amount": 1})
    env.start("expense", "e2", {"amount": 2})
    env.send("e1", "decide", {"approved": False, "by": "bo"})
    env.advance(days=3)
    assert reasons == ["start", "start", "event", "timer"]


def test_the_fixture_gives_an_empty_env(gorch_env: WorkflowEnv) -> None:  # noqa: F811
    assert gorch_env.workflows == {}
    assert gorch_env.now == DEFAULT_START
    gorch_env.register("expense", Expense)
    gorch_env.start("expense", "e1", {"amount": 10})
    gorch_env.advance(days=3)
    assert gorch_env.data("e1", Expense).status == "escalated"
    with pytest.raises(TypeError, match="not a Lossy"):
        gorch_env.data("e1", Lossy)
    with pytest.raises(TypeError, match="Workflow subclass"):
        gorch_env.register("bad", Decision)  # type: ignore[arg-type]
