"""DAG, Node and Step(after=) (SPEC §5).

A node runs as soon as every node it comes after has completed; independent
nodes run as parallel threads. Node statuses live in the state of the thread
running the DAG, so a resume never re-runs a completed node. A node that fails
skips its descendants, independent nodes go on, and once nothing more can run
the DAG raises ``DAGFailed``; the next resume re-runs only the failed and
skipped nodes.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from flow_support import Logged, new, noop
from pydantic import Field

import gorch
from gorch import DAG, For, Go, Node, On, Parallel, Retry, Return, S, Select, Step, WaitFor
from gorch import CheckpointKind as CK
from gorch import InstanceStatus as IS
from gorch import NodeStatus as NS
from gorch import ThreadStatus as TS
from gorch import WorkflowStatus as WS

MAIN = gorch.MAIN_THREAD


# --------------------------------------------------------------------------- helpers


def roundtrip(wf: Any, state: gorch.State) -> tuple[Any, gorch.State]:
    return gorch.loads(gorch.dumps(wf, state), type(wf))


def thread(state: gorch.State, tid: str = MAIN) -> gorch.Thread:
    t = state.thread(tid)
    assert t is not None, f"no thread {tid!r} in {[t.id for t in state.threads]}"
    return t


def node_threads(state: gorch.State) -> list[str]:
    return [t.id for t in state.threads if t.parent]


# --------------------------------------------------------------------------- running


class Pipeline(Logged):
    """extract -> (clean, enrich) -> load, with an approval node waiting on an event."""

    def definition(self) -> gorch.Section:
        r = self.run
        return S(
            Step("start", r("start")),
            DAG(
                "etl",
                Step("extract", r("extract")),
                Step("clean", r("clean"), after=["extract"]),
                Step("enrich", r("enrich"), after=["extract"]),
                Node(
                    "approve",
                    Step("ask", r("ask")),
                    Select("wait approval", On("approved")),
                    Step("noted", r("noted")),
                ),
                Step("load", r("load"), after=["clean", "enrich", "approve"]),
            ),
            Step("end", r("end")),
        )


def test_nodes_run_after_their_dependencies_as_parallel_threads() -> None:
    wf = Pipeline()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    # roots start in definition order; dependents when their last dependency completes
    assert wf.log == ["start", "extract", "ask", "clean", "enrich"]
    main = thread(state)
    assert (main.status, main.cur_step) == (TS.WAITING_CONDITION, "etl")
    assert main.nodes == {"extract": NS.COMPLETED, "clean": NS.COMPLETED, "enrich": NS.COMPLETED}
    assert node_threads(state) == ["etl.approve"]
    approve = thread(state, "etl.approve")
    assert (approve.status, approve.cur_step, approve.parent) == (
        TS.WAITING_EVENT,
        "wait approval",
        MAIN,
    )

    wf, state = roundtrip(wf, state)  # node statuses survive a save
    assert thread(state).nodes == main.nodes
    gorch.handle_event(wf, state, "approved", thread_id="etl.approve")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["start", "extract", "ask", "clean", "enrich", "noted", "load", "end"]


def test_a_dag_runs_in_the_same_order_every_time() -> None:
    logs = []
    for _ in range(3):
        wf = Pipeline()
        state = new(wf)
        gorch.resume(wf, state)
        gorch.handle_event(wf, state, "approved")
        gorch.resume(wf, state)
        logs.append(wf.log)
    assert logs[0] == logs[1] == logs[2]


class Independent(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        return S(DAG("d", Step("z", r("z")), Step("m", r("m")), Step("a", r("a"))))


def test_independent_nodes_start_in_definition_order_as_threads() -> None:
    wf = Independent()
    state = new(wf)
    seen: list[list[str]] = []
    gorch.resume(wf, state, lambda k: seen.append(node_threads(state)))
    assert state.status is WS.FINISHED
    assert wf.log == ["z", "m", "a"]
    assert seen[0] == ["d.z", "d.m", "d.a"]  # all three were threads at once


class AfterForms(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        a = Step("a", r("a"))
        b = Node("b", Step("b step", r("b")), after=a)  # a statement
        return S(
            DAG(
                "g",
                Step("c", r("c"), after="b"),  # a single name
                b,
                a,
                Step("d", r("d"), after=[a, "c"]),
            )
        )


def test_after_takes_names_statements_or_a_single_name() -> None:
    wf = AfterForms()
    assert gorch.resume(wf, new(wf)) is WS.FINISHED
    assert wf.log == ["a", "b", "c", "d"]


def test_crash_after_any_checkpoint_never_reruns_a_completed_node() -> None:
    def drive(wf: Any, state: gorch.State, blobs: list[bytes] | None) -> tuple[Any, gorch.State]:
        def save(kind: CK) -> None:
            if blobs is not None:
                blobs.append(gorch.dumps(wf, state))

        while gorch.resume(wf, state, save) is not WS.FINISHED:
            for tid, event, pc in gorch.awaited_events(state):
                gorch.handle_event(wf, state, event, thread_id=tid, pc=pc)
        return wf, state

    blobs: list[bytes] = []
    wf, state = drive(Pipeline(), new(Pipeline()), blobs)
    expected = wf.log
    final = gorch.dumps(wf, state)
    assert sorted(expected) == sorted(set(expected))  # each step once
    assert len(blobs) > len(expected)
    for blob in blobs:
        wf2, state2 = gorch.loads(blob, Pipeline)  # a new process: new instance
        if state2.status is WS.FINISHED:
            continue
        wf2, state2 = drive(wf2, state2, None)
        assert wf2.log == expected
        assert gorch.dumps(wf2, state2) == final


class DagInLoop(Logged):
    i: int = 0

    def inc(self) -> None:
        self.i += 1

    def tagged(self, what: str) -> Any:
        return lambda: self.log.append(f"{what}{self.i}")

    def definition(self) -> gorch.Section:
        return S(
            For(
                "loop",
                self.i < 3,
                DAG(
                    "d",
                    Step("a", self.tagged("a")),
                    Node("b", Select("wait", On("go")), Step("b step", self.tagged("b"))),
                    Step("c", self.tagged("c"), after=["a", "b"]),
                ),
                Step("inc", self.inc),
            ),
        )


def test_a_dag_inside_a_loop_runs_every_node_each_iteration() -> None:
    wf = DagInLoop()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    for _ in range(3):
        assert thread(state).nodes == {"a": NS.COMPLETED}  # reset each iteration
        assert node_threads(state) == ["d.b"]
        gorch.handle_event(wf, state, "go", thread_id="d.b")
        wf, state = roundtrip(wf, state)
        gorch.resume(wf, state)
    assert state.status is WS.FINISHED
    assert wf.log == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]


class DagInGo(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        return S(
            Go(
                "worker",
                DAG(
                    "d",
                    Node("a", Select("wait", On("go")), Step("a", r("a"))),
                    Step("b", r("b"), after=["a"]),
                ),
                Step("worker done", r("worker done")),
            ),
            Select("main wait", On("stop")),
        )


def test_a_dag_inside_a_go_thread_prefixes_node_threads() -> None:
    wf = DagInGo()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    assert [(t.id, t.parent) for t in state.threads] == [
        (MAIN, ""),
        ("worker", ""),
        ("worker/d.a", "worker"),
    ]
    gorch.handle_event(wf, state, "go", thread_id="worker/d.a")
    assert gorch.resume(wf, state) is WS.WAITING
    assert wf.log == ["a", "b", "worker done"]
    assert [t.id for t in state.threads] == [MAIN]


class FailingDagInGo(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        return S(
            Go(
                "worker",
                DAG("d", Step("a", r("a")), Step("b", r("b"))),
                Step("worker done", r("worker done")),
            ),
            Select("main wait", On("stop")),
            Step("main done", r("main done")),
        )


def test_a_dag_failing_in_a_go_thread_is_retried_on_that_thread() -> None:
    wf = FailingDagInGo(fail=["a"])
    state = new(wf)
    with pytest.raises(gorch.DAGFailed) as info:
        gorch.resume(wf, state)
    assert info.value.thread_id == "worker"
    worker = thread(state, "worker")
    assert worker.nodes == {"a": NS.FAILED, "b": NS.COMPLETED}
    assert thread(state).status is TS.WAITING_EVENT  # main is not affected
    wf, state = roundtrip(wf, state)
    wf.fail = []
    assert gorch.resume(wf, state) is WS.WAITING
    assert wf.log == ["a", "b", "a", "worker done"]
    gorch.handle_event(wf, state, "stop")
    assert gorch.resume(wf, state) is WS.FINISHED


class NodeIdTaken(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Go("squatter", Select("wait", On("e")), id="d.a"),
            DAG("d", Node("a", Select("wait a", On("e2")))),
        )


def test_a_node_thread_id_already_running_is_thread_exists() -> None:
    wf = NodeIdTaken()
    state = new(wf)
    with pytest.raises(gorch.ThreadExists, match=r"d\.a"):
        gorch.resume(wf, state)
    ids = [t.id for t in state.threads]
    assert len(ids) == len(set(ids))


class NestedDag(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        return S(
            DAG(
                "outer",
                Step("first", r("first")),
                Node(
                    "inner",
                    DAG(
                        "in",
                        Step("x", r("x")),
                        Node("y", Select("wait y", On("go")), Step("y", r("y")), after=["x"]),
                    ),
                    after=["first"],
                ),
                Node("par", Parallel("p", Step("p1", r("p1")), Step("p2", r("p2")))),
                Step("last", r("last"), after=["inner", "par"]),
            ),
            Step("end", r("end")),
        )


def test_nodes_may_hold_a_nested_dag_or_a_parallel() -> None:
    wf = NestedDag()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    assert thread(state).nodes == {"first": NS.COMPLETED, "par": NS.COMPLETED}
    inner = thread(state, "outer.inner")
    assert (inner.cur_step, inner.nodes) == ("in", {"x": NS.COMPLETED})
    assert thread(state, "outer.inner/in.y").parent == "outer.inner"
    wf, state = roundtrip(wf, state)
    gorch.handle_event(wf, state, "go")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["first", "p1", "p2", "x", "y", "last", "end"]


class EmptyDag(Logged):
    def definition(self) -> gorch.Section:
        return S(DAG("nothing"), Step("after", self.run("after")))


def test_an_empty_dag_just_continues() -> None:
    wf = EmptyDag()
    assert gorch.resume(wf, new(wf)) is WS.FINISHED
    assert wf.log == ["after"]


# --------------------------------------------------------------------------- invalid definitions


def invalid(kind: str) -> Any:
    r = noop
    cases = {
        "cycle": lambda: DAG(
            "g",
            Step("a", r, after=["c"]),
            Step("b", r, after=["a"]),
            Step("c", r, after=["b"]),
            Step("ok", r),
        ),
        "unknown": lambda: DAG("g", Step("a", r), Step("b", r, after=["a", "ghost"])),
        "self": lambda: DAG("g", Step("a", r), Node("loop", Step("l", r), after=["loop"])),
        "duplicate step": lambda: DAG("g", Step("a", r), Step("a", r)),
        "duplicate node": lambda: DAG("g", Node("a", Step("a1", r)), Node("a", Step("a2", r))),
        "after listed twice": lambda: DAG("g", Step("a", r), Step("b", r, after=["a", "a"])),
        "a function as a node": lambda: DAG("g", Step("a", r), r),
        "a named statement as a node": lambda: DAG("g", Step("a", r), Select("s", On("e"))),
        "step after outside a dag": lambda: Step("x", r, after=["a"]),
        "node outside a dag": lambda: Node("n", Step("x", r)),
        "after inside a node body": lambda: DAG(
            "g", Step("a", r), Node("n", Step("x", r, after=["a"]))
        ),
    }
    return cases[kind]()


@pytest.mark.parametrize(
    ("kind", "mentions"),
    [
        ("cycle", ["'g'", "cycle", "a -> b -> c -> a"]),
        ("unknown", ["'b'", "'ghost'"]),
        ("self", ["'loop'", "itself"]),
        ("duplicate step", ["'a'"]),
        ("duplicate node", ["'a'", "twice"]),
        ("after listed twice", ["'b'", "twice"]),
        ("a function as a node", ["'g'", "noop"]),
        ("a named statement as a node", ["'g'", "Select('s'"]),
        ("step after outside a dag", ["'x'", "DAG"]),
        ("node outside a dag", ["Node('n'", "DAG"]),
        ("after inside a node body", ["'x'", "DAG"]),
    ],
)
def test_invalid_dags_are_refused_before_anything_runs(kind: str, mentions: list[str]) -> None:
    class Bad(Logged):
        def definition(self) -> gorch.Section:
            return S(Step("before", self.run("before")), invalid(kind))

    wf = Bad()
    state = new(wf)
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError) as info:
        gorch.resume(wf, state)
    for m in mentions:
        assert m in str(info.value)
    assert wf.log == []
    assert gorch.dumps(wf, state) == before


def test_a_cycle_message_names_a_real_cycle() -> None:
    class Cyclic(Logged):
        def definition(self) -> gorch.Section:
            return S(
                DAG(
                    "g",
                    Step("a", noop),
                    Step("b", noop, after=["a", "d"]),
                    Step("c", noop, after=["b"]),
                    Step("d", noop, after=["c"]),
                )
            )

    with pytest.raises(gorch.DefinitionError) as info:
        gorch.resume(Cyclic(), gorch.new_state("c", "c"))
    cycle = str(info.value).rsplit("cycle: ", 1)[1].split(" -> ")
    assert cycle[0] == cycle[-1]
    assert sorted(cycle[1:]) == ["b", "c", "d"]  # a is not on the cycle
    # each name comes right before the node that runs after it
    deps = {"b": {"a", "d"}, "c": {"b"}, "d": {"c"}}
    assert all(prev in deps[nxt] for prev, nxt in itertools.pairwise(cycle))


class NotANode(Logged):
    """A section placed as a node is named by its label; ``S(Return())`` has none."""

    def definition(self) -> gorch.Section:
        return S(DAG("g", Step("a", noop), S(Return())))


def test_an_unlabelled_statement_as_a_node_is_named_in_the_error() -> None:
    with pytest.raises(gorch.DefinitionError) as info:
        gorch.resume(NotANode(), gorch.new_state("n", "n"))
    assert "'g'" in str(info.value) and "Return()" in str(info.value)
    assert "Node('name', ...)" in str(info.value)


def test_an_unnamed_statement_as_a_node_is_a_definition_error() -> None:
    wf = NotANode()
    state = gorch.new_state("n", "n")
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError):
        gorch.resume(wf, state)
    assert gorch.dumps(wf, state) == before


class DataDrivenDag(Logged):
    edges: dict[str, list[str]] = Field(default_factory=dict)

    def definition(self) -> gorch.Section:
        return S(
            Step("before", self.run("before")),
            DAG("d", *[Step(n, self.run(n), after=a) for n, a in self.edges.items()]),
        )


def test_a_data_dependent_cycle_is_refused_before_anything_runs() -> None:
    ok = DataDrivenDag(edges={"a": [], "b": ["a"]})
    assert gorch.resume(ok, gorch.new_state("ok", "ddd")) is WS.FINISHED  # indexes the class

    wf = DataDrivenDag(edges={"a": ["b"], "b": ["a"]})  # same shape, a cycle
    state = gorch.new_state("bad", "ddd")
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError, match="cycle"):
        gorch.resume(wf, state)
    assert wf.log == []
    assert gorch.dumps(wf, state) == before


def test_a_data_dependent_cycle_is_refused_when_reached() -> None:
    """What happens today (the half of the above that holds): refused, DAG not started."""
    ok = DataDrivenDag(edges={"a": [], "b": ["a"]})
    assert gorch.resume(ok, gorch.new_state("ok", "ddd")) is WS.FINISHED
    wf = DataDrivenDag(edges={"x": ["y"], "y": ["x"]})
    state = gorch.new_state("bad", "ddd")
    with pytest.raises(gorch.DefinitionError, match=r"x -> y -> x|y -> x -> y"):
        gorch.resume(wf, state)
    assert wf.log in ([], ["before"])
    assert node_threads(state) == []
    assert thread(state).nodes == {}


# --------------------------------------------------------------------------- failures


class Diamond(Logged):
    """a -> b -> d, a -> c -> d, d -> e; x -> y independent; w waits on an event."""

    fail_fast: bool = False

    def definition(self) -> gorch.Section:
        r = self.run
        return S(
            Step("start", r("start")),
            DAG(
                "g",
                Step("a", r("a")),
                Step("b", r("b"), after=["a"]),
                Step("c", r("c"), after=["a"]),
                Step("d", r("d"), after=["b", "c"]),
                Step("e", r("e"), after=["d"]),
                Step("x", r("x")),
                Step("y", r("y"), after=["x"]),
                Node("w", Select("wait", On("go")), Step("w", r("w"))),
                fail_fast=self.fail_fast,
            ),
            Step("end", r("end")),
        )


def test_a_failed_node_skips_its_descendants_and_independent_nodes_go_on() -> None:
    wf = Diamond(fail=["b"])
    state = new(wf)
    # the event node still runs: nothing is raised while a node can still run
    assert gorch.resume(wf, state) is WS.WAITING
    assert wf.log == ["start", "a", "x", "b", "c", "y"]
    assert thread(state).nodes == {
        "a": NS.COMPLETED,
        "x": NS.COMPLETED,
        "b": NS.FAILED,
        "d": NS.SKIPPED,
        "e": NS.SKIPPED,
        "c": NS.COMPLETED,
        "y": NS.COMPLETED,
    }
    assert thread(state).node_errors == {"b": "RuntimeError: b broke"}
    assert node_threads(state) == ["g.w"]  # the failed node's thread ended

    wf, state = roundtrip(wf, state)
    gorch.handle_event(wf, state, "go")
    with pytest.raises(gorch.DAGFailed) as info:
        gorch.resume(wf, state)
    err = info.value
    assert isinstance(err, gorch.StepFailed)
    assert err.dag == "g" and err.step == "g"
    assert err.failed == {"b": "RuntimeError: b broke"}
    assert err.skipped == ["d", "e"]
    assert "b: RuntimeError: b broke" in str(err) and "skipped: d, e" in str(err)
    assert wf.log == ["start", "a", "x", "b", "c", "y", "w"]
    main = thread(state)
    assert main.cur_step == "g" and main.error and main.attempts == 1
    assert main.nodes["w"] is NS.COMPLETED

    # the next resume re-runs only the failed and skipped nodes
    wf, state = roundtrip(wf, state)
    wf.fail = []
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log[7:] == ["b", "d", "e", "end"]
    assert state.threads == []


def test_dag_failed_again_when_the_retry_fails_too() -> None:
    wf = Diamond(fail=["c"])
    state = new(wf)
    gorch.resume(wf, state)
    gorch.handle_event(wf, state, "go")
    with pytest.raises(gorch.DAGFailed):
        gorch.resume(wf, state)
    n = len(wf.log)
    with pytest.raises(gorch.DAGFailed) as info:
        gorch.resume(wf, state)
    assert info.value.failed == {"c": "RuntimeError: c broke"}
    assert info.value.skipped == ["d", "e"]
    assert wf.log[n:] == ["c"]  # only the failed node ran again
    wf.fail = []
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log[n + 1 :] == ["c", "d", "e", "end"]


def test_several_failures_are_all_listed() -> None:
    wf = Diamond(fail=["c", "x"])
    state = new(wf)
    gorch.resume(wf, state)
    gorch.handle_event(wf, state, "go")
    with pytest.raises(gorch.DAGFailed) as info:
        gorch.resume(wf, state)
    assert info.value.failed == {"x": "RuntimeError: x broke", "c": "RuntimeError: c broke"}
    assert info.value.skipped == ["d", "e", "y"]  # in definition order
    assert "b" in wf.log


def test_fail_fast_starts_no_node_after_the_first_failure() -> None:
    wf = Diamond(fail=["a"], fail_fast=True)
    state = new(wf)
    # a fails; x and w were started already and finish; nothing new starts
    assert gorch.resume(wf, state) is WS.WAITING
    assert wf.log == ["start", "a", "x"]
    gorch.handle_event(wf, state, "go")
    with pytest.raises(gorch.DAGFailed) as info:
        gorch.resume(wf, state)
    assert info.value.failed == {"a": "RuntimeError: a broke"}
    assert info.value.skipped == ["b", "c", "d", "e", "y"]  # y does not depend on a
    assert wf.log == ["start", "a", "x", "w"]
    wf.fail = []
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log[4:] == ["a", "y", "b", "c", "d", "e", "end"]


def test_without_fail_fast_the_same_failure_lets_independent_nodes_finish() -> None:
    wf = Diamond(fail=["a"])
    state = new(wf)
    gorch.resume(wf, state)
    gorch.handle_event(wf, state, "go")
    with pytest.raises(gorch.DAGFailed) as info:
        gorch.resume(wf, state)
    assert info.value.skipped == ["b", "c", "d", "e"]
    assert wf.log == ["start", "a", "x", "y", "w"]


class Retried(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        return S(
            DAG(
                "d",
                Step("a", r("a"), retry=Retry(attempts=3)),
                Step("b", r("b"), after=["a"]),
                Step("x", r("x")),
            ),
            Step("end", r("end")),
        )


def test_a_node_with_retry_raises_step_failed_until_its_last_attempt() -> None:
    wf = Retried(fail=["a"])
    state = new(wf)
    for attempt in (1, 2):
        with pytest.raises(gorch.StepFailed) as info:
            gorch.resume(wf, state)
        assert type(info.value) is gorch.StepFailed
        assert (info.value.step, info.value.attempts) == ("a", attempt)
        assert isinstance(info.value.__cause__, RuntimeError)
        node = thread(state, "d.a")
        assert (node.cur_step, node.attempts, node.status) == ("a", attempt, TS.EXECUTING)
        assert node.error == "RuntimeError: a broke"
        assert "a" not in thread(state).nodes  # not failed yet
        assert wf.log.count("a") == attempt and "b" not in wf.log
        wf, state = roundtrip(wf, state)
    with pytest.raises(gorch.DAGFailed) as dag:
        gorch.resume(wf, state)  # third failure: the node fails, the DAG fails
    assert dag.value.failed == {"a": "RuntimeError: a broke"}
    assert dag.value.skipped == ["b"]
    assert wf.log.count("a") == 3 and wf.log.count("x") == 1 and "b" not in wf.log
    assert thread(state).nodes == {"a": NS.FAILED, "b": NS.SKIPPED, "x": NS.COMPLETED}
    wf.fail = []
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log[4:] == ["a", "b", "end"]  # x is not run again


class FailsInNodeBody(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        return S(
            DAG(
                "d",
                Node("n", Step("n1", r("n1")), Step("n2", r("n2")), Step("n3", r("n3"))),
                Step("after n", r("after n"), after=["n"]),
            ),
        )


def test_a_node_body_that_fails_midway_is_rerun_from_its_start() -> None:
    wf = FailsInNodeBody(fail=["n2"])
    state = new(wf)
    with pytest.raises(gorch.DAGFailed) as info:
        gorch.resume(wf, state)
    assert info.value.failed == {"n": "RuntimeError: n2 broke"}
    assert info.value.skipped == ["after n"]
    wf.fail = []
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["n1", "n2", "n1", "n2", "n3", "after n"]


class WaitForHandlerFails(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        return S(
            DAG(
                "d",
                Node("w", WaitFor("cond", True, r("handler"))),
                Step("y", r("y"), after=["w"]),
                Step("x", r("x")),
            ),
        )


def test_a_waitfor_handler_failing_in_a_node_fails_the_node() -> None:
    wf = WaitForHandlerFails(fail=["handler"])
    state = new(wf)
    with pytest.raises(gorch.DAGFailed) as info:
        gorch.resume(wf, state)
    assert info.value.failed == {"w": "RuntimeError: handler broke"}
    assert info.value.skipped == ["y"]


# --------------------------------------------------------------------------- through the Engine


class EngineDag(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        return S(
            Step("start", r("start")),
            DAG(
                "d",
                Step("a", r("a")),
                Step("b", r("b"), after=["a"]),
                Node("w", Select("wait", On("go")), Step("w", r("w"))),
                Step("c", r("c"), after=["w"]),
            ),
            Step("end", r("end")),
        )


def test_engine_shows_node_status_and_a_failed_dag_ends_failed() -> None:
    engine = gorch.Engine("memory://", {"dag": EngineDag})
    snap = engine.start("dag", "e1", {"fail": ["b"]})
    assert snap.status is IS.WAITING
    main = snap.threads[0]
    assert main.id == MAIN
    assert main.nodes == {"a": "completed", "b": "failed"}
    assert main.node_errors == {"b": "RuntimeError: b broke"}
    assert [(t.id, t.parent) for t in snap.threads[1:]] == [("d.w", MAIN)]
    assert engine.get("e1").threads[0].nodes == main.nodes

    engine.send("e1", "go")  # delivered; the DAG's failure is the instance's, not the send's
    snap = engine.get("e1")
    assert snap.status is IS.FAILED
    assert "b broke" in snap.error
    assert snap.threads[0].nodes == {
        "a": "completed",
        "b": "failed",
        "w": "completed",
        "c": "completed",
    }
    assert snap.data["log"] == ["start", "a", "w", "c"]  # b's change was put back

    # fix the cause, then retry: only b runs again
    rec = engine.store.load("e1")
    wf, state = gorch.loads(rec.blob, EngineDag)
    wf.fail = []
    engine.store.save("e1", rec.version, rec.status, gorch.dumps(wf, state), rec.wake_at)
    snap = engine.retry("e1")
    assert snap.status is IS.FINISHED
    assert snap.data["log"] == ["start", "a", "w", "c", "b", "end"]


class EngineRetried(Logged):
    def definition(self) -> gorch.Section:
        r = self.run
        return S(
            DAG(
                "d",
                Step("a", r("a"), retry=Retry(attempts=2, backoff=0)),
                Step("b", r("b"), after=["a"]),
                Step("x", r("x")),
            ),
            Step("end", r("end")),
        )


def test_engine_retries_a_node_with_retry_then_fails_the_dag() -> None:
    engine = gorch.Engine("memory://", {"dag": EngineRetried})
    snap = engine.start("dag", "r1", {"fail": ["a"]})
    assert snap.status is IS.RETRYING
    node = next(t for t in snap.threads if t.id == "d.a")
    assert (node.cur_step, node.attempts) == ("a", 1)
    assert "a broke" in snap.error
    (result,) = engine.run_due()
    assert result.action == "retry"
    assert "DAGFailed" in result.error and "a broke" in result.error
    snap = engine.get("r1")
    assert snap.status is IS.FAILED
    assert snap.threads[0].nodes == {"a": "failed", "b": "skipped", "x": "completed"}
    assert snap.data["log"].count("x") == 1 and "b" not in snap.data["log"]


class EngineMutates(Logged):
    counter: int = 0
    retried: bool = False

    def bump_then_fail(self) -> None:
        self.counter += 100
        raise RuntimeError("half done")

    def definition(self) -> gorch.Section:
        retry = Retry(attempts=2, backoff=0) if self.retried else None
        return S(
            DAG(
                "d",
                Step("bad", self.bump_then_fail, retry=retry),
                Step("good", self.run("good")),
            ),
        )


@pytest.mark.parametrize("retried", [False, True], ids=["no retry", "retry left"])
def test_engine_saves_a_failed_nodes_data_as_it_was_before_the_step(retried: bool) -> None:
    engine = gorch.Engine("memory://", {"dag": EngineMutates})
    try:
        engine.start("dag", "m1", {"retried": retried})
    except gorch.DAGFailed:
        assert not retried
    assert engine.get("m1").status is (IS.RETRYING if retried else IS.FAILED)
    wf, _ = gorch.loads(engine.store.load("m1").blob, EngineMutates)
    assert wf.counter == 0  # the failed step's change is not saved


def _dag_of(edges: dict[str, list[str]]) -> DAG:
    return DAG("d", *[Step(n, noop, after=a) for n, a in edges.items()])


def test_a_dag_shape_is_checked_once_and_each_new_shape_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every definition() builds the DAG again: a shape checked before is not checked again,
    a new one is, and a shape that fails its check is refused every time it comes."""
    from gorch import index

    checked: list[str] = []
    check = index._checked_graph

    def counting(dag: DAG, owner: str) -> Any:
        checked.append(dag.name)
        return check(dag, owner)

    monkeypatch.setattr(index, "_checked_graph", counting)
    monkeypatch.setattr(index, "_GRAPHS", {})
    first = index.graph_of(_dag_of({"a": [], "b": ["a"]}))
    again = index.graph_of(_dag_of({"a": [], "b": ["a"]}))
    assert again is first and len(checked) == 1
    other = index.graph_of(_dag_of({"a": ["b"], "b": []}))  # same names, other edges
    assert other.deps == {"a": ("b",), "b": ()} and len(checked) == 2
    for _ in range(2):
        with pytest.raises(gorch.DefinitionError, match="cycle"):
            index.graph_of(_dag_of({"a": ["b"], "b": ["a"]}))
    assert len(checked) == 4


def test_the_dag_shapes_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shapes that vary with data (one per instance, say) cannot grow the cache without end."""
    from gorch import index

    monkeypatch.setattr(index, "_GRAPHS", {})
    monkeypatch.setattr(index, "_GRAPHS_MAX", 3)
    for k in range(10):
        index.graph_of(_dag_of({f"n{k}": []}))
        assert len(index._GRAPHS) <= 3
