"""How ``start`` writes (issue 15): as late as possible, and only once when it can.

* An instance that blocks before any step is created in the state it blocks in:
  one write, nothing before it.
* An instance whose first resume runs a step (or a handler setup other than a
  timer's) is created right before that step, leased to the start; the step
  sees its record. Of concurrent starts of one id, one runs it.
* The snapshot ``start`` returns works out input schemas only when read.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
from stores.store_support import ALL_KINDS, StoreSpec, make_spec

import gorch
from gorch import On, Parallel, S, Select, Step, Timeout
from gorch.engine import Engine
from gorch.errors import DefinitionError, WorkflowExists, WorkflowNotFound
from gorch.handlers import Handler
from gorch.state import EventRequest
from gorch.stores import Store

SEEN: list[Any] = []
STORE: list[Store] = []


class Pay(pydantic.BaseModel):
    amount: int


class Invoice(gorch.Workflow):
    total: int = 0

    def definition(self) -> gorch.Section:
        SEEN.append("definition")
        return S(
            Select("await payment", On("pay", self.pay), Timeout("late", timedelta(days=30))),
        )

    def pay(self, p: Pay) -> int:
        self.total += p.amount
        return self.total


class Mailer(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Step("mail", self.mail), Select("wait", On("ack", self.ack)))

    def mail(self) -> None:
        # the record exists before any step runs: resuming, leased to this start
        SEEN.append(STORE[0].load("m-1").status)

    def ack(self) -> None:
        pass


class Subscribe(Handler):
    def setup(self, req: EventRequest) -> str | None:
        SEEN.append(STORE[0].load(req.workflow_id).status)
        return None


class Subscriber(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Select("wait", On("ping", Subscribe())))


class Broken(gorch.Workflow):
    def definition(self) -> gorch.Section:
        raise DefinitionError("no definition today")


WORKFLOWS: dict[str, type[gorch.Workflow]] = {
    "invoice": Invoice,
    "mailer": Mailer,
    "subscriber": Subscriber,
    "broken": Broken,
}


@pytest.fixture(params=ALL_KINDS)
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    yield from make_spec(request.param, tmp_path)


@pytest.fixture
def store(spec: StoreSpec) -> Iterator[Store]:
    SEEN.clear()
    opened = spec.open()
    STORE[:] = [opened]
    yield opened
    opened.close()
    STORE.clear()


class Counting:
    """Counts the store's writes (and lets them through)."""

    def __init__(self, store: Store) -> None:
        self.writes: list[str] = []
        for name in ("create", "save"):
            method = getattr(store, name)

            def counted(*args: Any, _m: Any = method, _n: str = name, **kw: Any) -> Any:
                self.writes.append(_n)
                return _m(*args, **kw)

            setattr(store, name, counted)


def test_an_instance_that_blocks_at_once_is_written_once(store: Store) -> None:
    counted = Counting(store)
    snap = Engine(store, WORKFLOWS).start("invoice", "i-1")
    assert counted.writes == ["create"]
    rec = store.load("i-1")
    assert (rec.status, rec.version, rec.wake_at) == ("waiting", 1, snap.next_wakeup)
    assert snap.version == 1 and snap.status == "waiting"
    assert [e.kind for e in Engine(store, WORKFLOWS).history("i-1")] == ["started"]


def test_a_step_first_is_preceded_by_the_create(store: Store) -> None:
    counted = Counting(store)
    snap = Engine(store, WORKFLOWS).start("mailer", "m-1")
    assert SEEN == ["resuming"]  # the step saw its record, created and leased
    assert counted.writes[0] == "create" and snap.status == "waiting"
    assert [e.kind for e in Engine(store, WORKFLOWS).history("m-1")] == ["started", "step"]


def test_an_effectful_setup_is_preceded_by_the_create(store: Store) -> None:
    Engine(store, WORKFLOWS).start("subscriber", "s-1")
    assert SEEN == ["resuming"]
    assert store.load("s-1").status == "waiting"


def test_a_start_that_cannot_run_creates_nothing(store: Store) -> None:
    with pytest.raises(DefinitionError):
        Engine(store, WORKFLOWS).start("broken", "b-1")
    with pytest.raises(WorkflowNotFound):
        store.load("b-1")


def test_concurrent_starts_of_one_id_create_it_once(store: Store) -> None:
    engine = Engine(store, WORKFLOWS)
    outcomes: list[str] = []
    go = threading.Barrier(6)

    def one() -> None:
        go.wait()
        try:
            engine.start("invoice", "same")
            outcomes.append("created")
        except WorkflowExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created"] + ["exists"] * 5
    assert store.load("same").version == 1


def test_the_input_schema_is_worked_out_only_when_read(store: Store) -> None:
    engine = Engine(store, WORKFLOWS)
    snap = engine.start("invoice", "i-2")
    built = SEEN.count("definition")
    pay = next(e for e in snap.awaited if e.name == "pay")
    assert SEEN.count("definition") == built  # nothing asked for it yet
    assert pay.input_schema == pydantic.TypeAdapter(Pay).json_schema()
    assert SEEN.count("definition") == built + 1
    assert pay.input_schema == pydantic.TypeAdapter(Pay).json_schema()  # worked out once
    assert SEEN.count("definition") == built + 1
    late = next(e for e in snap.awaited if e.name == "late")
    assert late.input_schema is None  # a timer takes no input
    dumped = snap.model_dump(mode="json")
    assert [e["input_schema"] for e in dumped["awaited"]] == [pay.input_schema, None]
    assert engine.get("i-2") == snap


# --------------------------------------------------------------------------- async


class Fan(gorch.Workflow):
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            Parallel("fan", S(Step("a", self.a)), S(Step("b", self.b))),
            Select("wait", On("done", self.done)),
        )

    async def a(self) -> None:
        SEEN.append(("a", (await STORE[1].load("f-1")).status))  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)

    async def b(self) -> None:
        SEEN.append(("b", (await STORE[1].load("f-1")).status))  # type: ignore[attr-defined]

    def done(self) -> None:
        pass


def test_concurrent_first_steps_of_an_async_start_wait_for_one_create(
    spec: StoreSpec,
) -> None:
    SEEN.clear()
    aio = spec.open_async()
    STORE[:] = [spec.open_sync(), aio]
    creates: list[str] = []
    real = aio.create

    async def create(*args: Any, **kw: Any) -> Any:
        creates.append(args[0])
        return await real(*args, **kw)

    aio.create = create  # type: ignore[method-assign]

    async def main() -> str:
        async with gorch.AsyncEngine(aio, {"fan": Fan}) as engine:
            return (await engine.start("fan", "f-1")).status

    try:
        assert asyncio.run(main()) == "waiting"
    finally:
        STORE[0].close()
        STORE.clear()
    assert creates == ["f-1"]
    assert sorted(SEEN) == [("a", "resuming"), ("b", "resuming")]


# --------------------------------------------------------------------------- failures


class Flaky(gorch.Workflow):
    """No retry= on its step: the class's default_retry applies, as without an Engine."""

    default_retry = gorch.Retry(attempts=2, backoff=30)

    def definition(self) -> gorch.Section:
        return S(Step("call", self.call))

    def call(self) -> None:
        raise ConnectionError("down")

    def on_failed(self, error: Exception) -> None:
        SEEN.append(("on_failed", STORE[0].load(self.ident).status))

    ident: str = ""


def test_the_engine_follows_default_retry_and_reports_the_failure_after_saving_it(
    store: Store,
) -> None:
    engine = Engine(store, {"flaky": Flaky})
    snap = engine.start("flaky", "f-1", {"ident": "f-1"})
    assert snap.status == "retrying" and SEEN == []  # attempt 1 of 2: one is left
    rec = store.load("f-1")
    assert rec.wake_at is not None
    later = rec.wake_at + timedelta(seconds=1)
    [due] = engine.run_due(now=later)
    assert due.status == "failed"
    assert SEEN == [("on_failed", "failed")]  # the hook saw the failure already saved


def test_created_nonces_differ_between_forked_workers() -> None:
    """The nonce that tells a start's created blob from a rival's is not secret, but
    two worker processes forked from one parent must not draw the same ones."""
    import os

    from gorch.engine_ops import _nonce

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next nonces, to the parent
        try:
            os.write(write, " ".join(_nonce() for _ in range(4)).encode())
        finally:
            os._exit(0)
    os.close(write)
    ours = {_nonce() for _ in range(4)}
    with os.fdopen(read) as pipe:
        theirs = set(pipe.read().split())
    os.waitpid(pid, 0)
    assert len(theirs) == 4 and all(len(n) == 8 for n in theirs | ours)
    assert not ours & theirs
