"""``create_app``: the gorch routes as a FastAPI app of their own, with offline docs.

On top of :func:`gorch.http.create_router` the app adds what only a whole
app can: the OpenAPI document and Swagger UI (its assets served from the
``swagger-ui-bundle`` package, so ``/docs`` works without internet), JSON
answers for unknown routes and methods (a 405 lists every allowed method in
``Allow``), and routing of ``%2F`` inside an id as part of the id.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gorch import __version__
from gorch.engine import EngineCore
from gorch.errors import GorchError
from gorch.http.auth import Secret
from gorch.http.errors import (
    HTTPError,
    internal_error_response,
    json_error,
    known_error_response,
)
from gorch.http.inspect import inspector_router
from gorch.http.routes import DEFAULT_MAX_BODY, GorchRoute, create_router

_ASSETS = Path(swagger_ui_bundle.swagger_ui_path)
_ASSET_NAMES = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"})

_DESCRIPTION = """\
Long-running workflows driven over HTTP.

* **Start** an instance with `POST /workflows/{workflow}` (or `PUT` with your id);
  the body is what the workflow declares as its start input (`start_input`),
  nothing else.
* **Send events** with the operation of each event (typed from its handler), or
  `POST /workflows/{id}/events/{event}` for any event. The body is the handler's
  input; the response is the handler's output, as JSON. Pass `?pc=` (from the
  snapshot's `awaited` list) to refuse a replay aimed at a wait that is over, and
  an `Idempotency-Key` header so that a retry applies nothing twice. Timers are
  never sent: they fire when due.
* **Errors** are `{"error": name, "detail": message, ...}`: 401 missing token or
  bad signature, 403 a timer's name sent as an event, 404 unknown instance or
  workflow, 409 event not awaited (with the `awaited` list), stale, ambiguous,
  instance not active, or a replayed signature, 422 invalid input, data, id or
  key, 503 store unavailable or instance busy (retry after `Retry-After`).
  Refused requests change nothing.
* **Security** (when configured): with a secret, every POST and PUT is signed:
  `X-Gorch-Signature: v1=<hex>` and `X-Gorch-Timestamp` (HMAC-SHA256 of method,
  path, query, timestamp, Idempotency-Key and body; see `gorch.http.sign`), or
  Standard Webhooks headers; each signature is accepted once. With a token,
  `Authorization: Bearer <token>` on every other route but `/healthz` (reads,
  docs; writes too when there is no secret). With a secret and no token, reads
  are signed too. Without credentials only `/healthz` answers.
* **Inspector**: HTML pages for people at `/inspect` (instances, one instance's
  diagram, data, awaited events and history), behind the same token; a browser
  signs in once at `/inspect/login` and keeps an HttpOnly session cookie.
"""


class _EncodedSlashes:
    """ASGI middleware: route ``a%2Fb`` as one path segment, as sent, instead of two.

    Starlette matches routes on the decoded path, so an id like ``..%2F..``
    would otherwise be split into segments and never reach the id check.
    """

    _ENCODED_SLASH = re.compile(r"%2[fF]")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if raw and self._ENCODED_SLASH.search(raw.decode("latin-1")):
            segments = raw.decode("latin-1").partition("?")[0].split("/")
            path = "/".join(
                "%2F".join(unquote(p) for p in self._ENCODED_SLASH.split(s)) for s in segments
            )
            scope = {**scope, "path": path}
        await self.app(scope, receive, send)


def _routes_at(routes: Sequence[BaseRoute], scope: Scope) -> list[BaseRoute]:
    """The routes whose path matches this request's (whatever their methods)."""
    return [r for r in routes if r.matches({**scope, "method": "\0"})[0] is Match.PARTIAL]


def _allowed_methods(routes: Sequence[BaseRoute]) -> list[str]:
    """The methods of a path's ``routes`` (for ``Allow``), as the OpenAPI document lists them.

    As in OpenAPI, a path with more literal segments wins over a templated
    one (``/workflows/order`` is the workflow's start, not an instance id),
    and the hidden fallback routes (starts by any name) are not listed.
    """
    found: dict[int, set[str]] = {}
    for route in routes:
        if getattr(route, "fallback", False):
            continue
        path = str(getattr(route, "path", ""))
        literal = sum(1 for segment in path.split("/") if segment and "{" not in segment)
        found.setdefault(literal, set()).update(getattr(route, "methods", None) or ())
    return sorted(found[max(found)]) if found else []


def create_app(
    engine: EngineCore,
    *,
    secret: Secret | Sequence[Secret] | None = None,
    token: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    signature_tolerance: float = 300.0,
    docs: bool = True,
    public_docs: bool = False,
    insecure: bool = False,
    title: str = "gorch",
    inspector: bool = True,
) -> FastAPI:
    """A FastAPI app serving ``engine``'s workflows; see :mod:`gorch.http` for the rules.

    ``docs`` serves ``/docs`` and ``/openapi.json``; they are guarded like
    every route (token, or signature with only a secret) unless
    ``public_docs=True``. Without ``secret`` and ``token`` the app is open to
    anyone who can reach it and logs a warning, unless ``insecure=True``
    says that is intended. ``engine`` is a :class:`gorch.Engine`, whose
    blocking calls run in the threadpool, never on the event loop, or an
    engine whose methods are coroutines (``gorch.AsyncEngine``), awaited on
    the loop. ``inspector`` serves the HTML pages of :mod:`gorch.http.inspect`
    at ``/inspect``, guarded like the other reads.
    """
    router = create_router(
        engine,
        secret=secret,
        token=token,
        max_body=max_body,
        signature_tolerance=signature_tolerance,
        insecure=insecure,
    )
    app = FastAPI(
        title=title,
        version=__version__,
        description=_DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(router)
    route_class: type[GorchRoute] = router.route_class  # type: ignore[assignment]
    gate = route_class.gate
    if docs:
        _add_docs(app, route_class, public_docs)
    if inspector:
        app.include_router(inspector_router(gate.driver, gate.auth))

    async def not_routed(request: Request, exc: Exception) -> Response:
        """Unknown route or method: the caller still has to show the token (or signature).

        Except on a public path (``/healthz``): anyone may learn its methods.
        """
        assert isinstance(exc, StarletteHTTPException)
        routes = [r for r in (*router.routes, *app.routes) if isinstance(r, Route)]
        here = _routes_at(routes, request.scope) if exc.status_code == 405 else []
        public = bool(here) and all(getattr(r, "public", False) for r in here)
        if exc.status_code in (404, 405) and not public:
            try:
                if await gate.authenticate(request) is None:
                    return Response(status_code=400)
            except HTTPError as e:
                return e.response()
        if exc.status_code == 405:
            allow = ", ".join(_allowed_methods(here))
            detail = f"{request.method} is not allowed here; allowed: {allow}"
            return json_error(
                {"error": "MethodNotAllowed", "detail": detail}, 405, {"Allow": allow}
            )
        response = known_error_response(exc)
        assert response is not None
        return response

    async def known(_request: Request, exc: Exception) -> Response:
        response = known_error_response(exc)
        if response is None:  # pragma: no cover - registered for known types only
            raise exc
        return response

    app.add_exception_handler(StarletteHTTPException, not_routed)
    app.add_exception_handler(GorchError, known)
    app.add_exception_handler(HTTPError, known)
    app.add_exception_handler(RequestValidationError, known)
    app.add_exception_handler(Exception, internal_error_response)
    app.add_middleware(_EncodedSlashes)
    return app


def _add_docs(app: FastAPI, route_class: type[GorchRoute], public: bool) -> None:
    """``/openapi.json``, ``/docs`` and Swagger UI's assets, from the installed bundle."""
    cls: type[GorchRoute] = route_class
    if public:
        cls = type("PublicDocsRoute", (route_class,), {"public": True})

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def openapi(request: Request) -> JSONResponse:
        document: dict[str, Any] = dict(app.openapi())
        prefix = root(request)
        if prefix:
            document["servers"] = [{"url": prefix}]
        return JSONResponse(document)

    def swagger(request: Request) -> Response:
        prefix = root(request)
        return get_swagger_ui_html(
            openapi_url=f"{prefix}/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{prefix}/docs/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}/docs/assets/swagger-ui.css",
            swagger_favicon_url=f"{prefix}/docs/assets/favicon-32x32.png",
            oauth2_redirect_url=None,
        )

    def asset(name: str) -> Response:
        if name not in _ASSET_NAMES:
            raise HTTPError(404, "NotFound", f"no docs asset {name!r}")
        return FileResponse(_ASSETS / name)

    for path, endpoint in (
        ("/openapi.json", openapi),
        ("/docs", swagger),
        ("/docs/assets/{name}", asset),
    ):
        app.router.add_api_route(
            path,
            endpoint,
            methods=["GET"],
            include_in_schema=False,
            route_class_override=cls,
        )
