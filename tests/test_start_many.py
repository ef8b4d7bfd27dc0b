"""``Engine.start_many`` / ``AsyncEngine.start_many``: many instances, a batch per write.

Run on every store, with the sync and the async Engine. What is checked: an
instance that blocks before any step is stored as ``start`` leaves it; one
that would run a step (or an effectful setup, or a lifecycle hook) first is
stored ``resuming`` with nothing run, for ``run_due``; ids given, derived from
keys or generated; a refused item raises before its batch is written, and the
batches before it stay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
from stores.store_support import ALL_KINDS, StoreSpec, make_spec

import gorch
from gorch import On, S, Select, Step, Timeout
from gorch.bulk import StartItem
from gorch.engine import Engine
from gorch.errors import (
    IdempotencyKeyReused,
    InvalidWorkflowData,
    InvalidWorkflowId,
    WorkflowExists,
)
from gorch.handlers import Handler
from gorch.idempotency import key_id
from gorch.state import EventRequest

RAN: list[str] = []


class Decision(pydantic.BaseModel):
    approved: bool


class Approval(gorch.Workflow):
    """Blocks at once: a decision or a day, then closes."""

    amount: float
    status: str = "new"

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "await decision",
                On("decide", self.decide),
                Timeout("expired", timedelta(days=1), Step("escalate", self.escalate)),
            ),
            Step("close", self.close),
        )

    def decide(self, d: Decision) -> str:
        self.status = "approved" if d.approved else "rejected"
        return self.status

    def escalate(self) -> None:
        RAN.append("escalate")

    def close(self) -> None:
        RAN.append("close")


class Notify(gorch.Workflow):
    """A step first: nothing of it may run before the record exists."""

    to: str = "ann"

    def definition(self) -> gorch.Section:
        return S(Step("notify", self.notify), Select("wait", On("done", self.done)))

    def notify(self) -> None:
        RAN.append(f"notify {self.to}")

    def done(self) -> None:
        pass


class Subscribe(Handler):
    """A setup with an effect (it would subscribe somewhere)."""

    def setup(self, req: EventRequest) -> str | None:
        RAN.append(f"subscribe {req.workflow_id}")
        return None


class Hooked(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Select("wait", On("ping", Subscribe())))


class Waiter(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Select("wait", On("ping", self.ping)))

    def ping(self) -> None:
        pass

    def on_waiting(self, awaited: Any) -> None:
        RAN.append("on_waiting")


WORKFLOWS: dict[str, type[gorch.Workflow]] = {
    "approval": Approval,
    "notify": Notify,
    "hooked": Hooked,
    "waiter": Waiter,
}


class Driver:
    """The sync Engine, or the async one driven on a private loop, behind one API."""

    def __init__(self, spec: StoreSpec, aio: bool, **options: Any) -> None:
        self.aio = aio
        self.loop = asyncio.new_event_loop() if aio else None
        self.store = spec.open_sync()
        self.engine: Any = (
            gorch.AsyncEngine(spec.open_async(), WORKFLOWS, **options)
            if aio
            else Engine(self.store, WORKFLOWS, **options)
        )

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        out = getattr(self.engine, method)(*args, **kwargs)
        if self.loop is not None:
            return self.loop.run_until_complete(out)
        return out

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.engine.close())
            self.loop.close()
        self.store.close()


@pytest.fixture(
    params=[(k, a) for k in ALL_KINDS for a in (False, True)],
    ids=lambda p: f"{p[0]}{'-async' if p[1] else ''}",
)
def spec_aio(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[StoreSpec, bool]]:
    kind, aio = request.param
    if kind == "memory" and aio:
        pytest.skip("an async memory store is another store: covered by the sync one")
    for spec in make_spec(kind, tmp_path):
        yield spec, aio


@pytest.fixture
def run(spec_aio: tuple[StoreSpec, bool]) -> Iterator[Driver]:
    RAN.clear()
    spec, aio = spec_aio
    if spec.kind == "memory":
        # one MemoryStore shared by the driver's engine and the test's checks
        store = spec.open_sync()
        driver = Driver.__new__(Driver)
        driver.aio, driver.loop, driver.store = False, None, store
        driver.engine = Engine(store, WORKFLOWS)
    else:
        driver = Driver(spec, aio)
    yield driver
    driver.close()
    RAN.clear()


def _records(run: Driver, ids: Iterable[str]) -> dict[str, Any]:
    return {id: run.store.load(id) for id in ids}


# --------------------------------------------------------------------------- blocking first


def test_instances_that_block_first_are_stored_as_start_leaves_them(run: Driver) -> None:
    ids = run("start_many", "approval", ({"amount": float(i)} for i in range(25)), batch=10)
    assert len(ids) == len(set(ids)) == 25 and RAN == []
    one = run("start", "approval", data={"amount": 3.0})
    for i, id in enumerate(ids):
        snap = run("get", id)
        assert snap.status == "waiting" and snap.data == {"amount": float(i), "status": "new"}
        assert snap.version == 1
        assert [e.name for e in snap.awaited] == ["decide", "expired"]
        assert snap.next_wakeup is not None and snap.next_wakeup == snap.awaited[1].due
    like = run("get", one.id)
    mine = run("get", ids[3])
    assert [(t.name, t.status, t.cur_step) for t in mine.threads] == [
        (t.name, t.status, t.cur_step) for t in like.threads
    ]
    assert mine.awaited[0].input_schema == like.awaited[0].input_schema
    history = run("history", ids[3])
    assert [(e.kind, e.name, e.input) for e in history] == [
        ("started", "approval", {"amount": 3.0, "status": "new"})
    ]
    # they go on like any instance: an event, and its resume
    assert run("send", ids[3], "decide", {"approved": True}) == "approved"
    assert run("get", ids[3]).status == "finished" and RAN == ["close"]


def test_the_by_of_the_call_is_in_every_started_entry(run: Driver) -> None:
    [id] = run("start_many", "approval", [{"amount": 1.0}], by="importer")
    assert run("history", id)[0].by == "importer"


# --------------------------------------------------------------------------- effects first


def test_a_step_first_runs_nothing_and_is_left_to_run_due(run: Driver) -> None:
    ids = run("start_many", "notify", [{"to": "ann"}, {"to": "bob"}])
    assert RAN == []
    for id in ids:
        rec = run.store.load(id)
        assert rec.status == "resuming" and rec.wake_at is not None
    done = run("run_due", limit=None)
    assert sorted(r.id for r in done) == sorted(ids)
    assert sorted(RAN) == ["notify ann", "notify bob"]
    assert {run("get", id).status for id in ids} == {"waiting"}


def test_an_effectful_setup_or_a_lifecycle_hook_waits_for_run_due(run: Driver) -> None:
    hooked = run("start_many", "hooked", [{}])
    waiter = run("start_many", "waiter", [{}])
    assert RAN == []  # neither the setup nor on_waiting ran before the records existed
    assert run.store.load(hooked[0]).status == run.store.load(waiter[0]).status == "resuming"
    run("run_due", limit=None)
    assert sorted(RAN) == sorted([f"subscribe {hooked[0]}", "on_waiting"])


# --------------------------------------------------------------------------- ids and keys


def test_ids_given_derived_from_keys_or_generated(run: Driver) -> None:
    items = [
        StartItem({"amount": 1.0}, id="given-1"),
        StartItem({"amount": 2.0}, key="order-2"),
        {"amount": 3.0},
        Approval(amount=4.0),
    ]
    ids = run("start_many", "approval", items)
    assert ids[0] == "given-1" and ids[1] == key_id("approval", "order-2")
    assert len(ids[2]) == 32 and int(ids[2], 16) >= 0 and ids[2] != ids[3]
    assert [run("get", id).data["amount"] for id in ids] == [1.0, 2.0, 3.0, 4.0]


def test_a_repeated_key_with_the_same_data_is_skipped(run: Driver) -> None:
    first = run("start_many", "approval", [StartItem({"amount": 1.0}, key="k")])
    before = run.store.load(first[0])
    again = run(
        "start_many",
        "approval",
        [StartItem({"amount": 1.0}, key="k"), StartItem({"amount": 2.0}, key="k2")],
    )
    assert again[0] == first[0] and run.store.load(first[0]) == before
    assert run("get", again[1]).data["amount"] == 2.0
    # the same key twice in one call, same data: one instance
    twice = run(
        "start_many",
        "approval",
        [StartItem({"amount": 5.0}, key="t"), StartItem({"amount": 5.0}, key="t")],
    )
    assert twice[0] == twice[1]
    # start() with that key returns the instance start_many made
    assert run("start", "approval", data={"amount": 1.0}, key="k").id == first[0]


# --------------------------------------------------------------------------- refused items


def _refused(run: Driver, items: list[Any], error: type[Exception], batch: int = 10) -> Any:
    with pytest.raises(error) as info:
        run("start_many", "approval", items, batch=batch)
    return info.value


def test_bad_data_stops_before_its_batch_and_keeps_the_batches_before(run: Driver) -> None:
    items: list[Any] = [StartItem({"amount": float(i)}, id=f"i-{i:02d}") for i in range(25)]
    items[13] = StartItem({"amount": "lots"}, id="i-13")
    e = _refused(run, items, InvalidWorkflowData)
    assert (e.item, e.started) == (13, 10)
    assert any("item 13" in note and "10 items" in note for note in e.__notes__)
    assert [r.id for r in run.store.list(limit=100).records] == [f"i-{i:02d}" for i in range(10)]


def test_a_bad_id_is_refused_too(run: Driver) -> None:
    e = _refused(
        run,
        [StartItem({"amount": 1.0}, id="ok"), StartItem({"amount": 1.0}, id="no way")],
        InvalidWorkflowId,
    )
    assert e.item == 1
    assert run.store.list().records == []


def test_a_taken_id_stops_the_batch_and_leaves_the_taken_record_alone(run: Driver) -> None:
    mine = run("start", "approval", "taken", {"amount": 9.0})
    before = run.store.load("taken")
    items = [StartItem({"amount": 1.0}, id="new-1"), StartItem({"amount": 2.0}, id="taken")]
    e = _refused(run, items, WorkflowExists)
    assert e.item == 1 and e.started == 0
    assert run.store.load("taken") == before and mine.id == "taken"
    assert [r.id for r in run.store.list().records] == ["taken"]  # no "new-1"


def test_the_same_id_twice_without_a_key_is_refused(run: Driver) -> None:
    e = _refused(
        run,
        [StartItem({"amount": 1.0}, id="x"), StartItem({"amount": 1.0}, id="x")],
        WorkflowExists,
    )
    assert e.item == 1 and run.store.list().records == []


def test_a_key_reused_with_other_data_is_refused(run: Driver) -> None:
    run("start_many", "approval", [StartItem({"amount": 1.0}, key="k")])
    items = [StartItem({"amount": 3.0}, id="n"), StartItem({"amount": 2.0}, key="k")]
    e = _refused(run, items, IdempotencyKeyReused)
    assert e.item == 1
    assert len(run.store.list().records) == 1


def test_a_deferring_engine_only_creates(spec_aio: tuple[StoreSpec, bool]) -> None:
    spec, aio = spec_aio
    if spec.kind == "memory":
        pytest.skip("covered by the stores that outlive an engine")
    RAN.clear()
    driver = Driver(spec, aio, defer_resume=True)
    try:
        ids = driver("start_many", "approval", [{"amount": 1.0}])
        assert driver.store.load(ids[0]).status == "resuming"
        driver("run_due")
        assert driver("get", ids[0]).status == "waiting"
    finally:
        driver.close()
