"""The statement tree a workflow's ``definition()`` returns.

Statements are plain data: constructing one does no validation and no
introspection, because ``definition()`` is called again whenever the
interpreter needs a value computed from current data (see ``interpreter.py``).
Validation (unique names, Break outside a loop, ...) happens once per shape in
:mod:`gorch.index`. The one exception is a name read from a function
(``Step(fn)``, ``after=[fn]``): a callable without a usable ``__name__`` is
refused where it is written, since no later check could tell what was meant.

Every container exposes its bodies as tuples of statements; the interpreter
addresses a statement by a *path* of indices through those tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias, overload

from gorch.errors import DefinitionError

if TYPE_CHECKING:
    from gorch.handlers import Handler
    from gorch.retry import Retry

#: A condition: a bool computed when ``definition()`` ran, or a zero-argument
#: callable evaluated when the interpreter needs it.
Cond: TypeAlias = "bool | Callable[[], bool]"
Body: TypeAlias = "tuple[Stmt, ...]"
#: What ``after=`` names a DAG node by: its name, its Step or Node, the function
#: a ``Step(fn)`` is named after, or a composite statement placed as a node.
Dep: TypeAlias = "str | Stmt | Callable[..., Any]"
#: When an absolute :class:`Timeout` is due: an aware datetime, or a zero-argument
#: callable returning one, evaluated when the Select starts waiting.
When: TypeAlias = "datetime | Callable[[], Any]"

# Kinds, compared by identity in the interpreter's dispatch.
K_SECTION = 0
K_STEP = 1
K_IF = 2
K_SWITCH = 3
K_FOR = 4
K_SELECT = 5
K_GO = 6
K_WAITFOR = 7
K_RETURN = 8
K_BREAK = 9
K_CONTINUE = 10
K_PARALLEL = 11
K_DAG = 12
K_NODE = 13


class Stmt:
    """Base class of every statement.

    ``a >> b`` is ``S(a, b)`` and ``a | b`` is a :class:`Parallel` of both;
    chains flatten, so ``a >> b >> c`` is one section and ``a | b | c`` one
    Parallel of three.
    """

    __slots__ = ()
    _kind: int = -1

    def children(self) -> tuple[Body, ...]:
        """The bodies nested in this statement, in path order."""
        return ()

    def __rshift__(self, other: object) -> Section:
        _check_operand(self, ">>", other)
        return Section(*_seq_parts(self), *_seq_parts(other))  # type: ignore[arg-type]

    def __rrshift__(self, other: object) -> Section:
        _check_operand(other, ">>", self)
        raise AssertionError  # unreachable: other is not a statement

    def __or__(self, other: object) -> Parallel:
        _check_operand(self, "|", other)
        branches = (*_par_parts(self), *_par_parts(other))  # type: ignore[arg-type]
        return Parallel("|".join(label_of(b) for b in branches), *branches, _auto=True)

    def __ror__(self, other: object) -> Parallel:
        _check_operand(other, "|", self)
        raise AssertionError  # unreachable: other is not a statement


class Section(Stmt):
    """A sequence of statements: ``S(a, b, c)``. Nested sections behave as if flattened.

    ``name`` labels the section when it is a branch of a :class:`Parallel`:
    the branch's thread id is then ``"{parallel}.{name}"`` whatever its
    statements are called, so renaming them never strands a stored instance.
    """

    __slots__ = ("name", "stmts")
    _kind = K_SECTION

    def __init__(self, *stmts: Stmt, name: str | None = None) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise DefinitionError(f"a section's name must be a non-empty str, got {name!r}")
        self.stmts: Body = stmts
        self.name = name

    def children(self) -> tuple[Body, ...]:
        return (self.stmts,)

    def __repr__(self) -> str:
        named = f", name={self.name!r}" if self.name is not None else ""
        return f"S({', '.join(map(repr, self.stmts))}{named})"


S = Section


class Step(Stmt):
    """Run ``fn()``; an exception means the step failed and will be retried.

    ``Step(fn)`` is named after the function (``fn.__name__``, a bound
    method's too); ``Step(name, fn)`` names it explicitly, as a lambda, a
    ``functools.partial`` or two steps running one function need. ``fn`` may
    take parameters: results of earlier steps and its context (see
    :mod:`gorch.results`). ``retry`` is this step's policy (see
    :class:`gorch.Retry`); ``after`` makes the step a node of the enclosing
    :class:`DAG` (see :class:`Node`); ``timeout`` (a timedelta or seconds) fails
    an attempt that takes longer: an async step is cancelled, a plain one (which
    cannot be interrupted safely) fails when it returns late, its result dropped.
    """

    __slots__ = ("_after", "_retry", "_timeout", "fn", "name")
    _kind = K_STEP
    name: str
    fn: Callable[..., Any]
    _after: tuple[str, ...] | None
    _timeout: float | None

    @overload
    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        retry: Retry | None = None,
        after: Iterable[Dep] | Dep | None = None,
        timeout: timedelta | float | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        fn: Callable[..., Any],
        /,
        *,
        retry: Retry | None = None,
        after: Iterable[Dep] | Dep | None = None,
        timeout: timedelta | float | None = None,
    ) -> None: ...

    def __init__(
        self,
        name: str | Callable[..., Any],
        fn: Callable[..., Any] | None = None,
        **options: Any,
    ) -> None:
        # ``retry``, ``after`` and ``timeout`` (see the overloads) come in ``**options``:
        # keyword-only defaults cost a dict lookup each on every call, and definitions
        # are built many times per resume while most steps set none of them.
        if fn is None:  # Step(fn): named after the function
            fn = name  # type: ignore[assignment]
            name = _step_name(fn)
        self.name = name  # type: ignore[assignment]
        self.fn = fn  # type: ignore[assignment]
        if options:
            after = options.pop("after", None)
            retry = options.pop("retry", None)
            timeout = options.pop("timeout", None)
            if options:  # as Python words it for a keyword-only signature
                raise TypeError(
                    f"Step.__init__() got an unexpected keyword argument {next(iter(options))!r}"
                )
            self._after = None if after is None else _names(after)
            if retry is not None:  # read only when a step fails: the slot stays empty
                self._retry = retry
            self._timeout = None if timeout is None else _timeout_seconds(timeout)
        else:  # validation and every step run read these: slots always set read fast
            self._after = None
            self._timeout = None

    @property
    def retry(self) -> Retry | None:
        return getattr(self, "_retry", None)

    @property
    def timeout(self) -> float | None:
        """Seconds an attempt may take (None: no limit)."""
        return self._timeout

    @property
    def after(self) -> tuple[str, ...]:
        """Names of the DAG nodes this step runs after (only inside a :class:`DAG`)."""
        return self._after or ()

    def __repr__(self) -> str:
        return f"Step({self.name!r})"


class If(Stmt):
    """``If(cond, *body).ElseIf(cond, *body).Else(*body)``: the first true branch runs."""

    __slots__ = ("branches",)
    _kind = K_IF

    def __init__(self, cond: Cond, *body: Stmt) -> None:
        self.branches: list[tuple[Cond, Body]] = [(cond, body)]

    def ElseIf(self, cond: Cond, *body: Stmt) -> If:
        self.branches.append((cond, body))
        return self

    def Else(self, *body: Stmt) -> If:
        self.branches.append((True, body))
        return self

    def children(self) -> tuple[Body, ...]:
        return tuple(b for _, b in self.branches)

    def __repr__(self) -> str:
        return f"If(<{len(self.branches)} branches>)"


class Case:
    """A case of a :class:`Switch`."""

    __slots__ = ("body", "cond")

    def __init__(self, cond: Cond, *body: Stmt) -> None:
        self.cond = cond
        self.body: Body = body


def Default(*body: Stmt) -> Case:
    """The case of a :class:`Switch` that runs when no other case is true."""
    return Case(True, *body)


class Switch(Stmt):
    """``Switch(Case(cond, ...), ..., Default(...))``: the first true case runs."""

    __slots__ = ("cases",)
    _kind = K_SWITCH

    def __init__(self, *cases: Case) -> None:
        self.cases = cases

    def children(self) -> tuple[Body, ...]:
        return tuple(c.body for c in self.cases)

    def __repr__(self) -> str:
        return f"Switch(<{len(self.cases)} cases>)"


class For(Stmt):
    """Loop over ``body`` while ``cond`` holds; ``Break()`` and ``Continue()`` inside."""

    __slots__ = ("body", "cond", "name")
    _kind = K_FOR

    def __init__(self, name: str, cond: Cond, *body: Stmt) -> None:
        self.name = name
        self.cond = cond
        self.body: Body = body

    def children(self) -> tuple[Body, ...]:
        return (self.body,)

    def __repr__(self) -> str:
        return f"For({self.name!r})"


class On:
    """A case of a :class:`Select`: event ``event`` with an optional handler, then ``body``.

    ``On("e", handler, *body)`` or ``On("e", *body)``: when the first argument
    after the event name is a statement, the case has no handler.
    """

    __slots__ = ("body", "event", "handler")

    def __init__(self, event: str, *args: Any) -> None:
        self.event = event
        # (A type test: ``isinstance`` costs several times more when the answer is no.)
        if args and not issubclass(type(args[0]), Stmt):
            self.handler: Handler | Callable[..., Any] | None = args[0]
            self.body: Body = args[1:]
        else:
            self.handler = None
            self.body = args


class Timeout:
    """A timer case of a :class:`Select`: fires ``after`` once the Select starts waiting,
    or ``at`` a given time.

    ``Timeout(name, after, *body)``: ``after`` is a timedelta or seconds,
    counted from when the Select starts waiting. ``Timeout(name, *body, at=when)``:
    ``when`` is an aware datetime, or a zero-argument callable returning one,
    called when the Select starts waiting (in the timer's setup), so "escalate
    three days after the order was placed" needs no chain of relative waits.
    A time already past fires at once (on the next ``due_events`` /
    ``run_due``). Naive datetimes are refused: which zone they mean is a guess.
    """

    __slots__ = ("after", "at", "body", "event")

    @overload
    def __init__(self, name: str, after: timedelta | float, *body: Stmt) -> None: ...

    @overload
    def __init__(self, name: str, *body: Stmt, at: When) -> None: ...

    def __init__(
        self,
        name: str,
        after: timedelta | float | Stmt | None = None,
        *body: Stmt,
        at: When | None = None,
    ) -> None:
        self.event = name
        self.at = at
        if at is not None and isinstance(after, Stmt):  # Timeout(name, *body, at=...)
            body = (after, *body)
            after = None
        self.after: timedelta | float | None = after  # type: ignore[assignment]
        self.body: Body = body


class Select(Stmt):
    """Block until one of the cases' events arrives, then run that case's body."""

    __slots__ = ("cases", "name")
    _kind = K_SELECT

    def __init__(self, name: str, *cases: On | Timeout) -> None:
        self.name = name
        self.cases = cases

    def children(self) -> tuple[Body, ...]:
        return tuple(c.body for c in self.cases)

    def case(self, event: str) -> tuple[int, On | Timeout] | None:
        """The index and case awaiting ``event``, or None."""
        for i, c in enumerate(self.cases):
            if c.event == event:
                return i, c
        return None

    def __repr__(self) -> str:
        return f"Select({self.name!r}, {[c.event for c in self.cases]})"


class Go(Stmt):
    """Spawn a thread running ``body``; ``id`` (str or zero-arg callable) defaults to ``name``."""

    __slots__ = ("body", "id", "name")
    _kind = K_GO

    def __init__(self, name: str, *body: Stmt, id: str | Callable[[], str] | None = None) -> None:
        self.name = name
        self.body: Body = body
        self.id = id

    def children(self) -> tuple[Body, ...]:
        return (self.body,)

    def __repr__(self) -> str:
        return f"Go({self.name!r})"


class WaitFor(Stmt):
    """Block this thread until ``cond`` holds, then run ``handler()``."""

    __slots__ = ("cond", "handler", "name")
    _kind = K_WAITFOR

    def __init__(self, name: str, cond: Cond, handler: Callable[[], Any] | None = None) -> None:
        self.name = name
        self.cond = cond
        self.handler = handler

    def __repr__(self) -> str:
        return f"WaitFor({self.name!r})"


class Return(Stmt):
    """End this thread; ending the main thread finishes the workflow."""

    __slots__ = ()
    _kind = K_RETURN

    def __repr__(self) -> str:
        return "Return()"


class Break(Stmt):
    """Leave the innermost enclosing :class:`For`."""

    __slots__ = ()
    _kind = K_BREAK

    def __repr__(self) -> str:
        return "Break()"


class Continue(Stmt):
    """Start the next iteration of the innermost enclosing :class:`For`."""

    __slots__ = ()
    _kind = K_CONTINUE

    def __repr__(self) -> str:
        return "Continue()"


class Parallel(Stmt):
    """Run each branch as its own thread; continue when all of them have ended.

    Branch ``b`` runs in a thread named ``"{name}.{label}"``, where the label
    is the branch's own name: a statement's name, a named section's
    ``S(..., name=...)``; for an unnamed section, its statements' names joined
    by ``>>`` (see :func:`label_of`). Thread names stay stable when branches
    are reordered. A branch may wait on events and timers like any thread.

    A thread keeps the id it started with: after a deploy that renames
    statements inside a branch, a stored branch thread finds its branch again
    through its cursor (see ``interpreter._reattach``), so only new threads
    take the new label.
    """

    __slots__ = ("_auto", "_sources", "branches", "name", "retry")
    _kind = K_PARALLEL

    def __init__(
        self, name: str, *branches: Stmt, retry: Retry | None = None, _auto: bool = False
    ) -> None:
        self.name = name
        self.retry = retry  # the policy of its steps that set none
        self._auto = _auto  # made by ``|``: a further ``|`` adds branches to it
        self._sources = branches  # as written: a further ``|`` keeps their labels
        self.branches: tuple[Go, ...] = _threads(name, branches)

    def children(self) -> tuple[Body, ...]:
        return (self.branches,)

    def __repr__(self) -> str:
        return f"Parallel({self.name!r}, {[g.name for g in self.branches]})"


class Node(Stmt):
    """A node of a :class:`DAG`: ``body`` runs in its own thread after the ``after`` nodes.

    The body may wait on events and timers. ``Step(name, fn, after=[...])``
    is the short form of a node made of one step. ``Node(stmt, ..., after=[...])``
    without a name is named by its body's label (see :func:`label_of`), so
    ``after=[stmt]`` elsewhere in the DAG finds it.

    ``after`` lists what the node waits for: node names, the Step or Node
    objects, a function (the step ``Step(fn)`` named after it) or a composite
    statement placed in the DAG (its label).
    """

    __slots__ = ("after", "body", "name")
    _kind = K_NODE

    @overload
    def __init__(self, name: str, *body: Stmt, after: Iterable[Dep] | Dep = ()) -> None: ...

    @overload
    def __init__(self, first: Stmt, /, *body: Stmt, after: Iterable[Dep] | Dep = ()) -> None: ...

    def __init__(self, name: str | Stmt, *body: Stmt, after: Iterable[Dep] | Dep = ()) -> None:
        if isinstance(name, Stmt):  # Node(stmt, ...): named by its body's label
            body = (name, *body)
            name = label_of(body[0]) if len(body) == 1 else label_of(Section(*body))
        self.name = name
        self.body: Body = body
        self.after: tuple[str, ...] = _names(after)

    def children(self) -> tuple[Body, ...]:
        return (self.body,)

    def __repr__(self) -> str:
        return f"Node({self.name!r}, after={list(self.after)!r})"


class DAG(Stmt):
    """Run nodes as soon as every node they come after has completed.

    A node is a ``Step(..., after=[...])``, a :class:`Node`, or a composite
    statement placed as is -- a :class:`Section`, a :class:`Parallel` (``a | b``)
    or a nested DAG -- which becomes a node named by its label (see
    :func:`label_of`) that depends on nothing; ``after=[that_statement]``
    makes other nodes wait for all of it (a sync point). To make a composite
    wait for other nodes, wrap it: ``Node(stmt, after=[...])``.

    Independent nodes run as parallel threads (named ``"{name}.{node}"``),
    started in definition order. Which nodes completed, failed or were
    skipped is kept in the state of the thread running the DAG, so a resume
    never re-runs a completed node. A node fails when its step fails for good
    (no :class:`gorch.Retry`, or its attempts are used up): every node that
    depends on it is skipped, independent nodes go on, and once nothing more
    can run, the DAG raises :class:`gorch.DAGFailed`. Resuming again re-runs
    the failed and skipped nodes. With ``fail_fast`` no new node starts after
    the first failure. ``retry`` is the policy of its steps that set none.
    With ``isolated``, a node reads only the results of its ancestors and of
    steps outside the DAG, not its siblings' (see :mod:`gorch.results`).
    """

    __slots__ = ("_graph", "branches", "fail_fast", "isolated", "name", "nodes", "retry")
    _kind = K_DAG

    def __init__(
        self,
        name: str,
        *nodes: Step | Node | Section | Parallel | DAG,
        fail_fast: bool = False,
        retry: Retry | None = None,
        isolated: bool = False,
    ) -> None:
        self.name = name
        self.fail_fast = fail_fast
        self.retry = retry
        self.isolated = isolated
        branches = []
        wrapped: list[Any] | None = None
        for i, n in enumerate(nodes):
            if type(n) is Step:
                branches.append(Go(f"{name}.{n.name}", n))
            elif type(n) is Node:
                branches.append(Go(f"{name}.{n.name}", *n.body))
            elif type(n) in _AUTO_NODES:  # a composite placed as a node: wrap it
                if wrapped is None:
                    wrapped = list(nodes)
                wrapped[i] = node = _as_node(n)
                branches.append(Go(f"{name}.{node.name}", *node.body))
            # anything else: refused by validation (gorch.index.graph_of)
        kept: Any = nodes if wrapped is None else tuple(wrapped)
        self.nodes: tuple[Step | Node, ...] = kept
        self.branches: tuple[Go, ...] = tuple(branches)

    def children(self) -> tuple[Body, ...]:
        return (self.branches,)

    def __repr__(self) -> str:
        return f"DAG({self.name!r}, {[getattr(n, 'name', n) for n in self.nodes]})"


# --------------------------------------------------------------------------- helpers


def label_of(st: Stmt) -> str:
    """A branch's label: its own name (a named section's too), else its statements' names.

    An unnamed section of one statement is labelled like that statement, so
    ``S(step)`` and ``step`` give one thread id.
    """
    name = getattr(st, "name", None)
    if isinstance(name, str) and name:
        return name
    inner = (label_of(s) for body in st.children() for s in body if isinstance(s, Stmt))
    return ">>".join(filter(None, inner))


def _threads(name: str, branches: tuple[Stmt, ...]) -> tuple[Go, ...]:
    labels = [label_of(b) if isinstance(b, Stmt) else "" for b in branches]
    out = []
    for i, (b, label) in enumerate(zip(branches, labels, strict=True)):
        if not label or labels.count(label) > 1:
            label = f"{label}#{i}" if label else str(i)
        body = b.stmts if type(b) is Section else (b,)
        out.append(Go(f"{name}.{label}", *body))
    return tuple(out)


def _names(after: Iterable[Dep] | Dep) -> tuple[str, ...]:
    """The node names ``after=`` lists (see :data:`Dep`)."""
    if isinstance(after, (str, Stmt)) or callable(after):
        after = (after,)
    return tuple(a if isinstance(a, str) else _dep_name(a) for a in after)


def _dep_name(dep: object) -> str:
    if isinstance(dep, Stmt):
        return label_of(dep)
    if callable(dep):
        return _fn_name(dep, f"after=[{dep!r}]", "a node name or its Step")
    raise DefinitionError(
        f"after= lists node names, Steps, Nodes, step functions or composite statements, "
        f"got {dep!r} ({type(dep).__name__})"
    )


def _step_name(fn: object) -> str:
    """The name ``Step(fn)`` takes: the function's ``__name__``."""
    if isinstance(fn, str):
        raise DefinitionError(
            f"Step({fn!r}) has no function to run: write Step({fn!r}, fn) or Step(fn)"
        )
    return _fn_name(fn, f"Step({fn!r})", "a name: Step('name', fn)")


def _fn_name(fn: object, where: str, instead: str) -> str:
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name.isidentifier():
        return name
    what = f"its __name__ is {name!r}" if isinstance(name, str) else "it has no __name__"
    raise DefinitionError(f"{where}: cannot name it after the callable ({what}); pass {instead}")


def _as_node(st: Stmt) -> Node:
    """A composite statement placed directly in a DAG, as a node named by its label."""
    body = st.stmts if isinstance(st, Section) else (st,)
    return Node(label_of(st), *body)


def _check_operand(left: object, op: str, right: object) -> None:
    for operand in (left, right):
        if not isinstance(operand, Stmt):
            raise TypeError(
                f"{left!r} {op} {right!r}: both operands must be gorch statements, "
                f"but {operand!r} is a {type(operand).__name__}"
            )


def _seq_parts(st: Stmt) -> Body:
    """A section's statements (a named section stays whole: its name labels a branch)."""
    return st.stmts if type(st) is Section and st.name is None else (st,)


def _par_parts(st: Stmt) -> tuple[Stmt, ...]:
    if type(st) is Parallel and st._auto:
        return st._sources
    return (st,)


#: Statements a DAG takes as nodes without a Node around them (named by their label).
_AUTO_NODES = (Section, Parallel, DAG)

#: Statement kinds whose name is a cursor (unique within a definition).
NAMED_KINDS = frozenset({K_STEP, K_FOR, K_SELECT, K_GO, K_WAITFOR, K_PARALLEL, K_DAG})


def _timeout_seconds(timeout: object) -> float:
    """A step's ``timeout=`` in seconds, or DefinitionError (where the Step is written)."""
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise DefinitionError(f"Step timeout must be a timedelta or seconds, got {timeout!r}")
    if not seconds > 0:
        raise DefinitionError(f"Step timeout must be more than 0 seconds, got {timeout!r}")
    return seconds
