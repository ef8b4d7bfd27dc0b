"""Past one machine on queues you already run: the store keeps state and timers, a queue
carries "resume instance X now".

``Engine(..., dispatch=d)`` tells the dispatcher ``d`` of every instance a
save leaves due now (a deferred ``start`` or ``send``); a worker of the queue
runs ``engine.resume_due(id)``, which claims exactly that instance if it is
still due and does for it what ``run_due`` would. Timers, retries' backoffs
and leases stay with the store and ``run_due``, which each dispatcher also
runs as a periodic task: the safety net for a message that was lost, never
sent, or taken by a worker that died.

* :class:`gorch.dispatch.procrastinate.ProcrastinateDispatcher` (``gorch[procrastinate]``):
  the job is deferred in the same PostgreSQL transaction as the state save,
  one pending job per instance (procrastinate's queueing lock).
* :class:`gorch.dispatch.celery.CeleryDispatcher` (``gorch[celery]``): the
  message is sent once the save has committed; late acknowledgement, so a
  worker that dies mid-resume leaves the message to be delivered again.
"""

from __future__ import annotations

from gorch.dispatch.base import Dispatcher, EngineLike

__all__ = ["Dispatcher", "EngineLike"]
