"""Who may call the HTTP app: bearer token, signatures bound to the request, replays, docs.

A signature must cover the whole request (method, raw path, query, timestamp,
Idempotency-Key, body), be used once, and be checked before the store is
touched. Every refused request leaves the stored records byte-identical.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
from http_app import WORKFLOWS, assert_error, client_for, record, untouched
from stores.store_support import StoreSpec, make_spec

from gorch.engine import Engine
from gorch.http import create_app, sign
from gorch.stores import MemoryStore

PAY = {"amount": 4.5, "card": "visa"}
SECRET = "webhook-secret"
TOKEN = "api-token"
WHSEC = "whsec_" + base64.b64encode(b"a standard webhooks key, 32 byte").decode()
_JSON = {"content-type": "application/json"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=["sqlite", "postgres"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    """A fresh SQLite file, or a table of its own on the real PostgreSQL server."""
    with contextlib.contextmanager(make_spec)(request.param, tmp_path) as spec:
        yield spec


@pytest.fixture
def engine(spec: StoreSpec) -> Iterator[Engine]:
    store = spec.open()
    try:
        yield Engine(store, WORKFLOWS)
    finally:
        store.close()


def body_of(data: Any) -> bytes:
    return b"" if data is None else json.dumps(data).encode()


def send(
    c: Any,
    method: str,
    path: str,
    data: Any = None,
    *,
    secret: str = SECRET,
    headers: dict[str, str] | None = None,
    **sign_options: Any,
) -> Any:
    """A request signed for exactly what it sends (unless ``headers`` replace the signature)."""
    body = body_of(data)
    signed = sign(secret, method, path, body, **sign_options) if headers is None else headers
    extra = _JSON if body else {}
    return c.request(method, path, content=body, headers={**extra, **signed})


@pytest.fixture
def signed(engine: Engine) -> Iterator[Any]:
    """An app with two secrets (a rotation) and instances o-1, o-2 waiting for payment."""
    with client_for(engine, secret=[SECRET, "next-secret"]) as c:
        for id in ("o-1", "o-2"):
            r = send(c, "PUT", f"/workflows/order/{id}", {"item": "book"})
            assert r.status_code == 201, r.text
        yield c


# --------------------------------------------------------------------------- gorch's scheme


def test_signed_requests_are_accepted_with_any_current_secret(signed: Any, engine: Engine) -> None:
    r = send(signed, "POST", "/workflows/order/o-1/events/pay", PAY)
    assert r.status_code == 200, r.text
    r = send(signed, "POST", "/workflows/o-1/events/deliver", ["ann"], secret="next-secret")
    assert (r.status_code, r.json()) == (200, 1)
    r = send(signed, "GET", "/workflows/o-1")  # with a secret alone, GETs are signed too
    assert r.json()["status"] == "finished"


def test_sign_takes_the_query_in_the_path_or_apart(signed: Any, engine: Engine) -> None:
    pc = send(signed, "GET", "/workflows/o-1").json()["awaited"][0]["pc"]
    body = body_of(PAY)
    path = f"/workflows/order/o-1/events/pay?pc={pc}"
    apart = sign(SECRET, "POST", "/workflows/order/o-1/events/pay", body, query=f"pc={pc}")
    assert (
        apart["X-Gorch-Signature"]
        == sign(SECRET, "POST", path, body, timestamp=int(apart["X-Gorch-Timestamp"]))[
            "X-Gorch-Signature"
        ]
    )
    r = signed.post(path, content=body, headers={**_JSON, **apart})
    assert r.status_code == 200, r.text


def _pay_headers(**overrides: Any) -> dict[str, str]:
    """Signature headers for the pay event of o-1, signed for something else by ``overrides``."""
    what = {"method": "POST", "path": "/workflows/order/o-1/events/pay", "body": body_of(PAY)}
    what.update(overrides)
    return sign(SECRET, what.pop("method"), what.pop("path"), what.pop("body"), **what)


@pytest.mark.parametrize(
    ("signed_for", "sent_with"),
    [
        ({"path": "/workflows/order/o-2/events/pay"}, {}),
        ({"path": "/workflows/o-1/events/pay"}, {}),
        ({"path": "/gorch/workflows/order/o-1/events/pay"}, {}),
        ({"method": "PUT"}, {}),
        ({"query": "pc=1"}, {}),
        ({"body": body_of({**PAY, "amount": 9999})}, {}),
        ({"key": "signed-key"}, {"Idempotency-Key": "another-key"}),
        ({"key": "signed-key"}, {"Idempotency-Key": None}),
        ({}, {"Idempotency-Key": "added-after-signing"}),
        ({}, {"X-Gorch-Timestamp": "TS-1"}),
    ],
    ids=[
        "other-instance",
        "other-route",
        "other-prefix",
        "other-method",
        "other-query",
        "other-body",
        "other-key",
        "key-dropped",
        "unsigned-key",
        "other-timestamp",
    ],
)
def test_a_signature_covers_the_whole_request(
    signed: Any, engine: Engine, signed_for: dict[str, Any], sent_with: dict[str, str | None]
) -> None:
    headers = _pay_headers(**signed_for)
    ts = int(headers["X-Gorch-Timestamp"])
    for name, value in sent_with.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value.replace("TS-1", str(ts - 1))
    with untouched(engine, "o-1", "o-2"):
        r = send(signed, "POST", "/workflows/order/o-1/events/pay", PAY, headers=headers)
    assert_error(r, 401, "InvalidSignature")


def test_an_empty_body_signature_is_good_for_one_instance_only(signed: Any, engine: Engine) -> None:
    """The cancel of the issue: an observed empty-body request must not cancel anything else."""
    cancel_1 = sign(SECRET, "POST", "/workflows/o-1/cancel")
    with untouched(engine, "o-1", "o-2"):
        r = signed.post("/workflows/o-2/cancel", headers=cancel_1)
    assert_error(r, 401, "InvalidSignature")
    assert signed.post("/workflows/o-1/cancel", headers=cancel_1).json()["status"] == "cancelled"


@pytest.mark.parametrize(
    "signature",
    ["", "garbage", "v1=", "v1=" + "0" * 63, "v1=" + "z" * 64, "v2=" + "0" * 64, "sha256=AUTO"],
    ids=["empty", "garbage", "no-digest", "short", "not-hex", "unknown-version", "old-scheme"],
)
def test_malformed_signatures_are_401(signed: Any, engine: Engine, signature: str) -> None:
    headers = _pay_headers()
    if signature == "sha256=AUTO":  # what the former scheme sent: HMAC of the body alone
        import hashlib
        import hmac

        signature = "sha256=" + hmac.new(SECRET.encode(), body_of(PAY), hashlib.sha256).hexdigest()
    headers["X-Gorch-Signature"] = signature
    with untouched(engine, "o-1"):
        r = send(signed, "POST", "/workflows/order/o-1/events/pay", PAY, headers=headers)
    body = assert_error(r, 401, "InvalidSignature")
    if signature:
        assert "v1=" in body["detail"]


@pytest.mark.parametrize(
    "timestamp",
    [None, "", "soon", "²", "\u0661\u0667" + "\u0660" * 8, "1.5e9", "-5", "0x10", "9" * 40],
    ids=["missing", "blank", "word", "superscript", "arabic-digits", "float", "neg", "hex", "huge"],
)
def test_a_timestamp_must_be_unix_seconds_in_ascii_digits(
    signed: Any, engine: Engine, timestamp: str | None
) -> None:
    headers = _pay_headers()
    if timestamp is None:
        del headers["X-Gorch-Timestamp"]
    else:
        headers["X-Gorch-Timestamp"] = timestamp
    encoded: Any = {k: v.encode("utf-8") for k, v in headers.items()}  # the bytes as sent
    with untouched(engine, "o-1"):
        r = send(signed, "POST", "/workflows/order/o-1/events/pay", PAY, headers=encoded)
    assert "X-Gorch-Timestamp" in assert_error(r, 401, "InvalidSignature")["detail"]


@pytest.mark.parametrize("skew", [-301, 301, -86_400], ids=["past", "future", "a-day-old"])
def test_a_timestamp_outside_the_tolerance_is_refused(
    signed: Any, engine: Engine, skew: int
) -> None:
    headers = _pay_headers(timestamp=int(time.time()) + skew)
    with untouched(engine, "o-1"):
        r = send(signed, "POST", "/workflows/order/o-1/events/pay", PAY, headers=headers)
    detail = assert_error(r, 401, "SignatureExpired")["detail"]
    assert ("future" in detail) == (skew > 0)
    late = _pay_headers(timestamp=int(time.time()) - 200)  # late, but within 300 s
    assert send(signed, "POST", "/workflows/order/o-1/events/pay", PAY, headers=late).is_success


# --------------------------------------------------------------------------- replays


def test_a_signed_request_is_accepted_once(signed: Any, engine: Engine) -> None:
    headers = _pay_headers()
    r = send(signed, "POST", "/workflows/order/o-1/events/pay", PAY, headers=headers)
    assert r.status_code == 200, r.text
    again = {**headers, "X-Gorch-Signature": headers["X-Gorch-Signature"].upper()}
    again["X-Gorch-Signature"] = "v1=" + again["X-Gorch-Signature"][3:]  # same digest, in caps
    with untouched(engine, "o-1", "o-2"):
        replays = [
            send(signed, "POST", "/workflows/order/o-1/events/pay", PAY, headers=h)
            for h in (headers, again)
        ]
    for r in replays:
        assert "sign the request again" in assert_error(r, 409, "ReplayedRequest")["detail"]


def test_a_replay_is_refused_by_every_app_sharing_the_store(
    spec: StoreSpec, engine: Engine
) -> None:
    """Two apps, each with its own connection to the same database (two web workers)."""
    other_store = spec.open()
    with (
        client_for(engine, secret=SECRET) as first,
        client_for(Engine(other_store, WORKFLOWS), secret=SECRET) as second,
    ):
        assert send(first, "PUT", "/workflows/order/o-1", {"item": "x"}).status_code == 201
        headers = _pay_headers()
        path = "/workflows/order/o-1/events/pay"
        assert send(first, "POST", path, PAY, headers=headers).is_success
        with untouched(engine, "o-1"):
            r = send(second, "POST", "/workflows/order/o-1/events/pay", PAY, headers=headers)
        assert_error(r, 409, "ReplayedRequest")
    other_store.close()


def test_a_retry_signs_again_and_its_idempotency_key_applies_it_once(
    signed: Any, engine: Engine
) -> None:
    path = "/workflows/order/o-1/events/pay"
    first = send(signed, "POST", path, PAY, key="pay-1", timestamp=int(time.time()) - 2)
    assert first.status_code == 200, first.text
    after_first = record(engine, "o-1")
    with untouched(engine, "o-1"):  # a new signature (a new timestamp), the same key
        retry = send(signed, "POST", path, PAY, key="pay-1")
    assert (retry.status_code, retry.json()) == (200, first.json())
    assert record(engine, "o-1") == after_first
    assert engine.get("o-1").data["paid"] == 4.5  # paid once


# --------------------------------------------------------------------------- Standard Webhooks


def standard(
    body: bytes, msg_id: str, *, secret: str = WHSEC, at: datetime | None = None
) -> dict[str, str]:
    at = at or datetime.now(UTC)
    signature = standardwebhooks.Webhook(secret).sign(msg_id, at, body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        **_JSON,
    }


@pytest.fixture
def webhooks(engine: Engine) -> Iterator[Any]:
    with client_for(engine, secret=[SECRET, WHSEC]) as c:
        for id in ("o-1", "o-2"):
            assert send(c, "PUT", f"/workflows/order/{id}", {"item": "x"}).status_code == 201
        yield c


def test_standard_webhooks_are_accepted_and_their_id_is_the_idempotency_key(
    webhooks: Any, engine: Engine
) -> None:
    body = body_of(PAY)
    path = "/workflows/order/o-1/events/pay"
    first = webhooks.post(path, content=body, headers=standard(body, "msg_1"))
    assert first.status_code == 200, first.text
    after = record(engine, "o-1")
    # The sender's retry: same webhook-id, a new timestamp, so a new signature.
    later = datetime.fromtimestamp(time.time() + 2, UTC)
    retry = webhooks.post(path, content=body, headers=standard(body, "msg_1", at=later))
    assert (retry.status_code, retry.json()) == (200, first.json())
    assert record(engine, "o-1") == after


def test_a_standard_webhook_replayed_anywhere_is_refused(webhooks: Any, engine: Engine) -> None:
    """Its signature does not cover the path: it is remembered, so no other instance takes it."""
    body = body_of(PAY)
    headers = standard(body, "msg_2")
    path = "/workflows/order/o-1/events/pay"
    assert webhooks.post(path, content=body, headers=headers).is_success
    with untouched(engine, "o-1", "o-2"):
        replays = [
            webhooks.post(path, content=body, headers=headers)
            for path in ("/workflows/order/o-2/events/pay", "/workflows/order/o-1/events/pay")
        ]
    for r in replays:
        assert_error(r, 409, "ReplayedRequest")


@pytest.mark.parametrize(
    "change",
    ["wrong-secret", "other-body", "missing-id", "missing-signature", "old", "bad-timestamp"],
)
def test_bad_standard_webhooks_are_401(webhooks: Any, engine: Engine, change: str) -> None:
    body = body_of(PAY)
    headers = standard(body, "msg_3")
    if change == "wrong-secret":
        other = "whsec_" + base64.b64encode(b"another key entirely, 32 bytes!!").decode()
        headers = standard(body, "msg_3", secret=other)
    elif change == "other-body":
        headers = standard(body_of({**PAY, "amount": 1}), "msg_3")
    elif change == "missing-id":
        del headers["webhook-id"]
    elif change == "missing-signature":
        del headers["webhook-signature"]
    elif change == "old":
        headers = standard(body, "msg_3", at=datetime.fromtimestamp(time.time() - 3600, UTC))
    else:
        headers["webhook-timestamp"] = "²".encode()  # type: ignore[assignment]
    with untouched(engine, "o-1"):
        r = webhooks.post("/workflows/order/o-1/events/pay", content=body, headers=headers)
    expected = "SignatureExpired" if change == "old" else "InvalidSignature"
    assert_error(r, 401, expected)


# --------------------------------------------------------------------------- reads and docs


def test_with_a_secret_alone_reads_are_signed_too(signed: Any, engine: Engine) -> None:
    refused = [
        signed.get("/workflows/o-1"),
        signed.get("/workflows"),
        signed.get("/workflows/o-1/graph"),
        signed.get("/definitions/order/graph"),
        signed.get("/openapi.json"),
        signed.get("/docs"),
        signed.get("/no/such/route"),
        signed.get("/workflows/o-1", headers=sign(SECRET, "GET", "/workflows/o-2")),
        signed.get("/workflows", headers=sign(SECRET, "GET", "/workflows?limit=1")),
    ]
    for r in refused:
        assert_error(r, 401, "InvalidSignature")
    assert signed.get("/healthz").json() == {"status": "ok"}
    r = signed.get("/workflows?limit=1", headers=sign(SECRET, "GET", "/workflows?limit=1"))
    assert [i["id"] for i in r.json()["items"]] == ["o-1"]
    headers = sign(SECRET, "GET", "/workflows/o-1")
    for _ in range(2):  # reads change nothing: a signed GET is not remembered
        assert signed.get("/workflows/o-1", headers=headers).json()["id"] == "o-1"


def test_a_token_guards_every_route_but_health(engine: Engine) -> None:
    with client_for(engine, token=TOKEN) as c:
        assert c.put("/workflows/order/o-1", json={"item": "x"}, headers=AUTH).status_code == 201
        with untouched(engine, "o-1"):
            refused = [
                c.get("/workflows/o-1"),
                c.get("/workflows"),
                c.get("/workflows/o-1/graph"),
                c.get("/definitions/order/graph"),
                c.get("/openapi.json"),
                c.get("/docs"),
                c.get("/docs/assets/swagger-ui-bundle.js"),
                c.post("/workflows/o-1/events/pay", json=PAY),
                c.post("/workflows/o-1/events/pay", json=PAY, headers={"Authorization": "Bearer"}),
                c.post(
                    "/workflows/o-1/events/pay", json=PAY, headers={"Authorization": "Bearer x"}
                ),
                c.post("/workflows/o-1/cancel", headers={"Authorization": f"Basic {TOKEN}"}),
                c.put("/workflows/order/o-2", json={"item": "x"}),
                c.get("/no/such/route"),  # unknown routes don't answer before the token
                c.delete("/workflows/o-1"),  # nor unknown methods
            ]
        for r in refused:
            assert_error(r, 401, "Unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/workflows/o-1", headers=AUTH).json()["id"] == "o-1"
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/openapi.json", headers=AUTH).status_code == 200
        assert_error(c.get("/no/such/route", headers=AUTH), 404, "NotFound")
        schemes = c.get("/openapi.json", headers=AUTH).json()["components"]["securitySchemes"]
        assert schemes["HTTPBearer"]["scheme"] == "bearer"


def test_public_docs_open_the_docs_and_nothing_else(engine: Engine) -> None:
    with client_for(engine, token=TOKEN, secret=SECRET, public_docs=True) as c:
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/docs").status_code == 200
        assert c.get("/docs/assets/swagger-ui.css").status_code == 200
        assert_error(c.get("/workflows"), 401, "Unauthorized")


def test_token_and_signature_together(engine: Engine) -> None:
    """Writes are signed (a webhook sender needs no token); reads need the token."""
    with client_for(engine, token=TOKEN, secret=SECRET) as c:
        body = b'{"item": "x"}'
        path = "/workflows/order/o-1"
        with untouched(engine):
            r1 = c.put(path, content=body, headers={**_JSON, **AUTH})
            r2 = c.get("/workflows", headers=sign(SECRET, "GET", "/workflows"))
        assert_error(r1, 401, "InvalidSignature")  # the token does not replace a signature
        assert_error(r2, 401, "Unauthorized")  # nor a signature the token, on reads
        r = c.put(path, content=body, headers={**_JSON, **sign(SECRET, "PUT", path, body)})
        assert r.status_code == 201, r.text
        pay = "/workflows/order/o-1/events/pay"
        r = send(c, "POST", pay, PAY, headers={**AUTH, **sign(SECRET, "POST", pay, body_of(PAY))})
        assert r.status_code == 200, r.text  # a token alongside does no harm
        assert c.get("/workflows/o-1", headers=AUTH).json()["data"]["paid"] == 4.5


def test_the_docs_work_offline(engine: Engine) -> None:
    """Every script and stylesheet of /docs is served by the app itself, from the bundle."""
    with client_for(engine) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        assert not re.search(r"(https?:)?//[a-z0-9]", page.text, re.IGNORECASE), page.text
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"} <= set(assets)
        for url in assets:
            r = c.get(url)
            assert r.status_code == 200 and r.content, url
        script = c.get("/docs/assets/swagger-ui-bundle.js")
        assert "javascript" in script.headers["content-type"]
        assert "SwaggerUIBundle" in script.text
        assert "'/openapi.json'" in page.text
        assert_error(c.get("/docs/assets/..%2F..%2F__init__.py"), 404, "NotFound")
        assert_error(c.get("/docs/assets/index.html"), 404, "NotFound")


def test_docs_can_be_turned_off(engine: Engine) -> None:
    with client_for(engine, docs=False) as c:
        assert_error(c.get("/openapi.json"), 404, "NotFound")
        assert_error(c.get("/docs"), 404, "NotFound")
    with client_for(engine, docs=False, token=TOKEN) as c:
        assert_error(c.get("/openapi.json"), 401, "Unauthorized")


# --------------------------------------------------------------------------- before the store


class CountingStore(MemoryStore):
    """A memory store that counts every call the app makes to it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name in {"create", "load", "save", "delete", "list", "claim_due", "remember"}:
            super().__getattribute__("calls").append(name)
        return value


def test_token_and_signature_are_checked_before_any_store_access() -> None:
    store = CountingStore()
    engine = Engine(store, WORKFLOWS)
    engine.start("order", "o-1", {"item": "x"})
    path = "/workflows/order/o-1/events/pay"
    with client_for(engine, token=TOKEN, secret=SECRET) as c:
        store.calls.clear()
        refused = [
            send(c, "POST", path, PAY, headers={}),  # nothing
            send(c, "POST", path, PAY, headers=AUTH),  # a token, no signature
            send(c, "POST", path, PAY, headers={**AUTH, **_pay_headers(path="/x")}),
            send(c, "POST", path, PAY, headers={**AUTH, **_pay_headers(timestamp=1)}),
            send(c, "POST", path, PAY, headers=sign("wrong", "POST", path, body_of(PAY))),
            c.get("/workflows/o-1"),
            c.get("/workflows", headers=sign(SECRET, "GET", "/workflows")),
            c.get("/workflows/o-1/graph", headers={"Authorization": "Bearer wrong"}),
            c.post("/workflows/o-1/cancel", headers=AUTH),
            c.delete("/workflows/o-1", headers=AUTH),
        ]
        assert [r.status_code for r in refused] == [401] * len(refused)
        assert store.calls == []
        ok = send(c, "POST", path, PAY, headers=_pay_headers())
        assert ok.status_code == 200, ok.text
        assert store.calls[0] == "remember"  # a good signature is remembered first


# --------------------------------------------------------------------------- secure by default


def test_an_app_without_secret_or_token_warns(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gorch"):
        create_app(engine)
    assert any("no secret and no token" in r.getMessage() for r in caplog.records)
    for options in ({"insecure": True}, {"secret": SECRET}, {"token": TOKEN}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gorch"):
            create_app(engine, **options)
        assert not any("no secret and no token" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "options",
    [
        {"max_body": 0},
        {"signature_tolerance": 0},
        {"token": ""},
        {"secret": ""},
        {"secret": []},
        {"secret": [SECRET, ""]},
        {"secret": "whsec_not base64!"},
    ],
    ids=["max-body", "tolerance", "token", "secret", "no-secrets", "one-empty", "bad-whsec"],
)
def test_bad_options_are_refused(engine: Engine, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        create_app(engine, **options)
