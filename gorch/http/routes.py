"""The gorch routes, as an :class:`fastapi.APIRouter` any FastAPI app can include.

Every route goes through one route class (:class:`GorchRoute`): it checks the
token and the signature, reads the body (at most ``max_body`` bytes), parses
it strictly, refuses a replayed signature, and answers every error, gorch's or
the HTTP layer's, with the ``{"error", "detail", ...}`` body. So the routes
behave alike served alone (:func:`gorch.http.create_app`) or included in an
application's own app (``app.include_router(create_router(engine, ...))``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, cast

import pydantic
import pydantic_core
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.types import Message

from gorch.codec import loads
from gorch.engine import EngineCore, EventTypes, InstanceStatus, ListPage, Snapshot
from gorch.errors import (
    InvalidEventInput,
    InvalidWorkflowData,
    SerializationError,
    StoreUnavailable,
    UnknownWorkflow,
    summarize_validation,
)
from gorch.history import HistoryPage
from gorch.http.auth import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Authenticator,
    Secret,
    Verified,
)
from gorch.http.driver import Driver
from gorch.http.errors import HTTPError, error_docs, known_error_response
from gorch.http.request import Payload, check_key, parse_json, parse_pc, read_body
from gorch.http.schemas import (
    SAFE_SEGMENT,
    Definition,
    EventPath,
    Graph,
    Health,
    IdPath,
    KeyHeader,
    PcQuery,
    Serve,
    ThreadQuery,
    describe,
    documenting,
    event_signature,
    json_body,
    name_or_id_param,
    served_by,
    start_signature,
    union,
)
from gorch.workflow import Workflow

log = logging.getLogger("gorch")

DEFAULT_MAX_BODY = 1 << 20
"""1 MiB: webhook payloads are small; anything bigger is refused before it is buffered."""

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ADMITTED = "gorch.request"
"""Where the gate leaves what it checked, in the request's scope."""


@dataclass(frozen=True, slots=True)
class Admitted:
    """What the gate checked: the body, the idempotency key, and who is asking."""

    payload: Payload
    key: str | None
    by: str | None = None
    """Who sent it, for the instance's history (see :func:`principal`)."""


def principal(verified: Verified | None, auth: Authenticator) -> str:
    """Who a request comes from, as far as the app can tell, for the history's ``by``.

    ``http:webhook:<webhook-id>`` for a Standard Webhooks signature (the id the
    sender logged), ``http:signature`` for gorch's scheme, ``http:token`` for
    the bearer token, ``http:open`` when the app checks nothing. The app knows
    a credential, not a person: a workflow that needs the person takes it in
    the event's input (and the signature covers it).
    """
    if verified is not None:
        if verified.idempotency_key is not None:
            return f"http:webhook:{verified.idempotency_key}"
        return "http:signature"
    if auth.token is not None:
        return "http:token"
    return "http:open"


class Gate:
    """The checks every gorch route runs before its endpoint, in this order.

    Token (401, for what is not signed), body size (413), signature and
    timestamp (401), media type and JSON (415, 400, 422), idempotency key
    (422), then the replay check (409),
    the only one that touches the store (``Store.remember``), and only for a
    request whose signature is good.
    """

    def __init__(self, driver: Driver, auth: Authenticator, max_body: int) -> None:
        if max_body <= 0:
            raise ValueError(f"max_body must be positive, got {max_body}")
        self.driver = driver
        self.auth = auth
        self.max_body = max_body

    def must_sign(self, method: str) -> bool:
        """A secret guards every write; reads too, unless a token guards them.

        A signed request needs no token: the signature proves more (this
        request, now, from a holder of the secret), and a webhook sender
        cannot always add an ``Authorization`` header.
        """
        return self.auth.signed and (method not in _SAFE_METHODS or self.auth.token is None)

    async def authenticate(self, request: Request) -> tuple[bytes, Verified | None] | None:
        """Signature or token: the body and what was verified; None if the client left."""
        signed = self.must_sign(request.method)
        if not signed:  # refused before a byte of body is read
            self.auth.check_token(request.headers)
        body = await read_body(request.headers, request.receive, self.max_body)
        if body is None:
            return None
        verified = None
        if signed:
            verified = self.auth.verify(request.scope, request.headers, body)
        return body, verified

    async def admit(self, request: Request, public: bool) -> Request | None:
        """The request to hand to the endpoint (its body replayed), or None if the client left."""
        if public:
            read = await read_body(request.headers, request.receive, self.max_body)
            if read is None:
                return None
            body, verified = read, None
        else:
            checked = await self.authenticate(request)
            if checked is None:
                return None
            body, verified = checked
        mutating = request.method not in _SAFE_METHODS
        value = parse_json(request.headers, body) if body and mutating else None
        key = None
        if mutating:
            header = request.headers.get(IDEMPOTENCY_HEADER)
            if header is not None:
                key = check_key(header.strip(), IDEMPOTENCY_HEADER)
            elif verified is not None and verified.idempotency_key is not None:
                key = check_key(verified.idempotency_key, "webhook-id")
        if (
            verified is not None
            and mutating
            and not await self.driver.remember(verified.replay_key, verified.until)
        ):
            raise self.auth.replayed()
        scope = request.scope
        by = None if public else principal(verified, self.auth)
        scope[_ADMITTED] = Admitted(Payload(body, value), key, by)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await request.receive()

        return Request(scope, replay, request._send)


class GorchRoute(APIRoute):
    """Runs the :class:`Gate` before the endpoint and answers every known error as JSON.

    Subclassed per router (``gate``) and per public route (``public``).
    """

    gate: ClassVar[Gate]
    public: ClassVar[bool] = False
    fallback: ClassVar[bool] = False
    """A hidden route behind the documented ones (not listed in ``Allow``)."""

    def inner_handler(self) -> Serve:
        """What answers once the gate let the request in (FastAPI's handler by default)."""
        return super().get_route_handler()

    def get_route_handler(self) -> Serve:
        inner = self.inner_handler()
        gate, public = self.gate, self.public

        async def handler(request: Request) -> Response:
            try:
                admitted = await gate.admit(request, public)
                if admitted is None:
                    return Response(status_code=400)  # the client is gone; nobody reads it
                return await inner(admitted)
            except Exception as e:
                response = known_error_response(e)
                if response is None:
                    raise
                return response

        return handler


def checked_of(request: Request) -> Admitted:
    """What the gate checked for this request (left in its scope)."""
    found = request.scope.get(_ADMITTED)
    if not isinstance(found, Admitted):  # pragma: no cover - every gorch route has a gate
        raise RuntimeError("gorch.http: a route ran without its gate")
    return found


async def admitted(request: Request) -> Admitted:
    """The dependency that hands an endpoint what the gate checked (async: no threadpool)."""
    return checked_of(request)


Checked = Annotated[Admitted, Depends(admitted)]


def _json(value: Any) -> Response:
    body = pydantic_core.to_json(value, serialize_unknown=True, inf_nan_mode="null")
    return Response(body, 200, None, "application/json")


def _warn_if_open(token: str | None, secret: object, insecure: bool) -> None:
    if token is None and secret is None and not insecure:
        log.warning(
            "gorch.http: no secret and no token: anyone who can reach this app can start, "
            "drive, cancel and read every workflow instance; pass secret= and/or token= "
            "(or insecure=True to say this is intended)"
        )


def create_router(
    engine: EngineCore,
    *,
    secret: Secret | Sequence[Secret] | None = None,
    token: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    signature_tolerance: float = 300.0,
    insecure: bool = False,
) -> APIRouter:
    """The gorch routes as an ``APIRouter``, guarded as described in :mod:`gorch.http`.

    ``app.include_router(create_router(engine, secret=...), prefix="/gorch")``
    adds them to an application's own app and its ``/docs``. Signatures
    cover the path as sent, prefix included. Without ``secret`` and
    ``token`` a warning is logged, unless ``insecure=True`` says it is meant.
    ``engine`` is a :class:`gorch.Engine` (its calls run in the threadpool)
    or an engine whose methods are coroutines (awaited on the event loop).
    """
    _warn_if_open(token, secret, insecure)
    auth = Authenticator(token=token, secret=secret, tolerance=signature_tolerance)
    driver = Driver(engine)
    gate = Gate(driver, auth, max_body)
    route_class = cast(type[GorchRoute], type("GorchRoute", (GorchRoute,), {"gate": gate}))
    router = APIRouter(route_class=route_class)
    _Routes(driver, router, route_class, auth).add()
    return router


class _Routes:
    """Adds the routes of the driven engine to ``router``; one instance per router."""

    def __init__(
        self,
        driver: Driver,
        router: APIRouter,
        route_class: type[GorchRoute],
        auth: Authenticator,
    ) -> None:
        self.driver = driver
        self.router = router
        self.route_class = route_class
        self.public_class = cast(
            type[GorchRoute], type("PublicGorchRoute", (route_class,), {"public": True})
        )
        self.fallback_class = cast(
            type[GorchRoute], type("FallbackGorchRoute", (route_class,), {"fallback": True})
        )
        # Documents the bearer token for /docs ("Authorize"); the gate enforces it.
        self.auth_deps = [Depends(HTTPBearer(auto_error=False))] if auth.token else []
        # Documents the signature of writes; the gate checks it (a signature stands alone).
        signature = APIKeyHeader(
            name=SIGNATURE_HEADER,
            scheme_name="GorchSignature",
            description=(
                f"'v1=' and the hex HMAC-SHA256 of method, path, query, {TIMESTAMP_HEADER}, "
                f"{IDEMPOTENCY_HEADER} and body (see gorch.http.sign), with {TIMESTAMP_HEADER}; "
                "or Standard Webhooks' webhook-id, webhook-timestamp and webhook-signature"
            ),
            auto_error=False,
        )
        self.write_deps = [Depends(signature)] if auth.signed else self.auth_deps
        guarded = auth.token is not None or auth.signed
        self.read_errors = (401,) if guarded else ()
        # 401 bad token or signature, 409 replayed signature, and the body's errors
        self.write_errors = (*((401, 409) if guarded else ()), 400, 413, 415, 422)
        self.definitions = {name: describe(name, cls) for name, cls in driver.workflows.items()}
        self.operation_ids: set[str] = set()

    def add(self) -> None:
        self.add_typed_starts()
        self.add_instance_routes()
        self.add_typed_events()
        self.add_graph_routes()
        self.add_health()

    # ---------------------------------------------------------------- helpers

    def operation_id(self, *parts: str) -> str:
        base = "_".join(parts)
        op = "".join(c if c.isalnum() or c == "_" else "_" for c in base)
        n, unique = 1, op
        while unique in self.operation_ids:
            n += 1
            unique = f"{op}_{n}"
        self.operation_ids.add(unique)
        return unique

    @staticmethod
    def check_id(id: str) -> str:
        """422 ``InvalidWorkflowId`` before any store access, as the Engine checks it."""
        return EngineCore._check_id(id)

    def unknown(self, name: str) -> UnknownWorkflow:
        return UnknownWorkflow(name, list(self.driver.workflows))

    async def start(self, name: str, id: str | None, checked: Admitted) -> Snapshot:
        """Validate the body against the workflow's declared start input, then start."""
        cls = self.driver.workflows.get(name)
        if cls is None:
            raise self.unknown(name)
        if id is not None:
            self.check_id(id)
            if id in self.driver.workflows:
                raise HTTPError(
                    422,
                    "InvalidWorkflowId",
                    f"invalid workflow id {id!r}: it is the name of a workflow, so "
                    f"/workflows/{id} would mean the workflow, not this instance",
                    id=id,
                )
        payload = checked.payload
        if payload.raw and not isinstance(payload.value, dict):
            kind = type(payload.value).__name__
            raise InvalidWorkflowData(name, f"the body must be a JSON object, got {kind}")
        data = _start_data(name, cls, payload.raw or b"{}")
        try:
            return await self.driver.start(name, id, data, key=checked.key, by=checked.by)
        except SerializationError as e:  # nothing was created: the data cannot be stored
            raise InvalidWorkflowData(name, f"the data cannot be stored: {e}") from e

    async def deliver(
        self,
        id: str,
        event: str,
        checked: Admitted,
        thread_id: str | None,
        pc: int | None,
        workflow: str | None,
    ) -> Response:
        rec = await self.driver.load(self.check_id(id))
        if workflow is not None and rec.workflow != workflow:
            raise HTTPError(
                404,
                "WorkflowNotFound",
                f"workflow {id!r} is a {rec.workflow!r} instance, not {workflow!r}",
                id=id,
            )
        defn = self.definitions.get(rec.workflow)
        payload = checked.payload
        value: Any = payload.value
        if payload.raw and defn is not None and defn.sends_json(event):
            value = payload.raw  # validated by pydantic in JSON mode
        try:
            # A step failing in the resume after the event does not fail the request:
            # the event was delivered and saved; GET shows the instance's failure.
            out = await self.driver.send(
                id, event, value, thread_id=thread_id, pc=pc, key=checked.key, by=checked.by
            )
        except SerializationError as e:
            if not await self._loads(id):
                raise  # the stored record itself does not load: the server's problem
            raise InvalidEventInput(
                event, f"what the handler made of this input cannot be stored: {e}"
            ) from e
        return _json(out)

    async def _loads(self, id: str) -> bool:
        """Whether the stored record of ``id`` decodes (so an error came from the event)."""
        rec = await self.driver.load(id)
        cls = self.driver.workflows.get(rec.workflow)
        if cls is None:
            return False
        try:
            loads(rec.blob, cls)
        except SerializationError:
            return False
        return True

    # ---------------------------------------------------------------- starts

    def add_typed_starts(self) -> None:
        """``POST /workflows/{name}`` and ``PUT /workflows/{name}/{id}`` per workflow, typed."""
        for defn in self.definitions.values():
            if not SAFE_SEGMENT.fullmatch(defn.name) or defn.name in (".", ".."):
                log.warning("gorch.http: workflow %r has no typed routes (its name)", defn.name)
                continue
            for with_id in (False, True):
                self.add_typed_start(defn, with_id)
        self.add_generic_starts()

    def add_typed_start(self, defn: Definition, with_id: bool) -> None:
        name = defn.name
        model = defn.cls.start_input_model()

        async def serve(request: Request) -> Response:
            checked = checked_of(request)
            id = request.path_params["id"] if with_id else None
            snap = await self.start(name, id, checked)
            return Response(snap.model_dump_json(), 201, None, "application/json")

        declared = ", ".join(defn.cls.start_input) or "nothing (start_input is empty)"
        op = self.operation_id("create" if with_id else "start", name)
        self.router.add_api_route(
            f"/workflows/{name}/{{id}}" if with_id else f"/workflows/{name}",
            documenting(start_signature(defn.cls, with_id), op),
            route_class_override=served_by(self.route_class, serve),
            methods=["PUT" if with_id else "POST"],
            status_code=201,
            response_model=Snapshot,
            operation_id=op,
            summary=f"Start an instance of {name!r}" + (" with this id" if with_id else ""),
            description=(
                f"The body is what a caller may set: {declared} (``{model.__name__}``); "
                "any other field is refused with 422. Empty body: the defaults."
            ),
            response_description="the instance, run until it blocks",
            responses=error_docs(*self.write_errors, 404, 409, 503),
            tags=[name],
            dependencies=self.write_deps,
        )

    def add_generic_starts(self) -> None:
        """The same starts for any name (hidden: each workflow has its typed operation).

        They answer a name without a typed route, and an unknown name with 404
        ``UnknownWorkflow`` listing the known ones.
        """

        async def start_generated(name: str, checked: Checked) -> Snapshot:
            return await self.start(name, None, checked)

        async def start_with_id(name: str, id: str, checked: Checked) -> Snapshot:
            return await self.start(name, id, checked)

        for path, endpoint, method in (
            ("/workflows/{name}", start_generated, "POST"),
            ("/workflows/{name}/{id}", start_with_id, "PUT"),
        ):
            self.router.add_api_route(
                path,
                endpoint,
                methods=[method],
                status_code=201,
                response_model=Snapshot,
                dependencies=self.write_deps,
                include_in_schema=False,
                route_class_override=self.fallback_class,
            )

    # ---------------------------------------------------------------- instances

    def add_instance_routes(self) -> None:
        driver = self.driver

        @self.router.get(
            "/workflows",
            response_model=ListPage,
            operation_id=self.operation_id("list_workflows"),
            summary="List instances in id order",
            responses=error_docs(*self.read_errors, 422, 503),
            tags=["workflows"],
            dependencies=self.auth_deps,
        )
        async def list_workflows(
            status: Annotated[InstanceStatus | None, Query()] = None,
            workflow: Annotated[
                str | None, Query(description="a workflow name", max_length=200)
            ] = None,
            cursor: Annotated[
                str | None, Query(description="next_cursor of the last page", max_length=200)
            ] = None,
            limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        ) -> ListPage:
            return await driver.list(
                workflow=workflow,
                status=None if status is None else status.value,
                limit=limit,
                after=cursor,
            )

        @self.router.get(
            "/workflows/{id}",
            response_model=Snapshot,
            operation_id=self.operation_id("get_workflow"),
            summary="An instance's data, status, threads, awaited events and next wake-up",
            responses=error_docs(*self.read_errors, 404, 422, 503),
            tags=["workflows"],
            dependencies=self.auth_deps,
        )
        async def get_workflow(id: IdPath) -> Snapshot:
            if id in driver.workflows:  # as in OpenAPI, the literal path wins: a start
                raise HTTPError(
                    405,
                    "MethodNotAllowed",
                    f"/workflows/{id} starts a {id!r} instance (POST); a workflow name is "
                    "never an instance id",
                    {"Allow": "POST"},
                )
            return await driver.get(self.check_id(id))

        @self.router.post(
            "/workflows/{id}/cancel",
            response_model=Snapshot,
            operation_id=self.operation_id("cancel_workflow"),
            summary="Tear down the awaited events and mark the instance cancelled",
            responses=error_docs(*self.write_errors, 404, 409, 503),
            tags=["workflows"],
            dependencies=self.write_deps,
        )
        async def cancel_workflow(id: IdPath, checked: Checked) -> Snapshot:
            return await driver.cancel(self.check_id(id), by=checked.by)

        @self.router.get(
            "/workflows/{id}/history",
            response_model=HistoryPage,
            operation_id=self.operation_id("workflow_history"),
            summary="What happened to an instance, oldest first (capped per instance)",
            responses=error_docs(*self.read_errors, 404, 422, 503),
            tags=["workflows"],
            dependencies=self.auth_deps,
        )
        async def workflow_history(id: IdPath) -> HistoryPage:
            history = await driver.history(self.check_id(id))
            return HistoryPage(id=id, dropped=history.dropped, entries=list(history))

        @self.router.post(
            "/workflows/{id}/events/{event}",
            operation_id=self.operation_id("send_event"),
            openapi_extra=json_body("the handler's input (any JSON); empty: no input"),
            summary="Deliver any event; the response is the handler's output",
            description="403 for the name of a timer: timers fire when due, never on request.",
            response_model=Any,
            responses=error_docs(*self.write_errors, 403, 404, 409, 500, 503),
            tags=["events"],
            dependencies=self.write_deps,
        )
        async def send_event(
            request: Request,
            id: IdPath,
            event: EventPath,
            checked: Checked,
            thread_id: ThreadQuery = None,
            pc: PcQuery = None,
            idempotency_key: KeyHeader = None,
        ) -> Response:
            number = parse_pc(pc)  # as strict as the typed routes
            return await self.deliver(id, event, checked, thread_id, number, None)

    # ---------------------------------------------------------------- typed events

    def add_typed_events(self) -> None:
        for defn in self.definitions.values():
            if not SAFE_SEGMENT.fullmatch(defn.name) or defn.name in (".", ".."):
                continue
            for event, types in defn.events.items():
                if not SAFE_SEGMENT.fullmatch(event) or event in (".", ".."):
                    log.warning("gorch.http: event %r of %r has no typed route", event, defn.name)
                    continue
                self.add_event_route(defn.name, event, types)

    def add_event_route(self, workflow: str, event: str, types: Sequence[EventTypes]) -> None:
        """``POST /workflows/{workflow}/{id}/events/{event}``, typed from its handlers."""

        async def serve(request: Request) -> Response:
            checked = checked_of(request)
            pc = parse_pc(request.query_params.get("pc"))
            thread_id = request.query_params.get("thread_id")
            if thread_id is not None and len(thread_id) > 200:
                raise HTTPError(422, "InvalidRequest", "query.thread_id: at most 200 characters")
            id = request.path_params["id"]
            return await self.deliver(id, event, checked, thread_id, pc, workflow)

        op = self.operation_id(workflow, event)
        self.router.add_api_route(
            f"/workflows/{workflow}/{{id}}/events/{event}",
            documenting(event_signature(types), op),
            route_class_override=served_by(self.route_class, serve),
            methods=["POST"],
            response_model=union([t.output_type for t in types]),
            operation_id=op,
            summary=f"Send {event!r} to {workflow!r}",
            description=(
                f"The body is the input of the handler of {event!r} in {workflow!r}; the "
                f"response is its output. 404 if the instance is no {workflow!r}, 409 if it "
                f"does not await {event!r} now."
            ),
            response_description="the handler's output",
            responses=error_docs(*self.write_errors, 404, 409, 500, 503),
            tags=[workflow],
            dependencies=self.write_deps,
        )

    # ---------------------------------------------------------------- graphs, health

    def add_graph_routes(self) -> None:
        driver = self.driver
        name_or_id_path = name_or_id_param(list(driver.workflows))

        def class_graph(name: str) -> Graph:
            cls = driver.workflows.get(name)
            if cls is None:
                raise self.unknown(name)
            return Graph(workflow=name, mermaid=_mermaid()(cls))

        @self.router.get(
            "/definitions/{name}/graph",
            response_model=Graph,
            operation_id=self.operation_id("definition_graph"),
            summary="Mermaid diagram of a registered workflow class",
            responses=error_docs(*self.read_errors, 404, 422, 501),
            tags=["graphs"],
            dependencies=self.auth_deps,
        )
        async def definition_graph(
            name: Annotated[str, Path(description="a registered workflow name")],
        ) -> Graph:
            return class_graph(name)

        @self.router.get(
            "/workflows/{name_or_id}/graph",
            response_model=Graph,
            operation_id=self.operation_id("workflow_graph"),
            summary="Mermaid diagram of a workflow name, else of an instance with its cursors",
            responses=error_docs(*self.read_errors, 404, 422, 501, 503),
            tags=["graphs"],
            dependencies=self.auth_deps,
        )
        async def workflow_graph(name_or_id: str = name_or_id_path) -> Graph:
            if name_or_id in driver.workflows:
                return class_graph(name_or_id)
            rec = await driver.load(self.check_id(name_or_id))
            cls = driver.workflows.get(rec.workflow)
            if cls is None:
                raise self.unknown(rec.workflow)
            wf, state = loads(rec.blob, cls)  # the instance: its data may shape the definition
            return Graph(workflow=rec.workflow, id=rec.id, mermaid=_mermaid()(wf, state))

    def add_health(self) -> None:
        driver = self.driver

        async def healthz() -> Health:
            try:
                await driver.list_records(limit=1)
            except StoreUnavailable:
                raise
            except Exception as e:  # a driver error the store did not wrap
                raise StoreUnavailable(f"the store is unavailable: {type(e).__name__}: {e}") from e
            return Health(status="ok")

        self.router.add_api_route(
            "/healthz",
            healthz,
            methods=["GET"],
            response_model=Health,
            operation_id=self.operation_id("healthz"),
            summary="Whether the store answers (open to everyone)",
            responses=error_docs(503),
            tags=["service"],
            route_class_override=self.public_class,
        )


def _start_data(name: str, cls: type[Workflow], raw: bytes) -> str:
    """The body validated against ``cls.start_input_model()``, as JSON text for the Engine."""
    model = cls.start_input_model()
    try:
        given = model.model_validate_json(raw)
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False, include_context=False)
        message = summarize_validation(errors)
        if any(err.get("type") == "extra_forbidden" for err in errors):
            allowed = ", ".join(cls.start_input)
            message += (
                f"; a caller may set only the fields {cls.__name__}.start_input declares "
                f"({allowed})"
                if allowed
                else f"; {cls.__name__} declares no start input: list the fields callers may "
                f"set in {cls.__name__}.start_input = ('field', ...)"
            )
        raise InvalidWorkflowData(name, message, errors) from e
    return given.model_dump_json(by_alias=True, exclude_unset=True)


def _mermaid() -> Callable[..., str]:
    try:
        from gorch.graph import mermaid
    except ImportError as e:  # pragma: no cover - gorch.graph ships with gorch
        raise HTTPError(501, "NotImplemented", f"Mermaid diagrams need gorch.graph: {e}") from e
    return mermaid
