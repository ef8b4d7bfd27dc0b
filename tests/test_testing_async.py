"""The test kit with async workflows (issue 12 item 5).

``WorkflowEnv`` runs ``async def`` steps, handlers and hooks through its
awaitable methods (``astart``, ``asend``, ``aresume``, ``aadvance``,
``aadvance_to``) on the virtual clock; its sync methods refuse them before
anything runs, pointing at the async ones; and no call of the kit lets a
coroutine go un-awaited.
"""

from __future__ import annotations

import asyncio
import warnings
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import Field

import gorch
from gorch import On, Parallel, S, Select, Step, Timeout
from gorch.clock import now as clock_now
from gorch.testing import DEFAULT_START, UnawaitedCoroutineError, WorkflowEnv

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Expense(gorch.Workflow):
    """Notify, wait for a decision or three days, then close: async steps and handler."""

    amount: float = 0
    status: str = "new"
    seen_times: list[datetime] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            Step("notify", self.notify),
            Select(
                "await decision",
                On("decide", self.decide),
                Timeout("expired", timedelta(days=3), Step("escalate", self.escalate)),
            ),
            Step("close", self.close),
        )

    async def notify(self) -> str:
        await asyncio.sleep(0)
        self.seen_times.append(clock_now())
        return "sent"

    async def decide(self, approved: bool) -> dict[str, str]:
        await asyncio.sleep(0)
        self.status = "approved" if approved else "rejected"
        return {"status": self.status}

    async def escalate(self) -> None:
        await asyncio.sleep(0)
        self.seen_times.append(clock_now())
        self.status = "escalated"

    def close(self) -> None:  # plain steps run too
        self.status += " and closed"


class Mailer:
    sent: list[str] = []

    @classmethod
    async def send(cls, to: str) -> None:
        await asyncio.sleep(0)
        cls.sent.append(to)


class Forgetful(gorch.Workflow):
    """A plain step that calls an async function and forgets to await it."""

    def definition(self) -> gorch.Section:
        return S(Step("notify", self.notify))

    def notify(self) -> None:
        Mailer.send("boss")  # type: ignore[unused-coroutine]  # the bug under test


class Returning(gorch.Workflow):
    """A plain step that returns a coroutine (it should have been ``async def``)."""

    done: bool = False

    def definition(self) -> gorch.Section:
        return S(Step("work", self.work))

    def work(self) -> Any:
        return self._work()

    async def _work(self) -> str:
        self.done = True
        return "done"


class Flaky(gorch.Workflow):
    fail: bool = True
    ran: int = 0

    def definition(self) -> gorch.Section:
        return S(Step("call", self.call))

    async def call(self) -> None:
        self.ran += 1
        await asyncio.sleep(0)
        if self.fail:
            raise ConnectionError("down")


class InFlight:
    now = 0
    most = 0


class Fan(gorch.Workflow):
    got: dict[str, int] = Field(default_factory=dict)

    def definition(self) -> gorch.Section:
        return S(Parallel("fan", *(S(Step(n, self.branch(n))) for n in ("a", "b", "c", "d"))))

    def branch(self, name: str) -> Any:
        async def run() -> None:
            InFlight.now += 1
            InFlight.most = max(InFlight.most, InFlight.now)
            for _ in range(5):
                await asyncio.sleep(0)
            InFlight.now -= 1
            self.got[name] = len(name)

        run.__qualname__ = f"Fan.{name}"
        return run


@pytest.fixture(autouse=True)
def _reset() -> None:
    Mailer.sent = []
    InFlight.now = InFlight.most = 0


def env() -> WorkflowEnv:
    return WorkflowEnv(
        {
            "expense": Expense,
            "forgetful": Forgetful,
            "returning": Returning,
            "flaky": Flaky,
            "fan": Fan,
        }
    )


def stored(e: WorkflowEnv, id: str) -> bytes:
    inst = e.get(id)
    return gorch.dumps(inst.data, inst.state)


# --------------------------------------------------------------------------- runs


async def test_an_async_workflow_runs_on_the_virtual_clock() -> None:
    e = env()
    inst = await e.astart("expense", "x-1", {"amount": 10})
    assert inst.status is gorch.WorkflowStatus.WAITING
    assert e.waiting_on("x-1") == ["decide", "expired"]
    assert e.data("x-1", Expense).seen_times == [DEFAULT_START]
    fired = await e.aadvance(days=3)
    assert [f.name for f in fired] == ["expired"]
    data = e.data("x-1", Expense)
    assert data.status == "escalated and closed"
    assert data.seen_times == [DEFAULT_START, DEFAULT_START + timedelta(days=3)]
    assert [(h.kind, h.name) for h in e.history("x-1")] == [
        ("step", "notify"),
        ("timer", "expired"),
        ("step", "escalate"),
        ("step", "close"),
        ("finish", "finish"),
    ]
    assert e.history("x-1")[0].output == "sent"  # the awaited result, not a coroutine


async def test_asend_awaits_the_handler_and_the_resume_after_it() -> None:
    e = env()
    await e.astart("expense", "x-1")
    assert await e.asend("x-1", "decide", True) == {"status": "approved"}
    assert e.status("x-1") is gorch.WorkflowStatus.FINISHED
    assert e.data("x-1", Expense).status == "approved and closed"
    [event] = e.history("x-1", kind="event")
    assert (event.input, event.output) == (True, {"status": "approved"})


async def test_aadvance_to_fires_in_order_and_refuses_going_back() -> None:
    e = env()
    await e.astart("expense", "x-1")
    await e.aadvance(days=1)
    await e.astart("expense", "x-2")
    fired = await e.aadvance_to(DEFAULT_START + timedelta(days=5))
    assert [(f.workflow_id, f.at) for f in fired] == [
        ("x-1", DEFAULT_START + timedelta(days=3)),
        ("x-2", DEFAULT_START + timedelta(days=4)),
    ]
    with pytest.raises(ValueError, match="never goes back"):
        await e.aadvance_to(DEFAULT_START)
    with pytest.raises(ValueError, match="never goes back"):
        await e.aadvance(-1)


async def test_a_failing_async_step_raises_and_aresume_retries_it() -> None:
    e = env()
    with pytest.raises(gorch.StepFailed, match="ConnectionError: down"):
        await e.astart("flaky", "f-1")
    assert e.status("f-1") is gorch.WorkflowStatus.RESUMING
    [attempt] = e.history("f-1", kind="step")
    assert attempt.error == "ConnectionError: down"
    assert e.data("f-1", Flaky).ran == 0  # the data the step started from
    with pytest.raises(gorch.StepFailed):
        await e.aresume("f-1")
    assert [h.attempt for h in e.history("f-1", kind="step")] == [1, 2]


async def test_independent_branches_run_at_once_with_the_results_of_one_at_a_time() -> None:
    e = env()
    await e.astart("fan", "f-1")
    assert InFlight.most == 4
    one = WorkflowEnv({"fan": Fan}, concurrency=1)
    InFlight.most = 0
    await one.astart("fan", "f-1")
    assert InFlight.most == 1
    assert stored(e, "f-1") == stored(one, "f-1")


async def test_a_concurrency_below_one_is_refused() -> None:
    for bad in (0, -2, True, "3"):
        with pytest.raises(ValueError, match="concurrency must be an int of at least 1"):
            WorkflowEnv({"fan": Fan}, concurrency=bad)  # type: ignore[arg-type]


async def test_a_cancelled_astart_keeps_what_the_checkpoints_saved() -> None:
    gate = asyncio.Event()
    release = asyncio.Event()

    class Stuck(gorch.Workflow):
        log: list[str] = Field(default_factory=list)

        def definition(self) -> gorch.Section:
            return S(Step("first", self.first), Step("stuck", self.stuck))

        def first(self) -> None:
            self.log.append("first")

        async def stuck(self) -> None:
            self.log.append("stuck started")
            gate.set()
            await release.wait()
            self.log.append("stuck done")

    e = WorkflowEnv({"stuck": Stuck})
    task = asyncio.ensure_future(e.astart("stuck", "s-1"))
    await gate.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert e.data("s-1", Stuck).log == ["first"]  # none of the cancelled step's changes
    assert e.status("s-1") is gorch.WorkflowStatus.RESUMING
    release.set()
    await e.aresume("s-1")  # the cancelled step runs again; the one before it does not
    assert e.data("s-1", Stuck).log == ["first", "stuck started", "stuck done"]


async def test_the_gorch_env_fixture_runs_async_workflows(gorch_env: WorkflowEnv) -> None:
    gorch_env.register("expense", Expense)
    await gorch_env.astart("expense", "x-1")
    assert gorch_env.waiting_on("x-1") == ["decide", "expired"]


# --------------------------------------------------------------------------- refusals


def test_the_sync_start_refuses_an_async_workflow_and_keeps_nothing() -> None:
    e = env()
    with pytest.raises(gorch.DefinitionError, match=r"'notify'.*env\.astart"):
        e.start("expense", "x-1")
    with pytest.raises(gorch.WorkflowNotFound):
        e.get("x-1")
    assert e.history() == []
    asyncio.run(e.astart("expense", "x-1"))  # the same id is free for the async method
    assert e.waiting_on("x-1") == ["decide", "expired"]


async def test_the_sync_send_resume_and_advance_refuse_and_change_nothing() -> None:
    e = env()
    await e.astart("expense", "x-1")
    before = stored(e, "x-1")
    with pytest.raises(gorch.DefinitionError, match=r"env\.asend"):
        e.send("x-1", "decide", True)
    with pytest.raises(gorch.DefinitionError, match=r"env\.aresume"):
        e.resume("x-1")
    with pytest.raises(gorch.DefinitionError, match=r"env\.aadvance"):
        e.advance(days=3)
    assert stored(e, "x-1") == before
    assert [h.kind for h in e.history("x-1")] == ["step"]


def test_a_plain_step_returning_a_coroutine_is_refused_by_the_sync_kit() -> None:
    e = env()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(gorch.DefinitionError, match=r"'work' returned an awaitable"):
            e.start("returning", "r-1")
    assert not [w for w in seen if "never awaited" in str(w.message)]


async def test_a_plain_step_returning_a_coroutine_is_awaited_by_the_async_kit() -> None:
    e = env()
    await e.astart("returning", "r-1")
    assert e.data("r-1", Returning).done is True
    assert e.history("r-1", kind="step")[0].output == "done"


def test_an_un_awaited_coroutine_fails_the_sync_call() -> None:
    e = env()
    with pytest.raises(UnawaitedCoroutineError, match=r"Mailer\.send.*never awaited") as info:
        e.start("forgetful", "f-1")
    assert "env.start()" in str(info.value)
    assert Mailer.sent == []


async def test_an_un_awaited_coroutine_fails_the_async_call() -> None:
    e = env()
    with pytest.raises(UnawaitedCoroutineError, match=r"env\.astart\(\).*Mailer\.send"):
        await e.astart("forgetful", "f-1")
    assert Mailer.sent == []


def test_other_warnings_pass_through_the_kit() -> None:
    class Noisy(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(Step("warn", self.warn))

        def warn(self) -> None:
            warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)

    e = WorkflowEnv({"noisy": Noisy})
    with pytest.warns(DeprecationWarning, match="deprecated thing"):
        e.start("noisy", "n-1")
    assert e.status("n-1") is gorch.WorkflowStatus.FINISHED
