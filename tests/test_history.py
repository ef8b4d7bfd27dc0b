"""Each instance's history (issue 13, item 1): what happened to it, written with its state.

Runs the Engine on every store (memory, sqlite, postgres, redis) and the
AsyncEngine on every async store; the HTTP route is in ``test_http_history``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
from stores.store_support import ALL_KINDS, StoreSpec, SyncOverAsync, make_spec

import gorch
from gorch import History, HistoryEntry, On, S, Select, Step, Timeout
from gorch.errors import InvalidWorkflowId, WorkflowNotFound
from gorch.retry import Retry
from gorch.stores import MemoryStore, Store

WAIT = timedelta(hours=1)
RUNS: list[float] = []  # one per run of "reserve"


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    RUNS.clear()
    yield
    RUNS.clear()


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Order(gorch.Workflow):
    """Reserve (fails the first ``flaky`` times), wait for a decision or a timer, close."""

    amount: float
    flaky: int = 0
    status: str = "new"

    def definition(self) -> gorch.Section:
        return S(
            Step("reserve", self.reserve, retry=Retry(attempts=3, backoff=10)),
            Select(
                "await decision",
                On("decide", self.decide),
                Timeout("expired", WAIT, Step("escalate", self.escalate)),
            ),
            Step("close", self.close),
        )

    def reserve(self) -> None:
        RUNS.append(self.amount)
        if len(RUNS) <= self.flaky:  # the data is restored after a failure: count outside
            raise RuntimeError("stock service down")

    def decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        return {"status": self.status}

    def escalate(self) -> None:
        self.status = "escalated"

    def close(self) -> None:
        pass


WORKFLOWS: dict[str, type[gorch.Workflow]] = {"order": Order}


@pytest.fixture(params=ALL_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    for spec in make_spec(request.param, tmp_path):
        opened = spec.open()
        try:
            yield opened
        finally:
            opened.close()


def kinds(history: list[HistoryEntry]) -> list[tuple[str, str | None]]:
    return [(e.kind, e.name) for e in history]


def test_a_start_an_event_and_the_end_are_told_in_order(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    before = datetime.now(UTC)
    engine.start("order", "o-1", {"amount": 12.5}, by="ann")
    engine.send("o-1", "decide", {"approved": True, "by": "bob"})
    history = engine.history("o-1")
    assert isinstance(history, History) and history.dropped == 0
    assert kinds(history) == [
        ("started", "order"),
        ("step", "reserve"),
        ("event", "decide"),
        ("step", "close"),
        ("finished", None),
    ]
    started, reserve, event, _, _ = history
    assert started.by == "ann"
    assert started.input == {"amount": 12.5, "flaky": 0, "status": "new"}
    assert reserve.attempt == 1 and reserve.error is None and reserve.thread_id == gorch.MAIN_THREAD
    assert reserve.duration is not None and reserve.duration >= 0
    assert event.input == {"approved": True, "by": "bob"}
    assert event.output == {"status": "approved"}
    assert event.pc is not None and event.thread_id == gorch.MAIN_THREAD
    assert engine.get("o-1").awaited == []
    assert all(before <= e.at <= datetime.now(UTC) for e in history)
    assert [e.at for e in history] == sorted(e.at for e in history)


def test_failed_attempts_carry_their_error_and_a_retry_is_told(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    t0 = datetime.now(UTC)
    snap = engine.start("order", "o-1", {"amount": 1, "flaky": 1})
    assert snap.status == "retrying"
    engine.run_due(now=t0 + timedelta(minutes=5))
    history = engine.history("o-1")
    assert kinds(history) == [("started", "order"), ("step", "reserve"), ("step", "reserve")]
    first, second = history[1:]
    assert (first.attempt, first.error) == (1, "RuntimeError: stock service down")
    assert (second.attempt, second.error) == (2, None)


def test_a_step_that_fails_for_good_ends_as_failed_and_retry_is_told(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    engine.start("order", "o-1", {"amount": 1, "flaky": 5})
    t = datetime.now(UTC)
    for minutes in (5, 10, 20):
        engine.run_due(now=t + timedelta(minutes=minutes))
    assert engine.get("o-1").status == "failed"
    history = engine.history("o-1")
    assert [e.attempt for e in history if e.kind == "step"] == [1, 2, 3]
    assert history[-1].kind == "failed"
    assert history[-1].error == "RuntimeError: stock service down"
    engine.retry("o-1")
    assert [e.kind for e in engine.history("o-1")][-2:] == ["retried", "step"]


def test_a_fired_timer_is_told_with_its_wait(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    engine.start("order", "o-1", {"amount": 1})
    waiting = engine.get("o-1").awaited
    due = next(a.due for a in waiting if a.name == "expired")
    assert due is not None
    engine.run_due(now=due + timedelta(seconds=1))
    history = engine.history("o-1")
    assert kinds(history)[2:] == [
        ("timer", "expired"),
        ("step", "escalate"),
        ("step", "close"),
        ("finished", None),
    ]
    timer = history[2]
    assert timer.pc == next(a.pc for a in waiting if a.name == "expired")
    assert timer.thread_id == gorch.MAIN_THREAD


def test_a_cancel_is_told(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    engine.start("order", "o-1", {"amount": 1})
    engine.cancel("o-1")
    assert kinds(engine.history("o-1"))[-1] == ("cancelled", None)


def test_a_history_over_its_cap_keeps_the_newest_and_counts_the_rest(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS, history_limit=3)
    engine.start("order", "o-1", {"amount": 1})
    engine.send("o-1", "decide", {"approved": False, "by": "x"})
    history = engine.history("o-1")
    assert kinds(history) == [("event", "decide"), ("step", "close"), ("finished", None)]
    assert history.dropped == 2  # started, reserve


def test_history_survives_a_new_engine_on_the_same_store(store: Store) -> None:
    gorch.Engine(store, WORKFLOWS).start("order", "o-1", {"amount": 1})
    again = gorch.Engine(store, WORKFLOWS)
    again.send("o-1", "decide", {"approved": True, "by": "y"})
    assert [e.kind for e in again.history("o-1")] == [
        "started",
        "step",
        "event",
        "step",
        "finished",
    ]


def test_refused_sends_write_no_history(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    engine.start("order", "o-1", {"amount": 1})
    before = store.load("o-1")
    with pytest.raises(gorch.InvalidEventInput):
        engine.send("o-1", "decide", {"approved": "maybe"})
    assert store.load("o-1") == before
    assert [e.kind for e in engine.history("o-1")] == ["started", "step"]


def test_history_of_unknown_or_bad_ids(store: Store) -> None:
    engine = gorch.Engine(store, WORKFLOWS)
    with pytest.raises(WorkflowNotFound):
        engine.history("nope")
    with pytest.raises(InvalidWorkflowId):
        engine.history("<script>")


def test_a_bad_history_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="history_limit"):
        gorch.Engine(MemoryStore(), WORKFLOWS, history_limit=0)


def test_a_store_without_history_support_still_runs() -> None:
    """A wrapping store whose ``save`` takes no history: the engine runs, history says why."""

    class Plain(MemoryStore):
        def save(self, id: str, expected_version: int, status: str, blob: bytes,
                 wake_at: datetime | None) -> Any:  # fmt: skip
            return super().save(id, expected_version, status, blob, wake_at)

        def history(self, id: str) -> Any:
            return Store.history(self, id)

    engine = gorch.Engine(Plain(), WORKFLOWS)
    engine.start("order", "o-1", {"amount": 1})
    assert engine.send("o-1", "decide", {"approved": True, "by": "z"}) == {"status": "approved"}
    with pytest.raises(NotImplementedError, match="does not implement history"):
        engine.history("o-1")


# --------------------------------------------------------------------------- AsyncEngine


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_the_async_engine_tells_the_same_story(kind: str, tmp_path: Path) -> None:
    for spec in make_spec(kind, tmp_path, aio=True):

        async def play(spec: StoreSpec = spec) -> list[HistoryEntry]:
            async with gorch.AsyncEngine(spec.open_async(), WORKFLOWS, history_limit=50) as e:
                await e.start("order", "o-1", {"amount": 2, "flaky": 1}, by="cli")
                await e.run_due(now=datetime.now(UTC) + timedelta(minutes=5))
                await e.send("o-1", "decide", {"approved": True, "by": "q"})
                return await e.history("o-1")

        history = asyncio.run(play())
        assert kinds(history) == [
            ("started", "order"),
            ("step", "reserve"),
            ("step", "reserve"),
            ("event", "decide"),
            ("step", "close"),
            ("finished", None),
        ]
        assert history[0].by == "cli"
        assert history[1].error == "RuntimeError: stock service down"
        assert history[3].output == {"status": "approved"}


def test_sync_and_async_engines_share_one_history(tmp_path: Path) -> None:
    for spec in make_spec("sqlite", tmp_path):
        sync_store = spec.open_sync()
        gorch.Engine(sync_store, WORKFLOWS).start("order", "o-1", {"amount": 1})

        async def play(spec: StoreSpec = spec) -> list[HistoryEntry]:
            async with gorch.AsyncEngine(spec.open_async(), WORKFLOWS) as e:
                await e.send("o-1", "decide", {"approved": True, "by": "q"})
                return await e.history("o-1")

        assert [e.kind for e in asyncio.run(play())] == [
            "started",
            "step",
            "event",
            "step",
            "finished",
        ]
        sync_store.close()


_ = SyncOverAsync  # the async stores are also run through the contract suite


# --------------------------------------------------------------------------- the core's step log


class _Logged(gorch.Workflow):
    tries: int = 0

    def definition(self) -> gorch.Section:
        return gorch.S(gorch.Step("ok", self.ok), gorch.Step("flaky", self.flaky))

    def ok(self) -> None:
        pass

    def flaky(self) -> None:
        self.tries += 1
        if self.tries == 1:
            raise ValueError("first try")


@pytest.mark.parametrize("api", ["sync", "async"])
def test_the_step_log_hears_of_every_attempt_with_its_outcome(api: str) -> None:
    """What the Engine's history is written from, without a middleware."""
    import asyncio

    from gorch.interpreter import arun, run

    heard: list[tuple[str, int, str | None]] = []

    def log(ctx: gorch.StepContext, duration: float, error: BaseException | None) -> None:
        assert duration >= 0
        heard.append((ctx.step, ctx.attempt, None if error is None else type(error).__name__))

    wf, state = _Logged(), gorch.new_state("l-1", "logged")
    for _ in range(2):
        try:
            if api == "sync":
                run(wf, state, step_log=log)
            else:
                asyncio.run(arun(wf, state, step_log=log))
        except gorch.StepFailed:
            pass
    assert heard == [("ok", 1, None), ("flaky", 1, "ValueError"), ("flaky", 2, None)]
    assert state.status is gorch.WorkflowStatus.FINISHED
