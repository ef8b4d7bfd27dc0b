"""Month-end close: parallel fetches that fail alone, step timeouts, day-3 escalation, cancel.

::

    fetch ─┬─ bank_a ─┐                                  ┌─ approve ──────────┐
           ├─ bank_b ─┼─ reconcile (one step a bank) ─ sign-off                ├─ close_books
           └─ bank_c ─┘                                  └─ day 3, 09:00 UTC ─┘
                                                            escalate

What it shows, one feature each:

* **Failure isolation in a Parallel.** ``bank_b`` is down on the first try and
  ``bank_c`` answers too late for its ``timeout=`` (the step returns, but
  after its half second, in real time: the attempt fails with ``StepTimeout`` and what it
  returned is dropped). ``bank_a`` still completes: siblings are not stopped.
  The join reports ``ParallelFailed`` naming both failed branches, and the
  Parallel's ``retry=`` policy re-runs only those two once the backoff is over.
* **An absolute timer.** ``Timeout("escalate", ..., at=self.day_3)``: if
  nobody approves, the controller is asked on the third day of the month at
  09:00 UTC, whenever the close started ("escalate on day 3", no chain of
  relative waits).
* **A run deadline.** ``Engine(run_deadline=...)`` bounds every run: the
  reconciliation (a step per bank) is split across two worker runs instead of
  holding one worker for all of it.
* **Cancellation.** A duplicate close started by mistake is cancelled by an
  operator while it is waiting; ``run_due`` never runs it again.

Time is a virtual clock (``gorch.clock.use_clock``), so three days and the
backoffs take no time. The store is a temporary SQLite file.

Run it with ``.venv/bin/python examples/month_end.py``.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime, timedelta

import gorch
from gorch import For, On, Parallel, S, Select, Step, Timeout

START = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
NOW = [START]


def virtual_now() -> datetime:
    return NOW[0]


def move(seconds: float) -> None:
    NOW[0] += timedelta(seconds=seconds)


class MonthEnd(gorch.Workflow):
    month: str
    """The month to close, ``YYYY-MM``."""
    ledgers: dict[str, int] = {}
    reconciled: list[str] = []
    approved_by: str = ""
    closed: bool = False

    def definition(self) -> gorch.Section:
        banks = sorted(self.ledgers)
        return S(
            Parallel(
                "fetch",
                Step(self.bank_a, timeout=0.5),
                Step(self.bank_b, timeout=0.5),
                Step(self.bank_c, timeout=0.5),
                retry=gorch.Retry(attempts=3, backoff=60),
            ),
            For("reconcile", len(self.reconciled) < len(banks), Step(self.reconcile_bank)),
            Select(
                "sign-off",
                On("approve", self.approve),
                Timeout("escalate", Step(self.escalate), at=self.day_3),
            ),
            Step(self.close_books),
        )

    # -- the three fetches; a step's context tells which attempt this is
    def bank_a(self) -> int:
        self.ledgers["bank_a"] = 1200
        print("   bank_a: 1200")
        return 1200

    def bank_b(self, ctx: gorch.StepContext) -> int:
        if ctx.attempt == 1:
            print("   bank_b: connection refused")
            raise ConnectionError("bank_b is down")
        self.ledgers["bank_b"] = -300
        print(f"   bank_b: -300 (attempt {ctx.attempt})")
        return -300

    def bank_c(self, ctx: gorch.StepContext) -> int:
        if ctx.attempt == 1:
            time.sleep(0.7)  # the bank takes 0.7 s to answer: more than the step's 0.5 s
            print("   bank_c: answered after 0.7 s (too late)")
        else:
            print(f"   bank_c: 75 (attempt {ctx.attempt})")
        self.ledgers["bank_c"] = 75
        return 75

    # -- one step per bank, a second each
    def reconcile_bank(self) -> None:
        bank = sorted(self.ledgers)[len(self.reconciled)]
        move(1)
        self.reconciled.append(bank)
        print(f"   reconcile: {bank} ({self.ledgers[bank]})")

    def day_3(self) -> datetime:
        """The third day of the month after ``month``, 09:00 UTC."""
        year, month = map(int, self.month.split("-"))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return datetime(year, month, 3, 9, 0, tzinfo=UTC)

    def approve(self, who: str) -> None:
        self.approved_by = who

    def escalate(self) -> None:
        self.approved_by = "controller (escalated on day 3)"
        print("   escalate: nobody signed off; the controller signs")

    def close_books(self) -> None:
        self.closed = True
        total = sum(self.ledgers.values())
        print(f"   close_books: {self.month} closed, total {total}, by {self.approved_by}")


def report(engine: gorch.Engine, id: str) -> None:
    snap = engine.get(id)
    wake = snap.next_wakeup.isoformat() if snap.next_wakeup else "-"
    print(f"-> {id}: {snap.status.value}, next wake-up {wake}")
    if snap.error:
        print(f"   error: {snap.error}")


def run_due(engine: gorch.Engine) -> None:
    for due in engine.run_due():
        print(f"   run_due: {due.id} {due.action} -> {due.status}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, gorch.clock.use_clock(virtual_now):
        engine = gorch.Engine(
            f"sqlite:///{tmp}/close.db", {"month-end": MonthEnd}, run_deadline=1.5
        )
        print("== 1 Dec 06:00: the close of November starts")
        engine.start("month-end", "close-2026-11", {"month": "2026-11"})
        report(engine, "close-2026-11")

        print("== a duplicate is started by mistake, and cancelled by an operator")
        engine.start("month-end", "close-2026-11-dup", {"month": "2026-11"})
        engine.cancel("close-2026-11-dup", by="ops:ann")
        report(engine, "close-2026-11-dup")

        print("== a minute later the worker retries the failed branches only")
        move(60)
        run_due(engine)
        report(engine, "close-2026-11")

        print("== the worker carries on where the run deadline stopped it")
        run_due(engine)
        report(engine, "close-2026-11")

        print("== nobody approves; 3 Dec 09:00 the timer fires")
        NOW[0] = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
        run_due(engine)
        report(engine, "close-2026-11")
        final = engine.get("close-2026-11").data
        dup = engine.get("close-2026-11-dup")
        assert final["closed"]
        assert final["ledgers"] == {"bank_a": 1200, "bank_b": -300, "bank_c": 75}
        assert dup.status == "cancelled" and not dup.data["closed"]
        print("== the history of the close: each attempt, and what failed")
        for e in engine.history("close-2026-11"):
            if e.kind == "step":
                failed = f"  FAILED {e.error}" if e.error else ""
                print(f"   {e.name} (attempt {e.attempt}){failed}")
        [cancel] = [e for e in engine.history("close-2026-11-dup") if e.kind == "cancelled"]
        print(f"   the duplicate was cancelled by {cancel.by}")


if __name__ == "__main__":
    main()
