"""Dispatch through procrastinate, a job queue in the same PostgreSQL as the store.

The job "resume instance X" is deferred on the store's own connection, inside
the transaction that saves the instance: the save and the job commit together
or not at all, so no instance is ever due without its job, and no job is ever
about an instance that was not saved. Each instance has at most one job
waiting (procrastinate's queueing lock ``gorch:{id}``): a second save while
one waits enqueues nothing, and the waiting job resumes both.

The worker side is two tasks registered on the procrastinate app:
``gorch.resume_due`` (``engine.resume_due(id)``: a no-op for an instance no
longer due or already claimed) and ``gorch.run_due``, a periodic task that
runs ``run_due`` for timers, retries and instances whose worker died (a job
a killed worker left ``doing`` is never run again; the instance's lease runs
out and ``run_due`` takes it).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import procrastinate
import procrastinate.jobs
import procrastinate.tasks
import psycopg
from procrastinate.exceptions import AlreadyEnqueued, ConnectorException

from gorch.dispatch.base import Dispatcher, EngineLike

__all__ = ["ProcrastinateDispatcher"]

log = logging.getLogger("gorch")

RESUME_TASK = "gorch.resume_due"
RUN_DUE_TASK = "gorch.run_due"


class ProcrastinateDispatcher(Dispatcher):
    """Defers ``gorch.resume_due(id=...)`` on ``app`` in the save's transaction.

    ``queue``: the procrastinate queue of both tasks. ``run_due_cron``: when the
    periodic ``run_due`` runs (procrastinate's cron syntax; a sixth column for
    seconds); ``run_due_limit``: how many instances one run takes at most.
    The Engine must use a PostgreSQL store in the database procrastinate uses
    (its ``search_path`` must find procrastinate's tables).
    """

    in_transaction = True

    def __init__(
        self,
        app: procrastinate.App,
        *,
        queue: str = "gorch",
        run_due_cron: str = "* * * * *",
        run_due_limit: int = 100,
    ) -> None:
        self.app = app
        self.queue = queue
        self.run_due_limit = run_due_limit
        self._engine: EngineLike | None = None
        self.resume_task: procrastinate.tasks.Task[Any, Any, Any] = app.task(
            name=RESUME_TASK, queue=queue
        )(self._resume_due)
        run_due = app.task(name=RUN_DUE_TASK, queue=queue)(self._run_due)
        self.run_due_task = app.periodic(cron=run_due_cron)(run_due)

    def attach(self, engine: EngineLike) -> None:
        from gorch.stores.aio_postgres import AsyncPostgresStore
        from gorch.stores.postgres import PostgresStore

        if not isinstance(engine.store, PostgresStore | AsyncPostgresStore):
            raise TypeError(
                "ProcrastinateDispatcher enqueues in the store's transaction, so the Engine"
                f" needs a PostgreSQL store, not {type(engine.store).__name__}"
            )
        self._engine = engine

    @property
    def engine(self) -> EngineLike:
        if self._engine is None:
            raise RuntimeError(
                "no Engine uses this ProcrastinateDispatcher: create the Engine with"
                " dispatch=this dispatcher in the module the worker imports"
            )
        return self._engine

    # -- enqueueing, in the store's transaction ----------------------------------------

    def enqueue(self, conn: Any, ids: Sequence[str]) -> None:
        jobs = self._jobs(ids)
        try:
            with conn.transaction():  # a savepoint: a refused job leaves the save's alone
                self.app.job_manager.batch_defer_jobs(jobs, connection=conn)
            return
        except AlreadyEnqueued:
            if len(jobs) == 1:
                log.debug("gorch: a job to resume %r is already waiting", ids[0])
                return
        except ConnectorException as exc:
            _reraise_driver_error(exc)
        for job in jobs:  # one of them has a job waiting: the others one by one
            try:
                with conn.transaction():
                    self.app.job_manager.defer_job(job, connection=conn)
            except AlreadyEnqueued:
                log.debug("gorch: a job to resume %r is already waiting", job.task_kwargs["id"])
            except ConnectorException as exc:
                _reraise_driver_error(exc)

    async def aenqueue(self, conn: Any, ids: Sequence[str]) -> None:
        jobs = self._jobs(ids)
        try:
            async with conn.transaction():
                await self.app.job_manager.batch_defer_jobs_async(jobs, connection=conn)
            return
        except AlreadyEnqueued:
            if len(jobs) == 1:
                log.debug("gorch: a job to resume %r is already waiting", ids[0])
                return
        except ConnectorException as exc:
            _reraise_driver_error(exc)
        for job in jobs:
            try:
                async with conn.transaction():
                    await self.app.job_manager.defer_job_async(job, connection=conn)
            except AlreadyEnqueued:
                log.debug("gorch: a job to resume %r is already waiting", job.task_kwargs["id"])
            except ConnectorException as exc:
                _reraise_driver_error(exc)

    def _jobs(self, ids: Sequence[str]) -> list[procrastinate.jobs.Job]:
        """One job per instance, each under the instance's queueing lock."""
        return [
            self.resume_task.configure(queueing_lock=f"gorch:{id}").make_new_job(id=id)
            for id in ids
        ]

    # -- enqueueing after a commit (start_many's batches) ---------------------------------

    def dispatch(self, ids: Sequence[str]) -> None:
        """Enqueue, once their write has committed, in a transaction of its own on a
        connection of the store's (its database and ``search_path``, as in a save's
        transaction), for writes that could not take the job along (``start_many``)."""
        store: Any = self.engine.store
        with store.connection() as conn, conn.transaction():
            self.enqueue(conn, ids)

    async def adispatch(self, ids: Sequence[str]) -> None:
        store: Any = self.engine.store
        async with store.connection() as conn, conn.transaction():
            await self.aenqueue(conn, ids)

    # -- the worker's tasks --------------------------------------------------------------

    async def _resume_due(self, id: str) -> str:
        """Resume instance ``id`` if it is still due; what happened, for procrastinate's log."""
        engine: Any = self.engine
        result = await _call(engine.resume_due, id)
        return "not due" if result is None else f"{result.action}: {result.outcome}"

    async def _run_due(self, timestamp: int) -> int:
        """The safety net: everything due (timers, retries, leases run out); how many ran."""
        engine: Any = self.engine
        results = await _call(engine.run_due, limit=self.run_due_limit)
        return sum(r.outcome == "processed" for r in results)


async def _call(method: Any, *args: Any, **kwargs: Any) -> Any:
    """An AsyncEngine's method awaited; a sync Engine's on a thread (the worker's event loop
    keeps fetching jobs meanwhile)."""
    if inspect.iscoroutinefunction(method):
        return await method(*args, **kwargs)
    return await asyncio.to_thread(method, *args, **kwargs)


def _reraise_driver_error(exc: ConnectorException) -> None:
    """Raise the driver's error under procrastinate's wrapper, so the store tells a lost
    connection from a bug as for its own statements."""
    cause = exc.__cause__
    if isinstance(cause, psycopg.Error):
        raise cause from None
    raise exc
