"""An async shop: a FastAPI app with ``gorch.AsyncEngine``, async steps calling HTTP APIs.

An order reserves stock at the warehouse API, then waits for the payment
provider's ``paid`` webhook (or a day, after which the stock is released).
Once paid, two independent steps, booking a courier and emailing the
customer, call their APIs *at the same time* (``|``), then the order closes.
Every step is ``async def`` and calls an API through one shared
``httpx.AsyncClient``, so nothing blocks the event loop: while a step waits
for an API, the app serves other requests.

The routes are written here with ``AsyncEngine`` (``POST /orders``,
``POST /webhooks/payments``, ``GET /orders/{id}``); ``gorch.http.create_app``
also serves an ``AsyncEngine`` with signed webhooks and generated docs. A
background task runs ``engine.work()`` (the worker, which fires the one-day
timers) for as long as the app runs.

Serve it::

    uvicorn examples.async_webhook:app

``GORCH_STORE`` picks the store (default ``sqlite:///shop.db``) and ``SHOP_API``
the base URL of the warehouse, courier and mail APIs (default: the stub below,
in-process).

Run it as a script (``python examples/async_webhook.py``) to see the story
in-process, without a network: an ``httpx`` client talks to the app over its
ASGI interface, the steps call the stub APIs the same way, the store is a
temporary SQLite file, and ``gorch.clock.use_clock`` moves time a day ahead
so that ``engine.run_due()`` fires the expiry of an unpaid order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pydantic
from fastapi import FastAPI, Header, HTTPException

import gorch
from gorch import On, Return, S, Select, Step, Timeout
from gorch.clock import use_clock

PAYMENT_WINDOW = timedelta(days=1)


# ------------------------------------------------------------------ the APIs the steps call


class Services:
    """The HTTP client the steps share: set up when the app starts, closed when it stops.

    A workflow's data is what is saved, so a client (a connection pool) lives
    outside it, here, and steps reach it through this module.
    """

    client: httpx.AsyncClient | None = None

    @classmethod
    def http(cls) -> httpx.AsyncClient:
        if cls.client is None:
            raise RuntimeError("the app is not started: Services.client is not set")
        return cls.client


def stub_apis(delay: float = 0.2) -> FastAPI:
    """Stand-ins for the warehouse, courier and mail APIs: each call takes ``delay`` seconds.

    ``stub.state.calls`` lists what was called, so a demo (or a test) can show it.
    """
    stub = FastAPI(title="shop APIs (stub)")
    stub.state.calls = []

    def called(what: str) -> None:
        stub.state.calls.append(what)
        print(f"    [api] {what}")

    @stub.post("/warehouse/reservations")
    async def reserve(body: dict[str, Any]) -> dict[str, str]:
        await asyncio.sleep(delay)
        called(f"reserve {body['items']} for {body['order']}")
        return {"reservation": f"r-{body['order']}"}

    @stub.delete("/warehouse/reservations/{reservation}")
    async def release(reservation: str) -> dict[str, bool]:
        await asyncio.sleep(delay)
        called(f"release {reservation}")
        return {"released": True}

    @stub.post("/courier/bookings")
    async def book(body: dict[str, Any]) -> dict[str, str]:
        await asyncio.sleep(delay)
        called(f"book a courier for {body['order']}")
        return {"tracking": f"TRK-{body['order']}"}

    @stub.post("/mail")
    async def mail(body: dict[str, Any]) -> dict[str, bool]:
        await asyncio.sleep(delay)
        called(f"mail {body['to']}: {body['subject']}")
        return {"queued": True}

    return stub


# --------------------------------------------------------------------------- the workflow


class Payment(pydantic.BaseModel):
    """The body of the payment provider's webhook."""

    order_id: str
    amount: float
    reference: str


class Order(gorch.Workflow):
    order_id: str
    customer: str
    items: list[str]
    total: float = pydantic.Field(gt=0)
    reservation: str = ""
    paid_ref: str = ""
    tracking: str = ""
    status: str = "new"

    def definition(self) -> gorch.Section:
        return S(
            Step("reserve stock", self.reserve),
            Select(
                "await payment",
                On("paid", self.paid),
                Timeout(
                    "unpaid",
                    PAYMENT_WINDOW,
                    Step("release stock", self.release),
                    Return(),
                ),
            ),
            Step("book courier", self.book_courier) | Step("email customer", self.email),
            Step("close", self.close),
        )

    async def reserve(self) -> None:
        r = await Services.http().post(
            "/warehouse/reservations", json={"order": self.order_id, "items": self.items}
        )
        r.raise_for_status()
        self.reservation = r.json()["reservation"]
        self.status = "awaiting payment"

    def paid(self, payment: Payment) -> dict[str, str]:  # a plain handler: no I/O here
        if payment.amount < self.total:
            raise ValueError(f"paid {payment.amount:.2f}, the order is {self.total:.2f}")
        self.paid_ref = payment.reference
        self.status = "paid"
        return {"order": self.order_id, "status": self.status}

    async def release(self) -> None:
        r = await Services.http().delete(f"/warehouse/reservations/{self.reservation}")
        r.raise_for_status()
        self.status = "expired"

    async def book_courier(self) -> None:
        r = await Services.http().post("/courier/bookings", json={"order": self.order_id})
        r.raise_for_status()
        self.tracking = r.json()["tracking"]

    async def email(self) -> None:
        r = await Services.http().post(
            "/mail", json={"to": self.customer, "subject": f"order {self.order_id} is paid"}
        )
        r.raise_for_status()

    def close(self) -> None:
        self.status = "shipped"


WORKFLOWS: dict[str, type[gorch.Workflow]] = {"order": Order}


# --------------------------------------------------------------------------- the app


class NewOrder(pydantic.BaseModel):
    id: str
    customer: str
    items: list[str]
    total: float


# gorch errors a caller can act on, and their HTTP status (anything else is a 500).
STATUS_OF: dict[type[gorch.GorchError], int] = {
    gorch.WorkflowNotFound: 404,
    gorch.WorkflowExists: 409,
    gorch.InvalidWorkflowData: 422,
    gorch.InvalidEventInput: 422,
    gorch.HandlerFailed: 422,
    gorch.EventNotFound: 409,
    gorch.WorkflowNotActive: 409,
    gorch.WorkflowFinishedError: 409,
    gorch.TimerNotSendable: 409,
    gorch.IdempotencyKeyReused: 409,
    gorch.InvalidIdempotencyKey: 400,
}


def http_error(e: gorch.GorchError) -> HTTPException:
    status = next((s for cls, s in STATUS_OF.items() if isinstance(e, cls)), 500)
    return HTTPException(status, {"error": type(e).__name__, "message": str(e)})


def create_shop(
    store: str | None = None,
    api: httpx.AsyncBaseTransport | str | None = None,
    *,
    poll: float = 1.0,
) -> FastAPI:
    """The shop app: an ``AsyncEngine`` on ``store``, steps calling the APIs at ``api``.

    ``api`` is a base URL, or an httpx transport (the in-process stub by default).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = store or os.environ.get("GORCH_STORE", "sqlite:///shop.db")
        base = api or os.environ.get("SHOP_API") or httpx.ASGITransport(app=stub_apis())
        if isinstance(base, str):
            client = httpx.AsyncClient(base_url=base, timeout=10)
        else:
            client = httpx.AsyncClient(transport=base, base_url="http://shop-apis", timeout=10)
        engine = gorch.AsyncEngine(url, WORKFLOWS)
        app.state.engine = engine
        Services.client = client
        stop = asyncio.Event()
        worker = asyncio.create_task(engine.work(poll=poll, stop=stop))
        try:
            yield
        finally:
            stop.set()
            await worker
            await client.aclose()
            Services.client = None
            await engine.close()

    app = FastAPI(title="async shop", lifespan=lifespan)

    def engine_of() -> gorch.AsyncEngine:
        engine: gorch.AsyncEngine = app.state.engine
        return engine

    @app.post("/orders", status_code=201)
    async def place_order(order: NewOrder) -> dict[str, Any]:
        data = {"order_id": order.id, **order.model_dump(exclude={"id"})}
        try:
            snap = await engine_of().start("order", order.id, data)
        except gorch.GorchError as e:
            raise http_error(e) from e
        return {"id": snap.id, "status": snap.status, "order": snap.data["status"]}

    @app.post("/webhooks/payments")
    async def payment_webhook(
        payment: Payment, idempotency_key: str | None = Header(default=None)
    ) -> Any:
        # The provider retries until it gets a 2xx: its key makes a retry apply nothing twice.
        try:
            return await engine_of().send(
                payment.order_id, "paid", payment.model_dump(), key=idempotency_key
            )
        except gorch.GorchError as e:
            raise http_error(e) from e

    @app.get("/orders/{id}")
    async def get_order(id: str) -> dict[str, Any]:
        try:
            snap = await engine_of().get(id)
        except gorch.GorchError as e:
            raise http_error(e) from e
        return {
            "id": snap.id,
            "status": snap.status,
            "version": snap.version,
            "data": snap.data,
            "awaits": [e.name for e in snap.awaited],
        }

    return app


app = create_shop()


# --------------------------------------------------------------------------- the story


async def demo() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shop = create_shop(f"sqlite:///{tmp}/shop.db")
        transport = httpx.ASGITransport(app=shop)
        async with (
            shop.router.lifespan_context(shop),
            httpx.AsyncClient(transport=transport, base_url="http://shop") as http,
        ):
            print("== 1. Ann orders a lamp and a rug")
            r = await http.post(
                "/orders",
                json={"id": "o-1", "customer": "ann", "items": ["lamp", "rug"], "total": 80},
            )
            print(f"< {r.status_code} {r.json()}")

            print("\n== 2. The payment provider calls the webhook, twice, with one key")
            paid = {"order_id": "o-1", "amount": 80, "reference": "pay-123"}
            headers = {"Idempotency-Key": "evt-1"}
            t0 = time.perf_counter()
            r = await http.post("/webhooks/payments", json=paid, headers=headers)
            took = time.perf_counter() - t0
            print(f"< {r.status_code} {r.json()}")
            print(f"  (courier and mail were called at once: {took:.2f}s for two 0.2s calls)")
            r = await http.post("/webhooks/payments", json=paid, headers=headers)
            print(f"< {r.status_code} {r.json()} (the retry applied nothing)")
            order = (await http.get("/orders/o-1")).json()
            print(
                f"  order o-1: {order['status']}, {order['data']['status']}, "
                f"tracking {order['data']['tracking']}"
            )

            print("\n== 3. Bob orders a vase, then bad payments are refused")
            r = await http.post(
                "/orders", json={"id": "o-2", "customer": "bob", "items": ["vase"], "total": 30}
            )
            print(f"< {r.status_code} {r.json()}")
            before = (await http.get("/orders/o-2")).json()
            for body in (
                {"order_id": "o-2", "amount": "lots", "reference": "x"},
                {"order_id": "o-2", "amount": 5, "reference": "x"},
                {"order_id": "o-9", "amount": 30, "reference": "x"},
            ):
                r = await http.post("/webhooks/payments", json=body)
                detail = r.json()["detail"]
                why = detail["error"] if isinstance(detail, dict) else "invalid body"
                print(f"< {r.status_code} {why}")
            after = (await http.get("/orders/o-2")).json()
            print(f"  order o-2 untouched: {after == before} (version {after['version']})")

            print("\n== 4. Bob never pays: a day later the stock is released")
            engine: gorch.AsyncEngine = shop.state.engine
            tomorrow = datetime.now(UTC) + PAYMENT_WINDOW + timedelta(minutes=1)
            with use_clock(lambda: tomorrow):
                results = await engine.run_due()
            for res in results:
                print(f"  a day later, run_due: {res.id} fired {res.fired} -> {res.status}")
            order = (await http.get("/orders/o-2")).json()
            print(f"  order o-2: {order['status']}, {order['data']['status']}")


if __name__ == "__main__":
    asyncio.run(demo())
