"""``gorch demo``: an expense approval driven through an Engine and a store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pydantic

from gorch.engine import Engine, Snapshot
from gorch.statements import If, On, Return, S, Section, Select, Step, Timeout
from gorch.workflow import Workflow


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class DemoExpense(Workflow):
    """Ask a manager; pay when approved, escalate after three days without an answer."""

    amount: float
    status: str = "new"
    approver: str = ""
    history: list[str] = []

    def definition(self) -> Section:
        return S(
            Step("notify manager", self.notify),
            Select(
                "await decision",
                On("decide", self.decide),
                Timeout("expired", timedelta(days=3), Step("escalate", self.escalate), Return()),
            ),
            If(self.status == "approved", Step("pay", self.pay)).Else(
                Step("tell requester", self.reject)
            ),
        )

    def notify(self) -> None:
        self.history.append(f"manager asked to approve {self.amount:.2f}")

    def decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        self.approver = d.by
        return {"status": self.status}

    def escalate(self) -> None:
        self.status = "escalated"
        self.history.append("no answer within 3 days: escalated")

    def pay(self) -> None:
        self.status = "paid"
        self.history.append(f"paid, approved by {self.approver}")

    def reject(self) -> None:
        self.history.append(f"rejected by {self.approver}")


def _show(title: str, snap: Snapshot) -> None:
    awaits = ", ".join(e.name for e in snap.awaited) or "-"
    print(f"== {title}\n   {snap.id}: {snap.status.value}, awaits: {awaits}")
    for line in snap.data["history"]:
        print(f"   - {line}")


def run_demo(store: str = "memory://", *, quiet: bool = False) -> list[tuple[str, Snapshot]]:
    """Run two expenses (one approved, one escalated by its timer); return each stage."""
    engine = Engine(store, {"expense": DemoExpense})
    stages: list[tuple[str, Snapshot]] = []

    def stage(title: str, snap: Snapshot) -> None:
        stages.append((title, snap))
        if not quiet:
            _show(title, snap)

    if not quiet:
        print(f"store: {engine.store.url or store}")
    first = engine.start("expense", data={"amount": 120.0})
    stage("started", first)
    out = engine.send(first.id, "decide", {"approved": True, "by": "ann"})
    stage(f"manager decided -> {out}", engine.get(first.id))

    second = engine.start("expense", data={"amount": 990.0})
    stage("started another", second)
    later = datetime.now(UTC) + timedelta(days=3, seconds=1)
    fired = [r.fired for r in engine.run_due(now=later) if r.id == second.id]
    stage(f"run_due three days later fired {fired[0] if fired else []}", engine.get(second.id))
    return stages
