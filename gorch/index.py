"""Validation of a definition and the name → path index that finds cursors.

A *path* addresses a statement in a build: ``(i0, c0, i1, c1, ..., ik)`` means
"statement ``i0`` of the root body, its body ``c0``, statement ``i1`` of that
body, ..., statement ``ik``". The index of a workflow class is kept across
calls and builds; a path is checked against the build it is used on, and the
build is re-indexed (and re-validated) only when the shape has changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

from gorch.errors import DefinitionError
from gorch.handlers import (
    _ASYNC_CODE,
    Handler,
    async_handler_methods,
    aware_due_time,
    describe,
    is_async,
    signature_of,
)
from gorch.statements import (
    DAG,
    K_BREAK,
    K_CONTINUE,
    K_DAG,
    K_FOR,
    K_GO,
    K_IF,
    K_NODE,
    K_PARALLEL,
    K_SELECT,
    K_STEP,
    K_SWITCH,
    K_WAITFOR,
    NAMED_KINDS,
    Body,
    Case,
    Node,
    On,
    Parallel,
    Section,
    Select,
    Step,
    Stmt,
    Timeout,
    label_of,
)

Path = tuple[int, ...]

_KIND_LABEL = {
    K_STEP: "Step",
    K_FOR: "For",
    K_SELECT: "Select",
    K_GO: "Go",
    K_WAITFOR: "WaitFor",
    K_PARALLEL: "Parallel",
    K_DAG: "DAG",
}


def index_definition(root: Section, owner: str, asyncs: list[str] | None = None) -> dict[str, Path]:
    """Validate ``root`` and return the path of every named statement.

    Raises :class:`DefinitionError` naming the offending statement. Every async
    callable found (step, condition, Go id, WaitFor or event handler) is
    described in ``asyncs``: the sync API refuses such a definition up front.
    """
    paths: dict[str, Path] = {}
    _visit(root.stmts, (), paths, owner, False, set(), [] if asyncs is None else asyncs)
    return paths


def _visit(
    body: Any,
    prefix: Path,
    paths: dict[str, Path],
    owner: str,
    in_for: bool,
    nodes: set[int],
    asyncs: list[str],
) -> None:
    """Validate ``body``; ``nodes`` holds the ids of the DAG nodes seen (Step(after=) is one)."""
    if not isinstance(body, tuple):
        raise DefinitionError(f"{owner}: a body must be a tuple of statements, got {body!r}")
    for i, st in enumerate(body):
        if type(st) is Step:  # the common case, kept short: definitions are re-validated
            name = st.name
            code = getattr(st.fn, "__code__", None)  # a function or bound method
            if (
                type(name) is str
                and name
                and name not in paths
                and code is not None
                and not code.co_flags & _ASYNC_CODE
                and (st._after is None or id(st) in nodes)
            ):
                paths[name] = (*prefix, i)
                continue
        if not isinstance(st, Stmt):
            where = f"after {body[i - 1]!r}" if i else "at the start of a body"
            hint = (
                "wrap a function in Step(fn) (named after it) or Step(name, fn)"
                if callable(st)
                else "a body holds statements: Step, If, Select, ..."
            )
            raise DefinitionError(f"{owner}: {st!r} ({where}) is not a statement; {hint}")
        path = (*prefix, i)
        kind = st._kind
        if kind in NAMED_KINDS:
            name = st.name  # type: ignore[attr-defined]
            label = _KIND_LABEL[kind]
            if not isinstance(name, str) or not name:
                if kind == K_STEP and callable(name) and isinstance(st.fn, str):  # type: ignore[attr-defined]
                    raise DefinitionError(
                        f"{owner}: Step({name!r}, {st.fn!r}) has its arguments swapped: "  # type: ignore[attr-defined]
                        "Step(name, fn), or Step(fn) to name it after the function"
                    )
                raise DefinitionError(f"{owner}: {label} needs a non-empty str name, got {name!r}")
            if name in paths:
                raise DefinitionError(
                    f"{owner}: the name {name!r} is used twice; names of Step, For, Select, "
                    "WaitFor and Go are cursors and must be unique in a definition"
                    + _same_function_hint(st)
                )
            if kind == K_GO and name == "_main_":
                raise DefinitionError(f"{owner}: '_main_' is the main thread's name, not a Go's")
            paths[name] = path
        if kind == K_STEP:
            if not callable(st.fn):  # type: ignore[attr-defined]
                raise DefinitionError(f"{owner}: Step {st.name!r} needs a callable, got {st.fn!r}")  # type: ignore[attr-defined]
            if is_async(st.fn):  # type: ignore[attr-defined]
                asyncs.append(f"Step {st.name!r} ({describe(st.fn)})")  # type: ignore[attr-defined]
            if st.after and id(st) not in nodes:  # type: ignore[attr-defined]
                raise DefinitionError(
                    f"{owner}: Step {st.name!r} has after= but is not a node of a DAG; "  # type: ignore[attr-defined]
                    "use DAG(name, ...nodes) or plain sequencing (a >> b)"
                )
        elif kind == K_NODE:
            raise DefinitionError(
                f"{owner}: {st!r} is not inside a DAG; a Node is only meaningful as a DAG node"
            )
        elif kind == K_DAG:
            graph_of(st, owner)  # type: ignore[arg-type]
            nodes.update(id(n) for n in st.nodes)  # type: ignore[attr-defined]
        elif kind == K_SELECT:
            _check_select(st, owner, asyncs)  # type: ignore[arg-type]
        elif kind == K_SWITCH:
            for c in st.cases:  # type: ignore[attr-defined]
                if not isinstance(c, Case):
                    raise DefinitionError(f"{owner}: Switch takes Case/Default, got {c!r}")
                _check_cond(c.cond, "a Case of a Switch", asyncs)
        elif kind == K_WAITFOR:
            h = st.handler  # type: ignore[attr-defined]
            if h is not None and not callable(h):
                raise DefinitionError(
                    f"{owner}: WaitFor {st.name!r} handler must be callable, got {h!r}"  # type: ignore[attr-defined]
                )
            _check_cond(st.cond, f"WaitFor {st.name!r}", asyncs)  # type: ignore[attr-defined]
            if h is not None and is_async(h):
                asyncs.append(f"the handler of WaitFor {st.name!r} ({describe(h)})")  # type: ignore[attr-defined]
        elif kind == K_IF:
            for cond, _ in st.branches:  # type: ignore[attr-defined]
                _check_cond(cond, "an If", asyncs)
        elif kind == K_FOR:
            _check_cond(st.cond, f"For {st.name!r}", asyncs)  # type: ignore[attr-defined]
        elif kind == K_GO:
            gid = st.id  # type: ignore[attr-defined]
            if gid is not None and type(gid) is not str and is_async(gid):
                asyncs.append(f"the id of Go {st.name!r} ({describe(gid)})")  # type: ignore[attr-defined]
        elif kind in (K_BREAK, K_CONTINUE) and not in_for:
            raise DefinitionError(f"{owner}: {st!r} outside a For loop (of the same thread)")
        children = st.children()
        inner_for = True if kind == K_FOR else (False if kind == K_GO else in_for)
        for c, child in enumerate(children):
            _visit(child, (*path, c), paths, owner, inner_for, nodes, asyncs)


def _same_function_hint(st: Stmt) -> str:
    """For a Step named after its function: how to run one function in two steps."""
    if type(st) is Step and getattr(st.fn, "__name__", None) == st.name:
        return (
            f" (Step(fn) is named after the function: give the other step its own name, "
            f"Step('{st.name}_2', fn))"
        )
    return ""


def _check_cond(cond: Any, where: str, asyncs: list[str]) -> None:
    if type(cond) is not bool and callable(cond) and is_async(cond):
        asyncs.append(f"the condition of {where} ({describe(cond)})")


class DagGraph:
    """The dependency structure of one DAG build, checked for cycles and unknown names.

    ``order`` is definition order; ``deps`` and ``dependents`` are per node
    name. Scheduling a completed node looks only at its dependents, so a DAG
    of n nodes costs O(n + edges), not O(n²).
    """

    __slots__ = ("dependents", "deps", "order")

    def __init__(self, order: Sequence[str], deps: dict[str, tuple[str, ...]]) -> None:
        self.order = tuple(order)
        self.deps = deps
        self.dependents: dict[str, list[str]] = {n: [] for n in order}
        for n in order:
            for d in deps[n]:
                self.dependents[d].append(n)

    def descendants(self, name: str) -> list[str]:
        """Every node that depends on ``name``, directly or not, in definition order."""
        seen: set[str] = set()
        todo = [name]
        while todo:
            for d in self.dependents[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return [n for n in self.order if n in seen]


#: Checked graphs by shape: each node's type, name and ``after=`` names, in order.
#: ``definition()`` builds a DAG again on every call; a shape seen before is not
#: checked again (unknown names, duplicates, cycles: as much work per node as
#: running it). Emptied when full: shapes that vary with data cannot grow it.
_GRAPHS: dict[tuple[tuple[type, str, tuple[str, ...]], ...], DagGraph] = {}
_GRAPHS_MAX = 256


def graph_of(dag: DAG, owner: str = "") -> DagGraph:
    """The checked graph of ``dag`` (cached on the object, and by shape: see ``_GRAPHS``)."""
    graph: DagGraph | None = getattr(dag, "_graph", None)
    if graph is not None:
        return graph
    try:
        shape = tuple([(type(n), n.name, n.after) for n in dag.nodes])
        graph = _GRAPHS.get(shape)
    except (AttributeError, TypeError):  # not a node, or an unhashable name: refused below
        shape = None
    if graph is None:
        graph = _checked_graph(dag, owner)
        if shape is not None:
            if len(_GRAPHS) >= _GRAPHS_MAX:
                _GRAPHS.clear()
            _GRAPHS[shape] = graph
    dag._graph = graph  # type: ignore[attr-defined]
    return graph


def _checked_graph(dag: DAG, owner: str) -> DagGraph:
    """The graph of ``dag``, or DefinitionError: a node that is none, a name unknown or
    given twice, a cycle."""
    where = f"{owner}: DAG {dag.name!r}" if owner else f"DAG {dag.name!r}"
    deps: dict[str, tuple[str, ...]] = {}
    for n in dag.nodes:
        if not isinstance(n, (Step, Node)):
            raise DefinitionError(f"{where}: {n!r} cannot be a node; {_node_hint(n)}")
        if not isinstance(n.name, str) or not n.name:
            raise DefinitionError(f"{where}: a node needs a non-empty str name, {_unnamed(n)}")
        if n.name in deps:
            raise DefinitionError(
                f"{where}: node {n.name!r} appears twice; node names are unique in a DAG "
                "(Step(fn) is named after its function, a composite after its label: "
                "name one of them, e.g. Step('name', fn), Node('name', ...), "
                "S(..., name='name'), Parallel('name', ...))"
            )
        deps[n.name] = n.after
    for name, after in deps.items():
        for a in after:
            if a == name:
                raise DefinitionError(f"{where}: node {name!r} comes after itself")
            if a not in deps:
                raise DefinitionError(
                    f"{where}: node {name!r} comes after {a!r}, which is not a node of this DAG"
                    f" (nodes: {', '.join(deps)}){_unknown_hint(dag, a)}"
                )
        if len(set(after)) != len(after):
            raise DefinitionError(f"{where}: node {name!r} lists a node twice in after=")
    graph = DagGraph(list(deps), deps)
    cycle = _find_cycle(graph)
    if cycle:
        raise DefinitionError(f"{where} has a cycle: {' -> '.join(cycle)}")
    return graph


def _node_hint(n: object) -> str:
    """What to write instead of ``n`` as a DAG node."""
    kinds = (
        "a node is a Step (Step(fn, after=[...]) or Step(name, fn, after=[...])), "
        "a Node(name, *body, after=[...]), or a Section, Parallel (a | b) or DAG "
        "placed as is (named by its label)"
    )
    if isinstance(n, Stmt):
        return f"{kinds}; wrap it in Node('name', {n!r}, after=[...])"
    if callable(n):
        return f"{kinds}; wrap a function in Step(fn) to run it as a node"
    return kinds


def _unnamed(n: Step | Node) -> str:
    if isinstance(n, Node) and n.name == "" and n.body:
        return (
            f"but the node made of {list(n.body)!r} has no label (none of its statements "
            "has a name); name it with Node('name', ...) or S(..., name='name')"
        )
    if isinstance(n, Node) and n.name == "":
        return "but an empty composite (S() or a Parallel without branches) has none: remove it"
    return f"got {n.name!r}"


def _unknown_hint(dag: DAG, name: str) -> str:
    """Why ``name`` in ``after=`` may not be a node: it names a function or an inner statement."""
    for n in dag.nodes:
        if isinstance(n, Step) and getattr(n.fn, "__name__", None) == name:
            return (
                f"; the function {name}() runs as node {n.name!r}: "
                f"write after=[{n.name!r}] or pass that Step"
            )
    for n in dag.nodes:
        if isinstance(n, Node) and _names_inside(n.body, name):
            return (
                f"; {name!r} is inside node {n.name!r}: a node waits for whole nodes, "
                f"write after=[{n.name!r}]"
            )
    return "; after= takes node names, their Step or Node, or a function run by Step(fn)"


def _names_inside(body: Body, name: str) -> bool:
    for st in body:
        if not isinstance(st, Stmt):
            continue
        if getattr(st, "name", None) == name or (
            isinstance(st, (Section, Parallel)) and label_of(st) == name
        ):
            return True
        if any(_names_inside(child, name) for child in st.children()):
            return True
    return False


def _find_cycle(graph: DagGraph) -> list[str]:
    """A cycle as a list of names (first == last), or [] when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in graph.order:
        if start in state:
            continue
        path: list[str] = [start]
        stack = [iter(graph.deps[start])]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                cycle = path[path.index(nxt) :]
                return [*reversed([*cycle, nxt])]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(graph.deps[nxt]))
    return []


def _check_select(st: Select, owner: str, asyncs: list[str]) -> None:
    if not st.cases:
        raise DefinitionError(f"{owner}: Select {st.name!r} has no cases")
    seen: set[str] = set()
    for c in st.cases:
        if not isinstance(c, (On, Timeout)):
            raise DefinitionError(f"{owner}: Select {st.name!r} takes On/Timeout cases, got {c!r}")
        if not isinstance(c.event, str) or not c.event:
            raise DefinitionError(
                f"{owner}: Select {st.name!r} has a case with an invalid event name {c.event!r}"
            )
        if c.event in seen:
            raise DefinitionError(
                f"{owner}: event {c.event!r} appears twice in Select {st.name!r}; "
                "event names are unique within a Select"
            )
        seen.add(c.event)
        if isinstance(c, Timeout):
            _check_timeout(c, st.name, owner, asyncs)
        else:
            _check_handler(c.handler, c.event, st.name, owner, asyncs)


def _check_timeout(c: Timeout, select: str, owner: str, asyncs: list[str]) -> None:
    after, at = c.after, c.at
    where = f"{owner}: Timeout {c.event!r} of Select {select!r}"
    if at is None:
        if isinstance(after, bool) or not isinstance(after, (timedelta, int, float)):
            if after is None or isinstance(after, Stmt):
                raise DefinitionError(
                    f"{where} has no due time: write Timeout(name, after, *body) with a "
                    "timedelta or seconds, or Timeout(name, *body, at=when) with an aware "
                    "datetime or a zero-argument callable returning one"
                )
            raise DefinitionError(
                f"{where} needs a timedelta or a number of seconds, got {after!r}"
            )
        return
    if after is not None:
        raise DefinitionError(
            f"{where} has both after={after!r} and at=: a timer is due after a delay "
            "or at a time, pass one of them"
        )
    if isinstance(at, date):  # a datetime: aware, or refused now rather than when reached
        aware_due_time(at, f"{where}: at=")
    elif not callable(at):
        raise DefinitionError(
            f"{where}: at= needs an aware datetime or a zero-argument callable returning one, "
            f"got {at!r}"
        )
    elif is_async(at):
        asyncs.append(f"the at= of Timeout {c.event!r} ({describe(at)})")


def _check_handler(h: Any, event: str, select: str, owner: str, asyncs: list[str]) -> None:
    if h is None:
        return
    where = f"of event {event!r} in Select {select!r}"
    if isinstance(h, Handler):
        asyncs.extend(
            f"the {m} {where} ({type(h).__qualname__}.{m})" for m in async_handler_methods(h)
        )
        return
    if not callable(h):
        raise DefinitionError(
            f"{owner}: handler {where} must be a gorch.Handler or a callable, got {h!r}"
        )
    signature_of(h)  # raises DefinitionError for more than one required argument
    if is_async(h):
        asyncs.append(f"the handler {where} ({describe(h)})")


def stmt_at(root: Section, path: Path) -> Stmt | None:
    """The statement at ``path`` in this build, or None if the shape differs."""
    body: Body = root.stmts
    try:
        for k in range(0, len(path) - 1, 2):
            owner = body[path[k]]
            if owner._kind == K_FOR and path[k + 1] == 0:  # (children(), inlined: the commonest)
                body = owner.body  # type: ignore[attr-defined]
            else:
                body = owner.children()[path[k + 1]]
        return body[path[-1]]
    except (IndexError, TypeError, AttributeError):
        return None
