"""The month-end example (examples/month_end.py) runs and tells its story."""

from __future__ import annotations

from example_support import run_example


def test_month_end_isolates_failures_escalates_on_day_3_and_honours_the_run_deadline() -> None:
    out = run_example("month_end.py")
    start, _, rest = out.partition("== a duplicate")
    # The two failing branches failed alone; bank_a completed; the Parallel's policy retries.
    assert "bank_a: 1200" in start and "connection refused" in start and "too late" in start
    assert "-> close-2026-11: retrying, next wake-up 2026-12-01T06:01:00+00:00" in start
    assert "-> close-2026-11-dup: cancelled" in rest
    retry, _, rest = rest.partition("== the worker carries on")
    # Only the failed branches ran again; the run deadline stopped the run after two banks.
    assert (
        "bank_a" not in retry.split("retries the failed branches only", 1)[1].split("reconcile")[0]
    )
    assert retry.count("reconcile:") == 2
    assert "run_due: close-2026-11 retry -> resuming" in retry
    carry, _, rest = rest.partition("== nobody approves")
    assert carry.count("reconcile:") == 1 and "-> close-2026-11: waiting" in carry
    assert "next wake-up 2026-12-03T09:00:00+00:00" in carry  # day 3, 09:00 UTC
    assert "escalate: nobody signed off" in rest and "total 975" in rest
    history = rest.split("== the history of the close", 1)[1]
    assert "bank_b (attempt 1)  FAILED ConnectionError" in history
    assert "bank_c (attempt 1)  FAILED StepTimeout" in history
    assert history.count("bank_a (attempt") == 1  # never re-run
    assert "the duplicate was cancelled by ops:ann" in history
