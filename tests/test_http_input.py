"""What a caller may send: declared start input, idempotency keys, timers, and hostile JSON.

No client input may cause a 500: each bad request is a 4xx with the error
body, and the stored records (and the set of ids) are byte-identical after it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
from http_app import WORKFLOWS, Inbox, Order, assert_error, client_for, record, untouched
from stores.store_support import make_spec

import gorch
from gorch import On, S, Select
from gorch.engine import Engine, key_id

PAY = {"amount": 4.5, "card": "visa"}
_JSON = {"content-type": "application/json"}


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
def client(engine: Engine) -> Iterator[Any]:
    with client_for(engine) as c:
        for path, data in (
            ("/workflows/order/o-1", {"item": "book"}),
            ("/workflows/inbox/i-1", {}),
        ):
            r = c.put(path, json=data)
            assert r.status_code == 201, r.text
        yield c


def raw(c: Any, method: str, path: str, body: bytes, **headers: str) -> Any:
    return c.request(method, path, content=body, headers={**_JSON, **headers})


# --------------------------------------------------------------------------- start input


@pytest.mark.parametrize(
    ("data", "locs"),
    [
        ({"item": "x", "status": "paid"}, [["status"]]),
        ({"item": "x", "paid": 1000, "notes": ["pre-set"]}, [["paid"], ["notes"]]),
        ({"item": "x", "admin": True}, [["admin"]]),
        ({"item": 5}, [["item"]]),
        ({"item": "x", "price": "cheap"}, [["price"]]),
        ({}, [["item"]]),
    ],
    ids=["internal-status", "internal-paid-notes", "unknown", "wrong-type", "bad-float", "missing"],
)
@pytest.mark.parametrize("how", ["POST", "PUT", "PUT-taken"])
def test_a_start_takes_the_declared_input_and_nothing_else(
    client: Any, engine: Engine, data: dict[str, Any], locs: list[list[str]], how: str
) -> None:
    path = {"POST": "/workflows/order", "PUT": "/workflows/order/o-2"}.get(
        how, "/workflows/order/o-1"
    )
    with untouched(engine, "o-1", "i-1"):
        r = client.request(how.partition("-")[0], path, json=data)
    err = assert_error(r, 422, "InvalidWorkflowData")
    assert sorted(e["loc"] for e in err["errors"]) == sorted(locs)
    if any(loc[0] not in ("item", "price") for loc in locs):
        assert "Order.start_input" in err["detail"] and "item, price, fail_at" in err["detail"]


def test_a_workflow_that_declares_nothing_starts_with_an_empty_body_only(
    client: Any, engine: Engine
) -> None:
    with untouched(engine, "o-1", "i-1"):
        r = client.put("/workflows/survey/s-1", json={"answers": ["preset"]})
    err = assert_error(r, 422, "InvalidWorkflowData")
    assert "Survey declares no start input" in err["detail"]
    assert "start_input = (" in err["detail"]
    assert client.put("/workflows/survey/s-1", json={}).status_code == 201
    assert client.put("/workflows/survey/s-2").status_code == 201
    assert engine.get("s-1").data == {"answers": []}


def test_the_declared_input_keeps_the_fields_constraints(client: Any, engine: Engine) -> None:
    with untouched(engine, "o-1", "i-1"):
        r = client.put("/workflows/inbox/i-2", json={"owner": "x" * 21})
    assert assert_error(r, 422, "InvalidWorkflowData")["errors"][0]["loc"] == ["owner"]
    r = client.put("/workflows/inbox/i-2", json={"owner": "ann"})
    assert r.json()["data"] == {"owner": "ann", "docs": []}


def test_python_starts_stay_trusted(engine: Engine) -> None:
    """``Engine.start(data=...)`` is the application's own call: any field goes."""
    snap = engine.start("order", "o-9", {"item": "x", "status": "vip", "paid": 3.0})
    assert (snap.data["paid"], snap.data["status"]) == (3.0, "confirmed")


def test_start_input_is_checked_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match="not fields of Bad"):

        class Bad(gorch.Workflow):
            x: int = 0
            start_input = ("x", "y")

    with pytest.raises(TypeError, match="tuple of field names"):

        class Worse(gorch.Workflow):
            x: int = 0
            start_input = "x"  # type: ignore[assignment]


def test_the_start_input_model_is_built_from_the_fields() -> None:
    class Aliased(gorch.Workflow):
        model_config = pydantic.ConfigDict(populate_by_name=True)
        start_input = ("amount", "ref")

        amount: float = pydantic.Field(gt=0)
        ref: str = pydantic.Field(default="", alias="reference", max_length=8)
        secret_state: int = 0

    model = Aliased.start_input_model()
    assert model is Aliased.start_input_model()  # built once
    schema = model.model_json_schema()
    assert set(schema["properties"]) == {"amount", "reference"}
    assert schema["additionalProperties"] is False
    assert schema["properties"]["amount"]["exclusiveMinimum"] == 0
    assert schema["properties"]["reference"]["maxLength"] == 8
    assert schema["required"] == ["amount"]
    with pytest.raises(pydantic.ValidationError):
        model.model_validate({"amount": 1, "secret_state": 5})


# --------------------------------------------------------------------------- idempotency keys


def test_a_keyed_start_is_made_once(client: Any, engine: Engine) -> None:
    first = client.post(
        "/workflows/order", json={"item": "lamp"}, headers={"Idempotency-Key": "k1"}
    )
    assert first.status_code == 201, first.text
    assert first.json()["id"] == key_id("order", "k1")
    with untouched(engine, "o-1", "i-1", first.json()["id"]):
        again = client.post(
            "/workflows/order", json={"item": "lamp"}, headers={"Idempotency-Key": "k1"}
        )
        other = client.post(
            "/workflows/order", json={"item": "desk"}, headers={"Idempotency-Key": "k1"}
        )
    assert (again.status_code, again.json()["id"]) == (201, first.json()["id"])
    assert assert_error(other, 409, "IdempotencyKeyReused")["key"] == "k1"


def test_a_keyed_event_is_applied_once(client: Any, engine: Engine) -> None:
    path = "/workflows/order/o-1/events/pay"
    first = client.post(path, json=PAY, headers={"Idempotency-Key": "pay-1"})
    assert first.status_code == 200, first.text
    with untouched(engine, "o-1", "i-1"):
        again = client.post(path, json=PAY, headers={"Idempotency-Key": "pay-1"})
        generic = client.post(
            "/workflows/o-1/events/pay", json=PAY, headers={"Idempotency-Key": "pay-1"}
        )
        other = client.post(path, json={**PAY, "amount": 1}, headers={"Idempotency-Key": "pay-1"})
    assert again.json() == first.json() == generic.json()
    assert engine.get("o-1").data["paid"] == 4.5
    assert_error(other, 409, "IdempotencyKeyReused")


@pytest.mark.parametrize(
    "key",
    ["", "has space", "x" * 256, "caf\u00e9", "tab\there"],
    ids=["empty", "space", "long", "latin1", "tab"],
)
def test_a_bad_idempotency_key_is_422(client: Any, engine: Engine, key: str) -> None:
    with untouched(engine, "o-1", "i-1"):
        r1 = client.post(
            "/workflows/order/o-1/events/pay",
            content=json.dumps(PAY),
            headers={**_JSON, "Idempotency-Key": key.encode("latin-1")},
        )
        r2 = client.post(
            "/workflows/order",
            json={"item": "x"},
            headers={"Idempotency-Key": key.encode("latin-1")},
        )
    for r in (r1, r2):
        assert "Idempotency-Key" in assert_error(r, 422, "InvalidRequest")["detail"]


# --------------------------------------------------------------------------- timers


def test_a_timer_cannot_be_sent_as_an_event(client: Any, engine: Engine) -> None:
    with untouched(engine, "o-1", "i-1"):
        generic = client.post("/workflows/o-1/events/expire")
        typed = client.post("/workflows/order/o-1/events/expire")
        with_pc = client.post("/workflows/o-1/events/expire", params={"pc": 1})
    body = assert_error(generic, 403, "TimerNotSendable")
    assert (body["id"], body["event"]) == ("o-1", "expire")
    assert_error(typed, 404, "NotFound")  # no typed operation for a timer
    assert_error(with_pc, 403, "TimerNotSendable")
    ops = client.get("/openapi.json").json()["paths"]
    assert not [p for p in ops if p.endswith("/events/expire")]


# --------------------------------------------------------------------------- hostile JSON


DEEP = 2000


@pytest.mark.parametrize(
    ("body", "status", "name"),
    [
        (b"NaN", 400, "MalformedJSON"),
        (b'{"amount": NaN, "card": "v"}', 400, "MalformedJSON"),
        (b'{"amount": Infinity, "card": "v"}', 400, "MalformedJSON"),
        (b'{"amount": -Infinity, "card": "v"}', 400, "MalformedJSON"),
        (b'{"amount": 1e400, "card": "v"}', 422, "InvalidRequest"),
        (b'{"amount": -1e400, "card": "v"}', 422, "InvalidRequest"),
        (b'{"amount": 1, "card": "\\ud800"}', 400, "MalformedJSON"),
        (b'{"amount": 1, "\\udfff": "v"}', 400, "MalformedJSON"),
        (b'{"amount": 1, "card": "v", "tags": [' + b"9" * 30 + b"]}", 422, "refused"),
        (b'{"amount": 1, "card": "v", "tags": [' + b"9" * 1001 + b"]}", 422, "InvalidRequest"),
        (b"[" * 65 + b"]" * 65, 422, "InvalidRequest"),
        (b"[" * DEEP + b"]" * DEEP, 422, "InvalidRequest"),
        (b'{"a":' * DEEP + b"1" + b"}" * DEEP, 422, "InvalidRequest"),
        (b"[" * 100_000, 422, "InvalidRequest"),
    ],
    ids=[
        "nan-alone",
        "nan",
        "infinity",
        "minus-infinity",
        "1e400",
        "minus-1e400",
        "lone-surrogate",
        "lone-surrogate-key",
        "big-int",
        "huge-int",
        "nested-65",
        "nested-2000",
        "nested-objects",
        "unclosed-deep",
    ],
)
@pytest.mark.parametrize(
    "route",
    [
        "/workflows/order/o-1/events/pay",
        "/workflows/o-1/events/pay",
        "/workflows/inbox/i-1/events/doc",
        "/workflows/i-1/events/raw",
        "/workflows/order/o-2",
        "/workflows/inbox",
    ],
    ids=["typed", "generic-typed", "typed-dict", "untyped", "start-put", "start-post"],
)
def test_json_gorch_cannot_hold_is_4xx_and_changes_nothing(
    client: Any, engine: Engine, body: bytes, status: int, name: str, route: str
) -> None:
    method = "PUT" if route == "/workflows/order/o-2" else "POST"
    with untouched(engine, "o-1", "i-1"):
        r = raw(client, method, route, body)
    if name == "refused":  # JSON's to take, the handler's or the start input's to refuse
        refused = {"InvalidEventInput", "InvalidWorkflowData"}
        assert assert_error(r, status, r.json().get("error"))["error"] in refused
    else:
        assert_error(r, status, name)


@pytest.mark.parametrize(
    "route", ["/workflows/i-1/events/raw", "/workflows/inbox/i-1/events/doc"], ids=["raw", "doc"]
)
def test_a_big_integer_the_store_cannot_hold_is_422(
    client: Any, engine: Engine, route: str
) -> None:
    """No JSON Schema bound on ints: a handler takes one; the Engine refuses to store it."""
    big = b"9" * 30
    with untouched(engine, "o-1", "i-1"):
        r = raw(client, "POST", route, b'{"n": ' + big + b"}")
    assert "cannot be stored" in assert_error(r, 422, "InvalidEventInput")["detail"]
    r = raw(
        client, "POST", "/workflows/order/o-1/events/pay", b'{"amount": ' + big + b', "card": "v"}'
    )
    assert r.status_code == 200, r.text  # a float field takes it; a receipt is not stored


@pytest.mark.parametrize("depth", [10, 60])
def test_nested_input_within_the_limit_is_kept(client: Any, engine: Engine, depth: int) -> None:
    doc: Any = "leaf"
    for _ in range(depth):
        doc = {"k": doc}
    for route in ("/workflows/inbox/i-1/events/doc", "/workflows/i-1/events/raw"):
        r = client.post(route, json=doc)
        assert r.status_code == 200, r.text
    assert engine.get("i-1").data["docs"] == [doc, doc]


@pytest.mark.parametrize(
    "pc",
    ["9" * 5000, "9" * 16, "-1", "1.0", "3e2", "\u0663", "", "0x1"],
    ids=["5000-digits", "16-digits", "negative", "float", "exp", "arabic-digit", "empty", "hex"],
)
@pytest.mark.parametrize("route", ["/workflows/order/o-1/events/pay", "/workflows/o-1/events/pay"])
def test_a_bad_pc_is_422(client: Any, engine: Engine, pc: str, route: str) -> None:
    with untouched(engine, "o-1", "i-1"):
        r = client.post(route, params={"pc": pc}, json=PAY)
    assert assert_error(r, 422, "InvalidRequest")["errors"][0]["loc"] == ["query", "pc"]


@pytest.mark.parametrize("length", ["²", "-1", "1e3", "abc"])
def test_a_bad_content_length_is_400(client: Any, engine: Engine, length: str) -> None:
    with untouched(engine, "o-1", "i-1"):
        r = client.post(
            "/workflows/o-1/events/pay",
            content=json.dumps(PAY).encode(),
            headers={**_JSON, "content-length": length.encode()},
        )
    assert r.status_code == 400, r.text


def test_a_long_thread_id_is_422(client: Any, engine: Engine) -> None:
    with untouched(engine, "o-1", "i-1"):
        r1 = client.post(
            "/workflows/order/o-1/events/pay", params={"thread_id": "t" * 201}, json=PAY
        )
        r2 = client.post("/workflows/o-1/events/pay", params={"thread_id": "t" * 201}, json=PAY)
    assert_error(r1, 422, "InvalidRequest")
    assert_error(r2, 422, "InvalidRequest")


def test_an_error_body_that_quotes_odd_input_still_renders(client: Any, engine: Engine) -> None:
    """pydantic's errors echo the input: the 422 must render whatever it quotes."""
    with untouched(engine, "o-1", "i-1"):
        r = client.post("/workflows/inbox/i-1/events/doc", json=["\u2028", 1.5, {"k": [1]}])
    err = assert_error(r, 422, "InvalidEventInput")
    assert err["errors"][0]["input"] == ["\u2028", 1.5, {"k": [1]}]


# --------------------------------------------------------------------------- unstorable results


class Nick(gorch.Workflow):
    """Its handler takes any str, but the field it stores it in takes 8 characters."""

    nick: str = pydantic.Field(default="", max_length=8)

    def definition(self) -> gorch.Section:
        return S(Select("rename", On("rename", self.rename)))

    def rename(self, name: str) -> str:
        self.nick = name  # no validate_assignment: the store's round trip refuses it
        return name


def test_input_whose_result_cannot_be_stored_is_422(tmp_path: Path) -> None:
    engine = Engine(f"sqlite:///{tmp_path}/nick.db", {"nick": Nick})
    with client_for(engine) as c:
        assert c.put("/workflows/nick/n-1").status_code == 201
        with untouched(engine, "n-1"):
            r = c.post("/workflows/nick/n-1/events/rename", json="far too long a nick")
        assert "cannot be stored" in assert_error(r, 422, "InvalidEventInput")["detail"]
        assert c.post("/workflows/nick/n-1/events/rename", json="ann").json() == "ann"
    engine.store.close()


def test_a_record_that_does_not_load_stays_a_500(tmp_path: Path) -> None:
    """A blob the code cannot read is the server's problem, not the caller's input."""
    engine = Engine(f"sqlite:///{tmp_path}/broken.db", WORKFLOWS)
    engine.start("order", "o-1", {"item": "x"})
    rec = engine.store.load("o-1")
    engine.store.save("o-1", rec.version, rec.status, b"\x93not a gorch blob", rec.wake_at)
    with client_for(engine) as c:
        before = record(engine, "o-1")
        r = c.post("/workflows/o-1/events/pay", json=PAY)
        assert record(engine, "o-1") == before
    assert_error(r, 500, "SerializationError")
    engine.store.close()


def test_inbox_and_order_are_what_these_tests_expect() -> None:
    assert Order.start_input == ("item", "price", "fail_at")
    assert Inbox.start_input == ("owner",)
