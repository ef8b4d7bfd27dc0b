"""Step results (issue: seed parity): kept with the state, read by later steps."""

from __future__ import annotations

import asyncio
from typing import Any

import pydantic
import pytest

import gorch
from gorch import DAG, S, Step
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


def test_a_result_that_cannot_be_kept_fails_its_step_with_a_clear_error() -> None:
    err, state = _failure(Returns(value=None).model_copy(update={"value": object()}))
    cause = err.__cause__
    assert isinstance(cause, gorch.StepResultError)
    assert err.step == "make" and "cannot be kept with the state" in str(cause)
    assert "Return JSON-able data" in str(cause)
    t = state.thread(gorch.MAIN_THREAD)
    assert t is not None and t.cur_step == "make" and t.attempts == 1
    assert state.results == {}


def test_a_result_over_the_limit_fails_its_step() -> None:
    err, _ = _failure(Returns(value="x" * (MAX_RESULT_BYTES + 1)))
    assert isinstance(err.__cause__, gorch.StepResultError)
    assert f"over the limit of {MAX_RESULT_BYTES}" in str(err.__cause__)


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
