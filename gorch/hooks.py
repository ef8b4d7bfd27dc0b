"""Middleware: code that wraps every step, handler call and resume.

A middleware is any object with some of the methods of :class:`Middleware`
(subclass it to inherit pass-through defaults). Each ``around_*`` method gets
a context and ``call_next``, a zero-argument callable running the rest of the
chain; it returns what ``call_next()`` returned, or raises. So one method can
time, log, enrich the context, veto (raise without calling ``call_next``) or
retry (call it again). Middleware run in registration order, outermost first:
``Engine(middleware=...)`` around ``resume(..., middleware=...)``.

An exception raised by a middleware around a step is the step's own failure
(``StepFailed``, the error recorded on the thread); around a handler it is
the handler's (``HandlerFailed``, the state unchanged).

Under the async API (``gorch.aresume`` / ``gorch.ahandle_event``) a method
may be ``async def``: its ``call_next()`` then returns an awaitable. A
plain method gets from ``call_next()`` whatever the rest of the chain gives:
the result when everything inside is plain, else an awaitable that it must
return as it is. A middleware that wants to time or log async calls too
defines ``around_step_async`` (``around_resume_async``, ``around_event_async``)
next to its plain method: the async API uses it instead (see
:class:`LoggingMiddleware`). The sync API refuses ``async def`` methods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from gorch.errors import StepResultError
from gorch.handlers import is_async, is_awaitable

if TYPE_CHECKING:
    from gorch.state import State
    from gorch.workflow import Workflow

CallNext = Callable[[], Any]

#: Why a resume runs (set by the Engine; plain ``resume`` calls say ``"resume"``).
ResumeReason = Literal["start", "event", "timer", "retry", "resume"]


@dataclass(slots=True)
class ResumeContext:
    """One ``resume`` call of one workflow instance."""

    workflow: str
    workflow_id: str
    reason: str
    wf: Workflow
    state: State
    extra: dict[str, Any] = field(default_factory=dict)
    """Free for middleware: anything a middleware wants to pass along."""


@dataclass(slots=True)
class StepContext:
    """One attempt of one step (or of a WaitFor's handler)."""

    workflow: str
    workflow_id: str
    thread_id: str
    step: str
    attempt: int
    """1 for the first run of the step, 2 for its first retry, ..."""
    wf: Workflow
    extra: dict[str, Any] = field(default_factory=dict)
    results: Mapping[str, Any] = field(default_factory=dict)
    """The results this step may read (copies), by step name: what each step that
    ran before it returned last (None is not kept); see :mod:`gorch.results`.
    Empty for hooks and middleware of a step that takes no parameter."""
    hidden: frozenset[str] = frozenset()
    """Results kept but not visible here (nodes of an isolated DAG that are not
    ancestors of this one)."""
    timeout: float | None = None
    """The step's own ``Step(timeout=)``, in seconds (None: it has none), so a
    middleware that gives steps a default limit can leave those to the core."""

    def result(self, step: str) -> Any:
        """What ``step`` returned (its JSON form, as kept in the state).

        Raises :class:`gorch.StepResultError` when ``step`` has no result yet
        (it has not run, or returned None) or, in an isolated DAG, is not an
        ancestor of this node.
        """
        try:
            return self.results[step]
        except KeyError:
            raise StepResultError(self.step, _missing(step, self.results, self.hidden)) from None


def _missing(step: str, results: Mapping[str, Any], hidden: frozenset[str]) -> str:
    if step in hidden:
        return (
            f"the result of {step!r} is not visible here: in an isolated DAG a node reads "
            "only the results of its ancestors and of steps outside the DAG"
        )
    have = ", ".join(map(repr, sorted(results))) or "none"
    return (
        f"no result of step {step!r} (it has not run, returned None, or returned what "
        f"cannot be kept: see the log); results here: {have}"
    )


@dataclass(slots=True)
class EventContext:
    """One handler call: ``phase`` is ``"handle"``, ``"setup"`` or ``"teardown"``."""

    workflow: str
    workflow_id: str
    thread_id: str
    event: str
    pc: int
    phase: str
    wf: Workflow
    input: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    state: State | None = None
    """The state the event belongs to (tooling may keep small strings in ``state.meta``)."""


class Middleware:
    """Pass-through base class: override the methods you need."""

    def around_resume(self, ctx: ResumeContext, call_next: CallNext) -> Any:
        return call_next()

    def around_step(self, ctx: StepContext, call_next: CallNext) -> Any:
        return call_next()

    def around_event(self, ctx: EventContext, call_next: CallNext) -> Any:
        return call_next()

    def on_failed(self, ctx: ResumeContext, error: Exception) -> Any:
        """After a resume failed for good (see ``Workflow.on_failed``); what it raises is
        logged. Under the async API it may be ``async def`` (or ``on_failed_async``)."""
        return None


def wrappers(
    middleware: Sequence[object], method: str, asynchronous: bool = False
) -> list[Callable[[Any, CallNext], Any]]:
    """The bound ``method`` of each middleware that has its own, for one call.

    Pass-through methods cost nothing, and so does a middleware whose
    ``enabled`` attribute is False for this call (telemetry with no SDK set up).
    For the async API (``asynchronous``), ``<method>_async`` is preferred.
    """
    base = getattr(Middleware, method)
    if asynchronous:
        return [
            getattr(m, f"{method}_async", None) or getattr(m, method)
            for m in middleware
            if (
                hasattr(m, f"{method}_async")
                or getattr(type(m), method, base) is not base
                or (not isinstance(m, Middleware) and hasattr(m, method))
            )
            and getattr(m, "enabled", True) is not False
        ]
    return [
        getattr(m, method)
        for m in middleware
        if (
            getattr(type(m), method, base) is not base
            or (not isinstance(m, Middleware) and hasattr(m, method))
        )
        and getattr(m, "enabled", True) is not False
    ]


def chain(
    wrapped: Sequence[Callable[[Any, CallNext], Any]],
    ctx: Any,
    inner: CallNext,
    asynchronous: bool = False,
) -> Any:
    """Run ``inner`` inside every wrapper (the first one outermost).

    With ``asynchronous``, ``inner`` and plain wrappers may return awaitables,
    and an ``async def`` wrapper always gets an awaitable from ``call_next()``;
    the result is a value or an awaitable.
    """
    if not wrapped:
        return inner()
    n = len(wrapped)

    def at(i: int) -> Any:
        if i == n:
            return inner()
        w = wrapped[i]
        if asynchronous and is_async(w):
            return w(ctx, lambda: awaitable(at(i + 1)))
        return w(ctx, lambda: at(i + 1))

    return at(0)


def awaitable(value: Any) -> Awaitable[Any]:
    """``value`` itself when it is awaitable, else an awaitable giving ``value``."""
    return value if is_awaitable(value) else _ready(value)


async def _ready(value: Any) -> Any:
    return value


class LoggingMiddleware(Middleware):
    """Log every step, handler call and resume on a stdlib logger.

    The context goes into ``extra`` (``gorch_workflow``, ``gorch_workflow_id``,
    ``gorch_thread``, ``gorch_step`` / ``gorch_event``, ``gorch_attempt``,
    ``gorch_duration``), so JSON formatters and structlog pick it up as fields.
    Successes log at ``level`` (INFO), failures at WARNING with the error.
    """

    def __init__(self, logger: logging.Logger | str = "gorch", level: int = logging.INFO) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level

    def around_resume(self, ctx: ResumeContext, call_next: CallNext) -> Any:
        return self._timed(*self._resume_what(ctx), call_next)

    def around_step(self, ctx: StepContext, call_next: CallNext) -> Any:
        return self._timed(*self._step_what(ctx), call_next)

    def around_event(self, ctx: EventContext, call_next: CallNext) -> Any:
        return self._timed(*self._event_what(ctx), call_next)

    async def around_resume_async(self, ctx: ResumeContext, call_next: CallNext) -> Any:
        return await self._atimed(*self._resume_what(ctx), call_next)

    async def around_step_async(self, ctx: StepContext, call_next: CallNext) -> Any:
        return await self._atimed(*self._step_what(ctx), call_next)

    async def around_event_async(self, ctx: EventContext, call_next: CallNext) -> Any:
        return await self._atimed(*self._event_what(ctx), call_next)

    @staticmethod
    def _resume_what(ctx: ResumeContext) -> tuple[str, dict[str, Any]]:
        extra = {
            "gorch_workflow": ctx.workflow,
            "gorch_workflow_id": ctx.workflow_id,
            "gorch_reason": ctx.reason,
        }
        return f"resume of {ctx.workflow} {ctx.workflow_id!r}", extra

    @staticmethod
    def _step_what(ctx: StepContext) -> tuple[str, dict[str, Any]]:
        extra = {
            "gorch_workflow": ctx.workflow,
            "gorch_workflow_id": ctx.workflow_id,
            "gorch_thread": ctx.thread_id,
            "gorch_step": ctx.step,
            "gorch_attempt": ctx.attempt,
        }
        what = f"step {ctx.step!r} of {ctx.workflow} {ctx.workflow_id!r} (attempt {ctx.attempt})"
        return what, extra

    @staticmethod
    def _event_what(ctx: EventContext) -> tuple[str, dict[str, Any]]:
        extra = {
            "gorch_workflow": ctx.workflow,
            "gorch_workflow_id": ctx.workflow_id,
            "gorch_thread": ctx.thread_id,
            "gorch_event": ctx.event,
            "gorch_phase": ctx.phase,
        }
        return f"{ctx.phase} of event {ctx.event!r} of {ctx.workflow} {ctx.workflow_id!r}", extra

    async def _atimed(self, what: str, extra: dict[str, Any], call_next: CallNext) -> Any:
        if not self.logger.isEnabledFor(min(self.level, logging.WARNING)):
            return await call_next()
        t0 = time.perf_counter()
        try:
            out = await call_next()
        except Exception as e:
            self._failed(what, extra, t0, e)
            raise
        self._ok(what, extra, t0)
        return out

    def _failed(self, what: str, extra: dict[str, Any], t0: float, e: Exception) -> None:
        extra["gorch_duration"] = time.perf_counter() - t0
        extra["gorch_error"] = f"{type(e).__name__}: {e}"
        self.logger.warning("%s failed: %s", what, extra["gorch_error"], extra=extra)

    def _ok(self, what: str, extra: dict[str, Any], t0: float) -> None:
        extra["gorch_duration"] = duration = time.perf_counter() - t0
        self.logger.log(self.level, "%s ok in %.6fs", what, duration, extra=extra)

    def _timed(self, what: str, extra: dict[str, Any], call_next: CallNext) -> Any:
        if not self.logger.isEnabledFor(min(self.level, logging.WARNING)):
            return call_next()
        t0 = time.perf_counter()
        try:
            out = call_next()
        except Exception as e:
            self._failed(what, extra, t0, e)
            raise
        self._ok(what, extra, t0)
        return out
