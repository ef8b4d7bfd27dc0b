"""The one place the routes call the engine and its store.

An :class:`gorch.Engine` blocks, so its calls run in the threadpool, never on
the event loop; an engine whose methods are coroutines (``gorch.AsyncEngine``)
is awaited on the loop itself, and its store too. The routes call
:class:`Driver` and never the engine directly, so both kinds are served
alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, cast

from starlette.concurrency import run_in_threadpool

from gorch.engine import EngineCore, ListPage, Snapshot
from gorch.history import History
from gorch.stores.base import Page, Record
from gorch.workflow import Workflow

_ENGINE_METHODS = ("start", "send", "get", "list", "cancel")
_STORE_METHODS = ("load", "list", "remember")


def _takes_by(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes ``by=`` (who acts; written to the instance's history)."""
    try:
        return "by" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


async def _call(target: object, method: str, *args: Any, **kwargs: Any) -> Any:
    """``target.method(...)``: awaited if it is a coroutine function, else in the threadpool."""
    fn = getattr(target, method)
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    return await run_in_threadpool(fn, *args, **kwargs)


class Driver:
    """Calls ``engine`` (blocking or async) from async route code."""

    def __init__(self, engine: EngineCore) -> None:
        missing = [m for m in _ENGINE_METHODS if not callable(getattr(engine, m, None))]
        missing += [
            f"store.{m}" for m in _STORE_METHODS if not callable(getattr(engine.store, m, None))
        ]
        if missing:
            raise TypeError(
                f"gorch.http serves a gorch.Engine or gorch.AsyncEngine; {type(engine).__name__} "
                f"has no {', '.join(missing)}"
            )
        self.engine = engine
        #: The engine methods that take ``by=``; the others are called without it.
        self.takes_by = frozenset(m for m in _ENGINE_METHODS if _takes_by(getattr(engine, m)))

    def _by(self, method: str, by: str | None) -> dict[str, str]:
        return {"by": by} if by is not None and method in self.takes_by else {}

    @property
    def workflows(self) -> Mapping[str, type[Workflow]]:
        return self.engine.workflows

    @property
    def is_async(self) -> bool:
        """Whether the engine's calls are awaited on the event loop (no threadpool)."""
        return inspect.iscoroutinefunction(getattr(self.engine, "send", None))

    # ------------------------------------------------------------------ engine

    async def start(
        self, name: str, id: str | None, data: Any, *, key: str | None = None, by: str | None = None
    ) -> Snapshot:
        by_ = self._by("start", by)
        return cast(Snapshot, await _call(self.engine, "start", name, id, data, key=key, **by_))

    async def send(
        self,
        id: str,
        event: str,
        input: Any,
        *,
        thread_id: str | None,
        pc: int | None,
        key: str | None,
        by: str | None = None,
    ) -> Any:
        by_ = self._by("send", by)
        return await _call(
            self.engine, "send", id, event, input, thread_id=thread_id, pc=pc, key=key, **by_
        )

    async def get(self, id: str) -> Snapshot:
        return cast(Snapshot, await _call(self.engine, "get", id))

    async def list(
        self, *, workflow: str | None, status: str | None, limit: int, after: str | None
    ) -> ListPage:
        page = await _call(
            self.engine, "list", workflow=workflow, status=status, limit=limit, after=after
        )
        return cast(ListPage, page)

    async def cancel(self, id: str, *, by: str | None = None) -> Snapshot:
        return cast(Snapshot, await _call(self.engine, "cancel", id, **self._by("cancel", by)))

    async def history(self, id: str) -> History:
        return cast(History, await _call(self.engine, "history", id))

    # ------------------------------------------------------------------ store

    async def load(self, id: str) -> Record:
        return cast(Record, await _call(self.engine.store, "load", id))

    async def list_records(self, limit: int) -> Page:
        return cast(Page, await _call(self.engine.store, "list", limit=limit))

    async def remember(self, key: str, until: datetime) -> bool:
        return bool(await _call(self.engine.store, "remember", key, until))
