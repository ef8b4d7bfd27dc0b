"""Bulk start: what ``Engine.start_many`` does to each item before its batch is written.

Starting an instance one by one costs a round trip and a commit each (and,
for an instance whose first resume runs steps, more). ``start_many`` writes a
whole batch of new records at once (``Store.create_many``: ``COPY`` on
PostgreSQL, one transaction on SQLite, one script on Redis), so the cost per
instance is its CPU: validating its data and running its first resume.

That first resume is a *dry run*: it may only get the instance to where it
blocks without effects (evaluating the definition and conditions, setting up
timers). It stops before any step, loop iteration or other handler setup; such
an instance is written as it was before the resume, ``resuming`` and due at
once, for ``run_due`` (a worker) to run, so that nothing with effects ever runs
before its record exists. The same dry run serves ``start`` (see
:meth:`BulkStart._dry_run_of`): an instance that blocks at once is then
created in one write, as it blocks.

An Engine with a dispatcher (:mod:`gorch.dispatch`) is told of a batch's
instances due at once after the batch has committed, in one call (a ``COPY``
cannot take a queue's job along in its transaction); ``run_due`` remains the
safety net should that call fail.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from gorch.codec import dumps
from gorch.engine_ops import (
    _CREATED_BY,
    Dispatch,
    DryRun,
    Op,
    Pause,
    SetupHalt,
    StoreCall,
    _backoff,
    _bulk_note,
    _Loaded,
    _nonce,
    _now,
    _one_line,
    initial_data,
)
from gorch.errors import GorchError, StoreUnavailable, WorkflowExists, WorkflowNotFound
from gorch.handlers import Handler
from gorch.history import Recorder, entry, jsonable
from gorch.idempotency import START_KEY, check_repeated_start, key_id, start_digest
from gorch.snapshot import STATUS_OF, InstanceStatus
from gorch.state import State, new_state
from gorch.statements import Select, Stmt, Timeout
from gorch.stores.base import NewRecord, Record
from gorch.workflow import Workflow

if TYPE_CHECKING:
    from gorch.dispatch.base import Dispatcher

__all__ = ["BulkStart", "StartItem", "custom_setups", "started_entry"]

log = logging.getLogger("gorch")


@dataclass(frozen=True, slots=True)
class StartItem:
    """One instance for ``Engine.start_many``: its data, and its id or idempotency key.

    Without ``id`` or ``key`` the id is generated. With ``key``, the id is the
    one ``start(..., key=key)`` derives, and a repeat with the same data is
    skipped (its id is returned), as a repeated ``start`` would be.
    """

    data: Mapping[str, Any] | Workflow | str | bytes | None = None
    id: str | None = None
    key: str | None = None


def custom_setups(wf: Workflow) -> bool | None:
    """Whether ``wf``'s definition has a Select case whose handler has a setup of its own
    (not a ``Timeout``'s): then a dry run needs :class:`SetupHalt` to stop before it.

    Read from one instance's definition (a definition whose cases depend on the
    data would be judged by that instance). None when the definition cannot be
    read (the resume will say why).
    """

    def walk(st: Stmt) -> bool:
        if isinstance(st, Select):
            for case in st.cases:
                h = getattr(case, "handler", None)
                if (
                    not isinstance(case, Timeout)
                    and isinstance(h, Handler)
                    and type(h).setup is not Handler.setup
                ):
                    return True
        return any(walk(child) for body in st.children() for child in body)

    try:
        return walk(wf.definition())
    except Exception:
        return None


def started_entry(at: str, name: str, by: str | None, input_json: str) -> str:
    """The ``started`` history entry as JSON text, as ``HistoryEntry`` would write it.

    ``at`` is the entry's time already as JSON; ``input_json`` the data as JSON
    (``model_dump_json``). Written as text: a million entries through pydantic
    models would cost more than the rest of the instance.
    """
    by_part = "" if by is None else f',"by":{json.dumps(by)}'
    return f'{{"at":{at},"kind":"started","name":{json.dumps(name)}{by_part},"input":{input_json}}}'


class BulkStart:
    """``start_many`` (and the dry runs ``start`` shares with it), mixed into
    :class:`gorch.engine.EngineCore`."""

    if TYPE_CHECKING:
        defer_resume: bool
        dispatch: Dispatcher | None
        history_limit: int
        store_retries: int
        _keeps_history: bool
        _recorder: Recorder
        _plain_setups: dict[type[Workflow], bool]
        _hooked: dict[type[Workflow], bool]
        _setup_halt: SetupHalt

        def _cls(self, name: str) -> type[Workflow]: ...

        def _check_id(self, id: object) -> str: ...

        def _load(self, id: str) -> Op[_Loaded]: ...

        def _live_middleware(self) -> tuple[object, ...]: ...

        def _wake(self, state: State, status: InstanceStatus, driving: bool) -> datetime | None: ...

    def _dry_run_of(self, cls: type[Workflow], wf: Workflow) -> tuple[bool, SetupHalt | None]:
        """Whether a first resume may be a dry run (see :mod:`gorch.bulk`), and the
        middleware that stops it before an effectful setup (None: only timers to set up).

        Not when something watches resumes (middleware of the application, or
        telemetry recording), and not with lifecycle hooks that run when the
        instance blocks (``on_waiting``, ``on_finish``): those must see the
        record, and run after it is saved.
        """
        live = self._live_middleware()
        if live:
            return False, None
        hooked = self._hooked.get(cls)
        if hooked is None:
            hooked = self._hooked[cls] = any(
                getattr(cls, hook) is not getattr(Workflow, hook)
                for hook in ("on_waiting", "on_finish", "on_start", "on_failed")
            )
        if hooked:
            return False, None
        return True, self._halt_for(wf)

    def _start_many(
        self,
        name: str,
        items: Iterable[Mapping[str, Any] | Workflow | StartItem],
        batch: int,
        by: str | None,
    ) -> Op[builtins.list[str]]:
        cls = self._cls(name)
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        # Lifecycle hooks that run when an instance blocks would run before its record
        # exists: such workflows are only created, for run_due to run. (Middleware does
        # not see these first resumes: one per instance would cost more than the rest.)
        dry = not self.defer_resume and not any(
            getattr(cls, hook) is not getattr(Workflow, hook)
            for hook in ("on_waiting", "on_finish", "on_start", "on_failed")
        )
        ids: builtins.list[str] = []
        chunk: builtins.list[tuple[int, Mapping[str, Any] | Workflow | StartItem]] = []
        for index, item in enumerate(items):
            chunk.append((index, item))
            if len(chunk) == batch:
                yield from self._start_batch(cls, name, chunk, by, dry, ids)
                chunk = []
        if chunk:
            yield from self._start_batch(cls, name, chunk, by, dry, ids)
        return ids

    def _start_batch(
        self,
        cls: type[Workflow],
        name: str,
        chunk: builtins.list[tuple[int, Mapping[str, Any] | Workflow | StartItem]],
        by: str | None,
        dry: bool,
        ids: builtins.list[str],
    ) -> Op[None]:
        """Prepare every item of one batch (nothing is written if one is bad), write them
        in one ``create_many``, settle the ids already taken (a repeated keyed start is
        skipped); append the batch's ids to ``ids``."""
        nonce = _nonce()  # tells this batch's records from a rival's, if read back
        # Generated ids are 32 hex digits, as start() makes them, but ordered by time as
        # a UUIDv7 is: 12 digits of milliseconds, then 20 random ones (80 bits, drawn
        # for the whole batch at once). A batch's new keys then land next to each other
        # at the end of the primary key's B-tree instead of all over it, which keeps a
        # million inserts from thrashing the database's page cache.
        stamp = f"{time.time_ns() // 1_000_000:012x}"
        fresh = os.urandom(10 * len(chunk)).hex()
        now = _now()
        at = json.dumps(jsonable(now))
        records: dict[str, NewRecord] = {}
        keys: dict[str, tuple[int, str | None, str]] = {}  # id -> item index, key, digest
        batch_ids: builtins.list[str] = []
        fresh_items: builtins.list[tuple[int, str, Workflow, State, dict[str, str]]] = []
        for n, (index, item) in enumerate(chunk):
            try:
                data, id, key = (
                    (item.data, item.id, item.key)
                    if isinstance(item, StartItem)
                    else (item, None, None)
                )
                wf = initial_data(name, cls, data)
                if id is not None:
                    wid = self._check_id(id)
                elif key is not None:
                    wid = key_id(name, key)
                else:
                    wid = stamp + fresh[20 * n : 20 * n + 20]
                digest = "" if key is None else start_digest(key, wf)
                meta = {_CREATED_BY: nonce, START_KEY: digest} if digest else {_CREATED_BY: nonce}
                if wid in keys:  # the same id twice in one batch: a repeat, or a clash
                    first = keys[wid]
                    if key is None or first[1] is None:
                        raise WorkflowExists(wid)
                    check_repeated_start(wid, key, first[2], digest)
                    batch_ids.append(wid)
                    continue
            except GorchError as e:
                _bulk_note(e, index, len(ids))
                raise
            state = new_state(wid, name)
            state.meta.update(meta)
            fresh_items.append((index, wid, wf, state, meta))
            keys[wid] = (index, key, digest)
            batch_ids.append(wid)
        # The dry runs of the whole batch in one request (one driver round trip).
        ran: builtins.list[bool | GorchError] = [False] * len(fresh_items)
        if dry and fresh_items:
            halt = self._halt_for(fresh_items[0][2])
            ran = yield DryRun([(wf, state) for _, _, wf, state, _ in fresh_items], halt)
        history: builtins.list[str] = []
        for (index, wid, wf, state, meta), blocked in zip(fresh_items, ran, strict=True):
            try:
                if isinstance(blocked, GorchError):
                    raise blocked
                if self._keeps_history:
                    history = [started_entry(at, name, by, wf.model_dump_json())]
                if blocked:
                    records[wid] = self._blocked_record(name, wid, wf, state, history)
                    continue
                state = new_state(wid, name)  # it halted before an effect: back to the start
                state.meta.update(meta)
                blob = dumps(wf, state)
            except GorchError as e:
                _bulk_note(e, index, len(ids))
                raise
            records[wid] = NewRecord(wid, name, InstanceStatus.RESUMING, blob, now, history)
        written: builtins.list[NewRecord] = []
        while records:
            written = list(records.values())
            taken = yield from self._create_many(written)
            if not taken:
                break
            written = []
            for wid in taken:
                index, key, digest = keys[wid]
                try:
                    if key is None:
                        raise WorkflowExists(wid)
                    existing = yield from self._load(wid)
                    check_repeated_start(wid, key, existing.state.meta.get(START_KEY), digest)
                except GorchError as e:
                    _bulk_note(e, index, len(ids))
                    raise
                del records[wid]  # started before with this key and data: nothing to do
        ids.extend(batch_ids)
        due = tuple(r.id for r in written if r.wake_at is not None and r.wake_at <= now)
        if due and self.dispatch is not None:
            # The batch has committed: its instances due at once go to the queue in one
            # message batch (a COPY cannot take a job along; run_due is the safety net).
            yield Dispatch(due)

    def _halt_for(self, wf: Workflow) -> SetupHalt | None:
        """The middleware a dry run of ``wf``'s class needs: None when its handlers' only
        setups are timers' (nothing to halt before, no middleware to run)."""
        plain = self._plain_setups.get(type(wf))
        if plain is None:
            custom = custom_setups(wf)
            if custom is None:  # a definition that does not build: the run will say why
                return self._setup_halt
            plain = self._plain_setups[type(wf)] = not custom
        return None if plain else self._setup_halt

    def _blocked_record(
        self, name: str, wid: str, wf: Workflow, state: State, history: builtins.list[str]
    ) -> NewRecord:
        """The record of an instance whose dry run got it where it blocks."""
        status = STATUS_OF[state.status]
        if status is InstanceStatus.FINISHED and history:
            history.append(entry("finished").model_dump_json(exclude_none=True))
        wake = self._wake(state, status, False)
        cursors = [t.cur_step for t in state.threads if t.cur_step]
        return NewRecord(wid, name, status, dumps(wf, state), wake, history, cursors)

    def _create_many(self, records: builtins.list[NewRecord]) -> Op[builtins.list[str]]:
        """``create_many``, tried again while the store is unavailable; a batch whose write
        may have committed is read back (it is atomic: its first record tells)."""
        options = {"history_limit": self.history_limit}
        for n in range(self.store_retries + 1):
            try:
                taken: builtins.list[str] = yield StoreCall("create_many", (records,), options)
                return taken
            except StoreUnavailable as e:
                if n == self.store_retries:
                    raise
                log.warning("gorch: start_many: %s; trying again", _one_line(e))
            yield Pause(_backoff(n))
            with contextlib.suppress(WorkflowNotFound, StoreUnavailable):
                first: Record = yield StoreCall("load", (records[0].id,))
                if first.blob == records[0].blob:
                    return []  # it did commit
        raise AssertionError("unreachable")
