"""PostgreSQL claims scan from a floor (``gorch.stores._floor``): fast when idle, never blind.

The floor skips the dead index entries fired timers leave behind; what must
hold is that no due record is ever lost: one this store writes below the
floor is claimed at once, one another process writes there at the next full
rescan.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from store_support import PG_DSN, StoreSpec, make_spec

from gorch.stores._floor import WakeFloor

LEASE = timedelta(seconds=30)
T0 = datetime(2030, 1, 1, tzinfo=UTC)


# -- the rule, without a server ------------------------------------------------------------


def test_no_floor_until_a_claim_took_everything_due() -> None:
    floor = WakeFloor(margin=timedelta(seconds=5))
    assert floor.bound(T0) == (None, 0)
    floor.claimed(T0, None, complete=False, token=0)  # more may be due: nothing learnt
    assert floor.bound(T0)[0] is None
    floor.claimed(T0, None, complete=True, token=0)
    assert floor.bound(T0 + timedelta(seconds=1))[0] == T0 - timedelta(seconds=5)


def test_a_write_meanwhile_keeps_the_floor_from_rising() -> None:
    floor = WakeFloor(margin=timedelta(seconds=5))
    floor.claimed(T0, None, complete=True, token=0)
    bound, token = floor.bound(T0 + timedelta(minutes=1))
    floor.wrote(T0 + timedelta(minutes=2))  # committed while the claim ran: maybe unseen
    floor.claimed(T0 + timedelta(minutes=1), bound, complete=True, token=token)
    assert floor.bound(T0 + timedelta(minutes=1))[0] == T0 - timedelta(seconds=5)


def test_a_write_below_the_floor_lowers_it() -> None:
    floor = WakeFloor()
    floor.claimed(T0, None, complete=True, token=0)
    floor.wrote(T0 - timedelta(days=3))
    assert floor.bound(T0)[0] == T0 - timedelta(days=3)
    floor.wrote(None)  # nothing scheduled: nothing to keep below
    assert floor.bound(T0)[0] == T0 - timedelta(days=3)


def test_a_claim_before_the_floor_or_after_the_rescan_period_scans_everything() -> None:
    floor = WakeFloor(rescan_every=0.05)
    floor.claimed(T0, None, complete=True, token=0)
    assert floor.bound(T0 - timedelta(days=1))[0] is None  # a clock that went back
    assert floor.bound(T0)[0] is not None
    time.sleep(0.06)
    assert floor.bound(T0)[0] is None


# -- on a real server ----------------------------------------------------------------------


@pytest.fixture
def pg_spec(tmp_path: Path) -> Iterator[StoreSpec]:
    yield from make_spec("postgres", tmp_path)


def test_own_writes_below_the_floor_are_claimed_at_once(pg_spec: StoreSpec) -> None:
    from gorch.stores.postgres import PostgresStore

    store = PostgresStore(PG_DSN, table=pg_spec.namespace)
    now = datetime.now(UTC)
    assert store.claim_due(now, 10, LEASE) == []
    assert store._ops.floor.bound(now)[0] is not None  # the next claim starts at the floor
    store.create("overdue", "w", "waiting", b"", now - timedelta(days=1))
    store.create("soon", "w", "waiting", b"", now + timedelta(hours=1))
    first = store.create("other", "w", "waiting", b"", now + timedelta(hours=2))
    store.save("other", first.version, "waiting", b"", now - timedelta(days=2))
    claimed = store.claim_due(now, 10, LEASE)
    assert [r.id for r in claimed] == ["other", "overdue"]  # earliest first
    store.close()


def test_another_stores_write_below_the_floor_is_claimed_at_the_next_rescan(
    pg_spec: StoreSpec,
) -> None:
    from gorch.stores.postgres import PostgresStore

    ours = PostgresStore(PG_DSN, table=pg_spec.namespace)
    ours._ops.floor = WakeFloor(rescan_every=0.5)
    theirs = PostgresStore(PG_DSN, table=pg_spec.namespace)
    assert ours.claim_due(datetime.now(UTC), 10, LEASE) == []
    theirs.create("late", "w", "waiting", b"", datetime.now(UTC) - timedelta(hours=1))
    deadline = time.monotonic() + 10
    claimed: list[str] = []
    while not claimed and time.monotonic() < deadline:
        claimed = [r.id for r in ours.claim_due(datetime.now(UTC), 10, LEASE)]
        time.sleep(0.05)
    assert claimed == ["late"]
    assert theirs.load("late").version == 2  # claimed once
    ours.close()
    theirs.close()


# -- the memory store's heap of wake-ups ---------------------------------------------------


def test_memory_heap_stays_in_proportion_to_scheduled_records_and_claims_every_due_one() -> None:
    """Rebuilt from its own entries, the heap drops stale ones (records finished,
    deleted, rescheduled) without losing a live one, however many records are stored."""
    from gorch.stores.memory import MemoryStore

    store = MemoryStore()
    due = {}
    for i in range(600):
        id = f"w{i:04}"
        rec = store.create(id, "wf", "waiting", b"x", T0 + timedelta(seconds=i))
        if i % 3 == 0:
            store.save(id, rec.version, "finished", b"y", None)  # no wake-up any more
        elif i % 3 == 1:
            later = T0 + timedelta(hours=1, seconds=i)  # rescheduled: its first entry is stale
            store.save(id, rec.version, "waiting", b"y", later)
            due[id] = later
        else:
            due[id] = T0 + timedelta(seconds=i)
    store.delete("w0299")  # i % 3 == 2: a scheduled record deleted
    del due["w0299"]
    assert len(store._wakeups) <= 2 * len(due) + 64
    claimed = store.claim_due(T0 + timedelta(days=1), 1000, LEASE)
    assert sorted(r.id for r in claimed) == sorted(due)
