"""Dispatch through procrastinate on the same PostgreSQL (``gorch.dispatch.procrastinate``).

* The job "resume X" commits with the state save, in one transaction, or
  neither does (a caller's rollback takes both).
* One job waits per instance (the queueing lock): more saves enqueue nothing.
* A job for an instance that is no longer due changes nothing.
* ``start_many`` enqueues one job per instance due at once, after each batch.
* A worker SIGKILLed mid-step loses and doubles nothing: another worker's
  periodic ``run_due`` takes the instance once its lease runs out and re-runs
  only the step that was in flight.

Each test gets a schema of its own (``search_path``) holding gorch's table and
procrastinate's, dropped afterwards; workers are subprocesses killed by pid.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from recovery_app import STEPS
from stores import fault_support
from stores.store_support import PG_DSN, require_server

import gorch
from gorch import On, S, Select, Step
from gorch.bulk import StartItem
from gorch.engine import Engine, InstanceStatus

pytest.importorskip("procrastinate")

HERE = Path(__file__).parent
QUEUE = "gorch-test"


class Setup:
    def __init__(self, dsn: str, table: str, env: dict[str, str]) -> None:
        self.dsn, self.table, self.env = dsn, table, env
        self.workers: list[subprocess.Popen[bytes]] = []

    def jobs(self) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(
                "SELECT task_name, queueing_lock, status, args FROM procrastinate_jobs"
                " WHERE task_name = 'gorch.resume_due' ORDER BY id"
            ).fetchall()

    def worker(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "dispatch_app.py"), "procrastinate"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.workers.append(proc)
        return proc


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    require_server("postgres")
    schema = f"gorch_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_DSN else "?"
    dsn = f"{PG_DSN}{sep}options=-csearch_path%3D{schema}"
    env = {
        "GORCH_TEST_DSN": dsn,
        "GORCH_TEST_TABLE": f"{schema}.gorch_workflows",
        "GORCH_TEST_QUEUE": QUEUE,
        "GORCH_TEST_LEASE": "3",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    made = Setup(dsn, env["GORCH_TEST_TABLE"], {**os.environ, **env})
    with psycopg.connect(dsn, autocommit=True) as conn:
        import procrastinate

        conn.execute(procrastinate.schema.SchemaManager.get_schema())  # type: ignore[arg-type]
    try:
        yield made
    finally:
        for proc in made.workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def engine_of(setup: Setup) -> tuple[Any, Engine]:
    import dispatch_app

    return dispatch_app.procrastinate_engine()


#: Workers start in processes of their own: wait longer than the store tests do.
wait_until = functools.partial(fault_support.wait_until, timeout=30.0)


def test_the_job_commits_or_rolls_back_with_the_callers_transaction(setup: Setup) -> None:
    _, engine = engine_of(setup)
    engine.list()  # the store's table exists
    with psycopg.connect(setup.dsn) as conn:
        snap = engine.start("counter", "c-1", conn=conn)
        assert snap.status is InstanceStatus.RESUMING  # deferred: due at once
        assert setup.jobs() == []  # nothing is seen before the commit
        conn.rollback()
    assert setup.jobs() == []
    assert engine.list().items == []
    with psycopg.connect(setup.dsn) as conn:
        engine.start("counter", "c-1", conn=conn)
        conn.commit()
    assert setup.jobs() == [("gorch.resume_due", "gorch:c-1", "todo", {"id": "c-1"})]
    assert engine.get("c-1").status is InstanceStatus.RESUMING


def test_one_job_waits_per_instance_and_a_stale_job_changes_nothing(setup: Setup) -> None:
    app, engine = engine_of(setup)
    engine.start("counter", "c-2")  # deferred: saved due now, its job enqueued with it
    engine.start("counter", "c-3")
    # More saves that leave c-2 due now while its job waits: no second job.
    assert engine.send("c-2", "inc", {"by": 1, "key": "a"}) is None or True
    jobs = setup.jobs()
    assert [j[1] for j in jobs] == ["gorch:c-2", "gorch:c-3"]
    assert all(j[2] == "todo" for j in jobs)
    # c-2 is resumed by someone else first (an operator, run_due): its job is then stale.
    first = engine.resume_due("c-2")
    assert first is not None and first.outcome == "processed"
    assert engine.resume_due("c-2") is None  # not due any more: nothing to claim
    before = engine.store.load("c-2")
    with app.open():  # type: ignore[attr-defined]
        app.run_worker(queues=[QUEUE], wait=False, install_signal_handlers=False)  # type: ignore[attr-defined]
    assert engine.store.load("c-2") == before, "the stale job changed the instance"
    assert engine.get("c-3").status is InstanceStatus.WAITING, "c-3's job resumed it"
    assert [j[2] for j in setup.jobs()] == ["succeeded", "succeeded"]


def test_a_worker_sigkilled_mid_step_loses_and_doubles_nothing(
    setup: Setup, tmp_path: Path
) -> None:
    _, engine = engine_of(setup)
    workdir = tmp_path / "work"
    workdir.mkdir()
    kill_at = 3
    hold = workdir / f"hold-{kill_at}"
    hold.touch()
    first = setup.worker()
    engine.start("pipeline", "p-1", {"workdir": str(workdir)})  # deferred: a job runs it
    wait_until(lambda: engine.get("p-1").status is InstanceStatus.WAITING, "it waits for go")
    engine.send("p-1", "go")  # deferred: the job is enqueued with the event's save
    log = workdir / "log"

    def entries() -> list[tuple[str, int, int]]:
        if not log.exists():
            return []
        return [
            (w, int(s), int(p))
            for w, s, p in (line.split() for line in log.read_text().split("\n") if line)
        ]

    wait_until(
        lambda: ("start", kill_at, first.pid) in entries(), f"the worker is in step {kill_at}"
    )
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    hold.unlink()
    second = setup.worker()
    wait_until(
        lambda: engine.get("p-1").status is InstanceStatus.FINISHED,
        "another worker's run_due finished the pipeline",
        timeout=60,
    )
    snap = engine.get("p-1")
    assert snap.data["done"] == list(range(1, STEPS + 1))
    log_now = entries()
    starts = Counter(step for what, step, _ in log_now if what == "start")
    done = Counter(step for what, step, _ in log_now if what == "done")
    assert starts == {k: 2 if k == kill_at else 1 for k in range(1, STEPS + 1)}
    assert done == dict.fromkeys(range(1, STEPS + 1), 1)
    ran_by = {step: pid for what, step, pid in log_now if what == "done"}
    assert ran_by == {k: first.pid if k < kill_at else second.pid for k in range(1, STEPS + 1)}


class Waits(gorch.Workflow):
    """Blocks at once: ``start_many`` writes it as it blocks, nothing due."""

    def definition(self) -> gorch.Section:
        return S(Select("await go", On("go")))


class Mails(gorch.Workflow):
    """Runs a step first: ``start_many`` writes it due at once, for a worker."""

    mailed_by: int = 0

    def definition(self) -> gorch.Section:
        return S(Step("mail", self.mail), Select("await ack", On("ack")))

    def mail(self) -> None:
        self.mailed_by = os.getpid()


def bulk_engine(setup: Setup) -> tuple[Any, Engine]:
    import procrastinate

    from gorch.dispatch.procrastinate import ProcrastinateDispatcher
    from gorch.stores.postgres import PostgresStore

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=setup.dsn))
    engine = Engine(
        PostgresStore(setup.dsn, table=setup.table),
        {"waits": Waits, "mails": Mails},
        dispatch=ProcrastinateDispatcher(app, queue=QUEUE),
    )
    return app, engine


def test_start_many_enqueues_a_job_per_instance_due_at_once(setup: Setup) -> None:
    app, engine = bulk_engine(setup)
    waiting = engine.start_many("waits", [{}] * 3, batch=2)
    assert setup.jobs() == []  # blocked as written: nothing for a worker
    mailing = engine.start_many("mails", [StartItem(key=f"m-{n}") for n in range(5)], batch=2)
    assert sorted(j[1] for j in setup.jobs()) == sorted(f"gorch:{id}" for id in mailing)
    # The same keyed items again: nothing new is written, so nothing is enqueued.
    assert engine.start_many("mails", [StartItem(key=f"m-{n}") for n in range(5)]) == mailing
    assert len(setup.jobs()) == len(mailing)
    with app.open():  # type: ignore[attr-defined]
        app.run_worker(queues=[QUEUE], wait=False, install_signal_handlers=False)  # type: ignore[attr-defined]
    assert {engine.get(id).data["mailed_by"] for id in mailing} == {os.getpid()}
    assert {engine.get(id).status for id in mailing} == {InstanceStatus.WAITING}
    assert {engine.get(id).status for id in waiting} == {InstanceStatus.WAITING}
    assert [j[2] for j in setup.jobs()] == ["succeeded"] * len(mailing)


def test_a_batch_with_one_job_already_waiting_enqueues_the_others(setup: Setup) -> None:
    _, engine = bulk_engine(setup)
    [first] = engine.start_many("mails", [{}])
    dispatcher: Any = engine.dispatch
    dispatcher.dispatch([first, "other-1", "other-2"])  # first's job waits already
    locks = [j[1] for j in setup.jobs()]
    assert sorted(locks) == sorted([f"gorch:{first}", "gorch:other-1", "gorch:other-2"])
