"""Exactly-once at the edges of the Engine: store faults around start, send and run_due.

A store that fails is simulated here by :class:`Flaky`, a wrapper around a real
store of each kind that raises ``StoreUnavailable`` either before a call reaches
the store (nothing happened) or after it (the write committed, the reply was
lost): the two outcomes a dropped connection leaves a client with. The real
faults (a terminated PostgreSQL backend, a killed Redis connection, a locked
SQLite file, a full disk) are in ``tests/stores/test_faults.py`` and
``tests/test_engine_faults.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
from stores.store_support import ALL_KINDS, SHARED_KINDS, make_spec

import gorch
from gorch import On, S, Select, Step, Timeout
from gorch.engine import Engine
from gorch.errors import (
    DefinitionError,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    StoreUnavailable,
    TimerNotSendable,
    WorkflowExists,
    WorkflowNotFound,
)
from gorch.stores import Page, Record, Store

# --------------------------------------------------------------------------- workflows

RAN: list[str] = []
"""Side effects of steps and handlers, in order: what "applied once" is checked against."""


class Decision(pydantic.BaseModel):
    approved: bool


class Payment(gorch.Workflow):
    amount: float = 0.0
    status: str = "new"

    def definition(self) -> gorch.Section:
        return S(
            Step("notify", self.notify),
            Select(
                "await decision",
                On("decide", self.decide),
                Timeout("expired", timedelta(hours=1), Step("escalate", self.escalate)),
            ),
            Step("pay", self.pay),
        )

    def notify(self) -> None:
        RAN.append(f"notify {self.amount}")

    def decide(self, d: Decision) -> dict[str, str]:
        RAN.append("decide")
        self.status = "approved" if d.approved else "rejected"
        return {"status": self.status}

    def escalate(self) -> None:
        RAN.append("escalate")

    def pay(self) -> None:
        RAN.append("pay")


class Slow(gorch.Workflow):
    """One step that takes a while: longer than a short lease, in the run_due tests."""

    delay: float = 0.3

    def definition(self) -> gorch.Section:
        return S(Step("slow", self.slow))

    def slow(self) -> None:
        time.sleep(self.delay)
        RAN.append("slow")


class Broken(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Step("first", self.first), 42)  # type: ignore[arg-type]

    def first(self) -> None:
        RAN.append("first")


WORKFLOWS: dict[str, type[gorch.Workflow]] = {"payment": Payment, "slow": Slow, "broken": Broken}


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    RAN.clear()
    yield
    RAN.clear()


# --------------------------------------------------------------------------- a failing store


class Flaky(Store):
    """A real store whose calls can be made to fail like a dropped connection.

    ``fail(method, times=n, after=True)`` makes the next ``n`` calls of
    ``method`` raise ``StoreUnavailable``: with ``after=True`` the call is made
    first (a write commits, its reply is lost), else it never reaches the store.
    ``skip`` lets that many calls through before failing.
    """

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.plans: dict[str, list[tuple[int, int, bool]]] = {}
        self.calls: dict[str, int] = {}

    def fail(self, method: str, *, times: int = 1, after: bool = False, skip: int = 0) -> None:
        self.plans.setdefault(method, []).append((skip, times, after))

    def _call(self, method: str, fn: Callable[[], Any]) -> Any:
        self.calls[method] = self.calls.get(method, 0) + 1
        plans = self.plans.get(method)
        if not plans:
            return fn()
        skip, times, after = plans[0]
        if skip:
            plans[0] = (skip - 1, times, after)
            return fn()
        plans[0] = (0, times - 1, after)
        if times - 1 <= 0:
            plans.pop(0)
        if after:
            fn()
        raise StoreUnavailable(f"{method}: connection to the store was lost (simulated)")

    def create(
        self, id: str, workflow: str, status: str, blob: bytes, wake_at: datetime | None
    ) -> Record:
        return self._call("create", lambda: self.inner.create(id, workflow, status, blob, wake_at))

    def load(self, id: str) -> Record:
        return self._call("load", lambda: self.inner.load(id))

    def save(
        self, id: str, expected_version: int, status: str, blob: bytes, wake_at: datetime | None
    ) -> Record:
        return self._call(
            "save", lambda: self.inner.save(id, expected_version, status, blob, wake_at)
        )

    def delete(self, id: str) -> None:
        self._call("delete", lambda: self.inner.delete(id))

    def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        return self._call(
            "list",
            lambda: self.inner.list(workflow=workflow, status=status, limit=limit, after=after),
        )

    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> list[Record]:
        return self._call("claim_due", lambda: self.inner.claim_due(now, limit, lease))

    def remember(self, key: str, until: datetime) -> bool:
        return self._call("remember", lambda: self.inner.remember(key, until))

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(params=ALL_KINDS)
def inner(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    for spec in make_spec(request.param, tmp_path):
        store = spec.open()
        try:
            yield store
        finally:
            store.close()


@pytest.fixture
def flaky(inner: Store) -> Flaky:
    return Flaky(inner)


def engine_on(store: Store, **options: Any) -> Engine:
    options.setdefault("store_retries", 2)
    return Engine(store, WORKFLOWS, **options)


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


# --------------------------------------------------------------------------- send


def test_send_returns_the_output_when_the_resume_after_the_event_fails(flaky: Flaky) -> None:
    engine = engine_on(flaky, store_retries=0, lease=30)
    engine.start("payment", "p-1", {"amount": 5})
    flaky.fail("save", skip=1, times=10)  # the event's save passes, the resume's saves fail

    out = engine.send("p-1", "decide", {"approved": True})

    assert out == {"status": "approved"}
    rec = flaky.inner.load("p-1")
    assert rec.status == "resuming"  # the event is saved; its resume is pending
    assert rec.wake_at is not None and rec.wake_at > datetime.now(UTC)  # after this call's lease
    flaky.plans.clear()
    results = engine.run_due(now=later(60))  # the lease ran out: a worker carries on
    assert [(r.id, r.outcome, r.status) for r in results] == [("p-1", "processed", "finished")]
    # The event was applied once; "pay" ran in the resume whose save failed, and again
    # in run_due's (steps are at-least-once: only what is saved counts).
    assert RAN == ["notify 5.0", "decide", "pay", "pay"]


def test_a_committed_event_save_whose_reply_was_lost_is_not_applied_twice(flaky: Flaky) -> None:
    engine = engine_on(flaky)
    engine.start("payment", "p-1", {"amount": 5})
    flaky.fail("save", after=True)  # the event's save commits, then the connection drops

    assert engine.send("p-1", "decide", {"approved": True}) == {"status": "approved"}
    assert engine.get("p-1").status == "finished"
    assert RAN == ["notify 5.0", "decide", "pay"]


def test_an_event_save_that_never_committed_is_tried_again(flaky: Flaky) -> None:
    engine = engine_on(flaky)
    engine.start("payment", "p-1", {"amount": 5})
    flaky.fail("save", times=2)  # two attempts never reach the store, the third does

    assert engine.send("p-1", "decide", {"approved": True}) == {"status": "approved"}
    assert engine.get("p-1").status == "finished"
    assert RAN.count("decide") == 1 and RAN.count("pay") == 1


def test_send_reports_the_store_only_when_the_outcome_is_unknown(flaky: Flaky) -> None:
    engine = engine_on(flaky, store_retries=1)
    engine.start("payment", "p-1", {"amount": 5})
    before = flaky.inner.load("p-1")
    flaky.fail("save", times=5)
    flaky.fail("load", skip=1, times=5)  # the read-back after the failed save fails too

    with pytest.raises(StoreUnavailable):
        engine.send("p-1", "decide", {"approved": True})
    assert flaky.inner.load("p-1") == before  # and indeed nothing was written


def test_a_repeated_idempotency_key_returns_the_first_output_and_applies_nothing(
    inner: Store,
) -> None:
    engine = engine_on(inner, defer_resume=True)
    engine.start("payment", "p-1", {"amount": 5})
    engine.run_due()
    first = engine.send("p-1", "decide", {"approved": True}, key="evt-1")
    before = inner.load("p-1")

    again = engine.send("p-1", "decide", b'{"approved": true}', key="evt-1")

    assert again == first == {"status": "approved"}
    assert inner.load("p-1") == before  # byte-identical, same version
    assert RAN.count("decide") == 1


def test_an_idempotency_key_reused_for_another_request_is_refused(inner: Store) -> None:
    engine = engine_on(inner, defer_resume=True)
    engine.start("payment", "p-1", {"amount": 5})
    engine.run_due()
    engine.send("p-1", "decide", {"approved": True}, key="evt-1")
    before = inner.load("p-1")

    with pytest.raises(IdempotencyKeyReused, match="other input"):
        engine.send("p-1", "decide", {"approved": False}, key="evt-1")
    with pytest.raises(IdempotencyKeyReused, match="'decide'"):
        engine.send("p-1", "cancel", None, key="evt-1")
    with pytest.raises(InvalidIdempotencyKey):
        engine.send("p-1", "decide", {"approved": True}, key="")
    assert inner.load("p-1") == before


def test_only_the_latest_idempotency_keys_are_kept() -> None:
    class Counter(gorch.Workflow):
        n: int = 0

        def definition(self) -> gorch.Section:
            return S(gorch.For("loop", True, Select("wait", On("add", self.add))))

        def add(self) -> int:
            self.n += 1
            return self.n

    engine = Engine("memory://", {"counter": Counter}, idempotency_keys=3)
    engine.start("counter", "c")
    for i in range(5):
        assert engine.send("c", "add", key=f"k{i}") == i + 1
    assert engine.send("c", "add", key="k4") == 5  # kept: nothing applied
    assert engine.send("c", "add", key="k0") == 6  # forgotten: applied as new
    assert engine.get("c").data["n"] == 6


def test_a_timer_cannot_be_sent_as_an_event(inner: Store) -> None:
    engine = engine_on(inner)
    engine.start("payment", "p-1", {"amount": 5})
    before = inner.load("p-1")

    with pytest.raises(TimerNotSendable, match=r"'expired'.*fires when due"):
        engine.send("p-1", "expired")
    assert inner.load("p-1") == before
    fired = engine.run_due(now=later(2 * 3600))  # it fires when due
    assert [r.fired for r in fired] == [["expired"]]
    assert RAN == ["notify 5.0", "escalate", "pay"]


# --------------------------------------------------------------------------- start


def test_start_raises_only_when_nothing_was_created(flaky: Flaky) -> None:
    engine = engine_on(flaky, store_retries=1)
    flaky.fail("create", times=2)  # never reaches the store
    flaky.fail("load", times=5)

    with pytest.raises(StoreUnavailable):
        engine.start("payment", "p-1", {"amount": 5})
    with pytest.raises(WorkflowNotFound):
        flaky.inner.load("p-1")
    assert RAN == []


def test_a_start_whose_create_committed_returns_the_instance(flaky: Flaky) -> None:
    engine = engine_on(flaky)
    flaky.fail("create", after=True)  # the insert commits, the reply is lost

    snap = engine.start("payment", "p-1", {"amount": 5})

    assert snap.status == "waiting"
    assert RAN == ["notify 5.0"]
    assert flaky.inner.load("p-1").status == "waiting"


def test_a_start_whose_later_saves_fail_returns_and_leaves_the_rest_to_run_due(
    flaky: Flaky,
) -> None:
    engine = engine_on(flaky, store_retries=0, lease=30)
    flaky.fail("save", times=10)

    snap = engine.start("payment", "p-1", {"amount": 5})

    assert snap.status == "resuming"  # what is stored: created, not yet run
    flaky.plans.clear()
    assert engine.run_due(now=later(10)) == []  # still leased to the start
    [result] = engine.run_due(now=later(60))
    assert (result.outcome, result.status) == ("processed", "waiting")
    assert engine.get("p-1").status == "waiting"


def test_a_step_failing_in_start_returns_the_failed_instance(inner: Store) -> None:
    class Failing(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(Step("boom", self.boom))

        def boom(self) -> None:
            raise ConnectionError("api down")

    engine = Engine(inner, {"failing": Failing})
    snap = engine.start("failing", "f-1")
    assert snap.status == "failed" and "api down" in snap.error
    assert inner.load("f-1").status == "failed"


def test_a_definition_error_in_start_creates_nothing(inner: Store) -> None:
    engine = engine_on(inner)
    with pytest.raises(DefinitionError):
        engine.start("broken", "b-1")
    with pytest.raises(WorkflowNotFound):
        inner.load("b-1")


def test_a_keyed_start_is_made_once(inner: Store) -> None:
    engine = engine_on(inner)
    first = engine.start("payment", data={"amount": 5}, key="order-42")
    again = engine.start("payment", data={"amount": 5}, key="order-42")
    assert again.id == first.id and again.version == first.version
    assert RAN == ["notify 5.0"]
    before = inner.load(first.id)
    with pytest.raises(IdempotencyKeyReused, match="other data"):
        engine.start("payment", data={"amount": 6}, key="order-42")
    assert inner.load(first.id) == before
    other = engine.start("payment", data={"amount": 5}, key="order-43")
    assert other.id != first.id


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_concurrent_starts_of_one_id_run_the_first_step_once(kind: str, tmp_path: Path) -> None:
    racers = 6
    for spec in make_spec(kind, tmp_path):
        stores = [spec.open() for _ in range(racers)]
        try:
            barrier = threading.Barrier(racers)
            outcomes: list[str] = []

            def race(
                store: Store,
                barrier: threading.Barrier = barrier,
                outcomes: list[str] = outcomes,
            ) -> None:
                engine = engine_on(store)
                barrier.wait()
                try:
                    engine.start("payment", "race-1", {"amount": 1})
                    outcomes.append("started")
                except WorkflowExists:
                    outcomes.append("exists")

            threads = [threading.Thread(target=race, args=(s,)) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(outcomes) == ["exists"] * (racers - 1) + ["started"]
            assert RAN == ["notify 1.0"]
        finally:
            for s in stores:
                s.close()


# --------------------------------------------------------------------------- run_due, work


def test_each_instance_is_claimed_just_before_it_runs(inner: Store) -> None:
    if isinstance(inner, gorch.stores.MemoryStore):
        pytest.skip("two runners need a store two engines share; memory is per engine here")
    lease = 0.5
    engine = engine_on(inner, defer_resume=True, lease=lease)
    for i in range(3):
        engine.start("slow", f"s-{i}", {"delay": 0.3})
    results: dict[str, list[Any]] = {"a": [], "b": []}

    def runner(name: str, wait: float) -> None:
        time.sleep(wait)
        results[name] = engine_on(inner, lease=lease).run_due(limit=10)

    threads = [
        threading.Thread(target=runner, args=("a", 0.0)),
        threading.Thread(target=runner, args=("b", 0.55)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = results["a"] + results["b"]
    assert sorted(r.id for r in done) == ["s-0", "s-1", "s-2"]  # each instance run by one
    assert {r.outcome for r in done} == {"processed"}
    assert RAN == ["slow"] * 3


def test_run_due_reports_an_instance_taken_over_as_skipped(flaky: Flaky) -> None:
    engine = engine_on(flaky, defer_resume=True)
    engine.start("payment", "p-1", {"amount": 5})
    [rec] = flaky.inner.claim_due(later(1), 1, timedelta(seconds=60))
    flaky.inner.save(rec.id, rec.version, rec.status, rec.blob, datetime.now(UTC))  # others' save

    real_claim = flaky.inner.claim_due

    def stale_claim(now: datetime, limit: int, lease: timedelta) -> list[Record]:
        claimed = real_claim(now, limit, lease)
        if claimed:  # another runner saves right after our claim: our lease is gone
            r = claimed[0]
            flaky.inner.save(r.id, r.version, r.status, r.blob, later(3600))
        return claimed

    flaky.inner.claim_due = stale_claim  # type: ignore[method-assign]
    [result] = engine.run_due(now=later(5))
    assert (result.id, result.outcome) == ("p-1", "skipped")


def test_run_due_all_drains_everything_due(inner: Store) -> None:
    engine = engine_on(inner, defer_resume=True)
    for i in range(7):
        engine.start("payment", f"p-{i}", {"amount": i})
    results = engine.run_due(limit=None)
    assert sorted(r.id for r in results) == [f"p-{i}" for i in range(7)]
    assert engine.run_due(limit=None) == []


def test_run_due_raises_a_store_error_only_before_anything_was_processed(flaky: Flaky) -> None:
    engine = engine_on(flaky, defer_resume=True, store_retries=0)
    for i in range(3):
        engine.start("payment", f"p-{i}", {"amount": i})
    flaky.fail("claim_due", times=1)
    with pytest.raises(StoreUnavailable):
        engine.run_due()
    flaky.fail("claim_due", skip=1, times=1)
    results = engine.run_due()  # one processed, then the store fails: what was done is reported
    assert [r.outcome for r in results] == ["processed"]
    assert len(engine.run_due()) == 2


def test_the_worker_keeps_going_through_store_errors(
    flaky: Flaky, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_on(flaky, defer_resume=True, store_retries=0)
    engine.start("payment", "p-1", {"amount": 5})
    flaky.fail("claim_due", times=3)
    processed: list[str] = []

    def stop() -> bool:
        return bool(processed)

    with caplog.at_level(logging.WARNING, logger="gorch"):
        done = engine.work(
            poll=0.01,
            max_backoff=0.05,
            should_stop=stop,
            on_result=lambda r: processed.append(r.id),
        )
    assert done == 1 and processed == ["p-1"]
    errors = [r for r in caplog.records if "store error" in r.getMessage()]
    assert len(errors) == 3
    assert all(r.exc_info is None for r in errors)  # one line each, no traceback


def test_a_stop_request_ends_the_worker_while_the_store_is_down(flaky: Flaky) -> None:
    engine = engine_on(flaky, store_retries=0)
    flaky.fail("claim_due", times=1000)
    stop_at = time.monotonic() + 0.3
    began = time.monotonic()
    engine.work(poll=0.01, max_backoff=10, should_stop=lambda: time.monotonic() > stop_at)
    assert time.monotonic() - began < 2  # the backoff sleep wakes up for the stop request
