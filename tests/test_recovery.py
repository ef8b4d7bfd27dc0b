"""Crash recovery: a process SIGKILLed in the middle of a workflow loses nothing.

A child process (started with "spawn") starts an eight-step ``Pipeline`` and
sends it ``go``, which runs the steps. The test freezes the child inside step k
(the step waits while a ``hold-k`` file exists), delivers an event from the
parent meanwhile, and SIGKILLs the child.
A fresh ``Engine.resume`` (or ``run_due``) in the parent must then finish the
workflow, re-running only the step that was in flight: every step appends to a
log file, so the test counts how often each one started and completed.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
from recovery_app import STEPS, WORKFLOWS, run_pipeline

# tests/stores/store_support.py: real servers, isolated namespaces, skip-or-fail rule.
from stores.store_support import StoreSpec, make_spec

from gorch.engine import Engine, InstanceStatus, Snapshot

SPAWN = multiprocessing.get_context("spawn")
ALL_STEPS = list(range(1, STEPS + 1))
NOTE = "sent while a step was in flight"


@pytest.fixture(params=["sqlite", "postgres"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    yield from make_spec(request.param, tmp_path)


def read_log(workdir: Path) -> list[tuple[str, int, int]]:
    """The log as (``start`` | ``done``, step, pid) tuples."""
    path = workdir / "log"
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        what, step, pid = line.split()
        entries.append((what, int(step), int(pid)))
    return entries


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        time.sleep(0.01)


def start_child(
    spec: StoreSpec, workflow_id: str, workdir: Path, step_sleep: float = 0.0
) -> BaseProcess:
    child = SPAWN.Process(
        target=run_pipeline, args=(spec, workflow_id, str(workdir), step_sleep), daemon=True
    )
    child.start()
    return child


def kill(child: BaseProcess) -> None:
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert child.exitcode == -signal.SIGKILL, f"child exited with {child.exitcode}, not killed"


def recover(engine: Engine, workflow_id: str, how: str) -> Snapshot:
    """Finish the workflow the way an operator (resume) or a worker (run_due) would."""
    if how == "resume":
        return engine.resume(workflow_id)
    # Look once any claim or lease the killed process held on the instance has run out.
    later = datetime.now(UTC) + engine.lease + timedelta(seconds=1)
    results = engine.run_due(now=later)
    assert [(r.id, r.error) for r in results] == [(workflow_id, "")]
    return engine.get(workflow_id)


@pytest.mark.parametrize("how", ["resume", "run_due"])
@pytest.mark.parametrize("kill_at", [1, 2, 5, STEPS])
def test_sigkill_in_a_step_reruns_only_that_step_and_keeps_acknowledged_events(
    spec: StoreSpec, tmp_path: Path, kill_at: int, how: str
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    hold = workdir / f"hold-{kill_at}"
    hold.touch()
    wid = f"pipeline-{kill_at}"
    child = start_child(spec, wid, workdir)
    try:
        wait_until(
            lambda: ("start", kill_at, child.pid) in read_log(workdir),
            f"the child is inside step {kill_at}",
        )
        with spec.open() as store:
            # Acknowledged while the child is in step k: the send has returned.
            sender = Engine(store, WORKFLOWS, defer_resume=True)
            assert sender.send(wid, "note", NOTE) == 1
            kill(child)
            hold.unlink()
            snap = recover(Engine(store, WORKFLOWS), wid, how)
    finally:
        if child.is_alive():
            child.kill()
            child.join()

    assert snap.status is InstanceStatus.FINISHED
    assert snap.data["done"] == ALL_STEPS, "every step's effect is saved exactly once"
    assert snap.data["notes"] == [NOTE], "the acknowledged event was lost or applied twice"

    log = read_log(workdir)
    starts = Counter(step for what, step, _ in log if what == "start")
    completions = Counter(step for what, step, _ in log if what == "done")
    assert starts == {k: 2 if k == kill_at else 1 for k in ALL_STEPS}
    assert completions == dict.fromkeys(ALL_STEPS, 1)
    ran_by = {step: pid for what, step, pid in log if what == "done"}
    assert ran_by == {k: child.pid if k < kill_at else os.getpid() for k in ALL_STEPS}, (
        "steps before the kill are the child's and are not re-run; the rest are the parent's"
    )


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_at_an_arbitrary_moment_loses_no_step(
    spec: StoreSpec, tmp_path: Path, seed: int
) -> None:
    """No hold: the kill may land inside a step, between a step and its save, or in a save."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    wid = f"pipeline-random-{seed}"
    step_sleep = 0.03
    child = start_child(spec, wid, workdir, step_sleep)
    try:
        wait_until(lambda: bool(read_log(workdir)), "the child started its first step")
        # Always before the child can be done: the steps alone take STEPS * step_sleep.
        time.sleep(random.Random(seed).uniform(0.0, (STEPS - 1) * step_sleep))
        kill(child)
        with spec.open() as store:
            engine = Engine(store, WORKFLOWS)
            assert engine.get(wid).status is not InstanceStatus.FINISHED
            snap = engine.resume(wid)
    finally:
        if child.is_alive():
            child.kill()
            child.join()

    assert snap.status is InstanceStatus.FINISHED
    assert snap.data["done"] == ALL_STEPS
    log = read_log(workdir)
    starts = Counter(step for what, step, _ in log if what == "start")
    completions = Counter(step for what, step, _ in log if what == "done")
    assert set(starts) == set(ALL_STEPS)
    rerun = [k for k in ALL_STEPS if starts[k] > 1]
    assert len(rerun) <= 1, f"steps {rerun} ran more than once; only the in-flight one may"
    assert all(starts[k] <= 2 for k in ALL_STEPS), starts
    assert all(1 <= completions[k] <= starts[k] for k in ALL_STEPS), completions
