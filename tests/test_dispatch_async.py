"""Dispatch from an ``AsyncEngine``: the same guarantees as the sync Engine's.

* procrastinate: the job is deferred with ``aenqueue`` on the async store's
  connection, inside the save's transaction (or the caller's, for
  ``start(conn=psycopg.AsyncConnection)``), and a worker awaiting the
  AsyncEngine's ``resume_due`` runs it; ``start_many`` enqueues after each batch.
* Celery: the message is sent once the async save has committed, and a
  worker process (a sync Engine on the same store) resumes the instance; a
  start in the caller's transaction sends nothing, and ``run_due`` finds it.
* ``AsyncEngine.resume_due`` claims a due instance once; a second call is a no-op.

Servers, schemas, queues and workers come from the sync dispatch tests' fixtures.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import psycopg
import pytest
from recovery_app import WORKFLOWS
from test_dispatch_celery import Setup as CelerySetup
from test_dispatch_celery import setup as celery_setup  # noqa: F401 - a fixture
from test_dispatch_celery import wait_until
from test_dispatch_procrastinate import QUEUE, Setup
from test_dispatch_procrastinate import setup as setup  # a fixture

from gorch.async_engine import AsyncEngine
from gorch.engine import InstanceStatus

pytest.importorskip("procrastinate")


def procrastinate_engine(setup: Setup) -> tuple[Any, AsyncEngine]:
    import procrastinate

    from gorch.dispatch.procrastinate import ProcrastinateDispatcher
    from gorch.stores.aio_postgres import AsyncPostgresStore

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=setup.dsn))
    engine = AsyncEngine(
        AsyncPostgresStore(setup.dsn, table=setup.table),
        WORKFLOWS,
        defer_resume=True,
        dispatch=ProcrastinateDispatcher(app, queue=QUEUE),
    )
    return app, engine


def test_procrastinate_jobs_commit_with_async_saves_and_a_worker_awaits_them(
    setup: Setup,
) -> None:
    async def story() -> None:
        app, engine = procrastinate_engine(setup)
        try:
            await engine.start("counter", "c-1")  # deferred: the job is in the save's transaction
            assert setup.jobs() == [("gorch.resume_due", "gorch:c-1", "todo", {"id": "c-1"})]
            async with await psycopg.AsyncConnection.connect(setup.dsn) as conn:
                snap = await engine.start("counter", "c-2", conn=conn)
                assert snap.status is InstanceStatus.RESUMING
                assert len(setup.jobs()) == 1  # not committed: not seen
                await conn.rollback()
                assert len(setup.jobs()) == 1
                assert [s.id for s in (await engine.list()).items] == ["c-1"]
                await engine.start("counter", "c-2", conn=conn)
                await conn.commit()
            assert [j[1] for j in setup.jobs()] == ["gorch:c-1", "gorch:c-2"]
            many = await engine.start_many("counter", [{}] * 3, batch=2)
            assert [j[1] for j in setup.jobs()][2:] == [f"gorch:{id}" for id in many]
            async with app.open_async():
                await app.run_worker_async(
                    queues=[QUEUE], wait=False, install_signal_handlers=False
                )
            for id in ["c-1", "c-2", *many]:
                assert (await engine.get(id)).status is InstanceStatus.WAITING, id
            assert {j[2] for j in setup.jobs()} == {"succeeded"}
        finally:
            await engine.store.close()

    asyncio.run(story())


def test_async_resume_due_claims_a_due_instance_once(setup: Setup) -> None:
    async def story() -> None:
        _, engine = procrastinate_engine(setup)
        try:
            await engine.start("counter", "c-3")
            first = await engine.resume_due("c-3")
            assert first is not None and (first.id, first.outcome) == ("c-3", "processed")
            after = await engine.store.load("c-3")
            assert await engine.resume_due("c-3") is None  # not due any more
            assert await engine.resume_due("nobody") is None
            assert await engine.store.load("c-3") == after
            # Two at once: one claims it, the other finds it claimed.
            await engine.start("counter", "c-4")
            both = await asyncio.gather(engine.resume_due("c-4"), engine.resume_due("c-4"))
            assert sorted(r is None for r in both) == [False, True]
            assert (await engine.get("c-4")).status is InstanceStatus.WAITING
        finally:
            await engine.store.close()

    asyncio.run(story())


def celery_async_engine(setup: CelerySetup) -> AsyncEngine:
    import dispatch_app

    from gorch.stores import open_async_store

    return AsyncEngine(
        open_async_store(setup.env["GORCH_TEST_STORE"]),
        WORKFLOWS,
        defer_resume=True,
        dispatch=dispatch_app.celery_dispatcher(),
    )


def test_celery_messages_go_after_async_commits_and_a_worker_resumes(
    celery_setup: CelerySetup,  # noqa: F811
) -> None:
    _, sync_engine = celery_setup.engine()  # the worker's view of the same store
    sync_engine.list()  # the SQLite table exists before a transaction writes to it

    async def story() -> None:
        engine = celery_async_engine(celery_setup)
        try:
            await engine.start("counter", "c-1")  # committed, then the message
            await engine.start_many("counter", [{"count": 5}], batch=1)
            path = celery_setup.env["GORCH_TEST_STORE"].removeprefix("sqlite:///")
            conn = sqlite3.connect(path)
            await engine.start("counter", "c-2", conn=conn)  # the caller commits: no message
            conn.commit()
            conn.close()
        finally:
            await engine.store.close()

    asyncio.run(story())
    celery_setup.worker(beat=False)  # no periodic run_due: only messages resume
    many = [s.id for s in sync_engine.list().items if s.id not in ("c-1", "c-2")]
    wait_until(
        lambda: all(sync_engine.get(id).status is InstanceStatus.WAITING for id in ["c-1", *many]),
        "the worker resumed the instances it had messages for",
    )
    time.sleep(1.0)
    assert sync_engine.get("c-2").status is InstanceStatus.RESUMING  # no message for it
    [result] = sync_engine.run_due()  # the safety net finds it
    assert (result.id, result.outcome) == ("c-2", "processed")
