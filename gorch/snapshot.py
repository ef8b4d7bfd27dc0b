"""What the Engine tells about instances: snapshots, list pages, run_due results, event types.

Shared by the sync :class:`gorch.Engine`, :class:`gorch.AsyncEngine`, the HTTP
app and the CLI, so every surface describes an instance (and an event's
input and output) alike. Nothing here touches a store.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar, cast

import pydantic

from gorch.errors import GorchError
from gorch.handlers import FunctionHandler, Handler, signature_of
from gorch.interpreter import find_statement
from gorch.state import ACTIVE_EVENT, State, ThreadStatus, WorkflowStatus
from gorch.statements import On, Select, Timeout
from gorch.stores.base import Record
from gorch.timers import due_time
from gorch.workflow import Workflow

log = logging.getLogger("gorch")
_M = TypeVar("_M", bound=pydantic.BaseModel)


class InstanceStatus(StrEnum):
    """The status of a stored instance, as ``list`` filters and ``get`` report it."""

    RESUMING = "resuming"
    """Runnable: a resume is pending (deferred, or interrupted by a crash)."""
    WAITING = "waiting"
    """Every thread waits for an event, a timer or a condition."""
    RETRYING = "retrying"
    """A step failed; ``run_due`` retries it when its backoff is over."""
    FAILED = "failed"
    """A step failed for good; ``Engine.retry(id)`` re-arms it."""
    FINISHED = "finished"
    CANCELLED = "cancelled"


STATUS_OF = {
    # The instance status a state is saved with, when nothing else decides it.
    WorkflowStatus.RESUMING: InstanceStatus.RESUMING,
    WorkflowStatus.WAITING: InstanceStatus.WAITING,
    WorkflowStatus.FINISHED: InstanceStatus.FINISHED,
}
ACTIVE_STATUSES = frozenset(
    {InstanceStatus.RESUMING, InstanceStatus.WAITING, InstanceStatus.RETRYING}
)


class EventInfo(pydantic.BaseModel):
    """An event the instance awaits."""

    name: str
    thread_id: str
    pc: int
    status: str
    due: datetime | None = None
    """For timers: when ``run_due`` fires it."""

    # Where the schema comes from until it is read: kept in ``__pydantic_private__``
    # (``{"source": ...}``, then ``{"schema": ...}``) rather than declared private
    # attributes, which pydantic would initialise at every construction.

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def input_schema(self) -> dict[str, Any] | None:
        """JSON schema of the input the event's handler validates (``{}``: any JSON).

        None when the event takes no input (a timer, a case without handler, a
        zero-argument handler) or its case cannot be found in the current definition.
        Worked out when first read (or serialized), not when the snapshot is made:
        finding the handler rebuilds the definition, and most callers of ``start``
        never look.
        """
        lazy = self.__pydantic_private__
        if lazy is None:
            return None
        source = lazy.pop("source", None)
        if source is not None:
            lazy["schema"] = source.schema(self.name)
        return cast("dict[str, Any] | None", lazy.get("schema"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EventInfo):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> dict[Any, Any]:
        _ = self.input_schema  # resolved now: the source holds the workflow, not picklable
        return super().__getstate__()


class ThreadInfo(pydantic.BaseModel):
    id: str
    name: str
    status: str
    cur_step: str
    error: str = ""
    attempts: int = 0
    parent: str = ""
    """For a Parallel branch or a DAG node: the thread that joins it."""
    nodes: dict[str, str] = {}
    """While the thread runs a DAG: completed / failed / skipped nodes, by name."""
    node_errors: dict[str, str] = {}


class Snapshot(pydantic.BaseModel):
    """What ``Engine.get`` tells about an instance."""

    id: str
    workflow: str
    status: InstanceStatus
    version: int
    data: dict[str, Any]
    threads: list[ThreadInfo]
    awaited: list[EventInfo]
    next_wakeup: datetime | None
    error: str = ""
    """The last step error, if a thread sits on a failed step."""


class Summary(pydantic.BaseModel):
    id: str
    workflow: str
    status: str
    version: int
    wake_at: datetime | None


class ListPage(pydantic.BaseModel):
    items: list[Summary]
    next_cursor: str | None
    """Pass as ``after=`` for the next page; None on the last page."""


class DueResult(pydantic.BaseModel):
    """What ``run_due`` did with one claimed instance."""

    id: str
    action: str
    """``timer`` (fired timers), ``retry`` (a failed step), ``resume`` (pending resume)."""
    fired: list[str] = []
    status: str = ""
    error: str = ""
    outcome: str = "processed"
    """``processed``; ``skipped``: another runner took the instance over (its lease
    ran out while a step was slow); ``failed``: ``error`` says why."""


@dataclass(frozen=True, slots=True)
class EventTypes:
    """What a Select case's handler takes and returns, read from its annotations.

    Shared by snapshots (the awaited events' input schemas) and the HTTP app
    (one documented operation per event), so both describe an event alike.
    """

    takes_input: bool
    input_type: Any
    """The annotation the input is validated against; ``Any`` when unvalidated."""
    output_type: Any
    """The declared output; ``Any`` when not declared."""

    @property
    def typed(self) -> bool:
        """Whether pydantic validates the input (so JSON text may be passed as bytes)."""
        return self.takes_input and self.input_type is not Any


_NO_INPUT = EventTypes(False, None, type(None))


def event_types(case: On | Timeout) -> EventTypes:
    """The input and output types of ``case``'s handler (``DefinitionError`` if unreadable)."""
    if isinstance(case, Timeout):
        return _NO_INPUT
    h = case.handler
    if h is None:
        return _NO_INPUT
    if isinstance(h, Handler) and not isinstance(h, FunctionHandler):
        out = Any if h.output_type is None else h.output_type
        return EventTypes(True, Any if h.input_type is None else h.input_type, out)
    sig = h.sig if isinstance(h, FunctionHandler) else signature_of(h)
    out = Any if sig.output_type is None else sig.output_type
    if not sig.takes_input:
        return EventTypes(False, None, out)
    return EventTypes(True, Any if sig.input is None else sig.input.type, out)


_schemas: dict[Any, bytes | None] = {}


def json_schema_of(tp: Any) -> dict[str, Any] | None:
    """pydantic's JSON schema for ``tp`` (cached per type); None if it has none.

    Cached as JSON text: every caller gets its own copy, which decoding makes
    several times faster than a deep copy.
    """
    try:
        text = _schemas[tp]
    except KeyError:
        schema = _make_schema(tp)
        text = _schemas[tp] = None if schema is None else json.dumps(schema).encode()
    except TypeError:  # unhashable annotation
        return _make_schema(tp)
    return None if text is None else cast("dict[str, Any]", json.loads(text))


def _make_schema(tp: Any) -> dict[str, Any] | None:
    try:
        return pydantic.TypeAdapter(tp).json_schema()
    except Exception:  # not representable as JSON schema, or not a type pydantic knows
        log.debug("gorch: no JSON schema for %r", tp, exc_info=True)
        return None


def _made(cls: type[_M], fields: dict[str, Any]) -> _M:
    """A model of ``cls`` holding ``fields`` as they are, without validation.

    For snapshots only, whose fields are built here from a state already
    checked, with exactly the types validation would give (plain ``str`` for
    the statuses of threads and events, copies of mutable values): pydantic's
    ``model_construct`` costs a fraction of ``model_validate`` on nested data.
    """
    return cls.model_construct(**fields)


def snapshot_of(rec: Record, wf: Workflow, state: State) -> Snapshot:
    """The snapshot of an instance: ``rec`` as stored, ``wf`` and ``state`` as run."""
    threads = []
    awaited = []
    selects: dict[str, Select | None] = {}
    error = ""
    for t in state.threads:
        if t.error and not error:
            error = t.error
        threads.append(
            _made(
                ThreadInfo,
                {
                    "id": t.id,
                    "name": t.name,
                    "status": str(t.status),
                    "cur_step": t.cur_step,
                    "error": t.error,
                    "attempts": t.attempts,
                    "parent": t.parent,
                    "nodes": {k: str(v) for k, v in t.nodes.items()} if t.nodes else {},
                    "node_errors": dict(t.node_errors) if t.node_errors else {},
                },
            )
        )
        if t.status is not ThreadStatus.WAITING_EVENT:
            continue
        for we in t.wait_events:
            if we.status not in ACTIVE_EVENT:
                continue
            info = _made(
                EventInfo,
                {
                    "name": we.req.name,
                    "thread_id": t.id,
                    "pc": we.req.pc,
                    "status": str(we.status),
                    "due": due_time(we.req),
                },
            )
            source = _SchemaSource(wf, we.select or t.cur_step, selects)
            object.__setattr__(info, "__pydantic_private__", {"source": source})
            awaited.append(info)
    status = rec.status
    return _made(
        Snapshot,
        {
            "id": rec.id,
            "workflow": rec.workflow,
            "status": InstanceStatus(status),
            "version": rec.version,
            "data": wf.model_dump(mode="json"),
            "threads": threads,
            "awaited": awaited,
            "next_wakeup": rec.wake_at if status != InstanceStatus.RESUMING else None,
            "error": error,
        },
    )


class _SchemaSource:
    """Where an awaited event's input schema comes from, until it is asked for.

    The events of one snapshot share ``selects``, so each Select is looked up
    in the definition once, whichever of its events is read first.
    """

    __slots__ = ("select", "selects", "wf")

    def __init__(self, wf: Workflow, select: str, selects: dict[str, Select | None]) -> None:
        self.wf = wf
        self.select = select
        self.selects = selects

    def schema(self, event: str) -> dict[str, Any] | None:
        return _input_schema(self.wf, self.select, event, self.selects)


def _input_schema(
    wf: Workflow, select: str, event: str, selects: dict[str, Select | None]
) -> dict[str, Any] | None:
    """The input schema of ``event`` in Select ``select``; a snapshot never fails over it."""
    if select not in selects:
        try:
            st = find_statement(wf, select)
        except Exception:  # a definition that fails now is reported by resume, not get
            log.debug("gorch: cannot find Select %r for its input schema", select, exc_info=True)
            st = None
        selects[select] = st if isinstance(st, Select) else None
    st = selects[select]
    hit = st.case(event) if st is not None else None
    if hit is None:
        return None
    try:
        types = event_types(hit[1])
    except GorchError:
        return None
    return json_schema_of(types.input_type) if types.takes_input else None
