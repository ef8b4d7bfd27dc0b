"""The Engine (SPEC §3): start / send / resume / get / list / cancel / run_due / retry.

The contract tests run once per store (memory, sqlite, postgres, redis) against
the real servers of ``tests/stores/store_support.py``. Every error case also
checks that the stored record (blob, version, status, wake-up) is unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import pydantic
import pytest
from freezegun import freeze_time
from pydantic import Field
from stores.store_support import ALL_KINDS, make_spec

import gorch
from gorch import For, On, Return, S, Select, Step, Timeout
from gorch.engine import DueResult, Engine, Snapshot
from gorch.errors import (
    EventNotFound,
    HandlerFailed,
    InvalidEventInput,
    InvalidWorkflowData,
    InvalidWorkflowId,
    SerializationError,
    StaleEvent,
    StoreUnavailable,
    UnknownWorkflow,
    WorkflowExists,
    WorkflowFinishedError,
    WorkflowNotActive,
    WorkflowNotFound,
)
from gorch.retry import Retry
from gorch.stores import Record, Store

EXPIRY = timedelta(hours=1)
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- workflows


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Approval(gorch.Workflow):
    """Notify, then wait for a decision (or escalate after an hour), then close."""

    amount: float
    status: str = "new"
    log: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            Step("notify", self.notify),
            Select(
                "await decision",
                On("decide", self.decide),
                Timeout("expired", EXPIRY, Step("escalate", self.escalate), Return()),
            ),
            Step("close", self.close),
        )

    def notify(self) -> None:
        self.log.append("notified")

    def decide(self, d: Decision) -> dict[str, str]:
        if not d.by:
            raise ValueError("an anonymous decision")
        self.status = "approved" if d.approved else "rejected"
        self.log.append(f"decided by {d.by}")
        return {"status": self.status}

    def escalate(self) -> None:
        self.status = "escalated"
        self.log.append("escalated")

    def close(self) -> None:
        self.log.append(f"closed: {self.status}")


class Recording(gorch.Handler):
    """A handler that records its setups and teardowns in ``CALLS``."""

    def setup(self, req: gorch.EventRequest) -> str:
        CALLS.append(("setup", req.name, None))
        return f"subscription-{req.name}"

    def teardown(self, req: gorch.EventRequest, handled: bool) -> None:
        CALLS.append(("teardown", f"{req.name}/{req.setup_data}", handled))


CALLS: list[tuple[str, str, bool | None]] = []


class Watch(gorch.Workflow):
    """Waits on two subscribed events and a timer."""

    pings: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "watch",
                On("ping", Recording()),
                On("pong", Recording()),
                Timeout("give up", EXPIRY),
            ),
        )


class Counter(gorch.Workflow):
    """Adds each ``add`` event's input to ``total``; a step after each event tallies it."""

    total: int = 0
    received: int = 0
    tallied: int = 0

    def definition(self) -> gorch.Section:
        return S(
            For("forever", True, Select("wait", On("add", self.add)), Step("tally", self.tally))
        )

    def add(self, n: int) -> int:
        self.total += n
        self.received += 1
        return self.total

    def tally(self) -> None:
        self.tallied += 1


class Api:
    """A fake remote service the steps below call: it fails ``failures_left`` more times."""

    failures_left = 0
    calls = 0

    @classmethod
    def call(cls) -> None:
        cls.calls += 1
        if cls.failures_left > 0:
            cls.failures_left -= 1
            raise ConnectionError(f"api down (call {cls.calls})")


class Flaky(gorch.Workflow):
    """A step with a retry policy: three attempts, 10 s then 20 s apart."""

    log: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            Step("call api", self.call_api, retry=Retry(attempts=3, backoff=10)),
            Step("after", self.after),
        )

    def call_api(self) -> None:
        Api.call()
        self.log.append("called")

    def after(self) -> None:
        self.log.append("after")


class Fragile(gorch.Workflow):
    """A step without a retry policy, after a step that succeeds."""

    log: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(Step("prepare", self.prepare), Step("call api", self.call_api))

    def prepare(self) -> None:
        self.log.append("prepared")

    def call_api(self) -> None:
        Api.call()
        self.log.append("called")


class Reminder(gorch.Workflow):
    """Two steps after a timer; the second calls ``Reminder.during_second_step``."""

    during_second_step: ClassVar[Callable[[], object]] = staticmethod(lambda: None)
    log: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "wait",
                Timeout("tick", 3600, Step("first", self.first), Step("second", self.second)),
            )
        )

    def first(self) -> None:
        self.log.append("first")

    def second(self) -> None:
        type(self).during_second_step()
        self.log.append("second")


WORKFLOWS: dict[str, type[gorch.Workflow]] = {
    "reminder": Reminder,
    "approval": Approval,
    "watch": Watch,
    "counter": Counter,
    "flaky": Flaky,
    "fragile": Fragile,
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _reset_fakes() -> Iterator[None]:
    CALLS.clear()
    Api.failures_left = 0
    Api.calls = 0
    Reminder.during_second_step = staticmethod(lambda: None)
    yield
    CALLS.clear()


@pytest.fixture(params=ALL_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store of each kind (PostgreSQL and Redis are the real servers)."""
    for spec in make_spec(request.param, tmp_path):
        opened = spec.open()
        try:
            yield opened
        finally:
            opened.close()


@pytest.fixture
def engine(store: Store) -> Engine:
    return Engine(store, workflows=WORKFLOWS)


def fields(rec: Record) -> tuple[bytes, int, str, datetime | None]:
    return rec.blob, rec.version, rec.status, rec.wake_at


@contextlib.contextmanager
def unchanged(store: Store, id: str) -> Iterator[None]:
    """Assert that the record ``id`` is byte-identical (blob, version, status, wake-up) after."""
    before = fields(store.load(id))
    yield
    assert fields(store.load(id)) == before


def awaited(snap: Snapshot) -> list[str]:
    return sorted(e.name for e in snap.awaited)


def timer_due(snap: Snapshot, name: str = "expired") -> datetime:
    (due,) = [e.due for e in snap.awaited if e.name == name]
    assert due is not None
    return due


# --------------------------------------------------------------------------- start / get


def test_engine_is_importable_from_gorch() -> None:
    # SPEC §3 spells it gorch.Engine(store, workflows={...}).
    assert getattr(gorch, "Engine", None) is Engine


def test_start_runs_until_blocked_and_get_describes_the_instance(
    engine: Engine, store: Store
) -> None:
    before = datetime.now(UTC)
    snap = engine.start("approval", "exp-1", {"amount": 120})
    after = datetime.now(UTC)

    assert (snap.id, snap.workflow, snap.status) == ("exp-1", "approval", "waiting")
    assert snap.data == {"amount": 120.0, "status": "new", "log": ["notified"]}
    assert [(t.id, t.status, t.cur_step, t.error, t.attempts) for t in snap.threads] == [
        (gorch.MAIN_THREAD, "waiting_event", "await decision", "", 0)
    ]
    assert awaited(snap) == ["decide", "expired"]
    decide = next(e for e in snap.awaited if e.name == "decide")
    assert decide.due is None and decide.thread_id == gorch.MAIN_THREAD
    due = timer_due(snap)
    assert before + EXPIRY <= due <= after + EXPIRY
    assert snap.next_wakeup == due
    assert snap.error == ""

    assert engine.get("exp-1") == snap
    rec = store.load("exp-1")
    assert (rec.workflow, rec.status, rec.version, rec.wake_at) == (
        "approval",
        "waiting",
        snap.version,
        due,
    )
    wf, state = gorch.loads(rec.blob, Approval)
    assert wf.log == ["notified"] and state.status is gorch.WorkflowStatus.WAITING


def test_start_without_an_id_generates_a_unique_one(engine: Engine) -> None:
    first = engine.start("approval", data={"amount": 1})
    second = engine.start("approval", data={"amount": 2})
    assert first.id != second.id
    assert engine.get(first.id).data["amount"] == 1.0
    assert engine.get(second.id).data["amount"] == 2.0


def test_start_accepts_a_workflow_instance_as_data(engine: Engine) -> None:
    snap = engine.start("approval", "exp-m", Approval(amount=7.5, status="draft"))
    assert snap.data["amount"] == 7.5 and snap.data["status"] == "draft"


def test_start_saves_at_checkpoints_before_a_failing_step(engine: Engine, store: Store) -> None:
    Api.failures_left = 1
    started = engine.start("fragile", "frag-1")  # the instance exists: start reports it

    snap = engine.get("frag-1")
    assert started == snap
    assert snap.status == "failed"
    assert snap.data["log"] == ["prepared"]  # the step before was saved, and runs only once
    assert "api down" in snap.error
    assert [(t.cur_step, t.attempts) for t in snap.threads] == [("call api", 1)]
    assert store.load("frag-1").status == "failed"


# --------------------------------------------------------------------------- send


def test_send_returns_the_handler_output_and_resumes_inline(engine: Engine, store: Store) -> None:
    start = engine.start("approval", "exp-1", {"amount": 120})
    out = engine.send("exp-1", "decide", {"approved": True, "by": "ann"})

    assert out == {"status": "approved"}
    snap = engine.get("exp-1")
    assert snap.status == "finished"
    assert snap.data["log"] == ["notified", "decided by ann", "closed: approved"]
    assert snap.awaited == [] and snap.next_wakeup is None
    assert snap.version > start.version
    assert store.load("exp-1").wake_at is None


def test_send_accepts_json_input_and_a_matching_pc(engine: Engine) -> None:
    start = engine.start("approval", "exp-1", {"amount": 120})
    pc = next(e.pc for e in start.awaited if e.name == "decide")
    out = engine.send(
        "exp-1", "decide", b'{"approved": false, "by": "bob"}', thread_id=gorch.MAIN_THREAD, pc=pc
    )
    assert out == {"status": "rejected"}
    assert engine.get("exp-1").data["log"][-1] == "closed: rejected"


def test_deferred_resume_is_finished_by_run_due(store: Store) -> None:
    engine = Engine(store, WORKFLOWS, defer_resume=True)
    snap = engine.start("approval", "d-1", {"amount": 5})
    assert snap.status == "resuming"
    assert snap.data["log"] == []  # nothing ran yet
    assert store.load("d-1").wake_at is not None

    results = engine.run_due()
    assert [(r.id, r.action, r.status, r.error) for r in results] == [
        ("d-1", "resume", "waiting", "")
    ]
    assert engine.get("d-1").data["log"] == ["notified"]

    out = engine.send("d-1", "decide", {"approved": True, "by": "ann"})
    assert out == {"status": "approved"}
    pending = engine.get("d-1")
    assert pending.status == "resuming"
    assert pending.data["status"] == "approved"
    assert pending.data["log"] == ["notified", "decided by ann"]  # "close" waits for a worker

    results = engine.run_due()
    assert [(r.id, r.action, r.status) for r in results] == [("d-1", "resume", "finished")]
    assert engine.get("d-1").data["log"][-1] == "closed: approved"
    assert engine.run_due() == []


def test_deferred_send_before_the_first_resume_still_delivers(store: Store) -> None:
    engine = Engine(store, WORKFLOWS, defer_resume=True)
    engine.start("approval", "d-2", {"amount": 5})
    out = engine.send("d-2", "decide", {"approved": False, "by": "cy"})
    assert out == {"status": "rejected"}
    assert engine.get("d-2").data["log"] == ["notified", "decided by cy"]


def test_resume_of_a_pending_instance_runs_it(store: Store) -> None:
    Engine(store, WORKFLOWS, defer_resume=True).start("approval", "d-3", {"amount": 5})
    snap = Engine(store, WORKFLOWS).resume("d-3")
    assert snap.status == "waiting"
    assert snap.data["log"] == ["notified"]
    assert store.load("d-3").status == "waiting"


# --------------------------------------------------------------------------- timers / run_due


def test_run_due_fires_a_timer_only_once_it_is_due(engine: Engine) -> None:
    due = timer_due(engine.start("approval", "exp-1", {"amount": 120}))
    assert engine.run_due(now=due - timedelta(seconds=1)) == []

    results = engine.run_due(now=due)
    assert [(r.id, r.action, r.fired, r.status, r.error) for r in results] == [
        ("exp-1", "timer", ["expired"], "finished", "")
    ]
    snap = engine.get("exp-1")
    assert snap.status == "finished"
    assert snap.data["status"] == "escalated"
    assert snap.data["log"] == ["notified", "escalated"]  # Return(): "close" never ran
    assert engine.run_due(now=due + timedelta(days=1)) == []


def test_run_due_with_freezegun_uses_the_frozen_clock(engine: Engine) -> None:
    with freeze_time(T0) as clock:
        snap = engine.start("approval", "exp-1", {"amount": 120})
        assert snap.next_wakeup == T0 + EXPIRY
        clock.tick(EXPIRY - timedelta(seconds=1))
        assert engine.run_due() == []
        clock.tick(timedelta(seconds=1))
        results = engine.run_due()
    assert [(r.id, r.fired) for r in results] == [("exp-1", ["expired"])]
    assert engine.get("exp-1").data["status"] == "escalated"


def test_an_event_delivered_first_cancels_the_timer(engine: Engine, store: Store) -> None:
    due = timer_due(engine.start("approval", "exp-1", {"amount": 120}))
    engine.send("exp-1", "decide", {"approved": True, "by": "ann"})
    with unchanged(store, "exp-1"):
        assert engine.run_due(now=due + timedelta(minutes=1)) == []
    assert engine.get("exp-1").data["status"] == "approved"


def test_run_due_respects_its_limit(engine: Engine) -> None:
    dues = [timer_due(engine.start("approval", f"exp-{i}", {"amount": i})) for i in range(3)]
    later = max(dues)
    first = engine.run_due(now=later, limit=2)
    second = engine.run_due(now=later, limit=2)
    assert len(first) == 2 and len(second) == 1
    assert sorted(r.id for r in first + second) == ["exp-0", "exp-1", "exp-2"]
    assert all(r.fired == ["expired"] for r in first + second)


def race_run_due(engine: Engine, now: datetime | None, workers: int = 4) -> list[DueResult]:
    """Several workers call ``run_due`` at once, a few times each; return all their results."""
    results: list[DueResult] = []
    lock = threading.Lock()
    barrier = threading.Barrier(workers)

    def worker() -> None:
        barrier.wait()
        for _ in range(3):
            got = engine.run_due(now=now, limit=3)
            with lock:
                results.extend(got)

    assert run_threads([worker] * workers) == []
    return results


def test_concurrent_workers_fire_each_timer_once(engine: Engine) -> None:
    ids = [f"exp-{i:02d}" for i in range(8)]
    with freeze_time(T0) as clock:
        for i in ids:
            engine.start("approval", i, {"amount": 1})
        clock.tick(EXPIRY)
        results = race_run_due(engine, None)
    assert [(r.id, r.error) for r in results if r.error] == []
    assert sorted(r.id for r in results for _ in r.fired) == ids
    assert all(engine.get(i).data["log"] == ["notified", "escalated"] for i in ids)


def test_an_instance_being_processed_with_an_explicit_now_is_not_claimed_again(
    engine: Engine,
) -> None:
    # While a worker runs the steps after a timer, the instance stays claimed by it:
    # another run_due with the same (future) `now` must not take it over mid-drive.
    snap = engine.start("reminder", "r-1")
    later = timer_due(snap, "tick")
    inner: list[DueResult] = []

    def another_worker() -> None:
        Reminder.during_second_step = staticmethod(lambda: None)  # once
        inner.extend(engine.run_due(now=later))

    Reminder.during_second_step = staticmethod(another_worker)

    outer = engine.run_due(now=later)

    assert inner == []
    assert [(r.id, r.action, r.fired, r.status, r.error) for r in outer] == [
        ("r-1", "timer", ["tick"], "finished", "")
    ]
    assert engine.get("r-1").data["log"] == ["first", "second"]


# --------------------------------------------------------------------------- step retries


def test_a_failed_step_is_retried_by_run_due_after_its_backoff(
    engine: Engine, store: Store
) -> None:
    Api.failures_left = 2
    with freeze_time(T0) as clock:
        snap = engine.start("flaky", "f-1")
        assert snap.status == "retrying"
        assert "api down (call 1)" in snap.error
        assert [(t.cur_step, t.attempts) for t in snap.threads] == [("call api", 1)]
        assert store.load("f-1").wake_at == T0 + timedelta(seconds=10)

        clock.tick(9)
        assert engine.run_due() == []
        clock.tick(1)
        results = engine.run_due()
        assert [(r.id, r.action, r.status) for r in results] == [("f-1", "retry", "retrying")]
        snap = engine.get("f-1")
        assert "api down (call 2)" in snap.error
        assert snap.threads[0].attempts == 2
        # exponential backoff: the second failure waits backoff * 2
        assert store.load("f-1").wake_at == T0 + timedelta(seconds=30)

        clock.tick(20)
        results = engine.run_due()
    assert [(r.id, r.action, r.status) for r in results] == [("f-1", "retry", "finished")]
    snap = engine.get("f-1")
    assert snap.status == "finished" and snap.error == ""
    assert snap.data["log"] == ["called", "after"]
    assert Api.calls == 3


def test_a_step_fails_for_good_after_its_last_attempt_and_retry_re_arms_it(
    engine: Engine, store: Store
) -> None:
    Api.failures_left = 10
    with freeze_time(T0) as clock:
        engine.start("flaky", "f-1")
        for _ in range(2):
            clock.tick(3600)
            engine.run_due()
        snap = engine.get("f-1")
        assert snap.status == "failed"
        assert "api down (call 3)" in snap.error
        assert snap.threads[0].attempts == 3
        assert snap.next_wakeup is None
        assert store.load("f-1").wake_at is None
        clock.tick(86400)
        with unchanged(store, "f-1"):
            assert engine.run_due() == []
        assert Api.calls == 3

        Api.failures_left = 0
        snap = engine.retry("f-1")
    assert snap.status == "finished"
    assert snap.data["log"] == ["called", "after"]
    assert Api.calls == 4


def test_retry_resets_the_attempts_of_a_failed_step(engine: Engine) -> None:
    Api.failures_left = 10
    with freeze_time(T0) as clock:
        engine.start("flaky", "f-1")
        for _ in range(2):
            clock.tick(3600)
            engine.run_due()
        assert engine.get("f-1").status == "failed"
        snap = engine.retry("f-1")  # the API is still down: a fresh round of attempts
    assert snap.status == "retrying"
    assert snap.threads[0].attempts == 1


def test_without_a_policy_a_step_fails_for_good_and_retry_resumes(engine: Engine) -> None:
    Api.failures_left = 1
    assert engine.start("fragile", "frag-1").status == "failed"
    assert engine.get("frag-1").status == "failed"
    assert engine.run_due(now=datetime.now(UTC) + timedelta(days=1)) == []

    snap = engine.retry("frag-1")
    assert snap.status == "finished"
    assert snap.data["log"] == ["prepared", "called"]  # "prepare" did not run again


def test_retry_of_an_instance_that_did_not_fail_is_refused(engine: Engine, store: Store) -> None:
    engine.start("approval", "exp-1", {"amount": 1})
    with unchanged(store, "exp-1"), pytest.raises(WorkflowNotActive):
        engine.retry("exp-1")


# --------------------------------------------------------------------------- list


def test_list_filters_and_paginates_in_id_order(engine: Engine) -> None:
    for i in range(1, 6):
        engine.start("approval", f"exp-{i:02d}", {"amount": i})
    for i in (2, 4):
        engine.send(f"exp-{i:02d}", "decide", {"approved": True, "by": "ann"})
    engine.start("watch", "w-01")

    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = engine.list(limit=2, after=after)
        pages += 1
        assert len(page.items) <= 2
        seen += [s.id for s in page.items]
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert seen == ["exp-01", "exp-02", "exp-03", "exp-04", "exp-05", "w-01"]
    assert pages == 3

    waiting = engine.list(workflow="approval", status="waiting")
    assert [s.id for s in waiting.items] == ["exp-01", "exp-03", "exp-05"]
    assert waiting.next_cursor is None
    assert all(s.workflow == "approval" and s.status == "waiting" for s in waiting.items)
    first = waiting.items[0]
    assert first.wake_at == engine.get("exp-01").next_wakeup and first.version >= 1

    finished = engine.list(status="finished")
    assert [(s.id, s.wake_at) for s in finished.items] == [("exp-02", None), ("exp-04", None)]
    assert [s.id for s in engine.list(workflow="watch").items] == ["w-01"]
    assert engine.list(workflow="nope").items == []


# --------------------------------------------------------------------------- cancel


def test_cancel_tears_down_awaited_events_and_marks_cancelled(engine: Engine, store: Store) -> None:
    snap = engine.start("watch", "w-1")
    assert sorted(CALLS) == [("setup", "ping", None), ("setup", "pong", None)]
    assert awaited(snap) == ["give up", "ping", "pong"]
    CALLS.clear()

    snap = engine.cancel("w-1")
    assert sorted(CALLS) == [
        ("teardown", "ping/subscription-ping", False),
        ("teardown", "pong/subscription-pong", False),
    ]
    assert snap.status == "cancelled"
    assert snap.awaited == [] and snap.next_wakeup is None
    rec = store.load("w-1")
    assert (rec.status, rec.wake_at) == ("cancelled", None)
    assert engine.get("w-1").status == "cancelled"
    assert [s.id for s in engine.list(status="cancelled").items] == ["w-1"]

    with unchanged(store, "w-1"):
        assert engine.run_due(now=datetime.now(UTC) + timedelta(days=2)) == []


def test_a_cancelled_instance_refuses_events_resume_and_cancel(
    engine: Engine, store: Store
) -> None:
    engine.start("approval", "exp-1", {"amount": 1})
    engine.cancel("exp-1")
    calls: list[Callable[[], object]] = [
        lambda: engine.send("exp-1", "decide", {"approved": True, "by": "ann"}),
        lambda: engine.resume("exp-1"),
        lambda: engine.cancel("exp-1"),
    ]
    for call in calls:
        with unchanged(store, "exp-1"), pytest.raises(WorkflowNotActive) as info:
            call()
        assert info.value.status == "cancelled"
        assert "exp-1" in str(info.value)


def test_a_finished_instance_refuses_events_and_cancel(engine: Engine, store: Store) -> None:
    engine.start("approval", "exp-1", {"amount": 1})
    engine.send("exp-1", "decide", {"approved": True, "by": "ann"})
    with unchanged(store, "exp-1"), pytest.raises(WorkflowFinishedError):
        engine.send("exp-1", "decide", {"approved": True, "by": "ann"})
    with unchanged(store, "exp-1"), pytest.raises((WorkflowFinishedError, WorkflowNotActive)):
        engine.cancel("exp-1")
    with unchanged(store, "exp-1"), pytest.raises(WorkflowFinishedError):
        engine.resume("exp-1")


# --------------------------------------------------------------------------- bad input


def test_unknown_workflow_name_stores_nothing(engine: Engine) -> None:
    with pytest.raises(UnknownWorkflow) as info:
        engine.start("expense", "e-1", {"amount": 1})
    assert "expense" in str(info.value) and "approval" in str(info.value)
    assert info.value.known == sorted(WORKFLOWS)
    with pytest.raises(WorkflowNotFound):
        engine.get("e-1")


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.get("missing"),
        lambda e: e.send("missing", "decide", {"approved": True, "by": "ann"}),
        lambda e: e.resume("missing"),
        lambda e: e.cancel("missing"),
        lambda e: e.retry("missing"),
    ],
    ids=["get", "send", "resume", "cancel", "retry"],
)
def test_unknown_id_raises_workflow_not_found(
    engine: Engine, call: Callable[[Engine], object]
) -> None:
    with pytest.raises(WorkflowNotFound) as info:
        call(engine)
    assert info.value.workflow_id == "missing"
    assert engine.list().items == []


def test_an_existing_id_raises_and_keeps_the_record(engine: Engine, store: Store) -> None:
    engine.start("approval", "exp-1", {"amount": 1})
    Api.failures_left = 1
    with unchanged(store, "exp-1"), pytest.raises(WorkflowExists) as info:
        engine.start("fragile", "exp-1")
    assert info.value.workflow_id == "exp-1"
    assert Api.calls == 0  # nothing of the second workflow ran
    assert engine.get("exp-1").data["amount"] == 1.0


@pytest.mark.parametrize("bad_id", ["", "has space", "x" * 201, "-leading-dash", "a/b", 42])
def test_an_invalid_id_is_refused_before_anything_is_stored(engine: Engine, bad_id: Any) -> None:
    with pytest.raises(InvalidWorkflowId) as info:
        engine.start("approval", bad_id, {"amount": 1})
    assert info.value.workflow_id == bad_id
    assert engine.list().items == []
    with pytest.raises(InvalidWorkflowId):
        engine.get(bad_id)


@pytest.mark.parametrize(
    "data",
    [{}, {"amount": "lots"}, {"amount": 1, "log": "not a list"}, b"{not json", [1, 2]],
    ids=["missing-field", "wrong-type", "wrong-nested-type", "bad-json", "not-a-mapping"],
)
def test_invalid_initial_data_is_refused_before_anything_is_stored(
    engine: Engine, data: Any
) -> None:
    with pytest.raises(InvalidWorkflowData) as info:
        engine.start("approval", "exp-1", data)
    assert "approval" in str(info.value)
    assert engine.list().items == []


@pytest.mark.parametrize(
    ("event", "input", "error"),
    [
        ("approve", {"approved": True, "by": "ann"}, EventNotFound),
        ("decide", {"approved": "maybe"}, InvalidEventInput),
        ("decide", {"approved": True, "by": ""}, HandlerFailed),
    ],
    ids=["not-awaited", "invalid-input", "handler-raises"],
)
def test_a_refused_event_leaves_the_record_unchanged(
    engine: Engine, store: Store, event: str, input: Any, error: type[Exception]
) -> None:
    engine.start("approval", "exp-1", {"amount": 1})
    with unchanged(store, "exp-1"), pytest.raises(error):
        engine.send("exp-1", event, input)
    assert engine.get("exp-1").data["log"] == ["notified"]


def test_a_stale_pc_is_refused(engine: Engine, store: Store) -> None:
    start = engine.start("counter", "c-1")
    old_pc = start.awaited[0].pc
    engine.send("c-1", "add", 1, pc=old_pc)
    with unchanged(store, "c-1"), pytest.raises(StaleEvent):
        engine.send("c-1", "add", 1, pc=old_pc)  # a replayed webhook
    assert engine.get("c-1").data["total"] == 1


def test_a_blob_from_a_newer_format_version_asks_for_an_upgrade(
    engine: Engine, store: Store
) -> None:
    engine.start("approval", "exp-1", {"amount": 1})
    rec = store.load("exp-1")
    parts = msgpack.unpackb(rec.blob, raw=False)
    assert parts[1] == gorch.FORMAT_VERSION
    parts[1] = 99
    forged = msgpack.packb(parts, use_bin_type=True)
    store.save("exp-1", rec.version, rec.status, forged, rec.wake_at)

    calls: list[Callable[[], object]] = [
        lambda: engine.get("exp-1"),
        lambda: engine.send("exp-1", "decide", {"approved": True, "by": "ann"}),
        lambda: engine.resume("exp-1"),
        lambda: engine.cancel("exp-1"),
    ]
    for call in calls:
        with unchanged(store, "exp-1"), pytest.raises(SerializationError) as info:
            call()
        assert "upgrade" in str(info.value)
        assert "99" in str(info.value)

    # a worker reports the problem instead of crashing, and leaves the blob alone
    results = engine.run_due(now=datetime.now(UTC) + EXPIRY * 2)
    assert [r.id for r in results] == ["exp-1"]
    assert "SerializationError" in results[0].error and "upgrade" in results[0].error
    assert store.load("exp-1").blob == forged


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:secret@127.0.0.1:1/x", "redis://:secret@127.0.0.1:1/0"],
    ids=["postgres", "redis"],
)
def test_an_unreachable_store_raises_store_unavailable_without_the_password(url: str) -> None:
    engine = Engine(url, WORKFLOWS)
    calls: list[Callable[[], object]] = [
        lambda: engine.start("approval", "exp-1", {"amount": 1}),
        lambda: engine.get("exp-1"),
        lambda: engine.send("exp-1", "decide", {"approved": True, "by": "ann"}),
        lambda: engine.list(),
        lambda: engine.run_due(),
    ]
    try:
        for call in calls:
            with pytest.raises(StoreUnavailable) as info:
                call()
            message = str(info.value)
            assert "secret" not in message
            assert "127.0.0.1:1" in message
            assert url.split("://")[0] + "://" in message
    finally:
        engine.store.close()


# --------------------------------------------------------------------------- concurrency


def start_threads(
    targets: list[Callable[[], None]], errors: list[BaseException]
) -> list[threading.Thread]:
    """Start each target in its own thread; what they raise is appended to ``errors``."""

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    return threads


def join_threads(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"


def run_threads(targets: list[Callable[[], None]]) -> list[BaseException]:
    """Run each target in its own thread until all end; return what they raised."""
    errors: list[BaseException] = []
    join_threads(start_threads(targets, errors))
    return errors


def test_concurrent_sends_lose_no_update(engine: Engine) -> None:
    engine.start("counter", "c-1")
    senders, sends_each = 6, 5
    outputs: list[int] = []

    def sender() -> None:
        for _ in range(sends_each):
            outputs.append(engine.send("c-1", "add", 1))

    assert run_threads([sender] * senders) == []
    n = senders * sends_each
    # Each event was applied exactly once, to the latest version: the totals seen are 1..n.
    assert sorted(outputs) == list(range(1, n + 1))
    snap = engine.get("c-1")
    assert snap.data["total"] == n


def test_concurrent_sends_and_resumes_lose_no_update(engine: Engine) -> None:
    engine.start("counter", "c-1")
    senders, sends_each = 4, 5
    outputs: list[int] = []
    lock = threading.Lock()
    sending_done = threading.Event()

    def sender() -> None:
        for _ in range(sends_each):
            out = engine.send("c-1", "add", 1)
            with lock:
                outputs.append(out)

    def resumer() -> None:
        while not sending_done.wait(0.002):  # a busy worker, not a spinning one
            engine.resume("c-1")

    errors: list[BaseException] = []
    resumers = start_threads([resumer] * 2, errors)
    try:
        errors += run_threads([sender] * senders)
    finally:
        sending_done.set()
        join_threads(resumers)
    assert errors == []

    n = senders * sends_each
    # Each event was applied exactly once, to the latest version: the totals seen are 1..n.
    assert sorted(outputs) == list(range(1, n + 1))
    snap = engine.resume("c-1")
    assert snap.status == "waiting"
    assert snap.data == {"total": n, "received": n, "tallied": n}


# --------------------------------------------------------------------------- leases


class Inbox(gorch.Workflow):
    """A side thread takes notes while the main thread waits for 'go', then works."""

    notes: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            gorch.Go("inbox", For("mail loop", True, Select("mail", On("note", self.note)))),
            Select("go", On("go")),
            Step("work", lambda: None),
        )

    def note(self, text: str) -> None:
        self.notes.append(text)


def test_a_deferred_send_keeps_the_lease_of_the_process_running_the_instance(
    store: Store,
) -> None:
    Engine(store, {"inbox": Inbox}).start("inbox", "box")
    # Another process is running the instance: its saves hold a lease on it.
    rec = store.load("box")
    lease = datetime.now(UTC) + timedelta(seconds=60)
    store.save("box", rec.version, "resuming", rec.blob, lease)

    deferred = Engine(store, {"inbox": Inbox}, defer_resume=True)
    deferred.send("box", "note", "hello")

    after = store.load("box")
    assert after.wake_at is not None and after.wake_at >= lease - timedelta(milliseconds=1)
    assert deferred.run_due() == []  # no worker takes the instance from its runner
    assert deferred.get("box").data["notes"] == ["hello"]
