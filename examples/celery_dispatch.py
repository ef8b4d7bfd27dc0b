"""Expense approvals resumed by Celery workers (``gorch[celery]``), on RabbitMQ or Redis.

The store keeps each instance's state and timers; Celery carries only "resume
instance X now". With ``defer_resume=True`` a ``start`` or ``send`` saves
the instance due at once and returns; once that save has committed, the
Engine's ``CeleryDispatcher`` sends ``gorch.resume_due(X)``, and a worker runs
``engine.resume_due(X)``: it claims X with a lease if X is still due, runs it
until it blocks, and saves it. The dispatcher also adds ``gorch.run_due`` to
the beat schedule: the safety net for timers, retries, a message that was
never sent and an instance whose worker died.

In production, every process imports this module, so they share ``app`` and
``engine`` (``BROKER_URL``, ``GORCH_QUEUE`` and ``GORCH_STORE`` pick the
broker, the queue and a store the workers can reach)::

    celery -A examples.celery_dispatch:app worker -Q gorch   # workers, as many as needed
    celery -A examples.celery_dispatch:app beat              # one: the periodic run_due
    # the web app (or any code) then calls engine.start(...) / engine.send(...)

Run as a script (``python examples/celery_dispatch.py``), it shows the whole
story on this machine: a temporary SQLite store, a queue of its own on the
broker (RabbitMQ at 127.0.0.1:5672 by default; ``BROKER_URL=redis://...``
for Redis), one worker subprocess (``-B``: with beat). It starts an expense,
which the worker resumes to its approval; approves it, which the worker pays.
Then it stops its worker and deletes its queue and its store.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import celery

import gorch
from gorch import On, S, Select, Step
from gorch.dispatch.celery import CeleryDispatcher
from gorch.engine import Engine, InstanceStatus

BROKER = os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
HERE = Path(__file__).resolve().parent


class Expense(gorch.Workflow):
    amount: float = 0.0
    paid_by: int = 0
    """The process that ran the ``pay`` step (a worker's pid)."""

    def definition(self) -> gorch.Section:
        return S(Select("await decision", On("approve")), Step("pay", self.pay))

    def pay(self) -> None:
        self.paid_by = os.getpid()  # a real step calls the payment API (idempotently)


def build(broker: str, queue: str, store: str) -> tuple[celery.Celery, Engine]:
    """The Celery app and the Engine that sends its messages: the same in every process."""
    app = celery.Celery("approvals", broker=broker)
    app.conf.update(
        worker_prefetch_multiplier=1,  # with acks_late: a worker holds one message at a time
        broker_connection_retry_on_startup=True,
        worker_enable_remote_control=False,  # no broadcast queues (celery inspect/control)
    )
    if prefix := os.environ.get("CELERY_KEY_PREFIX"):  # Redis: every key under a prefix
        app.conf.broker_transport_options = {"global_keyprefix": prefix}
    engine = Engine(
        store,
        {"expense": Expense},
        defer_resume=True,  # start and send return at once; a worker resumes
        dispatch=CeleryDispatcher(app, queue=queue, run_due_every=30),
    )
    return app, engine


# What the worker and beat processes import (`-A examples.celery_dispatch:app`).
app, engine = build(
    BROKER,
    os.environ.get("GORCH_QUEUE", "gorch"),
    os.environ.get("GORCH_STORE", "sqlite:///gorch.db"),
)


def wait_for(condition: Callable[[], bool], what: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"no {what} within {timeout:g} s; the worker's log:\n{log.read_text()}")
        time.sleep(0.1)


def delete_queue(app: celery.Celery, queue: str, prefix: str) -> None:
    """Remove what the queue left on the broker: the queue and its exchange (RabbitMQ), or
    the keys under this run's prefix (Redis)."""
    if BROKER.startswith("redis"):
        import redis

        client = redis.Redis.from_url(BROKER)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        return
    with app.connection() as conn:
        conn.default_channel.queue_delete(queue)
        conn.default_channel.exchange_delete(queue)


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="gorch-celery-"))
    queue = f"gorch-example-{uuid.uuid4().hex[:8]}"
    prefix = f"{queue}:"
    env = {
        **os.environ,
        "BROKER_URL": BROKER,
        "GORCH_QUEUE": queue,
        "GORCH_STORE": f"sqlite:///{workdir / 'expenses.db'}",
        "CELERY_KEY_PREFIX": prefix,
        "PYTHONPATH": str(HERE),
    }
    os.environ["CELERY_KEY_PREFIX"] = prefix  # this process's app too
    app, engine = build(BROKER, queue, env["GORCH_STORE"])
    log = workdir / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    print(f"broker {BROKER.split('@')[-1]}, queue {queue}, store {workdir}/expenses.db")
    try:
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                [
                    *(sys.executable, "-m", "celery", "-A", "celery_dispatch:app", "worker"),
                    *("-Q", queue, "--pool", "solo", "-l", "warning"),
                    *("-B", "-s", str(workdir / "beat-schedule")),  # with the periodic run_due
                    *("--without-heartbeat", "--without-gossip", "--without-mingle"),
                ],
                cwd=HERE,
                env=env,
                stdout=out,
                stderr=out,
                start_new_session=True,  # its group: the worker and its beat child
            )
        print(f"worker started (pid {worker.pid})")

        snap = engine.start("expense", "exp-1", {"amount": 120.0})
        print(f"start exp-1 returned at once: {snap.status.value} (a message asks to resume it)")
        wait_for(
            lambda: engine.get("exp-1").status is InstanceStatus.WAITING, "resume of exp-1", log
        )
        print(f"the worker resumed exp-1: {engine.get('exp-1').status.value} for approve")

        engine.send("exp-1", "approve")
        print(f"send approve returned at once: {engine.get('exp-1').status.value}")
        wait_for(
            lambda: engine.get("exp-1").status is InstanceStatus.FINISHED, "payment of exp-1", log
        )
        done = engine.get("exp-1")
        print(
            f"exp-1 {done.status.value}: {done.data['amount']} paid by pid {done.data['paid_by']}"
            f" (the worker; this script is pid {os.getpid()})"
        )
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # a warm shutdown
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
        delete_queue(app, queue, prefix)
        engine.store.close()
        shutil.rmtree(workdir, ignore_errors=True)
        print("cleaned up: worker stopped, queue deleted, store removed")


if __name__ == "__main__":
    main()
