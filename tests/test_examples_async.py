"""The async webhook example: it runs as a script and tells its story, and its app works.

The script runs in an empty temporary directory and must write nothing there.
The in-process tests build the example's app on a temporary SQLite file, with
the stub APIs answering at once, and drive it over its ASGI interface.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from gorch.clock import use_clock

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def load_example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    name = "gorch_example_async_webhook"
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "async_webhook.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # pydantic resolves names there
    spec.loader.exec_module(module)
    return module


def assert_in_order(out: str, *expected: str) -> None:
    at = 0
    for text in expected:
        found = out.find(text, at)
        assert found >= 0, f"{text!r} not found after position {at} in:\n{out}"
        at = found + len(text)


def test_the_script_tells_the_whole_story(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GORCH_STORE", "SHOP_API")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "async_webhook.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert list(tmp_path.iterdir()) == [], "the demo wrote files in the current directory"
    assert_in_order(
        out,
        "== 1. Ann orders a lamp and a rug",
        "[api] reserve ['lamp', 'rug'] for o-1",
        "< 201 {'id': 'o-1', 'status': 'waiting', 'order': 'awaiting payment'}",
        "== 2.",
        "< 200 {'order': 'o-1', 'status': 'paid'}",
        "courier and mail were called at once",
        "< 200 {'order': 'o-1', 'status': 'paid'} (the retry applied nothing)",
        "order o-1: finished, shipped, tracking TRK-o-1",
        "== 3.",
        "< 422 invalid body",
        "< 422 HandlerFailed",
        "< 404 WorkflowNotFound",
        "order o-2 untouched: True",
        "== 4.",
        "[api] release r-o-2",
        "run_due: o-2 fired ['unpaid'] -> finished",
        "order o-2: finished, expired",
    )
    section_2 = out[out.index("== 2.") : out.index("== 3.")]
    assert section_2.count("[api] book a courier for o-1") == 1  # once, despite the retry
    assert section_2.count("[api] mail ann: order o-1 is paid") == 1
    assert "Traceback" not in out + done.stderr


@pytest.fixture
async def shop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[tuple[ModuleType, Any, httpx.AsyncClient]]:
    """The example's app on a temporary SQLite file; the stub APIs answer at once."""
    module = load_example(monkeypatch)
    stub = module.stub_apis(delay=0)
    app = module.create_shop(
        f"sqlite:///{tmp_path}/shop.db", httpx.ASGITransport(app=stub), poll=0.05
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield module, stub, c
        assert type(app.state.engine).__name__ == "AsyncEngine"


async def order(c: httpx.AsyncClient, id: str, total: float = 30) -> None:
    r = await c.post("/orders", json={"id": id, "customer": "ann", "items": ["x"], "total": total})
    assert r.status_code == 201, r.text


async def test_a_paid_order_is_shipped_and_a_retried_webhook_applies_nothing(
    shop: tuple[ModuleType, Any, httpx.AsyncClient],
) -> None:
    _, stub, c = shop
    await order(c, "o-1")
    paid = {"order_id": "o-1", "amount": 30, "reference": "p-1"}
    for _ in range(3):
        r = await c.post("/webhooks/payments", json=paid, headers={"Idempotency-Key": "k-1"})
        assert (r.status_code, r.json()) == (200, {"order": "o-1", "status": "paid"})
    snap = (await c.get("/orders/o-1")).json()
    assert snap["status"] == "finished"
    assert snap["data"]["status"] == "shipped" and snap["data"]["tracking"] == "TRK-o-1"
    assert sorted(stub.state.calls) == [
        "book a courier for o-1",
        "mail ann: order o-1 is paid",
        "reserve ['x'] for o-1",
    ]
    r = await c.post(
        "/webhooks/payments",
        json={**paid, "reference": "p-2"},
        headers={"Idempotency-Key": "k-1"},
    )
    assert r.status_code == 409 and r.json()["detail"]["error"] == "IdempotencyKeyReused"


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"order_id": "o-1", "amount": "lots", "reference": "x"}, 422, None),
        ({"order_id": "o-1", "amount": 1, "reference": "x"}, 422, "HandlerFailed"),
        ({"order_id": "o-1", "amount": 30}, 422, None),
    ],
)
async def test_a_bad_payment_is_refused_and_changes_nothing(
    shop: tuple[ModuleType, Any, httpx.AsyncClient],
    body: dict[str, Any],
    status: int,
    error: str | None,
) -> None:
    _, _, c = shop
    await order(c, "o-1")
    before = (await c.get("/orders/o-1")).json()
    r = await c.post("/webhooks/payments", json=body)
    assert r.status_code == status
    if error is not None:
        assert r.json()["detail"]["error"] == error
    assert (await c.get("/orders/o-1")).json() == before


async def test_an_unpaid_order_releases_its_stock_a_day_later(
    shop: tuple[ModuleType, Any, httpx.AsyncClient],
) -> None:
    module, stub, c = shop
    await order(c, "o-1")
    engine = c._transport.app.state.engine  # type: ignore[attr-defined]
    assert await engine.run_due() == []
    tomorrow = datetime.now(UTC) + module.PAYMENT_WINDOW + timedelta(minutes=1)
    with use_clock(lambda: tomorrow):
        [result] = await engine.run_due()
    assert (result.id, result.fired, result.status) == ("o-1", ["unpaid"], "finished")
    assert stub.state.calls[-1] == "release r-o-1"
    snap = (await c.get("/orders/o-1")).json()
    assert snap["data"]["status"] == "expired"
    r = await c.post("/webhooks/payments", json={"order_id": "o-1", "amount": 30, "reference": "x"})
    assert r.status_code == 409


async def test_the_module_level_app_reads_its_store_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GORCH_STORE", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.delenv("SHOP_API", raising=False)
    module = load_example(monkeypatch)
    async with module.app.router.lifespan_context(module.app):
        assert module.app.state.engine.store.url == f"sqlite:///{tmp_path}/env.db"
