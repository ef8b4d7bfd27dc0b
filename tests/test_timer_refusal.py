"""A Timeout fires only when due: handle_event refuses a timer's name before then.

Timers are internal: a caller holding the core API directly cannot skip a wait
(an escalation, a cart's expiry) by naming the timer. A scheduler fires them
with ``due_events`` and passes the same ``now`` to ``handle_event``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

import gorch
from gorch import On, S, Select, Step, Timeout

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class Cart(gorch.Workflow):
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "wait",
                On("pay", self.paid),
                Timeout("expire", timedelta(hours=1), Step("expired", self.expired)),
            ),
        )

    def paid(self) -> str:
        self.log.append("paid")
        return "thanks"

    def expired(self) -> None:
        self.log.append("expired")


def waiting() -> tuple[Cart, gorch.State]:
    wf, state = Cart(), gorch.new_state("cart-1", "cart")
    with freeze_time(T0):
        assert gorch.resume(wf, state) is gorch.WorkflowStatus.WAITING
    return wf, state


@pytest.mark.parametrize("early", [timedelta(0), timedelta(minutes=59, seconds=59)])
def test_a_timer_not_yet_due_is_refused_and_nothing_changes(early: timedelta) -> None:
    wf, state = waiting()
    before = gorch.dumps(wf, state)
    with freeze_time(T0 + early), pytest.raises(gorch.TimerNotSendable) as info:
        gorch.handle_event(wf, state, "expire")
    assert info.value.event == "expire" and info.value.workflow_id == "cart-1"
    assert info.value.due == T0 + timedelta(hours=1)
    assert "fires when due" in str(info.value) and "2030-01-01T13:00:00" in str(info.value)
    assert gorch.dumps(wf, state) == before
    assert wf.log == []


def test_an_explicit_now_before_the_due_time_is_refused_too() -> None:
    wf, state = waiting()
    before = gorch.dumps(wf, state)
    (req,) = [r for r in state.threads[0].wait_events if r.req.name == "expire"]
    with pytest.raises(gorch.TimerNotSendable):
        gorch.handle_event(wf, state, "expire", pc=req.req.pc, now=T0 + timedelta(minutes=30))
    assert gorch.dumps(wf, state) == before


def test_a_due_timer_fires_through_due_events_and_the_same_now() -> None:
    wf, state = waiting()
    later = T0 + timedelta(hours=1)
    (req,) = gorch.due_events(state, now=later)
    gorch.handle_event(wf, state, req.name, thread_id=req.thread_id, pc=req.pc, now=later)
    assert gorch.resume(wf, state) is gorch.WorkflowStatus.FINISHED
    assert wf.log == ["expired"]


def test_a_naive_now_is_taken_as_utc() -> None:
    wf, state = waiting()
    naive = (T0 + timedelta(hours=2)).replace(tzinfo=None)
    gorch.handle_event(wf, state, "expire", now=naive)
    assert gorch.resume(wf, state) is gorch.WorkflowStatus.FINISHED


def test_the_clock_decides_when_no_now_is_given() -> None:
    wf, state = waiting()
    with freeze_time(T0 + timedelta(hours=1)):
        gorch.handle_event(wf, state, "expire")
    assert gorch.resume(wf, state) is gorch.WorkflowStatus.FINISHED
    assert wf.log == ["expired"]


def test_the_events_of_the_same_select_stay_sendable() -> None:
    wf, state = waiting()
    assert gorch.handle_event(wf, state, "pay") == "thanks"
    assert gorch.resume(wf, state) is gorch.WorkflowStatus.FINISHED
    assert wf.log == ["paid"]


def test_ahandle_event_refuses_a_timer_not_yet_due_and_fires_a_due_one() -> None:
    wf, state = waiting()
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.TimerNotSendable):
        asyncio.run(gorch.ahandle_event(wf, state, "expire", now=T0))
    assert gorch.dumps(wf, state) == before
    asyncio.run(gorch.ahandle_event(wf, state, "expire", now=T0 + timedelta(hours=1)))
    assert asyncio.run(gorch.aresume(wf, state)) is gorch.WorkflowStatus.FINISHED
    assert wf.log == ["expired"]
