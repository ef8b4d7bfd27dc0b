"""From errors to HTTP answers: one status per gorch error, one JSON body shape for all.

Every error answer is ``{"error": <name>, "detail": <message>, ...facts}``.
gorch errors keep their class name and carry the attributes a client can act
on (``EventNotFound`` lists what is ``awaited``); errors found before any
gorch call (a bad signature, malformed JSON) have their own names.

:func:`status_for` and :func:`gorch_error_handler` are public so that an
application's own endpoints answer a gorch error as the gorch routes do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import pydantic
import pydantic_core
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gorch.errors import (
    AmbiguousEvent,
    ConcurrentChange,
    Conflict,
    CursorNotFound,
    DefinitionError,
    EventNotFound,
    GorchError,
    HandlerFailed,
    IdempotencyKeyReused,
    InvalidEventInput,
    InvalidIdempotencyKey,
    InvalidWorkflowData,
    InvalidWorkflowId,
    ResumeLimitError,
    SerializationError,
    SetupError,
    StaleEvent,
    StepFailed,
    StepResultError,
    StepTimeout,
    StoreError,
    StoreUnavailable,
    ThreadExists,
    TimerNotSendable,
    UnknownWorkflow,
    WorkflowExists,
    WorkflowFinishedError,
    WorkflowNotActive,
    WorkflowNotFound,
)
from gorch.stores import UnsupportedStoreURL

log = logging.getLogger("gorch")


class ErrorBody(pydantic.BaseModel):
    """Every error response: the error's name, a message, and the facts it carries."""

    model_config = pydantic.ConfigDict(extra="allow")

    error: str
    """A gorch error class name (``EventNotFound``) or an HTTP-level one (``Unauthorized``)."""
    detail: str


def error_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route whose errors are ``codes`` (all with an :class:`ErrorBody`)."""
    return {code: {"model": ErrorBody} for code in sorted(set(codes))}


class HTTPError(Exception):
    """A refusal decided by the HTTP layer itself (before, or instead of, a gorch call)."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self) -> Response:
        body = {"error": self.error, "detail": self.detail, **self.extra}
        return json_error(body, self.status, self.headers)


_STATUS: dict[type[GorchError], int] = {
    # the caller's to fix: an unknown id or name, a timer sent, a conflict with the
    # instance's state, invalid input
    WorkflowNotFound: 404,
    UnknownWorkflow: 404,
    TimerNotSendable: 403,
    WorkflowExists: 409,
    EventNotFound: 409,
    StaleEvent: 409,
    AmbiguousEvent: 409,
    WorkflowNotActive: 409,
    WorkflowFinishedError: 409,
    InvalidWorkflowData: 422,
    InvalidEventInput: 422,
    InvalidWorkflowId: 422,
    InvalidIdempotencyKey: 422,
    IdempotencyKeyReused: 409,  # a well-formed request; the key already names another
    # worth a retry: the store is down or the instance busy
    Conflict: 503,
    StoreUnavailable: 503,
    StoreError: 503,
    # the server's: a definition, a step, a handler, a blob or the configuration
    UnsupportedStoreURL: 500,
    SerializationError: 500,
    DefinitionError: 500,
    StepFailed: 500,
    StepResultError: 500,
    StepTimeout: 500,
    ConcurrentChange: 500,
    HandlerFailed: 500,
    SetupError: 500,
    ResumeLimitError: 500,
    CursorNotFound: 500,
    ThreadExists: 500,
    GorchError: 500,
}


def status_for(error: GorchError | type[GorchError]) -> int:
    """The HTTP status a gorch error (or error class) answers with: 403, 404, 409, 422, 503, 500.

    4xx are the caller's to fix (unknown id, timer sent as an event, event not
    awaited or idempotency key used for another request: 409, invalid input,
    id or key: 422); 503 is worth a retry (store down, instance
    busy); 500 is the server's side (a definition, a handler or a step that
    raised, a blob that does not load). Subclasses answer as their nearest
    listed base.
    """
    cls = error if isinstance(error, type) else type(error)
    for base in cls.__mro__:
        if base in _STATUS:
            return _STATUS[base]
    raise TypeError(f"status_for takes a gorch error, got {cls.__name__}")


def facts(exc: GorchError) -> dict[str, Any]:
    """The attributes of ``exc`` a client can act on, under stable names."""
    if isinstance(exc, EventNotFound):
        awaited = [{"name": n, "thread_id": t, "pc": pc} for t, n, pc in exc.awaited]
        return {"event": exc.event, "thread_id": exc.thread_id, "awaited": awaited}
    if isinstance(exc, StaleEvent):
        return {"event": exc.event, "pc": exc.pc, "current": exc.current}
    if isinstance(exc, AmbiguousEvent):
        return {"event": exc.event, "thread_ids": exc.thread_ids}
    if isinstance(exc, InvalidEventInput):
        return {"event": exc.event, "errors": exc.errors}
    if isinstance(exc, InvalidWorkflowData):
        return {"workflow": exc.name, "errors": exc.errors}
    if isinstance(exc, UnknownWorkflow):
        return {"workflow": exc.name, "known": exc.known}
    if isinstance(exc, WorkflowNotActive):
        return {"id": exc.workflow_id, "status": exc.status}
    if isinstance(exc, WorkflowFinishedError):
        return {"id": exc.workflow_id, "status": "finished"}
    if isinstance(exc, TimerNotSendable):
        return {"id": exc.workflow_id, "event": exc.event}
    if isinstance(exc, IdempotencyKeyReused):
        return {"id": exc.workflow_id, "key": exc.key}
    if isinstance(exc, InvalidIdempotencyKey):
        return {"key": str(exc.key)}
    if isinstance(exc, (WorkflowNotFound, WorkflowExists, Conflict)):
        return {"id": exc.workflow_id}
    if isinstance(exc, InvalidWorkflowId):
        return {"id": str(exc.workflow_id)}
    if isinstance(exc, StepFailed):
        return {"step": exc.step, "thread_id": exc.thread_id, "attempts": exc.attempts}
    if isinstance(exc, HandlerFailed):
        return {"event": exc.event, "thread_id": exc.thread_id}
    return {}


_MAX_ECHO_DEPTH = 8
"""How deep an error body may echo the caller's input (pydantic's ``input``)."""


def _clean(value: Any, depth: int = 0) -> Any:
    """``value`` as strict JSON: what JSON cannot carry becomes a string, deep input is cut.

    An error body echoes what the caller sent (pydantic's error lists do); a
    NaN, a lone surrogate or deep nesting in it must not turn a 422 into a 500.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (dict, list)):
        if depth >= _MAX_ECHO_DEPTH:
            return "..."
        if isinstance(value, dict):
            return {str(_clean(str(k))): _clean(v, depth + 1) for k, v in value.items()}
        return [_clean(v, depth + 1) for v in value]
    return value


def json_error(
    body: Mapping[str, Any], status: int, headers: Mapping[str, str] | None = None
) -> Response:
    """An error response whose body always renders, whatever input it quotes."""
    try:
        plain = pydantic_core.to_jsonable_python(dict(body), serialize_unknown=True)
    except (ValueError, TypeError, RecursionError):
        plain = {"error": str(body.get("error")), "detail": str(body.get("detail"))}
    return JSONResponse(_clean(plain), status, headers=dict(headers or {}))


def error_body(exc: GorchError) -> dict[str, Any]:
    """``{"error", "detail", ...facts}`` of a gorch error."""
    return {"error": type(exc).__name__, "detail": str(exc), **facts(exc)}


def gorch_error_response(exc: GorchError) -> Response:
    """The answer to a gorch error: :func:`status_for` and :func:`error_body`."""
    status = status_for(exc)
    headers = {"Retry-After": "1"} if status == 503 else None
    if status >= 500:
        log.error("gorch.http: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return json_error(error_body(exc), status, headers)


async def gorch_error_handler(request: Request, exc: Exception) -> Response:
    """An exception handler for an application's own routes that call the Engine.

    ``app.add_exception_handler(GorchError, gorch_error_handler)`` makes a
    ``WorkflowNotFound`` a 404, an ``EventNotFound`` a 409 and so on, with the
    same body as the gorch routes, instead of a 500.
    """
    if not isinstance(exc, GorchError):
        raise exc
    return gorch_error_response(exc)


def invalid_request(errors: list[Any]) -> Response:
    """422 ``InvalidRequest``: a query, path or header parameter FastAPI refused."""
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors
    )
    body = {"error": "InvalidRequest", "detail": detail or "invalid request", "errors": errors}
    return json_error(body, 422)


HTTP_NAMES = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed"}


def known_error_response(exc: Exception) -> Response | None:
    """The JSON answer to an error the HTTP layer knows, else None (a bug: let it raise)."""
    if isinstance(exc, HTTPError):
        return exc.response()
    if isinstance(exc, GorchError):
        return gorch_error_response(exc)
    if isinstance(exc, RequestValidationError):
        return invalid_request(list(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        name = HTTP_NAMES.get(exc.status_code, "HTTPError")
        body = {"error": name, "detail": str(exc.detail)}
        return json_error(body, exc.status_code, exc.headers)
    return None


def internal_error_response(_request: Request, exc: Exception) -> Response:
    """A bug, not a gorch error: the JSON shape, no internals (the server log has the traceback)."""
    detail = f"unexpected {type(exc).__name__}; the server log has the details"
    return json_error({"error": "InternalServerError", "detail": detail}, 500)
