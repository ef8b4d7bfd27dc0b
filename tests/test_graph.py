"""gorch.graph: Mermaid diagrams of definitions, with the live cursors of a state.

The output is parsed back (there is no Mermaid renderer here) by a strict line grammar
that is a subset of Mermaid's flowchart syntax: every line must be a node definition,
a subgraph opening or ``end``, an edge, a ``classDef`` or a ``class`` line; subgraphs
must balance; every id an edge or a class line names must be defined once; labels are
quoted and carry no raw quote. The tests then assert on the parsed graph.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
from freezegun import freeze_time

import gorch
from gorch import (
    DAG,
    Break,
    Case,
    Continue,
    Default,
    For,
    Go,
    If,
    Node,
    On,
    Parallel,
    Return,
    S,
    Select,
    Step,
    Switch,
    Timeout,
    WaitFor,
)
from gorch.graph import humanize_duration, mermaid, mermaid_for

# --------------------------------------------------------------------------- parsing the output

ID = r"[A-Za-z_][A-Za-z0-9_]*"
SHAPES = {  # opening -> (closing, shape name)
    "([": ("])", "stadium"),
    "[[": ("]]", "subroutine"),
    "[/": ("/]", "parallelogram"),
    "{{": ("}}", "hexagon"),
    "[\\": ("/]", "join"),
    "(": (")", "round"),
    "[": ("]", "rect"),
    "{": ("}", "diamond"),
    ">": ("]", "flag"),
}
NODE_RE = re.compile(
    rf'^(?P<id>{ID})(?P<open>\(\[|\[\[|\[/|\[\\|\{{\{{|\(|\[|\{{|>)"(?P<label>[^"]*)"'
    r"(?P<close>\]\)|\]\]|/\]|\\\]|\}\}|\)|\]|\})$"
)
SUBGRAPH_RE = re.compile(rf'^subgraph (?P<id>{ID}) \["(?P<label>[^"]*)"\]$')
EDGE_RE = re.compile(
    rf'^(?P<src>{ID}) (?P<arrow>-->|-\.->)(?:\|"(?P<label>[^"]*)"\|)? (?P<dst>{ID})$'
)
CLASSDEF_RE = re.compile(rf"^classDef (?P<name>{ID}) (?P<style>[^;]+)$")
CLASS_RE = re.compile(rf"^class (?P<ids>{ID}(?:,{ID})*) (?P<name>{ID})$")
ENTITIES = {
    "#quot;": '"',
    "#35;": "#",
    "#lt;": "<",
    "#gt;": ">",
    "#amp;": "&",
    "#96;": "`",
    "#124;": "|",
    "#37;": "%",
}


def unescape(label: str) -> list[str]:
    """The lines of a label as a reader sees them."""
    lines = label.split("<br/>")
    for raw in lines:  # any other entity, '<' or '>' would be a missed escape
        assert "<" not in raw and ">" not in raw, label
        assert re.sub(r"#(?:quot|35|lt|gt|amp|96|124|37);", "", raw).count("#") == 0, label
    out = []
    for raw in lines:
        text = re.sub(r"#\w+;", lambda m: ENTITIES[m.group()], raw)
        out.append(text)
    return out


@dataclass
class Edge:
    src: str
    dst: str
    label: str
    dashed: bool


@dataclass
class Chart:
    text: str
    nodes: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # id -> shape, lines
    subgraphs: dict[str, list[str]] = field(default_factory=dict)  # id -> title lines
    parent: dict[str, str] = field(default_factory=dict)  # node/subgraph id -> subgraph id
    edges: list[Edge] = field(default_factory=list)
    classes: dict[str, set[str]] = field(default_factory=dict)
    classdefs: dict[str, str] = field(default_factory=dict)

    def label(self, ident: str) -> list[str]:
        return self.nodes[ident][1] if ident in self.nodes else self.subgraphs[ident]

    def ids(self, name: str) -> list[str]:
        """Ids of the nodes whose first label line is ``name``, else of such subgraphs."""
        found = [i for i, (_, lines) in self.nodes.items() if lines[0] == name]
        return found or [i for i, lines in self.subgraphs.items() if lines[0] == name]

    def id(self, name: str) -> str:
        [ident] = self.ids(name)
        return ident

    def shape(self, name: str) -> str:
        return self.nodes[self.id(name)][0]

    def edges_between(self, src: str, dst: str) -> list[Edge]:
        return [e for e in self.edges if e.src == self.id(src) and e.dst == self.id(dst)]

    def edge_labels(self, src: str) -> dict[str, str]:
        """Label -> first label line of the destination, for the edges leaving ``src``."""
        return {e.label: self.label(e.dst)[0] for e in self.edges if e.src == self.id(src)}

    def cls(self, name: str) -> set[str]:
        return self.classes.get(name, set())

    def named(self, ids: set[str]) -> set[str]:
        return {self.label(i)[0] for i in ids}


def parse(text: str) -> Chart:
    """Parse (and check) the output of ``mermaid``."""
    assert text.endswith("\n") and not text.endswith("\n\n")
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    chart = Chart(text)
    stack: list[str] = []
    defined: set[str] = set()
    for line in lines[1:]:
        indent = len(line) - len(line.lstrip(" "))
        body = line.strip()
        if (m := NODE_RE.match(body)) is not None:
            closing, shape = SHAPES[m["open"]]
            if shape == "parallelogram" and m["close"] == "\\]":
                shape = "fork"
            else:
                assert m["close"] == closing, line
            ident = m["id"]
            assert ident not in defined, f"{ident} defined twice"
            defined.add(ident)
            chart.nodes[ident] = (shape, unescape(m["label"]))
        elif (m := SUBGRAPH_RE.match(body)) is not None:
            ident = m["id"]
            assert ident not in defined, f"{ident} defined twice"
            defined.add(ident)
            chart.subgraphs[ident] = unescape(m["label"])
        elif body == "end":
            assert stack, "end without subgraph"
            stack.pop()
            assert indent == 4 * (len(stack) + 1)
            continue
        elif (m := EDGE_RE.match(body)) is not None:
            assert not stack, "edges are written after every node"
            label = m["label"]
            chart.edges.append(
                Edge(m["src"], m["dst"], unescape(label)[0] if label else "", m["arrow"] != "-->")
            )
            continue
        elif (m := CLASSDEF_RE.match(body)) is not None:
            chart.classdefs[m["name"]] = m["style"]
            continue
        elif (m := CLASS_RE.match(body)) is not None:
            assert m["name"] in chart.classdefs, "classDef before class"
            ids = m["ids"].split(",")
            assert len(set(ids)) == len(ids)
            chart.classes.setdefault(m["name"], set()).update(ids)
            continue
        else:
            raise AssertionError(f"not a line of the grammar: {line!r}")
        assert indent == 4 * (len(stack) + 1), line  # a node or a subgraph opening
        if stack:
            chart.parent[m["id"]] = stack[-1]
        if body.startswith("subgraph "):
            stack.append(m["id"])
    assert not stack, "unclosed subgraph"
    for e in chart.edges:
        assert e.src in defined and e.dst in defined, e
    for ids in chart.classes.values():
        assert ids <= defined
    assert "end" not in defined and "subgraph" not in defined
    return chart


# --------------------------------------------------------------------------- workflows


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Expense(gorch.Workflow):
    amount: float
    status: str = "new"

    def definition(self) -> gorch.Section:
        return S(
            Step("notify manager", self.nop),
            Select(
                "await decision",
                On("decide", self.on_decide),
                On("ping", self.on_ping),
                Timeout("expired", timedelta(days=3), Step("escalate", self.nop), Return()),
            ),
            If(self.status == "approved", Step("pay", self.pay)).Else(
                Step("tell requester", self.nop)
            ),
        )

    def on_decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        return {"status": self.status}

    def on_ping(self) -> None:
        pass

    def nop(self) -> None:
        pass

    def pay(self) -> None:
        if self.amount > 1000:
            raise RuntimeError("over the card limit")


def is_odd(x: int) -> bool:
    return x % 2 == 1


class Everything(gorch.Workflow):
    i: int = 0
    kind: str = "a"
    ready: bool = False
    wg: gorch.WaitGroup = gorch.WaitGroup()

    def definition(self) -> gorch.Section:
        return S(
            Step("init", self.nop),
            For(
                "loop",
                self.more,
                Step("inc", self.nop),
                If(functools.partial(is_odd, 2), Continue()),
                Select("poll", On("stop", Break()), Timeout("tick", 90)),
                Step("after poll", self.nop),
            ),
            Switch(
                Case(self.is_a, Step("case a", self.nop)),
                Case(lambda: self.kind == "b", Step("case b", self.nop)),
                Default(Step("fallback", self.nop)),
            ),
            Go("worker", Step("work", self.nop), WaitFor("ready?", self.is_ready), Return()),
            self.wg.wait("all done"),
            Parallel(
                "fan", Step("left", self.nop), S(Step("right 1", self.nop), Step("r2", self.nop))
            ),
            DAG(
                "build",
                Step("fetch", self.nop),
                Step("compile", self.nop, after=["fetch"]),
                Node(
                    "test", Step("unit", self.nop), Step("integration", self.nop), after=["compile"]
                ),
                Step("lint", self.nop, after=["fetch"]),
                Step("ship", self.nop, after=["test", "lint"]),
            ),
            Step("done", self.nop),
        )

    def nop(self) -> None:
        pass

    def more(self) -> bool:
        return self.i < 3

    def is_a(self) -> bool:
        return self.kind == "a"

    def is_ready(self) -> bool:
        return self.ready


EVERYTHING_STEPS = [
    "init",
    "inc",
    "after poll",
    "case a",
    "case b",
    "fallback",
    "work",
    "left",
    "right 1",
    "r2",
    "fetch",
    "compile",
    "unit",
    "integration",
    "lint",
    "ship",
    "done",
]


# --------------------------------------------------------------------------- the definition


def test_approval_workflow_is_drawn_with_every_step_and_labelled_cases() -> None:
    c = parse(mermaid(Expense, data={"amount": 10}))
    for name in ["notify manager", "escalate", "pay", "tell requester"]:
        assert c.shape(name) == "rect"
    assert c.shape("await decision") == "hexagon"
    assert c.shape("start") == c.shape("end") == "stadium"
    assert c.edges_between("start", "notify manager")
    assert c.edges_between("notify manager", "await decision")
    # one labelled edge per case: the typed handler's input type, the timer's duration
    assert c.edge_labels("await decision") == {
        "decide (Decision)": "if",
        "ping": "if",
        "⏱ expired (3d)": "escalate",
    }
    assert c.edge_labels("if") == {"if cond": "pay", "else": "tell requester"}
    assert c.edges_between("escalate", "return")
    assert c.edges_between("return", "end")  # Return in the main thread ends the workflow
    assert c.edges_between("pay", "end") and c.edges_between("tell requester", "end")
    assert c.classes == {} and c.classdefs == {}  # no state: nothing highlighted


def test_every_statement_kind_is_drawn() -> None:
    c = parse(mermaid(Everything))
    for name in EVERYTHING_STEPS:
        assert c.shape(name) == "rect", name
    assert len(c.edges) == len({(e.src, e.dst, e.label) for e in c.edges})

    # For: a loop node, a labelled way in, a back edge from the end of the body, a way out
    assert c.shape("↻ loop") == "parallelogram"
    assert c.edge_labels("↻ loop") == {"while more": "inc", "done": "switch"}
    assert c.edges_between("after poll", "↻ loop")
    # Continue: an edge to the loop head; Break: an edge to the loop's exit
    assert c.edge_labels("if") == {"if is_odd / continue": "↻ loop", "else": "poll"}
    assert c.edge_labels("poll") == {"stop / break": "switch", "⏱ tick (90s)": "after poll"}

    # Switch: a diamond with one edge per case, named by the callable when it has a name
    assert c.shape("switch") == "diamond"
    assert c.edge_labels("switch") == {
        "case 1: is_a": "case a",
        "case 2: cond": "case b",
        "default": "fallback",
    }

    # Go: the thread's body in a subgraph, reached by a dashed edge; the flow goes on
    go = c.id("go: worker")
    [thread] = c.ids("thread worker")
    assert thread in c.subgraphs
    assert c.parent[c.id("work")] == thread == c.parent[c.id("wait: ready?")]
    [dashed] = [e for e in c.edges if e.dashed]
    assert (dashed.src, dashed.dst) == (go, c.id("work"))
    assert c.edges_between("go: worker", "wait: all done")
    assert c.edges_between("wait: ready?", "return")
    assert not [e for e in c.edges if e.src == c.id("return")]  # a thread's Return: no edge

    # Parallel: a fork, one subgraph per branch, a join after which the flow continues
    assert c.shape("parallel: fan") == "fork" and c.shape("join: fan") == "join"
    left, right = c.id("left"), c.id("right 1")
    assert c.parent[left] != c.parent[right]
    assert {c.label(c.parent[left])[0], c.label(c.parent[right])[0]} == {"left", "right 1>>r2"}
    assert c.edges_between("parallel: fan", "left") and c.edges_between("parallel: fan", "right 1")
    assert c.edges_between("right 1", "r2")
    assert c.edges_between("left", "join: fan") and c.edges_between("r2", "join: fan")
    assert c.edges_between("join: fan", "dag: build")

    # DAG: one node or subgraph per node, an edge a --> b for every b after a
    dag = c.id("DAG build")
    for name in ["fetch", "compile", "lint", "ship", "test"]:
        assert c.parent[c.id(name)] == dag
    assert c.parent[c.id("unit")] == c.id("test")
    for a, b in [("fetch", "compile"), ("compile", "test"), ("fetch", "lint")]:
        assert c.edges_between(a, b), (a, b)
    assert c.edges_between("test", "ship") and c.edges_between("lint", "ship")
    assert c.edges_between("dag: build", "fetch") and c.edges_between("ship", "join: build")
    assert [c.label(e.dst)[0] for e in c.edges if e.src == c.id("dag: build")] == ["fetch"]
    assert c.edges_between("unit", "integration")
    assert c.edges_between("join: build", "done") and c.edges_between("done", "end")


def test_a_dag_edge_exists_exactly_for_each_dependency() -> None:
    class Diamond(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(
                DAG(
                    "d",
                    Step("a", self.nop),
                    Step("b", self.nop, after=["a"]),
                    Step("c", self.nop, after=["a"]),
                    Step("e", self.nop, after=["b", "c"]),
                    Step("lone", self.nop),
                )
            )

        def nop(self) -> None:
            pass

    c = parse(mermaid(Diamond))
    names = {"a", "b", "c", "e", "lone"}
    inner = {(c.label(e.src)[0], c.label(e.dst)[0]) for e in c.edges}
    assert {p for p in inner if set(p) <= names} == {("a", "b"), ("a", "c"), ("b", "e"), ("c", "e")}
    assert c.named({e.dst for e in c.edges if e.src == c.id("dag: d")}) == {"a", "lone"}
    assert c.named({e.src for e in c.edges if e.dst == c.id("join: d")}) == {"e", "lone"}


def test_if_without_else_and_switch_without_default_can_fall_through() -> None:
    class Branchy(gorch.Workflow):
        x: int = 0

        def definition(self) -> gorch.Section:
            return S(
                If(self.x > 1, Step("big", self.nop)).ElseIf(
                    lambda: self.x < 0, Step("neg", self.nop)
                ),
                Switch(Case(self.x == 1, Step("one", self.nop))),
                Step("last", self.nop),
            )

        def nop(self) -> None:
            pass

    c = parse(mermaid(Branchy))
    assert c.edge_labels("if") == {"if cond": "big", "elif cond": "neg", "else": "switch"}
    assert c.edge_labels("switch") == {"case 1: cond": "one", "no case": "last"}


def test_handler_kinds_give_their_input_types() -> None:
    class Typed(gorch.Handler):
        input_type = list[Decision]

    class Untyped(gorch.Handler):
        pass

    class Events(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(
                Select(
                    "sel",
                    On("model", self.model),
                    On("scalar", self.scalar),
                    On("anything", self.anything),
                    On("handler", Typed()),
                    On("plain", Untyped()),
                    On("none", Step("body", self.nop)),
                    Timeout("short", 1.5),
                    Timeout("hour", timedelta(hours=1)),
                )
            )

        def model(self, d: Decision) -> None:
            pass

        def scalar(self, n: int) -> None:
            pass

        def anything(self, x: Any) -> None:
            pass

        def nop(self) -> None:
            pass

    c = parse(mermaid(Events))
    assert set(c.edge_labels("sel")) == {
        "model (Decision)",
        "scalar (int)",
        "anything",
        "handler (list[Decision])",
        "plain",
        "none",
        "⏱ short (1.5s)",
        "⏱ hour (60m)",
    }


@pytest.mark.parametrize(
    ("after", "text"),
    [
        (timedelta(days=3), "3d"),
        (timedelta(hours=24), "24h"),
        (timedelta(days=1), "24h"),
        (90, "90s"),
        (60, "60s"),
        (timedelta(minutes=90), "90m"),
        (timedelta(hours=2), "2h"),
        (timedelta(days=1, hours=2, minutes=3, seconds=4), "1d 2h 3m 4s"),
        (timedelta(minutes=2, seconds=30), "2m 30s"),
        (1.5, "1.5s"),
        (0, "0s"),
        (timedelta(milliseconds=250), "0.25s"),
    ],
)
def test_durations_are_humanised(after: timedelta | float, text: str) -> None:
    assert humanize_duration(after) == text


def test_output_is_deterministic() -> None:
    first = mermaid(Everything)
    assert mermaid(Everything) == first
    assert mermaid(Everything()) == first
    assert mermaid_for(Everything()) == first
    wf = Everything()
    state = gorch.new_state("e", "everything")
    gorch.resume(wf, state)
    assert mermaid(wf, state) == mermaid_for(wf, state) == mermaid(Everything, state, data=wf)


def test_output_is_the_same_in_another_process() -> None:
    here = Path(__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tg', {str(here)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['tg'] = m\n"
        "spec.loader.exec_module(m)\n"
        "sys.stdout.write(m.mermaid(m.Everything))\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {mermaid(Everything)}


# --------------------------------------------------------------------------- names


WEIRD = [
    "a.b",
    "a b",
    "a_b",
    "a|b",
    'say "hi"',
    "#quot; not an entity",
    "<b>bold</b> & co",
    "`tick`",
    "%% not a comment",
    "end",
    "subgraph",
    "class",
    "π ünïcode ✓",
    "-->",
    "x" * 120,
    "",
]


def test_weird_names_are_escaped_and_get_unique_valid_ids() -> None:
    names = [n for n in WEIRD if n]

    class Weird(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(
                *(Step(n, self.nop) for n in names),
                Select('sel "1"|x', On('ev "q"|#x', Step("in case", self.nop)), Timeout("t|#", 5)),
                Go("go.a|b", Step("go step", self.nop)),
                Parallel('par "p"', Step("p|1", self.nop), Step("p.1", self.nop)),
                DAG(
                    "dag.x",
                    Step("n.1", self.nop),
                    Node('n "2"', Step("n2 body", self.nop), after=["n.1"]),
                ),
            )

        def nop(self) -> None:
            pass

    text = mermaid(Weird)
    c = parse(text)
    for n in names:  # each step is one rectangle ("end" is also the end node's label)
        [ident] = [i for i in c.ids(n) if c.nodes[i][0] == "rect"]
        assert c.nodes[ident][1] == [n]
    assert c.edge_labels('sel "1"|x') == {'ev "q"|#x': "in case", "⏱ t|# (5s)": "go: go.a|b"}
    assert c.edges_between("n.1", 'n "2"')
    assert c.edges_between('parallel: par "p"', "p|1")
    # ids are made of safe characters only, and are unique although names collide once
    # sanitised ("a.b", "a b", "a_b", "a|b")
    ids = list(c.nodes) + list(c.subgraphs)
    assert len(ids) == len(set(ids))
    assert len({c.id(n) for n in ["a.b", "a b", "a_b", "a|b"]}) == 4
    assert all(re.fullmatch(r"n\d+(_[A-Za-z0-9_]+)?", i) for i in ids)
    assert all(len(i) <= 32 for i in ids)
    # no raw character of a name leaks out of its label
    assert "<b>" not in text and "%%" not in text and "`" not in text


def test_line_breaks_in_names_do_not_break_lines() -> None:
    class Lines(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(Step("two\nlines\r\u2028here", self.nop))

        def nop(self) -> None:
            pass

    c = parse(mermaid(Lines))
    assert c.ids("two lines  here")


# --------------------------------------------------------------------------- data


class Batch(gorch.Workflow):
    """A workflow that needs data: one step per item."""

    items: list[str]
    owner: str = "ops"

    def definition(self) -> gorch.Section:
        return S(
            *(Step(f"process {item}", self.nop) for item in self.items), Step("report", self.nop)
        )

    def nop(self) -> None:
        pass


class Unbound(gorch.Workflow):
    """A workflow with a required field its definition does not read."""

    customer: str

    def definition(self) -> gorch.Section:
        return S(Step("hello", self.nop))

    def nop(self) -> None:
        pass


def test_a_workflow_that_needs_data() -> None:
    c = parse(mermaid(Batch, data={"items": ["a", "b"]}))
    assert c.edges_between("process a", "process b") and c.edges_between("process b", "report")
    wf = Batch(items=["x"])
    assert mermaid(Batch, data=wf) == mermaid(wf) == mermaid_for(wf)
    assert parse(mermaid(wf)).ids("process x")


def test_without_data_a_definition_that_reads_missing_fields_asks_for_data() -> None:
    with pytest.raises(gorch.DefinitionError) as info:
        mermaid(Batch)
    message = str(info.value)
    assert "Batch.definition() raised AttributeError" in message
    assert "items" in message and "data=" in message


def test_without_data_required_fields_not_read_by_the_definition_are_fine() -> None:
    c = parse(mermaid(Unbound))
    assert c.edges_between("start", "hello")


def test_invalid_data_is_refused() -> None:
    with pytest.raises(gorch.InvalidWorkflowData):
        mermaid(Batch, data={"items": 3})
    with pytest.raises(gorch.InvalidWorkflowData):
        mermaid(Batch, data=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mermaid(Batch, data=Expense(amount=1))
    with pytest.raises(TypeError):
        mermaid(Batch(items=[]), data={"items": []})
    with pytest.raises(TypeError):
        mermaid(Decision)  # type: ignore[arg-type]


def test_a_definition_that_raises_is_a_definition_error() -> None:
    class Broken(gorch.Workflow):
        def definition(self) -> gorch.Section:
            raise KeyError("nope")

    with pytest.raises(gorch.DefinitionError, match=r"Broken.definition\(\) raised KeyError"):
        mermaid(Broken)


def test_an_invalid_definition_is_a_definition_error() -> None:
    class Dup(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(Step("a", self.nop), Step("a", self.nop))

        def nop(self) -> None:
            pass

    class NotAStatement(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return 42  # type: ignore[return-value]

    with pytest.raises(gorch.DefinitionError, match="'a' is used twice"):
        mermaid(Dup)
    with pytest.raises(gorch.DefinitionError, match="must return a statement"):
        mermaid(NotAStatement)


def test_drawing_runs_nothing() -> None:
    calls: list[str] = []

    class Spy(gorch.Workflow):
        def definition(self) -> gorch.Section:
            calls.append("definition")
            return S(
                Step("s", lambda: calls.append("step")),
                For("f", self.cond, Step("t", self.nop)),
                Select("sel", On("e", lambda: calls.append("handler"))),
            )

        def nop(self) -> None:
            calls.append("nop")

        def cond(self) -> bool:
            calls.append("cond")
            return True

    mermaid(Spy)
    assert calls == ["definition"]


# --------------------------------------------------------------------------- cursors


def run(wf: gorch.Workflow, state: gorch.State | None = None) -> gorch.State:
    """Resume ``wf`` through a dumps/loads round trip, as an application would."""
    state = state or gorch.new_state("wf-1", type(wf).__name__.lower())
    gorch.resume(wf, state)
    _, loaded = gorch.loads(gorch.dumps(wf, state), type(wf))
    return loaded


def cursors(c: Chart) -> set[str]:
    return c.named(c.cls("cursor"))


def test_a_fresh_state_sits_on_the_start_node() -> None:
    c = parse(mermaid(Expense, gorch.new_state("e", "expense"), data={"amount": 1}))
    assert c.cls("cursor") == {c.id("start")}
    assert c.label(c.id("start")) == ["start", "[_main_] not started"]


@freeze_time("2031-03-02 09:30:00")
def test_waiting_in_a_select_marks_the_select_with_its_events() -> None:
    wf = Expense(amount=10)
    state = run(wf)
    c = parse(mermaid(Expense, state, data=wf))
    assert c.cls("cursor") == {c.id("await decision")}
    assert c.label(c.id("await decision")) == [
        "await decision",
        "[_main_] waiting: decide, ping, expired (due 2031-03-05 09:30 UTC)",
    ]
    assert c.classdefs["cursor"] == "fill:#ffd54f,stroke:#f57f17,stroke-width:3px"
    assert set(c.classes) == {"cursor"}


def test_a_finished_workflow_marks_the_end_node() -> None:
    wf = Expense(amount=10)
    state = run(wf)
    gorch.handle_event(wf, state, "decide", {"approved": True, "by": "ann"})
    c = parse(mermaid(wf, state))
    assert c.cls("cursor") == {c.id("await decision")}
    assert c.label(c.id("await decision"))[1] == "[_main_] resuming after: decide"
    state = run(wf, state)
    assert state.status is gorch.WorkflowStatus.FINISHED
    c = parse(mermaid(wf, state))
    assert c.cls("cursor") == {c.id("end")}
    assert c.label(c.id("end")) == ["end", "finished"]


def test_a_failed_step_is_marked_with_its_error() -> None:
    wf = Expense(amount=5000)
    state = run(wf)
    gorch.handle_event(wf, state, "decide", {"approved": True, "by": "ann"})
    with pytest.raises(gorch.StepFailed):
        gorch.resume(wf, state)
    c = parse(mermaid(wf, state))
    assert c.cls("cursor") == {c.id("pay")}
    assert c.label(c.id("pay")) == [
        "pay",
        "[_main_] failed (attempt 1): RuntimeError: over the card limit",
    ]


class Fan(gorch.Workflow):
    ready: bool = False

    def definition(self) -> gorch.Section:
        return S(
            Go("side", Step("side step", self.nop), WaitFor("side ready", self.is_ready)),
            Parallel(
                "approvals",
                Select("legal", On("legal ok")),
                Select("finance", On("finance ok"), Timeout("finance late", timedelta(hours=48))),
                Step("quick", self.nop),
            ),
            Step("after", self.nop),
        )

    def nop(self) -> None:
        pass

    def is_ready(self) -> bool:
        return self.ready


@freeze_time("2031-03-02 09:30:05")
def test_threads_of_a_parallel_and_a_go_are_marked_where_they_wait() -> None:
    wf = Fan()
    state = run(wf)
    c = parse(mermaid(wf, state))
    assert cursors(c) == {"join: approvals", "legal", "finance", "wait: side ready"}
    assert c.label(c.id("join: approvals"))[1:] == ["[_main_] waiting: 2 branches running"]
    assert c.label(c.id("legal"))[1:] == ["[approvals.legal] waiting: legal ok"]
    assert c.label(c.id("finance"))[1:] == [
        "[approvals.finance] waiting: finance ok, finance late (due 2031-03-04 09:30:05 UTC)"
    ]
    assert c.label(c.id("wait: side ready"))[1:] == ["[side] waiting: condition"]
    assert c.edge_labels("finance") == {
        "finance ok": "join: approvals",
        "⏱ finance late (2d)": "join: approvals",
    }

    gorch.handle_event(wf, state, "legal ok")
    gorch.handle_event(wf, state, "finance ok")
    wf.ready = True
    state = run(wf, state)
    assert state.status is gorch.WorkflowStatus.FINISHED
    assert cursors(parse(mermaid(wf, state))) == {"end"}


class Pipeline(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(
            DAG(
                "pipeline",
                Step("x", self.nop),
                Step("y", self.boom, after=["x"]),
                Node("z", Select("z wait", On("z go")), after=["x"]),
                Step("w", self.nop, after=["y"]),
            ),
        )

    def nop(self) -> None:
        pass

    def boom(self) -> None:
        raise RuntimeError("no luck")


def test_dag_nodes_are_marked_done_failed_skipped_and_running() -> None:
    wf = Pipeline()
    state = run(wf)
    c = parse(mermaid(wf, state))
    assert cursors(c) == {"join: pipeline", "z wait"}
    assert c.named(c.cls("done")) == {"x"}
    assert c.named(c.cls("failed")) == {"y"}
    assert c.named(c.cls("skipped")) == {"w"}
    assert c.label(c.id("y"))[1:] == ["failed: RuntimeError: no luck"]
    assert c.label(c.id("join: pipeline"))[1:] == ["[_main_] waiting: 3/4 nodes ended, 1 running"]
    assert c.label(c.id("z wait"))[1:] == ["[pipeline.z] waiting: z go"]
    assert set(c.classdefs) == {"cursor", "done", "failed", "skipped"}

    gorch.handle_event(wf, state, "z go")
    with pytest.raises(gorch.DAGFailed):
        gorch.resume(wf, state)
    c = parse(mermaid(wf, state))
    assert cursors(c) == {"join: pipeline"}
    assert c.named(c.cls("done")) == {"x", "z"}  # a Node is a subgraph: the class marks it
    assert c.id("z") in c.subgraphs
    assert c.label(c.id("join: pipeline"))[1].startswith("[_main_] failed (attempt 1): ")


def test_a_thread_that_has_not_started_sits_on_its_entry() -> None:
    wf = Fan()
    state = gorch.new_state("f", "fan")
    state.threads.append(gorch.Thread(id="side", name="side"))
    state.threads.append(gorch.Thread(id="approvals.legal", name="approvals.legal"))
    c = parse(mermaid(wf, state))
    legal_branch = c.parent[c.id("legal")]
    assert c.cls("cursor") == {c.id("start"), c.id("thread side"), legal_branch}
    assert c.label(legal_branch) == ["legal", "[approvals.legal] not started"]


def test_a_cursor_the_definition_no_longer_has_is_drawn_apart() -> None:
    wf = Expense(amount=10)
    state = run(wf)
    state.threads[0].cur_step = "old name"
    c = parse(mermaid(wf, state))
    [lost] = c.ids("⚠ old name (not in the definition)")
    assert c.cls("cursor") == c.cls("missing") == {lost}
    assert not [e for e in c.edges if lost in (e.src, e.dst)]


def test_cursor_ids_are_exactly_the_threads_nodes_in_a_busy_workflow() -> None:
    wf = Everything()
    wf.wg.add(1)
    state = run(wf)
    assert cursors(parse(mermaid(wf, state))) == {"poll"}
    gorch.handle_event(wf, state, "stop")
    state = run(wf, state)
    c = parse(mermaid(wf, state))
    expected = {
        c.id(t.cur_step) if c.ids(t.cur_step) else c.id(f"wait: {t.cur_step}")
        for t in state.threads
    }
    assert c.cls("cursor") == expected
    assert cursors(c) == {"wait: all done", "wait: ready?"}
    assert c.label(c.id("wait: all done"))[1:] == ["[_main_] waiting: condition"]


def test_a_failed_setup_is_noted() -> None:
    class Refuses(gorch.Handler):
        def setup(self, req: gorch.EventRequest) -> str | None:
            raise ConnectionError("webhook registry down")

    class Hook(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(Select("hook", On("called", Refuses()), On("other")))

    wf = Hook()
    state = gorch.new_state("h", "hook")
    with pytest.raises(gorch.SetupError):
        gorch.resume(wf, state)
    c = parse(mermaid(wf, state))
    assert c.label(c.id("hook"))[1:] == ["[_main_] waiting: called (setup failed), other"]


def test_many_threads_on_one_node_are_counted() -> None:
    class Crowd(gorch.Workflow):
        n: int = 0
        open: bool = False

        def definition(self) -> gorch.Section:
            return S(
                For(
                    "spawn",
                    lambda: self.n < 8,
                    Go("member", WaitFor("gate", lambda: self.open), id=self.member_id),
                    Step("count", self.count),
                ),
                WaitFor("all in", lambda: self.open),
            )

        def member_id(self) -> str:
            return f"m{self.n}"

        def count(self) -> None:
            self.n += 1

    wf = Crowd()
    state = run(wf)
    c = parse(mermaid(wf, state))
    assert cursors(c) == {"wait: gate", "wait: all in"}
    assert c.label(c.id("wait: gate"))[1:] == [
        *(f"[m{i}] waiting: condition" for i in range(5)),
        "… and 3 more",
    ]
