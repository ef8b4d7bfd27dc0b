"""Expense approval over HTTP: a signed ``decide`` webhook, escalation after three days.

An employee files an expense; the manager gets three days to ``decide``. If
nobody answers, the ``escalate`` timer hands the expense to the director, who
then gets her own ``decide`` (the same webhook: the event name repeats in the
second Select).

Every POST and PUT is signed with the secret given to ``create_app``:
``X-Gorch-Signature: v1=<hex HMAC-SHA256>`` of the method, the path, the
query, the ``X-Gorch-Timestamp`` (unix seconds), the ``Idempotency-Key`` and
the body (see :func:`sign` below), so a signature is good for one request,
once, for five minutes. Reads (``GET``) need the bearer token instead.

Serve it (``engine`` and ``app`` are module-level)::

    gorch serve --app examples.approval_webhook:engine
    uvicorn examples.approval_webhook:app
    gorch worker --app examples.approval_webhook:engine   # fires the 3-day timers

``GORCH_STORE`` picks the store (default ``sqlite:///approval.db``),
``GORCH_SECRET`` the signing secret (default ``dev-secret``) and
``GORCH_TOKEN`` the bearer token of reads (default ``dev-token``).

Run it as a script (``python examples/approval_webhook.py``) to see the whole
story in-process, without a network: a FastAPI ``TestClient`` talks to the
same app on a temporary SQLite file, and ``gorch.clock.use_clock`` moves time
three days ahead so that ``engine.run_due()`` (what the worker calls) fires
the escalation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
import time
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic

import gorch
from gorch import If, On, S, Select, Step, Timeout
from gorch.clock import use_clock
from gorch.http import create_app

# --------------------------------------------------------------------------- the workflow


class Decision(pydantic.BaseModel):
    """The body of the decide webhook: the manager's (or the director's) answer."""

    approved: bool
    by: str
    comment: str = ""


class Expense(gorch.Workflow):
    start_input = ("requester", "amount", "description", "manager", "director")
    """What a start request may set; ``status``, ``decided_by``... are the workflow's own."""

    requester: str
    amount: float = pydantic.Field(gt=0)
    description: str = ""
    manager: str = "the manager"
    director: str = "the director"
    status: str = "pending"
    """pending -> escalated -> approved / rejected -> paid / refused."""
    decided_by: str = ""
    comment: str = ""
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            Step("notify manager", self.notify_manager),
            Select(
                "manager decision",
                On("decide", self.decide),
                Timeout(
                    "escalate",
                    timedelta(days=3),
                    Step("notify director", self.notify_director),
                    Select("director decision", On("decide", self.decide)),
                ),
            ),
            If(self.status == "approved", Step("pay", self.pay)).Else(
                Step("tell requester", self.tell_requester)
            ),
        )

    # Steps and handlers read the data through ``self`` when they run.

    def notify_manager(self) -> None:
        self.log.append(f"asked {self.manager} to approve {self.amount:.2f} for {self.requester}")

    def decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        self.decided_by = d.by
        self.comment = d.comment
        return {"status": self.status, "decided_by": d.by}

    def notify_director(self) -> None:
        self.status = "escalated"
        day = gorch.clock.now().strftime("%Y-%m-%d")
        self.log.append(
            f"{day}: no answer from {self.manager} in 3 days, escalated to {self.director}"
        )

    def pay(self) -> None:
        self.status = "paid"
        self.log.append(
            f"paid {self.amount:.2f} to {self.requester}, approved by {self.decided_by}"
        )

    def tell_requester(self) -> None:
        self.status = "refused"
        why = f" ({self.comment})" if self.comment else ""
        self.log.append(f"told {self.requester}: rejected by {self.decided_by}{why}")


# --------------------------------------------------------------------------- the service

WORKFLOWS: dict[str, type[gorch.Workflow]] = {"expense": Expense}
SECRET = os.environ.get("GORCH_SECRET", "dev-secret")
TOKEN = os.environ.get("GORCH_TOKEN", "dev-token")

engine = gorch.Engine(os.environ.get("GORCH_STORE", "sqlite:///approval.db"), WORKFLOWS)
app = create_app(engine, secret=SECRET, token=TOKEN)


def sign(
    method: str, path: str, body: bytes, secret: str = SECRET, timestamp: int | None = None
) -> dict[str, str]:
    """The headers of a signed request: what a webhook sender adds to each POST and PUT.

    Spelled out to show what is signed; ``gorch.http.sign(secret, method, path,
    body)`` does the same (and adds an ``Idempotency-Key`` with ``key=``).
    ``path`` is the path as sent, with its query (``/workflows/exp-1/events/decide?pc=1``).
    """
    ts = str(int(time.time()) if timestamp is None else timestamp)
    path, _, query = path.partition("?")
    key = ""  # the Idempotency-Key header's value, when one is sent
    message = b"\n".join([b"gorch-v1", method.encode(), path.encode(), query.encode()])
    message += b"\n" + ts.encode() + b"\n" + key.encode() + b"\n" + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return {
        "X-Gorch-Signature": f"v1={digest}",
        "X-Gorch-Timestamp": ts,
        "Content-Type": "application/json",
    }


# --------------------------------------------------------------------------- the demo


def main() -> None:
    with warnings.catch_warnings():  # newer Starlette warns that its TestClient moves
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    with tempfile.TemporaryDirectory() as tmp:
        # The same service as ``engine`` / ``app`` above, on a throw-away SQLite file.
        demo_engine = gorch.Engine(f"sqlite:///{tmp}/approval.db", WORKFLOWS)
        try:
            with TestClient(create_app(demo_engine, secret=SECRET, token=TOKEN)) as client:
                story(client, demo_engine)
        finally:
            demo_engine.store.close()


def story(client: Any, demo_engine: gorch.Engine) -> None:
    def call(method: str, path: str, data: Any = None, *, headers: Any = None) -> Any:
        body = b"" if data is None else json.dumps(data).encode()
        if headers is None:  # writes are signed, reads show the token
            reads = {"Authorization": f"Bearer {TOKEN}"}
            headers = reads if method == "GET" else sign(method, path, body)
        r = client.request(method, path, content=body, headers=headers)
        print(f"> {method} {path}" + ("" if data is None else " " + body.decode()))
        print(f"< {r.status_code} {brief(r.json())}")
        return r

    def get(id: str) -> dict[str, Any]:
        snap: dict[str, Any] = call("GET", f"/workflows/{id}").json()
        show(snap)
        return snap

    print("== 1. Bob files an expense; the manager approves it")
    call(
        "PUT",
        "/workflows/expense/exp-1",
        {"requester": "bob", "amount": 120.0, "manager": "ann", "director": "diana"},
    )
    get("exp-1")

    decide = "/workflows/expense/exp-1/events/decide"
    before = demo_engine.store.load("exp-1")
    bad = sign("POST", decide, b'{"approved": true, "by": "mallory"}')  # signs another body
    call("POST", decide, {"approved": True, "by": "mallory", "comment": "sure"}, headers=bad)
    elsewhere = sign("POST", "/workflows/expense/exp-9/events/decide", b"{}")  # another expense
    call("POST", decide, {}, headers=elsewhere)
    after = demo_engine.store.load("exp-1")
    same = after.blob == before.blob and after.version == before.version
    print(f"  the badly signed requests changed nothing: {same} (version {after.version})")

    approval = json.dumps({"approved": True, "by": "ann"}).encode()
    headers = sign("POST", decide, approval)
    call("POST", decide, {"approved": True, "by": "ann"}, headers=headers)
    call("POST", decide, {"approved": True, "by": "ann"}, headers=headers)  # a replay: 409
    get("exp-1")

    print()
    print("== 2. Carol files an expense; nobody answers for three days")
    call(
        "PUT",
        "/workflows/expense/exp-2",
        {"requester": "carol", "amount": 990.0, "manager": "ann", "director": "diana"},
    )
    get("exp-2")

    later = datetime.now(UTC) + timedelta(days=3, minutes=1)
    with use_clock(lambda: later):  # what a worker calling run_due would see in 3 days
        for result in demo_engine.run_due():
            print(f"  3 days later, run_due: {result.id} fired {result.fired} -> {result.status}")
    get("exp-2")

    call(
        "POST",
        "/workflows/expense/exp-2/events/decide",
        {"approved": False, "by": "diana", "comment": "over budget"},
    )
    get("exp-2")


def brief(body: Any) -> str:
    """One line for a response: the key facts of a snapshot, an error, or the handler output."""
    if isinstance(body, dict) and "workflow" in body and "data" in body:
        waits = ", ".join(e["name"] for e in body["awaited"]) or "nothing"
        return f"{body['id']} (version {body['version']}): {body['status']}, awaits {waits}"
    if isinstance(body, dict) and "error" in body:
        return f"{body['error']}: {body['detail']}"
    return json.dumps(body)


def show(snap: dict[str, Any]) -> None:
    """What the snapshot says: status, awaited events with their input, the log."""
    data = snap["data"]
    print(f"  status={snap['status']} expense status={data['status']!r}")
    for ev in snap["awaited"]:
        if ev["input_schema"] is not None:
            print(
                f"  awaits {ev['name']!r} (pc {ev['pc']}) with input {fields(ev['input_schema'])}"
            )
        elif ev["due"] is not None:
            due = datetime.fromisoformat(ev["due"])
            print(f"  awaits {ev['name']!r} (pc {ev['pc']}), a timer due {due:%Y-%m-%d %H:%M} UTC")
        else:
            print(f"  awaits {ev['name']!r} (pc {ev['pc']})")
    for line in data["log"]:
        print(f"  log: {line}")


def fields(schema: dict[str, Any]) -> str:
    """``{approved: boolean, by: string, comment?: string}`` from a JSON schema."""
    required = set(schema.get("required", []))
    props = schema.get("properties", {})
    parts = [f"{k}{'' if k in required else '?'}: {v.get('type', 'any')}" for k, v in props.items()]
    return "{" + ", ".join(parts) + "}"


if __name__ == "__main__":
    main()
