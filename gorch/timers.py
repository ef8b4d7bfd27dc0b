"""Timers without a scheduler: read due times from the state.

A timer is an awaited event whose ``setup_data`` is an ISO 8601 timestamp
with a UTC offset; :class:`gorch.Timeout` writes one, and so may any custom
:class:`gorch.Handler`. Fire a due timer with
``handle_event(wf, state, req.name, thread_id=req.thread_id, pc=req.pc)``: a
timer that fires late, after its wait ended, is rejected with ``StaleEvent``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from gorch import clock
from gorch.state import EventRequest, EventStatus, State, ThreadStatus


def due_time(req: EventRequest) -> datetime | None:
    """The due time of a timer request, or None if the request is not a timer."""
    data = req.setup_data
    if not data or not isinstance(data, str):
        return None
    try:
        due = datetime.fromisoformat(data)
    except ValueError:
        return None
    return due if due.tzinfo is not None else None


def _timers(state: State) -> list[tuple[datetime, EventRequest]]:
    out = []
    for t in state.threads:
        if t.status is not ThreadStatus.WAITING_EVENT:
            continue
        for we in t.wait_events:
            if we.status is EventStatus.SETUP:
                due = due_time(we.req)
                if due is not None:
                    out.append((due, we.req))
    return out


def next_wakeup(state: State) -> datetime | None:
    """The earliest due time among the timers the workflow awaits, or None."""
    return wakeup(state)[0]


def wakeup(state: State) -> tuple[datetime | None, bool]:
    """:func:`next_wakeup`, and whether an awaited event's setup failed (it is retried),
    in one pass over the waits: the Engine asks both at every save."""
    earliest: datetime | None = None
    setup_failed = False
    for t in state.threads:
        if t.status is not ThreadStatus.WAITING_EVENT:
            continue
        for we in t.wait_events:
            status = we.status
            if status is EventStatus.SETUP:
                due = due_time(we.req)
                if due is not None and (earliest is None or due < earliest):
                    earliest = due
            elif status is EventStatus.SETUP_ERROR:
                setup_failed = True
    return earliest, setup_failed


def due_events(state: State, now: datetime | None = None) -> list[EventRequest]:
    """Timer requests due at ``now`` (default: the current UTC time), earliest first.

    A naive ``now`` is taken as UTC.
    """
    if now is None:
        now = clock.now()
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    due = [(d, i, req) for i, (d, req) in enumerate(_timers(state)) if d <= now]
    due.sort(key=lambda x: (x[0], x[1]))
    return [req for _, _, req in due]
