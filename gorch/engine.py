"""The Engine: the stateless core, a store, compare-and-swap and a wake-up index.

:class:`Engine` runs :class:`~gorch.engine_core.EngineCore`'s rules with
blocking calls (``gorch.AsyncEngine`` awaits the same rules; see
:mod:`gorch.engine_core` for what they guarantee). This module also
re-exports what callers import from ``gorch.engine``: the core, the snapshot
types, the requests of an operation.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    CreateGuard,
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
    initial_data,
)
from gorch.errors import (
    GorchError,
    ResumeLimitError,
    SetupError,
)
from gorch.handlers import discard
from gorch.history import History
from gorch.idempotency import (
    key_id,
)
from gorch.interpreter import cancel as cancel_state
from gorch.interpreter import handle_event, report_failure
from gorch.interpreter import run as run_state
from gorch.snapshot import (
    DueResult,
    EventInfo,
    EventTypes,
    InstanceStatus,
    ListPage,
    Snapshot,
    Summary,
    ThreadInfo,
    event_types,
    json_schema_of,
)
from gorch.stores.base import DEFAULT_HISTORY_LIMIT, Store
from gorch.workflow import Workflow

if TYPE_CHECKING:
    from gorch.dispatch.base import Dispatcher

__all__ = [
    "RETAINED_STATUSES",
    "Abort",
    "Awaited",
    "Cancel",
    "CreateGuard",
    "DryRun",
    "DueResult",
    "Engine",
    "EngineCore",
    "EventInfo",
    "EventTypes",
    "HandleEvent",
    "Idle",
    "InstanceStatus",
    "ListPage",
    "Op",
    "Pause",
    "Request",
    "Resume",
    "Snapshot",
    "StartItem",
    "StoreCall",
    "Summary",
    "ThreadInfo",
    "effect_ahead",
    "event_types",
    "initial_data",
    "json_schema_of",
    "key_id",
]

log = logging.getLogger("gorch")
_T = TypeVar("_T")


# --------------------------------------------------------------------------- the sync driver


class Engine(EngineCore):
    """Runs registered workflow classes against a store.

    ``store`` is a :class:`gorch.stores.Store` or a URL (``sqlite:///gorch.db``,
    ``postgresql://...``, ``redis://...``, ``memory://``). With
    ``defer_resume=True``, ``send`` only applies the event and leaves the resume
    to ``run_due`` (a worker), keeping webhook requests short.

    A store that fails (a dropped connection, a lock held too long) is retried
    ``store_retries`` times with backoff; a write whose outcome is unknown (the
    connection dropped after the statement was sent) is settled by reading
    the record back, so a committed write is never reported as failed.

    ``run_deadline`` (seconds or a timedelta) bounds every run of an instance
    (a start, a send, a due resume): no step starts after it, and an instance
    with steps left is saved ``resuming``, due at once, for ``run_due``.

    ``dispatch`` (a :class:`gorch.dispatch.Dispatcher`) is told of every
    instance a save leaves due now (a deferred start or send, a run past its
    deadline), so a queue's worker resumes it at once (``resume_due``);
    timers stay with the store and ``run_due``.
    """

    def __init__(
        self,
        store: Store | str,
        workflows: Mapping[str, type[Workflow]],
        *,
        defer_resume: bool = False,
        lease: timedelta | float = 60.0,
        conflict_retries: int = 100,
        error_backoff: timedelta | float = 60.0,
        middleware: Sequence[object] = (),
        store_retries: int = 3,
        idempotency_keys: int = 100,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        retention: timedelta | float | None = None,
        retention_every: timedelta | float = 3600.0,
        run_deadline: timedelta | float | None = None,
        dispatch: Dispatcher | None = None,
    ) -> None:
        if isinstance(store, str):
            from gorch.stores import open_store

            store = open_store(store)
        self.store: Store = store
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

    def start(
        self,
        name: str,
        id: str | None = None,
        data: Mapping[str, Any] | Workflow | None = None,
        *,
        key: str | None = None,
        by: str | None = None,
        conn: Any = None,
    ) -> Snapshot:
        """Create an instance, run it until it blocks (unless deferred), return its snapshot.

        Atomic: ``start`` raises only if no record was created. The record is
        created as late as it can be and before anything with effects: an
        instance that blocks before any step (it waits for an event or a
        timer) is created in the state it blocks in, in one write; otherwise
        the record is created, leased to this call, right before the first
        step (or handler setup other than a timer's) runs. Either way a
        concurrent start of the same id fails with ``WorkflowExists`` before
        any step of it runs. Once the record exists, whatever happens in the
        first resume (a step failing, the store dropping) is the instance's,
        and ``start`` returns its snapshot (status ``failed``, or ``resuming``
        for ``run_due`` to carry on). The snapshot's input schemas are worked
        out when read.

        ``key`` makes a retried start apply nothing twice: without ``id``, the
        id is derived from ``name`` and ``key``; a repeat with the same key
        returns the existing instance's snapshot, and the same key with other
        data raises ``IdempotencyKeyReused``.

        ``by`` (a user, a service) is written to the ``started`` entry of the
        instance's history.

        ``conn``, a connection of the caller's (``sqlite3.Connection`` to the
        store's file, ``psycopg.Connection`` to the store's database), writes
        the instance in the transaction open on it, so "create the order row
        and its workflow" commits or rolls back as one. Nothing with effects
        runs before that commit: an instance that would run a step first is
        written ``resuming``, due at once, for ``run_due`` or a dispatcher's
        worker (a dispatcher that enqueues in the transaction is told in it;
        one that sends after a commit is not, and ``run_due`` finds it).
        """
        if conn is None:
            return self._run(self._start(name, id, data, key, by))
        store = self.store.using(conn)
        return self._run(self._start(name, id, data, key, by, callers_transaction=True), store)

    def start_many(
        self,
        name: str,
        items: Iterable[Mapping[str, Any] | Workflow | StartItem],
        *,
        batch: int = 1000,
        by: str | None = None,
    ) -> builtins.list[str]:
        """Create many instances of ``name``, ``batch`` records per write; their ids, in order.

        Each item is the data (a dict, JSON, a workflow instance) or a
        :class:`~gorch.bulk.StartItem` with an ``id`` or an idempotency ``key``
        (the id is generated otherwise). An instance that blocks before any
        step (it waits for an event or a timer) is written as it blocks, as
        ``start`` would leave it, in one go; one that would run a step or a
        handler setup other than a timer's first (or any, with
        ``defer_resume``) is written ``resuming``, due at once, and ``run_due``
        (a worker) runs it: nothing with effects runs before its record exists.

        Each batch is one atomic write (``COPY`` in one transaction on
        PostgreSQL, one transaction on SQLite, one script on Redis): an item
        that is refused (invalid data or id, an id already taken, a key reused
        with other data) raises before its batch is written, with a note
        saying which item it was (``error.item``) and how many items of earlier
        batches were started (``error.started``); those stay. A keyed item
        started before with the same data is skipped, and its id returned, as
        a repeated keyed ``start`` returns the existing instance.
        """
        return self._run(self._start_many(name, items, batch, by))

    def send(
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
        """Deliver an event and return the handler's output.

        The event is applied to the latest version exactly once (a lost
        compare-and-swap re-applies it to the new version). Once the event's
        save has committed, ``send`` returns the output whatever happens next:
        a step failing in the resume that follows, the store failing, another
        runner taking over. The instance carries the outcome (``get`` shows
        it) and, if the resume could not finish, ``run_due`` carries on when
        the lease of this call runs out.

        ``key`` (an idempotency key) makes a retried send apply nothing twice:
        a repeated key returns the first output (as JSON-decoded data) and
        leaves the instance alone; the same key with another event or input
        raises ``IdempotencyKeyReused``. The last ``idempotency_keys`` keys of
        each instance are kept in its record.

        A ``Timeout`` case's name is refused with ``TimerNotSendable``: timers
        fire when due, through ``run_due``.
        """
        return self._run(self._send(id, event, input, thread_id, pc, key, by))

    def resume(self, id: str) -> Snapshot:
        """Run a pending (or failed) instance until it blocks; return its snapshot."""
        return self._run(self._resume(id))

    def resume_due(self, id: str, *, now: datetime | None = None) -> DueResult | None:
        """Do for instance ``id`` what :meth:`run_due` would, if it is due; else None.

        What a queue's worker runs for "resume instance X now" (see
        :mod:`gorch.dispatch`): the instance is claimed with a lease first, so
        a message delivered twice, or one for an instance another runner has
        (or that is no longer due), changes nothing and returns None.
        """
        return self._run(self._resume_due(id, now))

    def retry(self, id: str, *, by: str | None = None) -> Snapshot:
        """Re-arm a failed instance: reset attempt counts and resume it now."""
        return self._run(self._retry(id, by))

    def get(self, id: str) -> Snapshot:
        """The instance's data, status, threads, awaited events and next wake-up."""
        return self._run(self._get(id))

    def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> ListPage:
        """Instances in id order, filtered by workflow name and status."""
        return self._run(self._list(workflow, status, limit, after))

    def cancel(self, id: str, *, by: str | None = None) -> Snapshot:
        """Tear down the awaited events and mark the instance cancelled."""
        return self._run(self._cancel(id, by))

    def history(self, id: str) -> History:
        """What happened to the instance, oldest first (``.dropped``: older entries cut off).

        Each save writes its entries in the same write as the state, so the
        history never tells of a step, event or timer the state does not
        reflect. At most ``history_limit`` entries are kept per instance.
        """
        return self._run(self._history(id))

    def purge(
        self,
        *,
        finished_before: datetime,
        statuses: Sequence[str] = RETAINED_STATUSES,
        batch: int = 500,
        progress: Progress | None = None,
    ) -> int:
        """Delete instances in ``statuses`` not updated since ``finished_before``; how many.

        Runs in batches of ``batch``, each its own short write (no table lock),
        and a record is deleted only if it still matches at that moment, so an
        instance that a concurrent call just moved (a retry of a failed one)
        stays. Their history goes with them. ``progress(done, None)``, if given,
        is called after each batch with the number deleted so far (as
        :meth:`check` reports its progress; the total is not known ahead).
        """
        return self._run(self._purge(finished_before, statuses, batch, progress))

    def check(self, *, page_size: int = 100, progress: Progress | None = None) -> CheckReport:
        """Which in-flight instances the current code would strand (see :mod:`gorch.check`)."""
        return self._run(check_op(self, page_size, progress))

    def run_due(
        self,
        now: datetime | None = None,
        limit: int | None = 100,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> builtins.list[DueResult]:
        """Fire due timers, retry failed steps whose backoff is over, finish pending resumes.

        Call it from cron, a queue consumer or :meth:`work`. Each instance is
        claimed with a lease just before it runs (never a batch at once, so a
        slow step cannot make the lease of instances still waiting run out), and
        concurrent callers never process the same one. ``limit=None`` drains
        everything due (each instance at most once per call).

        Every claimed instance gets a :class:`DueResult` whose ``outcome`` says
        what happened: ``processed``, ``skipped`` (another runner took it over)
        or ``failed`` (``error`` says why; the instance is left for a later
        call). A store error while claiming is tried again with backoff; if the
        store stays unavailable, ``StoreUnavailable`` is raised when nothing was
        processed yet, else the results so far are returned (and the error logged).
        """
        return self._run(self._run_due(now, limit, should_stop))

    def work(
        self,
        *,
        poll: float = 1.0,
        batch: int = 10,
        should_stop: Callable[[], bool] = lambda: False,
        on_result: Callable[[DueResult], None] | None = None,
        max_backoff: float = 30.0,
    ) -> int:
        """Loop on :meth:`run_due` until ``should_stop()``; return how many were processed.

        ``should_stop`` is checked between instances, so a stop request never
        leaves one half-saved. A store that fails does not end the loop: the
        error is logged (one line) and polling goes on with capped exponential
        backoff and jitter (up to ``max_backoff`` seconds) until the store answers.
        """
        return self._run(self._work(poll, batch, should_stop, on_result, max_backoff))

    @staticmethod
    def _pause(seconds: float, should_stop: Callable[[], bool]) -> None:
        """Sleep ``seconds``, waking early when asked to stop."""
        deadline = time.monotonic() + seconds
        while not should_stop() and time.monotonic() < deadline:
            time.sleep(min(0.05, seconds))

    # ------------------------------------------------------------------ the driver

    def _run(self, op: Op[_T], store: Store | None = None) -> _T:
        """Perform ``op``'s requests with blocking calls until it returns (its store calls
        on ``store``, if given, else on the Engine's)."""
        if store is None:
            store = self.store
        send, throw, perform = op.send, op.throw, self._perform
        result: Any = None
        error: Exception | None = None
        while True:
            try:
                request = send(result) if error is None else throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            result, error = None, None
            try:
                if type(request) is StoreCall:  # most requests: no dispatch through _perform
                    result = getattr(store, request.method)(*request.args, **request.kwargs)
                else:
                    result = perform(request, store)
            except Exception as e:
                error = e

    def _perform(self, request: Request, store: Store) -> Any:
        if isinstance(request, StoreCall):
            return getattr(store, request.method)(*request.args, **request.kwargs)
        if isinstance(request, Dispatch):
            try:
                if self.dispatch is not None:
                    self.dispatch.dispatch(request.ids)
            except Exception as e:  # the save committed: run_due finds the instance due
                request.not_sent(e)
            return None
        if isinstance(request, Resume):
            cur = request.cur
            middleware = self._live_middleware()
            if request.create is not None:
                create = request.create
                middleware = (CreateGuard(lambda: self._run(create())), *middleware)
            try:
                run_state(
                    cur.wf,
                    cur.state,
                    lambda kind: self._run(request.checkpoint(kind)),
                    lazy_steps=True,
                    middleware=middleware,
                    reason=request.reason,
                    restore=request.restore,
                    report_failures=False,
                    deadline=request.deadline,
                    step_log=self._step_log,
                )
            except Abort as a:
                raise a.error from None
            return None
        if isinstance(request, ReportFailure):
            report_failure(
                request.wf, request.state, request.error, middleware=self._live_middleware()
            )
            return None
        if isinstance(request, DryRun):
            halt = () if request.halt is None else (request.halt,)
            out: list[bool | GorchError] = []
            for wf, state in request.runs:
                try:
                    run_state(wf, state, None, max_units=0, middleware=halt)
                    out.append(True)
                except (Halted, ResumeLimitError, SetupError):
                    out.append(False)
                except GorchError as e:
                    out.append(e)
            return out
        if isinstance(request, HandleEvent):
            return handle_event(
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
            time.sleep(request.seconds)
            return None
        if isinstance(request, Idle):
            self._pause(request.seconds, request.should_stop)
            return None
        if isinstance(request, Awaited):
            discard(request.awaitable)
            raise TypeError(
                "a callback of Engine returned an awaitable: use gorch.AsyncEngine "
                "for async callbacks"
            )
        if isinstance(request, Cancel):
            cancel_state(request.wf, request.state)
            return None
        raise TypeError(f"unknown engine request {request!r}")
