"""The HTTP examples: each runs as a script and tells its story, and each serves its ``app``.

The scripts run in a temporary directory and must write nothing there (they
keep their store in a throw-away file). The in-process tests import each
example from its file, with ``GORCH_STORE`` pointing at a temporary SQLite
file, and drive the module's own ``app`` over HTTP.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gorch.clock import use_clock
from gorch.http import IDEMPOTENCY_HEADER, sign

with warnings.catch_warnings():  # newer Starlette warns that its TestClient moves to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECRET = "test-secret"
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def run_script(name: str, tmp_path: Path) -> str:
    """Run ``examples/<name>`` in an empty directory; return its stdout."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "GORCH_STORE": f"sqlite:///{tmp_path}/unused.db"}
    env.pop("GORCH_SECRET", None)
    env.pop("GORCH_TOKEN", None)
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(cwd.iterdir()) == [], "the demo wrote files in the current directory"
    return done.stdout


def assert_in_order(out: str, *expected: str) -> None:
    """Each of ``expected`` occurs in ``out``, after the previous one."""
    at = 0
    for text in expected:
        found = out.find(text, at)
        assert found >= 0, f"{text!r} not found after position {at} in:\n{out}"
        at = found + len(text)


@pytest.fixture
def load_example(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Import an example from its file, its module-level engine on a temporary SQLite file."""
    loaded: list[ModuleType] = []

    def load(name: str, *, secret: str | None = None, token: str | None = None) -> ModuleType:
        monkeypatch.setenv("GORCH_STORE", f"sqlite:///{tmp_path}/{name}.db")
        for var, value in (("GORCH_SECRET", secret), ("GORCH_TOKEN", token)):
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, value)
        module_name = f"gorch_example_{name}"
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, module_name, module)  # pydantic resolves names there
        spec.loader.exec_module(module)
        loaded.append(module)
        assert module.engine.store.url == f"sqlite:///{tmp_path}/{name}.db"
        return module

    yield load
    for module in loaded:
        module.engine.store.close()


# --------------------------------------------------------------------------- approval_webhook


def test_approval_script_tells_the_whole_story(tmp_path: Path) -> None:
    out = run_script("approval_webhook.py", tmp_path)
    assert_in_order(
        out,
        "== 1. Bob files an expense",
        "> PUT /workflows/expense/exp-1",
        "< 201 exp-1 (version 2): waiting, awaits decide, escalate",
        "> GET /workflows/exp-1",
        "awaits 'decide' (pc 1) with input {approved: boolean, by: string, comment?: string}",
        "awaits 'escalate' (pc 1), a timer due",
        "< 401 InvalidSignature",
        "< 401 InvalidSignature",
        "the badly signed requests changed nothing: True (version 2)",
        "> POST /workflows/expense/exp-1/events/decide",
        '< 200 {"status": "approved", "decided_by": "ann"}',
        "< 409 ReplayedRequest",
        "finished",
        "log: paid 120.00 to bob, approved by ann",
        "== 2. Carol files an expense; nobody answers for three days",
        "3 days later, run_due: exp-2 fired ['escalate'] -> waiting",
        "expense status='escalated'",
        "awaits 'decide' (pc 2)",
        "escalated to diana",
        '< 200 {"status": "rejected", "decided_by": "diana"}',
        "expense status='refused'",
        "log: told carol: rejected by diana (over budget)",
    )
    assert "Traceback" not in out


def approval_client(load_example: Any) -> tuple[ModuleType, TestClient]:
    module = load_example("approval_webhook", secret=SECRET, token=TOKEN)
    return module, TestClient(module.app, headers=AUTH)  # reads show the token


def signed_post(c: TestClient, path: str, data: Any, method: str = "POST") -> Any:
    body = json.dumps(data).encode()
    headers = {"Content-Type": "application/json", **sign(SECRET, method, path, body)}
    return c.request(method, path, content=body, headers=headers)


def test_approval_app_takes_a_signed_decision(load_example: Any) -> None:
    module, c = approval_client(load_example)
    r = signed_post(c, "/workflows/expense/e-1", {"requester": "bob", "amount": 50}, "PUT")
    assert r.status_code == 201, r.text
    snap = c.get("/workflows/e-1").json()  # GETs show the token, not a signature
    assert snap["status"] == "waiting"
    decide = next(e for e in snap["awaited"] if e["name"] == "decide")
    assert decide["input_schema"]["required"] == ["approved", "by"]
    assert [e["name"] for e in snap["awaited"]] == ["decide", "escalate"]

    # The example's own helper signs like gorch.http.sign.
    body = b'{"approved": true, "by": "ann", "comment": "ok"}'
    path = "/workflows/expense/e-1/events/decide"
    for target in (path, path + "?pc=1"):
        ours = module.sign("POST", target, body, SECRET, timestamp=1_700_000_000)
        theirs = sign(SECRET, "POST", target, body, timestamp=1_700_000_000)
        assert ours["X-Gorch-Signature"] == theirs["X-Gorch-Signature"]
    r = c.post(path, content=body, headers=module.sign("POST", path, body))
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "approved", "decided_by": "ann"}

    snap = c.get("/workflows/e-1").json()
    assert snap["status"] == "finished"
    assert snap["data"]["status"] == "paid"
    assert snap["data"]["comment"] == "ok"


MALLORY = b'{"approved": true, "by": "mallory"}'
DECIDE = "/workflows/expense/e-1/events/decide"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        AUTH,
        {"X-Gorch-Signature": "v1=" + "0" * 64, "X-Gorch-Timestamp": str(int(time.time()))},
        sign("another-secret", "POST", DECIDE, MALLORY),
        sign(SECRET, "POST", "/workflows/expense/e-2/events/decide", MALLORY),
        sign(SECRET, "PUT", DECIDE, MALLORY),
        sign(SECRET, "POST", DECIDE + "?pc=1", MALLORY),
        sign(SECRET, "POST", DECIDE, MALLORY, timestamp=int(time.time()) - 3600),
    ],
    ids=[
        "unsigned",
        "token-only",
        "wrong-digest",
        "wrong-secret",
        "other-path",
        "other-method",
        "other-query",
        "an-hour-old",
    ],
)
def test_approval_app_refuses_unsigned_decisions(
    load_example: Any, headers: dict[str, str]
) -> None:
    module, c = approval_client(load_example)
    signed_post(c, "/workflows/expense/e-1", {"requester": "bob", "amount": 50}, "PUT")
    before = module.engine.store.load("e-1")
    r = c.post(
        DECIDE,
        content=MALLORY,
        headers={"Content-Type": "application/json", **headers},
    )
    assert r.status_code == 401
    assert r.json()["error"] in {"InvalidSignature", "SignatureExpired"}
    after = module.engine.store.load("e-1")
    assert (after.blob, after.version, after.status) == (before.blob, before.version, before.status)
    # An unsigned start is refused too, and creates nothing.
    r = c.put("/workflows/expense/e-2", json={"requester": "eve", "amount": 1})
    assert r.status_code == 401
    assert c.get("/workflows/e-2").status_code == 404


def test_approval_app_reads_need_the_token_and_starts_take_the_declared_input(
    load_example: Any,
) -> None:
    module, c = approval_client(load_example)
    signed_post(c, "/workflows/expense/e-1", {"requester": "bob", "amount": 50}, "PUT")
    before = module.engine.store.load("e-1")
    anonymous = TestClient(module.app)
    assert anonymous.get("/workflows/e-1").status_code == 401
    assert anonymous.get("/workflows").status_code == 401
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    r = signed_post(
        c, "/workflows/expense/e-2", {"requester": "eve", "amount": 1, "status": "paid"}, "PUT"
    )
    assert r.status_code == 422 and r.json()["error"] == "InvalidWorkflowData"
    r = signed_post(c, "/workflows/e-1/events/escalate", None)  # a timer is never sent
    assert r.status_code == 403 and r.json()["error"] == "TimerNotSendable"
    assert c.get("/workflows/e-2").status_code == 404
    assert module.engine.store.load("e-1") == before


def test_approval_app_escalates_to_the_director_after_three_days(load_example: Any) -> None:
    module, c = approval_client(load_example)
    data = {"requester": "carol", "amount": 990, "manager": "ann", "director": "diana"}
    signed_post(c, "/workflows/expense/e-1", data, "PUT")
    assert module.engine.run_due() == []  # nothing is due yet

    later = datetime.now(UTC) + timedelta(days=3, minutes=1)
    with use_clock(lambda: later):
        results = module.engine.run_due()
    assert [(r.id, r.fired, r.status) for r in results] == [("e-1", ["escalate"], "waiting")]

    snap = c.get("/workflows/e-1").json()
    assert snap["data"]["status"] == "escalated"
    assert [(e["name"], e["pc"]) for e in snap["awaited"]] == [("decide", 2)]
    assert snap["threads"][0]["cur_step"] == "director decision"

    # The manager's wait is over: a decision aimed at its pc is stale.
    r = signed_post(c, "/workflows/expense/e-1/events/decide?pc=1", {"approved": True, "by": "ann"})
    assert r.status_code == 409
    assert r.json()["error"] == "StaleEvent"

    r = signed_post(c, "/workflows/e-1/events/decide?pc=2", {"approved": True, "by": "diana"})
    assert r.status_code == 200, r.text
    snap = c.get("/workflows/e-1").json()
    assert snap["status"] == "finished"
    assert snap["data"]["status"] == "paid"
    assert snap["data"]["decided_by"] == "diana"


def test_approval_app_validates_the_decision(load_example: Any) -> None:
    module, c = approval_client(load_example)
    signed_post(c, "/workflows/expense/e-1", {"requester": "bob", "amount": 50}, "PUT")
    before = module.engine.store.load("e-1")
    r = signed_post(c, "/workflows/expense/e-1/events/decide", {"approved": "maybe"})
    assert r.status_code == 422
    assert r.json()["error"] == "InvalidEventInput"
    assert module.engine.store.load("e-1").blob == before.blob


# --------------------------------------------------------------------------- pizza


def test_pizza_script_tells_the_whole_story(tmp_path: Path) -> None:
    out = run_script("pizza.py", tmp_path)
    assert_in_order(
        out,
        "== 1. Ann orders three pizzas",
        "> PUT /workflows/pizza/order-1",
        "< 201 order-1: waiting, order 'cart'",
        "awaits add_item, checkout, cart_timeout",
        '< 200 {"items": 1, "total": 17.0}',
        "< 422 InvalidEventInput",
        '< 200 {"items": 2, "total": 27.0}',
        "> POST /workflows/pizza/order-1/events/checkout",
        '< 200 {"status": "confirming", "total": 27.0}',
        "< 409 EventNotFound",
        "> POST /workflows/pizza/order-1/events/confirm",
        "thread _main_: waiting_event at 'delivery'",
        "thread payment: waiting_event at 'await payment'",
        "> POST /workflows/pizza/order-1/events/delivered",
        "thread _main_: waiting_condition at 'payment done'",
        '< 200 {"paid": 20.0, "due": 7.0}',
        '< 200 {"paid": 27.0, "due": 0.0}',
        "order-1: finished, order 'closed', total 27.00, paid 27.00",
        "log: cooked 2 x margherita, 1 x pepperoni; out for delivery",
        "log: order closed: 27.00 paid in full",
        "== 2. Bob fills a cart and leaves",
        "24 h later, run_due: order-2 fired ['cart_timeout'] -> finished",
        "order-2: finished, order 'abandoned'",
        "log: cart abandoned: no activity for 24 hours",
        "< 409 WorkflowFinishedError",
    )
    assert "Traceback" not in out


def pizza_client(load_example: Any) -> tuple[ModuleType, TestClient]:
    module = load_example("pizza")
    return module, TestClient(module.app)


def send(c: TestClient, id: str, event: str, data: Any = None) -> Any:
    r = c.post(f"/workflows/pizza/{id}/events/{event}", json=data)
    assert r.status_code == 200, r.text
    return r.json()


def test_pizza_app_runs_an_order_to_the_end(load_example: Any) -> None:
    _, c = pizza_client(load_example)
    r = c.put("/workflows/pizza/o-1", json={"customer": "ann", "address": "1 Main St"})
    assert r.status_code == 201, r.text

    assert send(c, "o-1", "checkout")["status"] == "cart"  # an empty cart stays open
    assert send(c, "o-1", "add_item", {"pizza": "margherita", "qty": 2}) == {
        "items": 1,
        "total": 17.0,
    }
    assert send(c, "o-1", "add_item", {"pizza": "pepperoni"})["total"] == 27.0
    assert send(c, "o-1", "checkout") == {"status": "confirming", "total": 27.0}
    send(c, "o-1", "confirm", {"by": "luigi"})

    snap = c.get("/workflows/o-1").json()
    assert sorted(e["name"] for e in snap["awaited"]) == ["delivered", "paid"]
    paid = next(e for e in snap["awaited"] if e["name"] == "paid")
    assert paid["thread_id"] == "payment"
    assert paid["input_schema"]["required"] == ["amount"]

    assert send(c, "o-1", "paid", {"amount": 27.0}) == {"paid": 27.0, "due": 0.0}
    send(c, "o-1", "delivered", {"courier": "mario"})
    snap = c.get("/workflows/o-1").json()
    assert snap["status"] == "finished"
    assert snap["data"]["status"] == "closed"
    assert snap["threads"] == []


def test_pizza_app_waits_for_payment_after_delivery(load_example: Any) -> None:
    _, c = pizza_client(load_example)
    c.put("/workflows/pizza/o-1", json={"customer": "ann"})
    send(c, "o-1", "add_item", {"pizza": "quattro formaggi"})
    send(c, "o-1", "checkout")
    send(c, "o-1", "confirm", {"by": "luigi"})
    send(c, "o-1", "delivered", {"courier": "mario"})

    snap = c.get("/workflows/o-1").json()
    assert snap["status"] == "waiting"
    main = next(t for t in snap["threads"] if t["id"] == "_main_")
    assert (main["status"], main["cur_step"]) == ("waiting_condition", "payment done")

    # The generic event route delivers too.
    r = c.post("/workflows/o-1/events/paid", json={"amount": 5.0, "method": "cash"})
    assert r.json() == {"paid": 5.0, "due": 6.5}
    assert c.get("/workflows/o-1").json()["status"] == "waiting"
    send(c, "o-1", "paid", {"amount": 6.5})
    snap = c.get("/workflows/o-1").json()
    assert (snap["status"], snap["data"]["status"]) == ("finished", "closed")


def test_pizza_app_refuses_what_the_order_does_not_await(load_example: Any) -> None:
    module, c = pizza_client(load_example)
    c.put("/workflows/pizza/o-1", json={"customer": "ann"})
    before = module.engine.store.load("o-1")
    r = c.post("/workflows/pizza/o-1/events/add_item", json={"pizza": "pineapple"})
    assert r.status_code == 422
    assert r.json()["error"] == "InvalidEventInput"
    r = c.post("/workflows/pizza/o-1/events/paid", json={"amount": 10})
    assert r.status_code == 409
    assert r.json()["error"] == "EventNotFound"
    assert module.engine.store.load("o-1").blob == before.blob


def test_pizza_app_rejected_order_ends(load_example: Any) -> None:
    _, c = pizza_client(load_example)
    c.put("/workflows/pizza/o-1", json={"customer": "ann"})
    send(c, "o-1", "add_item", {"pizza": "margherita"})
    send(c, "o-1", "checkout")
    send(c, "o-1", "reject", {"by": "luigi", "reason": "oven broken"})
    snap = c.get("/workflows/o-1").json()
    assert (snap["status"], snap["data"]["status"]) == ("finished", "rejected")


def test_pizza_app_abandons_an_idle_cart_after_24_hours(load_example: Any) -> None:
    module, c = pizza_client(load_example)
    c.put("/workflows/pizza/o-1", json={"customer": "bob"})
    send(c, "o-1", "add_item", {"pizza": "margherita"})

    almost = datetime.now(UTC) + timedelta(hours=23)
    with use_clock(lambda: almost):
        assert module.engine.run_due() == []
    later = datetime.now(UTC) + timedelta(hours=24, minutes=1)
    with use_clock(lambda: later):
        results = module.engine.run_due()
    assert [(r.id, r.fired, r.status) for r in results] == [("o-1", ["cart_timeout"], "finished")]

    snap = c.get("/workflows/o-1").json()
    assert snap["data"]["status"] == "abandoned"
    r = c.post("/workflows/pizza/o-1/events/checkout")
    assert r.status_code == 409


# --------------------------------------------------------------------------- schemathesis
# Generated requests against each example's own app: no 5xx, every answer as the
# OpenAPI document says (status, body, content type, Allow on 405), valid data accepted.


class SignedSender:
    """ASGI middleware of these tests: signs each write as a sender holding the secret does.

    Generated requests then reach the routes behind the signature check, as real
    webhooks do. Only a request that carries the placeholder signature is signed: the
    probes schemathesis sends without it (or with another) must still be refused.
    """

    PLACEHOLDER = b"sign-me"
    """What the generated requests carry as their signature (schemathesis' API key)."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.secret = secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        signature = dict(scope["headers"]).get(b"x-gorch-signature") if "headers" in scope else None
        if scope["type"] != "http" or signature != self.PLACEHOLDER:
            await self.app(scope, receive, send)  # unsigned, or signed badly on purpose
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        path = scope.get("raw_path") or scope["path"].encode()
        key_header = IDEMPOTENCY_HEADER.lower().encode()
        key = next((v.decode("latin-1") for k, v in scope["headers"] if k == key_header), None)
        signed = sign(
            self.secret,
            scope["method"],
            bytes(path).decode("latin-1"),
            body,
            query=scope.get("query_string", b"").decode("latin-1"),
            key=None if key is None else key.strip(),
        )
        names = {n.lower().encode() for n in signed}
        headers = [(k, v) for k, v in scope["headers"] if k not in names]
        headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in signed.items()]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": headers}, replay, send)


_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="gorch-fuzz-"))
"""The stores of the fuzzed apps (schemathesis parametrizes from a schema loaded here)."""


def _load_for_fuzzing(name: str, **env: str) -> ModuleType:
    """Import an example on a store of its own, its environment set only while it loads."""
    env = {"GORCH_STORE": f"sqlite:///{_FUZZ_DIR}/{name}.db", **env}
    names = ("GORCH_STORE", "GORCH_SECRET", "GORCH_TOKEN")
    saved = {var: os.environ.pop(var, None) for var in names}
    os.environ.update(env)
    try:
        spec = importlib.util.spec_from_file_location(f"gorch_fuzz_{name}", EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # pydantic resolves names there
        spec.loader.exec_module(module)
        return module
    finally:
        for var in names:
            os.environ.pop(var, None)
            if saved[var] is not None:
                os.environ[var] = saved[var]  # type: ignore[assignment]


_PIZZA = _load_for_fuzzing("pizza")
_APPROVAL = _load_for_fuzzing("approval_webhook", GORCH_SECRET=SECRET, GORCH_TOKEN=TOKEN)


@pytest.fixture(scope="module", autouse=True)
def _fuzzed_stores_closed() -> Iterator[None]:
    yield
    for module in (_PIZZA, _APPROVAL):
        module.engine.store.close()
        sys.modules.pop(module.__name__, None)
    shutil.rmtree(_FUZZ_DIR, ignore_errors=True)


pizza_api = schemathesis.openapi.from_asgi("/openapi.json", _PIZZA.app)
approval_api = schemathesis.openapi.from_asgi(
    "/openapi.json",
    _APPROVAL.app,
    headers=AUTH,
    config=SchemathesisConfig.from_dict(
        {
            "auth": {
                "openapi": {
                    "HTTPBearer": {"bearer": TOKEN},
                    "GorchSignature": {"api_key": SignedSender.PLACEHOLDER.decode()},
                }
            }
        }
    ),
)
approval_api.app = SignedSender(_APPROVAL.app, SECRET)

FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pizza_api.parametrize()
@FUZZ
def test_the_pizza_api_keeps_to_its_openapi_document(case: Any) -> None:
    response = case.call_and_validate()  # raises when the answer breaks the document
    assert response.status_code < 500, response.text  # client input never reaches a 500


@approval_api.parametrize()
@FUZZ
def test_the_signed_approval_api_keeps_to_its_openapi_document(case: Any) -> None:
    response = case.call_and_validate()  # raises when the answer breaks the document
    assert response.status_code < 500, response.text  # client input never reaches a 500
