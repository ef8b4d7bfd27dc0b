"""Step results (issue: seed parity): kept with the state, read by later steps."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pydantic
import pytest

import gorch
from gorch import DAG, For, Go, S, Step, WaitFor
from gorch.results import MAX_RESULT_BYTES

WS = gorch.WorkflowStatus


class Order(pydantic.BaseModel):
    id: int
    total: float


class Diamond(gorch.Workflow):
    """Graflow's diamond: extract >> (transform_a | transform_b) >> load."""

    loaded: list[Any] = pydantic.Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            Step("extract", self.extract),
            Step("transform_a", self.transform_a) | Step("transform_b", self.transform_b),
            Step("load", self.load),
        )

    def extract(self) -> dict[str, Any]:
        return {"id": 7, "total": 2.5}

    def transform_a(self, data: dict[str, Any]) -> int:  # the step before the Parallel
        return int(data["id"]) * 2

    def transform_b(self, data: Order) -> float:  # validated as its annotation
        return data.total * 2

    def load(self, transform_a: int, transform_b: float) -> None:  # by name
        self.loaded.append([transform_a, transform_b])


def run(wf: gorch.Workflow, state: gorch.State | None = None) -> gorch.State:
    state = state or gorch.new_state("r-1", "flow")
    assert gorch.resume(wf, state) is WS.FINISHED
    return state


def test_the_diamond_passes_results_by_position_name_and_type() -> None:
    wf = Diamond()
    state = run(wf)
    assert wf.loaded == [[14, 5.0]]
    assert state.results == {
        "extract": {"id": 7, "total": 2.5},
        "transform_a": 14,
        "transform_b": 5.0,
    }


def test_the_async_api_passes_the_same_results() -> None:
    wf = Diamond()
    state = gorch.new_state("r-1", "flow")
    assert asyncio.run(gorch.aresume(wf, state)) is WS.FINISHED
    assert wf.loaded == [[14, 5.0]]


class AsyncBranches(gorch.Workflow):
    got: list[Any] = pydantic.Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            Step("a", self.slow("a", 3)) | Step("b", self.slow("b", 1)),
            Step("join", self.join),
        )

    def slow(self, name: str, trips: int) -> Any:
        async def step() -> str:
            for _ in range(trips):
                await asyncio.sleep(0)
            return name.upper()

        return step

    def join(self, a: str, b: str, ctx: gorch.StepContext) -> None:
        self.got.append([a, b, dict(ctx.results)])


def test_concurrent_async_steps_keep_their_results_whatever_order_they_finish_in() -> None:
    wf = AsyncBranches()
    state = gorch.new_state("r-1", "flow")
    saved: list[bytes] = []
    assert asyncio.run(gorch.aresume(wf, state, lambda k: saved.append(gorch.dumps(wf, state))))
    assert wf.got == [["A", "B", {"a": "A", "b": "B"}]]
    # A reload from the save after the round reads the same results.
    wf2, state2 = gorch.loads(saved[0], AsyncBranches)
    assert state2.results == {"a": "A", "b": "B"}
    assert asyncio.run(gorch.aresume(wf2, state2)) is WS.FINISHED
    assert gorch.dumps(wf2, state2) == gorch.dumps(wf, state)


class Chain(gorch.Workflow):
    seen: list[Any] = pydantic.Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return Step("first", self.first) >> Step("second", self.second)

    def first(self) -> list[int]:
        return [1, 2]

    def second(self, values: list[int], ctx: gorch.StepContext) -> None:
        self.seen.append(
            [values, ctx.workflow_id, ctx.step, ctx.attempt, ctx.thread_id, ctx.result("first")]
        )


def test_a_chain_passes_the_result_on_and_the_context_tells_where_the_step_is() -> None:
    wf = Chain()
    run(wf, gorch.new_state("c-9", "chain"))
    assert wf.seen == [[[1, 2], "c-9", "second", 1, gorch.MAIN_THREAD, [1, 2]]]


class Nodes(gorch.Workflow):
    seen: list[Any] = pydantic.Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(
            DAG(
                "d",
                Step("fetch", lambda: 5),
                Step("double", self.double, after=["fetch"]),
                Step("both", self.both, after=["fetch", "double"]),
            )
        )

    def double(self, n: int) -> int:
        return n * 2

    def both(self, fetch: int, double: int) -> None:
        self.seen.append([fetch, double])


def test_a_dag_node_with_one_dependency_takes_its_result() -> None:
    wf = Nodes()
    run(wf)
    assert wf.seen == [[5, 10]]


def test_results_survive_a_reload_byte_for_byte() -> None:
    wf = Diamond()
    state = run(wf)
    blob = gorch.dumps(wf, state)
    wf2, state2 = gorch.loads(blob, Diamond)
    assert state2.results == state.results
    assert gorch.dumps(wf2, state2) == blob


class Returns(gorch.Workflow):
    value: Any = None
    n: int = 0

    def definition(self) -> gorch.Section:
        return S(Step("make", self.make), Step("read", self.read))

    def make(self) -> Any:
        return self.value

    def read(self, ctx: gorch.StepContext) -> None:
        self.n += 1
        ctx.result("make")


def _failure(wf: gorch.Workflow) -> tuple[gorch.StepFailed, gorch.State]:
    state = gorch.new_state("r-1", "flow")
    with pytest.raises(gorch.StepFailed) as info:
        gorch.resume(wf, state)
    return info.value, state


def test_a_result_that_cannot_be_kept_is_dropped_with_a_warning_and_its_reader_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The step's effects happened: failing it would repeat them. Its reader fails instead."""
    wf = Returns(value=None).model_copy(update={"value": object()})
    err, state = _failure(wf)
    assert err.step == "read"  # "make" completed
    assert "the result of step 'make' (object) is not kept with the state" in caplog.text
    assert "returned what cannot be kept: see the log" in str(err.__cause__)
    assert state.results == {}


def test_a_result_over_the_limit_is_dropped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    err, _ = _failure(Returns(value="x" * (MAX_RESULT_BYTES + 1)))
    assert err.step == "read"
    assert f"over the limit of {MAX_RESULT_BYTES}" in caplog.text


def test_reading_a_result_that_is_not_there_says_which_are() -> None:
    wf = Returns(value=None)  # make returns None: nothing is kept
    err, _ = _failure(wf)
    assert err.step == "read"
    assert "no result of step 'make'" in str(err.__cause__)
    assert "results here: none" in str(err.__cause__)


def test_a_step_returning_none_drops_its_earlier_result() -> None:
    class Loop(gorch.Workflow):
        i: int = 0

        def definition(self) -> gorch.Section:
            return S(gorch.For("l", self.i < 2, Step("s", self.s)))

        def s(self) -> int | None:
            self.i += 1
            return 1 if self.i == 1 else None

    wf = Loop()
    state = run(wf)
    assert state.results == {}


class Loose(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Step("only", self.only))

    def only(self, data: int) -> None:
        return None


def test_a_parameter_with_nothing_to_take_is_a_clear_error() -> None:
    err, _ = _failure(Loose())
    assert "parameter 'data' names no step" in str(err.__cause__)


def test_a_result_that_does_not_validate_as_the_parameter_is_a_clear_error() -> None:
    class Mismatch(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(Step("make", lambda: "abc"), Step("use", self.use))

        def use(self, make: int) -> None:
            return None

    err, _ = _failure(Mismatch())
    assert "the result of 'make' does not validate as parameter 'make'" in str(err.__cause__)


def test_a_blob_with_a_bad_results_map_is_refused() -> None:
    import msgpack

    wf = Diamond()
    state = run(wf)
    obj = msgpack.unpackb(gorch.dumps(wf, state), raw=False)
    for bad in ({}, {"a": None}, {"a": {1: 2}}, "x"):
        obj[2][6] = bad
        with pytest.raises(gorch.SerializationError):
            gorch.loads(msgpack.packb(obj, use_bin_type=True), Diamond)


def test_the_test_kit_sees_results_too() -> None:
    from gorch.testing import WorkflowEnv

    env = WorkflowEnv({"diamond": Diamond})
    inst = env.start("diamond", "d-1")
    assert inst.data.loaded == [[14, 5.0]]  # type: ignore[attr-defined]
    assert inst.state.results["transform_a"] == 14


class Mutates(gorch.Workflow):
    seen: list[Any] = pydantic.Field(default_factory=list)
    fail: bool = True

    def definition(self) -> gorch.Section:
        return S(Step("a", lambda: [1]), Step("b", self.b), Step("c", self.c))

    def b(self, data: list[int], ctx: gorch.StepContext) -> None:
        data.append(2)
        ctx.results["a"].append(3)
        if self.fail:
            raise RuntimeError("b broke")

    def c(self, a: list[int]) -> None:
        self.seen.append(a)


def test_a_step_changing_its_arguments_changes_no_stored_result() -> None:
    wf = Mutates()
    state = gorch.new_state("m-1", "m")
    with pytest.raises(gorch.StepFailed):
        gorch.resume(wf, state)
    assert state.results == {"a": [1]}
    wf.fail = False
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.seen == [[1]] and state.results == {"a": [1]}


class Workers(gorch.Workflow):
    """One Go in a loop starts two threads running the same steps: each reads its own."""

    n: int = 0
    got: dict[str, Any] = pydantic.Field(default_factory=dict)

    def definition(self) -> gorch.Section:
        return S(
            Step("seed", lambda: 10),
            For(
                "spawn",
                self.n < 2,
                Go("worker", Step("w", self.work), Step("use", self.use), id=self.worker_id),
                Step("next", self.next),
            ),
            WaitFor("both", lambda: len(self.got) == 2),
        )

    def worker_id(self) -> str:
        return f"w{self.n}"

    def next(self) -> None:
        self.n += 1

    async def work(self, seed: int, ctx: gorch.StepContext) -> int:  # main's result
        i = int(ctx.thread_id[1:])
        for _ in range(3 - i):
            await asyncio.sleep(0)
        return seed + i

    def use(self, w: int, ctx: gorch.StepContext) -> None:
        self.got[ctx.thread_id] = w


@pytest.mark.parametrize("api", ["sync", "async"])
def test_threads_running_the_same_steps_keep_their_results_apart(api: str) -> None:
    class Plain(Workers):
        def work(self, seed: int, ctx: gorch.StepContext) -> int:  # type: ignore[override]
            return seed + int(ctx.thread_id[1:])

    wf = Workers() if api == "async" else Plain()
    state = gorch.new_state("w-1", "w")
    if api == "async":
        asyncio.run(gorch.aresume(wf, state))
    else:
        gorch.resume(wf, state)
    assert wf.got == {"w0": 10, "w1": 11}
    assert state.results == {"seed": 10, "w0/w": 10, "w1/w": 11}


class Snapshot(gorch.Workflow):
    seen: list[Any] = pydantic.Field(default_factory=list)

    def definition(self) -> gorch.Section:
        return S(Step("a", self.a) | Step("b", self.b))

    async def a(self) -> str:
        return "A"

    async def b(self, ctx: gorch.StepContext) -> None:
        before = dict(ctx.results)
        for _ in range(5):
            await asyncio.sleep(0)  # a commits meanwhile
        self.seen.append([before, dict(ctx.results)])


def test_a_concurrent_step_reads_the_results_as_its_round_started() -> None:
    wf = Snapshot()
    asyncio.run(gorch.aresume(wf, gorch.new_state("s-1", "s")))
    assert wf.seen == [[{}, {}]]


def test_a_wrapped_step_function_gets_its_arguments_under_both_apis() -> None:
    def logged(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return wrapper

    class Wrapped(gorch.Workflow):
        got: list[int] = pydantic.Field(default_factory=list)

        def definition(self) -> gorch.Section:
            return S(Step("a", lambda: 4), Step("b", logged(self.b)))

        def b(self, a: int) -> None:
            self.got.append(a)

    wf = Wrapped()
    gorch.resume(wf, gorch.new_state("x", "x"))
    wf2 = Wrapped()
    asyncio.run(gorch.aresume(wf2, gorch.new_state("x", "x")))
    assert wf.got == wf2.got == [4]


def test_a_partial_keeps_the_annotations_of_its_function() -> None:
    def part(data: Order, factor: int) -> float:
        return data.total * factor

    class Partial(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(
                Step("a", lambda: {"id": 1, "total": 2.0}),
                Step("b", functools.partial(part, factor=3)),
            )

    state = gorch.new_state("p", "p")
    gorch.resume(Partial(), state)
    assert state.results["b"] == 6.0


def test_a_parameter_with_a_default_takes_the_step_before_when_it_has_a_result() -> None:
    class Defaults(gorch.Workflow):
        got: list[int] = pydantic.Field(default_factory=list)

        def definition(self) -> gorch.Section:
            return S(
                Step("none", lambda: None),
                Step("b", self.b),
                Step("two", lambda: 2),
                Step("c", self.b),
            )

        def b(self, data: int = 0) -> None:
            self.got.append(data)

    wf = Defaults()
    gorch.resume(wf, gorch.new_state("d", "d"))
    assert wf.got == [0, 2]  # "none" kept nothing: the default; then "two"'s result


def test_a_build_that_swaps_in_a_function_taking_results_is_bound_before_it_runs() -> None:
    """The class was indexed with a plain function at that place; a later build's takes one."""

    class Swaps(gorch.Workflow):
        i: int = 0
        got: list[Any] = pydantic.Field(default_factory=list)

        def definition(self) -> gorch.Section:
            return S(
                Step("a", lambda: 5),
                For("l", self.i < 2, Step("b", self.takes if self.i else self.plain)),
            )

        def plain(self) -> None:
            self.got.append("plain")
            self.i += 1

        def takes(self, a: int) -> None:
            self.got.append(a)
            self.i += 1

    wf = Swaps()
    assert gorch.resume(wf, gorch.new_state("s", "s")) is WS.FINISHED
    assert wf.got == ["plain", 5]
