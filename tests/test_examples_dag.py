"""The DAG, composition and middleware examples run as scripts and tell what they did."""

from __future__ import annotations

import re

from example_support import run_example


def in_order(text: str, *parts: str) -> bool:
    """Whether every part occurs in ``text``, each after the previous one."""
    pos = 0
    for p in parts:
        found = text.find(p, pos)
        if found < 0:
            return False
        pos = found + len(p)
    return True


def test_lightflow_callbacks_resumes_at_the_failed_step_only() -> None:
    out = run_example("lightflow_callbacks.py")
    first, sep, second = out.partition("== the fix is deployed")
    assert sep, out

    # Process 1: the hooks report each outcome; the unrelated steps still ran.
    assert in_order(first, "callback: the run starts", "callback: First succeeded")
    assert "callback: the run failed: DAG 'callbacks'" in first
    assert "callback: the run finished" not in first
    assert "the run starts" not in second  # the retry is not a new run
    assert in_order(second, "callback: ErrorStep succeeded", "callback: the run finished")
    assert "callback: First succeeded" in first
    assert "callback: ErrorStep FAILED (attempt 1): the data source is down" in first
    assert "callback: Second succeeded" in first
    assert in_order(first, "First: set value = 5", "Second: read value = 5")
    assert "-> failed: failed nodes: ErrorStep: RuntimeError: the data source is down" in first
    assert "Second=completed" in first  # not skipped: it does not depend on ErrorStep
    assert "stored: status=failed" in first
    assert "First=completed" in first and "ErrorStep=failed" in first

    # Process 2 (a new Engine on the same SQLite file): only ErrorStep runs.
    assert "loaded from the store: status=failed" in second
    assert "callback: ErrorStep succeeded" in second
    assert "First" not in second.split("-> finished")[0]
    assert "Second:" not in second and "Second succeeded" not in second
    assert "stored: status=finished" in second
    assert "runs={'First': 1, 'Second': 1, 'ErrorStep': 1} seen_by_second=5" in second
    assert "only ErrorStep ran again" in second


def test_order_dag_retries_payment_logs_and_measures() -> None:
    out = run_example("order_dag.py")
    start, _, rest = out.partition("== 09:00:10")
    early, _, late = rest.partition("== 09:00:30")

    # The first resume: payment fails, the Engine schedules the retry after the backoff.
    assert in_order(
        start,
        "step 'validate' of order 'order-1001' (attempt 1) ok",
        "step 'check-inventory' of order 'order-1001' (attempt 1) ok",
        "WARNING step 'process-payment' of order 'order-1001' (attempt 1) failed: TimeoutError",
    )
    assert "gorch_thread=order.process-payment gorch_step=process-payment gorch_attempt=1" in start
    assert "gorch_reason=start" in start
    assert "status=retrying" in start
    assert "DAG nodes ended: validate=completed, check-inventory=completed" in start
    assert "next wake-up: 09:00:30" in start
    assert "allocate" not in start

    # run_due before the backoff is over does nothing.
    assert "run_due -> []" in early

    # After it: the payment succeeds on attempt 2 and the rest of the DAG runs.
    assert in_order(
        late,
        "step 'process-payment' of order 'order-1001' (attempt 2) ok",
        "step 'allocate'",
        "step 'invoice'",
        "step 'shipment'",
        "step 'confirmation'",
        "gorch_reason=retry",
        "run_due -> order-1001: action=retry status=finished",
    )
    assert "step 'validate'" not in late and "step 'check-inventory'" not in late
    assert "payment pay_1001_2" in out and "confirmed=True" in out
    assert "payment gateway calls: 2" in out

    # The metrics table: one row per step; payment ran twice, failed once.
    table = out.partition("== step metrics")[2]
    assert re.search(r"step\s+count\s+failed\s+total ms\s+mean ms", table)
    assert re.search(r"process-payment\s+2\s+1\s+\d+\.\d{3}\s+\d+\.\d{3}", table)
    for step in ("validate", "check-inventory", "allocate", "invoice", "shipment", "confirmation"):
        assert re.search(rf"\n\s+{step}\s+1\s+0\s+\d+\.\d{{3}}\s+\d+\.\d{{3}}", table), step


def test_etl_runs_the_parallel_transforms_and_the_fan_in() -> None:
    out = run_example("etl.py")
    etl, _, fan = out.partition("== 2.")

    assert "Parallel('transform_a|transform_b'" in etl
    assert in_order(
        etl,
        "[_main_] extract",
        "[transform_a|transform_b.transform_a] transform_a",
        "[transform_a|transform_b.transform_b] transform_b",
        "[_main_] load",
        "load: wrote 3 items over 2 days",
        "-> finished: 3 items over 2 days",
    )
    assert "totals by item {'book': 25.0, 'lamp': 40.0, 'pen': 1.2}" in etl

    before, _, after = fan.partition("shard 2's data arrives")
    assert in_order(
        before,
        "[wordcount.split] split",
        "[wordcount.count-0] count-0",
        "[wordcount.count-1] count-1",
        "-> waiting: nodes ended: split=completed, count-0=completed, count-1=completed",
        "awaited: [('wordcount.count-2', 'shard-2-ready')]",
        "merge has not run (total=0)",
    )
    assert "merge:" not in before
    assert in_order(
        after,
        "[wordcount.count-2] count shard 2",
        "shard 2: 6 words",
        "[wordcount.merge] merge",
        "merge: 12 words from shards ['0', '1', '2']",
        "-> finished: counts={'0': 3, '1': 3, '2': 6} total=12",
    )
    assert "split" not in after and "count-0" not in after
