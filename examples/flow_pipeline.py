"""flow-orchestrator's data processing pipeline as a gorch DAG that survives a crash.

flow-orchestrator's README builds this pipeline node by node, each with
``DependsOn``, and a node reads what an earlier one produced with
``data.GetOutput(node)``::

    fetch-data → validate-data ─┬─ transform-data ─┬─ aggregate-data → store-data → generate-report
                                └─ enrich-data ────┘

With a store that keeps checkpoints, a run that crashes is resumed by
running it again with the same workflow id and store: completed nodes are
skipped and their outputs read back; a node that was running when the
process died runs again (so its side effects must be idempotent, with a key
made of the workflow id and the node name).

In gorch:

* each node is ``Step("fetch-data", self.fetch_data, after=...)`` in
  ``DAG("data-processing", ...)``;
* what a step returns is its output, kept with the instance's state, saved
  with the step. ``GetOutput("transform-data")`` is
  ``ctx.result("transform-data")`` (``ctx: gorch.StepContext``), and a node
  with one dependency gets that dependency's output as its one parameter;
* the store is a SQLite file behind ``gorch.Engine``, which saves after every
  step. Process 1 (a child process here) dies in the middle of
  ``store-data``, after its write to the warehouse. Process 2 opens a new
  Engine on the same file; once the dead process's lease runs out,
  ``run_due`` (a cron job, a worker) carries on from ``store-data``. The five
  nodes before it are not run again; ``store-data`` reads
  ``aggregate-data``'s output as process 1 saved it, and writes under the
  same idempotency key, so the warehouse holds the batch once. (It says
  "attempt 1" again: attempts count recorded failures, and a crash records
  none.)

Run it with ``.venv/bin/python examples/flow_pipeline.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import gorch
from gorch import DAG, S, Step

WF_ID = "batch-2024-05-01"
LEASE = timedelta(seconds=1)
"""How long a process may hold an instance without saving before another takes over."""
CRASH_IN: str | None = None
"""The step in which this process dies (set for process 1 from the command line)."""

SOURCE = [  # what fetch-data reads: one day's orders
    {"id": 1, "customer": "c1", "cents": 1250},
    {"id": 2, "customer": "c2", "cents": 990},
    {"id": 3, "customer": "c1", "cents": -40},  # invalid: a negative amount
    {"id": 4, "customer": "c3", "cents": 5000},
    {"id": 5, "customer": "c9", "cents": 300},
]
REGIONS = {"c1": "north", "c2": "south", "c3": "north", "c9": "west"}


def ran(ctx: gorch.StepContext, what: str) -> None:
    print(f"   [{ctx.step}] {what}")


class DataProcessing(gorch.Workflow):
    warehouse: str
    """The directory that stands in for the warehouse database."""

    def definition(self) -> gorch.Section:
        return S(
            DAG(
                "data-processing",
                Step("fetch-data", self.fetch_data),
                Step("validate-data", self.validate_data, after="fetch-data"),
                Step("transform-data", self.transform_data, after="validate-data"),
                Step("enrich-data", self.enrich_data, after="validate-data"),
                Step(
                    "aggregate-data",
                    self.aggregate_data,
                    after=["transform-data", "enrich-data"],
                ),
                Step("store-data", self.store_data, after="aggregate-data"),
                Step("generate-report", self.generate_report, after="store-data"),
            )
        )

    def fetch_data(self, ctx: gorch.StepContext) -> list[dict[str, Any]]:
        ran(ctx, f"fetched {len(SOURCE)} records")
        return SOURCE

    def validate_data(self, records: list[dict[str, Any]], ctx: gorch.StepContext) -> list[Any]:
        valid = [r for r in records if r["cents"] >= 0]
        ran(ctx, f"{len(valid)} valid, {len(records) - len(valid)} rejected")
        return valid

    def transform_data(self, valid: list[dict[str, Any]], ctx: gorch.StepContext) -> list[Any]:
        rows = [{"id": r["id"], "amount": r["cents"] / 100} for r in valid]
        ran(ctx, "amounts in euros")
        return rows

    def enrich_data(self, valid: list[dict[str, Any]], ctx: gorch.StepContext) -> dict[str, str]:
        regions = {str(r["id"]): REGIONS[r["customer"]] for r in valid}
        ran(ctx, f"regions of {len(regions)} records")
        return regions

    def aggregate_data(self, ctx: gorch.StepContext) -> dict[str, float]:
        rows = ctx.result("transform-data")  # data.GetOutput("transform-data")
        regions = ctx.result("enrich-data")
        totals: dict[str, float] = {}
        for row in rows:
            region = regions[str(row["id"])]
            totals[region] = round(totals.get(region, 0.0) + row["amount"], 2)
        ran(ctx, f"totals by region: {totals}")
        return totals

    def store_data(self, totals: dict[str, float], ctx: gorch.StepContext) -> str:
        ran(ctx, f"got {totals} from aggregate-data")
        key = f"{ctx.workflow_id}.{ctx.step}"  # the same on every attempt: an idempotent write
        path = Path(self.warehouse) / f"{key}.json"
        path.write_text(json.dumps(totals))
        ran(ctx, f"wrote {path.name} (attempt {ctx.attempt})")
        if ctx.step == CRASH_IN:
            print(f"   [{ctx.step}] the process dies here", flush=True)
            os._exit(3)  # no exception, no cleanup: as a power cut would
        return path.name

    def generate_report(self, stored: str, ctx: gorch.StepContext) -> str:
        totals = ctx.result("aggregate-data")
        lines = [f"{region}: {total:.2f} EUR" for region, total in sorted(totals.items())]
        report = f"report of {ctx.workflow_id} ({stored}): " + "; ".join(lines)
        ran(ctx, report)
        return report


WORKFLOWS: dict[str, type[gorch.Workflow]] = {"data-processing": DataProcessing}


def outputs(engine: gorch.Engine, wf_id: str) -> dict[str, Any]:
    """Every node's output as stored: what ``GetOutput`` reads after a run."""
    _, state = gorch.loads(engine.store.load(wf_id).blob, DataProcessing)
    return dict(state.results)


def process_1(tmp: str) -> None:
    """Start the pipeline; this process dies inside store-data."""
    engine = gorch.Engine(f"sqlite:///{tmp}/gorch.db", workflows=WORKFLOWS, lease=LEASE)
    engine.start("data-processing", WF_ID, {"warehouse": f"{tmp}/warehouse"})
    print("   (not reached: the process died)")


def process_2(tmp: str) -> None:
    engine = gorch.Engine(f"sqlite:///{tmp}/gorch.db", workflows=WORKFLOWS, lease=LEASE)
    snap = engine.get(WF_ID)
    nodes = next(t.nodes for t in snap.threads if t.nodes)
    print(f"   stored: status={snap.status.value}, completed: {', '.join(nodes)}")
    print(f"   stored outputs: {', '.join(outputs(engine, WF_ID))}")
    # A resuming instance is due when the lease of the process running it runs out.
    wake_at = engine.list(workflow="data-processing").items[0].wake_at
    assert wake_at is not None
    wait = (wake_at - datetime.now(UTC)).total_seconds()
    if wait > 0:
        print("   run_due waits for the dead process's lease to run out")
        time.sleep(wait + 0.05)

    for r in engine.run_due():
        print(f"   run_due -> {r.id}: {r.action}, status={r.status}")
    snap = engine.get(WF_ID)
    print(f"-> {snap.status.value}")

    out = outputs(engine, WF_ID)
    print(f'   GetOutput("store-data") -> {out["store-data"]}')
    print(f'   GetOutput("generate-report") -> {out["generate-report"]}')
    files = sorted(p.name for p in (Path(tmp) / "warehouse").iterdir())
    print(f"   warehouse: {files}")


def main() -> None:
    if sys.argv[1:2] == ["--process-1"]:
        global CRASH_IN
        CRASH_IN = "store-data"
        process_1(sys.argv[2])
        return

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "warehouse").mkdir()
        print("== process 1: run the pipeline (the machine dies during store-data)")
        child = subprocess.run(
            [sys.executable, __file__, "--process-1", tmp],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        print(child.stdout, end="")
        print(f"-> process 1 exited with code {child.returncode}")
        if child.returncode != 3:
            sys.exit(f"process 1 was expected to die in store-data:\n{child.stderr}")

        print()
        print("== process 2: a new Engine on the same SQLite file")
        process_2(tmp)


if __name__ == "__main__":
    main()
