"""Cancellation: ``gorch.cancel`` in the core, and ``Engine.cancel`` while ``start`` runs.

The record of a start exists from right before its first step (leased to the
start), so a cancel that comes while that step runs finds it and cancels it;
the start then reports the cancelled instance, and a later ``run_due`` has
nothing to run (its claim would find the record cancelled, not conflicting).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydantic
import pytest
from stores.store_support import ALL_KINDS, StoreSpec, make_spec

import gorch
from gorch import On, S, Select, Step, Timeout
from gorch.stores import Store

STEP_RUNNING = threading.Event()
CANCELLED = threading.Event()


class Export(gorch.Workflow):
    log: list[str] = pydantic.Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            Step("first", self.first),
            Step("second", self.second),
            Select("wait", On("ack", self.ack), Timeout("late", timedelta(hours=1))),
        )

    def first(self) -> None:
        self.log.append("first")
        STEP_RUNNING.set()
        assert CANCELLED.wait(10), "the test did not cancel"

    def second(self) -> None:
        self.log.append("second")

    def ack(self) -> None:
        pass


@pytest.fixture(params=ALL_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    spec: StoreSpec
    for spec in make_spec(request.param, tmp_path):
        opened = spec.open()
        yield opened
        opened.close()


def test_cancel_during_the_first_step_of_start_cancels_the_instance(store: Store) -> None:
    STEP_RUNNING.clear()
    CANCELLED.clear()
    engine = gorch.Engine(store, {"export": Export})
    started: list[gorch.Snapshot] = []
    runner = threading.Thread(target=lambda: started.append(engine.start("export", "e-1")))
    runner.start()
    assert STEP_RUNNING.wait(10)
    snap = engine.cancel("e-1", by="ops")  # not WorkflowNotFound: the record exists
    CANCELLED.set()
    runner.join(10)
    assert snap.status == "cancelled"
    [back] = started
    assert back.status == "cancelled"  # start reports what is stored, not a Conflict
    rec = store.load("e-1")
    assert (rec.status, rec.wake_at) == ("cancelled", None)
    wf, _ = gorch.loads(rec.blob, Export)
    assert wf.log == []  # the cancel saved the data the first step started from
    assert "second" not in back.data["log"]  # nothing ran after the cancel
    kinds = [e.kind for e in engine.history("e-1")]
    assert kinds[0] == "started" and kinds[-1] == "cancelled"
    # The start's lease is gone with its record's wake-up: nothing is due, nothing fails.
    assert engine.run_due() == []
    later = engine.run_due(now=gorch.clock.now() + timedelta(hours=2))
    assert later == []
    assert store.load("e-1").version == rec.version


def test_run_due_reports_an_instance_cancelled_after_its_claim_as_cancelled(
    store: Store,
) -> None:
    """A worker claims a due instance; the cancel lands before the worker's first save."""
    STEP_RUNNING.clear()
    CANCELLED.clear()
    engine = gorch.Engine(store, {"export": Export}, defer_resume=True)
    engine.start("export", "e-2")  # deferred: due at once, for run_due
    results: list[list[gorch.DueResult]] = []
    worker = threading.Thread(target=lambda: results.append(engine.run_due()))
    worker.start()
    assert STEP_RUNNING.wait(10)
    engine.cancel("e-2")
    CANCELLED.set()
    worker.join(10)
    [[due]] = results
    assert (due.id, due.status, due.outcome) == ("e-2", "cancelled", "skipped")
    assert due.error == ""
    assert store.load("e-2").status == "cancelled"


def test_gorch_cancel_is_exported_in_the_core() -> None:
    class Waits(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(Select("wait", On("ack", self.ack)))

        def ack(self) -> None:
            pass

    wf, state = Waits(), gorch.new_state("w-1", "waits")
    gorch.resume(wf, state)
    gorch.cancel(wf, state)
    assert state.status is gorch.WorkflowStatus.FINISHED  # (the Engine records "cancelled")
    assert gorch.awaited_events(state) == []
    assert asyncio.iscoroutinefunction(gorch.acancel)
