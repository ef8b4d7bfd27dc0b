"""Names and dependencies from functions, and composites as DAG nodes (issue 14, item 2).

``Step(fn)`` is named after ``fn.__name__``; ``after=[...]`` takes a node's
name, its Step or Node, the function a ``Step(fn)`` runs, or a composite
statement placed in the DAG. A Section, a Parallel (``a | b``) or a nested DAG
placed directly in a DAG is a node named by its label -- LightFlow's sync
point: ``after=[that_parallel]`` waits for every branch.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any

import pytest
from flow_support import Logged, new, noop
from test_graph import parse

import gorch
from gorch import DAG, If, Node, On, Parallel, Return, S, Select, Step
from gorch import NodeStatus as NS
from gorch import WorkflowStatus as WS
from gorch.graph import mermaid

MAIN = gorch.MAIN_THREAD


def roundtrip(wf: Any, state: gorch.State) -> tuple[Any, gorch.State]:
    return gorch.loads(gorch.dumps(wf, state), type(wf))


def refused(wf: gorch.Workflow) -> str:
    """The DefinitionError a resume raises; nothing ran and the state is byte-identical."""
    state = new(wf)
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError) as info:
        gorch.resume(wf, state)
    assert gorch.dumps(wf, state) == before
    assert getattr(wf, "log", []) == []
    return str(info.value)


def extract() -> None:
    pass


def main_nodes(state: gorch.State) -> dict[str, NS]:
    t = state.thread(MAIN)
    assert t is not None
    return t.nodes


# --------------------------------------------------------------------------- Step(fn)


def test_step_of_a_function_is_named_after_it() -> None:
    st = Step(extract)
    assert (st.name, st.fn, st.after, st.retry) == ("extract", extract, (), None)
    assert repr(st) == "Step('extract')"


def test_step_of_a_bound_method_takes_the_method_name() -> None:
    wf = Steps()
    st = Step(wf.transform)
    assert st.name == "transform" and st.fn == wf.transform


def test_step_name_fn_is_unchanged() -> None:
    policy = gorch.Retry(attempts=2)
    st = Step("load", extract, retry=policy, after=["x"])
    assert (st.name, st.fn, st.retry, st.after) == ("load", extract, policy, ("x",))
    st = Step(name="load", fn=extract)  # keywords still work
    assert (st.name, st.fn) == ("load", extract)


def test_both_forms_are_declared_as_overloads() -> None:
    """What mypy and IDEs show: Step(name, fn, ...) and Step(fn, ...)."""
    forms = [inspect.signature(f) for f in typing.get_overloads(Step.__init__)]
    assert [(list(f.parameters), f.parameters["fn"].annotation) for f in forms] == [
        (["self", "name", "fn", "retry", "after", "timeout"], "Callable[..., Any]"),
        (["self", "fn", "retry", "after", "timeout"], "Callable[..., Any]"),
    ]
    assert forms[1].parameters["fn"].kind is inspect.Parameter.POSITIONAL_ONLY


class Callable_:
    def __call__(self) -> None:
        pass


@pytest.mark.parametrize(
    ("fn", "mentions"),
    [
        (lambda: None, ["'<lambda>'", "Step('name', fn)"]),
        (functools.partial(extract), ["no __name__", "Step('name', fn)"]),
        (Callable_(), ["no __name__", "Step('name', fn)"]),
        ("load", ["Step('load') has no function", "Step('load', fn)"]),
    ],
    ids=["lambda", "partial", "callable object", "a name alone"],
)
def test_a_step_without_a_usable_name_asks_for_one(fn: Any, mentions: list[str]) -> None:
    with pytest.raises(gorch.DefinitionError) as info:
        Step(fn)
    for m in mentions:
        assert m in str(info.value)


class Steps(Logged):
    def definition(self) -> gorch.Section:
        return S(Step(self.extract), Step(self.transform), Step("load", self.run("load")))

    def extract(self) -> None:
        self.log.append("extract")

    def transform(self) -> None:
        self.log.append("transform")


def test_steps_named_after_functions_run_persist_and_resume() -> None:
    wf = Steps()
    state = new(wf)
    blobs: list[bytes] = []
    assert gorch.resume(wf, state, lambda k: blobs.append(gorch.dumps(wf, state))) is WS.FINISHED
    assert wf.log == ["extract", "transform", "load"]
    # a crash at any checkpoint: the reload runs on from the cursors named after functions
    for blob in blobs:
        wf2, state2 = gorch.loads(blob, Steps)
        if state2.status is not WS.FINISHED:
            gorch.resume(wf2, state2)
        assert (state2.status, wf2.log) == (WS.FINISHED, ["extract", "transform", "load"])


class SameFunctionTwice(Logged):
    def definition(self) -> gorch.Section:
        return S(Step(self.send), Step(self.send))

    def send(self) -> None:
        self.log.append("send")


def test_one_function_in_two_steps_is_refused_with_how_to_name_them() -> None:
    msg = refused(SameFunctionTwice())
    assert "'send' is used twice" in msg
    assert "Step(fn) is named after the function" in msg and "Step('send_2', fn)" in msg


class Swapped(Logged):
    def definition(self) -> gorch.Section:
        return S(Step(noop, "noop"))  # type: ignore[call-overload]


def test_swapped_arguments_are_named_in_the_error() -> None:
    assert "arguments swapped" in refused(Swapped())


class BareFunction(Logged):
    def definition(self) -> gorch.Section:
        return S(Step("a", noop), noop)  # type: ignore[arg-type]


def test_a_bare_function_in_a_body_suggests_step_fn() -> None:
    msg = refused(BareFunction())
    assert "is not a statement" in msg and "Step(fn)" in msg


# --------------------------------------------------------------------------- after=[fn]


class Diamond(Logged):
    """Graflow's diamond: extract, two transforms, load -- named by their functions."""

    def definition(self) -> gorch.Section:
        first = Step(self.extract)
        return S(
            DAG(
                "etl",
                first,
                Step(self.transform_a, after=[self.extract]),  # the function
                Step(self.transform_b, after=[first]),  # the Step
                Step(self.load, after=["transform_a", self.transform_b]),  # a name, a function
            )
        )

    def extract(self) -> None:
        self.log.append("extract")

    def transform_a(self) -> None:
        self.log.append("transform_a")

    def transform_b(self) -> None:
        self.log.append("transform_b")

    def load(self) -> None:
        self.log.append("load")


def test_after_takes_functions_steps_and_names() -> None:
    wf = Diamond()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["extract", "transform_a", "transform_b", "load"]
    (dag,) = [st for st in wf.definition().stmts if isinstance(st, DAG)]
    assert [(n.name, n.after) for n in dag.nodes] == [
        ("extract", ()),
        ("transform_a", ("extract",)),
        ("transform_b", ("extract",)),
        ("load", ("transform_a", "transform_b")),
    ]


def test_a_single_function_is_one_dependency() -> None:
    assert Step("b", noop, after=extract).after == ("extract",)


class AfterAStranger(Logged):
    def definition(self) -> gorch.Section:
        return S(DAG("g", Step(self.first), Step(self.second, after=[extract])))

    def first(self) -> None:
        self.log.append("first")

    def second(self) -> None:
        self.log.append("second")


def test_a_function_that_is_not_a_node_is_refused() -> None:
    msg = refused(AfterAStranger())
    assert "'second' comes after 'extract', which is not a node of this DAG" in msg
    assert "nodes: first, second" in msg


class AfterARenamedStep(Logged):
    def definition(self) -> gorch.Section:
        return S(DAG("g", Step("pull", extract), Step("use", noop, after=[extract])))


def test_a_function_whose_step_has_another_name_says_which_node_runs_it() -> None:
    msg = refused(AfterARenamedStep())
    assert "extract() runs as node 'pull'" in msg and "after=['pull']" in msg


@pytest.mark.parametrize(
    ("dep", "mention"),
    [(lambda: None, "'<lambda>'"), (42, "got 42 (int)"), (functools.partial(noop), "__name__")],
    ids=["lambda", "int", "partial"],
)
def test_after_refuses_what_names_no_node(dep: Any, mention: str) -> None:
    with pytest.raises(gorch.DefinitionError) as info:
        Step("x", noop, after=[dep])
    assert mention in str(info.value)


# --------------------------------------------------------------------------- composites as nodes


class SyncPoint(Logged):
    """LightFlow's parallel example: branch, three lanes, and a join waiting for all lanes."""

    def definition(self) -> gorch.Section:
        r = self.run
        lanes = Step("lane1", r("lane1")) | Step("lane2", r("lane2")) | Step("lane3", r("lane3"))
        return S(
            DAG(
                "flow",
                Step("branch", r("branch")),
                lanes,  # a node named "lane1|lane2|lane3", depending on nothing
                Step("join", r("join"), after=[lanes, "branch"]),  # the sync point
            ),
            Step("end", r("end")),
        )


def test_a_parallel_placed_in_a_dag_is_a_node_others_wait_for() -> None:
    wf = SyncPoint()
    state = new(wf)
    seen: list[list[str]] = []
    assert gorch.resume(wf, state, lambda k: seen.append([t.id for t in state.threads])) is (
        WS.FINISHED
    )
    assert wf.log == ["branch", "lane1", "lane2", "lane3", "join", "end"]
    ids = {i for seen_ids in seen for i in seen_ids}
    assert "flow.lane1|lane2|lane3" in ids  # the node's thread, which runs the Parallel
    assert "flow.lane1|lane2|lane3/lane1|lane2|lane3.lane2" in ids  # a branch of it


class WaitingLanes(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        fetch = Parallel(
            "fetch",
            Step("fetch a", r("a")),
            S(Select("wait b", On("b ready")), Step("fetch b", r("b")), name="b"),
        )
        return S(
            DAG(
                "d",
                fetch,
                Step("other", r("other")),
                Step("merge", r("merge"), after=[fetch]),
            ),
            Step("end", r("end")),
        )


def test_the_node_waits_for_every_branch_across_a_save() -> None:
    wf = WaitingLanes()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    assert sorted(wf.log) == ["a", "other"]
    assert main_nodes(state) == {"other": NS.COMPLETED}  # fetch still running
    assert [t.id for t in state.threads] == [MAIN, "d.fetch", "d.fetch/fetch.b"]
    wf, state = roundtrip(wf, state)
    gorch.handle_event(wf, state, "b ready", thread_id="d.fetch/fetch.b")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log[2:] == ["b", "merge", "end"]


class FailingLane(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        lanes = Step("l1", r("l1")) | Step("l2", r("l2"))
        return S(
            DAG(
                "d",
                lanes,
                Step("solo", r("solo")),
                Step("join", r("join"), after=[lanes]),
            )
        )


def test_a_failing_branch_holds_back_what_waits_for_the_node_until_it_succeeds() -> None:
    """The node is as a ``Node`` holding the Parallel: its branch's failure is reported
    (how a Parallel reports failed branches is the Parallel's own policy) and ``join``
    waits; the independent node ran once, and a resume after the fix finishes."""
    wf = FailingLane(fail=["l2"])
    state = new(wf)
    with pytest.raises((gorch.StepFailed, gorch.DAGFailed)) as info:
        gorch.resume(wf, state)
    assert "l2 broke" in str(info.value)
    assert "join" not in wf.log and "solo" in wf.log
    assert main_nodes(state).get("l1|l2") is not NS.COMPLETED
    wf, state = roundtrip(wf, state)
    wf.fail = []
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log.count("solo") == 1 and wf.log.count("l1") == 1 and wf.log[-1] == "join"


class SectionsAsNodes(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        clean = S(Step("strip", r("strip")), Step("dedupe", r("dedupe")))
        named = S(Step("score", r("score")), Step("rank", r("rank")), name="ranking")
        inner = DAG("inner", Step("x", r("x")), Step("y", r("y"), after=["x"]))
        return S(
            DAG(
                "d",
                clean,  # "strip>>dedupe"
                named,  # "ranking"
                inner,  # "inner"
                Step("publish", r("publish"), after=[clean, named, inner]),
            )
        )


def test_sections_and_nested_dags_are_nodes_named_by_their_labels() -> None:
    wf = SectionsAsNodes()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["strip", "dedupe", "score", "rank", "x", "y", "publish"]
    (dag,) = wf.definition().stmts
    assert isinstance(dag, DAG)
    assert [n.name for n in dag.nodes] == ["strip>>dedupe", "ranking", "inner", "publish"]
    assert all(isinstance(n, Node) for n in dag.nodes[:3])
    assert [g.name for g in dag.branches] == [
        "d.strip>>dedupe",
        "d.ranking",
        "d.inner",
        "d.publish",
    ]


class CompositeAfterSomething(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        lanes = Step("l1", r("l1")) | Step("l2", r("l2"))
        return S(
            DAG(
                "d",
                Step("branch", r("branch")),
                Node(lanes, after=["branch"]),  # unnamed: named by its label
                Step("join", r("join"), after=[lanes]),
            )
        )


def test_an_unnamed_node_takes_its_body_label_so_after_finds_it() -> None:
    wf = CompositeAfterSomething()
    assert gorch.resume(wf, new(wf)) is WS.FINISHED
    assert wf.log == ["branch", "l1", "l2", "join"]
    assert Node(S(Step("p", noop), Step("q", noop))).name == "p>>q"
    assert Node(Step("p", noop), Step("q", noop)).name == "p>>q"


def test_a_composite_node_is_drawn_with_its_edges() -> None:
    c = parse(mermaid(CompositeAfterSomething))
    node = c.id("l1|l2")  # the node: a subgraph titled by its label, holding the Parallel
    assert node in c.subgraphs and c.parent[c.id("parallel: l1|l2")] == node
    assert c.edges_between("branch", "l1|l2") and c.edges_between("l1|l2", "join")
    assert not c.edges_between("dag: d", "l1|l2")  # it has a dependency: not a root


# ---- composites that cannot be nodes


class EmptySection(Logged):
    def definition(self) -> gorch.Section:
        return S(DAG("g", Step("a", noop), S()))


class TwoLabels(Logged):
    def definition(self) -> gorch.Section:
        return S(
            DAG(
                "g",
                S(Step("a", noop), name="prep"),
                Node("prep", Step("b", noop)),
            )
        )


class IfAsNode(Logged):
    def definition(self) -> gorch.Section:
        return S(DAG("g", Step("a", noop), If(True, Step("b", noop))))  # type: ignore[arg-type]


class ReturnAsNode(Logged):
    def definition(self) -> gorch.Section:
        return S(DAG("g", Step("a", noop), S(Return())))


class AfterAnInnerStep(Logged):
    def definition(self) -> gorch.Section:
        lanes = Step("l1", noop) | Step("l2", noop)
        return S(DAG("g", lanes, Step("b", noop, after=["l1"])))


class FunctionAsNode(Logged):
    def definition(self) -> gorch.Section:
        return S(DAG("g", Step("a", noop), extract))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("wf", "mentions"),
    [
        (EmptySection(), ["'g'", "empty composite", "remove it"]),
        (TwoLabels(), ["'prep' appears twice", "S(..., name='name')"]),
        (IfAsNode(), ["If(", "cannot be a node", "Node('name', If("]),
        (ReturnAsNode(), ["Return()", "no label", "Node('name', ...)"]),
        (AfterAnInnerStep(), ["'l1' is inside node 'l1|l2'", "after=['l1|l2']"]),
        (FunctionAsNode(), ["extract", "Step(fn)"]),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, gorch.Workflow) else "",
)
def test_composites_that_cannot_be_nodes_say_what_to_do(
    wf: gorch.Workflow, mentions: list[str]
) -> None:
    msg = refused(wf)
    for m in mentions:
        assert m in msg, msg
