"""Mermaid diagrams of workflow definitions, with the live cursors of a state marked.

``mermaid(Expense)`` draws the statement tree that ``Expense.definition()``
returns as a Mermaid ``flowchart TD``; ``mermaid(Expense, state, data=wf)``
(or ``mermaid_for(wf, state)``) also marks where each thread of ``state``
sits, what it waits for, and how the nodes of a running DAG ended. Paste
the text into any Markdown that renders Mermaid (GitHub, GitLab, mkdocs) or
https://mermaid.live.

Drawing never runs a step, a handler or a callable condition: it calls
``definition()`` once, validates the tree like the interpreter does, and walks it.

Shapes: start/end/return are stadiums, a ``Step`` a rectangle, ``If`` /
``Switch`` a diamond, ``For`` a parallelogram (with a back edge from the end
of its body), ``Select`` a hexagon (one labelled edge per case), ``WaitFor``
a rounded box, ``Go`` a flag with a dashed edge into its thread's subgraph,
``Parallel`` and ``DAG`` a fork trapezoid, one subgraph per branch / node
and a join (inverted trapezoid), after which the flow continues.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic

from gorch.errors import DefinitionError, GorchError, InvalidWorkflowData, summarize_validation
from gorch.index import index_definition
from gorch.state import (
    ACTIVE_EVENT,
    MAIN_THREAD,
    EventStatus,
    State,
    Thread,
    ThreadStatus,
    WaitEvent,
    WorkflowStatus,
)
from gorch.statements import (
    DAG,
    Break,
    Cond,
    Continue,
    For,
    Go,
    If,
    Node,
    On,
    Parallel,
    Return,
    Section,
    Select,
    Step,
    Stmt,
    Switch,
    Timeout,
    WaitFor,
)
from gorch.timers import due_time
from gorch.workflow import Workflow

__all__ = [
    "CLASS_DEFS",
    "Mark",
    "Marks",
    "case_label",
    "cond_label",
    "escape",
    "humanize_duration",
    "marks",
    "mermaid",
    "mermaid_for",
    "timer_label",
]

#: The ``classDef`` of each highlight class (only the classes used are written).
CLASS_DEFS: dict[str, str] = {
    "cursor": "fill:#ffd54f,stroke:#f57f17,stroke-width:3px",
    "done": "fill:#c8e6c9,stroke:#2e7d32",
    "failed": "fill:#ffcdd2,stroke:#c62828,stroke-width:2px",
    "skipped": "fill:#eeeeee,stroke:#9e9e9e,stroke-dasharray:4 3",
    "missing": "fill:#ffcdd2,stroke:#c62828,stroke-dasharray:4 3",
}

# Opening and closing brackets of each node shape.
_SHAPES: dict[str, tuple[str, str]] = {
    "rect": ("[", "]"),
    "round": ("(", ")"),
    "stadium": ("([", "])"),
    "diamond": ("{", "}"),
    "hexagon": ("{{", "}}"),
    "parallelogram": ("[/", "/]"),
    "fork": ("[/", "\\]"),
    "join": ("[\\", "/]"),
    "flag": (">", "]"),
}

# Characters that must not reach Mermaid as they are: '"' ends a label, '#' starts an
# entity code, '<' '>' '&' would be HTML, '`' starts a Markdown string, '|' delimits edge
# labels, '%' may start a comment.
_ESCAPES = {
    '"': "#quot;",
    "#": "#35;",
    "<": "#lt;",
    ">": "#gt;",
    "&": "#amp;",
    "`": "#96;",
    "|": "#124;",
    "%": "#37;",
}
_ESCAPE_RE = re.compile(r"[\"#<>&`|%\x00-\x1f\x7f\u0085\u2028\u2029]")
_NOTE_MAX = 100


def escape(text: str) -> str:
    """``text`` made safe inside a Mermaid ``"..."`` label (line breaks become spaces)."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m.group(), " "), text)


def humanize_duration(after: timedelta | float) -> str:
    """A short duration: ``3d``, ``24h``, ``90m``, ``90s``, ``1d 2h 3m 4s``, ``1.5s``.

    A duration that is a whole number (two or more) of days, hours or minutes is
    written in the largest such unit, so a day is ``24h`` and 3 days ``3d``;
    anything else under two minutes in seconds, the rest unit by unit.
    """
    td = after if isinstance(after, timedelta) else timedelta(seconds=after)
    if td < timedelta(0):
        return "-" + humanize_duration(-td)
    us = td // timedelta(microseconds=1)
    units = (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000))
    for suffix, size in units:
        if us % size == 0 and us >= 2 * size:
            return f"{us // size}{suffix}"
    if us < 120_000_000:
        return _seconds(us)
    parts = []
    for suffix, size in units:
        if us >= size:
            parts.append(f"{us // size}{suffix}")
            us %= size
    if us:
        parts.append(_seconds(us))
    return " ".join(parts)


def _seconds(us: int) -> str:
    whole, frac = divmod(us, 1_000_000)
    if not frac:
        return f"{whole}s"
    return f"{whole}.{frac:06d}".rstrip("0") + "s"


def cond_label(cond: Cond) -> str:
    """A condition's label in a drawing: a callable's name when it has a meaningful one.

    Else ``cond`` (a lambda, a bool, an expression object).
    """
    if isinstance(cond, bool) or not callable(cond):
        return "cond"
    return _callable_name(cond) or "cond"


def _callable_name(fn: Any) -> str:
    """A callable's meaningful name (a partial's function's), or ``""`` (a lambda)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name or name.startswith("<"):
        return ""
    return name


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not getattr(tp, "__args__", None):
        return tp.__qualname__.rsplit(".", 1)[-1]
    text = str(tp).replace("typing.", "")
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", text)  # drop module paths


def _input_type(handler: Any) -> str:
    """The name of the input type a case's handler validates, or ``""``."""
    from gorch.handlers import Handler, signature_of

    if handler is None:
        return ""
    if isinstance(handler, Handler):
        tp = handler.input_type
    else:
        sig = signature_of(handler)
        if not sig.takes_input or sig.input is None:
            return ""
        tp = sig.input.type
    return "" if tp is None else _type_name(tp)


def timer_label(case: Timeout) -> str:
    """When a Timeout fires, for a drawing: ``3d``, ``at 2025-01-31 09:00 UTC``, ``at due()``."""
    at = case.at
    if at is None:
        return humanize_duration(case.after) if case.after is not None else "?"
    if isinstance(at, datetime):
        if at.utcoffset() is None:  # refused by validation; drawn as written
            return f"at {at.isoformat(sep=' ')}"
        utc = at.astimezone(UTC)
        return f"at {utc.strftime('%Y-%m-%d %H:%M' if not utc.second else '%Y-%m-%d %H:%M:%S')} UTC"
    name = _callable_name(at)
    return f"at {name}()" if name else "at a computed time"


def case_label(case: On | Timeout) -> str:
    """A Select case's label in a drawing: ``event (InputType)``, or ``⏱ timer (3d)``."""
    if isinstance(case, Timeout):
        return f"⏱ {case.event} ({timer_label(case)})"
    tp = _input_type(case.handler)
    return f"{case.event} ({tp})" if tp else case.event


# --------------------------------------------------------------------------- the drawing


@dataclass(slots=True)
class _Node:
    id: str
    shape: str
    label: str


@dataclass(slots=True)
class _Block:
    """The root of the chart or a subgraph: node definitions and nested subgraphs, in order."""

    id: str
    title: str
    items: list[_Node | _Block] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class _Exit:
    """A dangling edge: control leaves ``src`` (by the edge labelled ``label``)."""

    src: str
    label: str = ""
    dashed: bool = False


@dataclass(slots=True)
class _Loop:
    head: str
    breaks: list[_Exit] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class _Ctx:
    """Where the walk is: the block drawn into, the innermost loop, where a Return leads."""

    block: _Block
    loop: _Loop | None = None
    returns_to: str = ""


def _join_labels(*labels: str) -> str:
    return " / ".join(label for label in labels if label)


class _Chart:
    def __init__(self) -> None:
        self.root = _Block("", "")
        self.nodes: dict[str, _Node] = {}
        self.edges: list[tuple[str, str, str, bool]] = []
        self.count = 0
        #: Cursor name (Step, For, Select, WaitFor, Parallel, DAG) -> the node marking it.
        self.named: dict[str, str] = {}
        #: Thread name (a Go, a Parallel branch, a DAG node) -> where the thread starts.
        self.entries: dict[str, str] = {}
        #: DAG name -> node name -> the node or subgraph drawing that DAG node.
        self.dags: dict[str, dict[str, str]] = {}
        self.start = ""
        self.end = ""

    # ---- primitives

    def new_id(self, hint: str) -> str:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", hint).strip("_")[:24].rstrip("_")
        ident = f"n{self.count}_{slug}" if slug else f"n{self.count}"
        self.count += 1
        return ident

    def node(self, block: _Block, shape: str, label: str, hint: str = "", ident: str = "") -> str:
        ident = ident or self.new_id(hint or label)
        n = _Node(ident, shape, label)
        self.nodes[ident] = n
        block.items.append(n)
        return ident

    def subgraph(self, block: _Block, title: str, hint: str) -> _Block:
        sub = _Block(self.new_id(hint), title)
        block.items.append(sub)
        return sub

    def edge(self, src: str, dst: str, label: str = "", dashed: bool = False) -> None:
        self.edges.append((src, dst, label, dashed))

    def connect(self, exits: list[_Exit], dst: str) -> None:
        for e in exits:
            self.edge(e.src, dst, e.label, e.dashed)

    # ---- statements

    def body(self, stmts: tuple[Stmt, ...], exits: list[_Exit], ctx: _Ctx) -> list[_Exit]:
        for st in stmts:
            exits = self.stmt(st, exits, ctx)
        return exits

    def stmt(self, st: Stmt, exits: list[_Exit], ctx: _Ctx) -> list[_Exit]:
        block = ctx.block
        if isinstance(st, Section):
            return self.body(st.stmts, exits, ctx)
        if isinstance(st, Step):
            ident = self.node(block, "rect", st.name)
            self.named[st.name] = ident
            self.connect(exits, ident)
            return [_Exit(ident)]
        if isinstance(st, If):
            ident = self.node(block, "diamond", "if")
            self.connect(exits, ident)
            out: list[_Exit] = []
            last = len(st.branches) - 1
            for i, (cond, branch) in enumerate(st.branches):
                if i and i == last and cond is True:
                    label = "else"
                else:
                    label = f"{'elif' if i else 'if'} {cond_label(cond)}"
                out += self.body(branch, [_Exit(ident, label)], ctx)
            if not (last and st.branches[-1][0] is True):
                out.append(_Exit(ident, "else"))
            return out
        if isinstance(st, Switch):
            ident = self.node(block, "diamond", "switch")
            self.connect(exits, ident)
            out = []
            has_default = False
            for i, case in enumerate(st.cases):
                if i == len(st.cases) - 1 and case.cond is True:
                    label, has_default = "default", True
                else:
                    label = f"case {i + 1}: {cond_label(case.cond)}"
                out += self.body(case.body, [_Exit(ident, label)], ctx)
            if not has_default:
                out.append(_Exit(ident, "no case"))
            return out
        if isinstance(st, For):
            ident = self.node(block, "parallelogram", f"↻ {st.name}", st.name)
            self.named[st.name] = ident
            self.connect(exits, ident)
            loop = _Loop(ident)
            inner = _Ctx(block, loop, ctx.returns_to)
            label = f"while {cond_label(st.cond)}"
            self.connect(self.body(st.body, [_Exit(ident, label)], inner), ident)
            return [_Exit(ident, "done"), *loop.breaks]
        if isinstance(st, Break):
            if ctx.loop is not None:
                ctx.loop.breaks.extend(
                    _Exit(e.src, _join_labels(e.label, "break"), e.dashed) for e in exits
                )
            return []
        if isinstance(st, Continue):
            if ctx.loop is not None:
                for e in exits:
                    self.edge(e.src, ctx.loop.head, _join_labels(e.label, "continue"), e.dashed)
            return []
        if isinstance(st, Select):
            ident = self.node(block, "hexagon", st.name)
            self.named[st.name] = ident
            self.connect(exits, ident)
            out = []
            for sc in st.cases:
                out += self.body(sc.body, [_Exit(ident, case_label(sc))], ctx)
            return out
        if isinstance(st, WaitFor):
            ident = self.node(block, "round", f"wait: {st.name}", st.name)
            self.named[st.name] = ident
            self.connect(exits, ident)
            return [_Exit(ident)]
        if isinstance(st, Return):
            ident = self.node(block, "stadium", "return")
            self.connect(exits, ident)
            if ctx.returns_to:
                self.edge(ident, ctx.returns_to)
            return []
        if isinstance(st, Go):
            ident = self.node(block, "flag", f"go: {st.name}", st.name)
            self.named[st.name] = ident
            self.connect(exits, ident)
            sub = self.subgraph(block, f"thread {st.name}", st.name)
            self.entries[st.name] = sub.id
            self.thread(st.body, [_Exit(ident, "", dashed=True)], sub, "thread end")
            return [_Exit(ident)]
        if isinstance(st, Parallel):
            return self.parallel(st, exits, ctx)
        if isinstance(st, DAG):
            return self.dag(st, exits, ctx)
        ident = self.node(block, "rect", type(st).__name__)  # a statement gorch doesn't know
        self.connect(exits, ident)
        return [_Exit(ident)]

    def thread(
        self,
        stmts: tuple[Stmt, ...],
        exits: list[_Exit],
        block: _Block,
        end: str = "",
        to: str = "",
        always: bool = True,
    ) -> None:
        """Draw a thread's body: its ends lead to node ``to``, or to a new node labelled ``end``.

        Without ``always``, that node is drawn only when an edge to it has a label (a DAG
        node's subgraph: the edges leaving the subgraph say where the flow goes).
        """
        exits = self.body(stmts, exits, _Ctx(block, None, to))
        if to:
            self.connect(exits, to)
        elif exits and (always or any(e.label for e in exits)):
            self.connect(exits, self.node(block, "stadium", end, end))

    def parallel(self, st: Parallel, exits: list[_Exit], ctx: _Ctx) -> list[_Exit]:
        fork = self.node(ctx.block, "fork", f"parallel: {st.name}", st.name)
        self.connect(exits, fork)
        join = self.new_id(f"join {st.name}")
        self.named[st.name] = join
        prefix = f"{st.name}."
        for go in st.branches:
            title = go.name[len(prefix) :] if go.name.startswith(prefix) else go.name
            sub = self.subgraph(ctx.block, title, go.name)
            self.entries[go.name] = sub.id
            self.thread(go.body, [_Exit(fork)], sub, to=join)
        if not st.branches:
            self.edge(fork, join)
        self.node(ctx.block, "join", f"join: {st.name}", ident=join)
        return [_Exit(join)]

    def dag(self, st: DAG, exits: list[_Exit], ctx: _Ctx) -> list[_Exit]:
        fork = self.node(ctx.block, "fork", f"dag: {st.name}", st.name)
        self.connect(exits, fork)
        join = self.new_id(f"join {st.name}")
        self.named[st.name] = join
        sub = self.subgraph(ctx.block, f"DAG {st.name}", st.name)
        reps: dict[str, str] = {}
        for n, go in zip(st.nodes, st.branches, strict=True):
            if isinstance(n, Node):
                inner = self.subgraph(sub, n.name, n.name)
                self.thread(n.body, [], inner, "node end", always=False)
                reps[n.name] = inner.id
            else:
                reps[n.name] = self.stmt(n, [], _Ctx(sub))[0].src
            self.entries[go.name] = reps[n.name]
        self.dags[st.name] = reps
        needed = {a for n in st.nodes for a in n.after}
        for n in st.nodes:
            for a in n.after:
                self.edge(reps[a], reps[n.name])
            if not n.after:
                self.edge(fork, reps[n.name])
        for n in st.nodes:
            if n.name not in needed:
                self.edge(reps[n.name], join)
        if not st.nodes:
            self.edge(fork, join)
        self.node(ctx.block, "join", f"join: {st.name}", ident=join)
        return [_Exit(join)]

    # ---- output

    def render(self, notes: dict[str, list[str]], classes: dict[str, list[str]]) -> str:
        lines = ["flowchart TD"]
        self._emit(self.root, notes, lines, "    ")
        for src, dst, label, dashed in self.edges:
            arrow = "-.->" if dashed else "-->"
            text = f'|"{escape(label)}"|' if label else ""
            lines.append(f"    {src} {arrow}{text} {dst}")
        for name, ids in classes.items():
            if ids:
                lines.append(f"    classDef {name} {CLASS_DEFS[name]}")
                lines.append(f"    class {','.join(ids)} {name}")
        return "\n".join(lines) + "\n"

    def _emit(
        self, block: _Block, notes: dict[str, list[str]], lines: list[str], indent: str
    ) -> None:
        for item in block.items:
            if isinstance(item, _Block):
                title = "<br/>".join([escape(item.title), *_notes(notes.get(item.id, []))])
                lines.append(f'{indent}subgraph {item.id} ["{title}"]')
                self._emit(item, notes, lines, indent + "    ")
                lines.append(f"{indent}end")
            else:
                label = "<br/>".join([escape(item.label), *_notes(notes.get(item.id, []))])
                opening, closing = _SHAPES[item.shape]
                lines.append(f'{indent}{item.id}{opening}"{label}"{closing}')


# --------------------------------------------------------------------------- cursors


def _notes(notes: list[str]) -> list[str]:
    """The escaped notes of one node; past a few, the rest are counted, not listed."""
    if len(notes) > _NOTES_MAX:
        notes = [*notes[: _NOTES_MAX - 1], f"… and {len(notes) - _NOTES_MAX + 1} more"]
    return [escape(n) for n in notes]


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _NOTE_MAX else text[: _NOTE_MAX - 1] + "…"


def _event_note(w: WaitEvent) -> str:
    """An awaited event: its name, and a timer's due time (UTC) or a failed setup."""
    if w.status is EventStatus.SETUP_ERROR:
        return f"{w.req.name} (setup failed)"
    due = due_time(w.req)
    if due is None:
        return w.req.name
    due = due.astimezone(UTC)
    when = due.strftime("%Y-%m-%d %H:%M:%S" if due.second else "%Y-%m-%d %H:%M")
    return f"{w.req.name} (due {when} UTC)"


def _status_note(t: Thread, state: State, chart: _Chart) -> str:
    """What thread ``t`` is doing, e.g. ``[_main_] waiting: decide, expired (due ...)``."""
    ident = chart.named.get(t.cur_step, "")
    shape = chart.nodes[ident].shape if ident in chart.nodes else ""
    if t.error:
        what = f"failed (attempt {t.attempts}): {t.error}"
    elif not t.cur_step:
        what = "not started"
    elif t.status is ThreadStatus.WAITING_EVENT:
        events = [_event_note(w) for w in t.wait_events if w.status in ACTIVE_EVENT]
        what = f"waiting: {', '.join(events)}" if events else "waiting"
    elif t.status is ThreadStatus.WAITING_CONDITION:
        running = sum(1 for o in state.threads if o.parent == t.id)
        dag = chart.dags.get(t.cur_step)
        if dag is not None:
            what = f"waiting: {len(t.nodes)}/{len(dag)} nodes ended, {running} running"
        elif shape == "join":
            what = f"waiting: {running} branch{'es' if running != 1 else ''} running"
        else:
            what = "waiting: condition"
    elif t.status is ThreadStatus.EXECUTING:
        what = "executing"
    elif t.case:
        what = f"resuming after: {t.case}"
    else:
        what = _RESUMING.get(shape, "resuming")
    return _short(f"[{t.id}] {what}")


_RESUMING = {
    "rect": "step done, resuming",
    "round": "condition met, resuming",
    "join": "joined, resuming",
}
_NOTES_MAX = 6  # notes in one label; the rest are counted


_NODE_CLASS = {"completed": "done", "failed": "failed", "skipped": "skipped"}


def _mark(chart: _Chart, state: State | None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    notes: dict[str, list[str]] = {}
    classes: dict[str, list[str]] = {name: [] for name in CLASS_DEFS}
    if state is None:
        return notes, classes

    def add(cls: str, ident: str, note: str) -> None:
        if ident not in classes[cls]:
            classes[cls].append(ident)
        if note:
            notes.setdefault(ident, []).append(note)

    for t in state.threads:
        note = _status_note(t, state, chart)
        if t.cur_step:
            ident = chart.named.get(t.cur_step)
            if ident is None:  # a cursor this definition no longer has
                ident = chart.node(chart.root, "rect", f"⚠ {t.cur_step} (not in the definition)")
                add("missing", ident, "")
            add("cursor", ident, note)
        else:  # not started yet: the start of its thread
            ident = chart.start if t.name == MAIN_THREAD else chart.entries.get(t.name, "")
            if not ident:
                ident = chart.node(chart.root, "rect", f"⚠ thread {t.name} (not in the definition)")
                add("missing", ident, "")
            add("cursor", ident, note)
        dag = chart.dags.get(t.cur_step)
        if dag is not None:
            for name, status in t.nodes.items():
                ident = dag.get(name, "")
                if ident:
                    err = t.node_errors.get(name, "")
                    add(
                        _NODE_CLASS[status.value],
                        ident,
                        _short(f"{status.value}: {err}" if err else status.value),
                    )
    if state.status is WorkflowStatus.FINISHED:
        add("cursor", chart.end, "finished")
    return notes, classes


# --------------------------------------------------------------------------- entry points


def _instance(
    workflow: type[Workflow] | Workflow, data: Workflow | Mapping[str, Any] | None
) -> tuple[Workflow, list[str]]:
    """The instance to call ``definition()`` on, and the required fields it lacks."""
    if isinstance(workflow, Workflow):
        if data is not None:
            raise TypeError("pass data= only with a workflow class, not with an instance")
        return workflow, []
    if not (isinstance(workflow, type) and issubclass(workflow, Workflow)):
        raise TypeError(f"expected a gorch.Workflow subclass or instance, got {workflow!r}")
    cls = workflow
    if isinstance(data, Workflow):
        if not isinstance(data, cls):
            raise TypeError(f"data is a {type(data).__name__}, not a {cls.__name__}")
        return data, []
    if data is not None:
        try:
            return cls.model_validate(dict(data)), []
        except pydantic.ValidationError as e:
            errors = e.errors(include_url=False, include_context=False)
            raise InvalidWorkflowData(cls.__name__, summarize_validation(errors), errors) from e
        except (TypeError, ValueError) as e:  # not a mapping
            raise InvalidWorkflowData(cls.__name__, str(e)) from e
    missing = [name for name, f in cls.model_fields.items() if f.is_required()]
    if not missing:
        try:
            return cls(), []
        except pydantic.ValidationError:
            pass  # a default that does not validate: draw from the raw defaults
    return cls.model_construct(), missing


def _definition(wf: Workflow, missing: list[str]) -> Section:
    owner = type(wf).__qualname__
    try:
        root = wf.definition()
    except GorchError:
        raise
    except Exception as e:
        hint = ""
        if missing:
            hint = (
                f" (drawn without data: required field{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} {'have' if len(missing) > 1 else 'has'} no value; "
                "pass data= to gorch.graph.mermaid)"
            )
        raise DefinitionError(f"{owner}.definition() raised {type(e).__name__}: {e}{hint}") from e
    if not isinstance(root, Section):
        if not isinstance(root, Stmt):
            raise DefinitionError(
                f"{owner}.definition() must return a statement such as S(...), got {root!r}"
            )
        root = Section(root)
    index_definition(root, owner)
    return root


def mermaid(
    workflow_cls: type[Workflow] | Workflow,
    state: State | None = None,
    *,
    data: Workflow | Mapping[str, Any] | None = None,
) -> str:
    """The definition of a workflow as a Mermaid ``flowchart TD``, with ``state``'s cursors.

    ``workflow_cls`` is a workflow class, or an instance (then without ``data``).
    ``definition()`` is called on the instance given (as ``workflow_cls`` or
    ``data``), else on the class
    validated from the ``data`` dict, else on ``cls()`` when every field has a
    default, else on ``cls.model_construct()`` (a definition that reads a field
    without a value then fails with :class:`DefinitionError` asking for ``data``).
    Give the data of the instance ``state`` belongs to when the shape of the
    definition depends on data.

    With ``state``, the node each thread sits on gets class ``cursor`` and a
    note (``[thread id] waiting: decide, expired``); the nodes of a DAG a thread
    waits at get ``done`` / ``failed`` / ``skipped``; a finished workflow marks
    its end node. A cursor whose name the definition no longer has is drawn as
    a separate node of classes ``missing`` and ``cursor``.

    Raises :class:`DefinitionError` when ``definition()`` raises or returns an
    invalid tree, :class:`InvalidWorkflowData` when the ``data`` dict does not
    validate. The output is deterministic: same definition and state, same text.
    """
    _root, chart, notes, classes = _charted(workflow_cls, state, data)
    return chart.render(notes, classes)


def _charted(
    workflow_cls: type[Workflow] | Workflow,
    state: State | None,
    data: Workflow | Mapping[str, Any] | None,
) -> tuple[Section, _Chart, dict[str, list[str]], dict[str, list[str]]]:
    """The definition, its chart, and the notes and classes ``state`` puts on its nodes."""
    wf, missing = _instance(workflow_cls, data)
    root = _definition(wf, missing)
    chart = _Chart()
    chart.start = chart.node(chart.root, "stadium", "start")
    chart.end = chart.new_id("end")
    chart.thread(root.stmts, [_Exit(chart.start)], chart.root, to=chart.end)
    chart.node(chart.root, "stadium", "end", ident=chart.end)
    notes, classes = _mark(chart, state)
    return root, chart, notes, classes


def mermaid_for(wf: Workflow, state: State | None = None) -> str:
    """``mermaid(wf, state)``: the diagram of a workflow instance and its state."""
    return mermaid(wf, state)


# --------------------------------------------------------------------------- for other renderers


@dataclass(frozen=True, slots=True)
class Mark:
    """How one node is highlighted: its classes (keys of :data:`CLASS_DEFS`) and notes."""

    classes: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()


_UNMARKED = Mark()


@dataclass(frozen=True, slots=True)
class Marks:
    """A definition and what :func:`mermaid` would highlight in it, by name, not by node.

    For a renderer of its own (the HTTP inspector draws the tree as HTML): it
    walks ``root`` and asks, for each statement or thread, how to mark it.
    """

    root: Section
    """The definition, validated as the interpreter sees it."""
    start: Mark
    end: Mark
    named: Mapping[str, Mark]
    """By statement name: a Step, For, Select, WaitFor or Go; a Parallel's or DAG's join."""
    entries: Mapping[str, Mark]
    """By thread name (a Go, a Parallel branch, a DAG node): a thread not started yet."""
    dag_nodes: Mapping[str, Mapping[str, Mark]]
    """By DAG name, then node name: completed / failed / skipped nodes of a running DAG."""
    missing: tuple[tuple[str, Mark], ...] = ()
    """Cursors (and threads) the definition no longer has: a label and its mark each."""

    def of(self, name: str) -> Mark:
        """The mark of the statement named ``name`` (no classes, no notes if none)."""
        return self.named.get(name, _UNMARKED)

    def entry(self, thread: str) -> Mark:
        return self.entries.get(thread, _UNMARKED)

    def dag_node(self, dag: str, node: str) -> Mark:
        return self.dag_nodes.get(dag, {}).get(node, _UNMARKED)


def marks(
    workflow_cls: type[Workflow] | Workflow,
    state: State | None = None,
    *,
    data: Workflow | Mapping[str, Any] | None = None,
) -> Marks:
    """The definition and the highlights of ``state`` that :func:`mermaid` draws, by name.

    Same arguments, same errors and same notes as :func:`mermaid`; the notes are
    plain text (a renderer escapes them for its own format).
    """
    root, chart, notes, classes = _charted(workflow_cls, state, data)

    def mark(ident: str) -> Mark:
        found = frozenset(name for name, ids in classes.items() if ident in ids)
        listed = notes.get(ident, [])
        if len(listed) > _NOTES_MAX:
            more = len(listed) - _NOTES_MAX + 1
            listed = [*listed[: _NOTES_MAX - 1], f"… and {more} more"]
        return Mark(found, tuple(listed)) if found or listed else _UNMARKED

    missing = tuple(
        (chart.nodes[ident].label, mark(ident))
        for ident in classes["missing"]
        if ident in chart.nodes
    )
    return Marks(
        root=root,
        start=mark(chart.start),
        end=mark(chart.end),
        named={name: mark(ident) for name, ident in chart.named.items()},
        entries={name: mark(ident) for name, ident in chart.entries.items()},
        dag_nodes={
            dag: {node: mark(ident) for node, ident in nodes.items()}
            for dag, nodes in chart.dags.items()
        },
        missing=missing,
    )
