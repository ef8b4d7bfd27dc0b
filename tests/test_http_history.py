"""``GET /workflows/{id}/history``: an instance's history over HTTP, behind the token."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
from http_app import WORKFLOWS, assert_error, stored_ids, untouched
from stores.store_support import make_spec

import gorch
from gorch.engine import Engine
from gorch.http import create_app, sign

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TOKEN = "api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAY = {"amount": 4.5, "card": "visa"}
SECRET = "history-secret"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with contextlib.contextmanager(make_spec)(request.param, tmp_path) as spec:
        store = spec.open()
        try:
            yield Engine(store, WORKFLOWS)
        finally:
            store.close()


def test_the_history_route_tells_what_happened(engine: Engine) -> None:
    with TestClient(create_app(engine, token=TOKEN)) as c:
        r = c.put("/workflows/order/o-1", json={"item": "book"}, headers=AUTH)
        assert r.status_code == 201, r.text
        r = c.post("/workflows/o-1/events/pay", json=PAY, headers=AUTH)
        assert r.status_code == 200, r.text
        r = c.get("/workflows/o-1/history", headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["id"] == "o-1" and body["dropped"] == 0
    kinds = [(e["kind"], e.get("name")) for e in body["entries"]]
    assert kinds[:3] == [("started", "order"), ("step", "confirm"), ("event", "pay")]
    assert body["entries"][0]["input"]["item"] == "book"
    assert body["entries"][2]["input"] == PAY
    assert [e.kind for e in engine.history("o-1")] == [e["kind"] for e in body["entries"]]


def test_the_history_route_needs_the_token_and_a_known_id(engine: Engine) -> None:
    engine.start("order", "o-1", {"item": "x"})
    with untouched(engine, "o-1"), TestClient(create_app(engine, token=TOKEN)) as c:
        assert_error(c.get("/workflows/o-1/history"), 401, "Unauthorized")
        bad = {"Authorization": "Bearer wrong"}
        assert_error(c.get("/workflows/o-1/history", headers=bad), 401, "Unauthorized")
        assert_error(c.get("/workflows/nope/history", headers=AUTH), 404, "WorkflowNotFound")
        assert_error(c.get("/workflows/%3Cb%3E/history", headers=AUTH), 422, "InvalidWorkflowId")


def test_the_history_route_serves_an_async_engine(tmp_path: Path) -> None:
    engine = gorch.AsyncEngine(f"sqlite:///{tmp_path / 'a.db'}", WORKFLOWS)
    asyncio.run(engine.start("order", "o-1", {"item": "x"}, by="ann"))
    with TestClient(create_app(engine, token=TOKEN)) as c:
        body = c.get("/workflows/o-1/history", headers=AUTH).json()
    assert body["entries"][0]["by"] == "ann"
    asyncio.run(engine.close())


# --------------------------------------------------------------------------- who acted


def _takes_by(method: Any) -> bool:
    return "by" in inspect.signature(method).parameters


WHSEC = "whsec_" + base64.b64encode(b"history-webhook-secret").decode()


def _webhook(body: bytes, msg_id: str) -> dict[str, str]:
    """Standard Webhooks headers for ``body`` (the id is the sender's message id)."""
    at = datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": standardwebhooks.Webhook(WHSEC).sign(msg_id, at, body),
        "Content-Type": "application/json",
    }


def test_the_history_says_which_credential_started_an_instance(engine: Engine) -> None:
    body = json.dumps({"item": "book"}).encode()
    with TestClient(create_app(engine, token=TOKEN)) as c:
        r = c.put("/workflows/order/by-token", content=body, headers={**AUTH, **JSON})
        assert r.status_code == 201, r.text
    with TestClient(create_app(engine, secret=[SECRET, WHSEC], token=TOKEN)) as c:
        path = "/workflows/order/by-signature"
        r = c.put(path, content=body, headers={**sign(SECRET, "PUT", path, body), **JSON})
        assert r.status_code == 201, r.text
        r = c.put("/workflows/order/by-webhook", content=body, headers=_webhook(body, "msg_42"))
        assert r.status_code == 201, r.text
    with TestClient(create_app(engine, insecure=True)) as c:
        assert c.put("/workflows/order/by-anyone", content=body, headers=JSON).status_code == 201
    started = {id: engine.history(id)[0] for id in stored_ids(engine)}
    assert {id: e.by for id, e in started.items()} == {
        "by-anyone": "http:open",
        "by-signature": "http:signature",
        "by-token": "http:token",
        "by-webhook": "http:webhook:msg_42",
    }
    assert all(e.kind == "started" for e in started.values())


@pytest.mark.skipif(
    not (_takes_by(Engine.send) and _takes_by(Engine.cancel)),
    reason="Engine.send and Engine.cancel take no by= yet: their entries name nobody",
)
def test_the_history_says_which_credential_sent_an_event_and_cancelled(engine: Engine) -> None:
    with TestClient(create_app(engine, secret=SECRET, token=TOKEN)) as c:
        path = "/workflows/order/o-1"
        start = json.dumps({"item": "x"}).encode()
        r = c.put(path, content=start, headers={**sign(SECRET, "PUT", path, start), **JSON})
        assert r.status_code == 201, r.text
        path = "/workflows/o-1/events/pay"
        body = json.dumps(PAY).encode()
        r = c.post(path, content=body, headers={**sign(SECRET, "POST", path, body), **JSON})
        assert r.status_code == 200, r.text
        path = "/workflows/o-1/cancel"
        r = c.post(path, headers=sign(SECRET, "POST", path, b""))
        assert r.status_code == 200, r.text
    entries = engine.history("o-1")
    assert [(e.kind, e.by) for e in entries if e.kind in ("event", "cancelled")] == [
        ("event", "http:signature"),
        ("cancelled", "http:signature"),
    ]


def test_the_routes_pass_who_acted_to_every_engine_method_that_takes_it(
    engine: Engine,
) -> None:
    """Whatever ``Engine`` itself takes: an engine whose methods take ``by=`` gets it."""
    told: list[tuple[str, str | None]] = []

    class Telling(Engine):
        def send(self, *args: Any, by: str | None = None, **kwargs: Any) -> Any:
            told.append(("send", by))
            return super().send(*args, **kwargs)

        def cancel(self, id: str, *, by: str | None = None) -> Any:
            told.append(("cancel", by))
            return super().cancel(id)

    telling = Telling(engine.store, WORKFLOWS)
    with TestClient(create_app(telling, token=TOKEN)) as c:
        assert c.put("/workflows/order/o-1", json={"item": "x"}, headers=AUTH).status_code == 201
        r = c.post("/workflows/order/o-1/events/pay", json=PAY, headers=AUTH)
        assert r.status_code == 200, r.text
        assert c.post("/workflows/o-1/cancel", headers=AUTH).status_code == 200
    assert told == [("send", "http:token"), ("cancel", "http:token")]
    assert telling.history("o-1")[0].by == "http:token"
