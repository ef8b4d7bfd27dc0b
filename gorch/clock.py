"""The current time, as gorch sees it: UTC, and replaceable for tests.

Timers, ``due_events`` and the Engine read the time only through :func:`now`,
so :class:`gorch.testing.WorkflowEnv` can run a workflow that waits three
days in milliseconds (freezegun keeps working too: the default clock is
``datetime.now``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

_clock: ContextVar[Callable[[], datetime] | None] = ContextVar("gorch_clock", default=None)


def now() -> datetime:
    """The current time as an aware UTC datetime."""
    clock = _clock.get()
    if clock is None:
        return datetime.now(UTC)
    t = clock()
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


@contextmanager
def use_clock(clock: Callable[[], datetime]) -> Iterator[None]:
    """Read the time from ``clock`` inside the block (this thread / task only)."""
    token = _clock.set(clock)
    try:
        yield
    finally:
        _clock.reset(token)
