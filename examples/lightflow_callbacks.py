"""A DAG with a failing step, a hook after every step, and a restart that resumes.

The workflow is lightflow's "callbacks" example, as a gorch DAG:

* ``First`` stores a value and returns;
* ``Second`` runs after ``First`` and reads that value;
* ``ErrorStep`` depends on nothing, and fails until the operator fixes it.

``on_step_end`` / ``on_step_error`` (lifecycle hooks of ``gorch.Workflow``)
print the outcome of each step; ``on_start`` runs before the first step of the
run, ``on_failed`` when the run has failed for good, and ``on_finish`` at its end
(lightflow's flow-level callbacks). The first process runs the DAG against a
SQLite file: ``ErrorStep`` fails, and ``First`` and ``Second`` still run,
because they do not depend on it. Then the "fix" is deployed (a flag file
appears) and a *new* Engine object, as a restarted process would make, loads
the instance from the same file and retries it: only ``ErrorStep`` runs.

Run it with ``.venv/bin/python examples/lightflow_callbacks.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gorch
from gorch import DAG, S, Step


class Callbacks(gorch.Workflow):
    fixed_flag: str
    """A file whose existence means the bug behind ``ErrorStep`` is fixed."""
    value: int = 0
    seen_by_second: int = 0
    runs: dict[str, int] = {}

    def definition(self) -> gorch.Section:
        return S(
            DAG(
                "callbacks",
                Step("First", self.first),
                Step("Second", self.second, after=["First"]),
                Step("ErrorStep", self.error_step),
            )
        )

    def _count(self, step: str) -> None:
        self.runs[step] = self.runs.get(step, 0) + 1

    def first(self) -> None:
        self._count("First")
        self.value = 5
        print("   First: set value = 5")

    def second(self) -> None:
        self._count("Second")
        self.seen_by_second = self.value
        print(f"   Second: read value = {self.value}")

    def error_step(self) -> None:
        self._count("ErrorStep")
        if not Path(self.fixed_flag).exists():
            raise RuntimeError("the data source is down")
        print("   ErrorStep: the data source answered")

    # The after-step callbacks: called by gorch after each step returned or raised.
    def on_step_end(self, ctx: gorch.StepContext) -> None:
        print(f"   callback: {ctx.step} succeeded (attempt {ctx.attempt}, thread {ctx.thread_id})")

    def on_step_error(self, ctx: gorch.StepContext, error: Exception) -> None:
        print(f"   callback: {ctx.step} FAILED (attempt {ctx.attempt}): {error}")

    # The flow-level callbacks: before the run, and when it ends.
    def on_start(self) -> None:
        print("   callback: the run starts")

    def on_failed(self, error: Exception) -> None:
        print(f"   callback: the run failed: {error}")

    def on_finish(self) -> None:
        print("   callback: the run finished")


def show(engine: gorch.Engine, wf_id: str) -> None:
    snap = engine.get(wf_id)
    print(f"   stored: status={snap.status.value} version={snap.version}")
    for t in snap.threads:
        if t.nodes:
            nodes = ", ".join(f"{n}={s}" for n, s in t.nodes.items())
            print(f"   stored: DAG {t.cur_step!r} nodes: {nodes}")
    print(f"   stored: runs={snap.data['runs']} seen_by_second={snap.data['seen_by_second']}")


def first_process(url: str, flag: Path) -> None:
    engine = gorch.Engine(url, workflows={"callbacks": Callbacks})
    # start() returns once the instance is stored: a failed step leaves it "failed",
    # with the error in the snapshot, ready for retry() once the cause is fixed.
    snap = engine.start("callbacks", "cb-1", {"fixed_flag": str(flag)})
    print(f"-> {snap.status.value}: {snap.error}")
    show(engine, "cb-1")


def second_process(url: str) -> None:
    engine = gorch.Engine(url, workflows={"callbacks": Callbacks})  # nothing kept in memory
    print(f"   loaded from the store: status={engine.get('cb-1').status.value}")
    snap = engine.retry("cb-1")
    print(f"-> {snap.status.value}")
    show(engine, "cb-1")
    runs = snap.data["runs"]
    assert runs == {"First": 1, "Second": 1, "ErrorStep": 1}, runs
    print("-> First and Second ran once in all; only ErrorStep ran again")
    print("   (the failed attempt's own changes to the data were put back by the Engine)")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/gorch.db"
        flag = Path(tmp) / "fixed"

        print("== process 1: run the DAG (ErrorStep's data source is down)")
        first_process(url, flag)

        print()
        print("== the fix is deployed; process 2 starts with a new Engine on the same file")
        flag.touch()
        second_process(url)


if __name__ == "__main__":
    main()
