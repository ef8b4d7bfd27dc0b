"""A lower bound for PostgreSQL's claims, so that an idle ``run_due`` stays cheap.

Why: every timer that fires leaves dead entries behind in the wake-up index
(the version it was claimed from, the version its lease was written to), all
at wake-up times in the past, which is where a claim's index scan starts. Only
VACUUM removes them, and not while any session's snapshot is older than they
are. A claim that scans from the beginning of the index steps over every one
of them, so an idle poll slows down with every timer fired since the last
VACUUM (about 3 ms after 10^5 timers here, ten times an empty table).

So each store remembers a *floor*: a time below which, as far as it knows, no
live record has a wake-up. A claim then scans ``floor <= wake_at <= now``
only. The floor rises after a claim that took every record due (it becomes
``now - margin``), and falls at once below any wake-up this store writes
itself. A wake-up that another process writes below this store's floor (a
clock behind ours by more than ``margin``, a write that took longer than that
to commit) is still found: every ``rescan`` seconds a claim scans the whole
index again. Timers are never fired early, and never lost; at worst such a
one is found ``rescan`` seconds late.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

MARGIN = timedelta(seconds=5)
"""How far below a claim's ``now`` the floor stays: room for clocks that differ a little
and writes in flight while the claim ran."""
RESCAN_EVERY = 30.0
"""Seconds between two claims that scan the whole wake-up index."""


class WakeFloor:
    """The floor of one store instance (thread-safe; see the module docstring)."""

    def __init__(self, margin: timedelta = MARGIN, rescan_every: float = RESCAN_EVERY) -> None:
        self.margin = margin
        self.rescan_every = rescan_every
        self._lock = threading.Lock()
        self._floor: datetime | None = None
        self._lowered = 0  # bumped by every write with a wake-up: a claim's token goes stale
        self._next_rescan = 0.0

    def bound(self, now: datetime) -> tuple[datetime | None, int]:
        """The lower bound for a claim at ``now`` (None: scan from the start), and a token
        to hand back to :meth:`claimed`."""
        with self._lock:
            floor = self._floor
            if floor is None or now < floor or time.monotonic() >= self._next_rescan:
                return None, self._lowered
            return floor, self._lowered

    def claimed(self, now: datetime, bound: datetime | None, complete: bool, token: int) -> None:
        """After a claim at ``now`` from ``bound``; ``complete``: it took every due record.

        The floor rises only if no wake-up below it was written meanwhile (``token``
        unchanged): a write that committed while the claim ran may not have been seen.
        """
        if not complete:
            return
        with self._lock:
            if token != self._lowered:
                return
            if bound is None:
                self._next_rescan = time.monotonic() + self.rescan_every
            new = now - self.margin
            if self._floor is None or bound is None or new > self._floor:
                self._floor = new

    def wrote(self, wake: datetime | None) -> None:
        """A write of this store committed with ``wake``: keep the floor below it.

        A claim running meanwhile may not have seen the write and must not raise
        the floor over it, so every such write counts, not only those below the
        floor as it stands now.
        """
        if wake is None:
            return
        with self._lock:
            self._lowered += 1
            if self._floor is not None and wake < self._floor:
                self._floor = wake
