"""``gorch.AsyncEngine`` (issue 12 item 4): the Engine's methods as coroutines.

The behaviours of ``tests/test_engine.py`` and ``tests/test_edges.py``, through
the async driver, on every async store (memory, SQLite, PostgreSQL and Redis,
the real servers of ``tests/stores/store_support.py``): async steps and
handlers are awaited, independent branches run at once, a cancelled task
leaves the instance at its step with nothing half-committed, and bad input
is refused with the stored record byte-identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import inspect
import logging
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
from pydantic import Field
from stores.store_support import ALL_KINDS, StoreSpec, make_spec

import gorch
from gorch import Go, On, Parallel, Return, S, Select, Step, Timeout
from gorch.clock import use_clock
from gorch.engine import EngineCore
from gorch.errors import (
    DefinitionError,
    IdempotencyKeyReused,
    InvalidEventInput,
    InvalidWorkflowData,
    InvalidWorkflowId,
    StoreUnavailable,
    TimerNotSendable,
    UnknownWorkflow,
    WorkflowExists,
    WorkflowFinishedError,
    WorkflowNotActive,
    WorkflowNotFound,
)
from gorch.retry import Retry
from gorch.stores import MemoryStore
from gorch.stores.aio_memory import AsyncMemoryStore
from gorch.stores.base import AsyncStore, Page, Record

pytestmark = pytest.mark.anyio

EXPIRY = timedelta(hours=1)
RAN: list[str] = []
"""Side effects of steps and handlers, in order: what "ran once" is checked against."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    """Reset the fakes; and no coroutine is ever left un-awaited."""
    RAN.clear()
    Api.failures_left = 0
    Gate.reset()
    Flight.reset()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
        gc.collect()
    assert not [w for w in seen if "never awaited" in str(w.message)], [
        str(w.message) for w in seen
    ]


# --------------------------------------------------------------------------- workflows


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Approval(gorch.Workflow):
    """Notify, wait for a decision (or escalate after an hour), close: async where it can be."""

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

    async def notify(self) -> None:
        await asyncio.sleep(0)
        self.log.append("notified")
        RAN.append("notify")

    async def decide(self, d: Decision) -> dict[str, str]:
        await asyncio.sleep(0)
        if not d.by:
            raise ValueError("an anonymous decision")
        self.status = "approved" if d.approved else "rejected"
        self.log.append(f"decided by {d.by}")
        RAN.append("decide")
        return {"status": self.status}

    def escalate(self) -> None:  # a plain step among async ones
        self.status = "escalated"
        self.log.append("escalated")

    async def close(self) -> None:
        await asyncio.sleep(0)
        self.log.append(f"closed: {self.status}")


class SyncApproval(gorch.Workflow):
    """:class:`Approval` with plain functions only: both engines can run it."""

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
        self.status = "approved" if d.approved else "rejected"
        return {"status": self.status}

    def escalate(self) -> None:
        self.status = "escalated"

    def close(self) -> None:
        self.log.append(f"closed: {self.status}")


class Counter(gorch.Workflow):
    """Adds each ``add`` event's input (an async handler that yields to the loop)."""

    total: int = 0
    received: int = 0
    tallied: int = 0

    def definition(self) -> gorch.Section:
        return S(
            gorch.For(
                "forever", True, Select("wait", On("add", self.add)), Step("tally", self.tally)
            )
        )

    async def add(self, n: int) -> int:
        await asyncio.sleep(0)  # lets other sends interleave: compare-and-swap must hold
        self.total += n
        self.received += 1
        return self.total

    async def tally(self) -> None:
        self.tallied += 1


class Api:
    """A fake remote service: fails ``failures_left`` more times."""

    failures_left = 0

    @classmethod
    async def call(cls) -> None:
        await asyncio.sleep(0)
        RAN.append("api")
        if cls.failures_left > 0:
            cls.failures_left -= 1
            raise ConnectionError("api down")


class Flaky(gorch.Workflow):
    """An async step with a retry policy: three attempts, 10 s then 20 s apart."""

    log: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            Step("call api", self.call_api, retry=Retry(attempts=3, backoff=10)),
            Step("after", self.after),
        )

    async def call_api(self) -> None:
        await Api.call()
        self.log.append("called")

    def after(self) -> None:
        self.log.append("after")


class Fragile(gorch.Workflow):
    """A plain step that raises after one that succeeds (no retry policy)."""

    log: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(Step("prepare", self.prepare), Step("explode", self.explode))

    async def prepare(self) -> None:
        self.log.append("prepared")

    def explode(self) -> None:
        self.log.append("half done")  # changed, then raised: must not be kept
        raise RuntimeError("boom")


class Flight:
    """How many fan-out steps are in flight at once (steps run on private copies of the
    data, so this lives outside it)."""

    now = 0
    most = 0

    @classmethod
    def reset(cls) -> None:
        cls.now = cls.most = 0


class Fan(gorch.Workflow):
    """Three independent async branches, then a step that sees all their results."""

    results: dict[str, int] = Field(default_factory=dict)
    total: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "fan",
                S(Step("a", self.branch_a)),
                S(Step("b", self.branch_b)),
                S(Step("c", self.branch_c)),
            ),
            Step("sum", self.sum),
        )

    async def _branch(self, name: str, value: int) -> None:
        Flight.now += 1
        Flight.most = max(Flight.most, Flight.now)
        for _ in range(5):  # several turns of the loop: the others get to start
            await asyncio.sleep(0)
        Flight.now -= 1
        self.results[name] = value

    async def branch_a(self) -> None:
        await self._branch("a", 1)

    async def branch_b(self) -> None:
        await self._branch("b", 2)

    async def branch_c(self) -> None:
        await self._branch("c", 3)

    def sum(self) -> None:
        self.total = sum(self.results.values())


BARRIER = threading.Barrier(1)


class SyncFan(gorch.Workflow):
    """Two plain branches that only finish if they run at the same time (a barrier)."""

    done: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(Step("x", self.x) | Step("y", self.y))

    def x(self) -> None:
        BARRIER.wait()
        self.done.append("x")

    def y(self) -> None:
        BARRIER.wait()
        self.done.append("y")


class Gate:
    """An event a step waits on, and one it sets once it has started."""

    started: asyncio.Event | None = None
    open: asyncio.Event | None = None
    at = ""
    """Where the gate is: ``"handler"`` or ``"step"``."""

    @classmethod
    def reset(cls) -> None:
        cls.started = cls.open = None

    @classmethod
    def arm(cls, at: str) -> None:
        cls.started, cls.open, cls.at = asyncio.Event(), asyncio.Event(), at

    @classmethod
    async def wait(cls, at: str) -> None:
        if cls.started is not None and cls.open is not None and cls.at == at:
            cls.started.set()
            await cls.open.wait()


class Blocking(gorch.Workflow):
    """A step that changes the data, then waits at the gate (to be cancelled there)."""

    log: list[str] = Field(default_factory=list)
    n: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Step("before", self.before),
            Select("wait", On("go", self.go)),
            Step("slow", self.slow),
            Step("after", self.after),
        )

    def before(self) -> None:
        self.log.append("before")

    async def go(self, n: int) -> int:
        self.n += n
        await Gate.wait("handler")
        return self.n

    async def slow(self) -> None:
        self.log.append("slow started")  # a change the cancelled step must not leave behind
        RAN.append("slow")
        await Gate.wait("step")
        self.log.append("slow done")

    def after(self) -> None:
        self.log.append("after")


class CoroutineHandler(gorch.Workflow):
    """A plain handler function that returns a coroutine (it forgot ``async``)."""

    got: int = 0

    def definition(self) -> gorch.Section:
        return S(Select("wait", On("decide", self.decide)))

    def decide(self, n: int) -> Any:
        return self._apply(n)

    async def _apply(self, n: int) -> dict[str, int]:
        await asyncio.sleep(0)
        self.got = n
        return {"got": n}


class Spawner(gorch.Workflow):
    """A Go thread whose async step runs next to the main thread's, then a join."""

    seen: list[str] = Field(default_factory=list)
    wg: gorch.WaitGroup = Field(default_factory=gorch.WaitGroup)

    def definition(self) -> gorch.Section:
        return S(
            Step("add", self.add),
            Go("side", S(Step("side step", self.side))),
            Step("main step", self.main),
            self.wg.wait("join"),
        )

    def add(self) -> None:
        self.wg.add(1)

    async def _work(self, name: str) -> None:
        Flight.now += 1
        Flight.most = max(Flight.most, Flight.now)
        for _ in range(5):
            await asyncio.sleep(0)
        Flight.now -= 1
        self.seen.append(name)

    async def side(self) -> None:
        await self._work("side")
        self.wg.done()

    async def main(self) -> None:
        await self._work("main")


WORKFLOWS: dict[str, type[gorch.Workflow]] = {
    "approval": Approval,
    "sync approval": SyncApproval,
    "counter": Counter,
    "flaky": Flaky,
    "fragile": Fragile,
    "fan": Fan,
    "sync fan": SyncFan,
    "blocking": Blocking,
    "coroutine handler": CoroutineHandler,
    "spawner": Spawner,
}


# --------------------------------------------------------------------------- stores


def open_async(spec: StoreSpec) -> AsyncStore:
    """The async store of ``spec``'s kind, on the test's own file, table or key prefix."""
    if spec.kind == "memory":
        return AsyncMemoryStore()
    if spec.kind == "sqlite":
        from gorch.stores.aio_sqlite import AsyncSQLiteStore

        return AsyncSQLiteStore(spec.target)
    module_name, cls_name, option = {
        "postgres": ("gorch.stores.aio_postgres", "AsyncPostgresStore", "table"),
        "redis": ("gorch.stores.aio_redis", "AsyncRedisStore", "prefix"),
    }[spec.kind]
    module = importlib.import_module(module_name)
    store: AsyncStore = getattr(module, cls_name)(spec.target, **{option: spec.namespace})
    return store


@pytest.fixture(params=ALL_KINDS)
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    yield from make_spec(request.param, tmp_path)


@pytest.fixture
async def store(spec: StoreSpec) -> AsyncIterator[AsyncStore]:
    opened = open_async(spec)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def engine(store: AsyncStore) -> gorch.AsyncEngine:
    return gorch.AsyncEngine(store, WORKFLOWS)


@pytest.fixture
async def memory() -> AsyncIterator[AsyncStore]:
    """The memory store, for tests about the driver rather than the backends."""
    opened = AsyncMemoryStore()
    yield opened
    await opened.close()


def fields(rec: Record) -> tuple[bytes, int, str, datetime | None]:
    return rec.blob, rec.version, rec.status, rec.wake_at


@contextlib.asynccontextmanager
async def unchanged(store: AsyncStore, id: str) -> AsyncIterator[None]:
    """Assert that record ``id`` is byte-identical (blob, version, status, wake-up) after."""
    before = fields(await store.load(id))
    yield
    assert fields(await store.load(id)) == before


def awaited(snap: gorch.Snapshot) -> list[str]:
    return sorted(e.name for e in snap.awaited)


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


# --------------------------------------------------------------------------- the API


async def test_async_engine_has_the_engine_methods_as_coroutines() -> None:
    assert issubclass(gorch.AsyncEngine, EngineCore)
    for name in ("start", "send", "resume", "retry", "get", "list", "cancel", "run_due", "work"):
        method = getattr(gorch.AsyncEngine, name)
        assert inspect.iscoroutinefunction(method), name
        sync_params = inspect.signature(getattr(gorch.Engine, name)).parameters
        async_params = inspect.signature(method).parameters
        assert set(sync_params) - {"should_stop"} <= set(async_params), name


async def test_a_url_opens_the_async_store(tmp_path: Path) -> None:
    engine = gorch.AsyncEngine(f"sqlite:///{tmp_path / 'a.db'}", WORKFLOWS)
    async with engine:
        snap = await engine.start("sync approval", "s-1", {"amount": 1})
        assert snap.status == "waiting"
        assert type(engine.store).__name__ == "AsyncSQLiteStore"


async def test_a_sync_store_is_refused_with_what_to_use_instead() -> None:
    with pytest.raises(TypeError, match=r"open_async_store.*gorch\.Engine"):
        gorch.AsyncEngine(MemoryStore(), WORKFLOWS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="AsyncStore or a store URL"):
        gorch.AsyncEngine(object(), WORKFLOWS)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "4"])
async def test_a_concurrency_limit_below_one_is_a_clear_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="concurrency must be an int of at least 1"):
        gorch.AsyncEngine(AsyncMemoryStore(), WORKFLOWS, concurrency=bad)


async def test_aresume_refuses_a_concurrency_of_zero_before_anything_runs() -> None:
    wf, state = Fan(), gorch.new_state("f-1", "fan")
    before = gorch.dumps(wf, state)
    with pytest.raises(ValueError, match="concurrency"):
        await gorch.aresume(wf, state, concurrency=0)
    assert gorch.dumps(wf, state) == before and Flight.most == 0


# --------------------------------------------------------------------------- start / send


async def test_start_awaits_async_steps_and_get_describes_the_instance(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    snap = await engine.start("approval", "a-1", {"amount": 120})
    assert snap.status == "waiting"
    assert snap.data["log"] == ["notified"] and RAN == ["notify"]
    assert awaited(snap) == ["decide", "expired"]
    got = await engine.get("a-1")
    assert got == snap
    rec = await store.load("a-1")
    assert rec.status == "waiting" and rec.wake_at is not None


async def test_send_awaits_the_async_handler_and_resumes_inline(
    engine: gorch.AsyncEngine,
) -> None:
    await engine.start("approval", "a-1", {"amount": 120})
    out = await engine.send("a-1", "decide", {"approved": True, "by": "ann"})
    assert out == {"status": "approved"}
    snap = await engine.get("a-1")
    assert snap.status == "finished"
    assert snap.data["log"] == ["notified", "decided by ann", "closed: approved"]


async def test_start_without_an_id_generates_one_and_accepts_an_instance(
    engine: gorch.AsyncEngine,
) -> None:
    a = await engine.start("approval", data={"amount": 1})
    b = await engine.start("approval", data=Approval(amount=2))
    assert a.id != b.id and b.data["amount"] == 2


async def test_sync_and_async_engines_save_the_same_bytes() -> None:
    """One set of rules: the same workflow through both drivers leaves identical records."""
    clock = datetime(2030, 1, 1, 12, tzinfo=UTC)
    sync_store, async_store = MemoryStore(), AsyncMemoryStore()
    sync_engine = gorch.Engine(sync_store, WORKFLOWS)
    async_engine = gorch.AsyncEngine(async_store, WORKFLOWS)
    with use_clock(lambda: clock):
        for i, data in enumerate([{"amount": 1}, {"amount": 2}]):
            sync_engine.start("sync approval", f"s-{i}", data)
            await async_engine.start("sync approval", f"s-{i}", data)
        assert sync_engine.send("s-0", "decide", {"approved": True, "by": "x"}, key="k") == (
            await async_engine.send("s-0", "decide", {"approved": True, "by": "x"}, key="k")
        )
        late = clock + EXPIRY + timedelta(seconds=1)
        assert sync_engine.run_due(now=late) == await async_engine.run_due(now=late)
    for id in ("s-0", "s-1"):
        assert fields(sync_store.load(id)) == fields(await async_store.load(id))


async def test_a_step_failing_in_start_is_saved_as_failed_with_the_data_it_started_from(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    snap = await engine.start("fragile", "f-1")
    assert snap.status == "failed"
    assert snap.data["log"] == ["prepared"]  # not "half done"
    assert "boom" in str([t.error for t in snap.threads])
    assert (await store.load("f-1")).status == "failed"


async def test_a_deferred_start_and_send_are_finished_by_run_due(store: AsyncStore) -> None:
    engine = gorch.AsyncEngine(store, WORKFLOWS, defer_resume=True)
    snap = await engine.start("approval", "a-1", {"amount": 5})
    assert snap.status == "resuming" and RAN == []
    [result] = await engine.run_due()
    assert (result.id, result.action, result.status) == ("a-1", "resume", "waiting")
    assert RAN == ["notify"]
    assert await engine.send("a-1", "decide", {"approved": False, "by": "bo"}) == {
        "status": "rejected"
    }
    assert (await engine.get("a-1")).status == "resuming"
    await engine.run_due()
    assert (await engine.get("a-1")).status == "finished"


async def test_resume_runs_a_pending_instance(store: AsyncStore) -> None:
    deferred = gorch.AsyncEngine(store, WORKFLOWS, defer_resume=True)
    await deferred.start("approval", "a-1", {"amount": 5})
    snap = await gorch.AsyncEngine(store, WORKFLOWS).resume("a-1")
    assert snap.status == "waiting" and RAN == ["notify"]


# --------------------------------------------------------------------------- exactly once


async def test_a_repeated_start_key_returns_the_instance_and_other_data_is_refused(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    first = await engine.start("approval", data={"amount": 3}, key="order-7")
    again = await engine.start("approval", data={"amount": 3}, key="order-7")
    assert again.id == first.id and RAN == ["notify"]
    async with unchanged(store, first.id):
        with pytest.raises(IdempotencyKeyReused):
            await engine.start("approval", data={"amount": 4}, key="order-7")


async def test_a_repeated_send_key_applies_the_event_once(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    await engine.start("counter", "c-1")
    assert await engine.send("c-1", "add", 5, key="k1") == 5
    async with unchanged(store, "c-1"):
        assert await engine.send("c-1", "add", 5, key="k1") == 5
        with pytest.raises(IdempotencyKeyReused):
            await engine.send("c-1", "add", 6, key="k1")
    snap = await engine.get("c-1")
    assert (snap.data["total"], snap.data["received"]) == (5, 1)


async def test_concurrent_sends_lose_no_update(engine: gorch.AsyncEngine) -> None:
    """Each handler awaits mid-way, so sends interleave and compare-and-swap decides."""
    await engine.start("counter", "c-1")
    outs = await asyncio.gather(*(engine.send("c-1", "add", n) for n in range(1, 21)))
    snap = await engine.get("c-1")
    assert snap.data["total"] == sum(range(1, 21))
    assert snap.data["received"] == 20 and snap.data["tallied"] == 20
    assert sorted(outs)[-1] == sum(range(1, 21)) and len(set(outs)) == 20


async def test_concurrent_starts_of_one_id_create_it_once(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    results = await asyncio.gather(
        *(engine.start("approval", "a-1", {"amount": i}) for i in range(5)),
        return_exceptions=True,
    )
    created = [r for r in results if isinstance(r, gorch.Snapshot)]
    assert len(created) == 1 and RAN == ["notify"]
    assert all(isinstance(r, WorkflowExists) for r in results if r not in created)


# --------------------------------------------------------------------------- refusals


async def test_a_timer_cannot_be_sent_as_an_event(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    await engine.start("approval", "a-1", {"amount": 1})
    async with unchanged(store, "a-1"):
        with pytest.raises(TimerNotSendable):
            await engine.send("a-1", "expired")


async def test_refused_events_leave_the_record_unchanged(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    await engine.start("approval", "a-1", {"amount": 1})
    async with unchanged(store, "a-1"):
        with pytest.raises(InvalidEventInput):
            await engine.send("a-1", "decide", {"approved": "maybe"})
        with pytest.raises(gorch.HandlerFailed, match="anonymous"):
            await engine.send("a-1", "decide", {"approved": True, "by": ""})
        with pytest.raises(gorch.EventNotFound):
            await engine.send("a-1", "nope")


async def test_bad_starts_store_nothing(engine: gorch.AsyncEngine, store: AsyncStore) -> None:
    with pytest.raises(UnknownWorkflow):
        await engine.start("nope", "x-1")
    with pytest.raises(InvalidWorkflowData):
        await engine.start("approval", "x-2", {"amount": "lots"})
    with pytest.raises(InvalidWorkflowId):
        await engine.start("approval", "bad id!", {"amount": 1})
    assert (await engine.list()).items == []
    with pytest.raises(WorkflowNotFound):
        await engine.get("x-1")


async def test_an_existing_id_is_refused_and_kept(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    await engine.start("approval", "a-1", {"amount": 1})
    async with unchanged(store, "a-1"):
        with pytest.raises(WorkflowExists):
            await engine.start("approval", "a-1", {"amount": 2})


# --------------------------------------------------------------------------- run_due, retry


async def test_run_due_fires_a_timer_only_once_it_is_due(engine: gorch.AsyncEngine) -> None:
    await engine.start("approval", "a-1", {"amount": 1})
    assert await engine.run_due() == []
    [result] = await engine.run_due(now=later(EXPIRY.total_seconds() + 1))
    assert (result.action, result.fired, result.status) == ("timer", ["expired"], "finished")
    assert (await engine.get("a-1")).data["log"] == ["notified", "escalated"]
    assert await engine.run_due(now=later(EXPIRY.total_seconds() + 1)) == []


async def test_run_due_respects_its_limit_and_drains_with_none(store: AsyncStore) -> None:
    engine = gorch.AsyncEngine(store, WORKFLOWS, defer_resume=True)
    for i in range(5):
        await engine.start("approval", f"a-{i}", {"amount": i})
    assert len(await engine.run_due(limit=2)) == 2
    assert sorted(r.id for r in await engine.run_due(limit=None)) == ["a-2", "a-3", "a-4"]
    with pytest.raises(ValueError, match="limit"):
        await engine.run_due(limit=0)


async def test_a_failed_async_step_is_retried_after_its_backoff(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    Api.failures_left = 1
    snap = await engine.start("flaky", "f-1")
    assert snap.status == "retrying" and snap.data["log"] == []
    assert await engine.run_due(now=later(5)) == []  # backoff not over
    [result] = await engine.run_due(now=later(11))
    assert (result.action, result.status, result.outcome) == ("retry", "finished", "processed")
    assert (await engine.get("f-1")).data["log"] == ["called", "after"]
    assert RAN == ["api", "api"]


async def test_a_step_failing_for_good_is_re_armed_by_retry(engine: gorch.AsyncEngine) -> None:
    Api.failures_left = 3
    await engine.start("flaky", "f-1")
    await engine.run_due(now=later(11))
    [last] = await engine.run_due(now=later(40))
    assert last.status == "failed"
    snap = await engine.retry("f-1")
    assert snap.status == "finished" and RAN == ["api"] * 4
    with pytest.raises(WorkflowNotActive):
        await engine.retry("f-1")


async def test_run_due_reports_an_instance_it_cannot_process_as_failed(
    store: AsyncStore,
) -> None:
    deferred = gorch.AsyncEngine(store, WORKFLOWS, defer_resume=True)
    await deferred.start("approval", "a-1", {"amount": 1})
    other = gorch.AsyncEngine(store, {"approval": Broken})
    [result] = await other.run_due()
    assert (result.id, result.outcome) == ("a-1", "failed")
    assert "DefinitionError" in result.error


class Broken(gorch.Workflow):
    amount: float = 0

    def definition(self) -> gorch.Section:
        raise KeyError("gone")


# --------------------------------------------------------------------------- list, cancel


async def test_list_filters_and_paginates(engine: gorch.AsyncEngine) -> None:
    for i in range(3):
        await engine.start("approval", f"a-{i}", {"amount": i})
    await engine.start("counter", "c-0")
    page = await engine.list(workflow="approval", limit=2)
    assert [s.id for s in page.items] == ["a-0", "a-1"] and page.next_cursor
    rest = await engine.list(workflow="approval", after=page.next_cursor)
    assert [s.id for s in rest.items] == ["a-2"]
    assert [s.id for s in (await engine.list(status="waiting")).items] == [
        "a-0",
        "a-1",
        "a-2",
        "c-0",
    ]


async def test_cancel_marks_cancelled_and_refuses_what_follows(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    await engine.start("approval", "a-1", {"amount": 1})
    snap = await engine.cancel("a-1")
    assert snap.status == "cancelled" and snap.awaited == []
    async with unchanged(store, "a-1"):
        with pytest.raises(WorkflowNotActive):
            await engine.send("a-1", "decide", {"approved": True, "by": "x"})
        with pytest.raises(WorkflowNotActive):
            await engine.resume("a-1")
        with pytest.raises(WorkflowNotActive):
            await engine.cancel("a-1")


async def test_a_finished_instance_refuses_events(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    await engine.start("approval", "a-1", {"amount": 1})
    await engine.send("a-1", "decide", {"approved": True, "by": "x"})
    async with unchanged(store, "a-1"):
        with pytest.raises(WorkflowFinishedError):
            await engine.send("a-1", "decide", {"approved": True, "by": "x"})


# --------------------------------------------------------------------------- concurrency


async def test_independent_async_branches_run_at_once_and_commit_in_order(
    store: AsyncStore,
) -> None:
    engine = gorch.AsyncEngine(store, WORKFLOWS)
    snap = await engine.start("fan", "f-1")
    assert Flight.most == 3
    assert snap.status == "finished" and snap.data["total"] == 6
    # Changes apply in thread order, not finishing order: one at a time gives the same bytes.
    Flight.reset()
    await gorch.AsyncEngine(store, WORKFLOWS, concurrency=1).start("fan", "f-2")
    assert Flight.most == 1
    f1, f2 = await store.load("f-1"), await store.load("f-2")
    assert f1.blob.replace(b"f-1", b"f-2") == f2.blob


async def test_the_concurrency_limit_caps_the_steps_in_flight(memory: AsyncStore) -> None:
    one = gorch.AsyncEngine(memory, WORKFLOWS, concurrency=1)
    two = gorch.AsyncEngine(memory, WORKFLOWS, concurrency=2)
    a = await one.start("fan", "f-1")
    assert Flight.most == 1
    Flight.reset()
    b = await two.start("fan", "f-2")
    assert Flight.most == 2
    assert a.data == b.data  # the same result whatever the limit
    assert (await memory.load("f-1")).blob.replace(b"f-1", b"f-2") == (
        await memory.load("f-2")
    ).blob


async def test_an_executor_runs_plain_branches_at_once(memory: AsyncStore) -> None:
    global BARRIER
    BARRIER = threading.Barrier(2, timeout=10)  # both branches must be running to pass
    with ThreadPoolExecutor(2) as pool:
        engine = gorch.AsyncEngine(memory, WORKFLOWS, executor=pool)
        snap = await engine.start("sync fan", "s-1")
    assert snap.status == "finished" and snap.data["done"] == ["x", "y"]


async def test_a_go_thread_and_the_main_thread_run_their_async_steps(
    engine: gorch.AsyncEngine,
) -> None:
    snap = await engine.start("spawner", "s-1")
    assert Flight.most == 2
    assert snap.status == "finished" and sorted(snap.data["seen"]) == ["main", "side"]


# --------------------------------------------------------------------------- cancellation


async def run_until_gate(coro: Any, at: str = "step") -> asyncio.Task[Any]:
    """Start ``coro`` as a task and return it once a step or handler waits at the gate."""
    Gate.arm(at)
    task = asyncio.ensure_future(coro)
    assert Gate.started is not None
    waiting = asyncio.ensure_future(Gate.started.wait())
    done, _ = await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiting.cancel()
        raise AssertionError(f"the task ended before reaching the gate: {task.result()!r}")
    return task


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancelled_resume_leaves_the_instance_at_its_step(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    await engine.start("blocking", "b-1")
    before = await store.load("b-1")
    task = await run_until_gate(engine.send("b-1", "go", 2))
    # The event was committed before the resume ran into the slow step.
    saved = await store.load("b-1")
    assert saved.version > before.version
    await cancel(task)
    rec = await store.load("b-1")
    wf, state = gorch.loads(rec.blob, Blocking)
    assert rec.status == "resuming"
    assert wf.n == 2 and wf.log == ["before"]  # the event is kept, the step's change is not
    assert [t.cur_step for t in state.threads] == ["wait"]  # the slow step is not done
    assert rec.wake_at is not None and rec.wake_at > datetime.now(UTC)  # leased: no double run
    # run_due carries on once the lease is over: the step runs again, and only once more.
    Gate.reset()
    [result] = await engine.run_due(now=later(engine.lease.total_seconds() + 1))
    assert (result.outcome, result.status) == ("processed", "finished")
    final = await engine.get("b-1")
    assert final.data["log"] == ["before", "slow started", "slow done", "after"]
    assert RAN == ["slow", "slow"]


async def test_a_cancelled_handler_commits_nothing(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    await engine.start("blocking", "b-1")
    async with unchanged(store, "b-1"):
        task = await run_until_gate(engine.send("b-1", "go", 2), at="handler")
        await cancel(task)
    Gate.reset()
    assert await engine.send("b-1", "go", 3) == 3
    assert (await engine.get("b-1")).data["n"] == 3


async def test_a_cancelled_start_keeps_the_record_for_run_due(
    engine: gorch.AsyncEngine, store: AsyncStore
) -> None:
    class Direct(Blocking):
        def definition(self) -> gorch.Section:
            return S(Step("before", self.before), Step("slow", self.slow))

    engine.workflows["direct"] = Direct
    task = await run_until_gate(engine.start("direct", "d-1"))
    await cancel(task)
    rec = await store.load("d-1")
    wf, state = gorch.loads(rec.blob, Direct)
    assert rec.status == "resuming" and wf.log == ["before"]  # none of slow's changes
    [thread] = state.threads
    assert (thread.cur_step, thread.status) == ("slow", gorch.ThreadStatus.EXECUTING)
    Gate.reset()
    [result] = await engine.run_due(now=later(engine.lease.total_seconds() + 1))
    assert result.status == "finished"


# --------------------------------------------------------------------------- bad input


async def test_the_sync_engine_refuses_an_async_workflow_and_stores_nothing() -> None:
    store = MemoryStore()
    engine = gorch.Engine(store, WORKFLOWS)
    with pytest.raises(DefinitionError, match=r"'notify'.*AsyncEngine"):
        engine.start("approval", "a-1", {"amount": 1})
    assert store.list().records == []
    assert RAN == []


async def test_the_sync_engine_refuses_events_and_resumes_of_an_async_instance() -> None:
    shared = MemoryStore()
    await gorch.AsyncEngine(AsyncMemoryStore(shared), WORKFLOWS).start(
        "approval", "a-1", {"amount": 1}
    )
    sync = gorch.Engine(shared, WORKFLOWS)
    before = fields(shared.load("a-1"))
    with pytest.raises(DefinitionError, match="AsyncEngine"):
        sync.send("a-1", "decide", {"approved": True, "by": "x"})
    with pytest.raises(DefinitionError, match="AsyncEngine"):
        sync.resume("a-1")
    assert fields(shared.load("a-1")) == before
    assert RAN == ["notify"]


async def test_a_sync_step_raising_inside_the_async_engine_fails_the_step(
    engine: gorch.AsyncEngine,
) -> None:
    snap = await engine.start("fragile", "f-1")
    [thread] = snap.threads
    assert snap.status == "failed" and "RuntimeError: boom" in (thread.error or "")
    assert snap.data["log"] == ["prepared"]


async def test_a_handler_returning_a_coroutine_is_awaited_by_the_async_engine(
    engine: gorch.AsyncEngine,
) -> None:
    await engine.start("coroutine handler", "h-1")
    assert await engine.send("h-1", "decide", 7) == {"got": 7}
    assert (await engine.get("h-1")).data["got"] == 7


async def test_a_handler_returning_a_coroutine_is_refused_by_the_sync_engine() -> None:
    shared = MemoryStore()
    await gorch.AsyncEngine(AsyncMemoryStore(shared), WORKFLOWS).start("coroutine handler", "h-1")
    before = fields(shared.load("h-1"))
    with pytest.raises(DefinitionError, match=r"AsyncEngine|ahandle_event"):
        gorch.Engine(shared, WORKFLOWS).send("h-1", "decide", 7)
    assert fields(shared.load("h-1")) == before


# --------------------------------------------------------------------------- the worker


class FlakyStore(AsyncStore):
    """An async memory store whose ``claim_due`` fails ``failures`` times first."""

    def __init__(self, failures: int) -> None:
        self.inner = AsyncMemoryStore()
        self.failures = failures

    async def create(self, *a: Any) -> Record:
        return await self.inner.create(*a)

    async def load(self, id: str) -> Record:
        return await self.inner.load(id)

    async def save(self, *a: Any) -> Record:
        return await self.inner.save(*a)

    async def delete(self, id: str) -> None:
        await self.inner.delete(id)

    async def list(self, **kw: Any) -> Page:
        return await self.inner.list(**kw)

    async def claim_due(self, now: datetime, limit: int, lease: timedelta) -> list[Record]:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("test store", "the connection dropped")
        return await self.inner.claim_due(now, limit, lease)

    async def remember(self, key: str, until: datetime) -> bool:
        return await self.inner.remember(key, until)


async def test_the_worker_rides_out_store_errors_with_one_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore(failures=3)
    engine = gorch.AsyncEngine(store, WORKFLOWS, defer_resume=True, store_retries=0)
    await engine.start("approval", "a-1", {"amount": 1})
    stop = asyncio.Event()
    seen: list[str] = []

    async def on_result(r: gorch.engine.DueResult) -> None:
        await asyncio.sleep(0)
        seen.append(r.id)
        stop.set()

    with caplog.at_level(logging.WARNING, logger="gorch"):
        done = await engine.work(poll=0.01, max_backoff=0.05, stop=stop, on_result=on_result)
    assert done == 1 and seen == ["a-1"]
    errors = [r for r in caplog.records if "store error" in r.getMessage()]
    assert len(errors) == 3 and all(r.exc_info is None for r in errors)
    assert any("answers again" in r.getMessage() for r in caplog.records)


async def test_a_stop_event_ends_the_worker_during_a_long_backoff() -> None:
    engine = gorch.AsyncEngine(FlakyStore(failures=10**6), WORKFLOWS, store_retries=0)
    stop = asyncio.Event()
    worker = asyncio.ensure_future(engine.work(poll=30, max_backoff=60, stop=stop))
    await asyncio.sleep(0.05)
    stop.set()
    assert await asyncio.wait_for(worker, timeout=10) == 0


async def test_a_worker_task_can_be_cancelled_while_it_waits(memory: AsyncStore) -> None:
    engine = gorch.AsyncEngine(memory, WORKFLOWS)
    worker = asyncio.ensure_future(engine.work(poll=30))
    await asyncio.sleep(0.01)
    assert not worker.done()  # it waits for its next poll, 30 s away
    await cancel(worker)


async def test_the_worker_stops_on_should_stop_and_processes_due_instances(
    memory: AsyncStore,
) -> None:
    engine = gorch.AsyncEngine(memory, WORKFLOWS, defer_resume=True)
    for i in range(3):
        await engine.start("approval", f"a-{i}", {"amount": i})
    seen: list[str] = []
    done = await engine.work(
        poll=0.01,
        batch=2,
        should_stop=lambda: len(seen) == 3,
        on_result=lambda r: seen.append(r.id),
    )
    assert done == 3 and sorted(seen) == ["a-0", "a-1", "a-2"]
    assert {s.status for s in (await engine.list()).items} == {"waiting"}


# --------------------------------------------------------------------------- store faults


class LossyStore(AsyncMemoryStore):
    """Saves commit, but the reply of the next ``lose`` saves is lost (``StoreUnavailable``)."""

    lose = 0

    async def save(
        self, id: str, expected_version: int, status: str, blob: bytes, wake_at: datetime | None
    ) -> Record:
        rec = await super().save(id, expected_version, status, blob, wake_at)
        if self.lose > 0:
            self.lose -= 1
            raise StoreUnavailable("test store", "the reply was lost")
        return rec


async def test_a_send_whose_reply_was_lost_is_applied_once_and_reported() -> None:
    store = LossyStore()
    engine = gorch.AsyncEngine(store, WORKFLOWS)
    await engine.start("counter", "c-1")
    store.lose = 1  # the event's save commits, its reply is lost: read back, not re-applied
    assert await engine.send("c-1", "add", 5) == 5
    snap = await engine.get("c-1")
    assert (snap.data["total"], snap.data["received"], snap.data["tallied"]) == (5, 1, 1)


class TakenOver(AsyncMemoryStore):
    """Right after a claim, another runner saves the record: the claim's lease is gone."""

    async def claim_due(self, now: datetime, limit: int, lease: timedelta) -> list[Record]:
        claimed = await super().claim_due(now, limit, lease)
        for r in claimed:
            await super().save(r.id, r.version, r.status, r.blob, later(3600))
        return claimed


async def test_run_due_reports_an_instance_taken_over_as_skipped() -> None:
    store = TakenOver()
    engine = gorch.AsyncEngine(store, WORKFLOWS, defer_resume=True)
    await engine.start("approval", "a-1", {"amount": 1})
    [result] = await engine.run_due()
    assert (result.id, result.outcome) == ("a-1", "skipped")
    rec = await store.load("a-1")  # the other runner's save stands: ours lost the CAS
    assert (rec.status, rec.version) == ("resuming", 3)
    assert rec.wake_at is not None and rec.wake_at > later(3000)
