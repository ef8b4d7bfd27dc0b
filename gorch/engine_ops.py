"""What an Engine operation is made of: the requests it yields, and what both drivers share.

Each operation of :class:`gorch.engine.EngineCore` is a generator that yields
requests (a store call, a resume, an event's handler, a pause, ...) and gets
their results sent back; :class:`gorch.Engine` performs them with blocking
calls, :class:`gorch.AsyncEngine` awaits them. The requests are defined here,
with the small helpers and middleware both drivers use (the create guard of
``start``, the halt of a dry run): nothing here knows which driver runs it.
"""

from __future__ import annotations

import builtins
import inspect
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import uuid4

import pydantic

from gorch import clock
from gorch.errors import (
    GorchError,
    InvalidWorkflowData,
    StepFailed,
    summarize_validation,
)
from gorch.history import HistoryEntry, jsonable
from gorch.history import Written as Written  # re-exported: the Engine's entries
from gorch.hooks import CallNext, EventContext, Middleware, StepContext
from gorch.interpreter import find_statement
from gorch.snapshot import (
    InstanceStatus,
)
from gorch.state import (
    CheckpointKind,
    State,
)
from gorch.statements import Select, Timeout
from gorch.stores.base import Record
from gorch.workflow import Workflow

log = logging.getLogger("gorch")

_CREATED_BY = "gorch.created"
"""``State.meta`` entry of a just-created record: the creating call's nonce (dropped at the
first save)."""
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")
_T = TypeVar("_T")


# --------------------------------------------------------------------------- requests


@dataclass(slots=True)
class StoreCall:
    """Call ``method(*args)`` on the store and send back what it returns."""

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Pause:
    """Sleep ``seconds`` (time.sleep or asyncio.sleep)."""

    seconds: float


@dataclass(slots=True)
class Idle:
    """A worker's wait between polls: ``seconds``, or less if a stop is requested.

    The sync driver sleeps in short slices and checks ``should_stop``; the async
    driver also wakes at once when its stop event is set.
    """

    seconds: float
    should_stop: Callable[[], bool]


@dataclass(slots=True)
class Awaited:
    """An awaitable from user code the operation waits for (async driver only)."""

    awaitable: Awaitable[Any]


@dataclass(slots=True)
class Resume:
    """Run the core on ``cur`` until every thread blocks, calling ``checkpoint`` as it goes.

    ``checkpoint(kind)`` is itself an operation (it saves), run by the same driver.
    """

    cur: _Loaded
    reason: str
    checkpoint: Callable[[CheckpointKind], Op[None]]
    restore: Callable[[], None]
    create: Callable[[], Op[None]] | None = None
    """For a start: creates the record; the driver runs it before anything with effects
    (a step, a handler's setup other than a timer's) and runs nothing if it fails."""
    deadline: datetime | None = None
    """No step starts from then on (the Engine's ``run_deadline``)."""


@dataclass(slots=True)
class HandleEvent:
    """Run the handler of ``event`` on ``wf``/``state``; send back its output."""

    wf: Workflow
    state: State
    event: str
    input: Any
    thread_id: str | None
    pc: int | None
    now: datetime | None = None
    """For a timer: the time it is fired at (``run_due``'s ``now``); None for the clock."""


@dataclass(slots=True)
class Cancel:
    """Tear down ``state``'s awaited events and end its threads."""

    wf: Workflow
    state: State


@dataclass(slots=True)
class ReportFailure:
    """Call the ``on_failed`` hooks (the workflow's, the middleware's) of a failure for
    good, once it is saved (the drivers run resumes with ``report_failures=False``)."""

    wf: Workflow
    state: State
    error: StepFailed


@dataclass(slots=True)
class DryRun:
    """Run new instances' first resumes only as far as they go without effects (see
    :mod:`gorch.bulk`); send back, for each, whether it blocked there (False: it halted
    before an effect, and its ``wf`` / ``state`` are to be thrown away), or the error
    that refused it (a definition that does not build, ...)."""

    runs: list[tuple[Workflow, State]]
    halt: SetupHalt | None


@dataclass(slots=True)
class Dispatch:
    """Tell the Engine's dispatcher that ``ids`` are due now (their save has committed).

    The driver reports nothing back: a message that cannot be sent is logged,
    and ``run_due`` finds the instance due all the same.
    """

    ids: tuple[str, ...]

    def not_sent(self, error: Exception) -> None:
        """Log a message the dispatcher could not send (the save has committed)."""
        log.warning(
            "gorch: could not dispatch %s (%s); run_due resumes it",
            ", ".join(map(repr, self.ids)),
            _one_line(error),
        )


Request = (
    StoreCall
    | Pause
    | Idle
    | Awaited
    | Resume
    | HandleEvent
    | Cancel
    | DryRun
    | ReportFailure
    | Dispatch
)
Op = Generator[Request, Any, _T]
"""An engine operation: yields requests, gets their results sent back, returns ``_T``."""


@dataclass(slots=True)
class _Loaded:
    rec: Record
    wf: Workflow
    state: State
    lease_until: datetime | None = None
    """Set when run_due claimed the record: our claim lasts until then."""
    history: builtins.list[HistoryEntry | Written] = field(default_factory=builtins.list)
    """Entries that go to the store with the next save (then cleared)."""
    callers_transaction: bool = False
    """Written on a connection of the caller's (``start(conn=...)``): a save commits when
    the caller commits, so a dispatcher that sends after the commit is not told."""


def _as_data(value: Any) -> Any:
    """An event's input or output as JSON data, as history entries keep it (JSON text
    given as bytes is decoded; anything JSON cannot hold becomes its ``repr``)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return json.loads(bytes(value))
        except ValueError:
            return bytes(value).decode("utf-8", "replace")
    return jsonable(value)


def _seconds(v: timedelta | float) -> timedelta:
    return v if isinstance(v, timedelta) else timedelta(seconds=v)


def _now() -> datetime:
    return clock.now()


def _backoff(n: int, base: float = 0.05, cap: float = 2.0) -> float:
    """The pause before retry ``n + 1``: capped exponential backoff with full jitter."""
    return random.uniform(0, min(cap, base * 2**n))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def initial_data(
    name: str, cls: type[Workflow], data: Mapping[str, Any] | Workflow | str | bytes | None
) -> Workflow:
    """A new instance of workflow ``name`` from a dict, JSON, or an instance (as is)."""
    if isinstance(data, cls):
        return data
    try:
        if isinstance(data, (bytes, str)):
            return cls.model_validate_json(data)
        return cls.model_validate(dict(data or {}))
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False, include_context=False)
        raise InvalidWorkflowData(name, summarize_validation(errors), errors) from e
    except (TypeError, ValueError) as e:
        raise InvalidWorkflowData(name, str(e)) from e


def _is_timer(wf: Workflow, select: str, event: str) -> bool:
    try:
        st = find_statement(wf, select)
    except GorchError:
        return False
    hit = st.case(event) if isinstance(st, Select) else None
    return hit is not None and isinstance(hit[1], Timeout)


def _new_id() -> str:
    return uuid4().hex


def _nonce() -> str:
    """What makes a created blob unique (8 hex digits: a rival start of the same id in
    the same instant is what it tells apart, and it is stored until the next save).

    From :mod:`random`, not ``os.urandom``: it need not be secret, only differ between
    rival starts, and a system call per start costs more than the rest of the nonce.
    ``random`` is seeded from the system and seeded again in a forked child, so
    worker processes forked from one parent do not repeat each other's nonces.
    """
    return f"{random.getrandbits(32):08x}"


def _bulk_note(e: BaseException, index: int, started: int) -> None:
    """Say which item of ``start_many`` failed and what was written before it."""
    e.add_note(
        f"start_many: item {index} was refused; nothing of its batch was written, and the"
        f" {started} items of the batches before it were started"
    )
    e.item = index  # type: ignore[attr-defined]
    e.started = started  # type: ignore[attr-defined]


class Abort(BaseException):
    """Carries an error out of a resume untouched.

    Raised by a create guard when the record cannot be created: a
    ``BaseException``, so that no step or handler takes it for its own failure
    (those catch ``Exception``); the driver raises ``error`` in its place.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


_TIMER_CASES: dict[tuple[type[Workflow], str, str], bool] = {}
"""Whether a Select's case is a ``Timeout``, by workflow class, Select and event name."""


def effect_ahead(ctx: EventContext) -> bool:
    """Whether a handler call may have effects the record must exist for: a setup, unless
    it is a timer's (which only computes its due time).

    A case is looked up in the definition once per workflow class, Select and
    event (rebuilding the definition for every start would cost more than the
    rest of a bulk start), so a definition that made one case a ``Timeout`` for
    some instances and a custom handler for others would be told apart by its
    first instance only.
    """
    if ctx.phase != "setup" or ctx.state is None:
        return False
    for t in ctx.state.threads:
        if t.id != ctx.thread_id:
            continue
        for we in t.wait_events:
            if we.req.name == ctx.event and we.req.pc == ctx.pc:
                where = (type(ctx.wf), we.select or t.cur_step, ctx.event)
                timer = _TIMER_CASES.get(where)
                if timer is None:
                    timer = _TIMER_CASES[where] = _is_timer(ctx.wf, where[1], ctx.event)
                return not timer
    return True


class CreateGuard(Middleware):
    """The outermost middleware of a start's resume (sync driver): ``create()`` runs once,
    before the first step or effectful setup; if it fails, nothing runs (:class:`Abort`)."""

    def __init__(self, create: Callable[[], None]) -> None:
        self.create = create
        self.done = False
        self.error: Exception | None = None

    def around_step(self, ctx: StepContext, call_next: CallNext) -> Any:
        self._ensure()
        return call_next()

    def around_event(self, ctx: EventContext, call_next: CallNext) -> Any:
        if not self.done and effect_ahead(ctx):
            self._ensure()
        return call_next()

    def _ensure(self) -> None:
        if self.error is not None:
            raise Abort(self.error)
        if self.done:
            return
        try:
            self.create()
        except Exception as e:
            self.error = e
            raise Abort(e) from e
        self.done = True


RETAINED_STATUSES = (InstanceStatus.FINISHED.value, InstanceStatus.CANCELLED.value)
"""What ``Engine.purge`` (and the ``retention`` policy) removes unless told otherwise."""


def _takes_history(store: object) -> bool:
    """Whether ``store.save`` accepts the history and cursors of this version."""
    try:
        params = inspect.signature(store.save).parameters  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return False
    return "history" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class Halted(BaseException):
    """Raised by :class:`SetupHalt` to stop a dry run: a ``BaseException``, so that no
    handler takes it for its own failure."""


class SetupHalt(Middleware):
    """A dry run's only middleware: stops it before a handler setup with effects.

    ``effect_ahead(ctx)`` tells a timer's setup (which only computes its due
    time, and may run) from any other.
    """

    def __init__(self, effect_ahead: Callable[[EventContext], bool]) -> None:
        self.effect_ahead = effect_ahead

    def around_event(self, ctx: EventContext, call_next: CallNext) -> Any:
        if self.effect_ahead(ctx):
            raise Halted
        return call_next()

    async def around_event_async(self, ctx: EventContext, call_next: CallNext) -> Any:
        if self.effect_ahead(ctx):
            raise Halted
        return await call_next()
