"""Dispatch through Celery (``gorch.dispatch.celery``), with RabbitMQ and Redis as brokers.

* A deferred save sends "resume X" once it has committed; a worker resumes X.
* A message that cannot be sent loses nothing: ``run_due`` finds X due.
* Two messages for one instance run it once; the second is a no-op.
* ``start_many`` sends one message per instance due at once, after each batch.
* A worker SIGKILLed mid-step (``acks_late``: its message comes back) loses
  and doubles nothing: the instance's lease runs out and the periodic
  ``run_due`` (beat, in the next worker) re-runs only the step in flight.

Each test has a queue (and, on Redis, a key prefix) of its own, removed
afterwards; workers are subprocesses killed by pid.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from recovery_app import STEPS
from stores import fault_support
from stores.store_support import services_required

from gorch.engine import Engine, InstanceStatus

celery = pytest.importorskip("celery")

HERE = Path(__file__).parent
BROKERS = {
    "rabbitmq": os.environ.get("GORCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    "redis": os.environ.get("GORCH_CELERY_REDIS_URL", "redis://127.0.0.1:6379/14"),
}


def require_broker(url: str) -> None:
    try:
        with celery.Celery(broker=url).connection() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        message = f"broker {url} not usable: {type(exc).__name__}: {exc}"
        if services_required():
            pytest.fail(f"{message} (CI or GORCH_REQUIRE_SERVICES is set)", pytrace=False)
        pytest.skip(message)


class Setup:
    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.workers: list[subprocess.Popen[bytes]] = []

    def engine(self) -> tuple[Any, Engine]:
        import dispatch_app

        return dispatch_app.celery_engine()

    def worker(self, beat: bool = True) -> subprocess.Popen[bytes]:
        """A worker process; with ``beat``, it also runs the periodic ``run_due``."""
        n = len(self.workers)
        command = [
            *(sys.executable, "-m", "celery", "-A", "dispatch_app:celery_app", "worker"),
            *("-Q", self.env["GORCH_TEST_QUEUE"], "--pool", "solo", "-l", "warning"),
            *(("-B", "-s", str(self.workdir / f"beat-{n}")) if beat else ()),
            *("--without-heartbeat", "--without-gossip", "--without-mingle"),
        ]
        log = open(self.workdir / f"worker-{n}.log", "wb")  # noqa: SIM115 - the process's
        # A session of its own: -B runs beat in a child process, which outlives a worker
        # killed with SIGKILL; the fixture ends the whole group.
        proc = subprocess.Popen(
            command, env=self.env, cwd=HERE, stdout=log, stderr=log, start_new_session=True
        )
        self.workers.append(proc)
        return proc


@pytest.fixture(params=sorted(BROKERS))
def setup(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Setup]:
    broker = BROKERS[request.param]
    require_broker(broker)
    queue = f"gorch-test-{uuid.uuid4().hex[:12]}"
    env = {
        "GORCH_TEST_BROKER": broker,
        "GORCH_TEST_QUEUE": queue,
        "GORCH_TEST_STORE": f"sqlite:///{tmp_path / 'gorch.db'}",
        "GORCH_TEST_LEASE": "3",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    made = Setup({**os.environ, **env, "PYTHONPATH": str(HERE)}, tmp_path)
    try:
        yield made
    finally:
        for proc in made.workers:
            with contextlib.suppress(ProcessLookupError):  # the worker and its beat child
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        _remove_queue(broker, queue)


def _remove_queue(broker: str, queue: str) -> None:
    if broker.startswith("redis"):
        import redis

        client = redis.Redis.from_url(broker)
        keys = list(client.scan_iter(match=f"{queue}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        return
    with celery.Celery(broker=broker).connection() as conn:
        conn.default_channel.queue_delete(queue)
        conn.default_channel.exchange_delete(queue)  # declared with the queue, of its name


#: Workers start in processes of their own: wait longer than the store tests do.
wait_until = functools.partial(fault_support.wait_until, timeout=30.0)


def test_a_deferred_save_is_resumed_by_a_worker_and_a_repeat_is_a_no_op(setup: Setup) -> None:
    _, engine = setup.engine()
    engine.start("counter", "c-1")  # deferred: saved due now, then the message
    assert engine.get("c-1").status is InstanceStatus.RESUMING
    setup.worker()
    wait_until(lambda: engine.get("c-1").status is InstanceStatus.WAITING, "a worker resumed it")
    version = engine.store.load("c-1").version
    dispatcher: Any = engine.dispatch
    dispatcher.dispatch(["c-1", "c-1"])  # two stale messages
    time.sleep(1.5)
    assert engine.store.load("c-1").version == version, "a message for no due instance wrote"
    assert dispatcher._resume_due("c-1") == "not due"


def test_a_worker_sigkilled_mid_step_loses_and_doubles_nothing(setup: Setup) -> None:
    _, engine = setup.engine()
    workdir = setup.workdir / "work"
    workdir.mkdir()
    kill_at = 3
    hold = workdir / f"hold-{kill_at}"
    hold.touch()
    first = setup.worker()
    engine.start("pipeline", "p-1", {"workdir": str(workdir)})
    wait_until(lambda: engine.get("p-1").status is InstanceStatus.WAITING, "it waits for go")
    engine.send("p-1", "go")  # deferred: the message goes once the event is saved
    log = workdir / "log"

    def entries() -> list[tuple[str, int, int]]:
        if not log.exists():
            return []
        lines = [line.split() for line in log.read_text().splitlines()]
        return [(w, int(s), int(p)) for w, s, p in lines]

    wait_until(lambda: ("start", kill_at, first.pid) in entries(), f"a worker is in step {kill_at}")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    hold.unlink()
    second = setup.worker()
    wait_until(
        lambda: engine.get("p-1").status is InstanceStatus.FINISHED,
        "the next worker finished the pipeline",
        timeout=60,
    )
    assert engine.get("p-1").data["done"] == list(range(1, STEPS + 1))
    now = entries()
    starts = Counter(step for what, step, _ in now if what == "start")
    done = Counter(step for what, step, _ in now if what == "done")
    assert starts == {k: 2 if k == kill_at else 1 for k in range(1, STEPS + 1)}
    assert done == dict.fromkeys(range(1, STEPS + 1), 1)
    ran_by = {step: pid for what, step, pid in now if what == "done"}
    assert ran_by == {k: first.pid if k < kill_at else second.pid for k in range(1, STEPS + 1)}


def test_a_message_that_cannot_be_sent_is_left_to_run_due(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from recovery_app import WORKFLOWS

    from gorch.dispatch.celery import CeleryDispatcher

    app = celery.Celery("gorch-test", broker="amqp://guest:guest@127.0.0.1:1//")
    app.conf.update(task_publish_retry=False, broker_connection_timeout=0.5)
    app.conf.broker_connection_max_retries = 0
    engine = Engine(
        f"sqlite:///{tmp_path / 'gorch.db'}",
        WORKFLOWS,
        defer_resume=True,
        dispatch=CeleryDispatcher(app),
    )
    with caplog.at_level(logging.WARNING, logger="gorch"):
        snap = engine.start("counter", "c-9")  # the save commits; the message cannot go
    assert snap.status is InstanceStatus.RESUMING
    assert any("could not dispatch 'c-9'" in r.getMessage() for r in caplog.records)
    [result] = engine.run_due()
    assert (result.id, result.outcome) == ("c-9", "processed")
    assert engine.get("c-9").status is InstanceStatus.WAITING


def test_start_many_sends_a_message_per_instance_due_at_once(setup: Setup) -> None:
    _, engine = setup.engine()
    ids = engine.start_many("counter", [{}] * 5, batch=2)  # deferred: all due at once
    assert {engine.get(id).status for id in ids} == {InstanceStatus.RESUMING}
    setup.worker(beat=False)  # no periodic run_due: only the messages can resume them
    wait_until(
        lambda: {engine.get(id).status for id in ids} == {InstanceStatus.WAITING},
        "a worker resumed every instance",
    )
