"""Retention (issue 13, item 4): ``Engine.purge`` and the automatic ``retention`` policy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time
from stores.store_support import ALL_KINDS, StoreSpec, make_spec
from test_history import WORKFLOWS

import gorch
from gorch.errors import WorkflowNotFound
from gorch.stores import MemoryStore, Store

SOON = timedelta(minutes=1)
T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(params=ALL_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    for spec in make_spec(request.param, tmp_path):
        opened = spec.open()
        try:
            yield opened
        finally:
            opened.close()


def finished(engine: gorch.Engine, id: str) -> None:
    engine.start("order", id, {"amount": 1})
    engine.send(id, "decide", {"approved": True, "by": "x"})


def ids(engine: gorch.Engine) -> list[str]:
    return [s.id for s in engine.list(limit=1000).items]


def test_purge_removes_old_finished_and_cancelled_instances_in_batches(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    for i in range(5):
        finished(engine, f"f-{i}")
    engine.start("order", "c-1", {"amount": 1})
    engine.cancel("c-1")
    engine.start("order", "w-1", {"amount": 1})  # waiting: never purged by default
    n = engine.purge(finished_before=datetime.now(UTC) + SOON, batch=2)
    assert n == 6
    assert ids(engine) == ["w-1"]
    with pytest.raises(WorkflowNotFound):
        engine.history("f-0")


def test_purge_keeps_what_finished_after_the_cut(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    finished(engine, "old")
    assert engine.purge(finished_before=datetime.now(UTC) - timedelta(hours=1)) == 0
    assert ids(engine) == ["old"]


def test_purge_of_chosen_statuses(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    finished(engine, "f-1")
    engine.start("order", "w-1", {"amount": 1})
    assert engine.purge(finished_before=datetime.now(UTC) + SOON, statuses=["waiting"]) == 1
    assert ids(engine) == ["f-1"]


@pytest.mark.parametrize(
    ("statuses", "batch", "error"),
    [(["done"], 10, ValueError), (["finished"], 0, ValueError), ("finished", 10, TypeError)],
)
def test_bad_purge_input_is_refused_and_the_records_stay(
    store: Store, statuses: Sequence[str], batch: int, error: type[Exception]
) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    finished(engine, "f-1")
    before = store.load("f-1")
    with pytest.raises(error):
        engine.purge(finished_before=datetime.now(UTC) + SOON, statuses=statuses, batch=batch)
    assert store.load("f-1") == before


class RacingStore(MemoryStore):
    """A store where, right before each purge, another caller retries a failed instance."""

    def __init__(self) -> None:
        super().__init__()
        self.before_purge: list[str] = []
        self.engine: gorch.Engine | None = None

    def purge(self, before: datetime, statuses: Sequence[str], limit: int) -> list[str]:
        while self.before_purge and self.engine is not None:
            self.engine.retry(self.before_purge.pop())
        return super().purge(before, statuses, limit)


def test_a_purge_racing_a_retry_leaves_the_retried_instance() -> None:
    store = RacingStore()
    engine = gorch.Engine(store, WORKFLOWS)
    store.engine = engine
    for id in ("x-1", "x-2"):
        engine.start("order", id, {"amount": 1, "flaky": 99})
        for hours in (2, 4, 6):
            engine.run_due(now=datetime.now(UTC) + timedelta(hours=hours))
        assert engine.get(id).status == "failed"
    store.before_purge.append("x-1")  # it leaves "failed" between the purge's start and delete
    n = engine.purge(finished_before=datetime.now(UTC) + SOON, statuses=["failed"])
    assert n == 1
    assert ids(engine) == ["x-1"]
    assert engine.get("x-1").status != "failed"
    assert [e.kind for e in engine.history("x-1")][-2] == "retried"


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.purges = 0

    def purge(self, before: datetime, statuses: Sequence[str], limit: int) -> list[str]:
        self.purges += 1
        return super().purge(before, statuses, limit)


def test_the_retention_policy_purges_from_run_due_at_most_once_per_interval() -> None:
    store = CountingStore()
    engine = gorch.Engine(store, WORKFLOWS, retention=timedelta(days=30), retention_every=3600)
    with freeze_time(T0) as clock:
        finished(engine, "f-1")
        engine.run_due()
        assert store.purges == 1 and ids(engine) == ["f-1"]  # not old enough yet
        clock.tick(timedelta(minutes=30))
        engine.run_due()
        assert store.purges == 1  # within the interval: not again
        clock.tick(timedelta(days=31))
        engine.run_due()
        assert store.purges == 2
        assert ids(engine) == []


def test_no_retention_means_run_due_never_purges() -> None:
    store = CountingStore()
    engine = gorch.Engine(store, WORKFLOWS)
    finished(engine, "f-1")
    engine.run_due()
    assert store.purges == 0


def test_a_bad_retention_is_refused() -> None:
    with pytest.raises(ValueError, match="retention"):
        gorch.Engine(MemoryStore(), WORKFLOWS, retention=timedelta(0))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_the_async_engine_purges_too(kind: str, tmp_path: Path) -> None:
    for spec in make_spec(kind, tmp_path, aio=True):

        async def play(spec: StoreSpec = spec) -> tuple[int, list[str]]:
            async with gorch.AsyncEngine(spec.open_async(), WORKFLOWS) as e:
                await e.start("order", "f-1", {"amount": 1})
                await e.send("f-1", "decide", {"approved": True, "by": "x"})
                await e.start("order", "w-1", {"amount": 1})
                n = await e.purge(finished_before=datetime.now(UTC) + SOON, batch=1)
                return n, [s.id for s in (await e.list()).items]

        assert asyncio.run(play()) == (1, ["w-1"])


def test_purge_reports_its_progress_after_each_batch(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    for i in range(5):
        finished(engine, f"f-{i}")
    seen: list[tuple[int, int | None]] = []
    n = engine.purge(
        finished_before=datetime.now(UTC) + SOON,
        batch=2,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert n == 5 and seen == [(2, None), (4, None), (5, None)]


def test_the_async_engine_awaits_an_async_progress_callback(tmp_path: Path) -> None:
    seen: list[int] = []

    async def progress(done: int, total: int | None) -> None:
        await asyncio.sleep(0)
        seen.append(done)

    async def play() -> int:
        async with gorch.AsyncEngine("memory://", WORKFLOWS) as e:
            for i in range(3):
                await e.start("order", f"f-{i}", {"amount": 1})
                await e.send(f"f-{i}", "decide", {"approved": True, "by": "x"})
            return await e.purge(
                finished_before=datetime.now(UTC) + SOON, batch=2, progress=progress
            )

    assert asyncio.run(play()) == 3 and seen == [2, 3]
