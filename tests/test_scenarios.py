"""Realistic workflows, driven the way an application drives them.

Every call goes through the "database": the blob is loaded, one gorch call is made, and the
blob written in the checkpoint callback (or after ``handle_event``) replaces it. Nothing
survives between calls except bytes, so each scenario also checks that the state is fully
carried by the blob.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pydantic
import pytest
from freezegun import freeze_time

import gorch
from gorch import For, Go, If, On, Return, S, Select, Step, Timeout, WaitFor
from gorch import ThreadStatus as TS
from gorch import WorkflowStatus as WS

MAIN = gorch.MAIN_THREAD
T0 = datetime(2031, 3, 2, 9, 30, tzinfo=UTC)


# --------------------------------------------------------------------------- the "database"


class Instance:
    """One workflow instance kept as a blob between calls, as an application keeps it."""

    def __init__(self, wf: gorch.Workflow, id: str = "wf-1") -> None:
        self.cls: type[Any] = type(wf)
        self.blob = self.dump(wf, gorch.new_state(id, self.cls.__name__.lower()))
        self.history: list[bytes] = [self.blob]

    def dump(self, wf: gorch.Workflow, state: gorch.State) -> bytes:
        blob = gorch.dumps(wf, state)
        assert gorch.dumps(*gorch.loads(blob, self.cls)) == blob
        return blob

    def load(self) -> tuple[Any, gorch.State]:
        return gorch.loads(self.blob, self.cls)

    def store(self, blob: bytes) -> None:
        self.blob = blob
        self.history.append(blob)

    @property
    def wf(self) -> Any:
        return self.load()[0]

    @property
    def state(self) -> gorch.State:
        return self.load()[1]

    def redeploy(self, cls: type[gorch.Workflow]) -> None:
        """The next calls use another version of the workflow class."""
        self.cls = cls

    def resume(self) -> gorch.WorkflowStatus:
        wf, state = self.load()
        saved: list[bytes] = []
        status = gorch.resume(wf, state, lambda kind: saved.append(self.dump(wf, state)))
        assert saved, "resume always ends with an AFTER_RESUME checkpoint"
        assert saved[-1] == self.dump(wf, state), "the last checkpoint saw the final state"
        self.store(saved[-1])
        assert status is self.state.status
        return status

    def send(self, event: str, input: Any = None, **where: Any) -> Any:
        wf, state = self.load()
        out = gorch.handle_event(wf, state, event, input, **where)
        self.store(self.dump(wf, state))
        return out

    def send_and_resume(self, event: str, input: Any = None, **where: Any) -> gorch.WorkflowStatus:
        self.send(event, input, **where)
        return self.resume()

    def rejected(self, error: type[Exception], event: str, input: Any = None, **where: Any) -> Any:
        """Deliver an event that must be refused; the state must not change."""
        wf, state = self.load()
        with pytest.raises(error) as info:
            gorch.handle_event(wf, state, event, input, **where)
        if error is not gorch.HandlerFailed:  # a failing handler may have changed data
            assert self.dump(wf, state) == self.blob
        else:
            assert gorch.dumps(self.wf, state) == self.blob
        return info.value

    def fire_due(self) -> list[str]:
        """What a cron job does: fire every due timer by name, thread and pc."""
        _, state = self.load()
        fired = []
        for req in gorch.due_events(state):
            self.send(req.name, thread_id=req.thread_id, pc=req.pc)
            fired.append(req.name)
        return fired

    def awaited(self) -> list[str]:
        return sorted(e for _, e, _ in gorch.awaited_events(self.state))

    def pc_of(self, event: str, thread_id: str = MAIN) -> int:
        [pc] = [p for t, e, p in gorch.awaited_events(self.state) if e == event and t == thread_id]
        return pc


@pytest.fixture
def clock() -> Iterator[Any]:
    with freeze_time(T0) as frozen:
        yield frozen


def now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- approval with timeout


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Expense(gorch.Workflow):
    """The SPEC's quickstart workflow."""

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
                Timeout("expired", timedelta(days=3), Step("escalate", self.escalate), Return()),
            ),
            If(self.status == "approved", Step("pay", self.pay)).Else(
                Step("tell requester", self.reject)
            ),
        )

    def notify(self) -> None:
        self.log.append("notified manager")

    def on_decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        self.approver = d.by
        return {"status": self.status}

    def escalate(self) -> None:
        self.status = "escalated"
        self.log.append("escalated")

    def pay(self) -> None:
        self.status = "paid"
        self.log.append(f"paid {self.amount} approved by {self.approver}")

    def reject(self) -> None:
        self.log.append(f"rejected by {self.approver}")


def test_expense_approved_in_time_is_paid(clock: Any) -> None:
    inst = Instance(Expense(amount=120.0))
    assert inst.resume() is WS.WAITING
    assert inst.awaited() == ["decide", "expired"]
    assert gorch.next_wakeup(inst.state) == T0 + timedelta(days=3)
    timer_pc = inst.pc_of("expired")

    clock.tick(timedelta(days=2, hours=23))
    assert inst.fire_due() == []
    out = inst.send("decide", {"approved": True, "by": "ann"})
    assert out == {"status": "approved"}
    # the timer of the wait that just ended arrives late: stale, nothing changes
    inst.rejected(gorch.StaleEvent, "expired", thread_id=MAIN, pc=timer_pc)

    assert inst.resume() is WS.FINISHED
    wf = inst.wf
    assert wf.status == "paid"
    assert wf.log == ["notified manager", "paid 120.0 approved by ann"]
    assert inst.state.threads == []
    clock.tick(timedelta(days=1))
    assert inst.fire_due() == []
    inst.rejected(gorch.WorkflowFinishedError, "expired", thread_id=MAIN, pc=timer_pc)


def test_expense_rejected_in_time_tells_the_requester(clock: Any) -> None:
    inst = Instance(Expense(amount=99.5))
    inst.resume()
    clock.tick(timedelta(hours=5))
    decision = b'{"approved": false, "by": "bob"}'  # a webhook body, as JSON bytes
    assert inst.send("decide", decision, thread_id=MAIN, pc=inst.pc_of("decide")) == {
        "status": "rejected"
    }
    assert inst.resume() is WS.FINISHED
    assert inst.wf.log == ["notified manager", "rejected by bob"]
    assert inst.wf.status == "rejected"


def test_expense_invalid_decision_is_refused_and_still_awaited(clock: Any) -> None:
    inst = Instance(Expense(amount=10.0))
    inst.resume()
    err = inst.rejected(gorch.InvalidEventInput, "decide", {"approved": "perhaps"})
    assert isinstance(err.__cause__, pydantic.ValidationError)
    assert inst.awaited() == ["decide", "expired"]
    assert inst.send_and_resume("decide", Decision(approved=True, by="cy")) is WS.FINISHED
    assert inst.wf.status == "paid"


def test_expense_times_out_after_three_days_and_escalates(clock: Any) -> None:
    inst = Instance(Expense(amount=5000.0))
    inst.resume()
    decide_pc = inst.pc_of("decide")

    clock.tick(timedelta(days=3) - timedelta(seconds=1))
    assert gorch.due_events(inst.state) == []
    assert inst.fire_due() == []
    clock.tick(timedelta(seconds=1))
    [req] = gorch.due_events(inst.state)
    assert (req.name, req.thread_id, req.pc) == ("expired", MAIN, decide_pc)
    assert inst.fire_due() == ["expired"]
    # a decision arriving now targets a wait that is over
    inst.rejected(gorch.StaleEvent, "decide", {"approved": True, "by": "ann"}, pc=decide_pc)
    inst.rejected(gorch.EventNotFound, "decide", {"approved": True, "by": "ann"})

    assert inst.resume() is WS.FINISHED
    wf = inst.wf
    assert wf.status == "escalated"
    assert wf.log == ["notified manager", "escalated"]
    assert gorch.next_wakeup(inst.state) is None


class EscalatingExpense(gorch.Workflow):
    """When the manager is silent for 3 days, the director decides (the same event name)."""

    amount: Decimal
    status: str = "new"
    approver: str = ""
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            Step("notify manager", lambda: self.log.append("asked manager")),
            Select(
                "manager decision",
                On("decide", self.on_decide),
                Timeout(
                    "manager silent",
                    timedelta(days=3),
                    Step("escalate to director", self.escalate),
                    Select(
                        "director decision",
                        On("decide", self.on_decide),
                        Timeout(
                            "director silent",
                            timedelta(days=2),
                            Step("auto reject", self.auto_reject),
                        ),
                    ),
                ),
            ),
            If(self.status == "approved", Step("pay", self.pay)).Else(
                Step("tell requester", lambda: self.log.append(f"rejected ({self.approver})"))
            ),
        )

    def on_decide(self, d: Decision) -> None:
        self.status = "approved" if d.approved else "rejected"
        self.approver = d.by

    def escalate(self) -> None:
        self.log.append("asked director")

    def auto_reject(self) -> None:
        self.status = "rejected"
        self.approver = "nobody"

    def pay(self) -> None:
        self.log.append(f"paid {self.amount} ({self.approver})")


def test_escalated_expense_is_decided_by_the_director(clock: Any) -> None:
    inst = Instance(EscalatingExpense(amount=Decimal("12500.00")))
    inst.resume()
    manager_pc = inst.pc_of("decide")
    clock.tick(timedelta(days=3))
    assert inst.fire_due() == ["manager silent"]
    assert inst.resume() is WS.WAITING
    assert inst.state.threads[0].cur_step == "director decision"
    director_pc = inst.pc_of("decide")
    assert director_pc > manager_pc
    assert gorch.next_wakeup(inst.state) == T0 + timedelta(days=5)

    # the manager's late answer, replayed with its pc, must not reach the director's wait
    inst.rejected(gorch.StaleEvent, "decide", {"approved": False, "by": "mgr"}, pc=manager_pc)
    clock.tick(timedelta(days=1))
    inst.send("decide", {"approved": True, "by": "director"}, pc=director_pc)
    assert inst.resume() is WS.FINISHED
    assert inst.wf.log == ["asked manager", "asked director", "paid 12500.00 (director)"]


def test_escalated_expense_is_rejected_when_nobody_answers(clock: Any) -> None:
    inst = Instance(EscalatingExpense(amount=Decimal("1")))
    inst.resume()
    clock.tick(timedelta(days=3))
    assert inst.fire_due() == ["manager silent"]
    inst.resume()
    clock.tick(timedelta(days=2))
    assert inst.fire_due() == ["director silent"]
    assert inst.resume() is WS.FINISHED
    assert inst.wf.log == ["asked manager", "asked director", "rejected (nobody)"]


# --------------------------------------------------------------------------- a cart loop


class Item(pydantic.BaseModel):
    sku: str
    qty: int = pydantic.Field(gt=0)
    price: Decimal


class Cart(gorch.Workflow):
    """Add items until 'checkout', or give up after 24 hours without activity."""

    items: list[Item] = []
    status: str = "shopping"
    charged: Decimal = Decimal("0")
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            For(
                "shopping",
                self.status == "shopping",  # a bool: must see the current data every time
                Select(
                    "cart",
                    On("add", self.add),
                    On("checkout", self.checkout),
                    Timeout(
                        "idle", timedelta(hours=24), Step("abandon", self.abandon), gorch.Break()
                    ),
                ),
                Step("update totals", lambda: self.log.append(f"{len(self.items)} items")),
            ),
            If(self.status == "checked out", Step("charge", self.charge)).Else(
                Step("release stock", lambda: self.log.append("released"))
            ),
        )

    def add(self, item: Item) -> int:
        self.items.append(item)
        return len(self.items)

    def checkout(self) -> Decimal:
        if not self.items:
            raise ValueError("the cart is empty")
        self.status = "checked out"
        return self.total()

    def total(self) -> Decimal:
        return sum((i.price * i.qty for i in self.items), Decimal("0"))

    def abandon(self) -> None:
        self.status = "abandoned"

    def charge(self) -> None:
        self.charged = self.total()
        self.log.append(f"charged {self.charged}")


def test_cart_loop_adds_items_until_checkout(clock: Any) -> None:
    inst = Instance(Cart())
    assert inst.resume() is WS.WAITING
    # an empty cart cannot be checked out: the handler fails, nothing changes
    err = inst.rejected(gorch.HandlerFailed, "checkout")
    assert isinstance(err.__cause__, ValueError)

    pcs = []
    items = [
        {"sku": "tea", "qty": 2, "price": "3.10"},
        Item(sku="mug", qty=1, price=Decimal("7.95")),
        b'{"sku": "pot", "qty": 1, "price": "24.00"}',
    ]
    for n, item in enumerate(items, start=1):
        clock.tick(timedelta(hours=1))
        pcs.append(inst.pc_of("add"))
        assert inst.send("add", item) == n
        assert inst.resume() is WS.WAITING
        assert inst.awaited() == ["add", "checkout", "idle"]
    assert pcs == sorted(set(pcs)), "every iteration waits with a new pc"
    for pc in pcs:  # a replayed webhook of an earlier iteration
        inst.rejected(gorch.StaleEvent, "add", {"sku": "x", "qty": 1, "price": "1"}, pc=pc)
    inst.rejected(gorch.InvalidEventInput, "add", {"sku": "x", "qty": 0, "price": "1"})

    assert inst.send("checkout") == Decimal("38.15")
    assert inst.resume() is WS.FINISHED
    wf = inst.wf
    assert wf.charged == Decimal("38.15")
    assert [i.sku for i in wf.items] == ["tea", "mug", "pot"]
    assert wf.log == ["1 items", "2 items", "3 items", "3 items", "charged 38.15"]


def test_cart_is_abandoned_after_24_idle_hours(clock: Any) -> None:
    inst = Instance(Cart())
    inst.resume()
    assert gorch.next_wakeup(inst.state) == T0 + timedelta(hours=24)
    clock.tick(timedelta(hours=23))
    assert inst.fire_due() == []
    inst.send_and_resume("add", {"sku": "tea", "qty": 1, "price": "3.10"})
    # activity restarts the timer: a new wait, a new due time
    assert gorch.next_wakeup(inst.state) == T0 + timedelta(hours=47)
    clock.tick(timedelta(hours=23))
    assert inst.fire_due() == []
    clock.tick(timedelta(hours=1))
    assert inst.fire_due() == ["idle"]
    assert inst.resume() is WS.FINISHED
    wf = inst.wf
    assert wf.status == "abandoned"
    assert wf.charged == Decimal("0")
    assert wf.log == ["1 items", "released"]


# --------------------------------------------------------------------------- workers in Go threads


class Result(gorch.Handler):
    """A Handler object: it learns the worker's thread id from the request."""

    input_type = int

    def __init__(self, wf: Fanout) -> None:
        self.wf = wf

    def handle(self, req: gorch.EventRequest, input: Any) -> Any:
        self.wf.results[req.thread_id] = input
        return {"worker": req.thread_id, "result": input}


class Fanout(gorch.Workflow):
    n: int
    i: int = 0
    wg: gorch.WaitGroup = gorch.WaitGroup()
    results: dict[str, int] = {}
    finished: list[str] = []
    total: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Step("plan", lambda: self.wg.add(self.n)),
            For(
                "spawn",
                self.i < self.n,
                Step("next worker", self.next_worker),
                Go(
                    "worker",
                    Select("work", On("result", Result(self))),
                    Step("finish", self.finish),
                    id=lambda: f"worker-{self.i}",
                ),
            ),
            self.wg.wait("all done"),
            Step("report", self.report),
        )

    def next_worker(self) -> None:
        self.i += 1

    def finish(self) -> None:
        self.finished.append(f"{len(self.results)}")
        self.wg.done()

    def report(self) -> None:
        self.total = sum(self.results.values())


def test_workers_in_go_threads_joined_by_a_waitgroup(clock: Any) -> None:
    inst = Instance(Fanout(n=4))
    assert inst.resume() is WS.WAITING
    state = inst.state
    workers = [f"worker-{k}" for k in range(1, 5)]
    assert [t.id for t in state.threads] == [MAIN, *workers]
    assert {t.name for t in state.threads[1:]} == {"worker"}
    main = state.threads[0]
    assert (main.status, main.cur_step) == (TS.WAITING_CONDITION, "all done")
    awaited = gorch.awaited_events(state)
    assert sorted(t for t, _, _ in awaited) == workers
    assert len({pc for _, _, pc in awaited}) == 4
    assert inst.wf.wg.count == 4

    err = inst.rejected(gorch.AmbiguousEvent, "result", 1)
    assert sorted(err.thread_ids) == workers

    for k, worker in enumerate(["worker-3", "worker-1", "worker-4"], start=1):
        out = inst.send("result", 10 * k, thread_id=worker)
        assert out == {"worker": worker, "result": 10 * k}
        assert inst.resume() is WS.WAITING
        assert inst.state.thread(worker) is None
        assert inst.wf.wg.count == 4 - k
        assert inst.state.threads[0].status is TS.WAITING_CONDITION
    # the last one, addressed by its pc only
    pc = inst.pc_of("result", "worker-2")
    inst.send("result", 5, pc=pc)
    assert inst.resume() is WS.FINISHED
    wf = inst.wf
    assert wf.results == {"worker-3": 10, "worker-1": 20, "worker-4": 30, "worker-2": 5}
    assert wf.total == 65
    assert wf.finished == ["1", "2", "3", "4"]
    assert wf.wg.count == 0


def test_a_worker_that_reuses_a_running_id_is_refused(clock: Any) -> None:
    class SameId(Fanout):
        def definition(self) -> gorch.Section:
            return S(
                For(
                    "spawn",
                    self.i < self.n,
                    Step("next worker", self.next_worker),
                    Go("worker", Select("work", On("result", Result(self))), id="worker"),
                ),
            )

    inst = Instance(SameId(n=2))
    with pytest.raises(gorch.ThreadExists) as info:
        inst.resume()
    assert info.value.thread_id == "worker"
    assert "worker" in str(info.value)


# --------------------------------------------------------------------------- sub-sections


class Contract(gorch.Workflow):
    approvals: dict[str, bool] = {}
    log: list[str] = []

    def review(self, dept: str) -> gorch.Section:
        """A reusable sub-workflow: its names are made distinct by ``dept``."""
        return S(
            Step(f"ask {dept}", lambda: self.log.append(f"asked {dept}")),
            Select(
                f"{dept} review",
                On("approve", lambda: self.decide(dept, True)),
                On("reject", lambda: self.decide(dept, False)),
            ),
            If(
                not self.approvals.get(dept, True),
                Step(f"{dept} said no", lambda: self.log.append(f"stopped by {dept}")),
                Return(),
            ),
        )

    def decide(self, dept: str, ok: bool) -> None:
        self.approvals[dept] = ok

    def definition(self) -> gorch.Section:
        return S(
            Step("draft", lambda: self.log.append("drafted")),
            self.review("legal"),
            self.review("finance"),
            Step("sign", lambda: self.log.append("signed")),
        )


def test_sub_section_reused_twice_runs_in_order(clock: Any) -> None:
    inst = Instance(Contract())
    inst.resume()
    assert inst.state.threads[0].cur_step == "legal review"
    legal_pc = inst.pc_of("approve")
    assert inst.send_and_resume("approve") is WS.WAITING
    assert inst.state.threads[0].cur_step == "finance review"
    # the same event name now belongs to the finance review: legal's pc is stale
    inst.rejected(gorch.StaleEvent, "approve", pc=legal_pc)
    assert inst.send_and_resume("approve", pc=inst.pc_of("approve")) is WS.FINISHED
    wf = inst.wf
    assert wf.approvals == {"legal": True, "finance": True}
    assert wf.log == ["drafted", "asked legal", "asked finance", "signed"]


def test_sub_section_can_end_the_workflow(clock: Any) -> None:
    inst = Instance(Contract())
    inst.resume()
    inst.send_and_resume("approve")
    assert inst.send_and_resume("reject") is WS.FINISHED
    wf = inst.wf
    assert wf.approvals == {"legal": True, "finance": False}
    assert wf.log == ["drafted", "asked legal", "asked finance", "stopped by finance"]


def test_sub_section_reused_with_the_same_names_is_a_definition_error() -> None:
    class Twice(Contract):
        def definition(self) -> gorch.Section:
            return S(self.review("legal"), self.review("legal"))

    wf, state = Twice(), gorch.new_state("c", "contract")
    with pytest.raises(gorch.DefinitionError, match="ask legal"):
        gorch.resume(wf, state)


# --------------------------------------------------------------------------- a pizza order


class Pizza(pydantic.BaseModel):
    kind: str
    size: int = 30


class Payment(pydantic.BaseModel):
    ref: str
    amount: Decimal


class PizzaOrder(gorch.Workflow):
    pizzas: list[Pizza] = []
    status: str = "ordering"
    paid: Decimal | None = None
    payment_failed: bool = False
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            For(
                "cart",
                self.status == "ordering",
                Select("order", On("add pizza", self.add), On("place order", self.place)),
            ),
            Select(
                "manager confirmation",
                On("confirm", lambda: self.note("confirmed")),
                On("decline", Step("apologise", lambda: self.note("sorry")), Return()),
                Timeout(
                    "confirmation timeout",
                    timedelta(minutes=30),
                    Step("auto decline", lambda: self.note("no manager")),
                    Return(),
                ),
            ),
            Go(
                "payment",
                Select(
                    "await payment",
                    On("paid", self.on_paid),
                    Timeout(
                        "payment timeout",
                        timedelta(hours=1),
                        Step("payment failed", self.fail_payment),
                    ),
                ),
                Step("receipt", lambda: self.note("receipt" if self.paid else "no receipt")),
            ),
            Step("knead dough", lambda: self.note("kneaded")),
            Step("add toppings", lambda: self.note("topped")),
            Select("oven", On("baked", lambda: self.note("baked"))),
            WaitFor("payment settled", lambda: self.paid is not None or self.payment_failed),
            If(self.payment_failed, Step("throw away", lambda: self.note("wasted")), Return()),
            Select("delivery", On("delivered", lambda: self.note("delivered"))),
            Step("close order", lambda: self.note("closed")),
        )

    def note(self, what: str) -> None:
        self.log.append(what)

    def add(self, pizza: Pizza) -> int:
        self.pizzas.append(pizza)
        return len(self.pizzas)

    def place(self) -> None:
        if not self.pizzas:
            raise ValueError("nothing to order")
        self.status = "placed"

    def on_paid(self, p: Payment) -> str:
        self.paid = p.amount
        return p.ref

    def fail_payment(self) -> None:
        self.payment_failed = True
        self.note("payment failed")


def start_pizza(clock: Any) -> Instance:
    inst = Instance(PizzaOrder(), id="order-7")
    assert inst.resume() is WS.WAITING
    assert inst.send("add pizza", {"kind": "margherita"}) == 1
    inst.resume()
    assert inst.send("add pizza", Pizza(kind="diavola", size=40)) == 2
    inst.resume()
    assert inst.send_and_resume("place order") is WS.WAITING
    assert inst.awaited() == ["confirm", "confirmation timeout", "decline"]
    return inst


def test_pizza_paid_while_baking(clock: Any) -> None:
    inst = start_pizza(clock)
    clock.tick(timedelta(minutes=5))
    assert inst.send_and_resume("confirm") is WS.WAITING
    state = inst.state
    assert [t.id for t in state.threads] == [MAIN, "payment"]
    assert state.threads[0].cur_step == "oven"
    assert state.threads[1].cur_step == "await payment"
    assert inst.awaited() == ["baked", "paid", "payment timeout"]

    assert inst.send("paid", {"ref": "tx-1", "amount": "23.50"}) == "tx-1"
    assert inst.resume() is WS.WAITING
    assert [t.id for t in inst.state.threads] == [MAIN]  # the payment thread has ended
    assert inst.send_and_resume("baked") is WS.WAITING  # the WaitFor holds at once
    assert inst.awaited() == ["delivered"]
    assert inst.send_and_resume("delivered") is WS.FINISHED
    wf = inst.wf
    assert wf.paid == Decimal("23.50")
    assert wf.log == ["confirmed", "kneaded", "topped", "receipt", "baked", "delivered", "closed"]


def test_pizza_baked_before_payment_waits_for_it(clock: Any) -> None:
    inst = start_pizza(clock)
    inst.send_and_resume("confirm")
    assert inst.send_and_resume("baked") is WS.WAITING
    main, payment = inst.state.threads
    assert (main.status, main.cur_step) == (TS.WAITING_CONDITION, "payment settled")
    assert (payment.status, payment.cur_step) == (TS.WAITING_EVENT, "await payment")
    assert inst.awaited() == ["paid", "payment timeout"]

    clock.tick(timedelta(minutes=20))
    assert inst.send_and_resume("paid", {"ref": "tx-2", "amount": "31"}) is WS.WAITING
    assert inst.awaited() == ["delivered"]
    assert inst.send_and_resume("delivered") is WS.FINISHED
    assert inst.wf.log == [
        "confirmed",
        "kneaded",
        "topped",
        "baked",
        "receipt",
        "delivered",
        "closed",
    ]


def test_pizza_payment_times_out(clock: Any) -> None:
    inst = start_pizza(clock)
    inst.send_and_resume("confirm")
    inst.send_and_resume("baked")
    paid_pc = inst.pc_of("paid", "payment")
    clock.tick(timedelta(hours=1))
    assert inst.fire_due() == ["payment timeout"]
    assert inst.resume() is WS.FINISHED
    inst.rejected(gorch.WorkflowFinishedError, "paid", {"ref": "late", "amount": "1"}, pc=paid_pc)
    wf = inst.wf
    assert wf.paid is None
    assert wf.log == [
        "confirmed",
        "kneaded",
        "topped",
        "baked",
        "payment failed",
        "no receipt",
        "wasted",
    ]


def test_pizza_declined_by_the_manager(clock: Any) -> None:
    inst = start_pizza(clock)
    assert inst.send_and_resume("decline") is WS.FINISHED
    assert inst.wf.log == ["sorry"]


def test_pizza_not_confirmed_in_30_minutes(clock: Any) -> None:
    inst = start_pizza(clock)
    clock.tick(timedelta(minutes=29, seconds=59))
    assert inst.fire_due() == []
    clock.tick(timedelta(seconds=1))
    assert inst.fire_due() == ["confirmation timeout"]
    assert inst.resume() is WS.FINISHED
    assert inst.wf.log == ["no manager"]


# --------------------------------------------------------------------------- redeploy


class ShipmentV1(gorch.Workflow):
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            Step("receive", lambda: self.log.append("received")),
            Select("await approval", On("approve")),
            Step("ship", lambda: self.log.append("shipped")),
        )


class ShipmentV2(gorch.Workflow):
    """V1 plus a step before the cursor, a new field, and two steps after the old end."""

    log: list[str] = []
    carrier: str = "post"

    def definition(self) -> gorch.Section:
        return S(
            Step("receive", lambda: self.log.append("received")),
            Step("check stock", lambda: self.log.append("checked stock")),
            Select("await approval", On("approve")),
            Step("ship", lambda: self.log.append(f"shipped by {self.carrier}")),
            Step("send invoice", lambda: self.log.append("invoiced")),
            Step("ask for review", lambda: self.log.append("asked for review")),
        )


class ShipmentRenamed(gorch.Workflow):
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            Step("receive", lambda: self.log.append("received")),
            Select("await sign-off", On("approve")),
            Step("ship", lambda: self.log.append("shipped")),
        )


def test_redeploy_adds_steps_after_the_cursor(clock: Any) -> None:
    inst = Instance(ShipmentV1())
    assert inst.resume() is WS.WAITING
    assert inst.wf.log == ["received"]
    inst.redeploy(ShipmentV2)  # the new code loads the old blob
    assert inst.wf.carrier == "post"
    assert inst.send_and_resume("approve") is WS.FINISHED
    assert inst.wf.log == ["received", "shipped by post", "invoiced", "asked for review"]


def test_redeploy_while_the_event_is_handled_but_not_yet_resumed(clock: Any) -> None:
    inst = Instance(ShipmentV1())
    inst.resume()
    inst.send("approve")
    inst.redeploy(ShipmentV2)
    assert inst.resume() is WS.FINISHED
    assert inst.wf.log == ["received", "shipped by post", "invoiced", "asked for review"]


def test_redeploy_that_removes_the_cursor_is_refused_without_change(clock: Any) -> None:
    inst = Instance(ShipmentV1())
    inst.resume()
    before = inst.blob
    inst.redeploy(ShipmentRenamed)
    wf, state = inst.load()
    with pytest.raises(gorch.CursorNotFound) as info:
        gorch.handle_event(wf, state, "approve")
    assert (info.value.thread_id, info.value.name) == (MAIN, "await approval")
    assert gorch.dumps(wf, state) == before
    with pytest.raises(gorch.CursorNotFound, match="await approval"):
        gorch.resume(wf, state)
    assert gorch.dumps(wf, state) == before
    inst.redeploy(ShipmentV1)  # rolling back works: the instance is intact
    assert inst.send_and_resume("approve") is WS.FINISHED
    assert inst.wf.log == ["received", "shipped"]


class SurveyV1(gorch.Workflow):
    answers: list[str] = []
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            For(
                "questions",
                len(self.answers) < 3,
                Select("question", On("answer", self.answer)),
            ),
            Step("thank", lambda: self.log.append("thanks")),
        )

    def answer(self, text: str) -> None:
        self.answers.append(text)


class SurveyV2(SurveyV1):
    def definition(self) -> gorch.Section:
        return S(
            For(
                "questions",
                len(self.answers) < 3,
                Select("question", On("answer", self.answer)),
                Step("acknowledge", lambda: self.log.append(f"got {self.answers[-1]}")),
            ),
            Step("thank", lambda: self.log.append("thanks")),
        )


def test_redeploy_inside_a_loop_runs_the_new_step_on_later_iterations(clock: Any) -> None:
    inst = Instance(SurveyV1())
    inst.resume()
    inst.send_and_resume("answer", "yes")
    inst.redeploy(SurveyV2)
    inst.send_and_resume("answer", "no")
    assert inst.send_and_resume("answer", "maybe") is WS.FINISHED
    wf = inst.wf
    assert wf.answers == ["yes", "no", "maybe"]
    assert wf.log == ["got no", "got maybe", "thanks"]
