"""Property tests of DAG (SPEC §5), on random graphs of up to 30 nodes.

A graph is generated as nodes ``n0..nk`` where each node comes after a subset
of the nodes before it (so it is acyclic), defined in a shuffled order. Some
nodes are ``Node``s whose body waits on an event before its step; the others
are ``Step(..., after=...)``. Every step appends its node's name to ``log``.

Properties:

1. Every node runs exactly once, after all of its dependencies; the roots
   without events run first, in definition order; a node's thread starts as
   soon as its last dependency completed; two runs give the same log and blob.
2. Restarting from the blob saved at any checkpoint (a new workflow instance,
   as after a crash) gives the same final log and blob: no completed node runs
   again.
3. Adding a back edge makes a cycle, which is refused with a DefinitionError
   naming a real cycle of the graph, before anything runs.
4. Failing nodes skip exactly their descendants (computed here, independently)
   and every other node runs; ``DAGFailed`` lists them; the next resume runs
   exactly the failed and skipped nodes.
5. With ``fail_fast``, the nodes that run are those started before the
   failure (their dependencies had all completed before it); all others are
   skipped.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field

import gorch
from gorch import DAG, Node, On, S, Select, Step
from gorch import CheckpointKind as CK
from gorch import NodeStatus as NS
from gorch import ThreadStatus as TS
from gorch import WorkflowStatus as WS

MAIN = gorch.MAIN_THREAD
MAX_NODES = 30

PROPS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- the workflow


class RandomDag(gorch.Workflow):
    order: list[str]
    after: dict[str, list[str]]
    events: list[str] = Field(default_factory=list)
    fail: list[str] = Field(default_factory=list)
    fail_fast: bool = False
    log: list[str] = Field(default_factory=list)

    def run(self, name: str) -> Any:
        def step() -> None:
            self.log.append(name)
            if name in self.fail:
                raise RuntimeError(f"{name} broke")

        return step

    def node(self, name: str) -> Step | Node:
        if name in self.events:
            return Node(
                name,
                Select(f"wait {name}", On(f"ev {name}")),
                Step(name, self.run(name)),
                after=self.after[name],
            )
        return Step(name, self.run(name), after=self.after[name])

    def definition(self) -> gorch.Section:
        return S(
            Step("before", self.run("before")),
            DAG("dag", *map(self.node, self.order), fail_fast=self.fail_fast),
            Step("after", self.run("after")),
        )


class CyclicDag(RandomDag):
    """Only ever given cyclic graphs (its class index is never built)."""


def _graph(raw: tuple[int, list[list[int]], list[int], list[int]]) -> dict[str, Any]:
    """Turn plain integers into a graph: node i comes after some of nodes 0..i-1."""
    k, deps, perm, events = raw
    names = [f"n{i}" for i in range(k)]
    after = {
        n: sorted({names[d % i] for d in deps[i]}, key=names.index) if i else []
        for i, n in enumerate(names)
    }
    order = [names[p] for p in perm if p < k]
    return {"order": order, "after": after, "events": sorted({names[e % k] for e in events})}


#: One strategy built once (building strategies per draw dominates the run time).
GRAPHS = st.tuples(
    st.integers(min_value=1, max_value=MAX_NODES),
    st.lists(
        st.lists(st.integers(0, MAX_NODES - 1), max_size=4),
        min_size=MAX_NODES,
        max_size=MAX_NODES,
    ),
    st.permutations(range(MAX_NODES)),
    st.lists(st.integers(0, MAX_NODES - 1), max_size=5),
).map(_graph)


def graphs() -> st.SearchStrategy[dict[str, Any]]:
    return GRAPHS


# --------------------------------------------------------------------------- helpers


def descendants(after: dict[str, list[str]], roots: set[str]) -> set[str]:
    """Every node that comes after one of ``roots``, directly or not (roots excluded)."""
    children: dict[str, list[str]] = {n: [] for n in after}
    for n, deps in after.items():
        for d in deps:
            children[d].append(n)
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        for c in children[todo.pop()]:
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def drive(wf: RandomDag, state: gorch.State, save: Any = None) -> gorch.DAGFailed | None:
    """Resume and deliver the first awaited event until finished; return a DAGFailed."""
    for _ in range(10 * MAX_NODES):
        try:
            status = gorch.resume(wf, state, save)
        except gorch.DAGFailed as e:
            return e
        if status is WS.FINISHED:
            return None
        awaited = gorch.awaited_events(state)
        assert awaited, f"stuck: {state.threads}"
        tid, event, pc = awaited[0]
        gorch.handle_event(wf, state, event, thread_id=tid, pc=pc)
    raise AssertionError("did not finish")


def assert_dependencies_first(log: list[str], after: dict[str, list[str]]) -> None:
    pos = {n: i for i, n in enumerate(log)}
    for n in after:
        for d in after[n]:
            assert pos[d] < pos[n], f"{n} ran before its dependency {d}: {log}"


def node_of(t: gorch.Thread) -> str:
    assert t.name.startswith("dag.")
    return t.name[len("dag.") :]


# --------------------------------------------------------------------------- properties


@PROPS
@given(graphs())
def test_every_node_runs_once_after_its_dependencies_in_a_stable_order(g: dict[str, Any]) -> None:
    after = g["after"]
    wf = RandomDag(**g)
    state = gorch.new_state("r", "random")
    ready_checked = 0

    def check(kind: CK) -> None:
        nonlocal ready_checked
        main = state.thread(MAIN)
        if main is None or main.cur_step != "dag" or main.status is not TS.WAITING_CONDITION:
            return
        ended = main.nodes
        running = {node_of(t) for t in state.threads if t.parent == MAIN}
        assert not (running & set(ended))
        for n, deps in after.items():
            ready = all(ended.get(d) is NS.COMPLETED for d in deps)
            started = n in running or n in ended
            assert ready == started, f"{n}: ready={ready} started={started}"
        ready_checked += 1

    assert drive(wf, state, check) is None
    assert ready_checked > 0
    log = wf.log
    assert log[0] == "before" and log[-1] == "after"
    nodes = log[1:-1]
    assert sorted(nodes) == sorted(after)  # each node exactly once
    assert_dependencies_first(nodes, after)
    roots = [n for n in g["order"] if not after[n] and n not in g["events"]]
    assert nodes[: len(roots)] == roots  # started in definition order

    again = RandomDag(**g)
    again_state = gorch.new_state("r", "random")
    assert drive(again, again_state) is None
    assert again.log == log
    assert gorch.dumps(again, again_state) == gorch.dumps(wf, state)


@PROPS
@given(graphs(), st.data())
def test_restarting_from_any_checkpoint_reruns_no_completed_node(
    g: dict[str, Any], data: st.DataObject
) -> None:
    wf = RandomDag(**g)
    state = gorch.new_state("r", "random")
    blobs: list[bytes] = []
    assert drive(wf, state, lambda kind: blobs.append(gorch.dumps(wf, state))) is None
    final = gorch.dumps(wf, state)
    assert len(blobs) > len(g["order"])
    # restarting from every checkpoint is quadratic: a few per graph, chosen by hypothesis
    picks = data.draw(
        st.lists(st.integers(0, len(blobs) - 1), min_size=1, max_size=4, unique=True),
        label="checkpoints",
    )
    for blob in [blobs[i] for i in picks]:
        wf2, state2 = gorch.loads(blob, RandomDag)  # a new process: a new instance
        if state2.status is WS.FINISHED:
            assert blob == final
            continue
        assert drive(wf2, state2) is None
        assert wf2.log == wf.log
        assert gorch.dumps(wf2, state2) == final


@PROPS
@given(graphs(), st.data())
def test_a_back_edge_is_a_cycle_refused_before_anything_runs(
    g: dict[str, Any], data: st.DataObject
) -> None:
    after = {n: list(d) for n, d in g["after"].items()}
    k = len(after)
    if k == 1:  # no room for a cycle without a self-dependency: grow one node
        after["n1"] = []
        g["order"] = [*g["order"], "n1"]
        k = 2
    j = data.draw(st.integers(min_value=1, max_value=k - 1), label="j")
    i = data.draw(st.integers(min_value=0, max_value=j - 1), label="i")
    ni, nj = f"n{i}", f"n{j}"
    if nj not in descendants(after, {ni}):
        after[nj].append(ni)  # nj after ni (directly or through other nodes) ...
    after[ni].append(nj)  # ... and ni after nj: a cycle
    wf = CyclicDag(order=g["order"], after=after, events=g["events"])
    state = gorch.new_state("c", "cyclic")
    before = gorch.dumps(wf, state)
    try:
        gorch.resume(wf, state)
    except gorch.DefinitionError as e:
        msg = str(e)
    else:
        raise AssertionError("a cycle was accepted")
    assert "'dag'" in msg
    m = re.search(r"cycle: (.+)$", msg)
    assert m, msg
    cycle = m.group(1).split(" -> ")
    assert len(cycle) >= 3 and cycle[0] == cycle[-1]
    assert len(set(cycle[:-1])) == len(cycle) - 1
    for u, v in itertools.pairwise(cycle):
        assert u in after[v], f"{v} does not come after {u}: {msg}"
    assert wf.log == []
    assert gorch.dumps(wf, state) == before


@PROPS
@given(graphs(), st.data())
def test_a_failure_skips_exactly_the_descendants(g: dict[str, Any], data: st.DataObject) -> None:
    after = g["after"]
    fail = data.draw(
        st.lists(st.sampled_from(sorted(after)), min_size=1, max_size=3, unique=True),
        label="fail",
    )
    skipped = descendants(after, set(fail))
    failed = set(fail) - skipped
    wf = RandomDag(**g, fail=fail)
    state = gorch.new_state("f", "random")
    blobs: list[bytes] = []
    err = drive(wf, state, lambda kind: blobs.append(gorch.dumps(wf, state)))
    assert err is not None
    # a crash at any checkpoint ends the same way
    restart = blobs[data.draw(st.integers(0, len(blobs) - 1), label="restart")]
    wf2, state2 = gorch.loads(restart, RandomDag)
    err2 = drive(wf2, state2)
    assert err2 is not None
    assert (err2.failed, err2.skipped, wf2.log) == (err.failed, err.skipped, wf.log)
    assert err.dag == "dag"
    assert err.failed == {n: f"RuntimeError: {n} broke" for n in failed}
    assert err.skipped == [n for n in g["order"] if n in skipped]
    ran = wf.log[1:]
    assert sorted(ran) == sorted(set(after) - skipped)  # all others ran, once
    assert_dependencies_first(ran, {n: after[n] for n in ran})
    main = state.thread(MAIN)
    assert main is not None
    assert main.nodes == {
        n: NS.FAILED if n in failed else NS.SKIPPED if n in skipped else NS.COMPLETED for n in after
    }

    # a crash, then the cause fixed: only the failed and skipped nodes run again
    wf, state = gorch.loads(gorch.dumps(wf, state), RandomDag)
    wf.fail = []
    n = len(wf.log)
    assert drive(wf, state) is None
    rerun = wf.log[n:-1]
    assert wf.log[-1] == "after"
    assert sorted(rerun) == sorted(failed | skipped)
    done_before = set(after) - failed - skipped
    pos = {x: i for i, x in enumerate(rerun)}
    for x in rerun:
        for d in after[x]:
            assert d in done_before or pos[d] < pos[x]


@PROPS
@given(graphs(), st.data())
def test_fail_fast_runs_only_nodes_started_before_the_failure(
    g: dict[str, Any], data: st.DataObject
) -> None:
    after = g["after"]
    f = data.draw(st.sampled_from(sorted(after)), label="fail")
    wf = RandomDag(**g, fail=[f], fail_fast=True)
    state = gorch.new_state("ff", "random")
    err = drive(wf, state)
    assert err is not None
    ran = wf.log[1:]
    completed_before = set(ran[: ran.index(f)])
    started = {n for n in after if set(after[n]) <= completed_before}
    assert f in started
    assert sorted(ran) == sorted(started)
    assert err.failed == {f: f"RuntimeError: {f} broke"}
    assert err.skipped == [n for n in g["order"] if n not in started]
    assert_dependencies_first(ran, {n: after[n] for n in ran})

    wf.fail = []
    n = len(wf.log)
    assert drive(wf, state) is None
    assert sorted(wf.log[n:-1]) == sorted((set(after) - started) | {f})
