"""The execution state of one workflow instance: threads, cursors and awaited events.

These are plain slotted dataclasses rather than pydantic models: the
interpreter touches them on every unit, and ``gorch.codec`` validates them
field by field when a blob is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MAIN_THREAD = "_main_"


class WorkflowStatus(StrEnum):
    RESUMING = "resuming"
    """Some thread can advance: call ``resume``."""
    WAITING = "waiting"
    """Every thread is blocked on an event or a condition."""
    FINISHED = "finished"
    """The main thread ended."""


class ThreadStatus(StrEnum):
    EXECUTING = "executing"
    """On a step that has not completed (also after that step failed)."""
    RESUMING = "resuming"
    """Runnable, e.g. after its event was handled."""
    WAITING_EVENT = "waiting_event"
    """Blocked in a Select."""
    WAITING_CONDITION = "waiting_condition"
    """Blocked in a WaitFor."""


class EventStatus(StrEnum):
    PENDING_SETUP = "pending_setup"
    """Awaited; ``Handler.setup`` has not run yet."""
    SETUP = "setup"
    """Awaited and set up."""
    PENDING_TEARDOWN = "pending_teardown"
    """The wait is over; ``Handler.teardown`` runs on the next resume."""
    SETUP_ERROR = "setup_error"
    """Setup failed; retried on each resume, still deliverable."""
    TEARDOWN_ERROR = "teardown_error"
    """Teardown failed; retried on a later resume."""


class NodeStatus(StrEnum):
    """What became of a DAG node (a node not listed has not ended yet)."""

    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    """Not run: a node it depends on failed (or, with ``fail_fast``, any node did)."""


class CheckpointKind(StrEnum):
    """What just happened when ``resume`` calls its ``checkpoint`` callback."""

    AFTER_STEP = "after_step"
    AFTER_RESUME = "after_resume"
    AFTER_CONDITION = "after_condition"
    AFTER_SETUP = "after_setup"
    AFTER_TEARDOWN = "after_teardown"


#: Events of the wait a thread is blocked in (deliverable).
ACTIVE_EVENT = frozenset({EventStatus.PENDING_SETUP, EventStatus.SETUP, EventStatus.SETUP_ERROR})
#: Events of a finished wait, still to be torn down.
TEARDOWN_EVENT = frozenset({EventStatus.PENDING_TEARDOWN, EventStatus.TEARDOWN_ERROR})


@dataclass(slots=True)
class EventRequest:
    """What a handler is told about the event it sets up, handles or tears down."""

    workflow_id: str
    thread_id: str
    name: str
    pc: int
    setup_data: str | None = None


@dataclass(slots=True)
class WaitEvent:
    """One event a thread awaits (or awaited, until its teardown has run)."""

    req: EventRequest
    status: EventStatus = EventStatus.PENDING_SETUP
    handled: bool = False
    error: str = ""
    select: str = ""
    """Name of the Select this event belongs to (finds its handler for teardown)."""


@dataclass(slots=True)
class Thread:
    """A logical thread: where it is (``cur_step``) and what it waits for."""

    id: str
    name: str
    status: ThreadStatus = ThreadStatus.RESUMING
    cur_step: str = ""
    wait_events: list[WaitEvent] = field(default_factory=list)
    pc: int = 0
    error: str = ""
    attempts: int = 0
    case: str = ""
    """After ``handle_event``: the event whose case body runs next in the Select."""
    parent: str = ""
    """For a branch of a Parallel or a DAG node: the id of the thread that joins it."""
    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    """While this thread runs a DAG: the nodes that ended, by name."""
    node_errors: dict[str, str] = field(default_factory=dict)
    """While this thread runs a DAG: the error of each failed node."""


@dataclass(slots=True)
class State:
    """Everything the interpreter needs besides the workflow's own data."""

    id: str
    workflow: str
    status: WorkflowStatus = WorkflowStatus.RESUMING
    pc: int = 0
    threads: list[Thread] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    """Small strings kept with the state for tooling (e.g. the trace context)."""
    results: dict[str, Any] = field(default_factory=dict)
    """What each step returned last (JSON-mode values; None is not kept), by step name."""

    def thread(self, thread_id: str) -> Thread | None:
        for t in self.threads:
            if t.id == thread_id:
                return t
        return None


def new_state(id: str, workflow: str) -> State:
    """A fresh state: the main thread, runnable from the start of the definition."""
    return State(
        id=id,
        workflow=workflow,
        status=WorkflowStatus.RESUMING,
        threads=[Thread(id=MAIN_THREAD, name=MAIN_THREAD)],
    )
