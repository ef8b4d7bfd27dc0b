"""What happened to an instance: its history log, as ``Engine.history(id)`` returns it.

The Engine appends entries at the points where it saves (a start, every step
attempt, every event and timer, a cancel, the end) and hands them to the
store with that save, so the log is written in the same atomic write as the
state it describes: a save that loses its compare-and-swap leaves no entry
behind, and a crash cannot leave an entry without its state (or the reverse).
The store keeps the newest ``history_limit`` entries of each instance and
counts the dropped ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

import pydantic
from pydantic_core import to_json, to_jsonable_python

from gorch import clock
from gorch.hooks import StepContext

__all__ = ["History", "HistoryEntry", "HistoryKind", "HistoryPage", "Written"]

HistoryKind = Literal[
    "started", "step", "event", "timer", "cancelled", "retried", "finished", "failed"
]


class HistoryEntry(pydantic.BaseModel):
    """One thing that happened to an instance, with the time it happened (UTC)."""

    at: datetime
    kind: HistoryKind
    name: str | None = None
    """The step, event or timer; the workflow for ``started``."""
    thread_id: str | None = None
    pc: int | None = None
    """For an event or a timer: the position of the wait it was delivered to."""
    attempt: int | None = None
    """For a step: 1 for its first run, 2 for its first retry, ..."""
    duration: float | None = None
    """For a step: how long the attempt took, in seconds."""
    error: str | None = None
    """For a failed step attempt (or ``failed``): the error, as ``Type: message``."""
    by: str | None = None
    """Who acted, if told: who started it, sent the event, cancelled or retried it
    (``by=`` of ``Engine.start`` / ``send`` / ``cancel`` / ``retry``; the HTTP app
    and the CLI fill it in)."""
    input: Any = None
    """For ``started``: the initial data; for an event: its input (as JSON data)."""
    output: Any = None
    """For an event: what its handler returned (as JSON data)."""


class Written(str):
    """A history entry written as JSON text straight away, with its ``kind``.

    The entries of every start, send, step and end are written this way:
    through a ``HistoryEntry`` model they would cost several times more. The
    text is what the model would have written (fields that are None left
    out); ``HistoryEntry`` reads it back.
    """

    kind: str

    @classmethod
    def of(cls, kind: str, fields: dict[str, Any]) -> Written:
        """The entry of ``kind`` with ``fields`` (``at`` among them; None values left out)."""
        data = {"at": fields.pop("at"), "kind": kind}
        for k, v in fields.items():
            if v is not None:
                data[k] = v
        written = cls(to_json(data, fallback=repr).decode())
        written.kind = kind
        return written


class History(list[HistoryEntry]):
    """An instance's history, oldest first; ``dropped``: older entries no longer kept."""

    dropped: int

    def __init__(self, entries: Iterable[HistoryEntry] = (), dropped: int = 0) -> None:
        super().__init__(entries)
        self.dropped = dropped


def jsonable(value: Any) -> Any:
    """``value`` as JSON data (pydantic models, dates...), its ``repr`` where there is none."""
    return to_jsonable_python(value, fallback=repr)


def _decoded(value: Any) -> Any:
    """An input given as JSON bytes (the Engine validates bytes as JSON) as its data."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return json.loads(bytes(value))
        except ValueError:
            return bytes(value).decode("utf-8", "replace")
    return value


def entry(kind: HistoryKind, **fields: Any) -> HistoryEntry:
    """A new entry stamped with the current time (the clock a test may replace)."""
    for key in ("input", "output"):
        if key in fields:
            fields[key] = jsonable(_decoded(fields[key]))
    return HistoryEntry(at=clock.now(), kind=kind, **fields)


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class Recorder:
    """Notes every step attempt (the core's ``step_log``) for the instance's next save.

    Entries go to the list registered for the running instance (by its id; a
    step that runs on a copy of the data, as concurrent ones do, still names
    its instance), so runs of several instances in one engine never mix.
    Not a middleware: a middleware would put every resume on the core's
    hooked path; the core times the step right around its hooks instead.
    """

    def __init__(self) -> None:
        self.pending: dict[str, list[HistoryEntry | Written]] = {}

    def watch(self, workflow_id: str, into: list[HistoryEntry | Written]) -> None:
        self.pending[workflow_id] = into

    def unwatch(self, workflow_id: str, into: list[HistoryEntry | Written]) -> None:
        if self.pending.get(workflow_id) is into:
            del self.pending[workflow_id]

    def note(self, ctx: StepContext, duration: float, error: BaseException | None) -> None:
        into = self.pending.get(ctx.workflow_id)
        if into is None:
            return
        fields = {
            "at": clock.now(),
            "name": ctx.step,
            "thread_id": ctx.thread_id,
            "attempt": ctx.attempt,
            "duration": duration,
            "error": None if error is None else error_text(error),
        }
        into.append(Written.of("step", fields))


class HistoryPage(pydantic.BaseModel):
    """An instance's history as the HTTP API returns it."""

    id: str
    dropped: int = 0
    """Older entries no longer kept (the log is capped per instance)."""
    entries: list[HistoryEntry]
