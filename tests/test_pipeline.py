"""gorch.pipeline: tasks wired with >>, | and edges, run as a gorch DAG."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest

import gorch
from gorch.graph import mermaid
from gorch.pipeline import Flow, Pipeline, PipelineError, PipelineWorkflow, Task, resume, task

RAN: list[str] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    RAN.clear()


class Params(pydantic.BaseModel):
    value: int


@task
def source(input: Params) -> int:
    RAN.append("source")
    return input.value


@task
def double(source: int) -> int:  # by name
    RAN.append("double")
    return source * 2


@task
def triple(x: int) -> int:  # the single task it comes after
    RAN.append("triple")
    return x * 3


@task
def combine(double: int, triple: int, ctx: gorch.StepContext) -> dict[str, Any]:
    RAN.append("combine")
    return {"sum": double + triple, "step": ctx.step, "seen": sorted(ctx.results)}


@task
def a() -> str:
    RAN.append("a")
    return "A"


@task
def b() -> None:
    RAN.append("b")


@task
def c() -> None:
    RAN.append("c")


@task
def d() -> None:
    RAN.append("d")


def diamond() -> Pipeline:
    with Pipeline("diamond") as p:
        source >> (double | triple) >> combine
    return p


def blob(wf: gorch.Workflow, state: gorch.State) -> bytes:
    return gorch.dumps(wf, state)


# --------------------------------------------------------------------------- building


def test_operators_in_a_with_block_record_edges_outside_they_build_a_flow() -> None:
    p = diamond()
    expected = [
        ("source", "double"),
        ("source", "triple"),
        ("double", "combine"),
        ("triple", "combine"),
    ]
    assert p.edges == expected
    flow = source >> (double | triple) >> combine  # no pipeline open: only a value
    assert isinstance(flow, Flow)
    assert flow.edges == expected
    assert (flow.heads, flow.tails) == (("source",), ("combine",))
    assert Pipeline("diamond", flow).edges == expected
    assert Pipeline("x").add(flow).tasks == ("source", "double", "triple", "combine")
    assert p.tasks == ("double", "triple", "source", "combine")  # as the block met them


def test_separately_declared_edges_over_shared_tasks_add_up() -> None:
    with Pipeline("stages") as p:
        (a | b) >> c
        c >> d
        p.add(double)
        p.edge(c, "double")
    assert p.edges == [("a", "c"), ("b", "c"), ("c", "d"), ("c", "double")]
    assert p.tasks == ("a", "b", "c", "d", "double")


def test_a_task_is_its_function_and_is_shared_between_pipelines() -> None:
    assert isinstance(double, Task) and double.name == "double"
    assert double(4) == 8  # calling the task calls the function
    RAN.clear()
    one = Pipeline("one", a >> b)
    two = Pipeline("two", b >> a)  # the same tasks, the other way round
    assert (one.edges, two.edges) == ([("a", "b")], [("b", "a")])
    one.execute()
    two.execute()
    assert RAN == ["a", "b", "b", "a"]


def test_a_task_decorated_inside_the_block_joins_the_pipeline() -> None:
    with Pipeline("lone") as p:

        @task
        def alone() -> None:
            RAN.append("alone")

    assert p.tasks == ("alone",)
    assert p.execute().status is gorch.WorkflowStatus.FINISHED
    assert RAN == ["alone"]


def test_each_with_block_records_into_its_own_pipeline_only() -> None:
    with Pipeline("outer") as outer:
        a >> b
        with Pipeline("inner") as inner:
            c >> d
        b >> c
    assert outer.edges == [("a", "b"), ("b", "c")]
    assert inner.edges == [("c", "d")]
    with pytest.raises(RuntimeError), Pipeline("broken") as broken:
        a >> b
        raise RuntimeError
    c >> d  # the block is closed: recorded nowhere
    assert broken.edges == [("a", "b")]


def test_the_workflow_class_is_built_once_and_keeps_the_pipeline_as_it_was() -> None:
    p = Pipeline("abc", a >> b)
    cls = p.workflow()
    assert p.workflow() is cls
    assert issubclass(cls, PipelineWorkflow) and issubclass(cls, gorch.Workflow)
    assert cls.__name__ == "Abc"
    p.add(c)
    assert p.workflow() is not cls
    assert repr(cls().definition()) == "S(DAG('abc', ['a', 'b']))"


def test_the_diagram_shows_the_dag() -> None:
    text = mermaid(diamond().workflow(input=Params), data={"value": 1})
    for name in ("input", "dag: diamond", "source", "double", "triple", "combine"):
        assert name in text


# --------------------------------------------------------------------------- running


def test_results_flow_by_name_by_the_single_dependency_and_through_ctx() -> None:
    run = diamond().execute(Params(value=5))
    assert run.status is gorch.WorkflowStatus.FINISHED
    assert run.steps == 4
    assert run.results == {
        "source": 5,
        "double": 10,
        "triple": 15,
        "combine": {"sum": 25, "step": "combine", "seen": ["double", "input", "source", "triple"]},
    }
    assert run.result(combine)["sum"] == 25
    with pytest.raises(PipelineError, match="no task 'nope'"):
        run.result("nope")


def test_the_input_model_is_the_start_input_and_a_bad_start_changes_nothing(
    tmp_path: Path,
) -> None:
    cls = diamond().workflow(input=Params)
    assert cls.start_input == ("value",)
    engine = gorch.Engine(f"sqlite:///{tmp_path}/g.db", workflows={"diamond": cls})
    with pytest.raises(gorch.InvalidWorkflowData):
        engine.start("diamond", "d-1", {"value": "not a number"})
    with pytest.raises(gorch.InvalidWorkflowData, match="no task 'nowhere' to start at"):
        engine.start("diamond", "d-1", {"value": 5, "start_at": "nowhere"})
    with pytest.raises(gorch.WorkflowNotFound):
        engine.get("d-1")
    assert RAN == []


def test_the_engine_runs_persists_and_resumes_it_across_a_restart(tmp_path: Path) -> None:
    down = {"on": True}

    @task
    def flaky(source: int) -> int:
        RAN.append("flaky")
        if down["on"]:
            raise ConnectionError("down")
        return source + 1

    @task
    def last(flaky: int, double: int) -> int:
        RAN.append("last")
        return flaky + double

    with Pipeline("restart") as p:
        source >> (double | flaky) >> last
    cls = p.workflow(input=Params)
    url = f"sqlite:///{tmp_path}/g.db"
    snap = gorch.Engine(url, workflows={"restart": cls}).start("restart", "r-1", {"value": 2})
    assert snap.status.value == "failed"
    assert "flaky" in snap.error and "skipped: last" in snap.error
    assert RAN == ["source", "double", "flaky"]

    down["on"] = False
    engine = gorch.Engine(url, workflows={"restart": cls})  # a new process
    assert engine.retry("r-1").status.value == "finished"
    assert RAN == ["source", "double", "flaky", "flaky", "last"]
    _, state = gorch.loads(engine.store.load("r-1").blob, cls)
    assert state.results["last"] == 3 + 4


def test_plain_resume_and_a_msgpack_round_trip_mid_way() -> None:
    cls = diamond().workflow(input=Params)
    wf, state = cls(value=3), gorch.new_state("d-2", "diamond")
    assert resume(wf, state, max_steps=2) is gorch.WorkflowStatus.RESUMING
    assert RAN == ["source", "double"]
    saved = blob(wf, state)
    wf2, state2 = gorch.loads(saved, cls)
    assert blob(wf2, state2) == saved  # byte-stable
    assert gorch.resume(wf2, state2) is gorch.WorkflowStatus.FINISHED
    assert RAN == ["source", "double", "triple", "combine"]
    assert state2.results["combine"]["sum"] == 15


# --------------------------------------------------------------------------- start at


def test_start_at_runs_the_task_and_what_comes_after_it() -> None:
    with Pipeline("chain") as p:
        a >> b >> c >> d
    run = p.execute(start_at=c)
    assert run.status is gorch.WorkflowStatus.FINISHED
    assert RAN == ["c", "d"]
    assert p.workflow(start_at="b")().start_at == "b"
    RAN.clear()
    p.workflow(start_at="b")().definition()  # builds the shape; runs nothing
    assert RAN == []


def test_a_skipped_task_has_no_result_a_default_or_a_clear_failure() -> None:
    @task
    def reads_a(a: str = "no a") -> str:
        return a

    @task
    def needs_a(a: str) -> str:
        return a

    ok = Pipeline("ok", a >> reads_a).execute(start_at="reads_a")
    assert ok.results == {"reads_a": "no a"}
    with pytest.raises(gorch.DAGFailed) as e:
        Pipeline("strict", a >> needs_a).execute(start_at="needs_a")
    assert "no result of step 'a'" in e.value.failed["needs_a"]
    assert RAN == []


def test_start_at_an_unknown_task_is_refused_before_anything_runs() -> None:
    p = Pipeline("abc", a >> b)
    with pytest.raises(PipelineError, match="no task 'z' to start at; its tasks: a, b"):
        p.workflow(start_at="z")
    with pytest.raises(PipelineError, match="no task 'c'"):
        p.execute(start_at=c)
    with pytest.raises(PipelineError, match="start_at names a task"):
        p.execute(start_at=3)  # type: ignore[arg-type]
    assert RAN == []


# --------------------------------------------------------------------------- step budget


def test_a_step_budget_stops_the_call_and_the_instance_goes_on_later() -> None:
    with Pipeline("chain") as p:
        a >> b >> c >> d
    run = p.execute(max_steps=1)
    assert (run.status, run.steps, RAN) == (gorch.WorkflowStatus.RESUMING, 1, ["a"])
    run.resume(max_steps=2)
    assert (run.status, run.steps, RAN) == (gorch.WorkflowStatus.RESUMING, 2, ["a", "b", "c"])
    run.resume()
    assert (run.status, run.steps, RAN) == (gorch.WorkflowStatus.FINISHED, 1, ["a", "b", "c", "d"])


def test_a_budget_that_is_just_enough_finishes_and_the_input_step_is_not_counted() -> None:
    run = diamond().execute(Params(value=1), max_steps=4)
    assert (run.status, run.steps) == (gorch.WorkflowStatus.FINISHED, 4)
    RAN.clear()
    run = diamond().execute(Params(value=1), max_steps=10)
    assert (run.status, run.steps) == (gorch.WorkflowStatus.FINISHED, 4)


def test_saving_at_every_checkpoint_saves_where_the_budget_stopped() -> None:
    with Pipeline("chain") as p:
        a >> b >> c
    wf, state = p.workflow()(), gorch.new_state("c-1", "chain")
    saves: list[bytes] = []
    resume(wf, state, lambda kind: saves.append(blob(wf, state)), max_steps=2)
    assert saves[-1] == blob(wf, state)
    wf, state = gorch.loads(saves[-1], type(wf))
    assert resume(wf, state) is gorch.WorkflowStatus.FINISHED
    assert RAN == ["a", "b", "c"]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3"])
def test_a_budget_below_one_is_refused_and_changes_nothing(bad: Any) -> None:
    p = Pipeline("chain", a >> b)
    with pytest.raises(PipelineError, match="max_steps is how many tasks"):
        p.execute(max_steps=bad)
    wf, state = p.workflow()(), gorch.new_state("c-1", "chain")
    before = blob(wf, state)
    with pytest.raises(PipelineError, match="max_steps"):
        resume(wf, state, max_steps=bad)
    run = p.execute(max_steps=1)
    with pytest.raises(PipelineError, match="max_steps"):
        run.resume(max_steps=bad)
    assert blob(wf, state) == before
    assert RAN == ["a"]  # only the valid run above


# --------------------------------------------------------------------------- refused


def test_a_cycle_from_separately_declared_edges_is_refused_where_it_is_declared() -> None:
    with Pipeline("loop") as p:
        a >> b
        b >> c
        with pytest.raises(PipelineError, match=r"the edge c -> a makes a cycle: c -> a -> b -> c"):
            c >> a
        with pytest.raises(PipelineError, match="makes a cycle: c -> a -> b -> c"):
            p.edge(c, a)
        with pytest.raises(PipelineError, match=r"'b' would come after itself \(b -> b\)"):
            p.edge("b", "b")
    assert p.edges == [("a", "b"), ("b", "c")]
    with pytest.raises(PipelineError, match="cycle: b -> a -> b"):
        a >> b >> a


def test_two_different_tasks_under_one_name_are_refused() -> None:
    other_a = Task(lambda: None, name="a")
    retried_a = task(retry=gorch.Retry(3))(a.fn)
    p = Pipeline("p", a >> b)
    for clash in (other_a, retried_a):
        with pytest.raises(PipelineError, match="two different tasks are named 'a'"):
            p.add(clash >> c)
        with pytest.raises(PipelineError, match="two different tasks are named 'a'"):
            p.edge(clash, b)
        with pytest.raises(PipelineError, match="two different tasks are named 'a'"):
            a >> clash
    assert (p.tasks, p.edges) == (("a", "b"), [("a", "b")])
    assert Task(a.fn).same_as(a)  # the same function and options: one task


def test_a_task_in_parallel_with_itself_is_refused() -> None:
    with pytest.raises(PipelineError, match=re.escape("'a' is on both sides of '|'")):
        a | a
    with pytest.raises(PipelineError, match=r"write a >> \(x \| y\)"):
        (a >> b) | (a >> c)


def test_an_edge_to_a_task_not_in_the_pipeline_is_refused() -> None:
    p = Pipeline("p", a >> b)
    with pytest.raises(PipelineError, match="task 'c' is not in the pipeline"):
        p.edge(b, c)
    with pytest.raises(PipelineError, match=r"task 'lod' is not in the pipeline .*: a, b"):
        p.edge("a", "lod")
    with pytest.raises(PipelineError, match="is not a task or a task's name"):
        p.edge(a, 3)  # type: ignore[arg-type]
    assert p.edges == [("a", "b")]


def test_operands_that_are_not_tasks_are_refused_with_a_hint() -> None:
    def plain() -> None: ...

    with pytest.raises(PipelineError, match="plain is a function, not a task; decorate"):
        a >> plain
    with pytest.raises(PipelineError, match="not a task; decorate"):
        plain >> a
    with pytest.raises(PipelineError, match="gorch statement belongs in a Workflow"):
        a | gorch.Step(plain)
    with pytest.raises(PipelineError, match="is a int"):
        Pipeline("p", 3)  # type: ignore[arg-type]


def test_tasks_that_cannot_be_named_or_decorated_twice_are_refused() -> None:
    with pytest.raises(PipelineError, match=re.escape("@task(name='...')")):
        task(lambda: None)
    assert task(name="anon")(lambda: None).name == "anon"
    with pytest.raises(PipelineError, match="a task already"):
        task(a)
    with pytest.raises(PipelineError, match="decorates a function"):
        task(3)  # type: ignore[call-overload]


def test_what_cannot_run_is_refused_when_the_class_is_built() -> None:
    with pytest.raises(PipelineError, match="has no tasks"):
        Pipeline("empty").workflow()
    named_like_dag = Task(a.fn, name="p")
    with pytest.raises(PipelineError, match="has the name of the pipeline"):
        Pipeline("p", named_like_dag).workflow()
    input_task = Task(a.fn, name="input")
    with pytest.raises(PipelineError, match="has the name of the input step"):
        Pipeline("p", input_task).workflow(input=Params)
    with pytest.raises(PipelineError, match="input must be a pydantic model"):
        Pipeline("p", a).workflow(input=dict)  # type: ignore[arg-type]

    class HasStart(pydantic.BaseModel):
        start_at: str

    with pytest.raises(PipelineError, match="has a field 'start_at'"):
        Pipeline("p", a).workflow(input=HasStart)


def test_a_parameter_no_result_can_fill_is_refused_when_the_class_is_built() -> None:
    # triple(x) takes "the" task before it: two tasks before it, or none, is ambiguous
    with pytest.raises(
        PipelineError, match="parameter 'x' names no task, and the task comes after 2"
    ):
        Pipeline("p", (a | b) >> triple).workflow()
    with pytest.raises(PipelineError, match=r"comes after no task, .* or the input step 'input'"):
        Pipeline("p", triple).workflow(input=Params)

    @task
    def two(p: int, q: int) -> None: ...

    with pytest.raises(PipelineError, match="parameters 'p', 'q' name no task"):
        Pipeline("p", a >> two).workflow()
    # the input step's name is a name to read by
    assert Pipeline("p", source).workflow(input=Params, input_step="input")


def test_pipeline_errors_are_definition_errors() -> None:
    assert issubclass(PipelineError, gorch.DefinitionError)
    assert issubclass(PipelineError, gorch.GorchError)
    with pytest.raises(PipelineError, match="non-empty str"):
        Pipeline("")
    p = Pipeline("p", a)
    with p, pytest.raises(PipelineError, match="already open"):
        p.__enter__()
