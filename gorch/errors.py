"""Every error gorch raises derives from :class:`GorchError`.

Each error says what was expected and what was found, and carries the same
facts as attributes so callers (an HTTP layer, a CLI) can act on them without
parsing messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any


class GorchError(Exception):
    """Base class of all gorch errors."""


class DefinitionError(GorchError):
    """The statement tree returned by ``definition()`` is invalid."""


class WorkflowFinishedError(GorchError):
    """The workflow has finished; it cannot be resumed or receive events."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"workflow {workflow_id!r} has finished; it accepts no more calls")


class StepFailed(GorchError):
    """A step raised. The thread stays on the step; a later ``resume`` retries it.

    The original exception is the ``__cause__``.
    """

    #: When the step's :class:`gorch.Retry` lets it run again (None: no attempt left,
    #: or no policy). The Engine and the test kit's ``advance`` retry it then; a
    #: plain ``resume`` caller may resume again from that time on.
    retry_at: datetime | None = None

    def __init__(self, step: str, thread_id: str, attempts: int, error: str) -> None:
        self.step = step
        self.thread_id = thread_id
        self.attempts = attempts
        self.error = error
        super().__init__(
            f"step {step!r} failed on thread {thread_id!r} (attempt {attempts}): {error}"
        )


class DAGFailed(StepFailed):
    """A DAG ended with failed nodes: nothing more of it could run.

    ``failed`` maps each failed node to its error, ``skipped`` lists the nodes
    not run because of them (in definition order). The thread stays on the
    DAG with the node statuses in its state; the next ``resume`` (with the
    Engine: ``Engine.retry(id)``) runs the failed and skipped nodes again and
    never re-runs a completed one.
    """

    def __init__(
        self, dag: str, thread_id: str, attempts: int, failed: dict[str, str], skipped: list[str]
    ) -> None:
        self.dag = dag
        self.failed = dict(failed)
        self.skipped = list(skipped)
        errors = "; ".join(f"{n}: {e}" for n, e in failed.items())
        skip = f"; skipped: {', '.join(skipped)}" if skipped else ""
        super().__init__(dag, thread_id, attempts, f"failed nodes: {errors}{skip}")
        self.args = (
            f"DAG {dag!r} on thread {thread_id!r} failed (attempt {attempts}): "
            f"failed nodes: {errors}{skip}",
        )


class ParallelFailed(DAGFailed):
    """Branches of a :class:`gorch.Parallel` (or ``a | b``) failed for good.

    A Parallel is a DAG without edges: a failing branch does not stop its
    siblings, which run to their end; then the join raises this, ``failed``
    mapping each failed branch's label to its error (``skipped`` is empty).
    The next ``resume`` (``Engine.retry(id)``) runs only the failed branches again.
    """

    def __init__(
        self, parallel: str, thread_id: str, attempts: int, failed: dict[str, str]
    ) -> None:
        super().__init__(parallel, thread_id, attempts, failed, [])
        errors = "; ".join(f"{n}: {e}" for n, e in failed.items())
        self.args = (
            f"Parallel {parallel!r} on thread {thread_id!r} failed (attempt {attempts}): "
            f"failed branches: {errors}",
        )


class HandlerFailed(GorchError):
    """An event handler raised. The state is unchanged and the event is still awaited.

    The original exception is the ``__cause__``.
    """

    def __init__(self, event: str, thread_id: str, error: str) -> None:
        self.event = event
        self.thread_id = thread_id
        self.error = error
        super().__init__(f"handler of event {event!r} on thread {thread_id!r} failed: {error}")


class SetupError(GorchError):
    """One or more ``Handler.setup`` calls failed; they are retried on the next resume.

    ``failures`` lists ``(thread_id, event, error)`` for each failed setup.
    """

    def __init__(self, failures: Sequence[tuple[str, str, str]]) -> None:
        self.failures = list(failures)
        detail = "; ".join(f"{ev!r} on thread {tid!r}: {err}" for tid, ev, err in self.failures)
        super().__init__(f"setup failed for {len(self.failures)} event(s): {detail}")


def _describe_awaited(awaited: Sequence[tuple[str, str, int]]) -> str:
    if not awaited:
        return "the workflow awaits no events"
    items = ", ".join(f"{name!r} (thread {tid!r}, pc {pc})" for tid, name, pc in awaited)
    return f"awaited: {items}"


class EventNotFound(GorchError):
    """No thread awaits this event.

    ``awaited`` lists ``(thread_id, event, pc)`` for every event currently awaited.
    """

    def __init__(
        self, event: str, awaited: Sequence[tuple[str, str, int]], thread_id: str | None = None
    ) -> None:
        self.event = event
        self.thread_id = thread_id
        self.awaited = list(awaited)
        where = f" on thread {thread_id!r}" if thread_id is not None else ""
        super().__init__(f"event {event!r} is not awaited{where}; {_describe_awaited(awaited)}")


class AmbiguousEvent(GorchError):
    """Several threads await this event; pass ``thread_id`` (or ``pc``) to choose one."""

    def __init__(self, event: str, thread_ids: Sequence[str]) -> None:
        self.event = event
        self.thread_ids = list(thread_ids)
        super().__init__(
            f"event {event!r} is awaited by threads {self.thread_ids!r}; "
            "pass thread_id= to choose one"
        )


class StaleEvent(GorchError):
    """The event targets a wait that is over (a late timer, a replayed webhook)."""

    def __init__(self, event: str, pc: int, current: Sequence[int]) -> None:
        self.event = event
        self.pc = pc
        self.current = list(current)
        now = f"current wait pc(s): {self.current}" if self.current else "no matching wait now"
        super().__init__(f"event {event!r} with pc {pc} is stale; {now}")


def summarize_validation(errors: Sequence[Any]) -> str:
    """pydantic's error list as one line: ``loc: message; loc: message``."""
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "input"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid"


class InvalidEventInput(GorchError):
    """The input does not validate against the handler's input type.

    ``errors`` holds pydantic's error list; the ``ValidationError`` is the ``__cause__``.
    """

    def __init__(self, event: str, message: str, errors: list[Any] | None = None) -> None:
        self.event = event
        self.errors = errors or []
        super().__init__(f"invalid input for event {event!r}: {message}")


class ResumeLimitError(GorchError):
    """A single ``resume`` ran more units than ``max_units``: a loop that never blocks."""

    def __init__(self, max_units: int, thread_id: str, where: str) -> None:
        self.max_units = max_units
        self.thread_id = thread_id
        self.where = where
        super().__init__(
            f"resume ran more than {max_units} steps and loop iterations without blocking "
            f"(thread {thread_id!r}, near {where!r}); does a loop miss a Select or WaitFor?"
        )


class CursorNotFound(GorchError):
    """A thread sits on a statement name that the current definition no longer has."""

    def __init__(self, thread_id: str, name: str, detail: str = "") -> None:
        self.thread_id = thread_id
        self.name = name
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"thread {thread_id!r} sits on {name!r}, which the current definition "
            f"does not contain{extra}; keep that name while instances wait on it"
        )


class ThreadExists(GorchError):
    """A ``Go`` tried to start a thread whose id is already running."""

    def __init__(self, thread_id: str, go: str) -> None:
        self.thread_id = thread_id
        self.go = go
        super().__init__(
            f"Go {go!r} cannot start thread {thread_id!r}: a thread with that id is running; "
            "give each thread a distinct id="
        )


class ConcurrentChange(GorchError):
    """Two steps that ran at once (``aresume``) changed the same data.

    Each step of a round runs on its own copy of the data, and their changes
    are applied in thread order; two changes to one field would lose an
    update, so the later step fails with this error instead (nothing of it is
    applied, and a retry runs it on the data with the first one's changes).
    Appending to one list from several steps is fine.
    """

    def __init__(self, path: str, step: str, other: str) -> None:
        self.path = path
        self.step = step
        self.other = other
        super().__init__(
            f"step {step} changed {path!r}, which step {other} also changed while both ran at "
            "once; give concurrent branches fields of their own (appending to one list is "
            "fine), or run them one at a time (concurrency=1)"
        )


class TimerNotSendable(GorchError):
    """A ``Timeout`` case fires only when due (``run_due``, a worker, the test kit's clock).

    Sending its name as an event would let a caller skip a wait (an escalation,
    a cart's expiry), so ``Engine.send``, ``gorch send`` and the HTTP app refuse it,
    and ``handle_event`` refuses it until it is due.
    """

    def __init__(self, workflow_id: str, event: str, due: datetime | None = None) -> None:
        self.workflow_id = workflow_id
        self.event = event
        self.due = due
        """When the timer is due, if known (``handle_event`` refuses it before then)."""
        when = "" if due is None else f" (due at {due.isoformat()})"
        super().__init__(
            f"{event!r} is a timer of workflow {workflow_id!r}{when}: it fires when due "
            "(run_due, a worker or the test kit's clock), it cannot be sent as an event"
        )


class InvalidIdempotencyKey(GorchError):
    """An idempotency key must be 1-255 printable ASCII characters."""

    def __init__(self, key: object) -> None:
        self.key = key
        super().__init__(
            f"invalid idempotency key {key!r}: use 1-255 printable ASCII characters "
            "(a UUID is a good choice)"
        )


class IdempotencyKeyReused(GorchError):
    """An idempotency key came back with a different request than the one it first named."""

    def __init__(self, workflow_id: str, key: str, detail: str) -> None:
        self.workflow_id = workflow_id
        self.key = key
        super().__init__(
            f"idempotency key {key!r} of workflow {workflow_id!r} was first used for "
            f"{detail}; use a new key for a different request"
        )


class SerializationError(GorchError):
    """A blob is corrupt, foreign or from an unsupported format version, or data won't load."""


class StoreError(GorchError):
    """Base class of errors raised by a store."""


class Conflict(StoreError):
    """Compare-and-swap failed: the record changed since it was loaded. Reload and retry."""

    def __init__(self, workflow_id: str, expected: int, actual: int | None) -> None:
        self.workflow_id = workflow_id
        self.expected = expected
        self.actual = actual
        now = "it was deleted" if actual is None else f"it is at version {actual}"
        super().__init__(
            f"workflow {workflow_id!r} changed concurrently: expected version {expected}, {now}"
        )


class WorkflowNotFound(StoreError):
    """No workflow instance with this id."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"no workflow with id {workflow_id!r}")


class WorkflowExists(StoreError):
    """A workflow instance with this id already exists."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"a workflow with id {workflow_id!r} already exists")


class StoreUnavailable(StoreError):
    """The store cannot be reached; the message names the URL without its password."""


class UnknownWorkflow(GorchError):
    """The Engine has no workflow class registered under this name."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"no workflow named {name!r} is registered; known: {self.known}")


class InvalidWorkflowData(GorchError):
    """The initial data of a workflow does not validate against its model.

    ``errors`` holds pydantic's error list; the ``ValidationError`` is the ``__cause__``.
    """

    def __init__(self, name: str, message: str, errors: list[Any] | None = None) -> None:
        self.name = name
        self.errors = errors or []
        super().__init__(f"invalid data for workflow {name!r}: {message}")


class WorkflowNotActive(GorchError):
    """The instance was cancelled or has failed: it accepts no events until re-armed."""

    def __init__(self, workflow_id: str, status: str) -> None:
        self.workflow_id = workflow_id
        self.status = status
        hint = "; call Engine.retry(id) to re-arm it" if status == "failed" else ""
        super().__init__(f"workflow {workflow_id!r} is {status}{hint}")


class InvalidWorkflowId(GorchError):
    """A workflow id must be 1-200 characters of letters, digits and ``._:@-``."""

    def __init__(self, workflow_id: object) -> None:
        self.workflow_id = workflow_id
        super().__init__(
            f"invalid workflow id {workflow_id!r}: use 1-200 characters from letters, digits "
            "and . _ : @ - (starting with a letter or digit)"
        )


class PipelineError(DefinitionError):
    """A pipeline (:mod:`gorch.pipeline`) is wired wrongly, or run with an impossible
    option; nothing ran."""


class StepTimeout(GorchError):
    """A step attempt took longer than its ``timeout=``: the attempt failed.

    An async step is cancelled at the timeout; a plain one cannot be
    interrupted safely, so it fails when it returns late, and what it returned
    is dropped. Either way the attempt counts as failed and is retried by the
    step's policy like any failure.
    """

    def __init__(self, step: str, timeout: float, took: float | None = None) -> None:
        self.step = step
        self.timeout = timeout
        self.took = took
        how = f"took {took:.3f} s" if took is not None else "was cancelled"
        super().__init__(f"step {step!r} {how}, over its timeout of {timeout:g} s")


class StepResultError(GorchError):
    """A step's result cannot be kept, or a step asked for a result it cannot have.

    Raised inside the step's run, so it is that step's failure (``StepFailed``,
    its ``__cause__``): the step is retried by its policy like any other error.
    """

    def __init__(self, step: str, message: str) -> None:
        self.step = step
        super().__init__(f"step {step!r}: {message}")
