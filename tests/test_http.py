"""The FastAPI app of ``gorch.http``, driven over HTTP (httpx) on SQLite and PostgreSQL.

Every refused request must leave the store as it was: the tests read the
stored record (blob, version, status, wake-up) before and after. One test
runs ``gorch serve`` as a real uvicorn server on a free port.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
from fastapi import FastAPI
from http_app import (
    WORKFLOWS,
    Order,
    Payment,
    Pinger,
    Receipt,
    Refund,
    Slot,
    Survey,
    assert_error,
    client_for,
    stored_ids,
    untouched,
)
from stores.store_support import make_spec

import gorch.graph
from gorch.codec import loads
from gorch.engine import Engine
from gorch.errors import Conflict, GorchError, StoreUnavailable, WorkflowNotFound
from gorch.http import create_app, create_router, gorch_error_handler, sign, status_for
from gorch.http.schemas import ID_PATTERN
from gorch.stores import MemoryStore

with warnings.catch_warnings():  # newer Starlette warns that its TestClient moves to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TESTS_DIR = Path(__file__).resolve().parent
PAY = {"amount": 4.5, "card": "visa"}
SECRET = "webhook-secret"
TOKEN = "api-token"

# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An Engine on a fresh SQLite file, or on its own table of the real PostgreSQL server."""
    with contextlib.contextmanager(make_spec)(request.param, tmp_path) as spec:
        store = spec.open()
        try:
            yield Engine(store, WORKFLOWS)
        finally:
            store.close()


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with client_for(engine) as c:
        yield c


def start_order(c: TestClient, id: str = "o-1", **data: Any) -> dict[str, Any]:
    r = c.put(f"/workflows/order/{id}", json={"item": "book", **data})
    assert r.status_code == 201, r.text
    snap: dict[str, Any] = r.json()
    return snap


# --------------------------------------------------------------------------- starting instances


def test_post_starts_an_instance_with_a_generated_id(client: TestClient, engine: Engine) -> None:
    r = client.post("/workflows/order", json={"item": "lamp", "price": 20})
    assert r.status_code == 201, r.text
    snap = r.json()
    assert len(snap["id"]) == 32 and int(snap["id"], 16) >= 0  # uuid4 hex
    assert (snap["workflow"], snap["status"]) == ("order", "waiting")
    assert snap["data"]["item"] == "lamp" and snap["data"]["status"] == "confirmed"
    assert stored_ids(engine) == [snap["id"]]
    assert client.get(f"/workflows/{snap['id']}").json() == snap


def test_put_starts_an_instance_with_the_given_id(client: TestClient, engine: Engine) -> None:
    snap = start_order(client, "order-7")
    assert snap["id"] == "order-7" and snap["version"] == engine.store.load("order-7").version
    assert [t["cur_step"] for t in snap["threads"]] == ["await payment"]


def test_an_empty_body_starts_with_the_defaults(client: TestClient, engine: Engine) -> None:
    r = client.put("/workflows/survey/s-1")
    assert r.status_code == 201, r.text
    assert r.json()["data"] == {"answers": []}


def test_a_taken_id_is_409_and_the_instance_is_untouched(
    client: TestClient, engine: Engine
) -> None:
    start_order(client)
    with untouched(engine, "o-1"):
        r = client.put("/workflows/order/o-1", json={"item": "other"})
    assert assert_error(r, 409, "WorkflowExists")["id"] == "o-1"


def test_an_unknown_workflow_is_404_listing_the_known_ones(
    client: TestClient, engine: Engine
) -> None:
    with untouched(engine):
        r = client.post("/workflows/nope", json={})
        r2 = client.put("/workflows/nope/n-1", json={})
    body = assert_error(r, 404, "UnknownWorkflow")
    assert body["workflow"] == "nope" and body["known"] == ["inbox", "order", "pinger", "survey"]
    assert_error(r2, 404, "UnknownWorkflow")


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (b'{"item": 5}', ["item"]),  # JSON-mode validation: no int for a str
        (b"{}", ["item"]),  # required field missing
        (b'{"item": "x", "price": "cheap"}', ["price"]),
        (b"", ["item"]),  # empty body: the defaults, and item has none
    ],
    ids=["wrong-type", "missing", "bad-float", "empty"],
)
def test_invalid_initial_data_is_422_with_pydantic_errors(
    client: TestClient, engine: Engine, body: bytes, loc: list[str]
) -> None:
    with untouched(engine):
        r = client.put(
            "/workflows/order/o-1", content=body, headers={"content-type": "application/json"}
        )
    err = assert_error(r, 422, "InvalidWorkflowData")
    assert err["workflow"] == "order"
    assert [e["loc"] for e in err["errors"]] == [loc]


def test_initial_data_that_is_not_an_object_is_422(client: TestClient, engine: Engine) -> None:
    with untouched(engine):
        r = client.post("/workflows/survey", json=[1, 2])
    assert "JSON object" in assert_error(r, 422, "InvalidWorkflowData")["detail"]


def test_a_failing_first_step_still_creates_the_instance(
    client: TestClient, engine: Engine
) -> None:
    r = client.put("/workflows/order/o-1", json={"item": "x", "fail_at": "confirm"})
    assert r.status_code == 201, r.text
    snap = r.json()
    assert snap["status"] == "failed" and "order book closed" in snap["error"]
    assert engine.get("o-1").status == "failed"
    assert_error(client.put("/workflows/order/o-1", json={"item": "x"}), 409, "WorkflowExists")


# --------------------------------------------------------------------------- reading


def test_the_snapshot_shows_awaited_events_with_their_input_schema(
    client: TestClient, engine: Engine
) -> None:
    start_order(client)
    snap = client.get("/workflows/o-1").json()
    assert snap["status"] == "waiting"
    awaited = {e["name"]: e for e in snap["awaited"]}
    assert set(awaited) == {"pay", "withdraw", "refund", "expire"}
    assert awaited["pay"]["input_schema"] == pydantic.TypeAdapter(Payment).json_schema()
    assert awaited["refund"]["input_schema"] == pydantic.TypeAdapter(Refund).json_schema()
    assert awaited["withdraw"]["input_schema"] is None  # takes no input
    assert awaited["expire"]["input_schema"] is None and awaited["expire"]["due"]
    assert datetime.fromisoformat(snap["next_wakeup"]) == datetime.fromisoformat(
        awaited["expire"]["due"]
    )
    assert snap == json.loads(engine.get("o-1").model_dump_json())


def test_get_of_an_unknown_id_is_404(client: TestClient, engine: Engine) -> None:
    body = assert_error(client.get("/workflows/nope"), 404, "WorkflowNotFound")
    assert body["id"] == "nope"


def test_list_filters_and_pages(client: TestClient, engine: Engine) -> None:
    for i in (1, 2, 3):
        start_order(client, f"o-{i}")
    client.put("/workflows/survey/s-1")
    client.post("/workflows/o-2/events/withdraw")
    first = client.get("/workflows", params={"workflow": "order", "limit": 2}).json()
    assert [i["id"] for i in first["items"]] == ["o-1", "o-2"] and first["next_cursor"]
    second = client.get(
        "/workflows", params={"workflow": "order", "limit": 2, "cursor": first["next_cursor"]}
    ).json()
    assert [i["id"] for i in second["items"]] == ["o-3"] and second["next_cursor"] is None
    waiting = client.get("/workflows", params={"status": "waiting"}).json()
    assert [i["id"] for i in waiting["items"]] == ["o-1", "o-3", "s-1"]
    finished = client.get("/workflows", params={"status": "finished"}).json()
    assert [(i["id"], i["workflow"]) for i in finished["items"]] == [("o-2", "order")]


@pytest.mark.parametrize(
    "params", [{"status": "sleeping"}, {"limit": 0}, {"limit": "many"}, {"limit": 5000}]
)
def test_bad_list_parameters_are_422(
    client: TestClient, engine: Engine, params: dict[str, Any]
) -> None:
    body = assert_error(client.get("/workflows", params=params), 422, "InvalidRequest")
    assert body["errors"] and body["errors"][0]["loc"][0] == "query"


# --------------------------------------------------------------------------- events


def test_a_typed_event_returns_the_handlers_output(client: TestClient, engine: Engine) -> None:
    start_order(client)
    r = client.post("/workflows/order/o-1/events/pay", json=PAY)
    assert r.status_code == 200, r.text
    assert r.json() == {"paid": 4.5, "balance": 5.5, "by": "visa"}  # the Receipt, no envelope
    snap = client.get("/workflows/o-1").json()
    assert snap["data"]["status"] == "shipped"
    assert [e["name"] for e in snap["awaited"]] == ["deliver", "note", "reschedule"]
    r = client.post("/workflows/order/o-1/events/deliver", json=["ann", "bob"])
    assert (r.status_code, r.json()) == (200, 2)
    assert client.get("/workflows/o-1").json()["status"] == "finished"


def test_the_generic_event_route_delivers_any_event(client: TestClient, engine: Engine) -> None:
    start_order(client)
    r = client.post("/workflows/o-1/events/refund", json={"reason": "broken"})
    assert (r.status_code, r.json()) == (200, {"refunded": "broken"})
    r = client.put("/workflows/survey/s-1")
    r = client.post("/workflows/s-1/events/answer", json="blue")
    assert (r.status_code, r.json()) == (200, "blue")
    r = client.post("/workflows/survey/s-1/events/answer", json=42)
    assert (r.status_code, r.json()) == (200, 42)
    assert engine.get("s-1").data["answers"] == ["blue", 42]


def test_an_event_without_input_takes_an_empty_body(client: TestClient, engine: Engine) -> None:
    start_order(client)
    r = client.post("/workflows/order/o-1/events/withdraw")
    assert (r.status_code, r.json()) == (200, "withdrawn")
    assert engine.get("o-1").data["status"] == "withdrawn"


def test_an_untyped_handler_gets_the_parsed_json(client: TestClient, engine: Engine) -> None:
    start_order(client)
    client.post("/workflows/o-1/events/pay", json=PAY)
    note = {"text": "leave at the door", "floors": [1, 2]}
    r = client.post("/workflows/o-1/events/note", json=note)
    assert (r.status_code, r.json()) == (200, {"echo": note})
    assert engine.get("o-1").data["notes"] == [note]


@pytest.mark.parametrize(
    "route", ["/workflows/o-1/events/reschedule", "/workflows/order/o-1/events/reschedule"]
)
def test_typed_input_is_validated_from_the_json_text(
    client: TestClient, engine: Engine, route: str
) -> None:
    """A strict model takes a datetime from JSON text (it would refuse a Python str)."""
    start_order(client)
    client.post("/workflows/o-1/events/pay", json=PAY)
    r = client.post(route, json={"at": "2030-05-01T10:30:00Z"})
    assert (r.status_code, r.json()) == (200, "2030-05-01T10:30:00+00:00")
    assert engine.get("o-1").data["status"] == "delivery at 2030-05-01 10:30"


@pytest.mark.parametrize("route", ["/workflows/o-1/events/pay", "/workflows/order/o-1/events/pay"])
@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"amount": -1, "card": "visa"}, ["amount"]),
        ({"amount": 3}, ["card"]),
        ({"amount": 3, "card": "visa", "tags": "red"}, ["tags"]),
        ([1, 2], []),
        (None, []),  # no body for a handler that needs input
    ],
    ids=["constraint", "missing", "nested", "not-an-object", "empty"],
)
def test_invalid_event_input_is_422_and_changes_nothing(
    client: TestClient, engine: Engine, route: str, body: Any, loc: list[str]
) -> None:
    start_order(client)
    with untouched(engine, "o-1"):
        r = client.post(route, json=body) if body is not None else client.post(route)
    err = assert_error(r, 422, "InvalidEventInput")
    assert err["event"] == "pay"
    assert [e["loc"] for e in err["errors"]] == [loc]


def test_input_for_an_event_that_takes_none_is_422(client: TestClient, engine: Engine) -> None:
    start_order(client)
    with untouched(engine, "o-1"):
        r = client.post("/workflows/order/o-1/events/withdraw", json={"why": "changed my mind"})
    assert_error(r, 422, "InvalidEventInput")


def test_an_event_not_awaited_is_409_listing_the_awaited_ones(
    client: TestClient, engine: Engine
) -> None:
    start_order(client)
    with untouched(engine, "o-1"):
        r = client.post("/workflows/o-1/events/deliver", json=["ann"])
        r2 = client.post("/workflows/o-1/events/no-such-event")
    body = assert_error(r, 409, "EventNotFound")
    assert body["event"] == "deliver"
    assert {(a["name"], a["thread_id"]) for a in body["awaited"]} == {
        ("pay", "_main_"),
        ("withdraw", "_main_"),
        ("refund", "_main_"),
        ("expire", "_main_"),
    }
    assert assert_error(r2, 409, "EventNotFound")["event"] == "no-such-event"


def test_a_stale_pc_is_409(client: TestClient, engine: Engine) -> None:
    pc = start_order(client)["awaited"][0]["pc"]
    with untouched(engine, "o-1"):
        r = client.post("/workflows/order/o-1/events/pay", params={"pc": pc + 1}, json=PAY)
    body = assert_error(r, 409, "StaleEvent")
    assert (body["pc"], body["current"]) == (pc + 1, [pc])
    r = client.post("/workflows/o-1/events/pay", params={"pc": pc}, json=PAY)
    assert r.status_code == 200, r.text
    with untouched(engine, "o-1"):  # the replay of the same webhook
        r = client.post("/workflows/o-1/events/pay", params={"pc": pc}, json=PAY)
    assert_error(r, 409, "StaleEvent")


@pytest.mark.parametrize(
    "route", ["/workflows/p-1/events/ping", "/workflows/pinger/p-1/events/ping"]
)
def test_an_event_awaited_by_two_threads_needs_thread_id(
    client: TestClient, engine: Engine, route: str
) -> None:
    assert client.put("/workflows/pinger/p-1").status_code == 201
    with untouched(engine, "p-1"):
        r = client.post(route)
    assert assert_error(r, 409, "AmbiguousEvent")["thread_ids"] == ["left", "right"]
    r = client.post(route, params={"thread_id": "right"})
    assert (r.status_code, r.json()) == (200, "right")
    assert engine.get("p-1").data["pings"] == ["right"]


def test_a_non_integer_pc_is_422(client: TestClient, engine: Engine) -> None:
    start_order(client)
    with untouched(engine, "o-1"):
        r = client.post("/workflows/order/o-1/events/pay", params={"pc": "x"}, json=PAY)
        r2 = client.post("/workflows/o-1/events/pay", params={"pc": "x"}, json=PAY)
    assert_error(r, 422, "InvalidRequest")
    assert_error(r2, 422, "InvalidRequest")


def test_events_to_unknown_or_mismatched_instances_are_404(
    client: TestClient, engine: Engine
) -> None:
    start_order(client)
    client.put("/workflows/survey/s-1")
    with untouched(engine, "o-1", "s-1"):
        r1 = client.post("/workflows/nope/events/pay", json=PAY)
        r2 = client.post("/workflows/order/nope/events/pay", json=PAY)
        r3 = client.post("/workflows/order/s-1/events/pay", json=PAY)  # s-1 is a survey
    assert assert_error(r1, 404, "WorkflowNotFound")["id"] == "nope"
    assert_error(r2, 404, "WorkflowNotFound")
    assert "'survey'" in assert_error(r3, 404, "WorkflowNotFound")["detail"]


def test_events_to_finished_or_cancelled_instances_are_409(
    client: TestClient, engine: Engine
) -> None:
    start_order(client, "o-1")
    client.post("/workflows/o-1/events/withdraw")
    start_order(client, "o-2")
    assert client.post("/workflows/o-2/cancel").json()["status"] == "cancelled"
    with untouched(engine, "o-1", "o-2"):
        r1 = client.post("/workflows/o-1/events/pay", json=PAY)
        r2 = client.post("/workflows/order/o-2/events/pay", json=PAY)
        r3 = client.post("/workflows/o-2/cancel")
    assert assert_error(r1, 409, "WorkflowFinishedError")["status"] == "finished"
    assert assert_error(r2, 409, "WorkflowNotActive")["status"] == "cancelled"
    assert_error(r3, 409, "WorkflowNotActive")


def test_cancel_returns_the_cancelled_snapshot(client: TestClient, engine: Engine) -> None:
    start_order(client)
    r = client.post("/workflows/o-1/cancel")
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["awaited"]) == ("cancelled", [])
    assert engine.get("o-1").status == "cancelled"
    assert_error(client.post("/workflows/nope/cancel"), 404, "WorkflowNotFound")


def test_a_failing_handler_is_500_and_changes_nothing(client: TestClient, engine: Engine) -> None:
    start_order(client)
    with untouched(engine, "o-1"):
        r = client.post("/workflows/o-1/events/pay", json={"amount": 1, "card": "boom"})
    body = assert_error(r, 500, "HandlerFailed")
    assert "card processor down" in body["detail"] and body["event"] == "pay"


def test_a_step_failing_after_an_event_is_200_and_the_instance_shows_it(
    client: TestClient, engine: Engine
) -> None:
    start_order(client, fail_at="ship")
    r = client.post("/workflows/o-1/events/pay", json=PAY)
    assert r.status_code == 200, r.text  # the event was delivered and saved
    snap = client.get("/workflows/o-1").json()
    assert "warehouse on fire" in snap["error"]
    assert (snap["status"], snap["data"]["paid"]) == ("failed", 4.5)
    assert_error(client.post("/workflows/o-1/events/pay", json=PAY), 409, "WorkflowNotActive")


# --------------------------------------------------------------------------- malformed requests


@pytest.mark.parametrize(
    ("method", "path"),
    [("put", "/workflows/order/o-2"), ("post", "/workflows/o-1/events/pay")],
    ids=["start", "event"],
)
@pytest.mark.parametrize(
    ("body", "content_type", "status", "name"),
    [
        (b'{"amount": 1, "card": ', "application/json", 400, "MalformedJSON"),
        (b"{'amount': 1}", "application/json", 400, "MalformedJSON"),
        (b'{"card": "\xff\xfe"}', "application/json", 400, "MalformedJSON"),  # not UTF-8
        (b'{"amount": 1, "card": "visa"}', "text/plain", 415, "UnsupportedMediaType"),
        (
            b'{"amount": 1, "card": "visa"}',
            "application/x-www-form-urlencoded",
            415,
            "UnsupportedMediaType",
        ),
        (b'{"amount": 1, "card": "visa"}', None, 415, "UnsupportedMediaType"),
    ],
    ids=["truncated", "single-quotes", "not-utf8", "text-plain", "form", "no-content-type"],
)
def test_malformed_bodies_are_refused_before_anything_is_read(
    client: TestClient,
    engine: Engine,
    method: str,
    path: str,
    body: bytes,
    content_type: str | None,
    status: int,
    name: str,
) -> None:
    start_order(client)
    headers = {"content-type": content_type} if content_type else {}
    with untouched(engine, "o-1"):
        r = client.request(method.upper(), path, content=body, headers=headers)
    assert r.request.headers.get("content-type") == content_type
    assert_error(r, status, name)


def test_a_json_suffix_media_type_is_accepted(client: TestClient, engine: Engine) -> None:
    start_order(client)
    r = client.post(
        "/workflows/o-1/events/pay",
        content=json.dumps(PAY),
        headers={"content-type": "application/vnd.shop+json; charset=utf-8"},
    )
    assert r.status_code == 200, r.text


def test_oversized_bodies_are_413_by_length_and_by_stream(engine: Engine) -> None:
    with client_for(engine, max_body=100) as c:
        start_order(c)
        big = json.dumps({"amount": 1, "card": "x" * 200}).encode()

        def chunks() -> Iterator[bytes]:  # no Content-Length: the bytes are counted
            yield big[:50]
            yield big[50:]

        with untouched(engine, "o-1"):
            r1 = c.post("/workflows/o-1/events/pay", content=big, headers=_JSON)
            r2 = c.post("/workflows/o-1/events/pay", content=chunks(), headers=_JSON)
            r3 = c.put("/workflows/order/o-2", content=big, headers=_JSON)
        assert "content-length" not in {k.lower() for k in r2.request.headers}
        for r in (r1, r2, r3):
            assert assert_error(r, 413, "PayloadTooLarge")["max_body"] == 100
        ok = c.post("/workflows/o-1/events/pay", json=PAY)  # under the limit: fine
        assert ok.status_code == 200, ok.text


_JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    "bad_id",
    [
        "..%2F..",
        "..%2F..%2Fetc%2Fpasswd",
        "a%20b",
        "%C3%A9t%C3%A9",
        "%E2%80%AEevil",
        "a%00b",
        "-leading-dash",
        "x" * 201,
    ],
    ids=["traversal", "deep-traversal", "space", "unicode", "bidi", "nul", "dash", "too-long"],
)
def test_odd_ids_are_422_everywhere(client: TestClient, engine: Engine, bad_id: str) -> None:
    start_order(client)
    with untouched(engine, "o-1"):
        responses = [
            client.get(f"/workflows/{bad_id}"),
            client.put(f"/workflows/order/{bad_id}", json={"item": "x"}),
            client.post(f"/workflows/{bad_id}/events/pay", json=PAY),
            client.post(f"/workflows/order/{bad_id}/events/pay", json=PAY),
            client.post(f"/workflows/{bad_id}/cancel"),
            client.get(f"/workflows/{bad_id}/graph"),
        ]
    for r in responses:
        body = assert_error(r, 422, "InvalidWorkflowId")
        assert "invalid workflow id" in body["detail"]


def test_unknown_routes_and_methods_answer_in_the_error_shape(
    client: TestClient, engine: Engine
) -> None:
    assert_error(client.get("/nothing/here"), 404, "NotFound")
    assert_error(client.delete("/workflows/o-1"), 405, "MethodNotAllowed")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/workflows/o-1", "GET"),
        ("OPTIONS", "/workflows/o-1", "GET"),
        ("PATCH", "/workflows", "GET"),
        ("GET", "/workflows/order", "POST"),  # a workflow's start, not an instance id
        ("DELETE", "/workflows/order", "POST"),
        ("PATCH", "/workflows/order/o-1", "PUT"),
        ("GET", "/workflows/order/o-1/events/pay", "POST"),
        ("GET", "/workflows/o-1/events/pay", "POST"),
        ("POST", "/workflows/o-1/graph", "GET"),
        ("DELETE", "/healthz", "GET"),
        ("POST", "/docs", "GET"),
        ("PUT", "/openapi.json", "GET"),
    ],
)
def test_a_405_lists_every_method_the_path_documents(
    client: TestClient, engine: Engine, method: str, path: str, allow: str
) -> None:
    doc = client.get("/openapi.json").json()["paths"]
    start_order(client)
    with untouched(engine, "o-1"):
        r = client.request(method, path)
    assert_error(r, 405, "MethodNotAllowed")
    assert r.headers["allow"] == allow
    for template, item in doc.items():  # Allow agrees with the document's own path
        pattern = re.sub(r"\{[^}]+\}", "[^/]+", template)
        if re.fullmatch(pattern, path) and template.count("{") == min(
            t.count("{") for t in doc if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", t), path)
        ):
            assert sorted(m.upper() for m in item) == allow.split(", "), template


def test_a_workflow_name_is_never_an_instance_id(client: TestClient, engine: Engine) -> None:
    with untouched(engine):
        r = client.put("/workflows/order/survey", json={"item": "x"})
    assert "name of a workflow" in assert_error(r, 422, "InvalidWorkflowId")["detail"]


def test_the_id_pattern_and_lengths_are_in_the_openapi_document(
    client: TestClient, engine: Engine
) -> None:
    doc = client.get("/openapi.json").json()
    ids = [
        p["schema"]
        for item in doc["paths"].values()
        for op in item.values()
        for p in op.get("parameters", [])
        if p["in"] == "path" and p["name"] == "id"
    ]
    assert len(ids) >= 5
    for schema in ids:
        assert schema["pattern"] == ID_PATTERN and (schema["minLength"], schema["maxLength"]) == (
            1,
            200,
        )
        assert re.fullmatch(schema["pattern"], "o-1") and not re.fullmatch(ID_PATTERN, "-x")
    keys = [
        p["schema"]
        for item in doc["paths"].values()
        for op in item.values()
        for p in op.get("parameters", [])
        if p["in"] == "header" and p["name"] == "Idempotency-Key"
    ]
    assert keys and all((k["minLength"], k["maxLength"]) == (1, 255) for k in keys)


# --------------------------------------------------------------------------- OpenAPI


def _resolve(schema: Any, components: dict[str, Any]) -> Any:
    """``schema`` with every ``$ref`` inlined and ``title`` keys (naming only) dropped."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return _resolve(components[name], components)
        return {k: _resolve(v, components) for k, v in schema.items() if k != "title"}
    if isinstance(schema, list):
        return [_resolve(v, components) for v in schema]
    return schema


def _expected(tp: Any, mode: str) -> Any:
    schema = pydantic.TypeAdapter(tp).json_schema(mode=mode)  # type: ignore[arg-type]
    return _resolve(schema, schema.get("$defs", {}))


# (workflow, event) -> (input type or None for no body, output type)
EVENTS: dict[tuple[str, str], tuple[Any, Any]] = {
    ("order", "pay"): (Payment, Receipt),
    ("order", "withdraw"): (None, str),
    ("order", "refund"): (Refund, dict[str, str]),
    ("order", "deliver"): (list[str], int),
    ("order", "note"): (Any, Any),
    ("order", "reschedule"): (Slot, str),
    ("survey", "answer"): (str | int, str | int),
    ("pinger", "ping"): (None, str),
    ("pinger", "stop"): (None, type(None)),
    ("inbox", "doc"): (dict[str, Any], int),
    ("inbox", "raw"): (Any, Any),
}


def test_openapi_documents_every_event_with_its_handlers_types(
    client: TestClient, engine: Engine
) -> None:
    doc = client.get("/openapi.json").json()
    components = doc["components"]["schemas"]
    ops = {
        op["operationId"]: (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }
    typed = {k for k in ops if k.split("_", 1)[0] in WORKFLOWS}  # {workflow}_{event}
    assert typed == {f"{w}_{e}" for w, e in EVENTS}
    for (wf, event), (input_type, output_type) in EVENTS.items():
        path, method, op = ops[f"{wf}_{event}"]
        assert (path, method) == (f"/workflows/{wf}/{{id}}/events/{event}", "post")
        if input_type is None:
            assert "requestBody" not in op
        else:
            body = op["requestBody"]
            assert body["required"] is True
            got = _resolve(body["content"]["application/json"]["schema"], components)
            assert got == _expected(input_type, "validation"), (wf, event)
        out = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert _resolve(out, components) == _expected(output_type, "serialization"), (wf, event)
        assert {"404", "409", "422"} <= set(op["responses"])
        err = op["responses"]["409"]["content"]["application/json"]["schema"]
        assert _resolve(err, components)["required"] == ["error", "detail"]
    # the generic event route stays, for any event of any workflow
    assert ops["send_event"][:2] == ("/workflows/{id}/events/{event}", "post")
    # each workflow has its typed starts; no untyped start is documented
    for wf in WORKFLOWS:
        assert ops[f"start_{wf}"][:2] == (f"/workflows/{wf}", "post")
        assert ops[f"create_{wf}"][:2] == (f"/workflows/{wf}/{{id}}", "put")
    assert "/workflows/{name}" not in doc["paths"]
    assert "/workflows/{name}/{id}" not in doc["paths"]
    assert "HTTPValidationError" not in components  # every 422 is documented as ErrorBody


def test_the_typed_route_of_a_union_takes_either_type(client: TestClient, engine: Engine) -> None:
    client.put("/workflows/survey/s-1")
    assert client.post("/workflows/survey/s-1/events/answer", json="red").json() == "red"
    with untouched(engine, "s-1"):  # the second Select takes an int
        r = client.post("/workflows/survey/s-1/events/answer", json="red")
    assert_error(r, 422, "InvalidEventInput")


def test_the_swagger_ui_is_served(client: TestClient, engine: Engine) -> None:
    r = client.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()
    assert "/openapi.json" in r.text


# --------------------------------------------------------------------------- graphs


def test_graphs_of_classes_and_instances(client: TestClient, engine: Engine) -> None:
    start_order(client)
    expected_class = gorch.graph.mermaid(Order)
    assert client.get("/definitions/order/graph").json() == {
        "workflow": "order",
        "id": None,
        "mermaid": expected_class,
    }
    assert client.get("/workflows/order/graph").json()["mermaid"] == expected_class
    wf, state = loads(engine.store.load("o-1").blob, Order)
    r = client.get("/workflows/o-1/graph")
    assert r.status_code == 200, r.text
    assert r.json() == {"workflow": "order", "id": "o-1", "mermaid": gorch.graph.mermaid(wf, state)}
    assert r.json()["mermaid"] != expected_class  # the instance's cursors are marked
    assert client.get("/definitions/pinger/graph").json()["mermaid"] == gorch.graph.mermaid(Pinger)
    assert client.get("/workflows/survey/graph").json()["mermaid"] == gorch.graph.mermaid(Survey)
    assert_error(client.get("/definitions/nope/graph"), 404, "UnknownWorkflow")
    assert_error(client.get("/workflows/nope/graph"), 404, "WorkflowNotFound")  # not a name: an id


# --------------------------------------------------------------------------- health, store errors


class _DownStore(MemoryStore):
    def list(self, **kw: Any) -> Any:
        raise StoreUnavailable("PostgreSQL store postgresql://db/x is unavailable: refused")


class _BrokenDriverStore(MemoryStore):
    def list(self, **kw: Any) -> Any:
        raise OSError("socket closed")


class _ContendedStore(MemoryStore):
    """Every save loses its compare-and-swap, as when another process holds the instance."""

    contended = False

    def save(self, *args: Any, **kw: Any) -> Any:
        if self.contended:
            raise Conflict(args[0], args[1], args[1] + 1)
        return super().save(*args, **kw)


def test_healthz(engine: Engine) -> None:
    with client_for(engine) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
    for store in (_DownStore(), _BrokenDriverStore()):
        with client_for(Engine(store, WORKFLOWS)) as c:
            assert_error(c.get("/healthz"), 503, "StoreUnavailable")


def test_an_unexpected_error_is_a_json_500_without_internals() -> None:
    class Buggy(MemoryStore):
        def load(self, id: str) -> Any:
            raise KeyError("internal detail")

    app = create_app(Engine(Buggy(), WORKFLOWS))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/workflows/o-1")
    body = assert_error(r, 500, "InternalServerError")
    assert "internal detail" not in body["detail"] and "KeyError" in body["detail"]


def test_a_lost_compare_and_swap_is_503_with_retry_after() -> None:
    store = _ContendedStore()
    engine = Engine(store, WORKFLOWS, conflict_retries=2)
    with client_for(engine) as c:
        start_order(c)
        store.contended = True
        with untouched(engine, "o-1"):
            r = c.post("/workflows/o-1/events/pay", json=PAY)
        assert_error(r, 503, "Conflict")
        assert r.headers["retry-after"] == "1"


# --------------------------------------------------------------------------- mounting


def test_the_app_mounts_under_a_prefix_of_an_existing_app(engine: Engine) -> None:
    parent = FastAPI()

    @parent.get("/")
    def home() -> dict[str, str]:
        return {"app": "parent"}

    parent.mount("/gorch", create_app(engine, token=TOKEN))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(parent) as c:
        assert c.get("/").json() == {"app": "parent"}
        r = c.put("/gorch/workflows/order/o-1", json={"item": "x"}, headers=auth)
        assert r.status_code == 201, r.text
        assert (
            c.post("/gorch/workflows/order/o-1/events/pay", json=PAY, headers=auth).json()["by"]
            == "visa"
        )
        assert c.get("/gorch/healthz").status_code == 200  # open under the prefix too
        assert_error(c.get("/gorch/workflows/o-1"), 401, "Unauthorized")
        assert_error(c.get("/gorch/workflows/..%2F..", headers=auth), 422, "InvalidWorkflowId")
        assert_error(c.get("/gorch/openapi.json"), 401, "Unauthorized")
        doc = c.get("/gorch/openapi.json", headers=auth).json()
        assert "/workflows/order/{id}/events/pay" in doc["paths"]
        assert doc["servers"] == [{"url": "/gorch"}]  # "try it out" goes through the prefix
        page = c.get("/gorch/docs", headers=auth).text
        assert "/gorch/openapi.json" in page and "/gorch/docs/assets/swagger-ui-bundle.js" in page


def test_the_router_mounts_into_a_host_app_and_its_docs(engine: Engine) -> None:
    """``create_router`` in the host's own app: its /docs, its 404s, gorch's errors mapped."""
    host = FastAPI(title="shop")
    host.include_router(create_router(engine, token=TOKEN), prefix="/gorch")
    host.add_exception_handler(GorchError, gorch_error_handler)

    @host.get("/orders/{id}/status")
    def order_status(id: str) -> dict[str, str]:  # the host's own endpoint calls the Engine
        return {"status": engine.get(id).status}

    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(host) as c:
        doc = c.get("/openapi.json").json()  # the host's document, open as the host wants
        assert "/gorch/workflows/order/{id}/events/pay" in doc["paths"]
        assert "/orders/{id}/status" in doc["paths"]
        assert "/gorch/workflows/{id}" in doc["paths"]
        assert "swagger" in c.get("/docs").text.lower()
        assert_error(c.get("/gorch/workflows/o-1"), 401, "Unauthorized")
        r = c.put("/gorch/workflows/order/o-1", json={"item": "x"}, headers=auth)
        assert r.status_code == 201, r.text
        r = c.post("/gorch/workflows/order/o-1/events/pay", json=PAY, headers=auth)
        assert r.json()["by"] == "visa"
        assert c.get("/orders/o-1/status").json() == {"status": "waiting"}
        body = assert_error(c.get("/orders/nope/status"), 404, "WorkflowNotFound")
        assert body["id"] == "nope"
        assert_error(c.get("/orders/a%20b/status"), 422, "InvalidWorkflowId")


def test_an_async_engine_is_served_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``create_app(AsyncEngine(...))`` awaits the engine and its store: no threadpool."""
    import anyio.to_thread

    from gorch.async_engine import AsyncEngine

    used: list[str] = []

    async def no_threadpool(func: Any, *args: Any, **kwargs: Any) -> Any:
        used.append(getattr(func, "__qualname__", repr(func)))
        raise AssertionError(f"the threadpool ran {func!r}")

    for store in ("memory://", f"sqlite:///{tmp_path / 'async.db'}"):
        engine = AsyncEngine(store, WORKFLOWS)
        with client_for(engine, secret=SECRET, token=TOKEN) as c:
            monkeypatch.setattr(anyio.to_thread, "run_sync", no_threadpool)
            auth = {"Authorization": f"Bearer {TOKEN}"}
            body = json.dumps({"item": "lamp"}).encode()
            path = "/workflows/order/o-1"
            headers = {"content-type": "application/json", **sign(SECRET, "PUT", path, body)}
            r = c.put(path, content=body, headers=headers)
            assert r.status_code == 201, r.text
            pay = json.dumps(PAY).encode()
            path = "/workflows/order/o-1/events/pay"
            headers = {"content-type": "application/json", **sign(SECRET, "POST", path, pay)}
            r = c.post(path, content=pay, headers=headers)
            assert (r.status_code, r.json()["by"]) == (200, "visa")
            assert_error(c.post(path, content=pay, headers=headers), 409, "ReplayedRequest")
            snap = c.get("/workflows/o-1", headers=auth).json()
            assert (snap["status"], snap["data"]["paid"]) == ("waiting", 4.5)
            page = c.get("/workflows", headers=auth).json()
            assert [i["id"] for i in page["items"]] == ["o-1"]
            r = c.post(
                "/workflows/o-1/cancel",
                headers=sign(SECRET, "POST", "/workflows/o-1/cancel"),
            )
            assert r.json()["status"] == "cancelled"
            assert_error(c.get("/workflows/nope", headers=auth), 404, "WorkflowNotFound")
            assert c.get("/healthz").json() == {"status": "ok"}
            assert c.get("/workflows/o-1/graph", headers=auth).json()["id"] == "o-1"
            monkeypatch.undo()
        assert used == []


def _gorch_errors() -> set[type[GorchError]]:
    import gorch.testing  # noqa: F401 - its errors count too

    found: set[type[GorchError]] = set()
    todo: list[type[GorchError]] = [GorchError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("gorch") and cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


STATUS = {
    "GorchError": 500,
    "DefinitionError": 500,
    "SyncCallRefused": 500,
    "WorkflowFinishedError": 409,
    "StepFailed": 500,
    "ConcurrentChange": 500,
    "DAGFailed": 500,
    "ParallelFailed": 500,
    "PipelineError": 500,
    "StepResultError": 500,
    "StepTimeout": 500,
    "HandlerFailed": 500,
    "SetupError": 500,
    "EventNotFound": 409,
    "AmbiguousEvent": 409,
    "StaleEvent": 409,
    "InvalidEventInput": 422,
    "ResumeLimitError": 500,
    "CursorNotFound": 500,
    "ThreadExists": 500,
    "TimerNotSendable": 403,
    "InvalidIdempotencyKey": 422,
    "IdempotencyKeyReused": 409,
    "SerializationError": 500,
    "RoundTripError": 500,
    "TimerLimitError": 500,
    "UnawaitedCoroutineError": 500,
    "StoreError": 503,
    "Conflict": 503,
    "WorkflowNotFound": 404,
    "WorkflowExists": 409,
    "StoreUnavailable": 503,
    "UnsupportedStoreURL": 500,
    "UnknownWorkflow": 404,
    "InvalidWorkflowData": 422,
    "WorkflowNotActive": 409,
    "InvalidWorkflowId": 422,
}


def test_every_gorch_error_has_a_decided_status() -> None:
    """A new error class fails here until someone decides what it answers."""
    errors = _gorch_errors()
    assert {cls.__name__ for cls in errors} == set(STATUS)
    for cls in errors:
        assert status_for(cls) == STATUS[cls.__name__], cls
    assert status_for(WorkflowNotFound("x")) == 404
    with pytest.raises(TypeError):
        status_for(ValueError)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_gorch_serve_runs_a_real_uvicorn_server(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "GORCH_STORE": f"sqlite:///{tmp_path / 'served.db'}",
        "HOOK_SECRET": SECRET,
        "API_TOKEN": TOKEN,
    }
    env.pop("GORCH_APP", None)
    cmd = [
        sys.executable,
        "-m",
        "gorch.cli",
        "serve",
        "--app",
        "http_app:engine",
        "--port",
        str(port),
        "--secret-env",
        "HOOK_SECRET",
        "--token-env",
        "API_TOKEN",
        "--max-body",
        "1000",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd, cwd=TESTS_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, proc.communicate()[1].decode()
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)

            body = b'{"item": "served"}'
            path = "/workflows/order/o-1"
            headers = {**_JSON, **auth, **sign(SECRET, "PUT", path, body)}
            r = c.put(path, content=body, headers=headers)
            assert r.status_code == 201, r.text
            assert r.json()["data"]["status"] == "confirmed"

            pay = json.dumps(PAY).encode()
            path = "/workflows/order/o-1/events/pay"
            r = c.post(path, content=pay, headers={**_JSON, **auth})
            assert_error(r, 401, "InvalidSignature")
            old = sign(SECRET, "POST", path, pay, timestamp=int(time.time()) - 3600)
            r = c.post(path, content=pay, headers={**_JSON, **auth, **old})
            assert_error(r, 401, "SignatureExpired")
            other = sign(SECRET, "POST", "/workflows/order/o-2/events/pay", pay)
            r = c.post(path, content=pay, headers={**_JSON, **auth, **other})
            assert_error(r, 401, "InvalidSignature")  # signed for another instance

            def chunks() -> Iterator[bytes]:  # streamed without Content-Length
                for _ in range(20):
                    yield b" " * 100

            big = {**_JSON, **auth, **sign(SECRET, "POST", path, b" " * 2000)}
            r = c.post(path, content=chunks(), headers=big)
            assert_error(r, 413, "PayloadTooLarge")

            fresh = sign(SECRET, "POST", path, pay)
            r = c.post(path, content=pay, headers={**_JSON, **auth, **fresh})
            assert (r.status_code, r.json()["by"]) == (200, "visa")
            r = c.post(path, content=pay, headers={**_JSON, **auth, **fresh})
            assert_error(r, 409, "ReplayedRequest")  # the same signed request, once only
            r = c.get("/workflows/%2E%2E%2F%2E%2E", headers=auth)
            assert_error(r, 422, "InvalidWorkflowId")
            snap = c.get("/workflows/o-1", headers=auth).json()
            assert (snap["status"], snap["data"]["status"]) == ("waiting", "shipped")
    finally:
        proc.terminate()
        try:
            _out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
    assert b"gorch serve: order, survey, pinger, inbox on http://127.0.0.1" in err
    # what the server saved is in the store the CLI was given
    served = Engine(env["GORCH_STORE"], WORKFLOWS)
    assert served.get("o-1").data["paid"] == 4.5


# --------------------------------------------------------------------------- without FastAPI


def test_gorch_imports_without_fastapi_and_gorch_http_says_what_to_install() -> None:
    code = """
import sys

class NoWeb:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fastapi", "starlette", "uvicorn"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoWeb())
import gorch, gorch.cli
print("gorch ok", gorch.__version__)
try:
    import gorch.http
except ImportError as e:
    print("http:", e)
print("serve exit", gorch.cli.main(["serve", "--app", "http_app:engine"]))
"""
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=TESTS_DIR, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("gorch ok")
    assert lines[1].startswith("http: gorch.http needs FastAPI")
    assert "pip install 'gorch[http]'" in lines[1]
    assert lines[2] == "serve exit 2"
    assert "pip install 'gorch[http]'" in run.stderr
