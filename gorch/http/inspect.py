"""The inspector: HTML pages of the stored instances at ``/inspect``, for people.

``GET /inspect`` lists instances (filters: workflow, status, text in the id;
pages in id order), ``GET /inspect/instances/{id}`` shows one: its diagram
with the threads' cursors highlighted, its data, the awaited events with
their input schemas, its next wake-up and its history. Nothing is loaded
from elsewhere: the pages carry their own stylesheet and no script (their
Content-Security-Policy allows none), so the inspector works offline.

Who may look: the rule of the other reads (see :mod:`gorch.http`).

* With a token: ``Authorization: Bearer <token>`` (scripts, curl), or, for a
  browser that cannot add a header to a link, a session cookie:
  ``/inspect/login`` is a form that takes the token once (POST, never in a
  URL, so it is in no history or log) and sets ``gorch_inspect``, an
  HttpOnly, SameSite=Strict cookie (Secure over HTTPS) scoped to
  ``/inspect``, valid for ``session_ttl``. The cookie does not hold the
  token: it holds an expiry and an HMAC of it keyed by the token, so it
  opens the inspector only (not the API), expires by itself, and every
  session ends when the token changes. ``POST /inspect/logout`` drops it.
* With a secret and no token: reads are signed, so only a client that signs
  its GETs gets in; a browser cannot (the 401 page says to add a token).
* With neither: the app is open (``insecure``), and so is the inspector.

A request without credentials gets 401 (with the sign-in form), an unknown
instance 404, a bad filter or page parameter 422: HTML pages, never a 500.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from gorch import clock
from gorch.codec import loads
from gorch.engine import EngineCore, InstanceStatus, Summary
from gorch.errors import GorchError, WorkflowNotFound
from gorch.graph import humanize_duration, marks
from gorch.http.auth import Authenticator, Secret
from gorch.http.driver import Driver
from gorch.http.errors import HTTPError, status_for
from gorch.http.inspect_diagram import diagram
from gorch.http.inspect_style import CSS_HASH
from gorch.http.inspect_views import (
    InstanceView,
    Row,
    error_page,
    instance_page,
    list_page,
    login_page,
)
from gorch.http.request import read_body
from gorch.snapshot import snapshot_of
from gorch.stores.base import Record

__all__ = ["COOKIE", "DEFAULT_SESSION_TTL", "create_inspector", "inspector_router"]

log = logging.getLogger("gorch")

COOKIE = "gorch_inspect"
DEFAULT_SESSION_TTL = timedelta(hours=12)
LIMITS = (20, 50, 100, 200)
"""Page sizes offered; any size from 1 to :data:`MAX_LIMIT` is accepted."""
MAX_LIMIT = 500
SCAN_BATCH = 500
SCAN_BUDGET = 10_000
"""A text search reads at most this many instances per page request, then offers the next page."""
_MAX_PARAM = 200
_ID_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")
"""The ids the Engine gives and takes; anything else names no instance."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SESSION = re.compile(r"v1\.([0-9]{1,12})\.([0-9a-f]{64})")
_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; style-src '{CSS_HASH}'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _Access:
    """Who may see the pages: the bearer token, the session cookie, a signature, or anyone."""

    def __init__(self, auth: Authenticator, ttl: timedelta) -> None:
        if ttl <= timedelta(0):
            raise ValueError(f"session_ttl must be positive, got {ttl}")
        self.auth = auth
        self.ttl = ttl

    @property
    def can_login(self) -> bool:
        return self.auth.token is not None

    def _mac(self, expires: str) -> str:
        assert self.auth.token is not None
        message = b"gorch-inspect-v1\n" + expires.encode("ascii")
        return hmac.new(self.auth.token, message, hashlib.sha256).hexdigest()

    def session(self) -> str:
        """A new cookie value: ``v1.<expiry>.<HMAC of it keyed by the token>``."""
        expires = str(int(clock.now().timestamp() + self.ttl.total_seconds()))
        return f"v1.{expires}.{self._mac(expires)}"

    def session_ok(self, value: str) -> bool:
        found = _SESSION.fullmatch(value)
        if found is None or self.auth.token is None:
            return False
        expires, mac = found.groups()
        left = int(expires) - clock.now().timestamp()
        if not 0 < left <= self.ttl.total_seconds() + 60:
            return False
        return hmac.compare_digest(self._mac(expires), mac)

    def token_ok(self, given: str) -> bool:
        if self.auth.token is None:
            return False
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.auth.token)

    def check(self, request: Request) -> bool:
        """Let the request in (True: by the session cookie) or raise 401, as reads are guarded."""
        auth = self.auth
        if auth.token is not None:
            if "authorization" in request.headers:
                auth.check_token(request.headers)
                return False
            if self.session_ok(request.cookies.get(COOKIE, "")):
                return True
            raise HTTPError(
                401,
                "Unauthorized",
                "sign in with the API's bearer token, or send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        if auth.signed:  # only a secret: reads are signed, as on the JSON routes
            auth.verify(request.scope, request.headers, b"")
        return False


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(body, status, headers={**_HEADERS, **(headers or {})})


def _param(request: Request, name: str) -> str:
    """A query parameter ('' when absent): at most 200 characters, no control characters."""
    value = request.query_params.get(name, "")
    if len(value) > _MAX_PARAM:
        raise HTTPError(422, "InvalidRequest", f"{name}: at most {_MAX_PARAM} characters")
    if _CONTROL.search(value):
        raise HTTPError(422, "InvalidRequest", f"{name}: control characters are not allowed")
    return value


def _limit(text: str) -> int:
    if not text:
        return LIMITS[0]
    if not re.fullmatch(r"[0-9]{1,4}", text) or not 1 <= int(text) <= MAX_LIMIT:
        raise HTTPError(
            422, "InvalidRequest", f"limit must be a whole number from 1 to {MAX_LIMIT}"
        )
    return int(text)


Endpoint = Callable[[Request], Awaitable[Response]]


class _Inspector:
    def __init__(self, driver: Driver, access: _Access) -> None:
        self.driver = driver
        self.access = access

    # ------------------------------------------------------------------ plumbing

    def page(self, endpoint: Callable[[Request, bool], Awaitable[Response]]) -> Endpoint:
        """Check who asks, run ``endpoint``, answer every refusal or failure as a page."""

        async def serve(request: Request) -> Response:
            by_cookie = False
            try:
                by_cookie = self.access.check(request)
                return await endpoint(request, by_cookie)
            except HTTPError as e:
                if e.status == 401:
                    return self.unauthorized(request, e)
                return self.error(request, by_cookie, e.status, e.error, e.detail, e.headers)
            except GorchError as e:
                status = status_for(e)
                if status >= 500:
                    log.error("gorch.http: inspector: %s: %s", type(e).__name__, e, exc_info=e)
                headers = {"Retry-After": "1"} if status == 503 else None
                return self.error(request, by_cookie, status, type(e).__name__, str(e), headers)
            except Exception as e:  # a bug: a page, no internals (the log has the traceback)
                log.exception("gorch.http: inspector failed on %s", request.url.path)
                detail = f"unexpected {type(e).__name__}; the server log has the details"
                return self.error(request, by_cookie, 500, "InternalServerError", detail)

        return serve

    def error(
        self,
        request: Request,
        logout: bool,
        status: int,
        error: str,
        detail: str,
        headers: dict[str, str] | None = None,
    ) -> Response:
        body = error_page(
            base=_base(request), logout=logout, status=status, error=error, detail=detail
        )
        return _html(body, status, headers)

    def unauthorized(self, request: Request, e: HTTPError, message: str = "") -> Response:
        why = (
            "This app checks signatures on every request and has no token, so a browser "
            "cannot sign in. Serve it with a token too (create_app(..., token=...) or "
            "gorch serve --token-env VAR) to use the inspector in a browser."
        )
        body = login_page(
            base=_base(request),
            can_login=self.access.can_login,
            message=message or (e.detail if self.access.can_login else ""),
            why=why,
            ttl=humanize_duration(self.access.ttl),
        )
        headers = dict(e.headers)
        headers.setdefault("WWW-Authenticate", "Bearer")
        return _html(body, 401, headers)

    # ------------------------------------------------------------------ the list

    async def list(self, request: Request, logout: bool) -> Response:
        workflow = _param(request, "workflow")
        status = _param(request, "status")
        q = _param(request, "q").strip()
        after = _param(request, "after")
        limit = _limit(_param(request, "limit"))
        if status and status not in {s.value for s in InstanceStatus}:
            known = ", ".join(s.value for s in InstanceStatus)
            raise HTTPError(422, "InvalidRequest", f"status {status!r} is none of: {known}")
        items, next_after, scanned = await self.rows(
            workflow or None, status or None, q, limit, after or None
        )
        base = _base(request)
        query = {"workflow": workflow, "status": status, "q": q}
        if limit != LIMITS[0]:
            query["limit"] = str(limit)

        def href(after: str | None) -> str:
            params = {k: v for k, v in {**query, "after": after or ""}.items() if v}
            return f"{base}/inspect" + (f"?{urlencode(params)}" if params else "")

        rows = [Row(item, f"{base}/inspect/instances/{quote(item.id, safe='')}") for item in items]
        body = list_page(
            base=base,
            logout=logout,
            workflows=sorted(self.driver.workflows),
            workflow=workflow,
            status=status,
            q=q,
            limit=limit,
            limits=sorted({*LIMITS, limit}),
            rows=rows,
            first_href=href(None) if after else None,
            next_href=href(next_after) if next_after else None,
            scanned=scanned,
        )
        return _html(body)

    async def rows(
        self, workflow: str | None, status: str | None, q: str, limit: int, after: str | None
    ) -> tuple[Sequence[Summary], str | None, int]:
        """One page of instances: the items, where the next page starts, how many were read.

        Without ``q`` this is one ``list`` call. With it, pages are read and
        filtered on the id (case-insensitive) until ``limit`` match or
        :data:`SCAN_BUDGET` instances were read; the next page goes on from there.
        """
        if not q:
            page = await self.driver.list(
                workflow=workflow, status=status, limit=limit, after=after
            )
            return page.items, page.next_cursor, 0
        needle = q.casefold()
        found: list[Summary] = []
        scanned = 0
        while True:
            page = await self.driver.list(
                workflow=workflow, status=status, limit=SCAN_BATCH, after=after
            )
            for i, item in enumerate(page.items):
                scanned += 1
                if needle in item.id.casefold():
                    found.append(item)
                    if len(found) == limit:
                        last = i == len(page.items) - 1 and page.next_cursor is None
                        return found, None if last else item.id, scanned
            if page.next_cursor is None or not page.items:
                return found, None, scanned
            after = page.items[-1].id
            if scanned >= SCAN_BUDGET:
                return found, after, scanned

    # ------------------------------------------------------------------ one instance

    async def instance(self, request: Request, logout: bool) -> Response:
        id = request.path_params["id"]
        if not _ID_PATH.fullmatch(id):
            raise WorkflowNotFound(id)  # no stored instance has such an id
        rec = await self.driver.load(id)
        view = await run_in_threadpool(self.view_of, rec)
        try:
            view.history = await self.driver.history(id)
        except GorchError as e:
            view.history_problem = f"{type(e).__name__}: {e}"
        base = _base(request)
        body = instance_page(view, base=base, logout=logout, list_href=f"{base}/inspect")
        return _html(body)

    def view_of(self, rec: Record) -> InstanceView:
        """The snapshot and the diagram of a record; what cannot be read is said, not raised."""
        view = InstanceView(rec.id, rec.workflow, rec.status)
        cls = self.driver.workflows.get(rec.workflow)
        if cls is None:
            view.diagram_problem = f"workflow {rec.workflow!r} is not registered in this app"
            view.problems.append(
                f"This instance's workflow {rec.workflow!r} is not registered here "
                f"(known: {', '.join(sorted(self.driver.workflows)) or 'none'})."
            )
            return view
        try:
            wf, state = loads(rec.blob, cls)
        except GorchError as e:
            view.diagram_problem = "the stored state does not load"
            view.problems.append(f"The stored state does not load: {type(e).__name__}: {e}")
            return view
        view.snap = snapshot_of(rec, wf, state)
        try:
            view.diagram = diagram(marks(wf, state))
        except GorchError as e:
            view.diagram_problem = f"{type(e).__name__}: {e}"
        return view

    async def missing(self, request: Request, logout: bool) -> Response:
        raise HTTPError(404, "NotFound", f"the inspector has no page {request.url.path!r}")

    # ------------------------------------------------------------------ signing in

    async def login_form(self, request: Request) -> Response:
        e = HTTPError(401, "Unauthorized", "")
        response = self.unauthorized(request, e)
        response.status_code = 200
        return response

    async def login(self, request: Request) -> Response:
        base = _base(request)
        try:
            self.same_site(request)
            if not self.access.can_login:
                raise HTTPError(
                    404, "NotFound", "this app has no token, so there is nothing to sign in with"
                )
            kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind != "application/x-www-form-urlencoded":
                raise HTTPError(415, "UnsupportedMediaType", "send the sign-in form")
            body = await read_body(request.headers, request.receive, 4096)
            if body is None:
                return Response(status_code=400)
            try:
                form = parse_qs(body.decode("utf-8"), max_num_fields=5)
            except (UnicodeDecodeError, ValueError) as e:
                raise HTTPError(400, "InvalidRequest", f"the form does not parse: {e}") from e
            given = (form.get("token") or [""])[-1]
            if not given or not self.access.token_ok(given):
                refused = HTTPError(401, "Unauthorized", "")
                return self.unauthorized(request, refused, "That is not the token.")
        except HTTPError as e:
            return self.error(request, False, e.status, e.error, e.detail, e.headers)
        response = RedirectResponse(f"{base}/inspect", 303, headers=_HEADERS)
        response.set_cookie(
            COOKIE,
            self.access.session(),
            max_age=int(self.access.ttl.total_seconds()),
            path=f"{base}/inspect",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        base = _base(request)
        try:
            self.same_site(request)
        except HTTPError as e:
            return self.error(request, False, e.status, e.error, e.detail, e.headers)
        response = RedirectResponse(f"{base}/inspect/login", 303, headers=_HEADERS)
        response.delete_cookie(COOKIE, path=f"{base}/inspect", httponly=True, samesite="strict")
        return response

    @staticmethod
    def same_site(request: Request) -> None:
        """403 for a form posted from another site (browsers say so in ``Sec-Fetch-Site``)."""
        if request.headers.get("sec-fetch-site", "same-origin") == "cross-site":
            raise HTTPError(403, "Forbidden", "a sign-in form posted from another site")


def inspector_router(
    driver: Driver, auth: Authenticator, *, session_ttl: timedelta = DEFAULT_SESSION_TTL
) -> APIRouter:
    """The inspector's routes for an engine already driven (``create_app`` shares its own)."""
    inspector = _Inspector(driver, _Access(auth, session_ttl))
    router = APIRouter()
    routes: list[tuple[str, Endpoint, str]] = [
        ("/inspect", inspector.page(inspector.list), "GET"),
        ("/inspect/instances/{id}", inspector.page(inspector.instance), "GET"),
        ("/inspect/login", inspector.login_form, "GET"),
        ("/inspect/login", inspector.login, "POST"),
        ("/inspect/logout", inspector.logout, "POST"),
        ("/inspect/{rest:path}", inspector.page(inspector.missing), "GET"),
    ]
    for path, endpoint, method in routes:
        router.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
    return router


def create_inspector(
    engine: EngineCore,
    *,
    token: str | None = None,
    secret: Secret | Sequence[Secret] | None = None,
    signature_tolerance: float = 300.0,
    session_ttl: timedelta | float = DEFAULT_SESSION_TTL,
) -> APIRouter:
    """The inspector as an ``APIRouter``, for an application that includes ``create_router``.

    Give it the same ``token`` and ``secret`` as the router. ``create_app``
    serves it already (``inspector=False`` leaves it out).
    """
    ttl = session_ttl if isinstance(session_ttl, timedelta) else timedelta(seconds=session_ttl)
    auth = Authenticator(token=token, secret=secret, tolerance=signature_tolerance)
    return inspector_router(Driver(engine), auth, session_ttl=ttl)
