"""The stateless interpreter: ``resume`` and ``handle_event``.

How a call works
----------------
Each call builds the definition (``wf.definition()``) at its start, and again
before a value is read after data changed (see below). A thread's cursor
is the *name* of the statement it sits on; the per-class name index
(:mod:`gorch.index`) turns it into a path, and the path into a stack of
*frames* ``[body, index, owner, child]`` that the walker in
:func:`_run_thread` follows statement by statement.

Values read from the tree (a bool condition, a Select's cases, a Go id given
as str, a Timeout, a Handler object) must reflect current data. Running a step
marks the build *dirty*; the next read that needs a value rebuilds the
definition and re-finds the walking thread from its committed cursor (the
step it just completed) before reading. Walking between two reads is purely
structural, so a long run of steps costs no rebuild at all, and a loop costs
one rebuild per iteration. Callable conditions are evaluated on whatever build
is current; they read data when called.

A *unit* is either running one step or walking from a cursor to the next
blocking point (a Step, a Select, a WaitFor, or the thread's end). A walk
commits its result (new cursor, spawned threads, awaited events) only when it
ends, so an error raised while walking leaves the state as it was before.

Sync and async: one walk
------------------------
Every function of the walk that calls user code (steps, conditions, handlers,
hooks, middleware, checkpoints) is a generator. It calls the function
directly; only when the call returns an awaitable does the walk ``yield`` it.
The sync API (:func:`resume`, :func:`handle_event`) refuses awaitables at
that point (:class:`gorch.handlers.SyncCallRefused`, before anything is
recorded), so its walks never yield and run to their end in one ``send``.
The async API (:func:`aresume`, :func:`ahandle_event`) drives the same
generators with :func:`_adrive`, which awaits what they yield and sends the
result back. So a plain step costs the same under both, and there is one
interpreter.

Under the async API, independent threads run in *rounds*. The runnable
threads are walked, in thread order, to their next step; an async step whose
thread is not alone is not awaited in place but parked (the walk yields a
:class:`_Launch`). When no thread can be walked further, the parked steps take
off together as asyncio tasks (at most ``concurrency`` at a time), each on a
private copy of the same data: the data last saved. They are then committed
one by one in thread order, whatever order they finish in: a step's changes
(a diff of its copy against the data it started from) are applied to the live
workflow, and its thread's walk records it and ends there. Checkpoints are
held until the round's last commit, so every save is a round boundary. Only
then are the threads walked again, from their saved cursors, exactly as a
reload of that save would walk them: which steps form the next round is a
function of the saved state alone, and a reload from any save starts the same
steps from the same data. So a crash anywhere ends as a run without one (even
the main thread's end waits for the round: every step of a round commits,
as each one may already have had its effects). Two steps of a
round that change the same data would lose an update: the later one fails
with :class:`ConcurrentChange` (appending to one list is fine). A plain step
in a thread that has company runs in place, on the live data, when its turn
to commit comes (with ``executor=`` it takes off like an async step, on a
thread of the executor), so with plain functions only, the async API runs
exactly as the sync one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from gorch import clock
from gorch.codec import Change, apply_changes, diff_data
from gorch.errors import (
    AmbiguousEvent,
    ConcurrentChange,
    CursorNotFound,
    DAGFailed,
    DefinitionError,
    EventNotFound,
    GorchError,
    HandlerFailed,
    ParallelFailed,
    ResumeLimitError,
    SetupError,
    StaleEvent,
    StepFailed,
    StepResultError,
    StepTimeout,
    ThreadExists,
    TimerNotSendable,
    WorkflowFinishedError,
)
from gorch.handlers import (
    ASYNC_API_HINT,
    Handler,
    HandlerCallError,
    SyncCallRefused,
    TimerHandler,
    async_handler_methods,
    call_handler,
    describe,
    is_async,
    is_awaitable,
    refuse_awaitable,
)
from gorch.hooks import EventContext, ResumeContext, StepContext, chain, wrappers
from gorch.index import Path, graph_of, index_definition, stmt_at
from gorch.results import Plan, arguments, bind, copy_of, keep, plan_of
from gorch.retry import Retry
from gorch.state import (
    ACTIVE_EVENT,
    MAIN_THREAD,
    TEARDOWN_EVENT,
    CheckpointKind,
    EventRequest,
    EventStatus,
    NodeStatus,
    State,
    Thread,
    ThreadStatus,
    WaitEvent,
    WorkflowStatus,
)
from gorch.statements import (
    DAG,
    K_BREAK,
    K_CONTINUE,
    K_DAG,
    K_FOR,
    K_GO,
    K_IF,
    K_PARALLEL,
    K_RETURN,
    K_SECTION,
    K_SELECT,
    K_STEP,
    K_SWITCH,
    K_WAITFOR,
    Go,
    On,
    Parallel,
    Section,
    Select,
    Step,
    Stmt,
    Timeout,
    WaitFor,
)
from gorch.timers import due_time
from gorch.workflow import STEP_HOOKS, Workflow

log = logging.getLogger("gorch")

Checkpoint = Callable[[CheckpointKind], Any]
#: Told of every step attempt of a :func:`run` / :func:`arun` (the step's context,
#: how long it took in seconds, what it raised or None): how the Engine keeps its
#: history without a middleware, which would put every resume on the hooked path.
StepLog = Callable[[StepContext, float, BaseException | None], None]
Frame = list[Any]  # [body: tuple[Stmt, ...], index: int, owner: Stmt | None, child: int]

DEFAULT_MAX_UNITS = 100_000

#: How many steps ``aresume`` runs at once by default (``concurrency=``).
DEFAULT_CONCURRENCY = 16

T = TypeVar("T")
#: A walk: yields awaitables (and :class:`_Launch` requests) under the async API.
Walk = Generator[Any, Any, T]

# Enum members read in the walk, as module constants: reading a member through
# its class costs several times a global's read.
_FINISHED = WorkflowStatus.FINISHED
_WF_WAITING = WorkflowStatus.WAITING
_WF_RESUMING = WorkflowStatus.RESUMING
_AFTER_STEP = CheckpointKind.AFTER_STEP
_AFTER_RESUME = CheckpointKind.AFTER_RESUME
_AFTER_SETUP = CheckpointKind.AFTER_SETUP
_AFTER_TEARDOWN = CheckpointKind.AFTER_TEARDOWN
_AFTER_CONDITION = CheckpointKind.AFTER_CONDITION
_PENDING_SETUP = EventStatus.PENDING_SETUP
_SETUP = EventStatus.SETUP
_SETUP_ERROR = EventStatus.SETUP_ERROR
_PENDING_TEARDOWN = EventStatus.PENDING_TEARDOWN
_TEARDOWN_ERROR = EventStatus.TEARDOWN_ERROR
_RESUMING = ThreadStatus.RESUMING
_EXECUTING = ThreadStatus.EXECUTING
_WAITING_EVENT = ThreadStatus.WAITING_EVENT
_WAITING_CONDITION = ThreadStatus.WAITING_CONDITION


class _ClassIndex:
    """Name → path of every named statement, shared by all instances of a class.

    ``dynamic`` becomes True once a build of the class was seen with another
    shape than the index: from then on every call validates its first build,
    so a duplicate name that only some data produces is refused before
    anything runs.
    """

    __slots__ = (
        "async_hooks",
        "asyncs",
        "dags",
        "dynamic",
        "hooks",
        "owner",
        "params",
        "paths",
        "step_hooks",
    )

    def __init__(self, cls: type) -> None:
        self.paths: dict[str, Path] | None = None
        self.owner = cls.__qualname__
        self.dynamic = False
        #: Names of the DAGs: their graphs are checked at the start of every call,
        #: since ``after=`` lists may come from data without changing the shape.
        self.dags: tuple[str, ...] = ()
        #: The async callables of the indexed build (the sync API refuses them).
        self.asyncs: tuple[str, ...] = ()
        #: Whether a step function of an indexed build takes parameters (results or
        #: its context): the sync walk looks at step functions only then.
        self.params = False
        #: The lifecycle hooks ``cls`` overrides: the others are never called.
        self.hooks = frozenset(
            name
            for name in (
                *STEP_HOOKS,
                "on_event",
                "on_waiting",
                "on_finish",
                "on_start",
                "on_failed",
            )
            if getattr(cls, name, None) is not getattr(Workflow, name)
        )
        #: Whether ``cls`` overrides a hook around steps (steps then run through them).
        self.step_hooks = not self.hooks.isdisjoint(STEP_HOOKS)
        self.async_hooks = tuple(
            f"the hook {cls.__qualname__}.{name}"
            for name in sorted(self.hooks)
            if is_async(getattr(cls, name))
        )


_indexes: dict[type, _ClassIndex] = {}

# What a call of the sync API shares instead of empty containers of its own:
# the sync walk only reads them (the async API gives each call new ones).
_NO_FLIGHTS: dict[str, Any] = {}
_NO_KINDS: list[CheckpointKind] = []
_NO_WRITES: dict[tuple[str, ...], tuple[str, str]] = {}
_NO_NAMES: set[str] = set()
_NO_WRAPPERS: list[Any] = []
_NONE_DEFERRED: list[StepFailed] = []


class _Call:
    """What one ``resume`` / ``handle_event`` call knows: the current build and its index.

    Slotted, and every attribute is set in ``__init__``: the walk reads these
    flags on every unit, and a slot reads fast where a class-level default
    read through the instance does not.
    """

    __slots__ = (
        "check",
        "checkpoint",
        "deadline",
        "deferred",
        "dirty",
        "event_mw",
        "executor",
        "expired",
        "failure",
        "flights",
        "gen",
        "halted",
        "held",
        "index",
        "indexed_gen",
        "lazy",
        "limit",
        "located",
        "max_units",
        "middleware",
        "parked",
        "pending",
        "report_failures",
        "restore",
        "root",
        "state",
        "step_log",
        "step_mw",
        "step_names",
        "step_names_gen",
        "stop",
        "stopped",
        "sync",
        "units",
        "watched",
        "wf",
        "wrap_steps",
        "written",
    )

    gen: int
    indexed_gen: int
    units: int
    dirty: bool
    lazy: bool
    pending: bool
    watched: bool  # middleware or class hooks around steps
    wrap_steps: bool  # those, or a step log
    step_mw: list[Any]
    step_log: StepLog | None
    event_mw: list[Any]
    deferred: list[StepFailed]
    restore: Callable[[], Any] | None
    #: A call of the sync API: awaitables are refused where they are met.
    sync: bool
    #: Refuse, up front, a workflow with async callables (sync API; not for tooling).
    check: bool
    # Async API only: steps in flight by thread id, and how the scheduler goes on.
    flights: dict[str, _Flight]
    parked: dict[str, _Flight]  # steps waiting for the next round to start
    held: list[CheckpointKind]  # checkpoints due while a round is in flight
    written: dict[tuple[str, ...], tuple[str, str]]  # this round: path -> (op, step)
    stop: bool  # a step failed while others were in flight: start no new step
    deadline: datetime | None  # start no step from then on (see resume)
    report_failures: bool  # on_failed hooks run in the call (not for the Engine)
    middleware: Sequence[object]
    step_names: frozenset[str] | None  # of the build of generation step_names_gen
    step_names_gen: int
    expired: bool  # the deadline passed: the call ends where the threads are
    stopped: set[str]  # threads walked since then (each once)
    failure: StepFailed | None
    halted: set[str]  # joining threads of fail_fast DAGs whose node failed
    executor: Executor | None
    limit: asyncio.Semaphore
    root: Section

    def __init__(
        self,
        wf: Workflow,
        state: State,
        checkpoint: Checkpoint | None,
        max_units: int,
        middleware: Sequence[object] = (),
        *,
        sync: bool = True,
        check: bool = True,
    ) -> None:
        cls = type(wf)
        index = _indexes.get(cls)
        if index is None:
            index = _indexes[cls] = _ClassIndex(cls)
        self.wf = wf
        self.state = state
        self.index = index
        self.checkpoint = checkpoint
        self.max_units = max_units
        self.check = check
        self.sync = sync
        self.gen = 0
        self.indexed_gen = -1
        self.units = 0
        self.dirty = False
        self.lazy = False
        self.pending = False
        self.restore = None
        self.deferred = _NONE_DEFERRED
        self.stop = False
        self.deadline = None
        self.report_failures = True
        self.step_names = None
        self.step_names_gen = -1
        self.expired = False
        self.failure = None
        self.executor = None
        self.located: dict[str, tuple[int, str, list[Frame], Stmt]] = {}
        if sync:  # never filled by the sync API: shared empty ones
            self.flights = self.parked = _NO_FLIGHTS
            self.held = _NO_KINDS
            self.written = _NO_WRITES
            self.halted = self.stopped = _NO_NAMES
        else:
            self.flights = {}
            self.parked = {}
            self.held = []
            self.written = {}
            self.halted = set()
            self.stopped = set()
        if middleware:
            self.middleware = middleware
            self.step_mw = wrappers(middleware, "around_step", not sync)
            self.event_mw = wrappers(middleware, "around_event", not sync)
        else:
            self.middleware = ()
            self.step_mw = self.event_mw = _NO_WRAPPERS
        self.step_log = None
        self.watched = self.wrap_steps = bool(self.step_mw) or index.step_hooks
        self.rebuild()
        if index.dynamic and self.indexed_gen != self.gen:
            self.reindex()
        if check and sync:
            if index.asyncs or index.async_hooks or middleware:
                self.refuse_async(middleware)
            elif checkpoint is not None and is_async(checkpoint):
                self.refuse_async(())

    def refuse_async(self, middleware: Sequence[object]) -> None:
        """Raise DefinitionError if the sync API would meet anything async (before it runs)."""
        index = self.index
        found = [*index.asyncs, *index.async_hooks]
        for method in ("around_resume", "around_step", "around_event"):
            found.extend(
                f"the middleware {type(m.__self__).__qualname__}.{method}"  # type: ignore[attr-defined]
                for m in (wrappers(middleware, method) if middleware else ())
                if is_async(m)
            )
        if self.checkpoint is not None and is_async(self.checkpoint):
            found.append(f"the checkpoint callback {describe(self.checkpoint)}")
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise DefinitionError(f"{index.owner}: {shown} is async; {ASYNC_API_HINT}")

    def rebuild(self) -> None:
        """Call ``definition()`` again: values read from now on reflect current data."""
        # _build, inlined: this runs a dozen times per resume, and a call costs.
        try:
            root = self.wf.definition()
        except GorchError:
            raise
        except Exception as e:
            raise DefinitionError(
                f"{self.index.owner}.definition() raised {type(e).__name__}: {e}"
            ) from e
        self.root = root if type(root) is Section else _as_root(root, self.index.owner)
        self.gen += 1
        self.dirty = False
        if self.index.paths is None:
            self.reindex()

    def reindex(self) -> None:
        """Validate the current build and index it (DefinitionError if invalid)."""
        index = self.index
        if index.paths is not None:
            index.dynamic = True
        asyncs: list[str] = []
        paths = index.paths = index_definition(self.root, index.owner, asyncs)
        self.indexed_gen = self.gen
        index.dags = tuple(
            name for name, path in paths.items() if isinstance(stmt_at(self.root, path), DAG)
        )
        index.asyncs = tuple(asyncs)
        if not index.params:
            index.params = any(plan_of(st.fn) for st in _steps_in(self.root))
        if asyncs and self.sync and self.check:
            self.refuse_async(())

    def find(self, name: str) -> tuple[Path, Stmt] | None:
        """Path and statement named ``name`` in the current build, or None."""
        paths = self.index.paths
        assert paths is not None
        path = paths.get(name)
        if path is not None:
            st = stmt_at(self.root, path)
            if st is not None and getattr(st, "name", None) == name:
                return path, st
        if self.indexed_gen != self.gen:  # the shape changed: index this build
            self.reindex()
            return self.find(name)
        return None

    def where(self, thread_id: str, name: str) -> Stmt | None:
        """The statement ``name`` in the current build: where thread ``thread_id`` was
        located or walked to in this build (blocked there), else found by its name."""
        seen = self.located.get(thread_id)
        if seen is not None and seen[0] == self.gen and seen[1] == name:
            return seen[3]
        found = self.find(name)
        return None if found is None else found[1]

    def verify(self, st: Stmt) -> None:
        """Check that the class index finds ``st`` by its name in the current build.

        Called before a step runs and where a thread blocks (through the cheap
        checks in the walk and :meth:`verify_at`): a shape that changed with the
        data may have made a name ambiguous, and a cursor must never be found
        again at another statement.
        """
        name: str = st.name  # type: ignore[attr-defined]
        paths = self.index.paths
        assert paths is not None
        path = paths.get(name)
        if path is not None and stmt_at(self.root, path) is st:
            return
        if self.indexed_gen != self.gen:
            self.reindex()  # raises DefinitionError on a duplicate name
            self.verify(st)
            return
        raise DefinitionError(f"{self.index.owner}: cannot find {name!r} by its name")

    def verify_at(self, st: Stmt, frames: list[Frame]) -> None:
        """:meth:`verify` for the statement the walk is on, cheap when the index agrees.

        The index path must end at the same position and depth as the walk's
        frames (for the main thread, whose frames start at the root).
        """
        path = self.index.paths.get(st.name)  # type: ignore[union-attr, attr-defined]
        if (
            path is not None
            and path[-1] == frames[-1][1]
            and len(path) == 2 * len(frames) - 1
            and frames[0][2] is None
        ):
            return
        self.verify(st)

    def save(self, kind: CheckpointKind) -> Any:
        """Call the checkpoint callback; an awaitable it returns is for the walk to yield."""
        if self.checkpoint is not None:
            if not self.sync and (self.flights or self.held):
                return self._hold(kind)
            out = self.checkpoint(kind)
            if out is not None and is_awaitable(out):
                if self.sync:
                    raise refuse_awaitable(out, "the checkpoint callback")
                return out
        return None

    def _hold(self, kind: CheckpointKind | None) -> Any:
        """Async API: hold checkpoints while steps of a round are in flight, then make them.

        A save made while some of a round's steps are uncommitted would hold a
        state that a reload cannot reproduce (those steps would start again
        from other data), so saves wait for the round's last commit.
        """
        if kind is not None:
            self.held.append(kind)
        if self.flights or not self.held:
            return None
        kinds, self.held = self.held, []
        assert self.checkpoint is not None
        outs = [self.checkpoint(k) for k in kinds]
        waits = [out for out in outs if out is not None and is_awaitable(out)]
        return _in_order(waits) if waits else None

    def flush(self) -> Any:
        """The checkpoints held for a round that is over (an awaitable, or None)."""
        return self._hold(None) if self.held else None

    def wait(self, value: Any, what: str) -> Walk[Any]:
        """``yield from call.wait(aw, what)``: await ``aw`` (async API) or refuse it (sync)."""
        if self.sync:
            raise refuse_awaitable(value, what)
        return (yield value)

    def run(self, walk: Walk[T]) -> Any:
        """Run a walk: to its end now (sync API), or as a coroutine to await (async API)."""
        if self.sync:
            return _finish(walk)
        try:  # plain code runs now: a plain middleware gets a plain value
            item = walk.send(None)
        except StopIteration as e:
            return e.value
        return _adrive(walk, item)

    def chain(self, wrapped: Sequence[Callable[[Any, Any], Any]], ctx: Any, inner: Any) -> Any:
        return chain(wrapped, ctx, inner, not self.sync)

    def call_fn(self, fn: Callable[[], Any]) -> Any:
        """Call a step's function (async API): a plain one goes to the executor if one is set."""
        if self.executor is not None and not is_async(fn):
            return asyncio.get_running_loop().run_in_executor(self.executor, fn)
        return fn()


def _build(wf: Workflow, owner: str) -> Section:
    """``wf.definition()`` as a Section, or DefinitionError."""
    try:
        root = wf.definition()
    except GorchError:
        raise
    except Exception as e:
        raise DefinitionError(f"{owner}.definition() raised {type(e).__name__}: {e}") from e
    return root if type(root) is Section else _as_root(root, owner)


def _as_root(root: Any, owner: str) -> Section:
    """What ``definition()`` returned, when not a Section: wrapped, or refused."""
    if not isinstance(root, Section):
        if is_awaitable(root):
            refuse_awaitable(root, "")  # closes it
            raise DefinitionError(
                f"{owner}.definition() is async: it must be a plain method "
                "returning S(...); steps and handlers may be async"
            )
        if not isinstance(root, Stmt):
            raise DefinitionError(
                f"{owner}.definition() must return a statement such as S(...), got {root!r}"
            )
        return Section(root)
    return root


def _finish(walk: Walk[T]) -> T:
    """Run a walk of the sync API to its end (it never yields: awaitables are refused)."""
    try:
        walk.send(None)
    except StopIteration as e:
        return e.value  # type: ignore[no-any-return]
    walk.close()
    raise AssertionError("a walk of the sync API waited for something")


def _exhaust(walk: Walk[Any]) -> None:
    """:func:`_finish` for walks whose result is not needed (no StopIteration to catch)."""
    for _ in walk:
        walk.close()
        raise AssertionError("a walk of the sync API waited for something")


async def _adrive(walk: Walk[T], item: Any = None) -> T:
    """Run a walk under the async API: await what it yields, send the result back.

    ``item`` is what the walk yielded already, when it was started by the caller.
    """
    value: Any = None
    error: BaseException | None = None
    started = item is not None
    while True:
        if started:
            started = False
        else:
            try:
                item = walk.send(value) if error is None else walk.throw(error)
            except StopIteration as e:
                return e.value  # type: ignore[no-any-return]
            finally:
                error = None  # no reference cycle through the traceback
        try:
            value = await item
        except BaseException as e:  # thrown into the walk, which decides (cancellation too)
            value = None
            error = e


async def _in_order(waits: list[Any]) -> None:
    """Await checkpoint callbacks one after the other, in the order they were made."""
    for w in waits:
        await w


# --------------------------------------------------------------------------- cursors


def _is_main(t: Thread) -> bool:
    return t.name == MAIN_THREAD and t.id == MAIN_THREAD


def _navigate(root: Section, path: Path, name: str) -> tuple[list[Frame], Stmt, int, str] | None:
    """Frames from the root down to the statement at ``path``, if it is named ``name``.

    Also returns where the innermost Go's body starts in the frames and that
    Go's name (``MAIN_THREAD`` when there is none). None when this build has
    a different shape at ``path``.
    """
    body = root.stmts
    last = len(path) - 1
    if not last:  # a statement of the root body: the common case
        i = path[0]
        if i < len(body):
            st = body[i]
            if getattr(st, "name", None) == name:
                return [[body, i, None, 0]], st, 0, MAIN_THREAD
        return None
    owner: Any = None
    child = 0
    base = 0
    go_name = MAIN_THREAD
    frames: list[Frame] = []
    try:
        k = 0
        while k < last:
            i = path[k]
            frames.append([body, i, owner, child])
            owner = body[i]
            child = path[k + 1]
            kind = owner._kind
            if kind == K_FOR and child == 0:  # (children(), inlined for the commonest owners)
                body = owner.body
            elif kind == K_SELECT:
                body = owner.cases[child].body
            else:
                if kind == K_GO:
                    base = len(frames)
                    go_name = owner.name
                body = owner.children()[child]
            k += 2
        st = body[path[last]]
        if st.name != name:  # type: ignore[attr-defined]
            return None
    except (IndexError, AttributeError, TypeError):
        return None
    frames.append([body, path[last], owner, child])
    return frames, st, base, go_name


def _frames_of(call: _Call, t: Thread, name: str) -> tuple[list[Frame], Stmt]:
    """Thread ``t``'s frames down to the statement ``name``, found through the class index.

    Threads don't share frames: a Go thread's stack starts at its Go's body, and
    the innermost Go around ``name`` must be the thread's own (none for main).
    """
    paths = call.index.paths
    assert paths is not None
    path = paths.get(name)
    found = _navigate(call.root, path, name) if path is not None else None
    if found is None:
        if call.indexed_gen == call.gen:
            raise CursorNotFound(t.id, name)
        call.reindex()  # the shape changed since the index was made
        return _frames_of(call, t, name)
    frames, st, base, go_name = found
    if go_name != t.name or (go_name == MAIN_THREAD and t.id != MAIN_THREAD):
        where = "the main thread's body" if go_name == MAIN_THREAD else f"Go {go_name!r}"
        raise CursorNotFound(t.id, name, f"it is now in {where}, not in this thread's")
    return (frames[base:] if base else frames), st


_WANT = {
    ThreadStatus.EXECUTING: (K_STEP,),
    ThreadStatus.WAITING_EVENT: (K_SELECT,),
    ThreadStatus.WAITING_CONDITION: (K_WAITFOR, K_PARALLEL, K_DAG),  # blocked until true / joined
}


def _locate(call: _Call, t: Thread) -> tuple[list[Frame], Stmt]:
    """Find ``t.cur_step`` in the current build and check it is the right kind of statement.

    The frames are kept for the thread's next :func:`_position` in this build.
    """
    frames, st = _frames_of(call, t, t.cur_step)
    want = _WANT.get(t.status)
    if want is None and t.case:
        want = (K_SELECT,)
    if want is not None and st._kind not in want:
        raise CursorNotFound(t.id, t.cur_step, f"that name is now a {type(st).__name__}")
    if t.case and isinstance(st, Select) and st.case(t.case) is None:
        raise CursorNotFound(
            t.id, t.cur_step, f"the Select no longer has the handled event {t.case!r}"
        )
    call.located[t.id] = (call.gen, t.cur_step, frames, st)
    return frames, st


def _position(call: _Call, t: Thread) -> list[Frame]:
    """Frames from which thread ``t`` continues, derived from its committed cursor."""
    if not t.cur_step:  # a new thread: the start of its body
        if _is_main(t):
            return [[call.root.stmts, 0, None, 0]]
        found = call.find(t.name)
        if found is None or not isinstance(found[1], Go):
            raise CursorNotFound(t.id, t.name, "its Go statement is gone")
        go = found[1]
        return [[go.body, 0, go, 0]]
    cached = call.located.pop(t.id, None)
    if cached is not None and cached[0] == call.gen and cached[1] == t.cur_step:
        frames, st = cached[2], cached[3]
    else:  # the build changed since the thread was located
        frames, st = _locate(call, t)
        del call.located[t.id]
    if t.status is _EXECUTING:
        return frames  # at the step: run it (again)
    if t.case:  # the handled case's body runs next
        assert isinstance(st, Select)
        hit = st.case(t.case)
        assert hit is not None
        frames.append([hit[1].body, 0, st, hit[0]])
        return frames
    frames[-1][1] += 1  # after the completed Step / released WaitFor
    return frames


# --------------------------------------------------------------------------- resume


def resume(
    wf: Workflow,
    state: State,
    checkpoint: Checkpoint | None = None,
    *,
    max_units: int = DEFAULT_MAX_UNITS,
    middleware: Sequence[object] = (),
    deadline: datetime | None = None,
    wait_retries: bool = False,
) -> WorkflowStatus:
    """Run every runnable thread until all are blocked; return ``state.status``.

    ``checkpoint(kind)`` is called after each step, released WaitFor, setup,
    teardown, and once with ``AFTER_RESUME`` at the very end: save there.
    ``middleware`` wraps this call, each step and each setup / teardown (see
    :mod:`gorch.hooks`).

    ``deadline`` (an aware datetime): no step starts from then on; the call
    ends where the threads are, with status ``RESUMING`` when work is left, for
    a later call to go on (a step running at the deadline is not interrupted).
    A step that fails with attempts left under its :class:`gorch.Retry` raises
    ``StepFailed`` with ``retry_at``; with ``wait_retries`` this call sleeps
    until then and runs it again (on the data the failed attempt left).
    """
    if middleware or deadline is not None or wait_retries:
        return run(
            wf,
            state,
            checkpoint,
            max_units=max_units,
            middleware=middleware,
            deadline=deadline,
            wait_retries=wait_retries,
        )
    call = _start(wf, state, checkpoint, max_units, False, (), None, True)
    if call.index.hooks:
        return _resume_call(call, (), "resume")  # type: ignore[no-any-return]
    for _ in _run(call):  # (run, inlined: the common case)
        raise AssertionError("a walk of the sync API waited for something")
    return state.status


def run(
    wf: Workflow,
    state: State,
    checkpoint: Checkpoint | None = None,
    *,
    max_units: int = DEFAULT_MAX_UNITS,
    lazy_steps: bool = False,
    middleware: Sequence[object] = (),
    reason: str = "resume",
    restore: Callable[[], None] | None = None,
    deadline: datetime | None = None,
    wait_retries: bool = False,
    report_failures: bool = True,
    step_log: StepLog | None = None,
) -> WorkflowStatus:
    """:func:`resume`, with options for callers that save at every checkpoint.

    With ``lazy_steps``, ``AFTER_STEP`` is reported just before the next step
    or WaitFor handler starts, and not at all when ``AFTER_RESUME`` comes first:
    a completed step is still saved before any later step runs (so a crash
    re-runs at most the step in flight), with one save fewer per resume.
    ``reason`` tells middleware why the resume runs (start, event, timer, retry).
    ``restore()``, when given, is called as soon as a DAG node's step fails,
    before other threads go on: a caller that saved before every step (as
    with ``lazy_steps``) puts back the data that step started from.
    ``report_failures=False`` leaves ``on_failed`` to the caller, which saves the
    failure first and then calls :func:`report_failure`.
    """
    deadline = _aware(deadline)
    while True:
        call = _start(wf, state, checkpoint, max_units, lazy_steps, middleware, restore, True)
        call.deadline = deadline
        call.report_failures = report_failures
        _log_steps(call, step_log)
        try:
            return _run_sync(call, middleware, reason)
        except StepFailed as e:
            wait = _retry_wait(e, wait_retries, call.deadline)
            if wait is None:
                raise
            time.sleep(wait)


def _run_sync(call: _Call, middleware: Sequence[object], reason: str) -> WorkflowStatus:
    state = call.state
    if not middleware and not call.index.hooks:
        for _ in _run(call):  # (_exhaust, inlined: the common case)
            raise AssertionError("a walk of the sync API waited for something")
        return state.status
    out = _resume_call(call, middleware, reason)
    return _plain_result(out, "the middleware around_resume")  # type: ignore[no-any-return]


async def aresume(
    wf: Workflow,
    state: State,
    checkpoint: Checkpoint | None = None,
    *,
    max_units: int = DEFAULT_MAX_UNITS,
    middleware: Sequence[object] = (),
    concurrency: int = DEFAULT_CONCURRENCY,
    executor: Executor | None = None,
    deadline: datetime | None = None,
    wait_retries: bool = False,
) -> WorkflowStatus:
    """:func:`resume` for async workflows: ``await gorch.aresume(wf, state)``.

    Steps, handlers' setup and teardown, hooks, middleware and ``checkpoint``
    may be ``async def`` or plain (plain ones are called directly). The async
    steps of independent threads (``Go``, ``Parallel``, ``|``, ready DAG nodes)
    run concurrently, at most ``concurrency`` at a time, each on a private
    copy of the data whose changes are applied in thread order (see the
    module's docstring); with ``executor``, plain steps run there too.
    Checkpoints, results and errors are those of :func:`resume`, with one
    difference: concurrent steps do not see each other's changes, and two
    that change the same field fail the later one with ``ConcurrentChange``.
    A step that fails does not cancel the steps of other threads already
    running: they finish and are recorded, then ``StepFailed`` is raised (a
    node of a ``DAG(..., fail_fast=True)`` that fails cancels its sibling
    nodes' running steps: those nodes count as skipped). Cancelling the task
    leaves every running step's thread on that step, with none of its changes
    (a step awaited in place is undone too), and a crash at any checkpoint
    resumes to the same data and cursors as a run without one.
    """
    return await arun(
        wf,
        state,
        checkpoint,
        max_units=max_units,
        middleware=middleware,
        concurrency=concurrency,
        executor=executor,
        deadline=deadline,
        wait_retries=wait_retries,
    )


def check_concurrency(concurrency: object) -> int:
    """``concurrency`` as the async API takes it, or ValueError: one rule for every entry point."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(
            "concurrency must be an int of at least 1 (how many steps of one instance "
            f"run at once), got {concurrency!r}"
        )
    return concurrency


async def arun(
    wf: Workflow,
    state: State,
    checkpoint: Checkpoint | None = None,
    *,
    max_units: int = DEFAULT_MAX_UNITS,
    lazy_steps: bool = False,
    middleware: Sequence[object] = (),
    reason: str = "resume",
    restore: Callable[[], Any] | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    executor: Executor | None = None,
    deadline: datetime | None = None,
    wait_retries: bool = False,
    report_failures: bool = True,
    step_log: StepLog | None = None,
) -> WorkflowStatus:
    """:func:`run` for the async API (the options of :func:`aresume` and :func:`run`)."""
    check_concurrency(concurrency)
    deadline = _aware(deadline)
    while True:
        call = _start(wf, state, checkpoint, max_units, lazy_steps, middleware, restore, False)
        call.limit = asyncio.Semaphore(concurrency)
        call.executor = executor
        call.deadline = deadline
        call.report_failures = report_failures
        _log_steps(call, step_log)
        try:
            out = _resume_call(call, middleware, reason)
            if is_awaitable(out):
                out = await out
            return out  # type: ignore[no-any-return]
        except StepFailed as e:
            wait = _retry_wait(e, wait_retries, call.deadline)
            if wait is None:
                raise
        finally:
            if call.flights or call.parked:  # an error or a cancellation: nothing goes on unseen
                await _abandon(call)
        await asyncio.sleep(wait)


def _aware(deadline: datetime | None) -> datetime | None:
    if deadline is not None and deadline.tzinfo is None:
        raise ValueError(f"deadline must be an aware datetime (e.g. in UTC), got {deadline!r}")
    return deadline


def _retry_wait(e: StepFailed, wait: bool, deadline: datetime | None) -> float | None:
    """Seconds to sleep before running a failed step again in the same call, or None."""
    if not wait or e.retry_at is None or (deadline is not None and e.retry_at >= deadline):
        return None
    return max(0.0, (e.retry_at - clock.now()).total_seconds())


def _start(
    wf: Workflow,
    state: State,
    checkpoint: Checkpoint | None,
    max_units: int,
    lazy_steps: bool,
    middleware: Sequence[object],
    restore: Callable[[], Any] | None,
    sync: bool,
) -> _Call:
    """The checks both APIs make before anything runs, and the call they run."""
    if state.status is _FINISHED:
        raise WorkflowFinishedError(state.id)
    call = _Call(wf, state, checkpoint, max_units, middleware, sync=sync)
    call.lazy = lazy_steps and checkpoint is not None
    call.restore = restore
    for name in call.index.dags:  # a cycle that data made is refused before anything runs
        found = call.find(name)
        if found is not None and isinstance(found[1], DAG):
            graph_of(found[1], call.index.owner)
    return call


def _resume_call(call: _Call, middleware: Sequence[object], reason: str) -> Any:
    """Run the resume inside ``around_resume``: its status, or (async API) an awaitable."""
    if not middleware and not call.index.hooks:
        return call.run(_run(call))

    def inner() -> Any:
        return call.run(_run_hooked(call))

    around = wrappers(middleware, "around_resume", not call.sync)
    if not around:
        return inner()
    state = call.state
    ctx = ResumeContext(state.workflow, state.id, reason, call.wf, state)
    return call.chain(around, ctx, inner)


def _run_hooked(call: _Call) -> Walk[WorkflowStatus]:
    """``on_start``, :func:`_run`, then ``on_finish`` / ``on_waiting`` / ``on_failed``.

    What the last three raise is logged: the state is saved by then.
    """
    hooks = call.index.hooks
    state = call.state
    if "on_start" in hooks and _fresh(state):
        out = _hook(call.wf, "on_start")()
        if out is not None and is_awaitable(out):
            yield from call.wait(out, "the hook on_start")
    try:
        status = yield from _run(call)
    except StepFailed as e:
        if call.report_failures and _failed_for_good(call, e):
            yield from _report_failure(call, e)
        raise
    try:
        out = None
        if status is _FINISHED:
            if "on_finish" in hooks:
                out = _hook(call.wf, "on_finish")()
        elif status is _WF_WAITING and "on_waiting" in hooks:
            awaited = [we.req for t in state.threads for we in _active(t)]
            out = _hook(call.wf, "on_waiting")(awaited)
        if out is not None and is_awaitable(out):
            yield from call.wait(out, "a lifecycle hook")
    except Exception:  # the state is saved: there is nothing to undo
        log.exception("gorch: a lifecycle hook of workflow %r raised", state.id)
    return status


def _report_failure(call: _Call, e: StepFailed) -> Walk[None]:
    """``on_failed`` of the workflow, then of each middleware (what they raise is logged)."""
    state = call.state
    hooks: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []
    if "on_failed" in call.index.hooks:
        hooks.append(("the on_failed hook", _hook(call.wf, "on_failed"), (e,)))
    if call.middleware:
        ctx = ResumeContext(state.workflow, state.id, "failed", call.wf, state)
        for m in wrappers(call.middleware, "on_failed", not call.sync):
            hooks.append(("a middleware's on_failed", m, (ctx, e)))
    for what, fn, args in hooks:
        try:
            out = fn(*args)
            if out is not None and is_awaitable(out):
                yield from call.wait(out, what)
        except Exception:
            log.exception("gorch: %s of workflow %r raised", what, state.id)


def report_failure(
    wf: Workflow, state: State, error: StepFailed, middleware: Sequence[object] = ()
) -> None:
    """Call ``on_failed`` of ``wf`` and of ``middleware`` for ``error``, a failure for good.

    For callers that save a failure themselves before telling anyone (the
    Engine runs its resumes with ``report_failures=False``, then calls this).
    """
    call = _Call(wf, state, None, DEFAULT_MAX_UNITS, middleware, check=False)
    _finish(_report_failure(call, error))


async def areport_failure(
    wf: Workflow, state: State, error: StepFailed, middleware: Sequence[object] = ()
) -> None:
    """:func:`report_failure` for the async API (hooks may be ``async def``)."""
    call = _Call(wf, state, None, DEFAULT_MAX_UNITS, middleware, sync=False, check=False)
    await _adrive(_report_failure(call, error))


def _fresh(state: State) -> bool:
    """Whether nothing of the instance ran yet: its main thread alone, at the start."""
    threads = state.threads
    return len(threads) == 1 and not threads[0].cur_step and threads[0].id == MAIN_THREAD


def _failed_for_good(call: _Call, e: StepFailed) -> bool:
    """Whether no retry is left for the failure: a DAG's, or a step's past its policy."""
    return isinstance(e, DAGFailed) or e.retry_at is None


def _active(t: Thread) -> list[WaitEvent]:
    if t.status is not _WAITING_EVENT:
        return []
    return [we for we in t.wait_events if we.status in ACTIVE_EVENT]


def _run(call: _Call) -> Walk[WorkflowStatus]:
    """Steps 2 to 5 of a resume (see SPEC §2): teardowns, the threads, setups, status."""
    state = call.state
    moved = _reattach(call) if len(state.threads) > 1 else []  # (only branches move)
    try:
        for t in state.threads:  # every cursor must exist before anything changes
            if t.cur_step:
                _locate(call, t)
            elif not _is_main(t):
                found = call.find(t.name)
                if found is None or not isinstance(found[1], Go):
                    raise CursorNotFound(t.id, t.name, "the Go that started the thread is gone")
    except Exception:
        for t, old in moved:  # state untouched
            t.name = old
        raise
    for t in state.threads:
        if t.wait_events:  # maybe events to tear down
            yield from _teardown_finished_waits(call)
            break
    # Advance the earliest-created runnable thread until none can; then release
    # WaitFors. Under the async API, a thread whose step is in flight is passed
    # over until that step is committed (see _commit_round).
    sync = call.sync
    while True:
        if call.expired:  # the deadline passed: commit what flies, start nothing more
            if call.parked:
                _ground(call)
            if not call.flights:
                break
            yield from _commit_round(call)
            continue
        for t in state.threads:
            if t.status is _RESUMING or t.status is _EXECUTING:
                if call.deferred and any(d.thread_id == t.id for d in call.deferred):
                    continue  # failed in this resume: retried by a later one
                if sync:
                    yield from _run_thread(call, t)
                else:
                    if t.id in call.flights or t.id in call.parked:
                        continue
                    if call.stop:  # walked once more, up to its next step (not started)
                        if t.id in call.stopped:
                            continue
                        call.stopped.add(t.id)
                    yield from _advance(call, t, _run_thread(call, t))
                    if call.halted:
                        yield from _halt_nodes(call)
                break
        else:
            if call.parked and not call.stop:
                _take_off(call)
            elif call.parked:  # a step failed: the others start in a later resume
                _ground(call)
            elif call.flights:
                yield from _commit_round(call)
            elif call.failure is not None:
                aw = call.flush()
                if aw is not None:
                    yield aw
                raise call.failure
            else:
                for o in state.threads:  # (no call: this runs at the end of every resume)
                    if o.status is _WAITING_CONDITION:
                        break
                else:
                    break  # nothing waits for a condition: done
                if not (yield from _release_condition(call)):
                    break
        if state.status is _FINISHED:
            if call.flights or call.parked:  # the main thread ended: the others are cancelled
                _ground(call)
                yield from _cancel_flights(call, list(call.flights.values()))
            call.pending = False  # AFTER_RESUME saves the last step too
            aw = call.save(_AFTER_RESUME)
            if aw is not None:
                yield aw
            return state.status
    failures = (yield from _setup_new_waits(call)) if _awaits_setup(state) else []
    state.status = _WF_WAITING
    for t in state.threads:
        if t.status is _RESUMING or t.status is _EXECUTING:
            state.status = _WF_RESUMING
    call.pending = False
    if call.checkpoint is not None:
        aw = call.save(_AFTER_RESUME)
        if aw is not None:
            yield aw
    if call.deferred:
        raise call.deferred[0]
    if failures:
        raise SetupError(failures)
    return state.status


def _awaits_setup(state: State) -> bool:
    """Whether an event waits for its setup (or a retry of it)."""
    for t in state.threads:
        for we in t.wait_events:
            if we.status is _PENDING_SETUP or we.status is _SETUP_ERROR:
                return True
    return False


# --------------------------------------------------------------------------- steps in flight


class _Launch:
    """What a walk yields to have its step run in the next round (async API only).

    ``here``: a plain step, run in place on the live data when its commit
    comes (so it sees the steps committed before it, as under :func:`resume`).
    """

    __slots__ = ("here", "name", "prepared", "timeout")

    def __init__(
        self,
        name: str,
        here: bool = False,
        prepared: Prepared | None = None,
        timeout: float | None = None,
    ) -> None:
        self.name = name
        self.here = here
        self.prepared = prepared  # its arguments and context, if it takes any (gorch.results)
        self.timeout = timeout  # the step's timeout= (seconds)


class _Flight:
    """A step running as a task on a copy of the workflow, and the walk waiting for it.

    Parked (``task`` None) until its round takes off.
    """

    __slots__ = ("here", "name", "prepared", "task", "thread", "timeout", "walk")

    def __init__(self, thread: Thread, walk: Walk[None], launch: _Launch) -> None:
        self.thread = thread
        self.walk = walk
        self.name = launch.name
        self.here = launch.here
        self.prepared = launch.prepared
        self.timeout = launch.timeout
        self.task: asyncio.Task[tuple[list[Change], Any]] | None = None


def _concurrent(call: _Call, t: Thread) -> bool:
    """Whether anything else could run while ``t``'s step does (else it is awaited in place)."""
    if call.flights or call.parked:
        return True
    for o in call.state.threads:
        if o is not t and (o.status is _RESUMING or o.status is _EXECUTING):
            if call.deferred and any(d.thread_id == o.id for d in call.deferred):
                continue
            return True
    return False


def _advance(
    call: _Call,
    t: Thread,
    walk: Walk[None],
    value: Any = None,
    error: BaseException | None = None,
) -> Walk[None]:
    """Run thread ``t``'s walk until it ends, blocks, or puts its step in flight.

    What the walk waits for in place is passed up to the driver. A step that
    fails while others are in flight stops the scheduling of new steps; the
    failure is raised once those have been committed.
    """
    while True:
        try:
            item = walk.send(value) if error is None else walk.throw(error)
        except StopIteration:
            return
        except StepFailed as e:
            if not call.flights:
                raise
            call.stop = True
            if call.failure is None:
                call.failure = e
            return
        finally:
            error = None
        if type(item) is _Launch:
            call.parked[t.id] = _Flight(t, walk, item)
            return
        try:
            value = yield item
        except GeneratorExit:
            raise
        except BaseException as e:
            value = None
            error = e


def _take_off(call: _Call) -> None:
    """Start a round: every parked step, as a task on its own copy of the data as it is now.

    Every step of a round starts from the same data, the state last saved (no
    save is held: the previous round was committed in full), so a reload from
    that save starts the same steps from the same data.
    """
    wf = call.wf
    base = _data(wf)
    loop = asyncio.get_running_loop()
    call.written = {}
    for t in call.state.threads:  # thread order: the order of commits
        f = call.parked.pop(t.id, None)
        if f is None:
            continue
        call.flights[t.id] = f
        if f.here:
            continue
        try:
            copy = wf.model_copy(deep=True)
        except Exception:  # something in it cannot be deep-copied: a copy from the data
            copy = type(wf).model_validate(base)
        f.task = loop.create_task(_isolated(call, t, f, copy, base))
    assert not call.parked, "a parked step belongs to no thread"


def _ground(call: _Call) -> None:
    """Drop the parked steps: their threads stay on them, for a later resume."""
    parked = list(call.parked.values())
    call.parked.clear()
    for f in parked:
        f.walk.close()


async def _isolated(
    call: _Call, t: Thread, f: _Flight, copy: Workflow, base: dict[str, Any]
) -> tuple[list[Change], Any]:
    """Run ``f``'s step on ``copy``: its changes to the data it started from, and its result."""
    name = f.name
    async with call.limit:
        fn = _step_fn(call, copy, name)
        ctx = None
        if f.prepared is not None:
            fn = _bind(fn, f.prepared, copy)
            ctx = f.prepared[1]
        if call.wrap_steps or f.timeout is not None:  # a timeout is checked in _hooked_step
            out = _run_step(call, copy, t, name, fn, ctx, f.timeout)
        else:
            out = call.call_fn(fn)
        if out is not None and is_awaitable(out):
            out = await out
    return diff_data(base, _data(copy)), out


def _step_fn(call: _Call, wf: Workflow, name: str) -> Callable[[], Any]:
    """The function of step ``name`` in a build of ``wf`` (bound to that workflow)."""
    root = _build(wf, call.index.owner)
    paths = call.index.paths
    path = paths.get(name) if paths is not None else None
    st = stmt_at(root, path) if path is not None else None
    if type(st) is not Step or st.name != name:  # another shape: index this build
        path = index_definition(root, call.index.owner).get(name)
        st = stmt_at(root, path) if path is not None else None
    if type(st) is not Step:
        raise DefinitionError(f"{call.index.owner}: Step {name!r} is not in a build of its data")
    return st.fn


def _data(wf: Workflow) -> dict[str, Any]:
    return wf.model_dump(mode="json", round_trip=True, warnings=False)


def _merge(call: _Call, f: _Flight, changes: list[Change]) -> None:
    """Apply a committed step's changes to the live workflow (its untouched fields stay).

    Raises :class:`ConcurrentChange` (nothing applied) when a step committed
    earlier in the same round changed the same data: each started from the
    same copy, so applying both would lose an update.
    """
    if not changes:
        return
    _written(call, f, changes)
    wf = call.wf
    cls = type(wf)
    data = _data(wf)
    touched = apply_changes(data, changes)
    merged = cls.model_validate(data)
    for name in touched:
        if name in cls.model_fields:
            setattr(wf, name, getattr(merged, name))
    call.dirty = True


def _written(call: _Call, f: _Flight, changes: list[Change], check: bool = True) -> None:
    """Record what a step of the round changed; ConcurrentChange if another one did too.

    A plain step run in place saw the steps committed before it: not checked.
    """
    written = call.written
    step = f"{f.name!r} of thread {f.thread.id!r}"
    for path, op, _ in changes if check else ():
        for other, (other_op, by) in written.items():
            n = min(len(path), len(other))
            if path[:n] == other[:n] and not (op == other_op == "add" and path == other):
                raise ConcurrentChange(".".join(path), step, by)
    for path, op, _ in changes:
        written.setdefault(path, (op, step))


def _commit_round(call: _Call) -> Walk[None]:
    """Commit the steps of the round in flight, in thread order (the order they took off).

    Each commit applies the step's changes and resumes its thread's walk, which
    records the step and ends; the threads are walked again from their cursors
    when the round is over, as a reload of the round's save would. Checkpoints
    are held until the round's last commit (see :meth:`_Call.save`).
    """
    for f in list(call.flights.values()):
        if call.flights.get(f.thread.id) is not f:
            continue  # cancelled meanwhile (a fail_fast DAG, the workflow finished)
        if f.here:  # a plain step: it runs now, on the live data
            del call.flights[f.thread.id]
            before = _data(call.wf) if call.flights else None
            yield from _advance(call, f.thread, f.walk, _HERE)
            if before is not None:  # later steps of the round must not overwrite it
                _written(call, f, diff_data(before, _data(call.wf)), check=False)
        else:
            yield from _land(call, f)
        if call.halted:
            yield from _halt_nodes(call)
        if call.state.status is _FINISHED:
            return


_HERE = object()  # sent to a parked plain step's walk: run it in place now


def _land(call: _Call, f: _Flight) -> Walk[None]:
    """Apply the changes of a step that ran on a copy, and resume its thread's walk."""
    assert f.task is not None
    error: BaseException | None = None
    result: Any = None
    try:
        changes, result = yield f.task
    except GeneratorExit:
        raise
    except BaseException as e:  # the step raised (or was cancelled)
        error = e
    else:
        try:
            _merge(call, f, changes)
        except Exception as e:  # it clashes with another step, or does not validate
            error = e
    del call.flights[f.thread.id]
    yield from _advance(call, f.thread, f.walk, result, error)


def _cancel_flights(call: _Call, flights: list[_Flight]) -> Walk[None]:
    """Cancel steps in flight: their threads stay on their steps, their changes are dropped."""
    tasks = [f.task for f in flights if f.task is not None]
    for f in flights:
        if f.task is not None:
            f.task.cancel()
        f.walk.close()
        del call.flights[f.thread.id]
    if tasks:
        yield asyncio.gather(*tasks, return_exceptions=True)


def _halt_nodes(call: _Call) -> Walk[None]:
    """A node of a fail_fast DAG failed: cancel its sibling nodes' running steps.

    Those nodes count as skipped (nothing of their step was kept), so the DAG
    fails as soon as nothing of it runs any more; a retry runs them again.
    """
    halted, call.halted = call.halted, set()
    parked = [f for f in call.parked.values() if f.thread.parent in halted]
    for f in parked:
        del call.parked[f.thread.id]
        f.walk.close()
    flying = [f for f in call.flights.values() if f.thread.parent in halted]
    stopped = parked + flying
    if not stopped:
        return
    if flying:
        yield from _cancel_flights(call, flying)
    for f in stopped:
        t = f.thread
        found = _dag_of_node(call, t)
        if t.wait_events:
            yield from _drop_waits(call, t)
        call.state.threads.remove(t)
        if found is not None:
            parent, dag = found
            parent.nodes[t.name[len(dag.name) + 1 :]] = NodeStatus.SKIPPED
            _dag_start(call, parent, dag, ())


async def _abandon(call: _Call) -> None:
    """The call ends with steps in flight (an error, a cancellation): cancel and reap them."""
    _ground(call)
    flights = list(call.flights.values())
    call.flights.clear()
    tasks = [f.task for f in flights if f.task is not None]
    for f in flights:
        if f.task is not None:
            f.task.cancel()
        f.walk.close()
    await asyncio.gather(*tasks, return_exceptions=True)


def _refresh(call: _Call, t: Thread, last: tuple[int, int] | None) -> list[Frame]:
    """Rebuild the definition and find ``t`` again from its committed cursor.

    Called by a walk at its first read after data changed; the walk restarts
    from the returned frames. ``last`` is where (frame depth, index) the walk
    ran the step that is now the cursor: if the name leads elsewhere in the
    new build, the shape changed, and the build is validated (a duplicate name
    raises) before the name is trusted. The common case is inlined.
    """
    call.rebuild()
    name = t.cur_step
    if name and t.status is _RESUMING and not t.case:
        paths = call.index.paths
        assert paths is not None
        path = paths.get(name)
        found = _navigate(call.root, path, name) if path is not None else None
        if found is not None and found[3] == t.name:
            frames = found[0][found[2] :] if found[2] else found[0]
            if last is None or (len(frames) == last[0] and frames[-1][1] == last[1]):
                frames[-1][1] += 1
                return frames
        if call.indexed_gen != call.gen:
            call.reindex()
    return _position(call, t)


def _run_thread(call: _Call, t: Thread) -> Walk[None]:
    """Run ``t`` unit by unit until it blocks or ends.

    Running ``t`` never makes an earlier thread runnable, so advancing it to its
    next blocking point is the same as re-picking the earliest runnable thread
    after every unit.
    """
    state = call.state
    if t.nodes and t.status is _RESUMING and _dag_ended_with_failures(call, t):
        return
    frames = _position(call, t)
    spawned: list[Thread] = []
    loops = 0  # loop iterations of the current walk, added to call.units on commit
    last: tuple[int, int] | None = None  # where the step this thread completed last ran
    paths: Any = call.index.paths
    while True:
        top = frames[-1]
        body = top[0]
        idx = top[1]

        if idx >= len(body):  # ---- end of a body
            owner = top[2]
            if owner is not None and owner._kind == K_FOR:  # (loop again) or enter?
                cond = owner.cond
                if type(cond) is bool:
                    if call.dirty:
                        frames, spawned, loops = _refresh(call, t, last), [], 0
                        continue
                    again = cond
                else:
                    again = _truth(cond, owner.name)
                    if type(again) is not bool:
                        again = yield from _await_truth(call, again, owner.name)
                if again:
                    loops += 1
                    if call.units + loops > call.max_units:
                        raise ResumeLimitError(call.max_units, t.id, owner.name)
                    top[1] = 0
                    continue
            if len(frames) == 1:  # the thread's own body ended
                _commit(state, spawned, call, loops)
                if _ending_waits(state, t):
                    yield from _drop_ending_waits(call, t)
                _end_thread(call, t)
                return
            frames.pop()
            frames[-1][1] += 1
            continue

        st = body[idx]
        kind = st._kind

        if kind == K_STEP:  # ---- a unit of its own: run the step
            found = paths.get(st.name)  # its name must find it again (shapes vary)
            if found is None or found[-1] != idx:
                call.verify(st)
                paths = call.index.paths
            if call.stop or (call.deadline is not None and clock.now() >= call.deadline):
                # (async) a step of another thread failed, or the call's deadline passed:
                # this step waits for a later resume, and the walk to it is not committed
                # (threads it would start are started when a later walk gets here)
                call.expired = not call.stop
                return
            if spawned:
                state.threads.extend(spawned)
                spawned = []
            call.units += loops + 1
            loops = 0
            if call.units > call.max_units:
                call.units -= 1
                raise ResumeLimitError(call.max_units, t.id, st.name)
            if t.status is not _EXECUTING or t.cur_step != st.name:
                t.status = _EXECUTING
                t.cur_step = st.name
                t.case = ""
            if call.pending:  # lazy_steps: save the last step before this one runs
                call.pending = False
                aw = call.save(_AFTER_STEP)
                if aw is not None:
                    yield aw
            call.dirty = True  # the step may change data, even when it fails
            if call.sync:
                fn = st.fn
                ctx = None
                try:
                    if call.index.params:  # some step function takes parameters
                        plan = plan_of(fn)
                        if plan:
                            fn, ctx = _bound(call, t, st.name, fn, plan, frames, call.wf)
                    timeout = st._timeout
                    wrap = call.wrap_steps or timeout is not None  # see _hooked_step
                    try:
                        out = (
                            _run_step(call, call.wf, t, st.name, fn, ctx, timeout) if wrap else fn()
                        )
                    except TypeError as e:
                        if not _unbound(call, fn, e):
                            raise
                        # A build showed a function taking parameters where the indexed
                        # one took none: its body never ran; bind it and run it now.
                        fn, ctx = _bound(call, t, st.name, fn, plan_of(fn), frames, call.wf)
                        out = (
                            _run_step(call, call.wf, t, st.name, fn, ctx, timeout) if wrap else fn()
                        )
                    if out is not None:
                        if is_awaitable(out):
                            raise refuse_awaitable(out, f"Step {st.name!r}")
                        keep(state.results, _result_key(call, t, st.name), out)
                    elif state.results:
                        state.results.pop(_result_key(call, t, st.name), None)
                except SyncCallRefused:
                    raise
                except Exception as e:
                    yield from _step_failed(call, t, st.name, _policy(call, st), e)
                    return  # a DAG node: failed for good, or retried after the others ran
            else:
                done = yield from _async_step(call, t, st, frames)
                if done is not _DONE and done is not _LANDED:
                    if done is _STOPPED:
                        return
                    # Other threads rebuilt the definition: find t's step in this build.
                    frames, paths = _position(call, t), call.index.paths
                    top = frames[-1]
                    idx = top[1]
            t.status = _RESUMING
            last = (len(frames), idx)
            if t.attempts:
                t.attempts = 0
                t.error = ""
            if call.checkpoint is not None:
                if call.lazy:
                    call.pending = True
                else:  # (the async API may hold it: see _Call.save)
                    kind_ = _AFTER_STEP
                    aw = call.checkpoint(kind_) if call.sync else call.save(kind_)
                    if aw is not None and is_awaitable(aw):
                        yield from call.wait(aw, "the checkpoint callback")
            if not call.sync and done is _LANDED:
                # Committed as part of a round: the walk ends here, and the thread is
                # walked again from its saved cursor once the whole round is committed,
                # exactly as a reload of that save would (see _commit_round).
                return
            top[1] = idx + 1
            continue

        if kind == K_SECTION:
            frames.append([st.stmts, 0, st, 0])
            continue

        if kind in (K_IF, K_SWITCH):
            branches = st.branches if kind == K_IF else [(c.cond, c.body) for c in st.cases]
            chosen = -1
            restart = False
            for bi, (cond, branch) in enumerate(branches):
                if type(cond) is bool:
                    if call.dirty:
                        restart = True
                        break
                    truth = cond
                else:
                    truth = _truth(cond, "If" if kind == K_IF else "Switch")
                    if type(truth) is not bool:
                        where = "If" if kind == K_IF else "Switch"
                        truth = yield from _await_truth(call, truth, where)
                if truth:
                    chosen = bi
                    frames.append([branch, 0, st, bi])
                    break
            if restart:
                frames, spawned, loops = _refresh(call, t, last), [], 0
                continue
            if chosen < 0:
                top[1] = idx + 1
            continue

        if kind == K_FOR:  # enter at the end of the body: the condition is checked there
            frames.append([st.body, len(st.body), st, 0])
            continue

        if kind == K_SELECT:  # ---- block: await the cases' events
            if call.dirty:  # the cases must come from a build of current data
                frames, spawned, loops = _refresh(call, t, last), [], 0
                continue
            call.verify_at(st, frames)
            if spawned:  # (_commit, inlined)
                state.threads.extend(spawned)
            call.units += loops
            state.pc += 1
            pc = state.pc
            t.status = _WAITING_EVENT
            t.cur_step = st.name
            t.case = ""
            wid, tid, name = state.id, t.id, st.name
            waits = t.wait_events
            setups = False
            for c in st.cases:
                if type(c) is Timeout or (c.handler is not None and _needs_setup(c)):
                    setups = True
                    status = _PENDING_SETUP
                else:
                    status = _SETUP
                waits.append(WaitEvent(EventRequest(wid, tid, c.event, pc), status, select=name))
            if setups:  # the setups at the end of this call find the Select here
                call.located[tid] = (call.gen, name, frames, st)
            return

        if kind == K_GO:
            gid = st.id
            if gid is None:
                gid = st.name
            elif type(gid) is str:
                if call.dirty:
                    frames, spawned, loops = _refresh(call, t, last), [], 0
                    continue
            elif callable(gid):
                try:
                    gid = gid()
                except Exception as e:
                    raise DefinitionError(
                        f"the id of Go {st.name!r} raised {type(e).__name__}: {e}"
                    ) from e
                if is_awaitable(gid):
                    gid = yield from _await_id(call, gid, st.name)
            if type(gid) is not str or not gid:
                raise DefinitionError(
                    f"Go {st.name!r}: a thread id must be a non-empty str, got {gid!r}"
                )
            if state.thread(gid) is not None or any(s.id == gid for s in spawned):
                raise ThreadExists(gid, st.name)
            spawned.append(Thread(id=gid, name=st.name))
            top[1] = idx + 1
            continue

        if kind in (K_PARALLEL, K_DAG):  # ---- start threads; block until joined
            if not st.branches:
                top[1] = idx + 1
                continue
            call.verify_at(st, frames)
            order = graph_of(st, call.index.owner).order if kind == K_DAG else ()
            if kind == K_DAG:  # node threads are started later: their ids must be free now
                taken = {o.id for o in state.threads}.union(o.id for o in spawned)
                for go in st.branches:
                    if _child_id(t, go.name) in taken:
                        raise ThreadExists(_child_id(t, go.name), go.name)
            if kind == K_PARALLEL:
                for go in st.branches:
                    gid = _child_id(t, go.name)
                    if state.thread(gid) is not None or any(s.id == gid for s in spawned):
                        raise ThreadExists(gid, go.name)
                    spawned.append(Thread(id=gid, name=go.name, parent=t.id))
            _commit(state, spawned, call, loops)
            t.status = _WAITING_CONDITION
            t.cur_step = st.name
            t.case = ""
            # the threads it starts find it here when they end (see _joining)
            call.located[t.id] = (call.gen, st.name, frames, st)
            if kind == K_DAG:
                t.nodes = {}
                t.node_errors = {}
                _dag_start(call, t, st, order)
            return

        if kind == K_WAITFOR:  # ---- block until the condition holds
            call.verify_at(st, frames)
            _commit(state, spawned, call, loops)
            t.status = _WAITING_CONDITION
            t.cur_step = st.name
            t.case = ""
            return

        if kind == K_RETURN:
            _commit(state, spawned, call, loops)
            if _ending_waits(state, t):
                yield from _drop_ending_waits(call, t)
            _end_thread(call, t)
            return

        if kind in (K_BREAK, K_CONTINUE):
            while frames[-1][2] is None or frames[-1][2]._kind != K_FOR:
                frames.pop()  # validated: a For encloses us within this thread
            if kind == K_BREAK:
                frames.pop()
                frames[-1][1] += 1
            else:
                frames[-1][1] = len(frames[-1][0])  # end of body: re-check the condition
            continue

        raise DefinitionError(f"unknown statement {st!r}")


_DONE, _LANDED, _MOVED, _STOPPED = "done", "landed", "moved", "stopped"


def _async_step(call: _Call, t: Thread, st: Step, frames: list[Frame]) -> Walk[str]:
    """Run a step under the async API: in place, or in flight when other threads can go on.

    Returns ``_DONE`` (run in place), ``_LANDED`` (committed as part of a
    round), ``_MOVED`` when other threads rebuilt the definition meanwhile (the
    walk finds ``t`` again), or ``_STOPPED`` when the walk must
    end: a DAG node's failure was recorded, or a step of another thread failed.
    """
    if call.stop:  # a step of another thread failed: this one waits for the next resume
        return _STOPPED
    fn = st.fn
    gen = call.gen
    isolated = launched = False
    try:
        plan = plan_of(fn)
        plain = call.executor is None and not is_async(fn)
        if plain and (call.flights or call.parked):  # in place, when its turn comes
            launched = True
            yield _Launch(st.name, here=True)
            call.dirty = True  # other walks read the data meanwhile: it changes now
        elif not plain and _concurrent(call, t):
            isolated = launched = True
            # Its arguments are read now, from the results the round starts from.
            prepared = _prepare(call, t, st.name, plan, frames) if plan else None
            launch = _Launch(st.name, prepared=prepared, timeout=st._timeout)
            out = yield launch  # its result, once committed
        if not isolated:  # in place, on the live workflow
            wf = call.wf
            ctx = None
            if plan:
                fn, ctx = _bound(call, t, st.name, fn, plan, frames, wf)
            timeout = st._timeout
            if call.wrap_steps or timeout is not None:  # a timeout is checked in _hooked_step
                out = _run_step(call, wf, t, st.name, fn, ctx, timeout)
            else:
                out = call.call_fn(fn)
            if out is not None and is_awaitable(out):
                out = yield from _awaited_in_place(wf, out)
        if out is not None or call.state.results:
            keep(call.state.results, _result_key(call, t, st.name), out)
    except Exception as e:
        yield from _step_failed(call, t, st.name, _policy(call, st), e, isolated)
        return _STOPPED  # a DAG node: failed for good, or retried after the others ran
    if launched:
        return _LANDED
    return _DONE if call.gen == gen else _MOVED


def _steps_in(st: Stmt) -> list[Step]:
    """The Steps in ``st`` (itself included)."""
    out = [st] if type(st) is Step else []
    for body in st.children():
        for s in body:
            out.extend(_steps_in(s))
    return out


def _unbound(call: _Call, fn: Callable[..., Any], e: TypeError) -> bool:
    """Whether ``e`` is Python refusing to call ``fn()`` without the parameters it takes.

    Raised by the call itself (its traceback has no frame of ``fn``), so the
    function's body never ran. Marks the class: its step functions take
    parameters from now on.
    """
    tb = e.__traceback__
    if call.index.params or tb is None or tb.tb_next is not None or not plan_of(fn):
        return False
    call.index.params = True
    return True


def _result_key(call: _Call, t: Thread, name: str) -> str:
    """Where step ``name`` of thread ``t`` keeps its result (see :mod:`gorch.results`)."""
    if not t.parent and t.id == MAIN_THREAD:
        return name
    ns = _namespace(call, t)
    return f"{ns}/{name}" if ns else name


def _namespace(call: _Call, t: Thread) -> str:
    """The results namespace of ``t``: its root thread's id ("" for the main thread's)."""
    root = t
    while root.parent:
        parent = call.state.thread(root.parent)
        if parent is None:
            break
        root = parent
    return "" if root.id == MAIN_THREAD else root.id


#: A step's prepared call: its arguments (or what binding them raised), and its context.
Prepared = tuple["dict[str, Any] | StepResultError", StepContext]


def _prepare(call: _Call, t: Thread, name: str, plan: Plan, frames: list[Frame]) -> Prepared:
    """Read now what a step taking parameters gets: copies of the results it may read."""
    state = call.state
    results = state.results
    hidden = _hidden_results(call, t)
    ns = _namespace(call, t)
    names = _step_names_of(call)
    visible: dict[str, Any] = {}
    for n in names:
        if n in hidden:
            continue
        key = f"{ns}/{n}" if ns and f"{ns}/{n}" in results else n
        if key in results:
            visible[n] = copy_of(results[key])
    ctx = StepContext(
        state.workflow,
        state.id,
        t.id,
        name,
        t.attempts + 1,
        call.wf,
        results=MappingProxyType(visible),
        hidden=hidden,
    )
    try:
        args: dict[str, Any] | StepResultError = arguments(
            name, plan, visible, hidden, names, _previous_step(call, t, frames)
        )
    except StepResultError as e:  # raised when the step runs: it is the step's failure
        args = e
    return args, ctx


def _bind(fn: Callable[..., Any], prepared: Prepared, wf: Workflow) -> Callable[[], Any]:
    args, ctx = prepared
    ctx.wf = wf
    if isinstance(args, StepResultError):
        error = args

        def refused() -> Any:
            raise error

        return refused
    return bind(fn, args, ctx)


def _bound(
    call: _Call,
    t: Thread,
    name: str,
    fn: Callable[..., Any],
    plan: Plan,
    frames: list[Frame],
    wf: Workflow,
) -> tuple[Callable[[], Any], StepContext]:
    """``fn`` with its arguments, as a zero-argument callable, and its context."""
    prepared = _prepare(call, t, name, plan, frames)
    return _bind(fn, prepared, wf), prepared[1]


def _step_names_of(call: _Call) -> frozenset[str]:
    """The names of every Step in the current build (a parameter may name one)."""
    if call.step_names is None or call.step_names_gen != call.gen:
        call.step_names = frozenset(st.name for st in _steps_in(call.root))
        call.step_names_gen = call.gen
    return call.step_names


def _hidden_results(call: _Call, t: Thread) -> frozenset[str]:
    """The step names whose results ``t`` may not read: an isolated DAG's non-ancestors."""
    found = _dag_of_node(call, t) if t.parent else None
    if found is None or not getattr(found[1], "isolated", False):
        return frozenset()
    dag = found[1]
    node = t.name[len(dag.name) + 1 :]
    deps = graph_of(dag, call.index.owner).deps
    mine, todo = {node}, [node]
    while todo:  # the node and its ancestors
        for d in deps.get(todo.pop(), ()):
            if d not in mine:
                mine.add(d)
                todo.append(d)
    return frozenset(st.name for n in dag.nodes if n.name not in mine for st in _steps_in(n))


def _previous_step(call: _Call, t: Thread, frames: list[Frame]) -> str | None:
    """The step that comes directly before the one ``frames`` are on, if a single Step does.

    The statement before it in its body; at the start of a body, the one before
    the statement that holds the body; at the start of a thread, for a DAG node
    with one dependency that is a Step, that Step, and for a Parallel branch the
    statement before the Parallel in the parent thread.
    """
    for k in range(len(frames) - 1, -1, -1):
        body, idx = frames[k][0], frames[k][1]
        if idx > 0:
            prev = body[idx - 1]
            return prev.name if type(prev) is Step else None
    if not t.parent:
        return None
    found = _dag_of_node(call, t)
    if found is not None:
        dag = found[1]
        node = next((n for n in dag.nodes if f"{dag.name}.{n.name}" == t.name), None)
        after: tuple[str, ...] = tuple(getattr(node, "after", ())) if node is not None else ()
        if len(after) != 1:
            return None
        dep: Any = next((n for n in dag.nodes if n.name == after[0]), None)
        if dep is not None and type(dep) is not Step:  # a Node: its last statement
            body = getattr(dep, "body", ())
            dep = body[-1] if body else None
        return dep.name if type(dep) is Step else None
    parent = call.state.thread(t.parent)
    paths = call.index.paths
    path = paths.get(parent.cur_step) if parent is not None and paths is not None else None
    if not path or path[-1] == 0:
        return None
    try:  # the body that holds the Parallel
        holder: Sequence[Stmt] = call.root.stmts
        for k in range(0, len(path) - 1, 2):
            holder = holder[path[k]].children()[path[k + 1]]
        prev = holder[path[-1] - 1]
    except (IndexError, TypeError, AttributeError):
        return None
    return prev.name if type(prev) is Step else None


def _check_late(step: str, timeout: float, began: float) -> None:
    """A plain step returned: StepTimeout if it took longer than its ``timeout=``."""
    took = time.monotonic() - began
    if took > timeout:
        raise StepTimeout(step, timeout, took)


async def _limited(aw: Any, step: str, timeout: float) -> Any:
    """Await a step's awaitable, cancelled at its ``timeout=`` (then StepTimeout)."""
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        raise StepTimeout(step, timeout) from None


def _awaited_in_place(wf: Workflow, out: Any) -> Walk[Any]:
    """Await a step running alone on the live workflow; if it is cancelled, undo its changes.

    An async function has not run yet when it returns its coroutine, so the
    data now is what the step starts from.
    """
    base = _data(wf)
    try:
        return (yield out)
    except asyncio.CancelledError:
        _reset(wf, base)
        raise


def _reset(wf: Workflow, data: dict[str, Any]) -> None:
    """Put the workflow's data back to ``data`` (a :func:`_data` dump of it)."""
    before = type(wf).model_validate(data)
    for name in type(wf).model_fields:
        setattr(wf, name, getattr(before, name))


def _truth(cond: Any, where: str) -> Any:
    """A callable condition's value as a bool, or the awaitable an async one returned."""
    if not callable(cond):
        raise DefinitionError(
            f"condition of {where!r} must be a bool or a zero-argument callable, got {cond!r}"
        )
    try:
        value = cond()
    except Exception as e:
        raise DefinitionError(f"condition of {where!r} raised {type(e).__name__}: {e}") from e
    if type(value) is not bool and not is_awaitable(value):
        value = bool(value)
    return value


def _await_truth(call: _Call, value: Any, where: str) -> Walk[bool]:
    """Await an async condition (async API; the sync one refuses it)."""
    try:
        out = yield from call.wait(value, f"the condition of {where!r}")
    except SyncCallRefused:
        raise
    except Exception as e:
        raise DefinitionError(f"condition of {where!r} raised {type(e).__name__}: {e}") from e
    return bool(out)


def _await_id(call: _Call, value: Any, go: str) -> Walk[Any]:
    """Await an async Go id (async API; the sync one refuses it)."""
    try:
        return (yield from call.wait(value, f"the id of Go {go!r}"))
    except SyncCallRefused:
        raise
    except Exception as e:
        raise DefinitionError(f"the id of Go {go!r} raised {type(e).__name__}: {e}") from e


def _commit(state: State, spawned: list[Thread], call: _Call, loops: int) -> None:
    """Make a walk's effects visible: spawned threads and counted loop iterations."""
    if spawned:
        state.threads.extend(spawned)
    call.units += loops


def _release_condition(call: _Call) -> Walk[bool]:
    """Release the earliest thread whose WaitFor condition holds or whose Parallel joined.

    Returns False if none can be released. A DAG's thread is released by its
    last node's end (:func:`_dag_node_ended`), not here.
    """
    for t in call.state.threads:
        if t.status is not _WAITING_CONDITION:
            continue
        _, st = _locate(call, t)  # the kind of statement is structure: any build will do
        kind = st._kind
        if kind == K_DAG:
            continue
        if kind == K_PARALLEL:
            tid = t.id
            if any(o.parent == tid for o in call.state.threads):
                continue
            t.status = _RESUMING
            call.units += 1
            aw = call.save(_AFTER_CONDITION)
            if aw is not None:
                yield aw
            return True
        if call.dirty:  # the condition must be read from a build of current data
            call.rebuild()
            _, st = _locate(call, t)
        assert isinstance(st, WaitFor)
        cond = st.cond
        if type(cond) is not bool:
            cond = _truth(cond, st.name)
            if type(cond) is not bool:
                cond = yield from _await_truth(call, cond, st.name)
        if not cond:
            continue
        call.units += 1
        if call.units > call.max_units:
            raise ResumeLimitError(call.max_units, t.id, st.name)
        if st.handler is not None:
            if call.pending:
                call.pending = False
                aw = call.save(_AFTER_STEP)
                if aw is not None:
                    yield aw
            call.dirty = True
            handler = st.handler
            try:
                if call.wrap_steps:
                    out = _run_step(call, call.wf, t, st.name, handler)
                else:
                    out = handler() if call.sync else call.call_fn(handler)
                if out is not None and is_awaitable(out):
                    yield from call.wait(out, f"the handler of WaitFor {st.name!r}")
            except SyncCallRefused:
                raise
            except Exception as e:
                yield from _step_failed(call, t, st.name, None, e)
                return True  # a DAG node failed for good: recorded, its thread ended
        t.status = _RESUMING
        t.attempts = 0
        t.error = ""
        aw = call.save(_AFTER_CONDITION)
        if aw is not None:
            yield aw
        return True
    return False


def _ending_waits(state: State, t: Thread) -> bool:
    """Whether ``t``'s end leaves events to drop (the main thread's: any thread's)."""
    if t.id == MAIN_THREAD:
        for o in state.threads:  # noqa: SIM110 - a loop: no generator on the hot path
            if o.wait_events:
                return True
        return False
    return bool(t.wait_events)


def _drop_ending_waits(call: _Call, t: Thread) -> Walk[None]:
    """Tear down what ``t``'s end cancels (before :func:`_end_thread`)."""
    for other in call.state.threads if t.id == MAIN_THREAD else (t,):
        if other.wait_events:
            yield from _drop_waits(call, other)


def _end_thread(call: _Call, t: Thread) -> None:
    """Thread ``t`` ended (its events dropped): the main thread's end finishes the workflow."""
    state = call.state
    if t.id == MAIN_THREAD:
        for other in state.threads:  # the main thread's end cancels the others
            other.wait_events = []
        state.threads = []
        state.status = _FINISHED
        return
    t.wait_events = []
    state.threads.remove(t)
    if t.parent:
        found = _dag_of_node(call, t)
        if found is not None:
            _dag_node_ended(call, found[0], found[1], t, NodeStatus.COMPLETED)


def _step_failed(
    call: _Call, t: Thread, name: str, policy: Any, e: Exception, isolated: bool = False
) -> Walk[None]:
    """Record the failure of step (or WaitFor handler) ``name`` on ``t`` and raise StepFailed.

    Returns only for a DAG node whose failure :func:`_node_failed` took care of.
    ``isolated``: the step ran on a copy, so the live data never saw it.
    """
    t.attempts += 1
    t.error = f"{type(e).__name__}: {e}"
    err = StepFailed(name, t.id, t.attempts, t.error)
    if policy is not None and not policy.exhausted(t.attempts):
        err.retry_at = clock.now() + policy.delay(t.attempts)
    if t.parent and (yield from _node_failed(call, t, policy, err, e, isolated)):
        return
    raise err from e


def _policy(call: _Call, st: Step) -> Retry | None:
    """A step's retry policy: its own, else its innermost DAG's or Parallel's, else the
    workflow's ``default_retry``."""
    policy = st.retry
    if policy is not None:
        return policy
    paths = call.index.paths
    return _inherited(call.root, paths.get(st.name) if paths else None, type(call.wf))


def _inherited(root: Section, path: Path | None, cls: type[Workflow]) -> Retry | None:
    """The ``retry=`` of the innermost DAG or Parallel around ``path``, or the class default."""
    found: Retry | None = None
    if path:
        body: Sequence[Stmt] = root.stmts
        try:
            for k in range(0, len(path) - 1, 2):
                holder = body[path[k]]
                if type(holder) in (DAG, Parallel) and holder.retry is not None:  # type: ignore[attr-defined]
                    found = holder.retry  # type: ignore[attr-defined]
                body = holder.children()[path[k + 1]]
        except (IndexError, TypeError, AttributeError):
            found = None
    return found if found is not None else cls.default_retry


def retry_policy(wf: Workflow, step: str) -> Retry | None:
    """The retry policy of step ``step`` in ``wf``'s current definition (see :func:`_policy`)."""
    owner = type(wf).__qualname__
    root = _build(wf, owner)
    path = index_definition(root, owner).get(step)
    st = stmt_at(root, path) if path is not None else None
    policy = getattr(st, "retry", None)
    if policy is not None:
        return policy  # type: ignore[no-any-return]
    return _inherited(root, path, type(wf))


def _run_step(
    call: _Call,
    wf: Workflow,
    t: Thread,
    name: str,
    fn: Callable[[], Any],
    ctx: StepContext | None = None,
    timeout: float | None = None,
) -> Any:
    """Run a step's function on ``wf`` inside the class hooks and the middleware chain.

    ``ctx``: the step's own context, when it takes one (hooks and middleware see
    the same). ``timeout`` (the step's ``timeout=``, shown to them as
    ``ctx.timeout``) is checked right around the function, so hooks and
    middleware see a late step fail. Returns its result, or (async API) an
    awaitable of it.
    """
    if ctx is None:
        ctx = StepContext(call.state.workflow, call.state.id, t.id, name, t.attempts + 1, wf)
    ctx.timeout = timeout
    log = call.step_log
    if log is not None and timeout is None and call.sync and not call.watched:
        # Only the step log watches (the Engine's history): no hooks to walk around it.
        return _logged(log, ctx, lambda: _plain_result(fn(), f"Step {name!r}"))

    def inner() -> Any:
        return call.run(_hooked_step(call, wf, ctx, name, fn, timeout))

    step = inner if call.step_log is None else functools.partial(_logged, call.step_log, ctx, inner)
    if not call.step_mw:
        return step()
    return call.chain(call.step_mw, ctx, step)


def _log_steps(call: _Call, step_log: StepLog | None) -> None:
    """Have ``step_log`` told of every step attempt of ``call`` (see :data:`StepLog`)."""
    if step_log is not None:
        call.step_log = step_log
        call.wrap_steps = True


def _logged(log: StepLog, ctx: StepContext, inner: Callable[[], Any]) -> Any:
    """Run a step (inside its hooks) and tell ``log`` how it went and how long it took."""
    t0 = time.perf_counter()
    try:
        out = inner()
    except Exception as e:
        log(ctx, time.perf_counter() - t0, e)
        raise
    if out is not None and is_awaitable(out):  # the async API: logged once awaited
        return _alogged(log, ctx, t0, out)
    log(ctx, time.perf_counter() - t0, None)
    return out


async def _alogged(log: StepLog, ctx: StepContext, t0: float, out: Awaitable[Any]) -> Any:
    try:
        done = await out
    except Exception as e:
        log(ctx, time.perf_counter() - t0, e)
        raise
    log(ctx, time.perf_counter() - t0, None)
    return done


def _hooked_step(
    call: _Call,
    wf: Workflow,
    ctx: StepContext,
    name: str,
    fn: Callable[[], Any],
    timeout: float | None = None,
) -> Walk[Any]:
    """A step inside ``on_step_start`` / ``on_step_end`` / ``on_step_error``."""
    hooks = call.index.hooks
    try:
        if "on_step_start" in hooks:
            out = _hook(wf, "on_step_start")(ctx)
            if out is not None and is_awaitable(out):
                yield from call.wait(out, "the hook on_step_start")
        began = time.monotonic()
        out = fn() if call.sync else call.call_fn(fn)
        if out is not None and is_awaitable(out):
            if timeout is not None:
                out = _limited(out, name, timeout)
            out = yield from call.wait(out, f"Step {name!r}")
        elif timeout is not None:
            _check_late(name, timeout, began)
        if "on_step_end" in hooks:
            end = _hook(wf, "on_step_end")(ctx)
            if end is not None and is_awaitable(end):
                yield from call.wait(end, "the hook on_step_end")
    except SyncCallRefused:
        raise
    except Exception as e:
        if "on_step_error" in hooks:
            err = _hook(wf, "on_step_error")(ctx, e)
            if err is not None and is_awaitable(err):
                yield from call.wait(err, "the hook on_step_error")
        raise
    return out


def _hook(wf: Workflow, name: str) -> Callable[..., Any]:
    """A lifecycle hook of ``wf``; what it returns is checked (it may be async)."""
    return getattr(wf, name)  # type: ignore[no-any-return]


def _plain_result(out: Any, what: str) -> Any:
    """``out``, unless a plain callable returned an awaitable (refused by the sync API)."""
    if out is not None and is_awaitable(out):
        raise refuse_awaitable(out, what)
    return out


# --------------------------------------------------------------------------- Parallel and DAG


def _reattach(call: _Call) -> list[tuple[Thread, str]]:
    """Rename Parallel branch threads whose branch was relabelled by a deploy.

    An unnamed section branch is labelled by its statements' names, so a
    rename inside it renames its Go. A thread keeps its id; its name becomes
    the Go of the parent's Parallel that now holds its cursor or, for a thread
    that has not started, the one branch that no sibling holds. Anything else
    is left to the cursor checks. Returns ``(thread, old name)`` to undo with.
    """
    moved: list[tuple[Thread, str]] = []
    threads = call.state.threads
    for t in threads:
        if not t.parent or _is_go(call, t.name):
            continue
        parent = call.state.thread(t.parent)
        found = call.find(parent.cur_step) if parent is not None else None
        if found is None or type(found[1]) is not Parallel:
            continue
        names = [g.name for g in found[1].branches]
        if t.cur_step:
            path = call.index.paths.get(t.cur_step)  # type: ignore[union-attr]
            at = _navigate(call.root, path, t.cur_step) if path is not None else None
            new = at[3] if at is not None and at[3] in names else None
        else:
            held = {o.name for o in threads if o.parent == t.parent}
            free = [n for n in names if n not in held]
            orphans = [o for o in threads if o.parent == t.parent and o.name not in names]
            new = free[0] if len(free) == 1 and orphans == [t] else None
        if new is not None:
            moved.append((t, t.name))
            t.name = new
    return moved


class Placement(NamedTuple):
    """Where :func:`locate_threads` found a thread (``stmt``), or why not (``problem``)."""

    thread: Thread
    stmt: Stmt | None
    """The statement its cursor names; its Go if it has not started; None for a new main."""
    problem: str
    """Empty when the thread can be placed."""
    known: bool
    """Whether the definition still has a statement of the cursor's name (anywhere)."""


def locate_threads(wf: Workflow, state: State) -> list[Placement]:
    """Where ``resume`` would find each thread of ``state`` in ``wf``'s current definition.

    For the pre-deploy check (:mod:`gorch.check`): nothing runs and ``state``
    is left as it was. ``DefinitionError`` propagates.
    """
    call = _Call(wf, state, None, DEFAULT_MAX_UNITS, check=False)
    moved = _reattach(call)
    out: list[Placement] = []
    try:
        for t in state.threads:
            name = t.cur_step or ("" if _is_main(t) else t.name)
            found = call.find(name) if name else None
            try:
                if t.cur_step:
                    out.append(Placement(t, _locate(call, t)[1], "", True))
                elif name and (found is None or type(found[1]) is not Go):
                    gone = f"the Go {name!r} that started the thread is gone"
                    out.append(Placement(t, None, gone, found is not None))
                else:
                    out.append(Placement(t, found[1] if found is not None else None, "", True))
            except CursorNotFound as e:
                out.append(Placement(t, None, str(e), found is not None))
    finally:
        for t, old in moved:
            t.name = old
    return out


def _is_go(call: _Call, name: str) -> bool:
    found = call.find(name)
    return found is not None and type(found[1]) is Go


def _child_id(t: Thread, name: str) -> str:
    """Id of a Parallel branch's or DAG node's thread: unique per joining thread."""
    return name if t.id == MAIN_THREAD else f"{t.id}/{name}"


def _joining(call: _Call, t: Thread) -> tuple[Thread, Stmt] | None:
    """The thread ``t`` was started by, while it waits to join, and the statement it waits on
    in the current build."""
    parent = call.state.thread(t.parent) if t.parent else None
    if parent is None or parent.status is not _WAITING_CONDITION:
        return None
    st = call.where(parent.id, parent.cur_step)
    return None if st is None else (parent, st)


def _dag_of_node(call: _Call, t: Thread) -> tuple[Thread, DAG] | None:
    """The joining thread and its DAG, when ``t`` runs a node of a DAG (not a Parallel branch)."""
    found = _joining(call, t)
    if found is None or not isinstance(found[1], DAG):
        return None
    return found[0], found[1]


def _dag_start(call: _Call, t: Thread, dag: DAG, candidates: Sequence[str]) -> None:
    """Start, in definition order, every candidate whose dependencies all completed.

    With no node left to start or running, the DAG is over: see :func:`_dag_over`.
    """
    graph = graph_of(dag)
    nodes = t.nodes
    stopped = dag.fail_fast and bool(t.node_errors)  # every failed node has its error there
    if not stopped:
        prefix = f"{dag.name}."
        for name in candidates:
            if name in nodes:
                continue
            deps = graph.deps[name]
            if all(nodes.get(d) is NodeStatus.COMPLETED for d in deps):
                go = prefix + name
                call.state.threads.append(Thread(id=_child_id(t, go), name=go, parent=t.id))
    if len(nodes) == len(graph.order):
        _dag_over(t)
    elif stopped:
        tid = t.id
        if not any(o.parent == tid for o in call.state.threads):
            for name in graph.order:  # nothing runs: what did not start never will
                nodes.setdefault(name, NodeStatus.SKIPPED)
            _dag_over(t)


def _dag_over(t: Thread) -> None:
    """Every node ended: release the thread (to fail the DAG there, if a node failed)."""
    t.status = _RESUMING
    if NodeStatus.FAILED not in t.nodes.values():
        t.nodes = {}
        t.node_errors = {}


def _dag_node_ended(call: _Call, parent: Thread, dag: DAG, t: Thread, status: NodeStatus) -> None:
    """Record how node thread ``t`` ended and start the nodes that were waiting for it."""
    node = t.name[len(dag.name) + 1 :]
    graph = graph_of(dag)
    parent.nodes[node] = status
    if status is NodeStatus.FAILED:
        parent.node_errors[node] = t.error
        for d in graph.descendants(node):
            parent.nodes.setdefault(d, NodeStatus.SKIPPED)
        _dag_start(call, parent, dag, ())
    else:
        _dag_start(call, parent, dag, graph.dependents[node])


def _node_failed(
    call: _Call, t: Thread, policy: Any, err: StepFailed, cause: Exception, isolated: bool
) -> Walk[bool]:
    """A step of thread ``t`` failed: True when ``t`` is a DAG node and that is handled here.

    A node whose step has a :class:`gorch.Retry` with attempts left stays on
    the step, and the ``StepFailed`` is deferred to the end of the resume so
    that independent nodes run first. Otherwise the node failed for good: it
    is recorded, its dependents are skipped and its thread ends.
    """
    found = _dag_of_node(call, t)
    branch = _branch_of(call, t) if found is None else None
    if found is None and branch is None:
        return False
    if call.restore is not None and not isolated:
        out = call.restore()
        if out is not None and is_awaitable(out):
            yield from call.wait(out, "the restore callback")
    if policy is not None and not policy.exhausted(t.attempts):
        err.__cause__ = cause
        call.deferred = [*call.deferred, err]
        return True
    if t.wait_events:
        yield from _drop_waits(call, t)
    call.state.threads.remove(t)
    if branch is not None:  # recorded on the joining thread; the siblings go on
        parent, par = branch
        label = t.name[len(par.name) + 1 :]
        parent.nodes[label] = NodeStatus.FAILED
        parent.node_errors[label] = err.error
        return True
    assert found is not None
    parent, dag = found
    _dag_node_ended(call, parent, dag, t, NodeStatus.FAILED)
    if dag.fail_fast and (call.flights or call.parked):
        call.halted.add(parent.id)
    return True


def _branch_of(call: _Call, t: Thread) -> tuple[Thread, Parallel] | None:
    """The joining thread and its Parallel, when ``t`` runs a branch of a Parallel."""
    found = _joining(call, t)
    if found is None or type(found[1]) is not Parallel:
        return None
    return found[0], found[1]


def _dag_ended_with_failures(call: _Call, t: Thread) -> bool:
    """``t`` is released from a DAG whose nodes failed: raise ``DAGFailed``, or retry.

    The first time, the failure is recorded on the thread and raised. On the
    next resume (the failure was reported), the failed and skipped nodes are
    forgotten and started again; completed nodes are never re-run.
    """
    _, st = _locate(call, t)
    if type(st) is Parallel:
        return _parallel_ended_with_failures(call, t, st)
    if not isinstance(st, DAG):
        return False
    nodes = t.nodes
    if not t.error:
        failed = {n: t.node_errors.get(n, "") for n, s in nodes.items() if s is NodeStatus.FAILED}
        skipped = [n for n in graph_of(st).order if nodes.get(n) is NodeStatus.SKIPPED]
        t.attempts += 1
        err = DAGFailed(st.name, t.id, t.attempts, failed, skipped)
        t.error = err.error
        raise err
    t.nodes = {n: s for n, s in nodes.items() if s is NodeStatus.COMPLETED}
    t.node_errors = {}
    t.error = ""
    t.attempts = 0
    t.status = _WAITING_CONDITION
    _dag_start(call, t, st, graph_of(st).order)
    return True


def _parallel_ended_with_failures(call: _Call, t: Thread, st: Parallel) -> bool:
    """:func:`_dag_ended_with_failures` for a Parallel: raise, or run the failed branches again."""
    if not t.error:
        t.attempts += 1
        err = ParallelFailed(st.name, t.id, t.attempts, dict(t.node_errors))
        t.error = err.error
        raise err
    failed = {n for n, s in t.nodes.items() if s is NodeStatus.FAILED}
    t.nodes = {}
    t.node_errors = {}
    t.error = ""
    t.attempts = 0
    t.status = _WAITING_CONDITION
    prefix = len(st.name) + 1
    for go in st.branches:
        if go.name[prefix:] in failed:
            call.state.threads.append(Thread(id=_child_id(t, go.name), name=go.name, parent=t.id))
    return True


# --------------------------------------------------------------------------- setup / teardown


def _case_handler(call: _Call, we: WaitEvent) -> tuple[bool, Handler | None]:
    """(found, handler) for a wait event, from the current build."""
    # The Select where the walk blocked, or where the thread was located, in this build.
    st = call.where(we.req.thread_id, we.select)
    if type(st) is not Select:
        return False, None
    hit = st.case(we.req.name)
    if hit is None:
        return False, None
    case = hit[1]
    if isinstance(case, On):  # (isinstance is cheap when true: the common case first)
        h = case.handler
        return True, h if isinstance(h, Handler) else None  # callables have no setup/teardown
    return True, TimerHandler.of(case)


#: Per handler type: (overrides ``setup``, overrides ``teardown``, is a Handler).
_HANDLER_HOOKS: dict[type, tuple[bool, bool, bool]] = {}


def _handler_hooks(handler: object) -> tuple[bool, bool, bool]:
    """Which of :class:`Handler`'s no-op hooks the type of ``handler`` overrides.

    Looked up once per type: setup and teardown bookkeeping asks for every
    awaited event. (A plain callable is no Handler: it overrides nothing.)
    """
    cls = type(handler)
    hooks = _HANDLER_HOOKS.get(cls)
    if hooks is None:
        is_handler = issubclass(cls, Handler)
        hooks = _HANDLER_HOOKS[cls] = (
            is_handler and getattr(cls, "setup") is not Handler.setup,  # noqa: B009
            is_handler and getattr(cls, "teardown") is not Handler.teardown,  # noqa: B009
            is_handler,
        )
    return hooks


def _overrides(handler: object, method: str) -> bool:
    """Whether ``handler`` is a :class:`Handler` whose ``method`` (setup / teardown) acts."""
    return _handler_hooks(handler)[0 if method == "setup" else 1]


def _is_timer(case: On | Timeout) -> bool:
    """Whether a Select's case is a Timeout (a type test: ``isinstance`` costs more when false)."""
    return issubclass(type(case), Timeout)


def _needs_setup(case: On | Timeout) -> bool:
    """Whether the case's handler has a setup to run (decided on a fresh build)."""
    return _is_timer(case) or _handler_hooks(case.handler)[0]  # type: ignore[union-attr]


def _teardown(call: _Call, we: WaitEvent) -> Walk[bool]:
    """Tear ``we`` down; True when done (or nothing to do), False when teardown raised."""
    if call.dirty:  # handler objects come from current data
        call.rebuild()
    found, handler = _case_handler(call, we)
    if not found:
        log.warning(
            "gorch: cannot tear down event %r of workflow %r: Select %r or its case is gone",
            we.req.name,
            call.state.id,
            we.select,
        )
        return True
    if not _overrides(handler, "teardown"):
        return True
    assert handler is not None
    call.dirty = True  # a handler may change the workflow's data
    try:
        if call.event_mw:
            out = _event_call(
                call, we.req, "teardown", lambda: handler.teardown(we.req, we.handled)
            )
        else:
            out = _teardown_of(handler)(we.req, we.handled)
        if out is not None and is_awaitable(out):
            yield from call.wait(out, f"the teardown of event {we.req.name!r}")
    except SyncCallRefused:
        raise
    except Exception as e:
        we.status = _TEARDOWN_ERROR
        we.error = f"{type(e).__name__}: {e}"
        return False
    return True


def _teardown_of(handler: Handler) -> Callable[[EventRequest, bool], Any]:
    return handler.teardown  # typed to return None, yet an override may be async


def _teardown_finished_waits(call: _Call) -> Walk[None]:
    """Step 2 of resume: tear down events of waits that ``handle_event`` ended."""
    for t in call.state.threads:
        if not t.wait_events:
            continue
        for we in [we for we in t.wait_events if we.status in TEARDOWN_EVENT]:
            if (yield from _teardown(call, we)):
                t.wait_events.remove(we)  # before the checkpoint: the save must show it done
            else:
                log.warning(
                    "gorch: teardown of event %r (workflow %r, thread %r) failed: %s; "
                    "retrying on a later resume",
                    we.req.name,
                    call.state.id,
                    t.id,
                    we.error,
                )
            aw = call.save(_AFTER_TEARDOWN)
            if aw is not None:
                yield aw


def _drop_waits(call: _Call, t: Thread) -> Walk[None]:
    """A thread ends or is cancelled: tear down what was set up; failures are logged."""
    for we in t.wait_events:
        if we.status is _SETUP or we.status in TEARDOWN_EVENT:
            if we.status is _SETUP:
                we.handled = False
            if not (yield from _teardown(call, we)):
                log.warning(
                    "gorch: teardown of event %r (workflow %r, thread %r) failed as the "
                    "thread ended; dropped: %s",
                    we.req.name,
                    call.state.id,
                    t.id,
                    we.error,
                )
    t.wait_events = []


def _setup_new_waits(call: _Call) -> Walk[list[tuple[str, str, str]]]:
    """Step 4 of resume: ``setup`` every newly awaited event (and retry failed ones)."""
    failures: list[tuple[str, str, str]] = []
    for t in call.state.threads:
        for we in t.wait_events:
            status = we.status
            if status is not _PENDING_SETUP and status is not _SETUP_ERROR:
                continue
            if call.dirty:  # handlers and timer durations come from current data
                call.rebuild()
            try:
                found, handler = _case_handler(call, we)
            except DefinitionError as e:
                we.status = _SETUP_ERROR
                we.error = str(e)
                failures.append((t.id, we.req.name, we.error))
                continue
            if not found:
                raise CursorNotFound(t.id, we.select, f"its event {we.req.name!r} is gone")
            if not _overrides(handler, "setup"):
                we.status = _SETUP
                continue
            assert handler is not None
            call.dirty = True  # a handler may change the workflow's data
            try:
                if call.event_mw:
                    data = _event_call(
                        call, we.req, "setup", functools.partial(handler.setup, we.req)
                    )
                else:
                    data = handler.setup(we.req)
                if data is not None and is_awaitable(data):
                    data = yield from call.wait(data, f"the setup of event {we.req.name!r}")
                if data is not None and not isinstance(data, str):
                    raise TypeError(f"setup must return a str or None, got {data!r}")
                we.req.setup_data = data
            except SyncCallRefused:
                raise
            except Exception as e:
                we.status = _SETUP_ERROR
                we.error = f"{type(e).__name__}: {e}"
                failures.append((t.id, we.req.name, we.error))
            else:
                we.status = _SETUP
                we.error = ""
            aw = call.save(_AFTER_SETUP)
            if aw is not None:
                yield aw
    return failures


def _event_call(call: _Call, req: EventRequest, phase: str, fn: Callable[[], Any]) -> Any:
    """Run a handler's setup / teardown / handle inside the middleware chain."""
    state = call.state
    ctx = EventContext(
        state.workflow, state.id, req.thread_id, req.name, req.pc, phase, call.wf, state=state
    )
    return call.chain(call.event_mw, ctx, fn)


# --------------------------------------------------------------------------- events


def awaited_events(state: State) -> list[tuple[str, str, int]]:
    """``(thread_id, event, pc)`` of every event the workflow awaits now."""
    return [
        (t.id, we.req.name, we.req.pc)
        for t in state.threads
        if t.status is _WAITING_EVENT
        for we in t.wait_events
        if we.status in ACTIVE_EVENT
    ]


def _wait_pc(t: Thread) -> int | None:
    if t.status is not _WAITING_EVENT:
        return None
    for we in t.wait_events:
        if we.status in ACTIVE_EVENT:
            return we.req.pc
    return None


def _event_of(t: Thread, name: str) -> WaitEvent | None:
    for we in t.wait_events:
        if we.req.name == name and we.status in ACTIVE_EVENT:
            return we
    return None


def _find_wait(
    state: State, name: str, thread_id: str | None, pc: int | None
) -> tuple[Thread, WaitEvent]:
    """The thread and wait event ``name`` is delivered to; raises without touching state."""
    if thread_id is not None:
        th = state.thread(thread_id)
        cur = _wait_pc(th) if th is not None else None
        if pc is not None and cur != pc:
            raise StaleEvent(name, pc, [] if cur is None else [cur])
        found = _event_of(th, name) if th is not None and cur is not None else None
        if th is None or found is None:
            raise EventNotFound(name, awaited_events(state), thread_id)
        return th, found
    if pc is not None:
        for t in state.threads:
            if _wait_pc(t) == pc:
                found = _event_of(t, name)
                if found is None:
                    raise EventNotFound(name, awaited_events(state))
                return t, found
        current = [p for p in map(_wait_pc, state.threads) if p is not None]
        raise StaleEvent(name, pc, current)
    hit: tuple[Thread, WaitEvent] | None = None
    for t in state.threads:
        if t.status is _WAITING_EVENT:
            we = _event_of(t, name)
            if we is not None:
                if hit is not None:
                    ids = [o.id for o in state.threads if _event_of(o, name) is not None]
                    raise AmbiguousEvent(name, ids)
                hit = t, we
    if hit is None:
        raise EventNotFound(name, awaited_events(state))
    return hit


def handle_event(
    wf: Workflow,
    state: State,
    name: str,
    input: Any = None,
    *,
    thread_id: str | None = None,
    pc: int | None = None,
    middleware: Sequence[object] = (),
    now: datetime | None = None,
) -> Any:
    """Deliver event ``name`` to the thread awaiting it; return the handler's output.

    The next ``resume`` runs the case's body. Every error leaves ``state``
    unchanged; a handler that raised may have changed ``wf`` (do not save).
    ``middleware`` wraps the handler call (``around_event``, phase ``"handle"``).

    A ``Timeout`` case is accepted only once it is due at ``now`` (default:
    the current time, :func:`gorch.clock.now`), as a scheduler fires it with
    :func:`gorch.due_events`; before then :class:`TimerNotSendable` is raised,
    so no caller can skip a wait.
    """
    call, (t, we, st, case, handler) = _prepare_event(
        wf, state, name, thread_id, pc, middleware, True, now
    )
    try:
        if call.event_mw or "on_event" in call.index.hooks:  # (_invoke, inlined)
            out = _handle(call, we.req, handler, input)
        else:
            out = call_handler(handler, name, we.req, input)
        if out is not None and is_awaitable(out):
            raise refuse_awaitable(out, f"the handler of event {name!r}")
    except Exception as e:
        raise _handler_failed(e, name, t)  # noqa: B904  (the cause is set there)
    _delivered(state, t, we, st, case, name)
    return out


async def ahandle_event(
    wf: Workflow,
    state: State,
    name: str,
    input: Any = None,
    *,
    thread_id: str | None = None,
    pc: int | None = None,
    middleware: Sequence[object] = (),
    now: datetime | None = None,
) -> Any:
    """:func:`handle_event` for async workflows: the handler, ``on_event`` and
    middleware may be ``async def``. Same errors, and the state is unchanged
    by every one of them (a cancelled handler too)."""
    call, (t, we, st, case, handler) = _prepare_event(
        wf, state, name, thread_id, pc, middleware, False, now
    )
    try:
        out = _invoke(call, we, handler, name, input)
        if out is not None and is_awaitable(out):
            out = await out
    except Exception as e:
        raise _handler_failed(e, name, t)  # noqa: B904  (the cause is set there)
    _delivered(state, t, we, st, case, name)
    return out


_Delivery = tuple[Thread, WaitEvent, Select, "On | Timeout", Any]


def _prepare_event(
    wf: Workflow,
    state: State,
    name: str,
    thread_id: str | None,
    pc: int | None,
    middleware: Sequence[object],
    sync: bool,
    now: datetime | None,
) -> tuple[_Call, _Delivery]:
    """Find the wait ``name`` goes to and its handler; raise (state untouched) if none."""
    if state.status is _FINISHED:
        raise WorkflowFinishedError(state.id)
    t, we = _find_wait(state, name, thread_id, pc)
    call = _Call(wf, state, None, DEFAULT_MAX_UNITS, middleware, sync=sync)
    found = call.find(t.cur_step)
    if found is None or not isinstance(found[1], Select):
        raise CursorNotFound(t.id, t.cur_step, "the thread's Select is gone")
    st = found[1]
    hit = st.case(name)
    if hit is None:
        raise CursorNotFound(t.id, t.cur_step, f"the Select no longer awaits event {name!r}")
    case = hit[1]
    if not isinstance(case, On):  # a Timeout (isinstance is cheap when true)
        due = due_time(we.req)
        if due is None or due > (clock.now() if now is None else _utc(now)):
            raise TimerNotSendable(state.id, name, due)
        return call, (t, we, st, case, TimerHandler.of(case))
    return call, (t, we, st, case, case.handler)


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def _invoke(call: _Call, we: WaitEvent, handler: Any, name: str, input: Any) -> Any:
    """Validate the input and call the handler: its output, or an awaitable of it."""
    if call.event_mw or "on_event" in call.index.hooks:
        return _handle(call, we.req, handler, input)
    return call_handler(handler, name, we.req, input)


def _handler_failed(e: Exception, name: str, t: Thread) -> Exception:
    """What a handler's exception becomes: ``HandlerFailed`` (gorch's own errors stay)."""
    if isinstance(e, HandlerCallError):
        e = e.error
    elif isinstance(e, GorchError):
        return e
    # else raised by a middleware, on_event or an awaited handler: the handler's failure
    failed = HandlerFailed(name, t.id, f"{type(e).__name__}: {e}")
    failed.__cause__ = e
    return failed


def _delivered(
    state: State, t: Thread, we: WaitEvent, st: Select, case: On | Timeout, name: str
) -> None:
    """Commit a delivery whose handler returned."""
    # Nothing before this changed the state. Events that were set up and have
    # a teardown wait for the next resume; the others are dropped now.
    kept: list[WaitEvent] = []
    for other in t.wait_events:
        if other.status in ACTIVE_EVENT:
            if other.status is _SETUP:
                hit = (0, case) if other is we else st.case(other.req.name)
                handler = getattr(hit[1], "handler", None) if hit is not None else None
                if _handler_hooks(handler)[1]:
                    other.handled = other is we
                    other.status = _PENDING_TEARDOWN
                    kept.append(other)
        else:
            kept.append(other)
    t.wait_events = kept
    t.status = _RESUMING
    t.case = name
    t.pc += 1
    state.status = _WF_RESUMING


def _handle(call: _Call, req: EventRequest, handler: Any, input: Any) -> Any:
    """``call_handler`` inside ``on_event`` and the middleware chain (value or awaitable)."""
    state = call.state
    ctx = EventContext(
        state.workflow,
        state.id,
        req.thread_id,
        req.name,
        req.pc,
        "handle",
        call.wf,
        input,
        state=state,
    )

    def inner() -> Any:
        return call.run(_handled(call, ctx, req, handler))

    return call.chain(call.event_mw, ctx, inner) if call.event_mw else inner()


def _handled(call: _Call, ctx: EventContext, req: EventRequest, handler: Any) -> Walk[Any]:
    out = call_handler(handler, req.name, req, ctx.input)
    if out is not None and is_awaitable(out):
        out = yield from call.wait(out, f"the handler of event {req.name!r}")
    if "on_event" in call.index.hooks:
        done = _hook(call.wf, "on_event")(ctx, out)
        if done is not None and is_awaitable(done):
            yield from call.wait(done, "the hook on_event")
    return out


# --------------------------------------------------------------------------- tooling


def find_statement(wf: Workflow, name: str) -> Stmt | None:
    """The statement named ``name`` in a fresh build of ``wf``'s definition, or None."""
    call = _Call(wf, State(id="", workflow=""), None, DEFAULT_MAX_UNITS, check=False)
    found = call.find(name)
    return None if found is None else found[1]


def cancel(wf: Workflow, state: State) -> None:
    """End every thread now: tear down set-up events (``handled=False``), finish the state.

    A teardown that fails is logged on the ``gorch`` logger and dropped, as
    when the main thread ends. An async teardown is refused before anything
    runs: use :func:`acancel`.
    """
    call = _cancel_call(wf, state, True)
    asyncs = [
        f"the teardown of event {we.req.name!r} ({type(h).__qualname__}.teardown)"
        for t in state.threads
        for we in t.wait_events
        for h in [_case_handler(call, we)[1]]
        if h is not None and "teardown" in async_handler_methods(h)
    ]
    if asyncs:
        raise DefinitionError(f"{call.index.owner}: {', '.join(asyncs)} is async; {ASYNC_API_HINT}")
    _exhaust(_cancel(call))


async def acancel(wf: Workflow, state: State) -> None:
    """:func:`cancel` for the async API: teardowns may be ``async def``."""
    await _adrive(_cancel(_cancel_call(wf, state, False)))


def _cancel_call(wf: Workflow, state: State, sync: bool) -> _Call:
    if state.status is _FINISHED:
        raise WorkflowFinishedError(state.id)
    return _Call(wf, state, None, DEFAULT_MAX_UNITS, sync=sync, check=False)


def _cancel(call: _Call) -> Walk[None]:
    state = call.state
    for t in state.threads:
        if t.wait_events:
            yield from _drop_waits(call, t)
    state.threads = []
    state.status = _FINISHED
