"""Engines wired to a queue, for the dispatch tests' worker processes.

A worker process imports this module by name, and the settings come from the
environment the test gives it (``GORCH_TEST_DSN``, ``GORCH_TEST_TABLE``, ...),
so the test and its workers build the same Engine on the same store and queue.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from recovery_app import WORKFLOWS

from gorch.engine import Engine

LEASE = float(os.environ.get("GORCH_TEST_LEASE", "3"))


def procrastinate_engine() -> tuple[object, Engine]:
    """The procrastinate app and the Engine that defers its jobs in the store's transactions."""
    import procrastinate

    from gorch.dispatch.procrastinate import ProcrastinateDispatcher
    from gorch.stores.postgres import PostgresStore

    dsn = os.environ["GORCH_TEST_DSN"]
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    dispatcher = ProcrastinateDispatcher(
        app, queue=os.environ.get("GORCH_TEST_QUEUE", "gorch"), run_due_cron="* * * * * *"
    )
    store = PostgresStore(dsn, table=os.environ["GORCH_TEST_TABLE"])
    engine = Engine(store, WORKFLOWS, defer_resume=True, lease=LEASE, dispatch=dispatcher)
    return app, engine


def run_procrastinate_worker() -> None:
    """Worker process: run the queue's jobs until killed."""
    app, _ = procrastinate_engine()
    app.run_worker(  # type: ignore[attr-defined]
        queues=[os.environ.get("GORCH_TEST_QUEUE", "gorch")], install_signal_handlers=True
    )


def celery_dispatcher() -> Any:
    """A Celery app on the test's broker and queue (its keys under the queue's prefix on
    Redis), and the dispatcher that sends its messages."""
    import celery

    from gorch.dispatch.celery import CeleryDispatcher

    app = celery.Celery("gorch-test", broker=os.environ["GORCH_TEST_BROKER"])
    app.conf.update(
        task_default_queue=os.environ["GORCH_TEST_QUEUE"],
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "global_keyprefix": os.environ["GORCH_TEST_QUEUE"] + ":",
            "visibility_timeout": 5,
        },
    )
    return CeleryDispatcher(app, queue=os.environ["GORCH_TEST_QUEUE"], run_due_every=1.0)


def celery_engine() -> tuple[object, Engine]:
    """The Celery app and the Engine that sends its messages after each due save."""
    from gorch.stores import open_store

    dispatcher = celery_dispatcher()
    engine = Engine(
        open_store(os.environ["GORCH_TEST_STORE"]),
        WORKFLOWS,
        defer_resume=True,
        lease=LEASE,
        dispatch=dispatcher,
    )
    return dispatcher.app, engine


celery_app: object = None
if os.environ.get("GORCH_TEST_BROKER"):
    celery_app, _engine = celery_engine()


if __name__ == "__main__":
    {"procrastinate": run_procrastinate_worker}[sys.argv[1]]()
