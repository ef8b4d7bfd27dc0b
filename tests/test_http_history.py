"""``GET /workflows/{id}/history``: an instance's history over HTTP, behind the token."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_app import WORKFLOWS, assert_error, untouched
from stores.store_support import make_spec

import gorch
from gorch.engine import Engine
from gorch.http import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TOKEN = "api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAY = {"amount": 4.5, "card": "visa"}


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
