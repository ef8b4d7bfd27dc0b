"""Tasks and flows: the building blocks of :mod:`gorch.pipeline`.

A :class:`Task` is a plain function with a name; ``>>`` and ``|`` over tasks
build a :class:`Flow` (a small graph with its first and last tasks). Inside a
``with Pipeline(...)`` block each operator also records what it built in that
pipeline. Wiring mistakes (a cycle, two tasks under one name, a task beside
itself) are refused here, where the line that makes them runs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from datetime import timedelta
from typing import Any, Protocol, TypeAlias, overload

from gorch.errors import PipelineError
from gorch.retry import Retry
from gorch.statements import Stmt

__all__ = ["Flow", "PipelineError", "Task", "task"]


class _Collector(Protocol):
    """An open ``with Pipeline(...)`` block, as the operators see it."""

    def add(self, *parts: Part) -> Any: ...

    def merge(self, graph: _Graph, where: str) -> None: ...


#: What ``>>``, ``|``, ``Pipeline(...)`` and ``add`` take: a task or a flow built from tasks.
Part: TypeAlias = "Task | Flow"
#: How ``edge`` and ``start_at`` name a task: the task or its name.
TaskRef: TypeAlias = "Task | str"

_ACTIVE: ContextVar[tuple[_Collector, ...]] = ContextVar("gorch_pipelines", default=())


# --------------------------------------------------------------------------- tasks


class _Wiring:
    """``>>`` (one after the other) and ``|`` (side by side), for tasks and flows alike."""

    __slots__ = ()

    def __rshift__(self, other: object) -> Flow:
        return _seq(self, other)

    def __rrshift__(self, other: object) -> Flow:
        return _seq(other, self)

    def __or__(self, other: object) -> Flow:
        return _par(self, other)

    def __ror__(self, other: object) -> Flow:
        return _par(other, self)


class Task(_Wiring):
    """A function that a pipeline runs as one step, named after the function.

    Calling the task calls the function (handy in unit tests). ``retry`` and
    ``timeout`` are the step's (see :class:`gorch.Step`). Its parameters read
    earlier results as a step's do: one named after a task gets that task's
    result, the one other parameter the result of the single task it comes
    after, ``ctx: gorch.StepContext`` the step's context.
    """

    __slots__ = ("__dict__", "fn", "name", "retry", "timeout")

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: timedelta | float | None = None,
    ) -> None:
        if isinstance(fn, Task):
            raise PipelineError(f"{fn!r} is a task already; decorate the function once")
        if not callable(fn):
            raise PipelineError(f"@task decorates a function, got {fn!r} ({type(fn).__name__})")
        if name is None:
            found = getattr(fn, "__name__", None)
            if not (isinstance(found, str) and found.isidentifier()):
                raise PipelineError(
                    f"cannot name a task after {fn!r} (its __name__ is {found!r}); "
                    "give it one: @task(name='...')"
                )
            name = found
        elif not isinstance(name, str) or not name:
            raise PipelineError(f"a task's name must be a non-empty str, got {name!r}")
        if retry is not None and not isinstance(retry, Retry):
            raise PipelineError(f"task {name!r}: retry must be a gorch.Retry, got {retry!r}")
        self.fn = fn
        self.name = name
        self.retry = retry
        self.timeout = timeout
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def same_as(self, other: Task) -> bool:
        """Whether ``other`` runs the same function with the same options (one task)."""
        return self is other or (
            self.fn is other.fn
            and self.name == other.name
            and self.retry == other.retry
            and self.timeout == other.timeout
        )

    def __repr__(self) -> str:
        return f"Task({self.name!r})"


@overload
def task(fn: Callable[..., Any], /) -> Task: ...


@overload
def task(
    *,
    name: str | None = None,
    retry: Retry | None = None,
    timeout: timedelta | float | None = None,
) -> Callable[[Callable[..., Any]], Task]: ...


def task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    retry: Retry | None = None,
    timeout: timedelta | float | None = None,
) -> Task | Callable[[Callable[..., Any]], Task]:
    """Make ``fn`` a :class:`Task`: ``@task`` or ``@task(name=..., retry=..., timeout=...)``.

    A task decorated inside a ``with Pipeline(...)`` block is added to that
    pipeline (as Graflow registers it), even before it is wired.
    """

    def make(f: Callable[..., Any]) -> Task:
        t = Task(f, name=name, retry=retry, timeout=timeout)
        active = _ACTIVE.get()
        if active:
            active[-1].add(t)
        return t

    return make if fn is None else make(fn)


# --------------------------------------------------------------------------- graphs


class _Graph:
    """Tasks by name (in the order first seen) and edges (ordered, no duplicates)."""

    __slots__ = ("edges", "succ", "tasks")

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.edges: dict[tuple[str, str], None] = {}
        self.succ: dict[str, list[str]] = {}

    def copy(self) -> _Graph:
        g = _Graph()
        g.tasks = dict(self.tasks)
        g.edges = dict(self.edges)
        g.succ = {k: list(v) for k, v in self.succ.items()}
        return g

    def add_task(self, t: Task, where: str) -> None:
        known = self.tasks.get(t.name)
        if known is None:
            self.tasks[t.name] = t
            self.succ[t.name] = []
        elif not known.same_as(t):
            raise PipelineError(
                f"{where}: two different tasks are named {t.name!r} "
                f"({_describe(known)} and {_describe(t)}); a name is one task's cursor: "
                "give one of them another name, @task(name='...')"
            )

    def add_edge(self, a: str, b: str, where: str) -> None:
        if (a, b) in self.edges:
            return
        if a == b:
            raise PipelineError(f"{where}: task {a!r} would come after itself ({a} -> {a})")
        path = self._path(b, a)
        if path is not None:
            cycle = " -> ".join([a, *path])
            raise PipelineError(f"{where}: the edge {a} -> {b} makes a cycle: {cycle}")
        self.edges[(a, b)] = None
        self.succ[a].append(b)

    def merge(self, other: _Graph, where: str) -> None:
        for t in other.tasks.values():
            self.add_task(t, where)
        for a, b in other.edges:
            self.add_edge(a, b, where)

    def _path(self, src: str, dst: str) -> list[str] | None:
        """A path ``src -> ... -> dst`` along the edges, or None."""
        parent: dict[str, str] = {src: src}
        todo = [src]
        while todo:  # breadth first: the shortest cycle, in the order edges were declared
            n = todo.pop(0)
            if n == dst:
                out = [n]
                while n != src:
                    n = parent[n]
                    out.append(n)
                return out[::-1]
            for m in self.succ.get(n, ()):
                if m not in parent:
                    parent[m] = n
                    todo.append(m)
        return None


def _describe(t: Task) -> str:
    fn = t.fn
    where = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    opts = [f"retry={t.retry!r}"] if t.retry is not None else []
    if t.timeout is not None:
        opts.append(f"timeout={t.timeout!r}")
    return f"{where}({', '.join(opts)})" if opts else where


class Flow(_Wiring):
    """What ``>>`` and ``|`` over tasks build: a graph with its first and last tasks.

    ``a >> b`` adds an edge from each last task of ``a`` to each first task
    of ``b``; ``a | b`` runs them side by side (first tasks: both's first
    tasks; last tasks: both's last ones).
    """

    __slots__ = ("graph", "heads", "tails")

    def __init__(self, graph: _Graph, heads: tuple[str, ...], tails: tuple[str, ...]) -> None:
        self.graph = graph
        self.heads = heads
        self.tails = tails

    @classmethod
    def of(cls, t: Task) -> Flow:
        g = _Graph()
        g.add_task(t, repr(t))
        return cls(g, (t.name,), (t.name,))

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.graph.tasks)

    @property
    def edges(self) -> list[tuple[str, str]]:
        return list(self.graph.edges)

    def __repr__(self) -> str:
        edges = ", ".join(f"{a}->{b}" for a, b in self.graph.edges)
        return f"Flow(tasks={list(self.graph.tasks)}, edges=[{edges}])"


def _as_flow(x: object, left: object, op: str, right: object) -> Flow:
    if isinstance(x, Flow):
        return x
    if isinstance(x, Task):
        return Flow.of(x)
    if isinstance(x, Stmt):
        hint = "a gorch statement belongs in a Workflow's definition(); pipelines wire tasks"
    elif callable(x):
        hint = "decorate the function with @gorch.pipeline.task"
    else:
        hint = "both operands must be tasks or flows of tasks"
    raise PipelineError(
        f"{_short(left)} {op} {_short(right)}: {_short(x)} is a {type(x).__name__}, "
        f"not a task; {hint}"
    )


def _short(x: object) -> str:
    if isinstance(x, (Task, Flow)):
        return repr(x)
    name = getattr(x, "__name__", None)
    return name if isinstance(name, str) else repr(x)


def _seq(left: object, right: object) -> Flow:
    a, b = _as_flow(left, left, ">>", right), _as_flow(right, left, ">>", right)
    where = f"{_short(left)} >> {_short(right)}"
    g = a.graph.copy()
    g.merge(b.graph, where)
    for t in a.tails:
        for h in b.heads:
            g.add_edge(t, h, where)
    return _record(Flow(g, a.heads, b.tails), where)


def _par(left: object, right: object) -> Flow:
    a, b = _as_flow(left, left, "|", right), _as_flow(right, left, "|", right)
    where = f"{_short(left)} | {_short(right)}"
    shared = [n for n in a.graph.tasks if n in b.graph.tasks]
    if shared:
        raise PipelineError(
            f"{where}: task {shared[0]!r} is on both sides of '|', so it would run in "
            "parallel with itself; a task runs once per pipeline (to fan out from it, "
            f"write {shared[0]} >> (x | y))"
        )
    g = a.graph.copy()
    g.merge(b.graph, where)
    return _record(Flow(g, a.heads + b.heads, a.tails + b.tails), where)


def _record(flow: Flow, where: str) -> Flow:
    """Inside ``with Pipeline(...)``: add what the operator built to that pipeline."""
    active = _ACTIVE.get()
    if active:
        active[-1].merge(flow.graph, where)
    return flow
