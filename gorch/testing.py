"""Test kit: run workflows in-process on a virtual clock (no server, no sleeping).

```python
env = WorkflowEnv(workflows={"expense": Expense})
env.start("expense", "e1", {"amount": 120})
env.advance(days=3)                      # fires every timer due, in due-time order
assert env.waiting_on("e1") == []
assert [e.name for e in env.history("e1")] == ["notify manager", "expired", "escalate", "finish"]
```

Instances are kept as the bytes :func:`gorch.dumps` writes, as a real store
keeps them: every call loads the blob, acts, dumps it back and checks that the
data loads back equal (:class:`RoundTripError` names the field that does not),
so a test catches data that would not survive storage. Every interpreter call
runs inside ``use_clock(env.clock)``, so Timeouts and ``gorch.clock.now()``
see the virtual time.

Async workflows (``async def`` steps, handlers, hooks, middleware) run through
the awaitable twins of the methods that run code: :meth:`WorkflowEnv.astart`,
:meth:`~WorkflowEnv.asend`, :meth:`~WorkflowEnv.aresume`,
:meth:`~WorkflowEnv.aadvance` and :meth:`~WorkflowEnv.aadvance_to`, on the same
virtual clock. The sync methods refuse them with ``DefinitionError`` before
anything runs, and no call of the kit lets a coroutine go un-awaited: a step or
handler that calls an async function without ``await`` makes the call raise
:class:`UnawaitedCoroutineError`, so such a test cannot pass.

Registered as a pytest plugin, this module provides the ``gorch_env`` fixture.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar, overload

import pydantic

from gorch.check import CheckReport, check_blob, format_report, report
from gorch.clock import use_clock
from gorch.codec import dumps, loads
from gorch.engine import initial_data
from gorch.errors import (
    DAGFailed,
    DefinitionError,
    GorchError,
    SerializationError,
    StepFailed,
    UnknownWorkflow,
    WorkflowExists,
    WorkflowNotFound,
)
from gorch.handlers import ASYNC_API_HINT
from gorch.hooks import CallNext, StepContext
from gorch.interpreter import (
    DEFAULT_CONCURRENCY,
    ahandle_event,
    arun,
    awaited_events,
    check_concurrency,
    handle_event,
)
from gorch.interpreter import run as run_state
from gorch.snapshot import ACTIVE_STATUSES
from gorch.state import CheckpointKind, EventRequest, State, WorkflowStatus, new_state
from gorch.stores.base import Store
from gorch.timers import due_events, next_wakeup
from gorch.workflow import Workflow

__all__ = [
    "DEFAULT_START",
    "Entry",
    "EntryKind",
    "Instance",
    "RoundTripError",
    "TimerLimitError",
    "UnawaitedCoroutineError",
    "WorkflowEnv",
    "check_samples",
    "gorch_env",
    "save_samples",
]

#: Where a :class:`WorkflowEnv`'s clock starts unless told otherwise: fixed, so runs repeat.
DEFAULT_START = datetime(2030, 1, 1, tzinfo=UTC)

EntryKind = Literal["step", "event", "timer", "finish"]

W = TypeVar("W", bound=Workflow)


class RoundTripError(SerializationError):
    """Workflow data that would not come back equal from storage (``dumps`` then ``loads``).

    ``field`` is the path of the first difference (``"meta['when']"``), ``before``
    the value in memory and ``after`` the value loaded back. The blob is kept as
    a store would keep it, so ``env.get(id)`` shows what the next call would see.
    """

    def __init__(
        self, workflow_id: str, where: str, field: str, before: Any, after: Any, hint: str = ""
    ) -> None:
        self.workflow_id = workflow_id
        self.field = field
        self.before = before
        self.after = after
        types = ""
        if type(before) is not type(after):
            types = f" (a {type(before).__name__} became a {type(after).__name__})"
        super().__init__(
            f"workflow {workflow_id!r} {where}: field {field!r} does not survive storage: "
            f"{before!r} in memory, {after!r} after dumps/loads{types}{hint}"
        )


class TimerLimitError(GorchError):
    """One ``advance`` fired more timers than ``max_timers``: a timer loop that never ends."""

    def __init__(self, max_timers: int, when: datetime) -> None:
        self.max_timers = max_timers
        super().__init__(
            f"advance fired more than {max_timers} timers and still has timers due at "
            f"{when.isoformat()}: a loop of zero-length timers? (raise WorkflowEnv.max_timers "
            "if this is intended)"
        )


class UnawaitedCoroutineError(GorchError):
    """A step, handler or hook made a coroutine and never awaited it (a call without ``await``).

    What that coroutine was meant to do never happened, though the workflow
    moved on: the kit raises this from the call that ran it, so the test fails.
    """

    def __init__(self, call: str, messages: Sequence[str]) -> None:
        self.messages = list(messages)
        super().__init__(
            f"{call}: {'; '.join(self.messages)}: a step, handler or hook called an async "
            "function without awaiting it; make the caller `async def`, `await` the call, "
            "and run the workflow with `await env.astart(...)` / `env.asend(...)` / ..."
        )


_KIT_HINT = (
    "in the test kit, run it with `await env.astart(...)`, `await env.asend(...)`, "
    "`await env.aresume(...)` and `await env.aadvance(...)`"
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One thing that happened to an instance, as :meth:`WorkflowEnv.history` lists it.

    ``kind`` is ``"step"`` (a step attempt, or a WaitFor's handler; ``error``
    set when it raised), ``"event"`` (delivered by :meth:`WorkflowEnv.send`),
    ``"timer"`` (fired by :meth:`WorkflowEnv.advance`) or ``"finish"`` (the
    workflow ended; ``name`` is ``"finish"``). ``at`` is the virtual time.
    """

    kind: EntryKind
    name: str
    workflow_id: str
    thread_id: str
    at: datetime
    attempt: int = 0
    """For steps: 1 for the first run, 2 for the first retry, ..."""
    input: Any = None
    """For events: the input as sent."""
    output: Any = None
    """What the step function or handler returned."""
    error: str = ""
    """For failed steps: ``"ExceptionType: message"``."""


@dataclass(frozen=True, slots=True)
class Instance:
    """An instance as stored now: ``data`` and ``state`` are fresh copies loaded from its blob.

    Changing them changes nothing in the env.
    """

    id: str
    workflow: str
    status: WorkflowStatus
    data: Workflow
    state: State
    waiting_on: list[str]
    next_wakeup: datetime | None


@dataclass(slots=True)
class _Stored:
    name: str
    cls: type[Workflow]
    blob: bytes
    wake: datetime | None = None
    retry: datetime | None = None  # a failed step's retry_at (StepFailed), until it runs


class _Recorder:
    """Middleware (outermost) that logs every step attempt into the env's history."""

    def __init__(self, env: WorkflowEnv) -> None:
        self.env = env

    def around_step(self, ctx: StepContext, call_next: CallNext) -> Any:
        env = self.env
        try:
            out = call_next()
        except Exception as e:
            env._log(
                "step", ctx.step, ctx.workflow_id, ctx.thread_id, ctx.attempt, error=_describe(e)
            )
            raise
        env._log("step", ctx.step, ctx.workflow_id, ctx.thread_id, ctx.attempt, output=out)
        return out

    async def around_step_async(self, ctx: StepContext, call_next: CallNext) -> Any:
        """:meth:`around_step` under the async API (steps of concurrent branches are
        logged as they finish)."""
        env = self.env
        try:
            out = await call_next()
        except Exception as e:
            env._log(
                "step", ctx.step, ctx.workflow_id, ctx.thread_id, ctx.attempt, error=_describe(e)
            )
            raise
        env._log("step", ctx.step, ctx.workflow_id, ctx.thread_id, ctx.attempt, output=out)
        return out


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _as_delta(v: timedelta | float | None) -> timedelta:
    if v is None:
        return timedelta(0)
    if isinstance(v, timedelta):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"advance() takes a timedelta or seconds, got {v!r}")
    return timedelta(seconds=v)


class WorkflowEnv:
    """In-process workflows on a virtual clock, for tests.

    ``workflows`` maps names to classes (as for :class:`gorch.Engine`);
    ``start`` is where the clock begins (default :data:`DEFAULT_START`);
    ``middleware`` wraps every resume, step and handler call as in the Engine.
    ``check_round_trip=False`` turns off the storage check (not the storage).
    ``concurrency`` and ``executor`` are those of :class:`gorch.AsyncEngine`,
    for the async methods (``astart``, ``asend``, ``aresume``, ``aadvance``).
    Errors propagate to the test: a failed step raises ``StepFailed`` and the
    instance keeps the failure, as the Engine keeps it; :meth:`resume` retries.
    """

    def __init__(
        self,
        workflows: Mapping[str, type[Workflow]] | None = None,
        *,
        start: datetime | None = None,
        middleware: Sequence[object] = (),
        check_round_trip: bool = True,
        max_timers: int = 10_000,
        concurrency: int = DEFAULT_CONCURRENCY,
        executor: Executor | None = None,
    ) -> None:
        self.workflows: dict[str, type[Workflow]] = {}
        for name, cls in (workflows or {}).items():
            self.register(name, cls)
        self._now = DEFAULT_START if start is None else _utc(start)
        self.middleware: tuple[object, ...] = (_Recorder(self), *middleware)
        self.check_round_trip = check_round_trip
        #: The most timers one :meth:`advance` fires before raising :class:`TimerLimitError`.
        self.max_timers = max_timers
        check_concurrency(concurrency)
        #: The async methods' limit on steps of independent branches running at once.
        self.concurrency = concurrency
        #: Where the async methods run plain steps (None: called directly).
        self.executor = executor
        self._instances: dict[str, _Stored] = {}
        self._history: list[Entry] = []
        self._counter = 0

    # ------------------------------------------------------------------ clock

    @property
    def now(self) -> datetime:
        """The virtual time (aware UTC). It only moves in :meth:`advance` / :meth:`advance_to`."""
        return self._now

    @property
    def clock(self) -> Callable[[], datetime]:
        """The virtual clock, for ``with gorch.clock.use_clock(env.clock):`` in your own code."""
        return self._read_clock

    def _read_clock(self) -> datetime:
        return self._now

    # ------------------------------------------------------------------ instances

    def register(self, name: str, cls: type[Workflow]) -> None:
        """Make ``cls`` startable as ``name`` (the name saved in its state)."""
        if not (isinstance(cls, type) and issubclass(cls, Workflow)):
            raise TypeError(f"workflow {name!r} must be a gorch.Workflow subclass, got {cls!r}")
        self.workflows[name] = cls

    def start(
        self,
        name: str,
        id: str | None = None,
        data: Mapping[str, Any] | Workflow | str | bytes | None = None,
    ) -> Instance:
        """Create an instance and run it until it blocks; return it as stored.

        ``id`` defaults to ``"<name>-<n>"`` (deterministic). ``data`` is a mapping,
        JSON, or an instance of the class, validated as the Engine validates it.
        A workflow that is refused before anything ran (an async one: use
        :meth:`astart`) is not kept, as the Engine keeps nothing of a refused start.
        """
        with _watch("env.start()"):
            id, rec, wf, state = self._create(name, id, data)
            with (
                self._starting(id, rec),
                self._resuming(id, rec, wf, state, "in its first resume") as checkpoint,
            ):
                run_state(wf, state, checkpoint, middleware=self.middleware, reason="start")
        return self.get(id)

    async def astart(
        self,
        name: str,
        id: str | None = None,
        data: Mapping[str, Any] | Workflow | str | bytes | None = None,
    ) -> Instance:
        """:meth:`start` for async workflows: ``await env.astart(...)``.

        Async steps, handlers, hooks and middleware are awaited (plain ones work
        too), independent branches run concurrently (``concurrency``,
        ``executor``) with the results of running them one by one, all on the
        virtual clock.
        """
        with _watch("env.astart()"):
            id, rec, wf, state = self._create(name, id, data)
            with (
                self._starting(id, rec),
                self._resuming(id, rec, wf, state, "in its first resume") as checkpoint,
            ):
                await self._arun(wf, state, checkpoint, "start")
        return self.get(id)

    def send(
        self,
        id: str,
        event: str,
        input: Any = None,
        *,
        thread_id: str | None = None,
        pc: int | None = None,
    ) -> Any:
        """Deliver ``event``, save, resume until blocked; return the handler's output.

        Errors of the delivery (``EventNotFound``, ``InvalidEventInput``, ...)
        leave the instance unchanged. An async handler or workflow is refused
        (``DefinitionError``): use :meth:`asend`.
        """
        with _watch("env.send()"):
            rec, wf, state, pcs = self._load(id)
            with use_clock(self.clock), _kit_hint():
                out = handle_event(
                    wf, state, event, input, thread_id=thread_id, pc=pc, middleware=self.middleware
                )
            self._delivered(id, rec, wf, state, pcs, event, input, out)
            where = f"in the resume after event {event!r}"
            with self._resuming(id, rec, wf, state, where) as checkpoint:
                run_state(wf, state, checkpoint, middleware=self.middleware, reason="event")
        return out

    async def asend(
        self,
        id: str,
        event: str,
        input: Any = None,
        *,
        thread_id: str | None = None,
        pc: int | None = None,
    ) -> Any:
        """:meth:`send` for async workflows: the handler and the resume after it are awaited."""
        with _watch("env.asend()"):
            rec, wf, state, pcs = self._load(id)
            with use_clock(self.clock):
                out = await ahandle_event(
                    wf, state, event, input, thread_id=thread_id, pc=pc, middleware=self.middleware
                )
            self._delivered(id, rec, wf, state, pcs, event, input, out)
            where = f"in the resume after event {event!r}"
            with self._resuming(id, rec, wf, state, where) as checkpoint:
                await self._arun(wf, state, checkpoint, "event")
        return out

    def resume(self, id: str) -> Instance:
        """Resume an instance until it blocks (e.g. to retry a step that failed)."""
        with _watch("env.resume()"):
            rec = self._stored(id)
            wf, state = loads(rec.blob, rec.cls)
            with self._resuming(id, rec, wf, state, "in resume()") as checkpoint:
                run_state(wf, state, checkpoint, middleware=self.middleware, reason="resume")
        return self.get(id)

    async def aresume(self, id: str) -> Instance:
        """:meth:`resume` for async workflows."""
        with _watch("env.aresume()"):
            rec = self._stored(id)
            wf, state = loads(rec.blob, rec.cls)
            with self._resuming(id, rec, wf, state, "in aresume()") as checkpoint:
                await self._arun(wf, state, checkpoint, "resume")
        return self.get(id)

    def advance(
        self,
        delta: timedelta | float | None = None,
        *,
        days: float = 0,
        hours: float = 0,
        minutes: float = 0,
        seconds: float = 0,
    ) -> list[Entry]:
        """Move the clock forward, firing every timer that falls due, in due-time order.

        ``advance(timedelta(days=3))``, ``advance(days=3)`` and ``advance(259200)``
        are the same. Returns the timers fired (see :meth:`advance_to`). A negative
        delta raises ``ValueError`` and changes nothing.
        """
        return self.advance_to(self._until(delta, days, hours, minutes, seconds))

    async def aadvance(
        self,
        delta: timedelta | float | None = None,
        *,
        days: float = 0,
        hours: float = 0,
        minutes: float = 0,
        seconds: float = 0,
    ) -> list[Entry]:
        """:meth:`advance` for async workflows: what the timers start is awaited."""
        return await self.aadvance_to(self._until(delta, days, hours, minutes, seconds))

    def advance_to(self, when: datetime) -> list[Entry]:
        """Move the clock to ``when``, firing due timers one at a time, earliest first.

        For each timer: the clock is set to its due time, it is delivered (with
        its ``pc``) and the instance resumed, so a timer set up meanwhile that is
        due by ``when`` fires too, in order. Ties go to the instance started first.
        If a resume raises, the error propagates with the clock at that timer's
        due time and later timers unfired. A step that failed with attempts left
        under its :class:`gorch.Retry` runs again once its backoff has passed, as
        the Engine's ``run_due`` would run it (a failure with no attempt left
        propagates).
        """
        when = self._target(when)
        fired: list[Entry] = []
        with _watch("env.advance()"):
            while (id := self._next_due(when, len(fired))) is not None:
                if self._retry_due(id):
                    try:
                        self.resume(id)
                    except StepFailed as e:
                        if e.retry_at is None:
                            raise  # failed for good: the test sees it
                    continue
                rec, wf, state, req = self._due(id)
                with use_clock(self.clock), _kit_hint():
                    out = handle_event(
                        wf,
                        state,
                        req.name,
                        thread_id=req.thread_id,
                        pc=req.pc,
                        middleware=self.middleware,
                    )
                where = self._fired(id, rec, wf, state, req, out, fired)
                with self._resuming(id, rec, wf, state, where) as checkpoint:
                    run_state(wf, state, checkpoint, middleware=self.middleware, reason="timer")
        self._now = when
        return fired

    async def aadvance_to(self, when: datetime) -> list[Entry]:
        """:meth:`advance_to` for async workflows."""
        when = self._target(when)
        fired: list[Entry] = []
        with _watch("env.aadvance()"):
            while (id := self._next_due(when, len(fired))) is not None:
                if self._retry_due(id):
                    try:
                        await self.aresume(id)
                    except StepFailed as e:
                        if e.retry_at is None:
                            raise  # failed for good: the test sees it
                    continue
                rec, wf, state, req = self._due(id)
                with use_clock(self.clock):
                    out = await ahandle_event(
                        wf,
                        state,
                        req.name,
                        thread_id=req.thread_id,
                        pc=req.pc,
                        middleware=self.middleware,
                    )
                where = self._fired(id, rec, wf, state, req, out, fired)
                with self._resuming(id, rec, wf, state, where) as checkpoint:
                    await self._arun(wf, state, checkpoint, "timer")
        self._now = when
        return fired

    # ------------------------------------------------------------------ what both APIs share

    def _create(
        self, name: str, id: str | None, data: Mapping[str, Any] | Workflow | str | bytes | None
    ) -> tuple[str, _Stored, Workflow, State]:
        """Validate a start and store the new instance (not yet resumed)."""
        try:
            cls = self.workflows[name]
        except KeyError:
            raise UnknownWorkflow(name, list(self.workflows)) from None
        wf = initial_data(name, cls, data)
        if id is None:
            self._counter += 1
            while f"{name}-{self._counter}" in self._instances:
                self._counter += 1
            id = f"{name}-{self._counter}"
        if not isinstance(id, str) or not id:
            raise ValueError(f"a workflow id is a non-empty str, got {id!r}")
        if id in self._instances:
            raise WorkflowExists(id)
        state = new_state(id, name)
        blob = dumps(wf, state)
        rec = self._instances[id] = _Stored(name, cls, blob)
        self._check(id, wf, state, blob, "as started")
        return id, rec, wf, state

    @contextlib.contextmanager
    def _starting(self, id: str, rec: _Stored) -> Iterator[None]:
        """Forget an instance whose first resume was refused before anything ran."""
        blob = rec.blob
        try:
            yield
        except DefinitionError:
            if rec.blob == blob and not self._history_of(id):
                del self._instances[id]
            raise

    def _history_of(self, id: str) -> bool:
        return any(e.workflow_id == id for e in self._history)

    def _load(self, id: str) -> tuple[_Stored, Workflow, State, dict[str, int]]:
        rec = self._stored(id)
        wf, state = loads(rec.blob, rec.cls)
        return rec, wf, state, {t.id: t.pc for t in state.threads}

    def _delivered(
        self,
        id: str,
        rec: _Stored,
        wf: Workflow,
        state: State,
        pcs: dict[str, int],
        event: str,
        input: Any,
        out: Any,
    ) -> None:
        # The thread that took the event is the one whose pc moved.
        tid = next((t.id for t in state.threads if pcs.get(t.id) != t.pc), "")
        self._log("event", event, id, tid, input=input, output=out)
        self._save(id, rec, wf, state, f"after event {event!r}")

    def _until(
        self,
        delta: timedelta | float | None,
        days: float,
        hours: float,
        minutes: float,
        seconds: float,
    ) -> datetime:
        """Where :meth:`advance` moves the clock to (``ValueError`` if back in time)."""
        total = _as_delta(delta) + timedelta(
            days=days, hours=hours, minutes=minutes, seconds=seconds
        )
        if total < timedelta(0):
            raise ValueError(
                f"advance() needs a delta >= 0, got {total!r}: the virtual clock never goes back"
            )
        return self._now + total

    def _target(self, when: datetime) -> datetime:
        when = _utc(when)
        if when < self._now:
            raise ValueError(
                f"advance_to({when.isoformat()}) is before now ({self._now.isoformat()}): "
                "the virtual clock never goes back"
            )
        return when

    def _next_due(self, when: datetime, fired: int) -> str | None:
        """The instance whose timer is due first by ``when`` (clock moved to it), or None."""
        due = [
            (min(t for t in (r.wake, r.retry) if t is not None), i)
            for i, r in self._instances.items()
            if (r.wake is not None and r.wake <= when) or (r.retry is not None and r.retry <= when)
        ]
        if not due:
            return None
        if fired >= self.max_timers:
            raise TimerLimitError(self.max_timers, min(due)[0])
        wake, id = min(due, key=lambda d: d[0])  # min keeps the first of equal times
        self._now = max(self._now, wake)
        return id

    def _retry_due(self, id: str) -> bool:
        """Whether what is due first for ``id`` is a failed step's retry (not a timer)."""
        rec = self._instances[id]
        return (
            rec.retry is not None
            and rec.retry <= self._now
            and (rec.wake is None or rec.retry <= rec.wake)
        )

    def _due(self, id: str) -> tuple[_Stored, Workflow, State, EventRequest]:
        rec = self._instances[id]
        wf, state = loads(rec.blob, rec.cls)
        return rec, wf, state, due_events(state, self._now)[0]

    def _fired(
        self,
        id: str,
        rec: _Stored,
        wf: Workflow,
        state: State,
        req: EventRequest,
        out: Any,
        fired: list[Entry],
    ) -> str:
        """Log and save a fired timer; where its resume runs (for error messages)."""
        fired.append(self._log("timer", req.name, id, req.thread_id, output=out))
        self._save(id, rec, wf, state, f"after timer {req.name!r}")
        return f"in the resume after timer {req.name!r}"

    async def _arun(
        self, wf: Workflow, state: State, checkpoint: Callable[[CheckpointKind], None], reason: str
    ) -> None:
        await arun(
            wf,
            state,
            checkpoint,
            middleware=self.middleware,
            reason=reason,
            concurrency=self.concurrency,
            executor=self.executor,
        )

    # ------------------------------------------------------------------ inspection

    def get(self, id: str) -> Instance:
        """The instance as stored: fresh copies of its data and state, status, awaited events."""
        rec = self._stored(id)
        wf, state = loads(rec.blob, rec.cls)
        return Instance(
            id=id,
            workflow=rec.name,
            status=state.status,
            data=wf,
            state=state,
            waiting_on=[event for _, event, _ in awaited_events(state)],
            next_wakeup=rec.wake,
        )

    @overload
    def data(self, id: str) -> Workflow: ...
    @overload
    def data(self, id: str, cls: type[W]) -> W: ...
    def data(self, id: str, cls: type[W] | None = None) -> Workflow:
        """A fresh copy of the instance's data as stored; pass its class to get it typed."""
        wf = self.get(id).data
        if cls is not None and not isinstance(wf, cls):
            raise TypeError(f"workflow {id!r} is a {type(wf).__name__}, not a {cls.__name__}")
        return wf

    def status(self, id: str) -> WorkflowStatus:
        """``resuming`` (runnable, e.g. after a failed step), ``waiting`` or ``finished``."""
        return self.get(id).status

    def waiting_on(self, id: str, thread_id: str | None = None) -> list[str]:
        """Names of the events (timers included) the instance awaits, one per awaiting thread.

        Ordered by thread, then as the Select lists its cases; ``thread_id``
        keeps one thread's. Empty when nothing is awaited (finished, or runnable).
        """
        rec = self._stored(id)
        state = loads(rec.blob, rec.cls)[1]
        return [ev for tid, ev, _ in awaited_events(state) if thread_id in (None, tid)]

    def next_wakeup(self, id: str | None = None) -> datetime | None:
        """When the instance's (default: any instance's) next timer is due, or None."""
        if id is not None:
            return self._stored(id).wake
        wakes = [r.wake for r in self._instances.values() if r.wake is not None]
        return min(wakes) if wakes else None

    def history(self, id: str | None = None, *, kind: EntryKind | None = None) -> list[Entry]:
        """What happened, in order: step attempts, events, timers and finishes.

        ``id`` keeps one instance's entries (default: all instances, interleaved
        as they happened); ``kind`` keeps one kind.
        """
        if id is not None:
            self._stored(id)
        return [
            e
            for e in self._history
            if (id is None or e.workflow_id == id) and (kind is None or e.kind == kind)
        ]

    # ------------------------------------------------------------------ internals

    def _stored(self, id: str) -> _Stored:
        try:
            return self._instances[id]
        except KeyError:
            raise WorkflowNotFound(id) from None

    def _log(
        self,
        kind: EntryKind,
        name: str,
        workflow_id: str,
        thread_id: str,
        attempt: int = 0,
        *,
        input: Any = None,
        output: Any = None,
        error: str = "",
    ) -> Entry:
        entry = Entry(kind, name, workflow_id, thread_id, self._now, attempt, input, output, error)
        self._history.append(entry)
        return entry

    def _put(self, rec: _Stored, blob: bytes, state: State | None = None) -> None:
        """Store ``blob`` and index its next timer, as a store's wake-up column would."""
        if state is None:
            state = loads(blob, rec.cls)[1]
        rec.blob = blob
        rec.wake = next_wakeup(state) if state.status is not WorkflowStatus.FINISHED else None
        rec.retry = None

    def _save(self, id: str, rec: _Stored, wf: Workflow, state: State, where: str) -> None:
        """Dump, store, then check that what was stored loads back equal."""
        try:
            blob = dumps(wf, state)
        except SerializationError as e:
            raise SerializationError(f"workflow {id!r} {where}: {e}") from e
        self._put(rec, blob, state)
        self._check(id, wf, state, blob, where)

    @contextlib.contextmanager
    def _resuming(
        self, id: str, rec: _Stored, wf: Workflow, state: State, where: str
    ) -> Iterator[Callable[[CheckpointKind], None]]:
        """Around one resume (sync or async): give the checkpoint to save at, as the
        Engine does, and keep what it would keep, whatever the resume ends with."""
        last = rec.blob
        finished = state.status is WorkflowStatus.FINISHED
        mark = len(self._history)

        def checkpoint(kind: CheckpointKind) -> None:
            nonlocal last
            if kind is CheckpointKind.AFTER_SETUP:
                return  # setups precede the final AFTER_RESUME with no step between
            try:
                last = dumps(wf, state)
            except SerializationError as e:
                ran = self._history[mark:]
                step = next((h.name for h in reversed(ran) if h.kind == "step"), "")
                after = f" after step {step!r}" if step else ""
                raise SerializationError(f"workflow {id!r} {where}{after}: {e}") from e

        try:
            with use_clock(self.clock), _kit_hint():
                yield checkpoint
        except StepFailed as e:
            # The failure is recorded on the thread; the data is what the step started
            # from (the last checkpoint), as the Engine saves it. A DAG keeps its nodes' data.
            data = wf if isinstance(e, DAGFailed) else loads(last, rec.cls)[0]
            self._put(rec, dumps(data, state), state)
            rec.retry = e.retry_at  # advance() runs it again then, as the Engine would
            raise
        except BaseException:  # an error, or a cancelled task: what the checkpoints saved
            self._put(rec, last)
            raise
        self._put(rec, last, state)
        if not finished and state.status is WorkflowStatus.FINISHED:
            self._log("finish", "finish", id, "")
        self._check(id, wf, state, last, where)

    def _check(self, id: str, wf: Workflow, state: State, blob: bytes, where: str) -> None:
        if not self.check_round_trip:
            return
        wf2, state2 = loads(blob, type(wf))
        diff = _diff(wf, wf2, "")
        if diff is not None:
            path, before, after = diff
            raise RoundTripError(id, where, path, before, after, _hint(type(wf), path))
        if state2 != state:
            raise RoundTripError(
                id, where, "<state>", state, state2, " (a gorch bug: please report it)"
            )
        if dumps(wf2, state2) != blob:
            raise SerializationError(
                f"workflow {id!r} {where}: the blob is not byte-stable "
                "(dumps(*loads(blob)) differs; a gorch bug: please report it)"
            )


_watching = 0
"""How many kit calls are under way (an async test may run several at once)."""


@contextlib.contextmanager
def _watch(call: str) -> Iterator[None]:
    """Raise :class:`UnawaitedCoroutineError` if a coroutine was dropped un-awaited during
    ``call``; let every other warning through as it came."""
    global _watching
    if _watching:  # warnings are process-wide: the outermost call watches for all
        _watching += 1
        try:
            yield
        finally:
            _watching -= 1
        return
    _watching = 1
    ok = False
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", RuntimeWarning)
            yield
        ok = True
    finally:
        _watching = 0
        unawaited: list[str] = []
        for w in seen:
            if ok and issubclass(w.category, RuntimeWarning) and "never awaited" in str(w.message):
                unawaited.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if unawaited:
        raise UnawaitedCoroutineError(call, unawaited)


@contextlib.contextmanager
def _kit_hint() -> Iterator[None]:
    """Add the kit's async methods to the sync API's refusal of an async workflow."""
    try:
        yield
    except DefinitionError as e:
        if ASYNC_API_HINT in str(e) and _KIT_HINT not in str(e):
            raise DefinitionError(f"{e}; {_KIT_HINT}") from e
        raise


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # an object whose == cannot be answered
        return False


def _diff(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    """The path and values of the first difference between ``a`` and ``b``, or None.

    Models are compared field by field, excluded fields included (a value
    ``Field(exclude=True)`` holds is not written, so it is lost).
    """
    if isinstance(a, pydantic.BaseModel) and type(a) is type(b):
        for name in type(a).model_fields:
            found = _diff(getattr(a, name), getattr(b, name), f"{path}.{name}" if path else name)
            if found is not None:
                return found
        extra_a, extra_b = a.__pydantic_extra__ or {}, b.__pydantic_extra__ or {}
        return _diff(extra_a, extra_b, path) if extra_a or extra_b else None
    if isinstance(a, dict) and type(a) is type(b):
        if a.keys() != b.keys():
            return path, a, b
        for k in a:
            found = _diff(a[k], b[k], f"{path}[{k!r}]")
            if found is not None:
                return found
        return None
    if isinstance(a, (list, tuple)) and type(a) is type(b) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _diff(x, y, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if _same_scalar(a, b) else (path, a, b)


# --------------------------------------------------------------------------- samples

#: The file suffix of a sample blob: ``{folder}/{workflow}/{id}.gorch``.
SAMPLE_SUFFIX = ".gorch"


def save_samples(
    store: Store, folder: str | os.PathLike[str], *, per_workflow: int = 50
) -> list[pathlib.Path]:
    """Copy up to ``per_workflow`` in-flight instances of each workflow from ``store``.

    Samples are kept from production so that :func:`check_samples` can run the
    pre-deploy check in CI, without the production store. Each blob is
    written as ``{folder}/{workflow}/{id}.gorch``, byte for byte as stored.
    ``store`` is a sync store (``engine.store`` of a :class:`gorch.Engine`).
    """
    root = pathlib.Path(folder)
    taken: dict[str, int] = {}
    written: list[pathlib.Path] = []
    for status in sorted(ACTIVE_STATUSES):
        after: str | None = None
        while True:
            page = store.list(status=status.value, limit=100, after=after)
            for rec in page.records:
                if taken.get(rec.workflow, 0) >= per_workflow:
                    continue
                taken[rec.workflow] = taken.get(rec.workflow, 0) + 1
                path = root / rec.workflow / f"{rec.id}{SAMPLE_SUFFIX}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(rec.blob)
                written.append(path)
            if page.next_cursor is None:
                break
            after = page.next_cursor
    return written


def check_samples(
    folder: str | os.PathLike[str], workflows: Mapping[str, type[Workflow]]
) -> CheckReport:
    """Check every sample blob in ``folder`` against the current code (the pre-deploy check).

    Samples are ``{folder}/{workflow}/{id}.gorch`` files (see :func:`save_samples`).
    Raises ``AssertionError`` with one line per problem when any sample would
    be stranded, so a plain ``check_samples(...)`` call is a pytest test; an
    empty or missing folder is an error too, since it checks nothing.
    Returns the report when every sample is fine.
    """
    root = pathlib.Path(folder)
    files = sorted(root.glob(f"*/*{SAMPLE_SUFFIX}"))
    if not files:
        raise AssertionError(
            f"no samples in {str(root)!r}: expected {{workflow}}/{{id}}{SAMPLE_SUFFIX} files "
            "(gorch.testing.save_samples writes them)"
        )
    problems = [
        problem
        for path in files
        for problem in check_blob(
            path.name[: -len(SAMPLE_SUFFIX)], path.parent.name, path.read_bytes(), workflows
        )
    ]
    rep = report(len(files), problems)
    if not rep.ok:
        raise AssertionError(
            f"samples in {str(root)!r} that the current code would strand:\n{format_report(rep)}"
        )
    return rep


def _hint(cls: type[Workflow], path: str) -> str:
    top = path.split(".", 1)[0].split("[", 1)[0]
    field = cls.model_fields.get(top)
    if field is not None and field.exclude:
        return f"; {cls.__name__}.{top} is declared with exclude=True, so it is never written"
    return ""


try:
    import pytest
except ImportError:  # pragma: no cover - the kit works without pytest; the fixture needs it
    pass
else:

    @pytest.fixture
    def gorch_env() -> Iterator[WorkflowEnv]:
        """A :class:`WorkflowEnv` with no workflows: ``gorch_env.register(name, cls)`` first."""
        yield WorkflowEnv()
