"""A pizza order served over HTTP: the gorchestrate pizzaapp flow, in gorch.

::

    cart ──checkout──> confirm ──┬── cook ── delivered ──── payment done? ── close order
     │ add_item (loops)   │      └── payment thread: paid ────────┘
     └ 24 h idle: abandoned
                          └ reject: the order ends

* **Cart**: a ``For`` loop around a ``Select``: ``add_item`` (typed input,
  validated against the menu), ``checkout``, and a ``cart_timeout`` timer that
  restarts with every change and abandons the order after 24 hours of silence.
* **Confirmation**: the restaurant manager sends ``confirm`` or ``reject``.
* **Payment** runs in its own thread (``Go``) while the main thread cooks and
  waits for ``delivered``: the customer may pay before or after delivery, in
  one or several ``paid`` calls. ``WaitFor("payment done", ...)`` keeps the
  order open until the bill is settled.

Serve it (``engine`` and ``app`` are module-level)::

    gorch serve --app examples.pizza:engine
    uvicorn examples.pizza:app
    gorch worker --app examples.pizza:engine     # abandons carts after 24 h

``GORCH_STORE`` picks the store (default ``sqlite:///pizza.db``); set
``GORCH_SECRET`` to require signed writes and ``GORCH_TOKEN`` to require a
bearer token (see ``examples/approval_webhook.py``). With neither, the app is
open to anyone who can reach it, and logs so.

Run it as a script (``python examples/pizza.py``) to drive one order end to
end over HTTP in-process (FastAPI's ``TestClient``, a temporary SQLite file),
and one cart nobody checks out, abandoned by ``engine.run_due()`` once
``gorch.clock.use_clock`` has moved time 24 hours ahead.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pydantic

import gorch
from gorch import For, Go, On, Return, S, Select, Step, Timeout, WaitFor
from gorch.clock import use_clock
from gorch.http import create_app

MENU: dict[str, float] = {"margherita": 8.5, "pepperoni": 10.0, "quattro formaggi": 11.5}

# --------------------------------------------------------------------------- event inputs


class Item(pydantic.BaseModel):
    """The body of ``add_item``: a pizza from the menu."""

    pizza: Literal["margherita", "pepperoni", "quattro formaggi"]
    qty: int = pydantic.Field(default=1, ge=1, le=20)


class Confirmation(pydantic.BaseModel):
    by: str
    eta_minutes: int = pydantic.Field(default=30, gt=0)


class Rejection(pydantic.BaseModel):
    by: str
    reason: str


class Payment(pydantic.BaseModel):
    amount: float = pydantic.Field(gt=0)
    method: Literal["card", "cash"] = "card"


class Delivery(pydantic.BaseModel):
    courier: str


# --------------------------------------------------------------------------- the workflow


class PizzaOrder(gorch.Workflow):
    start_input = ("customer", "address")
    """What a start request may set; the cart, totals and status are the order's own."""

    customer: str = "guest"
    address: str = ""
    items: list[Item] = []
    total: float = 0.0
    paid: float = 0.0
    status: str = "cart"
    """cart, confirming, cooking, delivering, delivered, closed; or abandoned, rejected."""
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            For(
                "cart",
                lambda: self.status == "cart",
                Select(
                    "shopping",
                    On("add_item", self.add_item),
                    On("checkout", self.checkout),
                    Timeout(
                        "cart_timeout",
                        timedelta(hours=24),
                        Step("abandon", self.abandon),
                        Return(),
                    ),
                ),
            ),
            Select(
                "manager confirmation",
                On("confirm", self.confirm),
                On("reject", self.reject, Return()),
            ),
            Go(
                "payment",
                For(
                    "collect payment",
                    lambda: not self.settled(),
                    Select("await payment", On("paid", self.on_paid)),
                ),
            ),
            Step("cook", self.cook),
            Select("delivery", On("delivered", self.on_delivered)),
            WaitFor("payment done", self.settled),
            Step("close order", self.close),
        )

    # Steps and handlers read the data through ``self`` when they run.

    def settled(self) -> bool:
        return self.paid >= self.total - 0.005

    def add_item(self, item: Item) -> dict[str, Any]:
        self.items.append(item)
        self.total = round(sum(MENU[i.pizza] * i.qty for i in self.items), 2)
        return {"items": len(self.items), "total": self.total}

    def checkout(self) -> dict[str, Any]:
        if not self.items:
            return {"status": self.status, "detail": "the cart is empty: add an item first"}
        self.status = "confirming"
        self.log.append(f"{self.customer} checked out {len(self.items)} item(s), {self.total:.2f}")
        return {"status": self.status, "total": self.total}

    def abandon(self) -> None:
        self.status = "abandoned"
        self.log.append("cart abandoned: no activity for 24 hours")

    def confirm(self, c: Confirmation) -> dict[str, Any]:
        self.status = "cooking"
        self.log.append(f"confirmed by {c.by}, ready in {c.eta_minutes} min")
        return {"status": self.status, "eta_minutes": c.eta_minutes}

    def reject(self, r: Rejection) -> dict[str, Any]:
        self.status = "rejected"
        self.log.append(f"rejected by {r.by}: {r.reason}")
        return {"status": self.status}

    def on_paid(self, p: Payment) -> dict[str, Any]:
        self.paid = round(self.paid + p.amount, 2)
        self.log.append(f"paid {p.amount:.2f} by {p.method}")
        return {"paid": self.paid, "due": round(max(self.total - self.paid, 0.0), 2)}

    def cook(self) -> None:
        pizzas = ", ".join(f"{i.qty} x {i.pizza}" for i in self.items)
        self.status = "delivering"
        self.log.append(f"cooked {pizzas}; out for delivery")

    def on_delivered(self, d: Delivery) -> dict[str, Any]:
        self.status = "delivered"
        self.log.append(f"delivered to {self.address or self.customer} by {d.courier}")
        return {"status": self.status, "due": round(max(self.total - self.paid, 0.0), 2)}

    def close(self) -> None:
        self.status = "closed"
        self.log.append(f"order closed: {self.total:.2f} paid in full")


# --------------------------------------------------------------------------- the service

WORKFLOWS: dict[str, type[gorch.Workflow]] = {"pizza": PizzaOrder}

engine = gorch.Engine(os.environ.get("GORCH_STORE", "sqlite:///pizza.db"), WORKFLOWS)
app = create_app(  # open (and it logs so) unless GORCH_SECRET or GORCH_TOKEN is set
    engine,
    secret=os.environ.get("GORCH_SECRET") or None,
    token=os.environ.get("GORCH_TOKEN") or None,
)


# --------------------------------------------------------------------------- the demo


def main() -> None:
    with warnings.catch_warnings():  # newer Starlette warns that its TestClient moves
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    with tempfile.TemporaryDirectory() as tmp:
        # The same service as ``engine`` / ``app`` above, on a throw-away SQLite file.
        demo_engine = gorch.Engine(f"sqlite:///{tmp}/pizza.db", WORKFLOWS)
        try:
            # In-process, no network: nobody else can reach this app.
            with TestClient(create_app(demo_engine, insecure=True)) as client:
                story(client, demo_engine)
        finally:
            demo_engine.store.close()


def story(client: Any, demo_engine: gorch.Engine) -> None:
    def call(method: str, path: str, data: Any = None) -> Any:
        body = b"" if data is None else json.dumps(data).encode()
        headers = {"Content-Type": "application/json"} if body else {}
        r = client.request(method, path, content=body, headers=headers)
        print(f"> {method} {path}" + ("" if data is None else " " + body.decode()))
        print(f"< {r.status_code} {brief(r.json())}")
        return r.json()

    def event(id: str, name: str, data: Any = None) -> Any:
        return call("POST", f"/workflows/pizza/{id}/events/{name}", data)

    print("== 1. Ann orders three pizzas, pays after delivery")
    call("PUT", "/workflows/pizza/order-1", {"customer": "ann", "address": "1 Main St"})
    event("order-1", "add_item", {"pizza": "margherita", "qty": 2})
    event("order-1", "add_item", {"pizza": "pineapple"})  # not on the menu: 422
    event("order-1", "add_item", {"pizza": "pepperoni"})
    event("order-1", "checkout")
    event("order-1", "add_item", {"pizza": "margherita"})  # the cart is closed: 409
    event("order-1", "confirm", {"by": "luigi", "eta_minutes": 25})
    threads(call("GET", "/workflows/order-1"))
    event("order-1", "delivered", {"courier": "mario"})
    threads(call("GET", "/workflows/order-1"))  # delivered, but not paid yet
    event("order-1", "paid", {"amount": 20.0, "method": "card"})
    event("order-1", "paid", {"amount": 7.0, "method": "cash"})
    snap = call("GET", "/workflows/order-1")
    for line in snap["data"]["log"]:
        print(f"  log: {line}")

    print()
    print("== 2. Bob fills a cart and leaves")
    call("PUT", "/workflows/pizza/order-2", {"customer": "bob"})
    event("order-2", "add_item", {"pizza": "quattro formaggi"})
    later = datetime.now(UTC) + timedelta(hours=24, minutes=1)
    with use_clock(lambda: later):  # what a worker calling run_due would see in 24 h
        for result in demo_engine.run_due():
            print(f"  24 h later, run_due: {result.id} fired {result.fired} -> {result.status}")
    snap = call("GET", "/workflows/order-2")
    for line in snap["data"]["log"]:
        print(f"  log: {line}")
    event("order-2", "checkout")  # too late: 409


def brief(body: Any) -> str:
    """One line for a response: the key facts of a snapshot, an error, or the handler output."""
    if isinstance(body, dict) and "workflow" in body and "data" in body:
        waits = ", ".join(e["name"] for e in body["awaited"]) or "nothing"
        data = body["data"]
        return (
            f"{body['id']}: {body['status']}, order {data['status']!r}, "
            f"total {data['total']:.2f}, paid {data['paid']:.2f}, awaits {waits}"
        )
    if isinstance(body, dict) and "error" in body:
        return f"{body['error']}: {body['detail']}"
    return json.dumps(body)


def threads(snap: dict[str, Any]) -> None:
    for t in snap["threads"]:
        print(f"  thread {t['id']}: {t['status']} at {t['cur_step']!r}")


if __name__ == "__main__":
    main()
