"""Several processes on one store: no lost or doubled update, no timer fired twice.

* Four processes (started with "spawn") send 25 ``inc`` events each to one
  Counter, on SQLite, PostgreSQL and Redis: the count ends at exactly 100.
* Three real ``gorch worker`` processes share a few hundred Alarms whose
  timers are due, on PostgreSQL and Redis: each alarm rings exactly once and
  finishes; then SIGTERM stops every worker promptly with exit code 0.
* A worker sent SIGTERM in the middle of a step finishes and saves that
  workflow, then exits with code 0.

Workers run as ``python -m gorch.cli worker --app tests.worker_app:engine``
from the project root: on PostgreSQL with ``--store URL`` (a search_path
naming a fresh schema), on Redis through the app's engine (a Redis URL can't
carry the key prefix that isolates the test).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from recovery_app import WORKFLOWS, send_incs

# tests/stores/store_support.py: real servers, isolated namespaces, skip-or-fail rule.
from stores.store_support import PG_DSN, StoreSpec, make_spec, require_server
from worker_app import WORKFLOWS as WORKER_WORKFLOWS

from gorch.engine import Engine, InstanceStatus
from gorch.stores import Store, open_store

SPAWN = multiprocessing.get_context("spawn")
ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- concurrent sends


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    yield from make_spec(request.param, tmp_path)


def test_concurrent_sends_from_several_processes_lose_and_double_no_update(
    spec: StoreSpec,
) -> None:
    processes, sends_each = 4, 25
    handler_pause = 0.002  # the handler's own work: time for another process to save first
    with spec.open() as store:
        Engine(store, WORKFLOWS).start("counter", "counter-1")
        start_at = time.time() + 1.5  # time for every process to spawn, then all send at once
        with ProcessPoolExecutor(processes, mp_context=SPAWN) as pool:
            futures = [
                pool.submit(send_incs, spec, "counter-1", s, sends_each, start_at, handler_pause)
                for s in range(processes)
            ]
            results = [f.result(timeout=120) for f in futures]
        snap = Engine(store, WORKFLOWS).get("counter-1")

    assert [errors for errors, _ in results] == [[]] * processes
    n = processes * sends_each
    assert snap.data["count"] == n
    expected_keys = [f"{s}-{i}" for s in range(processes) for i in range(sends_each)]
    assert sorted(snap.data["keys"]) == sorted(expected_keys), "an event was lost or doubled"
    # Each event was applied once, each time to the latest version: the counts seen are 1..n.
    assert sorted(out for _, outputs in results for out in outputs) == list(range(1, n + 1))
    assert snap.status is InstanceStatus.WAITING


# --------------------------------------------------------------------------- gorch worker


@dataclass
class WorkerSetup:
    """How the parent reaches the store, and how a ``gorch worker`` is told to use it."""

    store: Store
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(params=["postgres", "redis"])
def worker_setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkerSetup]:
    if request.param == "postgres":
        yield from _postgres_setup()
    else:
        for spec in make_spec("redis", tmp_path):
            store = spec.open()
            try:
                yield WorkerSetup(
                    store,
                    ["--app", "tests.worker_app:engine"],
                    {
                        "WORKER_APP_REDIS_URL": spec.target,
                        "WORKER_APP_REDIS_PREFIX": spec.namespace,
                    },
                )
            finally:
                store.close()


def _postgres_setup() -> Iterator[WorkerSetup]:
    """``--store URL`` whose search_path is a fresh schema, so the default table is ours."""
    require_server("postgres")
    import psycopg
    from psycopg import sql

    schema = f"gorch_mp_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    url = f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}options=-csearch_path%3D{schema}"
    store = open_store(url)
    try:
        yield WorkerSetup(store, ["--app", "tests.worker_app:engine", "--store", url])
    finally:
        store.close()
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def start_worker(setup: WorkerSetup, out_dir: Path, n: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, **setup.env}
    for var in ("GORCH_APP", "GORCH_STORE"):
        env.pop(var, None)
    argv = ["worker", *setup.args, "--poll", "0.05", "--batch", "5", "--json"]
    return subprocess.Popen(
        [sys.executable, "-m", "gorch.cli", *argv],
        cwd=ROOT,  # --app tests.worker_app:engine is imported from the working directory
        env=env,
        stdout=(out_dir / f"worker-{n}.out").open("wb"),
        stderr=(out_dir / f"worker-{n}.err").open("wb"),
    )


def worker_stderr(out_dir: Path, n: int) -> str:
    return (out_dir / f"worker-{n}.err").read_text()


def assert_running(procs: list[subprocess.Popen[bytes]], out_dir: Path) -> None:
    for n, p in enumerate(procs):
        assert p.poll() is None, (
            f"worker {n} exited with {p.returncode}: {worker_stderr(out_dir, n)}"
        )


def read_markers(path: Path) -> list[tuple[str, int]]:
    """(alarm name, pid of the worker that rang it), once per ring."""
    if not path.exists():
        return []
    return [(name, int(pid)) for name, pid in map(str.split, path.read_text().splitlines())]


def read_rings(path: Path) -> list[str]:
    return [name for name, _ in read_markers(path)]


def test_workers_fire_each_due_timer_once_and_stop_on_sigterm(
    worker_setup: WorkerSetup, tmp_path: Path
) -> None:
    alarms, workers = 300, 3
    markers = tmp_path / "markers"
    names = [f"alarm-{i:03d}" for i in range(alarms)]
    engine = Engine(worker_setup.store, WORKER_WORKFLOWS)

    procs = [start_worker(worker_setup, tmp_path, n) for n in range(workers)]
    try:
        wait_until(
            lambda: (
                all("polling" in worker_stderr(tmp_path, n) for n in range(workers))
                or any(p.poll() is not None for p in procs)
            ),
            "every worker polls",
        )
        assert_running(procs, tmp_path)
        # Every timer falls due at the same instant, so the workers race for all of them.
        due = time.monotonic() + 1.0
        for name in names:
            after_s = max(0.0, due - time.monotonic())
            data = {"name": name, "markers": str(markers), "after_s": after_s}
            assert engine.start("alarm", name, data).status is InstanceStatus.WAITING

        wait_until(
            lambda: (
                len(set(read_rings(markers))) >= alarms or any(p.poll() is not None for p in procs)
            ),
            "every alarm rang",
            timeout=45,
        )
        assert_running(procs, tmp_path)
        time.sleep(0.5)  # ten more polls each: a late double firing would show up

        for p in procs:
            p.send_signal(signal.SIGTERM)
        exit_codes = [p.wait(timeout=10) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    stderr = [worker_stderr(tmp_path, n) for n in range(workers)]
    assert exit_codes == [0] * workers, stderr
    assert all("stopped after" in err for err in stderr), stderr

    rings = Counter(read_rings(markers))
    assert rings == dict.fromkeys(names, 1), {k: v for k, v in rings.items() if v != 1}

    results: list[dict[str, Any]] = [
        json.loads(line)
        for n in range(workers)
        for line in (tmp_path / f"worker-{n}.out").read_text().splitlines()
    ]
    assert [r for r in results if r["error"]] == []
    fired = Counter(r["id"] for r in results for _ in r["fired"])
    assert fired == dict.fromkeys(names, 1)
    assert len({pid for _, pid in read_markers(markers)}) == workers, "a worker got no work"

    for name in names:
        snap = engine.get(name)
        assert (snap.status, snap.data["rings"]) == (InstanceStatus.FINISHED, 1), name


def test_sigterm_lets_a_worker_finish_the_step_in_hand_then_exit_0(
    worker_setup: WorkerSetup, tmp_path: Path
) -> None:
    log = tmp_path / "job.log"
    engine = Engine(worker_setup.store, WORKER_WORKFLOWS)
    engine.start("slow job", "job-1", {"log": str(log), "seconds": 1.0})
    proc = start_worker(worker_setup, tmp_path, 0)
    try:
        wait_until(
            lambda: log.exists() or proc.poll() is not None, "the worker is inside the slow step"
        )
        assert_running([proc], tmp_path)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert code == 0, worker_stderr(tmp_path, 0)
    assert log.read_text().split() == ["start", str(proc.pid), "done", str(proc.pid)]
    snap = engine.get("job-1")
    # The worker saved what it did before it exited: nothing is left to re-run.
    assert (snap.status, snap.data["finished_step"]) == (InstanceStatus.FINISHED, True)
