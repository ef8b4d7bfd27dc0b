"""Drive an :class:`gorch.Engine` over HTTP with FastAPI: webhooks in, snapshots out.

``create_app(engine, secret=..., token=...)`` returns a FastAPI app; serve it
alone (``gorch serve --app module:engine``) or mount it
(``parent.mount("/gorch", create_app(engine, ...))``). ``create_router``
returns the same routes as an ``APIRouter`` for an application's own app, so
they appear in its ``/docs``. ``status_for`` and ``gorch_error_handler`` map
gorch errors to HTTP answers in an application's own endpoints.

Routes
    ``POST /workflows/{workflow}``              start an instance with a generated id (201)
    ``PUT  /workflows/{workflow}/{id}``         start an instance with this id (201; 409 if taken)
    ``GET  /workflows/{id}``                    snapshot: data, status, threads, awaited events
                                                (with their input JSON schema), next wake-up
    ``GET  /workflows?status=&workflow=&cursor=&limit=``   one page of instances
    ``POST /workflows/{workflow}/{id}/events/{event}``  one documented operation per event
                                                a definition can await (operationId
                                                ``{workflow}_{event}``), typed from its handler
    ``POST /workflows/{id}/events/{event}``     deliver any event (``?thread_id=&pc=``)
    ``POST /workflows/{id}/cancel``             cancel an instance
    ``GET  /definitions/{name}/graph``          Mermaid diagram of a workflow class
    ``GET  /workflows/{name_or_id}/graph``      a registered workflow name first, else an
                                                instance id (the diagram marks its cursors)
    ``GET  /healthz``                           the store answers (200) or not (503)
    ``GET  /inspect``                           the inspector: HTML pages for people (list,
    ``GET  /inspect/instances/{id}``            one instance), behind the token's sign-in

Start input. A start's body is validated against what the workflow declares
(``start_input = ("field", ...)``, see :class:`gorch.Workflow`) and nothing
else: any other field, internal state included, is a 422. A workflow that
declares nothing takes an empty body (or ``{}``) only.

Events. An event's body is the handler's input (empty = no input); the
response is the handler's output as JSON, exactly as the handler returned it.
A ``Timeout``'s name is refused (403 ``TimerNotSendable``): timers fire when
due. ``Idempotency-Key`` (1-255 printable ASCII) on starts and events makes a
retry apply nothing twice: the repeat answers as the first time did.

Who may call (checked before the store is touched)
    With ``secret``: every POST/PUT must be signed (see :mod:`gorch.http.auth`
    and :func:`sign`); a signed request needs nothing else, so a webhook
    sender that cannot add headers of its own still gets through. With
    ``token``: every other route but ``/healthz`` needs ``Authorization:
    Bearer <token>``: the reads, and the docs (``/docs``, ``/openapi.json``)
    unless ``public_docs=True``; without a secret, the writes too. With a
    secret and no token, reads must be signed as well. So an unauthenticated
    caller sees ``/healthz`` only. With neither, the app is open to anyone
    who can reach it and says so in the log (``insecure=True`` acknowledges
    it).

Errors are ``{"error": <name>, "detail": <message>, ...facts}``: gorch errors
keep their class name (``WorkflowNotFound``, ``EventNotFound`` with the
``awaited`` list, ...); HTTP-level ones are ``Unauthorized``,
``InvalidSignature``, ``SignatureExpired`` (401), ``ReplayedRequest`` (409),
``MalformedJSON`` (400), ``PayloadTooLarge`` (413), ``UnsupportedMediaType``
(415), ``InvalidRequest`` (422: a bad parameter, or JSON gorch cannot hold),
``NotFound``, ``MethodNotAllowed`` (405, with ``Allow``). Every error leaves
the store as it was. A step failing in the resume after an event does not fail
the event's request (200): the event was delivered and saved.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import standardwebhooks  # noqa: F401
    import swagger_ui_bundle  # noqa: F401
except ImportError as e:  # pragma: no cover - checked in a subprocess without FastAPI
    raise ImportError(
        f"gorch.http needs FastAPI ({e}); install it with: pip install 'gorch[http]'",
        name=e.name,
    ) from e

from gorch.http.app import create_app
from gorch.http.auth import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)
from gorch.http.errors import ErrorBody, gorch_error_handler, status_for
from gorch.http.routes import DEFAULT_MAX_BODY, create_router
from gorch.http.schemas import Graph, Health

__all__ = [
    "DEFAULT_MAX_BODY",
    "IDEMPOTENCY_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "ErrorBody",
    "Graph",
    "Health",
    "create_app",
    "create_router",
    "gorch_error_handler",
    "sign",
    "status_for",
]
