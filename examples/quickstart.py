"""An expense approval: a typed ``decide`` event, a three-day timeout, msgpack in between.

Run it with ``make demo``. Each stage is what a web app would do in a separate
request: load the blob, call gorch, save the blob. Here the "database" is a
dict, and the three days pass by asking ``due_events`` about the wake-up time.
"""

from __future__ import annotations

from datetime import timedelta

import pydantic

import gorch
from gorch import If, On, Return, S, Select, Step, Timeout


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Expense(gorch.Workflow):
    amount: float
    status: str = "new"
    approver: str = ""
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            Step("notify manager", self.notify),
            Select(
                "await decision",
                On("decide", self.on_decide),
                Timeout(
                    "expired",
                    timedelta(days=3),
                    Step("escalate", self.escalate),
                    Return(),
                ),
            ),
            If(
                self.status == "approved",
                Step("pay", self.pay),
            ).Else(
                Step("tell requester", self.reject),
            ),
        )

    def notify(self) -> None:
        self.log.append(f"asked the manager to approve {self.amount:.2f}")

    def on_decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        self.approver = d.by
        return {"status": self.status}

    def escalate(self) -> None:
        self.status = "escalated"
        self.log.append("no answer in 3 days: escalated")

    def pay(self) -> None:
        self.status = "paid"
        self.log.append(f"paid {self.amount:.2f}, approved by {self.approver}")

    def reject(self) -> None:
        self.log.append(f"told the requester: rejected by {self.approver}")


db: dict[str, bytes] = {}


def show(stage: str, wf_id: str) -> None:
    wf, state = gorch.loads(db[wf_id], Expense)
    waits = [f"{e} (pc {pc})" for _, e, pc in gorch.awaited_events(state)]
    print(f"-- {stage}")
    print(f"   status={state.status.value} data.status={wf.status!r} awaits={waits}")
    wake = gorch.next_wakeup(state)
    if wake is not None:
        print(f"   next wake-up: {wake:%Y-%m-%d %H:%M} UTC")
    for line in wf.log:
        print(f"   log: {line}")
    print(f"   blob: {len(db[wf_id])} bytes")


def main() -> None:
    # 1. A request creates the workflow; resume runs it until it waits.
    wf = Expense(amount=120.0)
    state = gorch.new_state("exp-42", "expense")
    gorch.resume(wf, state)
    db["exp-42"] = gorch.dumps(wf, state)
    show("started", "exp-42")

    # 2. Days later, the manager's webhook arrives with JSON.
    wf, state = gorch.loads(db["exp-42"], Expense)
    out = gorch.handle_event(wf, state, "decide", b'{"approved": true, "by": "ann"}')
    gorch.resume(wf, state)
    db["exp-42"] = gorch.dumps(wf, state)
    show(f"decided: handler returned {out}", "exp-42")

    # 3. A second expense nobody answers: a cron job fires its due timer.
    wf = Expense(amount=990.0)
    state = gorch.new_state("exp-43", "expense")
    gorch.resume(wf, state)
    db["exp-43"] = gorch.dumps(wf, state)
    wake = gorch.next_wakeup(state)
    assert wake is not None
    wf, state = gorch.loads(db["exp-43"], Expense)
    for req in gorch.due_events(state, now=wake):
        gorch.handle_event(wf, state, req.name, thread_id=req.thread_id, pc=req.pc, now=wake)
    gorch.resume(wf, state)
    db["exp-43"] = gorch.dumps(wf, state)
    show("timer fired after 3 days", "exp-43")

    # 4. A replayed webhook is refused, and the stored blob stays as it was.
    wf, state = gorch.loads(db["exp-43"], Expense)
    try:
        gorch.handle_event(wf, state, "decide", {"approved": True, "by": "late"})
    except gorch.GorchError as e:
        print(f"-- late webhook refused: {type(e).__name__}: {e}")
    assert gorch.dumps(wf, state) == db["exp-43"]


if __name__ == "__main__":
    main()
