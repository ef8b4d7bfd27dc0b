"""An e-commerce order as a DAG, with a payment retry, logging and per-step metrics.

::

    validate ─┬─ check-inventory ─┬─ allocate ─┬─ invoice  ─┬─ confirmation
              └─ process-payment ─┘            └─ shipment ─┘

* ``process-payment`` has a retry policy (``gorch.Retry``). The payment
  gateway times out on the first call, so the Engine marks the order
  ``retrying`` and schedules the retry after the backoff; ``run_due`` (what a
  cron job or worker calls) runs it once the backoff is over. The clock is a
  virtual one (``gorch.clock.use_clock``), so the 30-second backoff takes no
  time.
* ``gorch.LoggingMiddleware`` logs every resume and step with its context in
  the record's ``extra`` fields; the formatter below prints them.
* ``StepMetrics``, a ten-line middleware, times each step and prints a table
  at the end.

Run it with ``.venv/bin/python examples/order_dag.py``.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import gorch
from gorch import DAG, S, Step
from gorch.clock import use_clock

# --------------------------------------------------------------------------- the outside world


class PaymentGateway:
    """A fake payment provider whose first call times out."""

    def __init__(self, failures: int = 1) -> None:
        self.failures = failures
        self.calls = 0

    def charge(self, order_id: str, amount: float) -> str:
        self.calls += 1
        time.sleep(0.003)  # a network round trip
        if self.calls <= self.failures:
            raise TimeoutError("payment gateway did not answer in 10 s")
        return f"pay_{order_id}_{self.calls}"


gateway = PaymentGateway()


# --------------------------------------------------------------------------- the workflow


class Order(gorch.Workflow):
    order_id: str
    items: dict[str, int]
    amount: float
    stock: dict[str, int] = {"book": 10, "lamp": 2}
    in_stock: bool = False
    payment_id: str = ""
    allocated: dict[str, int] = {}
    invoice_no: str = ""
    tracking: str = ""
    confirmed: bool = False

    def definition(self) -> gorch.Section:
        return S(
            DAG(
                "order",
                Step("validate", self.validate_order),
                Step("check-inventory", self.check_inventory, after=["validate"]),
                Step(
                    "process-payment",
                    self.process_payment,
                    after=["validate"],
                    retry=gorch.Retry(attempts=3, backoff=timedelta(seconds=30)),
                ),
                Step("allocate", self.allocate, after=["check-inventory", "process-payment"]),
                Step("invoice", self.invoice, after=["allocate"]),
                Step("shipment", self.ship, after=["allocate"]),
                Step("confirmation", self.confirm, after=["invoice", "shipment"]),
            )
        )

    def validate_order(self) -> None:
        if not self.items or self.amount <= 0:
            raise ValueError("an order needs items and a positive amount")

    def check_inventory(self) -> None:
        time.sleep(0.001)  # a query to the stock service
        missing = [i for i, n in self.items.items() if self.stock.get(i, 0) < n]
        if missing:
            raise LookupError(f"out of stock: {missing}")
        self.in_stock = True

    def process_payment(self) -> None:
        self.payment_id = gateway.charge(self.order_id, self.amount)

    def allocate(self) -> None:
        self.allocated = dict(self.items)

    def invoice(self) -> None:
        self.invoice_no = f"INV-{self.order_id}"

    def ship(self) -> None:
        self.tracking = f"TRK-{self.order_id}"

    def confirm(self) -> None:
        self.confirmed = True


# --------------------------------------------------------------------------- observability


class StepMetrics(gorch.Middleware):
    """Count and time every step attempt, by step name."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, float]] = {}

    def around_step(self, ctx: gorch.StepContext, call_next: gorch.hooks.CallNext) -> Any:
        row = self.stats.setdefault(ctx.step, {"count": 0, "failed": 0, "total": 0.0})
        t0 = time.perf_counter()
        try:
            return call_next()
        except Exception:
            row["failed"] += 1
            raise
        finally:
            row["count"] += 1
            row["total"] += time.perf_counter() - t0

    def table(self) -> str:
        lines = [f"   {'step':<16} {'count':>5} {'failed':>6} {'total ms':>9} {'mean ms':>8}"]
        for step, r in self.stats.items():
            total_ms = r["total"] * 1000
            mean_ms = total_ms / r["count"]
            count, failed = f"{r['count']:.0f}", f"{r['failed']:.0f}"
            lines.append(f"   {step:<16} {count:>5} {failed:>6} {total_ms:>9.3f} {mean_ms:>8.3f}")
        return "\n".join(lines)


class FieldsFormatter(logging.Formatter):
    """The message, then the ``gorch_*`` fields LoggingMiddleware put in ``extra``.

    A JSON formatter or structlog would pick the same fields up as they are.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {
            k: v
            for k, v in vars(record).items()
            if k.startswith("gorch_") and k != "gorch_error"  # the error is in the message
        }
        if "gorch_duration" in fields:
            fields["gorch_duration"] = f"{fields['gorch_duration'] * 1000:.3f}ms"
        if fields:
            line += "\n" + " " * 16 + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class VirtualClock:
    """What ``gorch.clock.use_clock`` reads: time moves only when told to."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# --------------------------------------------------------------------------- the story


def show(engine: gorch.Engine, order_id: str, clock: VirtualClock) -> gorch.Snapshot:
    snap = engine.get(order_id)
    print(f"   status={snap.status.value} (virtual time {clock.now:%H:%M:%S})")
    for t in snap.threads:
        if t.nodes:
            print(f"   DAG nodes ended: {', '.join(f'{n}={s}' for n, s in t.nodes.items())}")
        elif t.error:
            print(f"   thread {t.id}: on {t.cur_step!r}, attempts={t.attempts}, error={t.error}")
    if snap.next_wakeup is not None:
        print(f"   next wake-up: {snap.next_wakeup:%H:%M:%S}")
    return snap


def main() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(FieldsFormatter("   log %(levelname)-7s %(message)s"))
    logger = logging.getLogger("gorch")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    metrics = StepMetrics()
    engine = gorch.Engine(
        "memory://",
        workflows={"order": Order},
        middleware=[gorch.LoggingMiddleware("gorch"), metrics],
    )
    clock = VirtualClock()
    with use_clock(clock):
        print("== 09:00:00 the order arrives: validate, then inventory and payment")
        data = {"order_id": "1001", "items": {"book": 2, "lamp": 1}, "amount": 59.90}
        engine.start("order", "order-1001", data)
        show(engine, "order-1001", clock)

        print()
        print("== 09:00:10 the worker runs run_due: the payment retry is not due yet")
        clock.advance(10)
        print(f"   run_due -> {engine.run_due()}")

        print()
        print("== 09:00:30 the backoff is over: run_due retries the payment, the DAG goes on")
        clock.advance(20)
        for r in engine.run_due():
            print(f"   run_due -> {r.id}: action={r.action} status={r.status}")
        snap = show(engine, "order-1001", clock)

    d = snap.data
    print()
    print(
        f"== order {d['order_id']}: payment {d['payment_id']}, allocated {d['allocated']}, "
        f"invoice {d['invoice_no']}, tracking {d['tracking']}, confirmed={d['confirmed']}"
    )
    print(f"   payment gateway calls: {gateway.calls}")
    print()
    print("== step metrics (StepMetrics middleware)")
    print(metrics.table())


if __name__ == "__main__":
    main()
