"""Under ``aresume``, independent threads' steps run at once, with deterministic results
(issue 12, item 3).

Overlap is proven without a clock: two steps meet (each sets its own
``asyncio.Event`` and awaits the other's), which can only finish if both are in
flight at once; run one after the other, the first would wait for ever
(``asyncio.wait_for`` turns that into a failure after :data:`GUARD` seconds).
The same with ``threading.Event`` proves that the executor runs plain steps at
once. The limit is checked by counting the steps in flight.

Determinism: whatever order steps finish in (the second branch is made to
finish first), the checkpoints, the blobs saved there and the end are the
same; a crash at any checkpoint, continued from the blob saved there, ends as
a run without a crash; failures and cancellation leave nothing half-done.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import Field
from test_async_core import ATreeFlow, play_tree, without_go
from test_properties import choices_st, trees

import gorch
from gorch import DAG, Go, Parallel, S, Step, WaitFor
from gorch import CheckpointKind as CK
from gorch import NodeStatus as NS
from gorch import ThreadStatus as TS
from gorch import WorkflowStatus as WS
from gorch.interpreter import aresume

MAIN = gorch.MAIN_THREAD

#: Seconds a step waits for its partner before giving up (only ever reached when broken).
GUARD = 5.0


class Probe:
    """What the steps of one test did, outside the workflow's data (steps run on copies)."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}
        self.tevents: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.inflight = 0
        self.most = 0
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.idents: dict[str, int] = {}
        self.delay: dict[str, int] = {}
        self.block: set[str] = set()
        self.state: gorch.State | None = None

    def event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    def tevent(self, name: str) -> threading.Event:
        with self.lock:
            return self.tevents.setdefault(name, threading.Event())

    def enter(self, name: str) -> None:
        with self.lock:
            self.started.append(name)
            self.idents[name] = threading.get_ident()
            self.inflight += 1
            self.most = max(self.most, self.inflight)

    def leave(self, name: str) -> None:
        with self.lock:
            self.inflight -= 1
            self.finished.append(name)


P = Probe()


@pytest.fixture(autouse=True)
def _probe() -> Iterator[None]:
    global P
    P = Probe()
    yield


async def until(cond: Callable[[], bool], trips: int = 100_000) -> None:
    """Wait (through the event loop) until ``cond()`` holds; give up after ``trips`` trips.

    Not ``asyncio.wait_for``: on Python 3.11 it may swallow a cancellation that
    arrives as its inner wait completes, and cancellation is what is tested here.
    """
    for _ in range(trips):
        if cond():
            return
        await asyncio.sleep(0)
    raise TimeoutError(f"{cond} did not come true")


class Base(gorch.Workflow):
    """``log``: steps in the order their changes were applied; ``out``: one entry per step."""

    log: list[str] = Field(default_factory=list)
    out: dict[str, int] = Field(default_factory=dict)
    fail: list[str] = Field(default_factory=list)

    def meet(self, me: str, other: str) -> Callable[[], Any]:
        """An async step that finishes only if step ``other`` runs at the same time."""

        async def step() -> None:
            P.enter(me)
            P.event(me).set()
            await asyncio.wait_for(P.event(other).wait(), GUARD)
            P.leave(me)
            self.log.append(me)

        return step

    def tmeet(self, me: str, other: str) -> Callable[[], Any]:
        """:meth:`meet` for plain steps (run by an executor): with threading.Event."""

        def step() -> None:
            P.enter(me)
            P.tevent(me).set()
            if not P.tevent(other).wait(GUARD):
                raise TimeoutError(f"{me} never met {other}")
            P.leave(me)
            self.log.append(me)

        return step

    def slow(self, name: str) -> Callable[[], Any]:
        """An async step that takes ``P.delay[name]`` trips through the event loop,
        or (in ``P.block``) waits until cancelled; it raises if named in ``fail``."""

        async def step() -> None:
            P.enter(name)
            try:
                for _ in range(P.delay.get(name, 0)):
                    await asyncio.sleep(0)
                if name in P.block:
                    await asyncio.Event().wait()
            except asyncio.CancelledError:
                P.cancelled.append(name)
                raise
            P.leave(name)
            if name in self.fail:
                raise RuntimeError(f"{name} broke")
            self.log.append(name)
            self.out[name] = len(self.out)

        return step

    def plain(self, name: str) -> Callable[[], Any]:
        def step() -> None:
            P.enter(name)
            P.leave(name)
            if name in self.fail:
                raise RuntimeError(f"{name} broke")
            self.log.append(name)
            self.out[name] = len(self.out)

        return step


def new(wf: gorch.Workflow) -> gorch.State:
    return gorch.new_state("c-1", "flow")  # one name for a workflow and its plain twin


def reset_probe() -> None:
    global P
    P = Probe()


class Saves:
    """A checkpoint callback keeping every kind and blob; it raises at save ``crash_at``."""

    def __init__(self, wf: Any, state: gorch.State, crash_at: int | None = None) -> None:
        self.wf = wf
        self.state = state
        self.crash_at = crash_at
        self.kinds: list[CK] = []
        self.blobs: list[bytes] = []

    def __call__(self, kind: CK) -> None:
        self.kinds.append(kind)
        self.blobs.append(gorch.dumps(self.wf, self.state))
        if len(self.blobs) - 1 == self.crash_at:
            raise Crash


class Crash(Exception):
    """The process dies right after a save."""


# --------------------------------------------------------------------------- overlap


class Meet(Base):
    """Steps ``a`` and ``b`` of independent threads, joined in one of several ways."""

    shape: str

    def definition(self) -> gorch.Section:
        a, b = Step("a", self.meet("a", "b")), Step("b", self.meet("b", "a"))
        end = Step("end", self.end)
        if self.shape == "|":
            return S(a | b, end)
        if self.shape == "Parallel":
            return S(Parallel("p", a, b), end)
        if self.shape == "Go":
            return S(Go("ga", a), Go("gb", b), WaitFor("both", lambda: len(self.log) == 2), end)
        if self.shape == "main and Go":
            return S(Go("gb", b), a, WaitFor("both", lambda: len(self.log) == 2), end)
        assert self.shape == "DAG"
        return S(DAG("d", a, b, Step("c", self.end, after=["a", "b"])), end)

    def end(self) -> None:
        self.log.append("end" if "c" in self.log or self.shape != "DAG" else "c")


SHAPES = ["|", "Parallel", "Go", "main and Go", "DAG"]


@pytest.mark.parametrize("shape", SHAPES)
def test_independent_async_steps_run_at_the_same_time(shape: str) -> None:
    wf = Meet(shape=shape)
    state = new(wf)
    assert asyncio.run(aresume(wf, state)) is WS.FINISHED
    assert wf.log[:2] == ["a", "b"]  # applied in thread order
    assert P.most == 2
    assert sorted(P.finished) == ["a", "b"]


class Fan(Base):
    """``k`` independent async steps, as Parallel branches or as DAG nodes."""

    k: int = 6
    dag: bool = False

    def definition(self) -> gorch.Section:
        steps = [Step(f"s{i}", self.slow(f"s{i}")) for i in range(self.k)]
        if self.dag:
            return S(DAG("d", *steps), Step("end", self.plain("end")))
        return S(Parallel("p", *steps), Step("end", self.plain("end")))


@pytest.mark.parametrize("dag", [False, True], ids=["Parallel", "DAG"])
@pytest.mark.parametrize("limit", [1, 2, 3, 16])
def test_the_concurrency_limit_bounds_the_steps_in_flight(limit: int, dag: bool) -> None:
    P.delay = {f"s{i}": 5 for i in range(6)}
    wf = Fan(dag=dag, out={f"s{i}": -1 for i in range(6)})
    state = new(wf)
    saves = Saves(wf, state)
    assert asyncio.run(aresume(wf, state, saves, concurrency=limit)) is WS.FINISHED
    assert P.most == min(limit, 6)
    assert set(P.finished) == {f"s{i}" for i in range(6)} | {"end"}
    assert saves.kinds.count(CK.AFTER_STEP) == 7


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "4", None])
def test_a_concurrency_that_is_not_a_positive_int_is_refused_before_anything_runs(
    bad: Any,
) -> None:
    wf = Fan()
    state = new(wf)
    before = gorch.dumps(wf, state)
    saves = Saves(wf, state)
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(aresume(wf, state, saves, concurrency=bad))
    assert saves.kinds == []
    assert P.started == []
    assert gorch.dumps(wf, state) == before


class TMeet(Base):
    shape: str

    def definition(self) -> gorch.Section:
        a, b = Step("a", self.tmeet("a", "b")), Step("b", self.tmeet("b", "a"))
        if self.shape == "|":
            return S(a | b)
        if self.shape == "Go":
            return S(Go("ga", a), Go("gb", b), WaitFor("both", lambda: len(self.log) == 2))
        return S(DAG("d", a, b))


@pytest.mark.parametrize("shape", ["|", "Go", "DAG"])
def test_an_executor_runs_plain_steps_at_the_same_time(shape: str) -> None:
    wf = TMeet(shape=shape)
    state = new(wf)
    with ThreadPoolExecutor(4) as pool:
        assert asyncio.run(aresume(wf, state, executor=pool)) is WS.FINISHED
    assert wf.log == ["a", "b"]
    assert P.most == 2
    main = threading.get_ident()
    assert P.idents["a"] != main and P.idents["b"] != main
    assert P.idents["a"] != P.idents["b"]


def test_the_limit_bounds_steps_in_the_executor_too() -> None:
    class Pool(Base):
        def definition(self) -> gorch.Section:
            return S(Parallel("p", *(Step(f"t{i}", self.pooled(f"t{i}")) for i in range(5))))

        def pooled(self, name: str) -> Callable[[], None]:
            def step() -> None:
                P.enter(name)
                for _ in range(int(GUARD * 1000)):  # the first two wait for each other
                    if P.most >= 2:
                        break
                    P.tevent("never").wait(0.001)
                P.leave(name)
                self.out[name] = 1

            return step

    wf = Pool()
    state = new(wf)
    with ThreadPoolExecutor(5) as pool:
        assert asyncio.run(aresume(wf, state, executor=pool, concurrency=2)) is WS.FINISHED
    assert P.most == 2
    assert sorted(wf.out) == [f"t{i}" for i in range(5)]


def test_without_an_executor_plain_steps_run_in_the_loop_thread_one_at_a_time() -> None:
    class Plain(Fan):
        def definition(self) -> gorch.Section:
            return S(Parallel("p", *(Step(f"s{i}", self.plain(f"s{i}")) for i in range(self.k))))

    wf = Plain(k=4)
    state = new(wf)
    assert asyncio.run(aresume(wf, state)) is WS.FINISHED
    assert P.most == 1
    assert set(P.idents.values()) == {threading.get_ident()}
    assert wf.log == ["s0", "s1", "s2", "s3"]


# --------------------------------------------------------------------------- determinism


class Branches(Base):
    """Two branches of two async steps each (``a1 >> a2`` and ``b1 >> b2``), in one of the
    concurrent shapes; each step writes its own key of ``out`` (keys made up front)."""

    shape: str = "|"

    def definition(self) -> gorch.Section:
        s = self.slow
        a = Step("a1", s("a1")) >> Step("a2", s("a2"))
        b = Step("b1", s("b1")) >> Step("b2", s("b2"))
        end = Step("end", s("end"))
        if self.shape == "|":
            return S(Step("start", s("start")), a | b, end)
        if self.shape == "Go":
            return S(
                Step("start", s("start")),
                Go("ga", a),
                Go("gb", b),
                WaitFor("joined", lambda: len(self.log) == 5),
                end,
            )
        assert self.shape == "DAG"
        return S(
            Step("start", s("start")),
            DAG(
                "d",
                Step("a1", s("a1")),
                Step("a2", s("a2"), after=["a1"]),
                Step("b1", s("b1")),
                Step("b2", s("b2"), after=["b1"]),
            ),
            end,
        )


STEPS = ["start", "a1", "a2", "b1", "b2", "end"]


def fresh(shape: str) -> Branches:
    return Branches(shape=shape, out=dict.fromkeys(STEPS, -1))


def run_branches(shape: str, delay: dict[str, int], crash_at: int | None = None) -> Any:
    """Run to the end; with ``crash_at``, die after that save and go on from the blob."""
    P.delay = delay
    wf = fresh(shape)
    state = new(wf)
    saves = Saves(wf, state, crash_at)
    try:
        asyncio.run(aresume(wf, state, saves))
    except Crash:
        wf, state = gorch.loads(saves.blobs[-1], Branches)
        if saves.kinds[-1] is not CK.AFTER_RESUME:  # else that resume was complete
            asyncio.run(aresume(wf, state))
    assert state.status is WS.FINISHED
    return saves, gorch.dumps(wf, state)


@pytest.mark.parametrize("shape", ["|", "Go", "DAG"])
def test_the_order_steps_finish_in_changes_no_checkpoint(shape: str) -> None:
    """The b branch finishing first gives the same saves, blob by blob, as a finishing first."""
    P.delay = {"a1": 30, "a2": 30}
    b_first, b_first_end = run_branches(shape, {"a1": 30, "a2": 30})
    assert P.finished.index("b1") < P.finished.index("a1")  # b really finished first
    P.finished.clear()
    a_first, a_first_end = run_branches(shape, {"b1": 30, "b2": 30})
    assert P.finished.index("a1") < P.finished.index("b1")
    assert b_first.kinds == a_first.kinds
    assert b_first.blobs == a_first.blobs
    assert b_first_end == a_first_end


class Pair(Base):
    """Two one-step branches ``a`` and ``b`` appending to one list, as async or plain steps."""

    ASYNC: ClassVar[bool] = True
    shape: str = "|"

    def note(self, name: str) -> Callable[[], Any]:
        """Append ``name`` to the log (only: concurrent steps don't see each other's data)."""

        def plain() -> None:
            P.finished.append(name)
            self.log.append(name)

        async def step() -> None:
            for _ in range(P.delay.get(name, 0)):
                await asyncio.sleep(0)
            plain()

        return step if self.ASYNC else plain

    def definition(self) -> gorch.Section:
        step = self.note
        a, b = Step("a", step("a")), Step("b", step("b"))
        start, end = Step("start", step("start")), Step("end", step("end"))
        if self.shape == "|":
            return S(start, a | b, end)
        if self.shape == "Parallel":
            return S(start, Parallel("p", a, b), end)
        if self.shape == "Go":
            return S(
                start, Go("ga", a), Go("gb", b), WaitFor("joined", lambda: len(self.log) == 3), end
            )
        return S(start, DAG("d", a, b), end)


class PlainPair(Pair):
    ASYNC: ClassVar[bool] = False


@pytest.mark.parametrize("shape", ["|", "Parallel", "Go", "DAG"])
def test_one_step_branches_end_as_the_sync_run_when_the_second_finishes_first(shape: str) -> None:
    ref = PlainPair(shape=shape)
    ref_state = new(ref)
    ref_saves = Saves(ref, ref_state)
    gorch.resume(ref, ref_state, ref_saves)
    reset_probe()
    P.delay = {"a": 30}
    wf = Pair(shape=shape)
    state = new(wf)
    saves = Saves(wf, state)
    assert asyncio.run(aresume(wf, state, saves)) is WS.FINISHED
    assert P.finished.index("b") < P.finished.index("a")
    assert wf.log == ["start", "a", "b", "end"]
    assert saves.kinds == ref_saves.kinds
    assert gorch.dumps(wf, state) == gorch.dumps(ref, ref_state)


class Own(Branches):
    """:class:`Branches` whose steps each write only their own key: the order cannot show."""

    ASYNC: ClassVar[bool] = True

    def slow(self, name: str) -> Callable[[], Any]:
        def write() -> None:
            self.out[name] = 1
            if name != "end":
                self.log.append("x")  # one entry per step: the Go shape joins on five

        if not self.ASYNC:
            return write

        async def step() -> None:
            for _ in range(P.delay.get(name, 0)):
                await asyncio.sleep(0)
            write()

        return step


class PlainOwn(Own):
    ASYNC: ClassVar[bool] = False


@pytest.mark.parametrize("shape", ["|", "Go", "DAG"])
def test_branches_writing_their_own_data_end_as_the_sync_run(shape: str) -> None:
    ref = PlainOwn(shape=shape, out=dict.fromkeys(STEPS, 0))
    ref_state = new(ref)
    ref_saves = Saves(ref, ref_state)
    gorch.resume(ref, ref_state, ref_saves)
    reset_probe()
    P.delay = {"a1": 20, "b2": 10}
    wf = Own(shape=shape, out=dict.fromkeys(STEPS, 0))
    state = new(wf)
    saves = Saves(wf, state)
    assert asyncio.run(aresume(wf, state, saves)) is WS.FINISHED
    assert saves.kinds == ref_saves.kinds
    assert gorch.dumps(wf, state) == gorch.dumps(ref, ref_state)


@pytest.mark.parametrize("shape", ["|", "Go", "DAG"])
def test_a_crash_at_any_checkpoint_ends_as_a_run_without_one_when_branches_write_their_own_data(
    shape: str,
) -> None:
    def run(crash_at: int | None) -> tuple[int, bytes]:
        wf = Own(shape=shape, out=dict.fromkeys(STEPS, 0))
        state = new(wf)
        saves = Saves(wf, state, crash_at)
        try:
            asyncio.run(aresume(wf, state, saves))
        except Crash:
            wf, state = gorch.loads(saves.blobs[-1], Own)
            if saves.kinds[-1] is not CK.AFTER_RESUME:
                asyncio.run(aresume(wf, state))
        assert state.status is WS.FINISHED
        return len(saves.blobs), gorch.dumps(wf, state)

    P.delay = {"a1": 20, "b2": 10}
    n, clean = run(None)
    assert n >= 7
    for k in range(n):
        assert run(k)[1] == clean, f"crash after save {k}"


ROUND_ROBIN_BY_INDEX = (
    "bug: the round robin of commits (_next_flight) walks state.threads by index from the "
    "index of the thread committed last; a thread that ends is removed from that list, so "
    "the thread right after it is skipped: a | b | c applies a, c, b"
)
PLAIN_STEPS_JUMP_THE_QUEUE = (
    "bug: under aresume a plain step (or one with a plain function returning an awaitable) "
    "runs in place as soon as its thread is walked, before the async steps of earlier threads "
    "that are still in flight are committed: its change applies out of thread order, and it "
    "even runs and commits when the main thread's step in flight then ends the workflow"
)
TURN_NOT_SAVED = (
    "bug: the round robin position (_Call.turn) is not part of the saved state, so a run "
    "continued from the blob of a checkpoint commits steps in another order than the run "
    "that did not stop: (a1 >> a2) | (b1 >> b2) ends with log a1,b1,a2,b2 — or a1,a2,b1,b2 "
    "after a crash at the first save"
)


class Three(Base):
    def definition(self) -> gorch.Section:
        return S(Step("a", self.slow("a")) | Step("b", self.slow("b")) | Step("c", self.slow("c")))


def test_changes_of_one_step_branches_apply_in_thread_order() -> None:
    P.delay = {"a": 3, "b": 2, "c": 1}
    wf = Three()
    asyncio.run(aresume(wf, new(wf)))
    assert wf.log == ["a", "b", "c"]  # as gorch.resume applies them


class Mixed(Base):
    def definition(self) -> gorch.Section:
        return S(Step("a", self.slow("a")) | Step("b", self.plain("b")))


class MainEnds(Base):
    def definition(self) -> gorch.Section:
        return S(Go("g", Step("x", self.plain("x"))), Step("last", self.slow("last")))


def test_a_plain_step_waits_for_the_async_steps_of_earlier_threads() -> None:
    wf = Mixed()
    asyncio.run(aresume(wf, new(wf)))
    assert wf.log == ["a", "b"]  # as resume applies them (were a plain too)


def test_every_step_of_a_round_commits_before_the_main_thread_ends() -> None:
    """g's step is in main's last step's round: it commits, then main ends the workflow.

    A reload of the round's save has both; so must the run without a crash.
    """
    wf = MainEnds()
    state = new(wf)
    saves = Saves(wf, state)
    assert asyncio.run(aresume(wf, state, saves)) is WS.FINISHED
    assert wf.log == ["last", "x"]
    assert saves.kinds == [CK.AFTER_STEP, CK.AFTER_STEP, CK.AFTER_RESUME]
    after_round = gorch.loads(saves.blobs[1], MainEnds)
    assert after_round[0].log == ["last", "x"]
    assert asyncio.run(aresume(*after_round)) is WS.FINISHED
    assert gorch.dumps(*after_round) == gorch.dumps(wf, state)


def test_a_crash_at_any_checkpoint_ends_as_a_run_without_one() -> None:
    """Steps that append to one list: a crash must not change the order of the appends."""
    P.delay = {"a1": 3, "b1": 2}
    _, clean = run_branches("|", dict(P.delay))
    n = len(run_branches("|", dict(P.delay))[0].blobs)
    ends = [run_branches("|", dict(P.delay), k)[1] for k in range(n)]
    assert all(end == clean for end in ends), [gorch.loads(e, Branches)[0].log for e in ends]


# --------------------------------------------------------------------------- random trees


class SlowTreeFlow(ATreeFlow):
    """:class:`ATreeFlow` whose steps take ``P.delay[name]`` trips through the event loop."""

    def _node(self, node: list[Any], go: str | None) -> gorch.Stmt:
        stmt = super()._node(node, go)
        if type(stmt) is Step:
            return Step(stmt.name, delayed(stmt.name, stmt.fn))
        return stmt


def delayed(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    async def step() -> Any:
        for _ in range(P.delay.get(name, 0)):
            await asyncio.sleep(0)
        return await fn()

    return step


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    tree=trees(),
    choices=choices_st,
    delays=st.lists(st.integers(0, 6), min_size=40, max_size=40),
)
def test_random_trees_run_the_same_whatever_order_steps_finish_in(
    tree: list[Any], choices: list[int], delays: list[int]
) -> None:
    """Every checkpoint's kind and blob, and the end, do not depend on completion order."""
    P.delay = {}
    ref = asyncio.run(play_tree(SlowTreeFlow, tree, choices, "async"))
    P.delay = {f"step{i}": d for i, d in enumerate(delays)}
    got = asyncio.run(play_tree(SlowTreeFlow, tree, choices, "async"))
    assert got == ref


TREE_CRASHES = settings(
    derandomize=True,  # the same trees on every run: CI is not left to chance
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@TREE_CRASHES
@given(tree=trees(), choices=choices_st)
def test_random_trees_continued_from_every_checkpoint_end_the_same(
    tree: list[Any], choices: list[int]
) -> None:
    """One thread, async steps and handlers: dying after every save changes nothing."""
    tree = without_go(tree)
    plain = asyncio.run(play_tree(SlowTreeFlow, tree, choices, "async"))
    crashed = asyncio.run(play_tree(SlowTreeFlow, tree, choices, "async", crash=True))
    assert crashed == [r for r in plain if r[0] in ("resumed", "handled", "final")]


@TREE_CRASHES
@example(
    tree=[
        ["if", [[["hit", "a", 0, "bool"], [["step", "step1"]]]], None],
        ["go", "go2", "none", None, [["step", "step3"]]],
        ["step", "step4"],
        ["step", "step5"],
    ],
    choices=[],
)
@example(
    tree=[
        ["seq", []],
        [
            "go",
            "go1",
            "none",
            None,
            [["go", "go2", "none", None, [["select", "sel3", [["a", "none", []]], None]]]],
        ],
        ["step", "step5"],
        ["go", "go6", "none", None, []],
    ],
    choices=[],
)
@example(  # a plain step run in its turn changes the data that a WaitFor then reads
    tree=[
        [
            "select",
            "sel1",
            [
                ["a", "none", []],
                ["b", "none", []],
                [
                    "c",
                    "none",
                    [
                        ["seq", []],
                        ["go", "go2", "none", None, [["step", "step3"]]],
                        ["step", "step5"],
                    ],
                ],
            ],
            None,
        ],
        ["for", "loop6", 0, "bool", []],
        ["joinall", "joinall", "bool"],
    ],
    choices=[128],
)
@given(tree=trees(), choices=choices_st)
def test_random_trees_with_threads_continued_from_every_checkpoint_end_the_same(
    tree: list[Any], choices: list[int]
) -> None:
    """Threads, async steps: dying after every save gives the same blobs, byte for byte.

    Rounds are formed from the saved state alone (threads are walked again only
    after a round is committed), so even the wait numbers (pc) are the same.
    """
    P.delay = {}
    plain = asyncio.run(play_tree(SlowTreeFlow, tree, choices, "async"))
    crashed = asyncio.run(play_tree(SlowTreeFlow, tree, choices, "async", crash=True))
    assert crashed == [r for r in plain if r[0] in ("resumed", "handled", "final")]


# --------------------------------------------------------------------------- failures


class FailOne(Base):
    """``a`` fails; ``b`` is still running then (it waits until a's failure is recorded)."""

    dag: bool = False
    fail_fast: bool = False

    def definition(self) -> gorch.Section:
        a = Step("a", self.slow("a"))
        b = Step("b", self.after_failure("b"))
        if self.dag:
            c = Step("c", self.plain("c"), after=["b"])
            return S(DAG("d", a, b, c, fail_fast=self.fail_fast), Step("end", self.plain("end")))
        return S(a | b, Step("end", self.plain("end")))

    def after_failure(self, name: str) -> Callable[[], Any]:
        async def step() -> None:
            P.enter(name)
            try:
                if "a" in self.fail:
                    await until(a_failed)
            except asyncio.CancelledError:
                P.cancelled.append(name)
                raise
            P.leave(name)
            self.log.append(name)

        return step


def a_failed() -> bool:
    state = P.state
    assert state is not None
    t = state.thread("a|b.a") or state.thread("d.a")
    main = state.thread(MAIN)
    return (t is not None and t.error != "") or bool(main and main.node_errors)


def test_a_failing_branch_lets_its_siblings_running_steps_finish_then_raises() -> None:
    wf = FailOne(fail=["a"])
    state = P.state = new(wf)
    saves = Saves(wf, state)
    with pytest.raises(gorch.ParallelFailed) as info:
        asyncio.run(aresume(wf, state, saves))
    assert (info.value.step, info.value.failed) == ("a|b", {"a": "RuntimeError: a broke"})
    assert P.cancelled == []
    assert wf.log == ["b"]  # b finished after a had failed, and was recorded
    assert saves.kinds == [CK.AFTER_STEP, CK.AFTER_CONDITION]  # b's; the join
    assert gorch.loads(saves.blobs[-1], FailOne)[0].log == ["b"]
    assert state.thread("a|b.a") is None and state.thread("a|b.b") is None  # both over
    main = state.thread(MAIN)
    assert main is not None and main.nodes == {"a": NS.FAILED}
    wf.fail = []
    assert asyncio.run(aresume(wf, state)) is WS.FINISHED
    assert wf.log == ["b", "a", "end"]  # b did not run again


def test_without_fail_fast_a_dag_node_failing_lets_running_nodes_finish() -> None:
    wf = FailOne(fail=["a"], dag=True)
    state = P.state = new(wf)
    with pytest.raises(gorch.DAGFailed) as info:
        asyncio.run(aresume(wf, state))
    assert P.cancelled == []
    assert wf.log == ["b", "c"]
    assert state.threads[0].nodes == {"a": NS.FAILED, "b": NS.COMPLETED, "c": NS.COMPLETED}
    assert "a" in str(info.value)


def test_with_fail_fast_a_failing_node_cancels_the_running_ones_which_count_as_skipped() -> None:
    wf = FailOne(fail=["a"], dag=True, fail_fast=True)
    state = P.state = new(wf)
    saves = Saves(wf, state)
    with pytest.raises(gorch.DAGFailed) as info:
        asyncio.run(aresume(wf, state, saves))
    assert P.cancelled == ["b"]
    assert "b" not in P.finished
    assert wf.log == []  # nothing of b was kept
    assert saves.kinds == []
    main = state.thread(MAIN)
    assert main is not None
    assert main.nodes == {"a": NS.FAILED, "b": NS.SKIPPED, "c": NS.SKIPPED}
    assert info.value.failed.keys() == {"a"}
    assert info.value.skipped == ["b", "c"]
    assert [t.id for t in state.threads] == [MAIN]
    # the retry runs the failed and the skipped nodes
    wf.fail = []
    assert asyncio.run(aresume(wf, state)) is WS.FINISHED
    assert wf.log == ["a", "b", "c", "end"]


class SyncFails(Base):
    def definition(self) -> gorch.Section:
        return S(
            Step("a", self.slow("a")) | Step("b", self.plain("b")), Step("end", self.plain("end"))
        )


def test_a_plain_step_raising_inside_aresume_while_async_steps_run() -> None:
    P.delay = {"a": 10}
    wf = SyncFails(fail=["b"])
    state = new(wf)
    with pytest.raises(gorch.ParallelFailed) as info:
        asyncio.run(aresume(wf, state))
    assert (info.value.step, info.value.thread_id) == ("a|b", MAIN)
    assert info.value.failed == {"b": "RuntimeError: b broke"}
    assert wf.log == ["a"]  # the async sibling finished and was recorded
    assert state.thread("a|b.b") is None
    wf.fail = []
    assert asyncio.run(aresume(wf, state)) is WS.FINISHED
    assert wf.log == ["a", "b", "end"]


# --------------------------------------------------------------------------- cancellation


async def cancel_when(task: asyncio.Task[Any], cond: Callable[[], bool]) -> None:
    await until(cond)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class Blocked(Base):
    def definition(self) -> gorch.Section:
        s = self.slow
        return S(
            Step("start", s("start")), Step("a", s("a")) | Step("b", s("b")), Step("end", s("end"))
        )


class Solo(Base):
    def definition(self) -> gorch.Section:
        s = self.slow
        return S(Step("start", s("start")), Step("a", s("a")), Step("end", s("end")))


def uncancelled_end(cls: type[Base]) -> bytes:
    """The end of a run that nobody cancels (the probe is reset after it)."""
    wf = cls()
    state = new(wf)
    asyncio.run(aresume(wf, state))
    reset_probe()
    return gorch.dumps(wf, state)


@pytest.mark.parametrize("from_blob", [False, True], ids=["in memory", "from the last save"])
def test_cancelling_aresume_cancels_the_steps_in_flight_and_keeps_none_of_their_changes(
    from_blob: bool,
) -> None:
    clean = uncancelled_end(Blocked)
    P.block = {"a", "b"}
    wf = Blocked()
    state = new(wf)
    saves = Saves(wf, state)

    async def go() -> None:
        task = asyncio.create_task(aresume(wf, state, saves))
        await cancel_when(task, lambda: {"a", "b"} <= set(P.started))

    asyncio.run(go())
    assert sorted(P.cancelled) == ["a", "b"]  # no step goes on unseen
    assert saves.kinds == [CK.AFTER_STEP]
    saved_wf, _ = gorch.loads(saves.blobs[-1], Blocked)
    assert wf == saved_wf  # the data as at the last checkpoint
    assert [(t.id, t.status, t.cur_step) for t in state.threads[1:]] == [
        ("a|b.a", TS.EXECUTING, "a"),
        ("a|b.b", TS.EXECUTING, "b"),
    ]
    P.block = set()
    if from_blob:
        wf, state = gorch.loads(saves.blobs[-1], Blocked)
    assert asyncio.run(aresume(wf, state)) is WS.FINISHED
    assert gorch.dumps(wf, state) == clean


def cancel_solo() -> tuple[Solo, gorch.State, Saves]:
    P.block = {"a"}
    wf = Solo()
    state = new(wf)
    saves = Saves(wf, state)

    async def go() -> None:
        task = asyncio.create_task(aresume(wf, state, saves))
        await cancel_when(task, lambda: "a" in P.started)

    asyncio.run(go())
    P.block = set()
    assert P.cancelled == ["a"]
    return wf, state, saves


def test_cancelling_a_step_awaited_in_place_leaves_its_thread_on_it_resumable_from_the_save() -> (
    None
):
    clean = uncancelled_end(Solo)
    wf, state, saves = cancel_solo()
    t = state.thread(MAIN)
    assert t is not None and (t.status, t.cur_step) == (TS.EXECUTING, "a")
    wf, state = gorch.loads(saves.blobs[-1], Solo)
    assert asyncio.run(aresume(wf, state)) is WS.FINISHED
    assert gorch.dumps(wf, state) == clean


def test_cancelling_a_step_awaited_in_place_keeps_none_of_its_changes() -> None:
    class Writes(Solo):
        def slow(self, name: str) -> Callable[[], Any]:
            step = super().slow(name)

            async def write_first() -> None:
                self.out[f"{name} began"] = 1
                await step()

            return write_first

    P.block = {"a"}
    wf = Writes()
    state = new(wf)
    saves = Saves(wf, state)

    async def go() -> None:
        task = asyncio.create_task(aresume(wf, state, saves))
        await cancel_when(task, lambda: "a" in P.started)

    asyncio.run(go())
    assert wf == gorch.loads(saves.blobs[-1], Writes)[0]


# --------------------------------------------------------------------------- clashing changes


class Counters(gorch.Workflow):
    """Three concurrent branches: two bump one shared counter, all append to one list."""

    done: int = 0
    own: dict[str, int] = Field(default_factory=dict)
    log: list[str] = Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(Parallel("p", S(Step("x", self.bump("x"))), S(Step("y", self.bump("y")))))

    def bump(self, name: str) -> Callable[[], Any]:
        async def step() -> None:
            await asyncio.sleep(0)
            self.done += 1
            self.log.append(name)

        return step


def test_two_concurrent_steps_changing_one_field_fail_the_later_and_lose_nothing() -> None:
    wf = Counters()
    state = new(wf)
    saved: list[bytes] = []
    with pytest.raises(gorch.ParallelFailed) as info:
        asyncio.run(aresume(wf, state, lambda kind: saved.append(gorch.dumps(wf, state))))
    assert list(info.value.failed) == ["y"]  # the branch that committed second
    error = info.value.failed["y"]
    assert error.startswith("ConcurrentChange: ")
    assert "'done'" in error and "'y' of thread 'p.y'" in error and "'x' of thread 'p.x'" in error
    assert "concurrency=1" in error
    assert (wf.done, wf.log) == (1, ["x"])  # x's changes applied; nothing of y's
    assert state.thread("p.y") is None
    # The retry runs y alone, on the data with x's change: no update is lost.
    assert asyncio.run(aresume(wf, state)) is WS.FINISHED
    assert (wf.done, wf.log) == (2, ["x", "y"])


GAP_TREE = [
    ["switch", [[["hit", "a", 0, "bool"], [["go", "go1", "none", None, []]]]], None],
    ["step", "step2"],
    ["select", "sel3", [["a", "none", []]], None],
    [
        "switch",
        [
            [
                ["hit", "a", 0, "bool"],
                [
                    ["step", "step4"],
                    ["go", "go5", "none", None, []],
                    [
                        "select",
                        "sel6",
                        [
                            ["a", "none", []],
                            [
                                "b",
                                "none",
                                [
                                    [
                                        "go",
                                        "go7",
                                        "none",
                                        None,
                                        [["step", "step8"], ["step", "step9"], ["return", "ret10"]],
                                    ],
                                    ["step", "step11"],
                                ],
                            ],
                            ["c", "none", []],
                        ],
                        None,
                    ],
                ],
            ],
            [["hit", "a", 0, "bool"], [["return", "ret12"]]],
        ],
        None,
    ],
    ["go", "go13", "none", "wg", []],
]


def test_a_crash_does_not_reorder_plain_steps_of_two_go_threads() -> None:
    """Go13 is spawned by a plain step of a round: it first walks after that round, as on reload."""
    P.delay = {}
    plain = asyncio.run(play_tree(SlowTreeFlow, GAP_TREE, [0, 1], "async"))
    crashed = asyncio.run(play_tree(SlowTreeFlow, GAP_TREE, [0, 1], "async", crash=True))
    assert crashed == [r for r in plain if r[0] in ("resumed", "handled", "final")]
