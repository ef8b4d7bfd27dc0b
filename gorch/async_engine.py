"""``AsyncEngine``: the Engine for asyncio apps, on an async store.

Every rule (idempotency keys, the atomic start, exactly-once send, timers
refused as events, run_due's claims and outcomes, retry policies) lives in
:class:`gorch.engine.EngineCore`, as generators that yield what they need done.
This module only performs those requests with ``await``: the store's
coroutines, :func:`gorch.interpreter.arun` for a resume (async steps of
independent threads run concurrently, at most ``concurrency`` at once) and
:func:`gorch.interpreter.ahandle_event` for an event's handler. So an async web
endpoint or worker never blocks its event loop on gorch, and behaves exactly
as :class:`gorch.Engine` does.

Cancelling the task that awaits an operation stops it where it is: what was
saved stays saved (every save is one compare-and-swap, so a record is never
half-written) and nothing more is. An instance whose resume was cancelled
stays at the step that was running, with none of that step's changes, and is
leased: ``run_due`` (a worker) carries on when the lease runs out.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from gorch.bulk import StartItem
from gorch.check import CheckReport, Progress, check_op
from gorch.engine_core import EngineCore
from gorch.engine_ops import (
    RETAINED_STATUSES,
    Abort,
    Awaited,
    Cancel,
    Dispatch,
    DryRun,
    Halted,
    HandleEvent,
    Idle,
    Op,
    Pause,
    ReportFailure,
    Request,
    Resume,
    StoreCall,
    effect_ahead,
)
from gorch.errors import GorchError, ResumeLimitError, SetupError
from gorch.history import History
from gorch.hooks import CallNext, EventContext, Middleware, StepContext
from gorch.interpreter import (
    DEFAULT_CONCURRENCY,
    acancel,
    ahandle_event,
    areport_failure,
    arun,
    check_concurrency,
)
from gorch.snapshot import DueResult, ListPage, Snapshot
from gorch.stores.base import DEFAULT_HISTORY_LIMIT, AsyncStore, Store
from gorch.workflow import Workflow

if TYPE_CHECKING:
    from gorch.dispatch.base import Dispatcher

log = logging.getLogger("gorch")

__all__ = ["AsyncEngine"]

_T = TypeVar("_T")


class AsyncEngine(EngineCore):
    """:class:`gorch.Engine` for asyncio: the same methods, as coroutines.

    ``store`` is a :class:`gorch.stores.base.AsyncStore` or a URL for
    :func:`gorch.stores.open_async_store` (``memory://``, ``sqlite:///...``,
    ``postgresql://...``, ``redis://...``). The options are those of
    :class:`gorch.Engine`, plus:

    ``concurrency``: how many async steps of independent threads (``Go``,
    ``Parallel``, ``|``, ready DAG nodes) of one instance run at once; results
    and saves are those of running them one by one, in thread order.
    ``executor``: where plain (sync) steps run; by default they are called
    directly on the event loop, which is right for quick ones, and an executor
    keeps slow blocking ones off the loop (and lets them run concurrently too).

    Steps, handlers, hooks and middleware may be ``async def`` or plain.
    ``run_deadline`` is :class:`gorch.Engine`'s.
    """

    store: AsyncStore

    def __init__(
        self,
        store: AsyncStore | str,
        workflows: Mapping[str, type[Workflow]],
        *,
        defer_resume: bool = False,
        lease: timedelta | float = 60.0,
        conflict_retries: int = 100,
        error_backoff: timedelta | float = 60.0,
        middleware: Sequence[object] = (),
        store_retries: int = 3,
        idempotency_keys: int = 100,
        concurrency: int = DEFAULT_CONCURRENCY,
        executor: Executor | None = None,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        retention: timedelta | float | None = None,
        retention_every: timedelta | float = 3600.0,
        run_deadline: timedelta | float | None = None,
        dispatch: Dispatcher | None = None,
    ) -> None:
        if isinstance(store, str):
            from gorch.stores import open_async_store

            store = open_async_store(store)
        if isinstance(store, Store):
            raise TypeError(
                f"AsyncEngine needs an async store (gorch.stores.base.AsyncStore), got the sync "
                f"{type(store).__name__}: pass a URL, open one with "
                "gorch.stores.open_async_store(url), or use gorch.Engine with a sync store"
            )
        if not isinstance(store, AsyncStore):
            raise TypeError(
                f"AsyncEngine needs a gorch.stores.base.AsyncStore or a store URL, got {store!r}"
            )
        check_concurrency(concurrency)
        self.store = store
        #: How many async steps of one instance's independent threads run at once.
        self.concurrency = concurrency
        #: Where plain steps run (None: called directly on the event loop).
        self.executor = executor
        super().__init__(
            workflows,
            defer_resume=defer_resume,
            lease=lease,
            conflict_retries=conflict_retries,
            error_backoff=error_backoff,
            middleware=middleware,
            store_retries=store_retries,
            idempotency_keys=idempotency_keys,
            history_limit=history_limit,
            retention=retention,
            retention_every=retention_every,
            run_deadline=run_deadline,
            dispatch=dispatch,
        )

    # ------------------------------------------------------------------ public API

    async def start(
        self,
        name: str,
        id: str | None = None,
        data: Mapping[str, Any] | Workflow | None = None,
        *,
        key: str | None = None,
        by: str | None = None,
        conn: Any = None,
    ) -> Snapshot:
        """:meth:`gorch.Engine.start`: create an instance and run it until it blocks.

        ``conn``: a ``psycopg.AsyncConnection`` (or, for SQLite, the caller's
        ``sqlite3.Connection``) whose open transaction the instance is written in,
        as with ``Engine.start``.
        """
        if conn is None:
            return await self._run(self._start(name, id, data, key, by))
        store = await self.store.using(conn)
        op = self._start(name, id, data, key, by, callers_transaction=True)
        return await self._run(op, store)

    async def start_many(
        self,
        name: str,
        items: Iterable[Mapping[str, Any] | Workflow | StartItem],
        *,
        batch: int = 1000,
        by: str | None = None,
    ) -> builtins.list[str]:
        """:meth:`gorch.Engine.start_many`: create many instances, a batch per write."""
        return await self._run(self._start_many(name, items, batch, by))

    async def send(
        self,
        id: str,
        event: str,
        input: Any = None,
        *,
        thread_id: str | None = None,
        pc: int | None = None,
        key: str | None = None,
        by: str | None = None,
    ) -> Any:
        """:meth:`gorch.Engine.send`: deliver an event exactly once; the handler's output."""
        return await self._run(self._send(id, event, input, thread_id, pc, key, by))

    async def resume(self, id: str) -> Snapshot:
        """:meth:`gorch.Engine.resume`: run a pending (or failed) instance until it blocks."""
        return await self._run(self._resume(id))

    async def retry(self, id: str, *, by: str | None = None) -> Snapshot:
        """:meth:`gorch.Engine.retry`: re-arm a failed instance and resume it now."""
        return await self._run(self._retry(id, by))

    async def get(self, id: str) -> Snapshot:
        """:meth:`gorch.Engine.get`: the instance's snapshot."""
        return await self._run(self._get(id))

    async def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> ListPage:
        """:meth:`gorch.Engine.list`: instances in id order, filtered."""
        return await self._run(self._list(workflow, status, limit, after))

    async def cancel(self, id: str, *, by: str | None = None) -> Snapshot:
        """:meth:`gorch.Engine.cancel`: tear down awaited events, mark cancelled."""
        return await self._run(self._cancel(id, by))

    async def history(self, id: str) -> History:
        """:meth:`gorch.Engine.history`: what happened to the instance, oldest first."""
        return await self._run(self._history(id))

    async def purge(
        self,
        *,
        finished_before: datetime,
        statuses: Sequence[str] = RETAINED_STATUSES,
        batch: int = 500,
        progress: Progress | None = None,
    ) -> int:
        """:meth:`gorch.Engine.purge`: delete old finished/cancelled instances in batches
        (``progress`` may be ``async def``)."""
        return await self._run(self._purge(finished_before, statuses, batch, progress))

    async def check(self, *, page_size: int = 100, progress: Progress | None = None) -> CheckReport:
        """:meth:`gorch.Engine.check`: the in-flight instances the current code would strand."""
        return await self._run(check_op(self, page_size, progress))

    async def run_due(
        self,
        now: datetime | None = None,
        limit: int | None = 100,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> builtins.list[DueResult]:
        """:meth:`gorch.Engine.run_due`: fire due timers, retry, finish pending resumes."""
        return await self._run(self._run_due(now, limit, should_stop))

    async def resume_due(self, id: str, *, now: datetime | None = None) -> DueResult | None:
        """:meth:`gorch.Engine.resume_due`: process instance ``id`` if it is due; else None."""
        return await self._run(self._resume_due(id, now))

    async def work(
        self,
        *,
        poll: float = 1.0,
        batch: int = 10,
        stop: asyncio.Event | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_result: Callable[[DueResult], Awaitable[None] | None] | None = None,
        max_backoff: float = 30.0,
    ) -> int:
        """Loop on :meth:`run_due` until stopped; return how many instances were processed.

        Stop it by setting ``stop`` (an ``asyncio.Event``; a wait between polls
        ends at once), by ``should_stop()`` returning True, or by cancelling the
        task: a stop request is seen between instances, so it never leaves one
        half-saved; a cancellation stops the instance in flight as described in
        the module docstring. Store errors are logged (one line) and polling
        goes on with capped exponential backoff and jitter, as in
        :meth:`gorch.Engine.work`. ``on_result`` may be ``async def``.
        """

        stopped = _StopWhen(stop, should_stop)
        return await self._run(self._work(poll, batch, stopped, on_result, max_backoff))

    async def close(self) -> None:
        """Close the store (its connections)."""
        await self.store.close()

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ the driver

    async def _run(self, op: Op[_T], store: AsyncStore | None = None) -> _T:
        """Perform ``op``'s requests with ``await`` until it returns.

        A cancellation (or any BaseException) is not thrown into the operation
        (its handlers are for the store's and the workflow's errors): the
        operation is closed where it stands, and what it saved stays saved.
        """
        if store is None:
            store = self.store
        result: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    request = op.send(result) if error is None else op.throw(error)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                result, error = None, None
                try:
                    if type(request) is StoreCall:  # most requests: no dispatch through _perform
                        method = getattr(store, request.method)
                        result = await method(*request.args, **request.kwargs)
                    else:
                        result = await self._perform(request, store)
                except Exception as e:
                    error = e
        finally:
            op.close()

    async def _perform(self, request: Request, store: AsyncStore) -> Any:
        if isinstance(request, StoreCall):
            return await getattr(store, request.method)(*request.args, **request.kwargs)
        if isinstance(request, Dispatch):
            try:
                if self.dispatch is not None:
                    await self.dispatch.adispatch(request.ids)
            except Exception as e:  # the save committed: run_due finds the instance due
                request.not_sent(e)
            return None
        if isinstance(request, Resume):
            cur = request.cur
            checkpoint = request.checkpoint
            middleware = self._live_middleware()
            if request.create is not None:
                create = request.create
                middleware = (_AsyncCreateGuard(lambda: self._run(create())), *middleware)
            try:
                await arun(
                    cur.wf,
                    cur.state,
                    lambda kind: self._run(checkpoint(kind)),
                    lazy_steps=True,
                    middleware=middleware,
                    reason=request.reason,
                    restore=request.restore,
                    concurrency=self.concurrency,
                    executor=self.executor,
                    report_failures=False,
                    deadline=request.deadline,
                    step_log=self._step_log,
                )
            except Abort as a:
                raise a.error from None
            return None
        if isinstance(request, ReportFailure):
            await areport_failure(
                request.wf, request.state, request.error, middleware=self._live_middleware()
            )
            return None
        if isinstance(request, DryRun):
            halt = () if request.halt is None else (request.halt,)
            out: builtins.list[bool | GorchError] = []
            for wf, state in request.runs:
                try:
                    await arun(wf, state, None, max_units=0, middleware=halt)
                    out.append(True)
                except (Halted, ResumeLimitError, SetupError):
                    out.append(False)
                except GorchError as e:
                    out.append(e)
            return out
        if isinstance(request, HandleEvent):
            return await ahandle_event(
                request.wf,
                request.state,
                request.event,
                request.input,
                thread_id=request.thread_id,
                pc=request.pc,
                middleware=self._event_middleware(),
                now=request.now,
            )
        if isinstance(request, Pause):
            await asyncio.sleep(request.seconds)
            return None
        if isinstance(request, Idle):
            await self._idle(request.seconds, request.should_stop)
            return None
        if isinstance(request, Awaited):
            return await request.awaitable
        if isinstance(request, Cancel):
            await acancel(request.wf, request.state)
            return None
        raise TypeError(f"unknown engine request {request!r}")

    @staticmethod
    async def _idle(seconds: float, should_stop: Callable[[], bool]) -> None:
        """Wait ``seconds``, or less: a stop event ends the wait at once, and a
        ``should_stop`` callable is checked every 50 ms."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        event = should_stop.event if isinstance(should_stop, _StopWhen) else None
        polled = not isinstance(should_stop, _StopWhen) or should_stop.should_stop is not None
        while not should_stop():
            left = deadline - loop.time()
            if left <= 0:
                return
            wait = min(0.05, left) if polled else left
            if event is None:
                await asyncio.sleep(wait)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=wait)


class _AsyncCreateGuard(Middleware):
    """:class:`gorch.engine.CreateGuard` for the async driver: concurrent steps of the
    first round wait for the one create."""

    def __init__(self, create: Callable[[], Awaitable[None]]) -> None:
        self.create = create
        self.lock = asyncio.Lock()
        self.done = False
        self.error: Exception | None = None

    async def around_step_async(self, ctx: StepContext, call_next: CallNext) -> Any:
        await self._ensure()
        return await call_next()

    async def around_event_async(self, ctx: EventContext, call_next: CallNext) -> Any:
        if not self.done and effect_ahead(ctx):
            await self._ensure()
        return await call_next()

    async def _ensure(self) -> None:
        if self.done:
            return
        async with self.lock:
            if self.error is not None:
                raise Abort(self.error)
            if self.done:
                return
            try:
                await self.create()
            except Exception as e:
                self.error = e
                raise Abort(e) from e
            self.done = True


class _StopWhen:
    """A worker's stop condition: an ``asyncio.Event`` set, or a callable returning True."""

    __slots__ = ("event", "should_stop")

    def __init__(self, event: asyncio.Event | None, should_stop: Callable[[], bool] | None) -> None:
        self.event = event
        self.should_stop = should_stop

    def __call__(self) -> bool:
        if self.event is not None and self.event.is_set():
            return True
        return self.should_stop is not None and self.should_stop()
