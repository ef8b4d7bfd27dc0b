"""What the Engine asks of a queue: "instance X is due now"."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol


class EngineLike(Protocol):
    """What a dispatcher needs of the Engine it serves (``Engine`` or ``AsyncEngine``)."""

    store: Any


class Dispatcher:
    """Tells a queue which instances a save left due now, so a worker resumes them at once.

    ``in_transaction``: the queue lives in the store's database and the
    message is enqueued inside the save's own transaction (the store calls
    :meth:`enqueue` / :meth:`aenqueue` on its connection): both commit or
    neither does. Otherwise the Engine calls :meth:`dispatch` once the save
    has committed; a message that cannot be sent then is logged and left to
    the periodic ``run_due``.

    A message may arrive twice, late, or for an instance that is no longer
    due: the worker's ``resume_due`` claims the instance only if it is due,
    so those are no-ops.
    """

    in_transaction: ClassVar[bool] = False

    def attach(self, engine: EngineLike) -> None:
        """Called by the Engine given this dispatcher; refuse a store it cannot serve."""

    def dispatch(self, ids: Sequence[str]) -> None:
        """Send "resume these instances now", after their save committed (blocking)."""

    async def adispatch(self, ids: Sequence[str]) -> None:
        """:meth:`dispatch` for the async Engine (by default run on a thread)."""
        await asyncio.to_thread(self.dispatch, ids)

    def enqueue(self, conn: Any, ids: Sequence[str]) -> None:
        """Enqueue on ``conn`` inside the save's transaction (``in_transaction`` only)."""
        raise NotImplementedError

    async def aenqueue(self, conn: Any, ids: Sequence[str]) -> None:
        """:meth:`enqueue`, awaited, on an async connection (``in_transaction`` only)."""
        raise NotImplementedError
