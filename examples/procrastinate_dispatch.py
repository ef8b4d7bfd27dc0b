"""Orders on PostgreSQL, resumed by procrastinate workers (``gorch[procrastinate]``).

The application's order row, the workflow instance and the procrastinate job
that resumes it commit in one transaction, or none of them does: with
``defer_resume=True`` the instance is saved due at once, and the Engine's
``ProcrastinateDispatcher`` defers the job ``gorch.resume_due(id=...)`` on the
same connection, inside that transaction (one waiting job per instance: its
queueing lock is ``gorch:<id>``). A procrastinate worker then runs
``engine.resume_due(id)``, which claims the instance with a lease if it is
still due and runs it until it blocks. The periodic task ``gorch.run_due``
(every minute, in the workers) fires timers, such as the three-day
cancellation here, and takes over an instance whose worker died.

In production, every process imports this module (``DATABASE_URL`` is the
database of both the store and procrastinate; its ``search_path`` must find
procrastinate's tables)::

    procrastinate --app=examples.procrastinate_dispatch.app schema --apply   # once
    procrastinate --app=examples.procrastinate_dispatch.app worker -q gorch  # workers
    # the web app calls place_order(...) with its own connection

Run as a script (``python examples/procrastinate_dispatch.py``), it shows the
whole story on the PostgreSQL at 127.0.0.1:5432, database ``test``, in a
schema of its own (procrastinate's tables, gorch's, the orders): an order
rolled back (nothing of it remains), an order committed (its job appears with
it), a worker subprocess that runs the job, a payment resumed the same way.
Then it stops its worker and drops its schema.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import procrastinate
import psycopg

import gorch
from gorch import On, S, Select, Step, Timeout
from gorch.dispatch.procrastinate import ProcrastinateDispatcher
from gorch.engine import Engine, InstanceStatus

DSN = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
HERE = Path(__file__).resolve().parent


class Order(gorch.Workflow):
    order: int
    confirmed_by: int = 0
    """The process that ran the ``confirm`` step (a worker's pid)."""

    def definition(self) -> gorch.Section:
        return S(
            Step("confirm", self.confirm),
            Select("await payment", On("pay"), Timeout("cancel unpaid", timedelta(days=3))),
        )

    def confirm(self) -> None:
        self.confirmed_by = os.getpid()  # a real step mails the confirmation (idempotently)


def build(dsn: str) -> tuple[procrastinate.App, Engine]:
    """The procrastinate app and the Engine that defers its jobs: the same in every process."""
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    engine = Engine(dsn, {"order": Order}, defer_resume=True, dispatch=ProcrastinateDispatcher(app))
    return app, engine


# What the workers import (`--app=examples.procrastinate_dispatch.app`).
app, engine = build(DSN)


def place_order(engine: Engine, conn: psycopg.Connection[object], number: int) -> str:
    """The order row and its workflow (and the job that runs it), in the caller's
    transaction on ``conn``: the caller commits or rolls back all of them."""
    conn.execute("INSERT INTO orders (id) VALUES (%s)", (number,))
    return engine.start("order", data={"order": number}, key=f"order-{number}", conn=conn).id


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"no {what} within {timeout:g} s")
        time.sleep(0.1)


def main() -> None:
    schema = f"gorch_example_{uuid.uuid4().hex[:8]}"
    dsn = f"{DSN}{'&' if '?' in DSN else '?'}options=-csearch_path%3D{schema}"
    with psycopg.connect(DSN, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    worker: subprocess.Popen[bytes] | None = None
    app, engine = build(dsn)
    print(f"schema {schema} in {DSN.split('@')[-1]}")
    try:
        with app.open():
            app.schema_manager.apply_schema()  # `procrastinate ... schema --apply`
        engine.list(limit=1)  # gorch's table exists before a transaction writes to it
        with psycopg.connect(dsn, autocommit=True) as look:  # what other sessions see
            look.execute("CREATE TABLE orders (id integer PRIMARY KEY)")

            def seen() -> str:
                orders = look.execute("SELECT count(*) FROM orders").fetchone()
                jobs = look.execute(
                    "SELECT string_agg(queueing_lock || ' ' || status, ', ' ORDER BY id)"
                    " FROM procrastinate_jobs WHERE task_name = 'gorch.resume_due'"
                ).fetchone()
                instances = len(engine.list().items)
                return (
                    f"orders {orders[0] if orders else 0}, instances {instances},"
                    f" jobs [{(jobs[0] if jobs else None) or ''}]"
                )

            with psycopg.connect(dsn) as conn:
                place_order(engine, conn, 41)
                conn.rollback()
            print(f"order 41 rolled back -> {seen()}")

            with psycopg.connect(dsn) as conn:
                wid = place_order(engine, conn, 42)
                print(f"order 42 placed, not committed -> {seen()}")
                conn.commit()
            print(f"order 42 committed -> {seen()}")
            print(f"instance {wid}: {engine.get(wid).status.value}")

            worker = subprocess.Popen(
                [
                    *(sys.executable, "-m", "procrastinate", "--app=procrastinate_dispatch.app"),
                    *("worker", "-q", "gorch"),
                ],
                cwd=HERE,
                env={**os.environ, "DATABASE_URL": dsn, "PYTHONPATH": str(HERE)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            print(f"worker started (pid {worker.pid})")
            wait_for(lambda: engine.get(wid).status is InstanceStatus.WAITING, "confirmation")
            snap = engine.get(wid)
            print(
                f"the worker ran the job: order 42 confirmed by pid {snap.data['confirmed_by']}"
                f" (this script is pid {os.getpid()}), {snap.status.value} for payment"
            )

            engine.send(wid, "pay")  # deferred too: the event's save and its job commit together
            wait_for(lambda: engine.get(wid).status is InstanceStatus.FINISHED, "payment")
            print(f"paid: instance {engine.get(wid).status.value} -> {seen()}")
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # a graceful stop
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
        engine.store.close()
        with psycopg.connect(DSN, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        print(f"cleaned up: worker stopped, schema {schema} dropped")


if __name__ == "__main__":
    main()
