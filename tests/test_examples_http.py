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
import subprocess
import sys
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gorch.clock import use_clock
from gorch.http import sign

with warnings.catch_warnings():  # newer Starlette warns that its TestClient moves to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECRET = "test-secret"


def run_script(name: str, tmp_path: Path) -> str:
    """Run ``examples/<name>`` in an empty directory; return its stdout."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "GORCH_STORE": f"sqlite:///{tmp_path}/unused.db"}
    env.pop("GORCH_SECRET", None)
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

    def load(name: str, *, secret: str | None = None) -> ModuleType:
        monkeypatch.setenv("GORCH_STORE", f"sqlite:///{tmp_path}/{name}.db")
        if secret is None:
            monkeypatch.delenv("GORCH_SECRET", raising=False)
        else:
            monkeypatch.setenv("GORCH_SECRET", secret)
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
        "< 201 exp-1 (version 1): waiting, awaits decide, escalate",
        "> GET /workflows/exp-1",
        "awaits 'decide' (pc 1) with input {approved: boolean, by: string, comment?: string}",
        "awaits 'escalate' (pc 1), a timer due",
        "< 401 InvalidSignature",
        "the badly signed request changed nothing: True (version 1)",
        "> POST /workflows/expense/exp-1/events/decide",
        '< 200 {"status": "approved", "decided_by": "ann"}',
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
    module = load_example("approval_webhook", secret=SECRET)
    return module, TestClient(module.app)


def signed_post(c: TestClient, path: str, data: Any, method: str = "POST") -> Any:
    body = json.dumps(data).encode()
    headers = {"Content-Type": "application/json", **sign(SECRET, body)}
    return c.request(method, path, content=body, headers=headers)


def test_approval_app_takes_a_signed_decision(load_example: Any) -> None:
    module, c = approval_client(load_example)
    r = signed_post(c, "/workflows/expense/e-1", {"requester": "bob", "amount": 50}, "PUT")
    assert r.status_code == 201, r.text
    snap = c.get("/workflows/e-1").json()  # GETs are not signed
    assert snap["status"] == "waiting"
    decide = next(e for e in snap["awaited"] if e["name"] == "decide")
    assert decide["input_schema"]["required"] == ["approved", "by"]
    assert [e["name"] for e in snap["awaited"]] == ["decide", "escalate"]

    # The example's own helper signs like gorch.http.sign.
    body = b'{"approved": true, "by": "ann", "comment": "ok"}'
    assert module.sign(body, SECRET)["X-Gorch-Signature"] == sign(SECRET, body)["X-Gorch-Signature"]
    r = c.post("/workflows/expense/e-1/events/decide", content=body, headers=module.sign(body))
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "approved", "decided_by": "ann"}

    snap = c.get("/workflows/e-1").json()
    assert snap["status"] == "finished"
    assert snap["data"]["status"] == "paid"
    assert snap["data"]["comment"] == "ok"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Gorch-Signature": "sha256=" + "0" * 64},
        sign("another-secret", b'{"approved": true, "by": "mallory"}'),
    ],
    ids=["unsigned", "wrong-digest", "wrong-secret"],
)
def test_approval_app_refuses_unsigned_decisions(
    load_example: Any, headers: dict[str, str]
) -> None:
    module, c = approval_client(load_example)
    signed_post(c, "/workflows/expense/e-1", {"requester": "bob", "amount": 50}, "PUT")
    before = module.engine.store.load("e-1")
    r = c.post(
        "/workflows/expense/e-1/events/decide",
        content=b'{"approved": true, "by": "mallory"}',
        headers={"Content-Type": "application/json", **headers},
    )
    assert r.status_code == 401
    assert r.json()["error"] == "InvalidSignature"
    after = module.engine.store.load("e-1")
    assert (after.blob, after.version, after.status) == (before.blob, before.version, before.status)
    # An unsigned start is refused too, and creates nothing.
    r = c.put("/workflows/expense/e-2", json={"requester": "eve", "amount": 1})
    assert r.status_code == 401
    assert c.get("/workflows/e-2").status_code == 404


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
