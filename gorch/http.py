"""A FastAPI app that drives an :class:`gorch.Engine` over HTTP: webhooks in, snapshots out.

``create_app(engine)`` returns a :class:`fastapi.FastAPI` app; serve it alone
(``gorch serve --app module:engine``) or mount it in an existing app
(``parent.mount("/gorch", create_app(engine))``): every route is relative to
where it is mounted.

Routes
    ``POST /workflows/{name}``                 start an instance with a generated id (201)
    ``PUT  /workflows/{name}/{id}``            start an instance with this id (201; 409 if taken)
    ``GET  /workflows/{id}``                   snapshot: data, status, threads, awaited events
                                               (with their input JSON schema), next wake-up
    ``GET  /workflows?status=&workflow=&cursor=&limit=``   one page of instances
    ``POST /workflows/{id}/events/{event}``    deliver any event (``?thread_id=&pc=``)
    ``POST /workflows/{name}/{id}/events/{event}``  one documented operation per event a
                                               definition can await (operationId
                                               ``{workflow}_{event}``), typed from its handler
    ``POST /workflows/{id}/cancel``            cancel an instance
    ``GET  /definitions/{name}/graph``         Mermaid diagram of a workflow class
    ``GET  /workflows/{name_or_id}/graph``     a registered workflow name first, else an
                                               instance id (the diagram marks its cursors)
    ``GET  /healthz``                          the store answers (200) or not (503)

Bodies are JSON. A start's body is the initial data (an object; empty = the
defaults). An event's body is the handler's input (empty = no input); the
response is the handler's output as JSON, exactly as the handler returned it
(no envelope), so the typed operations' 200 schema is the handler's return
annotation. Input is validated once, by the engine, against the handler's
annotation: JSON text goes to pydantic as JSON when every handler of the event
is typed, else the parsed value is passed (untyped handlers get dicts, lists...).

Errors are ``{"error": <name>, "detail": <message>, ...facts}``: gorch errors
keep their class name (``WorkflowNotFound``, ``EventNotFound`` with the
``awaited`` list, ...); HTTP-level ones are ``Unauthorized``,
``InvalidSignature``, ``SignatureExpired`` (401), ``MalformedJSON`` (400),
``PayloadTooLarge`` (413), ``UnsupportedMediaType`` (415), ``InvalidRequest``
(422, a bad query parameter), ``NotFound``, ``MethodNotAllowed``. Every error
leaves the store as it was. A step that fails in the resume after an event
does not fail the event's request (200): the event was delivered and saved,
and ``GET /workflows/{id}`` shows the failure.

Security, checked before anything is read from the store
    ``token``: every route except ``/healthz`` and the docs (``/docs``, ``/redoc``,
    ``/openapi.json``; pass ``docs=False`` to drop them) needs
    ``Authorization: Bearer <token>``.
    ``secret``: every POST/PUT/PATCH/DELETE needs ``X-Gorch-Signature:
    sha256=<hex HMAC-SHA256(secret, raw body)>``; GETs change nothing and are
    not signed. With ``X-Gorch-Timestamp: <unix seconds>`` the signed message is
    ``f"{timestamp}.{body}"`` and a timestamp more than ``signature_tolerance``
    seconds away from the server's clock is refused (a replay). Several secrets
    may be given (rotation): any one of them signs. :func:`sign` makes the headers.
    Bodies over ``max_body`` bytes are refused with 413 (by Content-Length, and
    by counting what arrives); a non-empty body of a mutating request must be
    ``application/json`` (415) and well-formed UTF-8 JSON (400).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import inspect
import json
import logging
import re
import time
import typing
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, cast
from urllib.parse import unquote
from uuid import uuid4

import pydantic
import pydantic_core

try:
    from fastapi import Body, Depends, FastAPI, Path, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.routing import APIRoute
    from fastapi.security import HTTPBearer
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as e:  # pragma: no cover - checked in a subprocess without FastAPI
    raise ImportError(
        f"gorch.http needs FastAPI ({e}); install it with: pip install 'gorch[http]'",
        name=e.name,
    ) from e

from gorch import __version__
from gorch.codec import loads
from gorch.engine import (
    Engine,
    EventTypes,
    InstanceStatus,
    ListPage,
    Snapshot,
    event_types,
)
from gorch.errors import (
    AmbiguousEvent,
    Conflict,
    EventNotFound,
    GorchError,
    HandlerFailed,
    InvalidEventInput,
    InvalidWorkflowData,
    InvalidWorkflowId,
    StaleEvent,
    StepFailed,
    StoreUnavailable,
    UnknownWorkflow,
    WorkflowExists,
    WorkflowFinishedError,
    WorkflowNotActive,
    WorkflowNotFound,
)
from gorch.statements import On, Select
from gorch.workflow import Workflow

__all__ = ["DEFAULT_MAX_BODY", "ErrorBody", "Graph", "Health", "create_app", "sign"]

log = logging.getLogger("gorch")

DEFAULT_MAX_BODY = 1 << 20
"""1 MiB: webhook payloads are small; anything bigger is refused before it is buffered."""

SIGNATURE_HEADER = "X-Gorch-Signature"
TIMESTAMP_HEADER = "X-Gorch-Timestamp"

_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_JSON_KEY = "gorch.json"
"""Where the guard leaves the parsed body in ``scope["state"]`` (parsed once)."""
_SAFE_SEGMENT = re.compile(r"[^/{}?#%\s]+")
"""Names usable as a literal path segment of a documented operation."""


# --------------------------------------------------------------------------- response models


class ErrorBody(pydantic.BaseModel):
    """Every error response: the error's name, a message, and the facts it carries."""

    model_config = pydantic.ConfigDict(extra="allow")

    error: str
    """A gorch error class name (``EventNotFound``) or an HTTP-level one (``Unauthorized``)."""
    detail: str


class Health(pydantic.BaseModel):
    status: str


class Graph(pydantic.BaseModel):
    """A Mermaid flowchart of a workflow class, or of an instance with its cursors marked."""

    workflow: str
    id: str | None = None
    mermaid: str


def _error_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


# --------------------------------------------------------------------------- errors


class _HTTPError(Exception):
    """An error answered before (or instead of) a gorch call; same body shape as gorch's."""

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

    def response(self) -> JSONResponse:
        body = {"error": self.error, "detail": self.detail, **self.extra}
        return JSONResponse(_jsonable(body), self.status, headers=self.headers)


_STATUS: dict[type[GorchError], int] = {
    WorkflowNotFound: 404,
    UnknownWorkflow: 404,
    WorkflowExists: 409,
    EventNotFound: 409,
    StaleEvent: 409,
    AmbiguousEvent: 409,
    WorkflowNotActive: 409,
    WorkflowFinishedError: 409,
    InvalidWorkflowData: 422,
    InvalidEventInput: 422,
    InvalidWorkflowId: 422,
    Conflict: 503,
    StoreUnavailable: 503,
}


def _status_of(exc: GorchError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500  # a definition, code-change or handler problem: the server's side


def _facts(exc: GorchError) -> dict[str, Any]:
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
        return {"id": exc.workflow_id, "status": InstanceStatus.FINISHED.value}
    if isinstance(exc, (WorkflowNotFound, WorkflowExists, Conflict)):
        return {"id": exc.workflow_id}
    if isinstance(exc, InvalidWorkflowId):
        return {"id": str(exc.workflow_id)}
    if isinstance(exc, StepFailed):
        return {"step": exc.step, "thread_id": exc.thread_id, "attempts": exc.attempts}
    if isinstance(exc, HandlerFailed):
        return {"event": exc.event, "thread_id": exc.thread_id}
    return {}


def _jsonable(obj: Any) -> Any:
    """JSON-safe form of an error body (pydantic's error lists may hold any input)."""
    return pydantic_core.to_jsonable_python(obj, serialize_unknown=True)


def _gorch_error_response(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GorchError)
    status = _status_of(exc)
    headers = {"Retry-After": "1"} if isinstance(exc, Conflict) else None
    if status == 500:
        log.error("gorch.http: %s: %s", type(exc).__name__, exc, exc_info=exc)
    body = {"error": type(exc).__name__, "detail": str(exc), **_facts(exc)}
    return JSONResponse(_jsonable(body), status, headers=headers)


def _http_error_response(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _HTTPError)
    return exc.response()


def _request_invalid_response(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors
    )
    body = {"error": "InvalidRequest", "detail": detail or "invalid request", "errors": errors}
    return JSONResponse(_jsonable(body), 422)


def _internal_error_response(_request: Request, exc: Exception) -> Response:
    """A bug, not a gorch error: the JSON shape, no internals (Starlette logs the traceback)."""
    detail = f"unexpected {type(exc).__name__}; the server log has the details"
    return JSONResponse({"error": "InternalServerError", "detail": detail}, 500)


_HTTP_NAMES = {404: "NotFound", 405: "MethodNotAllowed"}


def _starlette_error_response(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    name = _HTTP_NAMES.get(exc.status_code, "HTTPError")
    body = {"error": name, "detail": str(exc.detail)}
    return JSONResponse(body, exc.status_code, headers=dict(exc.headers or {}))


# --------------------------------------------------------------------------- signing and guard


def _secrets(secret: str | bytes | Sequence[str | bytes] | None) -> tuple[bytes, ...]:
    if secret is None:
        return ()
    items = [secret] if isinstance(secret, (str, bytes)) else list(secret)
    out = tuple(s.encode() if isinstance(s, str) else bytes(s) for s in items)
    if not out or not all(out):
        raise ValueError("secret must be a non-empty string (or a list of them)")
    return out


def _signature(secret: bytes, body: bytes, timestamp: str | None) -> str:
    message = body if timestamp is None else timestamp.encode("ascii") + b"." + body
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: str | bytes, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The headers that sign ``body`` for an app created with ``secret``.

    With ``timestamp`` (unix seconds, e.g. ``int(time.time())``) the signature
    covers ``f"{timestamp}.{body}"`` and the app refuses it once it is older
    than its tolerance.
    """
    key = secret.encode() if isinstance(secret, str) else secret
    ts = None if timestamp is None else str(int(timestamp))
    headers = {SIGNATURE_HEADER: "sha256=" + _signature(key, body, ts)}
    if ts is not None:
        headers[TIMESTAMP_HEADER] = ts
    return headers


def _route_path(scope: Scope) -> str:
    """The path relative to where the app is mounted (as Starlette routes it)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


_ENCODED_SLASH = re.compile(r"%2[fF]")


def _keep_encoded_slashes(scope: Scope) -> Scope:
    """Route ``a%2Fb`` as one path segment, as sent, instead of two.

    Starlette matches routes on the decoded path, so an id like ``..%2F..``
    would otherwise be split into segments and never reach the id check.
    """
    raw = scope.get("raw_path")
    if not raw or not _ENCODED_SLASH.search(raw.decode("latin-1")):
        return scope
    segments = raw.decode("latin-1").split("/")
    path = "/".join("%2F".join(unquote(p) for p in _ENCODED_SLASH.split(s)) for s in segments)
    return {**scope, "path": path}


class _Guard:
    """ASGI middleware: token, body size, signature, content type and JSON, before any route.

    The body is read here (at most ``max_body`` bytes), checked, then handed on
    unchanged; a refused request never reaches the engine or the store.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: bytes | None,
        secrets: tuple[bytes, ...],
        max_body: int,
        tolerance: float,
        open_paths: frozenset[str],
    ) -> None:
        self.app = app
        self.token = token
        self.secrets = secrets
        self.max_body = max_body
        self.tolerance = tolerance
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = _keep_encoded_slashes(scope)
        headers = Headers(scope=scope)
        method = scope["method"]
        try:
            if self.token is not None and _route_path(scope) not in self.open_paths:
                self._check_token(headers)
            body = await self._read(headers, receive)
            if body is None:
                return  # the client went away
            if method in _MUTATING:
                if self.secrets:
                    self._check_signature(headers, body)
                if body:
                    scope.setdefault("state", {})[_JSON_KEY] = self._parse(headers, body)
        except _HTTPError as e:
            await e.response()(scope, receive, send)
            return

        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_token(self, headers: Headers) -> None:
        assert self.token is not None
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode("latin-1"), self.token
        ):
            raise _HTTPError(
                401,
                "Unauthorized",
                "this route needs the header 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )

    async def _read(self, headers: Headers, receive: Receive) -> bytes | None:
        too_large = _HTTPError(
            413,
            "PayloadTooLarge",
            f"the request body is larger than {self.max_body} bytes",
            max_body=self.max_body,
        )
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise _HTTPError(400, "InvalidRequest", f"bad Content-Length {length!r}")
            if int(length) > self.max_body:
                raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _check_signature(self, headers: Headers, body: bytes) -> None:
        given = headers.get(SIGNATURE_HEADER, "").strip()
        if not given:
            raise _HTTPError(
                401, "InvalidSignature", f"this request needs a {SIGNATURE_HEADER} header"
            )
        algorithm, _, digest = given.partition("=")
        if algorithm.strip().lower() != "sha256" or not digest:
            raise _HTTPError(
                401, "InvalidSignature", f"{SIGNATURE_HEADER} must look like 'sha256=<hex>'"
            )
        ts = headers.get(TIMESTAMP_HEADER)
        if ts is not None and not ts.strip().isdigit():
            raise _HTTPError(
                401, "InvalidSignature", f"{TIMESTAMP_HEADER} must be unix seconds, got {ts!r}"
            )
        ts = None if ts is None else ts.strip()
        digest = digest.strip().lower()
        if not any(hmac.compare_digest(_signature(s, body, ts), digest) for s in self.secrets):
            raise _HTTPError(
                401,
                "InvalidSignature",
                f"{SIGNATURE_HEADER} does not match the body"
                + (f" and {TIMESTAMP_HEADER}" if ts is not None else ""),
            )
        if ts is not None:
            skew = abs(time.time() - int(ts))
            if skew > self.tolerance:
                raise _HTTPError(
                    401,
                    "SignatureExpired",
                    f"{TIMESTAMP_HEADER} is {skew:.0f} s away from the server's clock "
                    f"(tolerance {self.tolerance:g} s): a replayed or delayed request",
                )

    @staticmethod
    def _parse(headers: Headers, body: bytes) -> Any:
        media = headers.get("content-type", "").partition(";")[0].strip().lower()
        if not (media == "application/json" or re.fullmatch(r"application/[^/]+\+json", media)):
            raise _HTTPError(
                415,
                "UnsupportedMediaType",
                f"the body must be application/json, got {media or 'no Content-Type'!r}",
            )
        try:
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _HTTPError(400, "MalformedJSON", f"the body is not UTF-8: {e}") from e
        except (ValueError, RecursionError) as e:
            raise _HTTPError(400, "MalformedJSON", f"the body is not valid JSON: {e}") from e


# --------------------------------------------------------------------------- definitions


@dataclass(slots=True)
class _Definition:
    """The events a workflow class's definition can await, read once from a default build."""

    name: str
    events: dict[str, list[EventTypes]] = field(default_factory=dict)

    def sends_json(self, event: str) -> bool:
        """Whether every handler of ``event`` validates its input (then pass JSON text)."""
        types = self.events.get(event, [])
        return bool(types) and all(t.typed for t in types)


def _describe(name: str, cls: type[Workflow]) -> _Definition:
    """Walk a build of ``cls``'s definition for its ``On`` cases.

    The build uses default data (``cls()``, else ``cls.model_construct()``): a
    definition whose shape depends on data documents what that build shows;
    the generic event route still accepts any event.
    """
    found = _Definition(name)
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
    return found


def _union(types: Sequence[Any]) -> Any:
    distinct: list[Any] = []
    for t in types:
        if not any(t is d or t == d for d in distinct):
            distinct.append(t)
    if any(t is Any for t in distinct):
        return Any
    return distinct[0] if len(distinct) == 1 else cast(Any, typing.Union)[tuple(distinct)]


_EMPTY = inspect.Parameter.empty
_KW = inspect.Parameter.KEYWORD_ONLY


def _event_signature(types: Sequence[EventTypes]) -> inspect.Signature:
    """The signature FastAPI documents an event operation from (path, body, query)."""
    params = [
        inspect.Parameter("id", _KW, annotation=Annotated[str, Path(description="the instance id")])
    ]
    inputs = [t.input_type for t in types if t.takes_input]
    if inputs:
        optional = len(inputs) < len(types)  # some Select takes this event without input
        body = _union(inputs) if not optional else cast(Any, typing.Optional)[_union(inputs)]
        params.append(
            inspect.Parameter(
                "body",
                _KW,
                annotation=Annotated[body, Body()],  # no extras: exactly the handler's type
                default=None if optional else _EMPTY,
            )
        )
    for pname, tp, doc in (
        ("thread_id", str | None, "the thread, when several threads await the event"),
        ("pc", int | None, "the wait's pc: refuse the event (409) if that wait is over"),
    ):
        params.append(
            inspect.Parameter(
                pname, _KW, annotation=Annotated[tp, Query(description=doc)], default=None
            )
        )
    return inspect.Signature(params)


_Serve = Callable[[Request], Coroutine[Any, Any, Response]]


def _served_by(serve: _Serve) -> type[APIRoute]:
    """A route class FastAPI documents from the endpoint's signature but ``serve`` answers.

    The documented request body is the handler's input type, yet the body must
    be validated once, by the engine, after the instance is found (404 before
    422, JSON-mode validation): so the request handler is gorch's, not FastAPI's.
    """

    class ServedRoute(APIRoute):
        def get_route_handler(self) -> _Serve:
            return serve

    return ServedRoute


# --------------------------------------------------------------------------- the app


@dataclass(frozen=True, slots=True)
class _Payload:
    raw: bytes
    value: Any
    """The parsed JSON; None for an empty body."""


async def _payload(request: Request) -> _Payload:
    raw = await request.body()
    if not raw:
        return _Payload(raw, None)
    state = request.scope.get("state") or {}
    if _JSON_KEY in state:
        return _Payload(raw, state[_JSON_KEY])
    return _Payload(raw, _Guard._parse(request.headers, raw))  # a GET with a body


def _json_body(description: str, kind: str | None = None) -> dict[str, Any]:
    """An optional JSON ``requestBody`` for a route that reads its body itself."""
    schema: dict[str, Any] = {"description": description}
    if kind is not None:
        schema["type"] = kind
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": False, "content": content}}


def _mermaid() -> Callable[..., str]:
    try:
        module = importlib.import_module("gorch.graph")
    except ImportError as e:
        raise _HTTPError(501, "NotImplemented", f"Mermaid diagrams need gorch.graph: {e}") from e
    return cast(Callable[..., str], module.mermaid)


_DESCRIPTION = """\
Long-running workflows driven over HTTP.

* **Start** an instance with `POST /workflows/{name}` (or `PUT` with your id); the
  body is its initial data.
* **Send events** with the operation of each event (typed from its handler), or
  `POST /workflows/{id}/events/{event}` for any event. The body is the handler's
  input; the response is the handler's output, as JSON. Pass `?pc=` (from the
  snapshot's `awaited` list) to refuse a replay aimed at a wait that is over.
* **Errors** are `{"error": name, "detail": message, ...}`: 404 unknown instance or
  workflow, 409 event not awaited (with the `awaited` list), stale or ambiguous,
  or instance not active, 422 invalid input, data or id, 503 store unavailable
  or instance busy (retry after `Retry-After`). Refused requests change nothing.
* **Security** (when configured): `Authorization: Bearer <token>` on every route
  but `/healthz` and the docs; `X-Gorch-Signature: sha256=<hex>` (HMAC-SHA256 of
  the raw body, or of `"{timestamp}.{body}"` with `X-Gorch-Timestamp`) on every
  POST and PUT.
"""


def create_app(
    engine: Engine,
    *,
    secret: str | bytes | Sequence[str | bytes] | None = None,
    token: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    signature_tolerance: float = 300.0,
    docs: bool = True,
    title: str = "gorch",
) -> FastAPI:
    """A FastAPI app serving ``engine``'s workflows; see the module docs for routes and rules.

    Engine calls are blocking, so they run in FastAPI's threadpool, never on
    the event loop.
    """
    if max_body <= 0:
        raise ValueError(f"max_body must be positive, got {max_body}")
    if signature_tolerance <= 0:
        raise ValueError(f"signature_tolerance must be positive, got {signature_tolerance}")
    if token is not None and not token:
        raise ValueError("token must be a non-empty string")
    app = FastAPI(
        title=title,
        version=__version__,
        description=_DESCRIPTION,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_middleware(
        _Guard,
        token=None if token is None else token.encode(),
        secrets=_secrets(secret),
        max_body=max_body,
        tolerance=signature_tolerance,
        open_paths=frozenset(
            {"/healthz"}
            | ({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"} if docs else set())
        ),
    )
    app.add_exception_handler(GorchError, _gorch_error_response)
    app.add_exception_handler(_HTTPError, _http_error_response)
    app.add_exception_handler(RequestValidationError, _request_invalid_response)
    app.add_exception_handler(StarletteHTTPException, _starlette_error_response)
    app.add_exception_handler(Exception, _internal_error_response)

    # Documents the bearer token for /docs ("Authorize"); the guard enforces it.
    auth = [Depends(HTTPBearer(auto_error=False))] if token is not None else []
    unauthorized = (401,) if token is not None else ()
    signed = (401,) if token is not None or secret is not None else ()
    body_errors = (*signed, 400, 413, 415)
    definitions = {name: _describe(name, cls) for name, cls in engine.workflows.items()}

    def check_id(id: str) -> str:
        return Engine._check_id(id)

    # ---------------------------------------------------------------- instances

    def start(name: str, id: str, payload: _Payload) -> Snapshot:
        if name not in engine.workflows:
            raise UnknownWorkflow(name, list(engine.workflows))
        if payload.raw and not isinstance(payload.value, dict):
            kind = type(payload.value).__name__
            raise InvalidWorkflowData(name, f"the body must be a JSON object, got {kind}")
        # JSON text is validated by pydantic in JSON mode (as the engine's start allows).
        data = cast(Any, payload.raw) if payload.raw else None
        try:
            return engine.start(name, id, data)
        except StepFailed:  # the instance exists, failed: report it (a retry would be a 409)
            return engine.get(id)

    started = "the instance, run until it blocks (status 'failed' if its first steps failed)"
    # These routes read the raw body (validated by the engine), so FastAPI is told its shape.
    initial_data = _json_body("the initial data; empty: the workflow's defaults", "object")

    @app.post(
        "/workflows/{name}",
        status_code=201,
        response_model=Snapshot,
        operation_id="start_workflow",
        openapi_extra=initial_data,
        summary="Start an instance with a generated id",
        response_description=started,
        responses=_error_docs(*body_errors, 404, 422, 503),
        tags=["workflows"],
        dependencies=auth,
    )
    def start_generated(name: str, payload: Annotated[_Payload, Depends(_payload)]) -> Snapshot:
        """The body is the initial data: a JSON object (empty: the defaults)."""
        return start(name, uuid4().hex, payload)

    @app.put(
        "/workflows/{name}/{id}",
        status_code=201,
        response_model=Snapshot,
        operation_id="create_workflow",
        openapi_extra=initial_data,
        summary="Start an instance with this id",
        response_description=started,
        responses=_error_docs(*body_errors, 404, 409, 422, 503),
        tags=["workflows"],
        dependencies=auth,
    )
    def start_with_id(
        name: str, id: str, payload: Annotated[_Payload, Depends(_payload)]
    ) -> Snapshot:
        """The body is the initial data: a JSON object (empty: the defaults)."""
        return start(name, id, payload)

    @app.get(
        "/workflows",
        response_model=ListPage,
        operation_id="list_workflows",
        summary="List instances in id order",
        responses=_error_docs(*unauthorized, 422, 503),
        tags=["workflows"],
        dependencies=auth,
    )
    def list_workflows(
        status: Annotated[InstanceStatus | None, Query()] = None,
        workflow: Annotated[str | None, Query()] = None,
        cursor: Annotated[str | None, Query(description="next_cursor of the last page")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> ListPage:
        return engine.list(
            workflow=workflow,
            status=None if status is None else status.value,
            limit=limit,
            after=cursor,
        )

    @app.get(
        "/workflows/{id}",
        response_model=Snapshot,
        operation_id="get_workflow",
        summary="An instance's data, status, threads, awaited events and next wake-up",
        responses=_error_docs(*unauthorized, 404, 422, 503),
        tags=["workflows"],
        dependencies=auth,
    )
    def get_workflow(id: str) -> Snapshot:
        return engine.get(id)

    @app.post(
        "/workflows/{id}/cancel",
        response_model=Snapshot,
        operation_id="cancel_workflow",
        summary="Tear down the awaited events and mark the instance cancelled",
        responses=_error_docs(*body_errors, 404, 409, 422, 503),
        tags=["workflows"],
        dependencies=auth,
    )
    def cancel_workflow(id: str) -> Snapshot:
        return engine.cancel(id)

    # ---------------------------------------------------------------- events

    def deliver(
        id: str,
        event: str,
        payload: _Payload,
        thread_id: str | None,
        pc: int | None,
        workflow: str | None,
    ) -> Response:
        rec = engine.store.load(check_id(id))
        if workflow is not None and rec.workflow != workflow:
            raise _HTTPError(
                404,
                "WorkflowNotFound",
                f"workflow {id!r} is a {rec.workflow!r} instance, not {workflow!r}",
                id=id,
            )
        defn = definitions.get(rec.workflow)
        value: Any = payload.value
        if payload.raw and defn is not None and defn.sends_json(event):
            value = payload.raw  # validated by pydantic in JSON mode
        # A step failing in the resume after the event does not fail the request:
        # the event was delivered and saved; GET shows the instance's failure.
        out = engine.send(id, event, value, thread_id=thread_id, pc=pc)
        return Response(
            pydantic_core.to_json(out, serialize_unknown=True), 200, None, "application/json"
        )

    event_errors = _error_docs(*body_errors, 404, 409, 422, 500, 503)

    @app.post(
        "/workflows/{id}/events/{event}",
        operation_id="send_event",
        openapi_extra=_json_body("the handler's input (any JSON); empty: no input"),
        summary="Deliver any event; the response is the handler's output",
        response_model=Any,
        responses=event_errors,
        tags=["events"],
        dependencies=auth,
    )
    def send_event(
        id: str,
        event: str,
        payload: Annotated[_Payload, Depends(_payload)],
        thread_id: Annotated[str | None, Query()] = None,
        pc: Annotated[int | None, Query()] = None,
    ) -> Response:
        return deliver(id, event, payload, thread_id, pc, None)

    operation_ids = {
        r.operation_id for r in app.routes if isinstance(r, APIRoute) and r.operation_id
    }
    for defn in definitions.values():
        if not _SAFE_SEGMENT.fullmatch(defn.name) or defn.name in (".", ".."):
            log.warning("gorch.http: workflow %r has no typed event routes (name)", defn.name)
            continue
        for event, types in defn.events.items():
            if not _SAFE_SEGMENT.fullmatch(event) or event in (".", ".."):
                log.warning("gorch.http: event %r of %r has no typed route", event, defn.name)
                continue
            op = re.sub(r"\W", "_", f"{defn.name}_{event}")
            n = 1
            while op in operation_ids:
                n += 1
                op = re.sub(r"\W", "_", f"{defn.name}_{event}_{n}")
            operation_ids.add(op)
            _add_event_route(app, defn.name, event, types, op, deliver, auth, event_errors)

    # ---------------------------------------------------------------- graphs

    def class_graph(name: str) -> Graph:
        if name not in engine.workflows:
            raise UnknownWorkflow(name, list(engine.workflows))
        return Graph(workflow=name, mermaid=_mermaid()(engine.workflows[name]))

    @app.get(
        "/definitions/{name}/graph",
        response_model=Graph,
        operation_id="definition_graph",
        summary="Mermaid diagram of a registered workflow class",
        responses=_error_docs(*unauthorized, 404, 422, 501),
        tags=["graphs"],
        dependencies=auth,
    )
    def definition_graph(name: str) -> Graph:
        return class_graph(name)

    @app.get(
        "/workflows/{name_or_id}/graph",
        response_model=Graph,
        operation_id="workflow_graph",
        summary="Mermaid diagram of a workflow name, else of an instance with its cursors",
        responses=_error_docs(*unauthorized, 404, 422, 501, 503),
        tags=["graphs"],
        dependencies=auth,
    )
    def workflow_graph(name_or_id: str) -> Graph:
        if name_or_id in engine.workflows:
            return class_graph(name_or_id)
        rec = engine.store.load(check_id(name_or_id))
        cls = engine.workflows.get(rec.workflow)
        if cls is None:
            raise UnknownWorkflow(rec.workflow, list(engine.workflows))
        wf, state = loads(rec.blob, cls)  # the instance: its data may shape the definition
        return Graph(workflow=rec.workflow, id=rec.id, mermaid=_mermaid()(wf, state))

    # ---------------------------------------------------------------- health

    @app.get(
        "/healthz",
        response_model=Health,
        operation_id="healthz",
        summary="Whether the store answers",
        responses=_error_docs(503),
        tags=["service"],
    )
    def healthz() -> Health:
        try:
            engine.store.list(limit=1)
        except StoreUnavailable:
            raise
        except Exception as e:  # a driver error the store did not wrap
            raise StoreUnavailable(f"the store is unavailable: {type(e).__name__}: {e}") from e
        return Health(status="ok")

    return app


def _add_event_route(
    app: FastAPI,
    workflow: str,
    event: str,
    types: Sequence[EventTypes],
    operation_id: str,
    deliver: Callable[..., Response],
    auth: list[Any],
    responses: dict[int | str, dict[str, Any]],
) -> None:
    """Register ``POST /workflows/{workflow}/{id}/events/{event}``, typed from its handlers."""

    async def serve(request: Request) -> Response:
        pc_text = request.query_params.get("pc")
        if pc_text is not None and not re.fullmatch(r"-?\d+", pc_text.strip()):
            msg = "Input should be a valid integer"
            raise _HTTPError(
                422,
                "InvalidRequest",
                f"query.pc: {msg}, got {pc_text!r}",
                errors=[{"type": "int_parsing", "loc": ["query", "pc"], "msg": msg}],
            )
        payload = await _payload(request)
        return await run_in_threadpool(
            deliver,
            request.path_params["id"],
            event,
            payload,
            request.query_params.get("thread_id"),
            None if pc_text is None else int(pc_text),
            workflow,
        )

    def endpoint(**_: Any) -> Any:  # pragma: no cover - documents only; ``serve`` answers
        raise AssertionError("served by gorch.http, not FastAPI")

    endpoint.__signature__ = _event_signature(types)  # type: ignore[attr-defined]
    endpoint.__name__ = operation_id
    output = _union([t.output_type for t in types])
    app.router.add_api_route(
        f"/workflows/{workflow}/{{id}}/events/{event}",
        endpoint,
        route_class_override=_served_by(serve),
        methods=["POST"],
        response_model=output,
        operation_id=operation_id,
        summary=f"Send {event!r} to {workflow!r}",
        description=(
            f"The body is the input of the handler of {event!r} in {workflow!r}; the "
            f"response is its output. 404 if the instance is no {workflow!r}, 409 if it "
            f"does not await {event!r} now."
        ),
        response_description="the handler's output",
        responses=responses,
        tags=[workflow],
        dependencies=auth,
    )
