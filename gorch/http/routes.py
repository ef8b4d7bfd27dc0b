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
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.types import Message

from gorch.codec import loads
from gorch.engine import Engine, EventTypes, InstanceStatus, ListPage, Snapshot
from gorch.errors import (
    InvalidEventInput,
    InvalidWorkflowData,
    SerializationError,
    StoreUnavailable,
    UnknownWorkflow,
    summarize_validation,
)
from gorch.http.auth import IDEMPOTENCY_HEADER, Authenticator, Secret, Verified
from gorch.http.errors import HTTPError, error_docs, known_error_response
from gorch.http.request import Payload, check_key, parse_json, parse_pc, read_body
from gorch.http.schemas import (
    SAFE_SEGMENT,
    Definition,
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
    """What the gate checked: the body and the idempotency key of the request."""

    payload: Payload
    key: str | None


class Gate:
    """The checks every gorch route runs before its endpoint, in this order.

    Token (401), body size (413), signature and timestamp (401), media type and
    JSON (415, 400, 422), idempotency key (422), then the replay check (409),
    the only one that touches the store (``Store.remember``), and only for a
    request whose signature is good.
    """

    def __init__(self, engine: Engine, auth: Authenticator, max_body: int) -> None:
        if max_body <= 0:
            raise ValueError(f"max_body must be positive, got {max_body}")
        self.engine = engine
        self.auth = auth
        self.max_body = max_body

    def must_sign(self, method: str) -> bool:
        """A secret alone guards every request; with a token too, only the mutating ones."""
        return self.auth.signed and (method not in _SAFE_METHODS or self.auth.token is None)

    async def authenticate(self, request: Request) -> tuple[bytes, Verified | None] | None:
        """Token and signature: the body and what was verified; None if the client left."""
        self.auth.check_token(request.headers)
        body = await read_body(request.headers, request.receive, self.max_body)
        if body is None:
            return None
        verified = None
        if self.must_sign(request.method):
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
        if verified is not None and mutating:
            await run_in_threadpool(self.auth.remember, self.engine.store, verified)
        scope = request.scope
        scope[_ADMITTED] = Admitted(Payload(body, value), key)
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


def admitted(request: Request) -> Admitted:
    """The dependency that hands an endpoint what the gate checked."""
    found = request.scope.get(_ADMITTED)
    if not isinstance(found, Admitted):  # pragma: no cover - every gorch route has a gate
        raise RuntimeError("gorch.http: a route ran without its gate")
    return found


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
    engine: Engine,
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
    """
    _warn_if_open(token, secret, insecure)
    auth = Authenticator(token=token, secret=secret, tolerance=signature_tolerance)
    gate = Gate(engine, auth, max_body)
    route_class = cast(type[GorchRoute], type("GorchRoute", (GorchRoute,), {"gate": gate}))
    router = APIRouter(route_class=route_class)
    _Routes(engine, router, route_class, auth).add()
    return router


class _Routes:
    """Adds the routes of ``engine`` to ``router``; one instance per router."""

    def __init__(
        self,
        engine: Engine,
        router: APIRouter,
        route_class: type[GorchRoute],
        auth: Authenticator,
    ) -> None:
        self.engine = engine
        self.router = router
        self.route_class = route_class
        self.public_class = cast(
            type[GorchRoute], type("PublicGorchRoute", (route_class,), {"public": True})
        )
        # Documents the bearer token for /docs ("Authorize"); the gate enforces it.
        self.auth_deps = [Depends(HTTPBearer(auto_error=False))] if auth.token else []
        guarded = auth.token is not None or auth.signed
        self.read_errors = (401,) if guarded else ()
        # 401 bad token or signature, 409 replayed signature, and the body's errors
        self.write_errors = (*((401, 409) if guarded else ()), 400, 413, 415, 422)
        self.definitions = {name: describe(name, cls) for name, cls in engine.workflows.items()}
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

    def check_id(self, id: str) -> str:
        return Engine._check_id(id)

    def start(self, name: str, id: str | None, checked: Admitted) -> Snapshot:
        """Validate the body against the workflow's declared start input, then start."""
        cls = self.engine.workflows.get(name)
        if cls is None:
            raise UnknownWorkflow(name, list(self.engine.workflows))
        if id is not None:
            self.check_id(id)
        payload = checked.payload
        if payload.raw and not isinstance(payload.value, dict):
            kind = type(payload.value).__name__
            raise InvalidWorkflowData(name, f"the body must be a JSON object, got {kind}")
        data = _start_data(name, cls, payload.raw or b"{}")
        try:
            return self.engine.start(name, id, cast(Any, data), key=checked.key)
        except SerializationError as e:  # nothing was created: the data cannot be stored
            raise InvalidWorkflowData(name, f"the data cannot be stored: {e}") from e

    def deliver(
        self,
        id: str,
        event: str,
        checked: Admitted,
        thread_id: str | None,
        pc: int | None,
        workflow: str | None,
    ) -> Response:
        rec = self.engine.store.load(self.check_id(id))
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
            out = self.engine.send(id, event, value, thread_id=thread_id, pc=pc, key=checked.key)
        except SerializationError as e:
            if not self._loads(id):
                raise  # the stored record itself does not load: the server's problem
            raise InvalidEventInput(
                event, f"what the handler made of this input cannot be stored: {e}"
            ) from e
        return _json(out)

    def _loads(self, id: str) -> bool:
        """Whether the stored record of ``id`` decodes (so an error came from the event)."""
        rec = self.engine.store.load(id)
        cls = self.engine.workflows.get(rec.workflow)
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
            checked = admitted(request)
            id = request.path_params["id"] if with_id else None
            snap = await run_in_threadpool(self.start, name, id, checked)
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
            dependencies=self.auth_deps,
        )

    def add_generic_starts(self) -> None:
        """The same starts for any name (hidden: each workflow has its typed operation)."""
        initial = json_body("the declared start input of the workflow", "object")
        started = "the instance, run until it blocks"
        errors = error_docs(*self.write_errors, 404, 409, 503)

        @self.router.post(
            "/workflows/{name}",
            status_code=201,
            response_model=Snapshot,
            openapi_extra=initial,
            response_description=started,
            responses=errors,
            dependencies=self.auth_deps,
            include_in_schema=False,
        )
        def start_generated(name: str, checked: Checked) -> Snapshot:
            return self.start(name, None, checked)

        @self.router.put(
            "/workflows/{name}/{id}",
            status_code=201,
            response_model=Snapshot,
            openapi_extra=initial,
            response_description=started,
            responses=errors,
            dependencies=self.auth_deps,
            include_in_schema=False,
        )
        def start_with_id(name: str, id: str, checked: Checked) -> Snapshot:
            return self.start(name, id, checked)

    # ---------------------------------------------------------------- instances

    def add_instance_routes(self) -> None:
        engine = self.engine

        @self.router.get(
            "/workflows",
            response_model=ListPage,
            operation_id=self.operation_id("list_workflows"),
            summary="List instances in id order",
            responses=error_docs(*self.read_errors, 422, 503),
            tags=["workflows"],
            dependencies=self.auth_deps,
        )
        def list_workflows(
            status: Annotated[InstanceStatus | None, Query()] = None,
            workflow: Annotated[
                str | None, Query(description="a workflow name", max_length=200)
            ] = None,
            cursor: Annotated[
                str | None, Query(description="next_cursor of the last page", max_length=200)
            ] = None,
            limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        ) -> ListPage:
            return engine.list(
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
        def get_workflow(id: IdPath) -> Snapshot:
            return engine.get(id)

        @self.router.post(
            "/workflows/{id}/cancel",
            response_model=Snapshot,
            operation_id=self.operation_id("cancel_workflow"),
            summary="Tear down the awaited events and mark the instance cancelled",
            responses=error_docs(*self.write_errors, 404, 409, 503),
            tags=["workflows"],
            dependencies=self.auth_deps,
        )
        def cancel_workflow(id: IdPath, checked: Checked) -> Snapshot:
            return engine.cancel(id)

        @self.router.post(
            "/workflows/{id}/events/{event}",
            operation_id=self.operation_id("send_event"),
            openapi_extra=json_body("the handler's input (any JSON); empty: no input"),
            summary="Deliver any event; the response is the handler's output",
            description=("403 for the name of a timer: timers fire when due, never on request."),
            response_model=Any,
            responses=error_docs(*self.write_errors, 403, 404, 409, 500, 503),
            tags=["events"],
            dependencies=self.auth_deps,
        )
        def send_event(
            request: Request,
            id: IdPath,
            event: str,
            checked: Checked,
            thread_id: ThreadQuery = None,
            pc: PcQuery = None,
            idempotency_key: KeyHeader = None,
        ) -> Response:
            pc = parse_pc(request.query_params.get("pc"))  # as strict as the typed routes
            return self.deliver(id, event, checked, thread_id, pc, None)

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
            checked = admitted(request)
            pc = parse_pc(request.query_params.get("pc"))
            thread_id = request.query_params.get("thread_id")
            if thread_id is not None and len(thread_id) > 200:
                raise HTTPError(422, "InvalidRequest", "query.thread_id: at most 200 characters")
            return await run_in_threadpool(
                self.deliver, request.path_params["id"], event, checked, thread_id, pc, workflow
            )

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
            dependencies=self.auth_deps,
        )

    # ---------------------------------------------------------------- graphs, health

    def add_graph_routes(self) -> None:
        engine = self.engine

        def class_graph(name: str) -> Graph:
            if name not in engine.workflows:
                raise UnknownWorkflow(name, list(engine.workflows))
            return Graph(workflow=name, mermaid=_mermaid()(engine.workflows[name]))

        @self.router.get(
            "/definitions/{name}/graph",
            response_model=Graph,
            operation_id=self.operation_id("definition_graph"),
            summary="Mermaid diagram of a registered workflow class",
            responses=error_docs(*self.read_errors, 404, 422, 501),
            tags=["graphs"],
            dependencies=self.auth_deps,
        )
        def definition_graph(name: str) -> Graph:
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
        def workflow_graph(name_or_id: str) -> Graph:
            if name_or_id in engine.workflows:
                return class_graph(name_or_id)
            rec = engine.store.load(self.check_id(name_or_id))
            cls = engine.workflows.get(rec.workflow)
            if cls is None:
                raise UnknownWorkflow(rec.workflow, list(engine.workflows))
            wf, state = loads(rec.blob, cls)  # the instance: its data may shape the definition
            return Graph(workflow=rec.workflow, id=rec.id, mermaid=_mermaid()(wf, state))

    def add_health(self) -> None:
        engine = self.engine

        def healthz() -> Health:
            try:
                engine.store.list(limit=1)
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
