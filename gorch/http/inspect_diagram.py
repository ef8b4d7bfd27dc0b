"""A workflow's definition drawn as nested HTML boxes, with an instance's cursors marked.

The inspector page shows the diagram without any JavaScript or network: the
statement tree is laid out by the browser's own flexbox, top to bottom, a
branching statement (``If``, ``Switch``, ``Select``) above its branches side
by side, a loop or a thread as a box around its body. What is highlighted
comes from :func:`gorch.graph.marks`, so the page and the Mermaid text of
``GET /workflows/{id}/graph`` always agree on where a thread sits.

Every node is a ``div.node`` with ``data-kind`` (``step``, ``select``...) and,
for a named statement, ``data-name``; a node a thread sits on also has the
class ``cursor`` (``done`` / ``failed`` / ``skipped`` for a DAG's ended nodes,
``missing`` for a cursor the definition lost) and lists its notes. Every
string from the definition or the state is escaped (:mod:`markupsafe`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from markupsafe import Markup

from gorch.graph import Mark, Marks, case_label, cond_label, timer_label
from gorch.statements import (
    DAG,
    Break,
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

__all__ = ["diagram"]

_LINK = Markup('<div class="link" aria-hidden="true"></div>')
_CLASS_ORDER = ("cursor", "done", "failed", "skipped", "missing")


def _classes(mark: Mark, *extra: str) -> str:
    return " ".join([*extra, *(c for c in _CLASS_ORDER if c in mark.classes)])


def _notes(mark: Mark) -> Markup:
    if not mark.notes:
        return Markup("")
    items = Markup("").join(Markup("<li>{}</li>").format(n) for n in mark.notes)
    return Markup('<ul class="notes">{}</ul>').format(items)


def _node(kind: str, label: str, mark: Mark, name: str | None = None, icon: str = "") -> Markup:
    """One box: ``div.node.k-{kind}`` with its label, and its notes when a thread is there."""
    named = Markup("") if name is None else Markup(' data-name="{}"').format(name)
    badge = Markup('<span class="icon" aria-hidden="true">{}</span>').format(icon) if icon else ""
    return Markup(
        '<div class="{}" data-kind="{}"{}>{}<span class="label">{}</span>{}</div>'
    ).format(_classes(mark, "node", f"k-{kind}"), kind, named, badge, label, _notes(mark))


def _flow(items: Iterable[Markup], extra: str = "") -> Markup:
    """Items one below the other, joined by arrows."""
    listed = list(items)
    if not listed:
        return Markup('<div class="flow empty{}"><div class="link"></div></div>').format(extra)
    return Markup('<div class="flow{}">{}</div>').format(extra, _LINK.join(listed))


def _case(case: On | Timeout) -> str:
    """A Select case's edge label; a timer's with a clock any system font has."""
    if isinstance(case, Timeout):
        return f"◷ {case.event} ({timer_label(case)})"
    return case_label(case)


def _branches(parts: Sequence[tuple[str, Markup]], kind: str = "branch") -> Markup:
    """Columns side by side, each under its edge label."""
    cols = Markup("").join(
        Markup('<div class="{}">{}{}</div>').format(
            kind, Markup('<div class="edge">{}</div>').format(label) if label else "", body
        )
        for label, body in parts
    )
    return Markup('<div class="branches">{}</div>').format(cols)


class _Renderer:
    def __init__(self, marks: Marks) -> None:
        self.marks = marks

    def body(self, stmts: Iterable[Stmt]) -> list[Markup]:
        out: list[Markup] = []
        for st in stmts:
            if isinstance(st, Section):
                out += self.body(st.stmts)
            else:
                out.append(self.stmt(st))
        return out

    def stmt(self, st: Stmt) -> Markup:
        m = self.marks
        if isinstance(st, Step):
            return _node("step", st.name, m.of(st.name), st.name)
        if isinstance(st, If):
            last = len(st.branches) - 1
            parts = []
            for i, (cond, branch) in enumerate(st.branches):
                if i and i == last and cond is True:
                    label = "else"
                else:
                    label = f"{'elif' if i else 'if'} {cond_label(cond)}"
                parts.append((label, _flow(self.body(branch))))
            if not (last and st.branches[-1][0] is True):
                parts.append(("else", _flow([])))
            return self.split(_node("if", "if", Mark(), icon="◇"), parts)
        if isinstance(st, Switch):
            parts = []
            has_default = False
            for i, case in enumerate(st.cases):
                if i == len(st.cases) - 1 and case.cond is True:
                    label, has_default = "default", True
                else:
                    label = f"case {i + 1}: {cond_label(case.cond)}"
                parts.append((label, _flow(self.body(case.body))))
            if not has_default:
                parts.append(("no case", _flow([])))
            return self.split(_node("switch", "switch", Mark(), icon="◇"), parts)
        if isinstance(st, Select):
            head = _node("select", st.name, m.of(st.name), st.name, icon="⬡")
            parts = [(_case(c), _flow(self.body(c.body))) for c in st.cases]
            return self.split(head, parts)
        if isinstance(st, For):
            head = _node("for", st.name, m.of(st.name), st.name, icon="↻")
            return Markup(
                '<div class="box loop">{}{}{}<div class="back">↺ back to {}</div></div>'
            ).format(
                head,
                Markup('<div class="edge">while {}</div>').format(cond_label(st.cond)),
                _flow(self.body(st.body)),
                st.name,
            )
        if isinstance(st, WaitFor):
            label = f"{st.name} (until {cond_label(st.cond)})"
            return _node("wait", label, m.of(st.name), st.name, icon="◷")
        if isinstance(st, Return):
            return _node("return", "return", Mark())
        if isinstance(st, Break):
            return _node("jump", "break", Mark())
        if isinstance(st, Continue):
            return _node("jump", "continue", Mark())
        if isinstance(st, Go):
            flag = _node("go", f"go: {st.name}", m.of(st.name), st.name, icon="⚑")
            thread = self.thread(f"thread {st.name}", st.name, st.body, "thread end")
            return Markup('<div class="spawn">{}{}</div>').format(flag, thread)
        if isinstance(st, Parallel):
            return self.parallel(st)
        if isinstance(st, DAG):
            return self.dag(st)
        return _node("unknown", type(st).__name__, Mark())

    def split(self, head: Markup, parts: Sequence[tuple[str, Markup]]) -> Markup:
        return Markup('<div class="split">{}{}</div>').format(head, _branches(parts))

    def thread(self, title: str, thread: str, body: Iterable[Stmt], end: str = "") -> Markup:
        """A thread's box: its title (marked while the thread has not started), its body."""
        entry = self.marks.entry(thread)
        items = self.body(body)
        if end:
            items.append(_node("end", end, Mark()))
        head = Markup('<div class="{}" data-thread="{}"><span class="label">{}</span>{}</div>')
        return Markup('<div class="box thread">{}{}</div>').format(
            head.format(_classes(entry, "title"), thread, title, _notes(entry)), _flow(items)
        )

    def parallel(self, st: Parallel) -> Markup:
        m = self.marks
        fork = _node("fork", f"parallel: {st.name}", Mark(), icon="⋔")
        prefix = f"{st.name}."
        cols = [
            ("", self.thread(go.name.removeprefix(prefix), go.name, go.body)) for go in st.branches
        ]
        join = _node("join", f"join: {st.name}", m.of(st.name), st.name, icon="⊻")
        return Markup('<div class="split">{}{}{}{}</div>').format(
            fork, _LINK, _branches(cols, "lane"), Markup("{}{}").format(_LINK, join)
        )

    def dag(self, st: DAG) -> Markup:
        m = self.marks
        fork = _node("fork", f"dag: {st.name}", Mark(), icon="⋔")
        rows = []
        for layer in _layers(st):
            cols = []
            for node in layer:
                mark = m.dag_node(st.name, node.name)
                after = ", ".join(node.after)
                head = Markup(
                    '<div class="{}" data-node="{}"><span class="label">{}</span>{}{}</div>'
                ).format(
                    _classes(mark, "title"),
                    node.name,
                    node.name,
                    Markup('<span class="after">after {}</span>').format(after) if after else "",
                    _notes(mark),
                )
                inner = self.body(node.body) if isinstance(node, Node) else []
                body = _flow(inner) if inner else Markup("")
                cols.append(("", Markup('<div class="box thread">{}{}</div>').format(head, body)))
            rows.append(_branches(cols, "lane"))
        box = Markup('<div class="box dag"><div class="title">DAG {}</div>{}</div>').format(
            st.name, _flow(rows, " layers")
        )
        join = _node("join", f"join: {st.name}", m.of(st.name), st.name, icon="⊻")
        return Markup('<div class="split">{}{}{}{}{}</div>').format(fork, _LINK, box, _LINK, join)


def _layers(st: DAG) -> list[list[Step | Node]]:
    """The DAG's nodes by depth (longest path from a node without ``after``), in order."""
    depth: dict[str, int] = {}
    by_name = {n.name: n for n in st.nodes}

    def level(name: str, seen: frozenset[str]) -> int:
        if name in depth:
            return depth[name]
        node = by_name.get(name)
        if node is None or name in seen:  # validated trees have neither; never loop
            return 0
        d = 1 + max((level(a, seen | {name}) for a in node.after), default=-1)
        depth[name] = d
        return d

    layers: dict[int, list[Step | Node]] = {}
    for node in st.nodes:
        layers.setdefault(level(node.name, frozenset()), []).append(node)
    return [layers[k] for k in sorted(layers)]


def diagram(marks: Marks) -> Markup:
    """The definition of ``marks`` as HTML, from its start to its end, cursors marked."""
    r = _Renderer(marks)
    items = [
        _node("start", "start", marks.start),
        *r.body(marks.root.stmts),
        _node("end", "end", marks.end),
    ]
    lost = Markup("")
    if marks.missing:
        nodes = Markup("").join(
            _node("missing", label, mark, icon="⚠") for label, mark in marks.missing
        )
        lost = Markup(
            '<div class="box lost"><div class="title">not in the current definition</div>{}</div>'
        ).format(nodes)
    return Markup('<div class="diagram">{}{}</div>').format(_flow(items, " root"), lost)
