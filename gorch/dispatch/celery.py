"""Dispatch through Celery (RabbitMQ, Redis or any broker Celery speaks).

The message "resume instance X" is sent once the save that left X due now has
committed (a broker cannot join the store's transaction). If it cannot be
sent, the Engine logs it and the periodic ``gorch.run_due`` task finds X due
all the same: it is the safety net for timers, for retries' backoffs, for
lost messages and for instances whose worker died.

``gorch.resume_due(id)`` acknowledges its message late (``acks_late``) and
rejects it when its worker process is lost (``reject_on_worker_lost``), so a
worker killed mid-resume leaves the message to be delivered again. It claims
the instance with a lease before running it: a message delivered twice, late,
or for an instance another runner holds or that is no longer due is a no-op,
and a killed worker's instance is taken by ``run_due`` once the lease runs
out. Steps stay at-least-once: only the step in flight at the kill runs again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import celery

from gorch.dispatch.base import Dispatcher, EngineLike
from gorch.errors import StoreUnavailable

__all__ = ["CeleryDispatcher"]

log = logging.getLogger("gorch")

RESUME_TASK = "gorch.resume_due"
RUN_DUE_TASK = "gorch.run_due"


class CeleryDispatcher(Dispatcher):
    """Sends ``gorch.resume_due(id)`` on ``app`` after each save that leaves an instance due.

    ``queue``: the queue of both tasks (run a worker with ``-Q`` on it).
    ``run_due_every``: seconds between two ``gorch.run_due`` runs, an entry of
    ``app.conf.beat_schedule`` (run ``celery beat``, or a worker with ``-B``);
    ``run_due_limit``: how many instances one run takes at most. The worker's
    Engine must be a sync ``gorch.Engine`` (Celery tasks are blocking).
    """

    def __init__(
        self,
        app: celery.Celery,
        *,
        queue: str = "gorch",
        run_due_every: float = 60.0,
        run_due_limit: int = 100,
    ) -> None:
        self.app = app
        self.queue = queue
        self.run_due_limit = run_due_limit
        self._engine: EngineLike | None = None

        def resume_due(id: str) -> str:
            return self._resume_due(id)

        def run_due() -> int:
            return self._run_due()

        self.resume_task: Any = app.task(
            name=RESUME_TASK,
            acks_late=True,
            reject_on_worker_lost=True,
            ignore_result=True,
            autoretry_for=(StoreUnavailable,),
            retry_backoff=True,
            max_retries=5,
        )(resume_due)
        self.run_due_task: Any = app.task(name=RUN_DUE_TASK, ignore_result=True)(run_due)
        routes = app.conf.task_routes or {}
        if isinstance(routes, dict):  # a router function or list of the app's stays first
            app.conf.task_routes = {
                **{name: {"queue": queue} for name in (RESUME_TASK, RUN_DUE_TASK)},
                **routes,
            }
        app.conf.beat_schedule = {
            **(app.conf.beat_schedule or {}),
            RUN_DUE_TASK: {
                "task": RUN_DUE_TASK,
                "schedule": run_due_every,
                "options": {"queue": queue, "expires": run_due_every},
            },
        }

    def attach(self, engine: EngineLike) -> None:
        self._engine = engine

    @property
    def engine(self) -> Any:
        if self._engine is None:
            raise RuntimeError(
                "no Engine uses this CeleryDispatcher: create the Engine with"
                " dispatch=this dispatcher in the module the worker imports"
            )
        return self._engine

    def dispatch(self, ids: Sequence[str]) -> None:
        with self.app.producer_or_acquire() as producer:  # one connection for a batch
            for id in ids:
                self.resume_task.apply_async((id,), queue=self.queue, producer=producer)

    def _resume_due(self, id: str) -> str:
        """Resume instance ``id`` if it is still due; what happened, for Celery's log."""
        result = self.engine.resume_due(id)
        if hasattr(result, "__await__"):
            raise TypeError("the Celery worker's Engine must be a sync gorch.Engine")
        return "not due" if result is None else f"{result.action}: {result.outcome}"

    def _run_due(self) -> int:
        """The safety net: everything due (timers, retries, leases run out); how many ran."""
        results = self.engine.run_due(limit=self.run_due_limit)
        return sum(r.outcome == "processed" for r in results)
