"""Absolute timers: ``Timeout(name, *body, at=when)`` (issue 14, item 3).

``when`` is an aware datetime or a zero-argument callable returning one,
called when the Select starts waiting (the timer's setup). A time already past
fires at once; naive datetimes are refused, never guessed. Exactly one of
``after`` / ``at``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from pydantic import Field

import gorch
from gorch import EventStatus as ES
from gorch import On, Return, S, Select, Step, Timeout
from gorch import WorkflowStatus as WS
from gorch.engine import Engine
from gorch.graph import case_label, mermaid, timer_label
from gorch.stores import Store
from gorch.stores.memory import MemoryStore
from gorch.stores.sqlite import SQLiteStore
from gorch.testing import WorkflowEnv

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
PLUS_2 = timezone(timedelta(hours=2))


class Escalation(gorch.Workflow):
    """An order waits for approval; on day 3 after it was placed, it escalates."""

    placed: datetime
    log: list[str] = Field(default_factory=list)
    calls: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Step("notify", self.note("notify")),
            Select(
                "await approval",
                On("approve", Step("ship", self.note("ship"))),
                Timeout("day 3", Step("escalate", self.note("escalate")), Return(), at=self.day_3),
            ),
            Step("close", self.note("close")),
        )

    def day_3(self) -> datetime:
        self.calls += 1
        return self.placed + timedelta(days=3)

    def note(self, what: str) -> Any:
        return lambda: self.log.append(what)


def start(wf: gorch.Workflow) -> gorch.State:
    state = gorch.new_state(f"{type(wf).__name__}-1", type(wf).__name__)
    assert gorch.resume(wf, state) is WS.WAITING
    return state


def roundtrip(wf: Any, state: gorch.State) -> tuple[Any, gorch.State]:
    return gorch.loads(gorch.dumps(wf, state), type(wf))


# --------------------------------------------------------------------------- at=callable


def test_at_a_callable_is_called_once_when_the_select_starts_waiting() -> None:
    with freeze_time(T0 + timedelta(hours=5)) as clock:
        wf = Escalation(placed=T0)
        assert wf.calls == 0  # building the definition calls nothing
        state = start(wf)
        assert wf.calls == 1
        due = T0 + timedelta(days=3)
        assert gorch.next_wakeup(state) == due  # counted from `placed`, not from now
        (we,) = [w for w in state.threads[0].wait_events if w.req.name == "day 3"]
        assert we.req.setup_data == "2024-03-04T09:00:00+00:00"

        wf, state = roundtrip(wf, state)
        clock.move_to(due - timedelta(seconds=1))
        assert gorch.due_events(state) == []
        with pytest.raises(gorch.TimerNotSendable):
            gorch.handle_event(wf, state, "day 3")
        clock.move_to(due)
        (req,) = gorch.due_events(state)
        gorch.handle_event(wf, state, req.name, thread_id=req.thread_id, pc=req.pc)
        assert gorch.resume(wf, state) is WS.FINISHED
        assert wf.log == ["notify", "escalate"]
        assert wf.calls == 1  # firing and the resumes after it did not call it again


def test_a_time_already_past_fires_at_once() -> None:
    with freeze_time(T0):
        wf = Escalation(placed=T0 - timedelta(days=10))
        state = start(wf)
        (req,) = gorch.due_events(state)
        assert req.name == "day 3"
        assert gorch.next_wakeup(state) == T0 - timedelta(days=7)
        gorch.handle_event(wf, state, req.name, thread_id=req.thread_id, pc=req.pc)
        assert gorch.resume(wf, state) is WS.FINISHED
        assert wf.log == ["notify", "escalate"]


def test_an_offset_is_kept_as_the_same_instant_in_utc() -> None:
    with freeze_time(T0):
        wf = Escalation(placed=datetime(2024, 3, 1, 11, 0, tzinfo=PLUS_2))  # = T0
        state = start(wf)
        assert gorch.next_wakeup(state) == T0 + timedelta(days=3)
        reqs = [w.req for w in state.threads[0].wait_events if w.req.name == "day 3"]
        assert reqs[0].setup_data == "2024-03-04T09:00:00+00:00"


class Naive(gorch.Workflow):
    when: datetime

    def definition(self) -> gorch.Section:
        return S(Select("wait", On("go"), Timeout("late", at=lambda: self.when)))


def test_a_callable_returning_a_naive_time_is_a_setup_error_retried_later() -> None:
    wf = Naive(when=datetime(2024, 3, 4, 9, 0))  # naive
    state = gorch.new_state("n", "naive")
    with pytest.raises(gorch.SetupError) as info:
        gorch.resume(wf, state)
    assert "'late'" in str(info.value) and "naive datetime 2024-03-04T09:00:00" in str(info.value)
    (we,) = [w for w in state.threads[0].wait_events if w.req.name == "late"]
    assert we.status is ES.SETUP_ERROR and we.req.setup_data is None
    assert gorch.due_events(state, now=datetime(2100, 1, 1, tzinfo=UTC)) == []  # never fires

    wf.when = wf.when.replace(tzinfo=UTC)  # the data is fixed: the next resume sets it up
    assert gorch.resume(wf, state) is WS.WAITING
    assert gorch.next_wakeup(state) == datetime(2024, 3, 4, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "mention"),
    [
        (date(2024, 3, 4), "has no time of day"),
        ("2024-03-04T09:00:00+00:00", "must be an aware datetime"),
        (timedelta(days=3), "must be an aware datetime"),
    ],
    ids=["date", "str", "timedelta"],
)
def test_a_callable_returning_something_else_is_a_setup_error(value: Any, mention: str) -> None:
    class Odd(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(Select("wait", Timeout("t", at=lambda: value)))

    with pytest.raises(gorch.SetupError, match=mention):
        gorch.resume(Odd(), gorch.new_state("o", "odd"))


# --------------------------------------------------------------------------- at=datetime


class Fixed(gorch.Workflow):
    deadline: datetime
    log: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "wait",
                On("done"),
                Timeout("deadline", Step("expire", self.expire), at=self.deadline),
            )
        )

    def expire(self) -> None:
        self.log.append("expire")


def test_at_a_datetime_is_due_then_whatever_the_time_of_the_wait() -> None:
    deadline = datetime(2024, 3, 4, 17, 30, tzinfo=PLUS_2)
    for started in (T0, T0 + timedelta(days=2)):
        with freeze_time(started):
            state = start(Fixed(deadline=deadline))
            assert gorch.next_wakeup(state) == deadline
            assert gorch.next_wakeup(state) == datetime(2024, 3, 4, 15, 30, tzinfo=UTC)


class NaiveFixed(gorch.Workflow):
    log: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            Step("first", lambda: self.log.append("first")),
            Select("wait", Timeout("t", at=datetime(2024, 3, 4, 9, 0))),
        )


def test_a_naive_datetime_is_refused_before_anything_runs() -> None:
    wf = NaiveFixed()
    state = gorch.new_state("n", "naive")
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError) as info:
        gorch.resume(wf, state)
    msg = str(info.value)
    assert "Timeout 't'" in msg and "naive datetime 2024-03-04T09:00:00" in msg
    assert "tzinfo=UTC" in msg
    assert wf.log == [] and gorch.dumps(wf, state) == before


def _bad(**kwargs: Any) -> Timeout:
    return Timeout("t", **kwargs)


@pytest.mark.parametrize(
    ("timeout", "mentions"),
    [
        (lambda: _bad(), ["Timeout 't'", "no due time", "at=when"]),
        (lambda: Timeout("t", Step("x", print)), ["no due time"]),  # type: ignore[call-overload]
        (lambda: _bad(after=5, at=T0), ["both", "after=5", "pass one of them"]),
        (lambda: _bad(at=date(2024, 3, 4)), ["has no time of day"]),
        (lambda: _bad(at="2024-03-04"), ["at= needs an aware datetime", "'2024-03-04'"]),
        (lambda: _bad(after="3 days"), ["needs a timedelta or a number of seconds"]),
    ],
    ids=["neither", "body only", "both", "date", "str", "after str"],
)
def test_invalid_timers_are_refused_before_anything_runs(timeout: Any, mentions: list[str]) -> None:
    class Bad(gorch.Workflow):
        log: list[str] = Field(default_factory=list)

        def definition(self) -> gorch.Section:
            return S(Step("first", lambda: self.log.append("x")), Select("s", timeout()))

    wf = Bad()
    state = gorch.new_state("b", "bad")
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError) as info:
        gorch.resume(wf, state)
    for m in mentions:
        assert m in str(info.value)
    assert wf.log == [] and gorch.dumps(wf, state) == before


# --------------------------------------------------------------------------- async at=


class AsyncAt(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Select("wait", On("go"), Timeout("t", at=self.lookup)))

    async def lookup(self) -> datetime:
        await asyncio.sleep(0)
        return T0


def test_an_async_at_is_refused_by_the_sync_api_and_awaited_by_aresume() -> None:
    wf = AsyncAt()
    state = gorch.new_state("a", "async")
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError, match=r"the at= of Timeout 't' \(AsyncAt.lookup\)"):
        gorch.resume(wf, state)
    assert gorch.dumps(wf, state) == before

    assert asyncio.run(gorch.aresume(wf, state)) is WS.WAITING
    assert gorch.next_wakeup(state) == T0


# --------------------------------------------------------------------------- test kit and Engine


def test_the_test_kit_fires_it_on_day_3() -> None:
    env = WorkflowEnv({"order": Escalation})
    placed = env.now - timedelta(hours=6)  # placed before the workflow started
    inst = env.start("order", "o-1", {"placed": placed.isoformat()})
    assert inst.next_wakeup == placed + timedelta(days=3)
    assert env.advance(days=2) == []
    fired = env.advance(days=1)
    assert [(e.kind, e.name, e.at) for e in fired] == [
        ("timer", "day 3", placed + timedelta(days=3))
    ]
    assert env.status("o-1") is WS.FINISHED
    assert env.data("o-1", Escalation).log == ["notify", "escalate"]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "t.db")
    try:
        yield opened
    finally:
        opened.close()


def test_the_engine_stores_the_due_time_and_run_due_fires_it(store: Store) -> None:
    engine = Engine(store, workflows={"order": Escalation})
    snap = engine.start("order", "o-1", {"placed": T0.isoformat()})
    due = T0 + timedelta(days=3)
    assert snap.status == "waiting"
    assert store.load("o-1").wake_at == due
    assert engine.run_due(now=due - timedelta(seconds=1)) == []
    results = engine.run_due(now=due)
    assert [(r.id, r.fired, r.status) for r in results] == [("o-1", ["day 3"], "finished")]
    assert engine.get("o-1").data["log"] == ["notify", "escalate"]
    assert engine.get("o-1").data["calls"] == 1


def test_the_engine_fires_a_past_time_on_the_next_run_due(store: Store) -> None:
    engine = Engine(store, workflows={"order": Escalation})
    engine.start("order", "o-2", {"placed": (datetime.now(UTC) - timedelta(days=4)).isoformat()})
    results = engine.run_due()
    assert [(r.id, r.fired, r.status) for r in results] == [("o-2", ["day 3"], "finished")]


# --------------------------------------------------------------------------- drawings


def named_deadline() -> datetime:
    return T0


def test_the_diagram_says_when_an_absolute_timer_fires() -> None:
    assert timer_label(Timeout("t", 3600)) == "60m"
    assert timer_label(Timeout("t", at=datetime(2024, 3, 4, 11, 0, tzinfo=PLUS_2))) == (
        "at 2024-03-04 09:00 UTC"
    )
    assert timer_label(Timeout("t", at=T0 + timedelta(seconds=5))) == "at 2024-03-01 09:00:05 UTC"
    assert timer_label(Timeout("t", at=named_deadline)) == "at named_deadline()"
    assert timer_label(Timeout("t", at=lambda: T0)) == "at a computed time"
    assert case_label(Timeout("day 3", at=named_deadline)) == "⏱ day 3 (at named_deadline())"
    assert "⏱ day 3 (at day_3())" in mermaid(Escalation(placed=T0))
