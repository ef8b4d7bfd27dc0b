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
from typing import TYPE_CHECKING, Any, TypeVar, cast

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


_THREAD_FIELDS = frozenset({"threads", "awaited", "error"})
"""The fields of a snapshot made from a running instance that are worked out when first read."""


class Snapshot(pydantic.BaseModel):
    """What ``Engine.get`` tells about an instance."""

    # (A comment, not the docstring, which is the OpenAPI description.) A snapshot the
    # Engine makes from an instance it holds (start, get, resume...) works out
    # ``threads``, ``awaited`` and ``error`` from the instance's state when one of them
    # is first read, compared, copied or serialized: most callers of ``start`` read the
    # id and the status only. The state is the Engine's private copy, never changed
    # after the snapshot is made, so the result is the one a snapshot made at once
    # would hold. ``data`` is copied at once (the workflow object may be the caller's).

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

    # The state the lazy fields come from is kept in ``__pydantic_private__`` (a
    # ``_Pending``) until then; pydantic's own use of it is for private attributes,
    # which Snapshot has none of.

    # No return annotation: pydantic would take it for the serialized schema, and the
    # JSON schema (so the HTTP app's OpenAPI) must stay that of the fields.
    @pydantic.model_serializer(mode="wrap")
    def _serialize(self, handler: pydantic.SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        self._complete()
        return handler(self)

    def _complete(self) -> None:
        """Work the lazy fields out, if not yet done (fields set meanwhile are kept)."""
        pending = self.__pydantic_private__
        if not isinstance(pending, _Pending):
            return
        filled = {**pending.fields(), **self.__dict__}
        object.__setattr__(self, "__dict__", {k: filled[k] for k in _SNAPSHOT_ORDER})
        object.__setattr__(self, "__pydantic_private__", None)

    if not TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any:
            if name in _THREAD_FIELDS and isinstance(self.__pydantic_private__, _Pending):
                self._complete()
                return self.__dict__[name]
            return super().__getattr__(name)

    def __eq__(self, other: object) -> bool:
        self._complete()
        if isinstance(other, Snapshot):
            other._complete()
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Any:
        self._complete()
        return super().__iter__()

    def __repr_args__(self) -> Any:
        self._complete()
        return super().__repr_args__()

    def __getstate__(self) -> dict[Any, Any]:
        self._complete()
        return super().__getstate__()

    def __copy__(self) -> Snapshot:
        self._complete()
        return super().__copy__()

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Snapshot:
        self._complete()
        return super().__deepcopy__(memo)


_SNAPSHOT_ORDER = tuple(Snapshot.model_fields)


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
    the statuses of threads and events, copies of mutable values), every field
    given. What ``model_construct`` sets, without its walk over the fields'
    aliases and defaults (several times the cost of the rest of a snapshot).
    """
    m = cls.__new__(cls)
    object.__setattr__(m, "__dict__", fields)
    object.__setattr__(m, "__pydantic_fields_set__", set(fields))
    object.__setattr__(m, "__pydantic_extra__", None)
    object.__setattr__(m, "__pydantic_private__", None)
    return m


def snapshot_of(rec: Record, wf: Workflow, state: State) -> Snapshot:
    """The snapshot of an instance: ``rec`` as stored, ``wf`` and ``state`` as run.

    ``state`` must not change afterwards: the threads and awaited events are
    read from it when first asked for (see :class:`Snapshot`).
    """
    status = rec.status
    snap = _made(
        Snapshot,
        {
            "id": rec.id,
            "workflow": rec.workflow,
            "status": _STATUS.get(status) or InstanceStatus(status),
            "version": rec.version,
            "data": wf.model_dump(mode="json"),
            "next_wakeup": rec.wake_at if status != InstanceStatus.RESUMING else None,
        },
    )
    snap.__pydantic_fields_set__.update(_THREAD_FIELDS)
    object.__setattr__(snap, "__pydantic_private__", _Pending(wf, state))
    return snap


_STATUS: dict[str, InstanceStatus] = {s.value: s for s in InstanceStatus}


class _Pending:
    """Where a snapshot's threads, awaited events and error come from, until read."""

    __slots__ = ("state", "wf")

    def __init__(self, wf: Workflow, state: State) -> None:
        self.wf = wf
        self.state = state

    def fields(self) -> dict[str, Any]:
        wf = self.wf
        threads = []
        awaited = []
        selects: dict[str, Select | None] = {}
        error = ""
        for t in self.state.threads:
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
        return {"threads": threads, "awaited": awaited, "error": error}


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
