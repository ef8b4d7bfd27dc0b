"""What the OpenAPI document says: response models, the events of each workflow, typed bodies.

Typed operations (a workflow's start, each event a definition can await) are
documented from a function signature built here, while gorch answers them
itself (``served_by``): the body must be validated once, after the instance
is found, with gorch's own errors.
"""

from __future__ import annotations

import inspect
import logging
import re
import typing
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, cast

import pydantic
from fastapi import Body, Header, Path, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from gorch.engine import EventTypes, event_types
from gorch.errors import GorchError
from gorch.http.auth import IDEMPOTENCY_HEADER
from gorch.http.request import KEY_PATTERN, PC_PATTERN
from gorch.statements import On, Select, Timeout
from gorch.workflow import Workflow

log = logging.getLogger("gorch")

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$"
"""A workflow id, as the Engine checks it (documented; the Engine's check answers)."""

SAFE_SEGMENT = re.compile(r"[^/{}?#%\s]+")
"""Names usable as a literal path segment of a documented operation."""


class Health(pydantic.BaseModel):
    status: str


class Graph(pydantic.BaseModel):
    """A Mermaid flowchart of a workflow class, or of an instance with its cursors marked."""

    workflow: str
    id: str | None = None
    mermaid: str


def id_param(description: str = "the instance id") -> Any:
    """The ``id`` path parameter, with its pattern and length in the schema.

    Documented only: the Engine's own check answers a bad id (422
    ``InvalidWorkflowId``) before the store is touched.
    """
    extra = {"pattern": ID_PATTERN, "minLength": 1, "maxLength": 200}
    return Annotated[str, Path(description=description, json_schema_extra=extra)]


IdPath = id_param()
EventPath = Annotated[str, Path(description="the event's name, as the workflow awaits it")]

KeyHeader = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_HEADER,
        description=(
            "Makes a retry apply nothing twice: a repeat with the same key returns the "
            "first result; the same key with another request is a 409"
        ),
        json_schema_extra={"pattern": KEY_PATTERN, "minLength": 1, "maxLength": 255},
    ),
]
ThreadQuery = Annotated[
    str | None,
    Query(
        description="the thread, when several threads await the event",
        max_length=200,
    ),
]
PcQuery = Annotated[
    str | None,
    Query(
        description=(
            "the wait's pc (from the snapshot's awaited list), in decimal digits: 409 if "
            "that wait is over"
        ),
        pattern=PC_PATTERN,
    ),
]


def name_or_id_param(names: Sequence[str]) -> Any:
    """The ``name_or_id`` path parameter (as a default): an id, or a registered name."""
    extra = [re.escape(n) for n in names if not re.fullmatch(ID_PATTERN, n)]
    pattern = ID_PATTERN if not extra else f"^(?:{ID_PATTERN[1:-1]}|{'|'.join(extra)})$"
    return Path(
        description="a registered workflow name, else an instance id",
        json_schema_extra={"pattern": pattern, "minLength": 1},
    )


# --------------------------------------------------------------------------- definitions


@dataclass(slots=True)
class Definition:
    """The events a workflow class's definition can await, read once from a default build."""

    name: str
    cls: type[Workflow]
    events: dict[str, list[EventTypes]] = field(default_factory=dict)
    timers: set[str] = field(default_factory=set)

    def sends_json(self, event: str) -> bool:
        """Whether every handler of ``event`` validates its input (then pass JSON text)."""
        types = self.events.get(event, [])
        return bool(types) and all(t.typed for t in types)


def describe(name: str, cls: type[Workflow]) -> Definition:
    """Walk a build of ``cls``'s definition for its ``On`` cases (and its timers' names).

    The build uses default data (``cls()``, else ``cls.model_construct()``): a
    definition whose shape depends on data documents what that build shows;
    the generic event route still accepts any event.
    """
    found = Definition(name, cls)
    try:
        try:
            wf = cls()
        except pydantic.ValidationError:
            wf = cls.model_construct()
        root = wf.definition()
    except Exception as e:
        log.warning("gorch.http: cannot read the events of %r for OpenAPI: %s", name, e)
        return found

    def walk(stmts: Sequence[Any]) -> None:
        for st in stmts:
            if isinstance(st, Select):
                for case in st.cases:
                    if isinstance(case, Timeout):
                        found.timers.add(case.event)
                    if isinstance(case, On):
                        try:
                            types = event_types(case)
                        except GorchError as e:
                            log.warning("gorch.http: event %r of %r: %s", case.event, name, e)
                            continue
                        seen = found.events.setdefault(case.event, [])
                        if types not in seen:
                            seen.append(types)
            children = getattr(st, "children", None)
            if callable(children):
                for body in children():
                    walk(body)

    walk([root])
    for timer in found.timers:  # a timer is never an operation, even if also a case name
        found.events.pop(timer, None)
    return found


def union(types: Sequence[Any]) -> Any:
    """One annotation for several (distinct) ones; ``Any`` absorbs the rest."""
    distinct: list[Any] = []
    for t in types:
        if not any(t is d or t == d for d in distinct):
            distinct.append(t)
    if any(t is Any for t in distinct):
        return Any
    return distinct[0] if len(distinct) == 1 else cast(Any, typing.Union)[tuple(distinct)]


# --------------------------------------------------------------------------- signatures

_EMPTY = inspect.Parameter.empty
_KW = inspect.Parameter.KEYWORD_ONLY


def _param(name: str, annotation: Any, default: Any = _EMPTY) -> inspect.Parameter:
    return inspect.Parameter(name, _KW, annotation=annotation, default=default)


def event_signature(types: Sequence[EventTypes]) -> inspect.Signature:
    """The signature FastAPI documents an event operation from (path, body, query, header)."""
    params = [_param("id", id_param())]
    inputs = [t.input_type for t in types if t.takes_input]
    if inputs:
        optional = len(inputs) < len(types)  # some Select takes this event without input
        body = union(inputs) if not optional else cast(Any, typing.Optional)[union(inputs)]
        params.append(
            # no extras: exactly the handler's type
            _param("body", Annotated[body, Body()], None if optional else _EMPTY)
        )
    params += [
        _param("thread_id", ThreadQuery, None),
        _param("pc", PcQuery, None),
        _param("idempotency_key", KeyHeader, None),
    ]
    return inspect.Signature(params)


def start_signature(cls: type[Workflow], with_id: bool) -> inspect.Signature:
    """The signature of a typed start: the workflow's declared start input as the body."""
    model = cls.start_input_model()
    required = any(f.is_required() for f in model.model_fields.values())
    params = [_param("id", id_param("the new instance's id"))] if with_id else []
    params.append(_param("body", Annotated[model, Body()], _EMPTY if required else None))
    params.append(_param("idempotency_key", KeyHeader, None))
    return inspect.Signature(params)


def documenting(signature: inspect.Signature, name: str) -> Callable[..., Any]:
    """An endpoint FastAPI reads the documentation from; it is never called."""

    def endpoint(**_: Any) -> Any:  # pragma: no cover - documents only; ``served_by`` answers
        raise AssertionError("served by gorch.http, not FastAPI")

    endpoint.__signature__ = signature  # type: ignore[attr-defined]
    endpoint.__name__ = name
    return endpoint


Serve = Callable[[Request], Coroutine[Any, Any, Response]]


def served_by(route_class: type[APIRoute], serve: Serve) -> type[APIRoute]:
    """A route class FastAPI documents from the endpoint's signature but ``serve`` answers."""

    class ServedRoute(route_class):  # type: ignore[valid-type,misc]
        def inner_handler(self) -> Serve:
            return serve

    return ServedRoute


def json_body(description: str, kind: str | None = None) -> dict[str, Any]:
    """An optional JSON ``requestBody`` for a route that reads its body itself."""
    schema: dict[str, Any] = {"description": description}
    if kind is not None:
        schema["type"] = kind
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": False, "content": content}}
