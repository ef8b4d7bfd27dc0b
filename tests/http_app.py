"""Workflows the HTTP tests drive, with every kind of handler the app must document.

``engine`` (for ``gorch serve --app http_app:engine``) runs on ``GORCH_STORE``,
or in memory when it is unset.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pydantic

import gorch
from gorch import For, Go, Handler, On, Return, S, Select, Step, Timeout
from gorch.engine import Engine
from gorch.state import EventRequest


class Payment(pydantic.BaseModel):
    amount: float = pydantic.Field(gt=0)
    card: str
    tags: list[str] = []


class Receipt(pydantic.BaseModel):
    paid: float
    balance: float
    by: str


class Slot(pydantic.BaseModel):
    """Strict: a datetime only validates from JSON text, not from a Python str."""

    model_config = pydantic.ConfigDict(strict=True)

    at: datetime


class Refund(pydantic.BaseModel):
    reason: str


class RefundHandler(Handler):
    """A ``gorch.Handler`` subclass with declared input and output types."""

    input_type = Refund
    output_type = dict[str, str]

    def handle(self, req: EventRequest, input: Any) -> Any:
        return {"refunded": input.reason}


class Order(gorch.Workflow):
    """Waits for a payment (typed model in and out), then for delivery or notes."""

    start_input = ("item", "price", "fail_at")
    """What an HTTP start may set; ``status``, ``paid`` and ``notes`` are internal."""

    item: str
    price: float = 10.0
    status: str = "new"
    paid: float = 0.0
    notes: list[Any] = []
    fail_at: str = ""
    """The step that raises: ``confirm`` or ``ship`` (failure paths of the API)."""

    def definition(self) -> gorch.Section:
        return S(
            Step("confirm", self.confirm),
            Select(
                "await payment",
                On("pay", self.pay),
                On("withdraw", self.withdraw, Return()),
                On("refund", RefundHandler()),
                Timeout("expire", timedelta(days=1), Step("expired", self.expired), Return()),
            ),
            Step("ship", self.ship),
            Select(
                "await delivery",
                On("deliver", self.deliver),
                On("note", self.note),
                On("reschedule", self.reschedule),
            ),
        )

    def confirm(self) -> None:
        if self.fail_at == "confirm":
            raise RuntimeError("order book closed")
        self.status = "confirmed"

    def pay(self, p: Payment) -> Receipt:
        if p.card == "boom":
            raise RuntimeError("card processor down")
        self.paid += p.amount
        self.status = "paid"
        return Receipt(paid=p.amount, balance=self.price - self.paid, by=p.card)

    def withdraw(self) -> str:
        self.status = "withdrawn"
        return "withdrawn"

    def expired(self) -> None:
        self.status = "expired"

    def ship(self) -> None:
        if self.fail_at == "ship":
            raise RuntimeError("warehouse on fire")
        self.status = "shipped"

    def deliver(self, signatures: list[str]) -> int:
        self.status = f"delivered to {', '.join(signatures)}"
        return len(signatures)

    def reschedule(self, slot: Slot) -> str:
        self.status = f"delivery at {slot.at:%Y-%m-%d %H:%M}"
        return slot.at.isoformat()

    def note(self, payload):  # untyped on purpose: it gets the parsed JSON
        self.notes.append(payload)
        return {"echo": payload}


class Survey(gorch.Workflow):
    """The same event name in two Selects, with different input types."""

    answers: list[Any] = []

    def definition(self) -> gorch.Section:
        return S(
            Select("q1", On("answer", self.text)),
            Select("q2", On("answer", self.number)),
        )

    def text(self, a: str) -> str:
        self.answers.append(a)
        return a

    def number(self, a: int) -> int:
        self.answers.append(a)
        return a


class Pinger(gorch.Workflow):
    """Two threads await the same event: delivering it needs ``thread_id``."""

    pings: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            Go("left", Select("left waits", On("ping", self.ping_left)), id="left"),
            Go("right", Select("right waits", On("ping", self.ping_right)), id="right"),
            Select("main waits", On("stop")),
        )

    def ping_left(self) -> str:
        self.pings.append("left")
        return "left"

    def ping_right(self) -> str:
        self.pings.append("right")
        return "right"


class Inbox(gorch.Workflow):
    """Keeps any JSON document it is sent, typed (``doc``) or not (``raw``), forever."""

    start_input = ("owner",)

    owner: str = pydantic.Field(default="nobody", max_length=20)
    docs: list[Any] = []

    def definition(self) -> gorch.Section:
        return S(
            For(
                "forever",
                lambda: True,
                Select("inbox", On("doc", self.keep_doc), On("raw", self.keep_raw)),
            )
        )

    def keep_doc(self, doc: dict[str, Any]) -> int:
        self.docs.append(doc)
        return len(self.docs)

    def keep_raw(self, payload):  # untyped on purpose: it gets the parsed JSON
        self.docs.append(payload)
        return len(self.docs)


WORKFLOWS: dict[str, type[gorch.Workflow]] = {
    "order": Order,
    "survey": Survey,
    "pinger": Pinger,
    "inbox": Inbox,
}

engine = Engine(os.environ.get("GORCH_STORE") or "memory://", WORKFLOWS)


# --------------------------------------------------------------------------- test helpers
# Shared by tests/test_http*.py (plain functions: this module is also served by ``gorch serve``).

Rec = tuple[bytes, int, str, datetime | None]


def client_for(engine: Engine, **options: Any) -> Any:
    """A TestClient of ``create_app(engine, **options)``; open (``insecure``) unless guarded."""
    import warnings

    from gorch.http import create_app

    with warnings.catch_warnings():  # newer Starlette warns that its TestClient moves to httpx2
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    if options.get("secret") is None and options.get("token") is None:
        options.setdefault("insecure", True)
    return TestClient(create_app(engine, **options))


def record(engine: Engine, id: str) -> Rec:
    rec = engine.store.load(id)
    return rec.blob, rec.version, rec.status, rec.wake_at


def stored_ids(engine: Engine) -> list[str]:
    return [i.id for i in engine.list(limit=1000).items]


@contextlib.contextmanager
def untouched(engine: Engine, *ids: str) -> Iterator[None]:
    """The records of ``ids`` (and the set of stored ids) are byte-identical afterwards."""
    before = {id: record(engine, id) for id in ids}
    all_before = stored_ids(engine)
    yield
    assert {id: record(engine, id) for id in ids} == before
    assert stored_ids(engine) == all_before


def assert_error(r: Any, status: int, name: str) -> dict[str, Any]:
    """Assert an error response: its status, JSON body shape and error name."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    assert body["error"] == name, body
    assert isinstance(body["detail"], str) and body["detail"]
    return body
