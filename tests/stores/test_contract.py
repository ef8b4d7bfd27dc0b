"""The store contract: every backend must pass every test here, the same way.

Each test runs once per store (memory, sqlite, postgres, redis), as its sync
store and as its async one (driven through ``store_support.SyncOverAsync``);
the tests that need several processes run on the stores that processes can
share. The last section checks that a sync and an async store over the same
records are one store.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgpack
import pytest
from store_support import ALL_KINDS, StoreSpec, SyncOverAsync, make_spec

from gorch.errors import Conflict, WorkflowExists, WorkflowNotFound
from gorch.stores import AsyncMemoryStore, MemoryStore, Record, Store

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
BLOB = bytes(range(256)) * 4  # every byte value, NULs included


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


# -- create / load -----------------------------------------------------------------


def test_create_then_load_round_trips(store: Store) -> None:
    created = store.create("wf-1", "expense", "running", BLOB, at(30))
    assert created == Record("wf-1", "expense", "running", BLOB, 1, at(30))
    assert store.load("wf-1") == created


def test_round_trip_keeps_large_blobs_and_unicode(store: Store) -> None:
    blob = os.urandom(300_000)
    store.create("ünï-çødé/id:1", "wörkflow", "wäiting", blob, None)
    loaded = store.load("ünï-çødé/id:1")
    assert (loaded.workflow, loaded.status, loaded.blob, loaded.wake_at) == (
        "wörkflow",
        "wäiting",
        blob,
        None,
    )


def test_create_of_an_existing_id_raises_and_keeps_the_record(store: Store) -> None:
    first = store.create("dup", "expense", "running", b"first", at(10))
    with pytest.raises(WorkflowExists) as info:
        store.create("dup", "other", "done", b"second", None)
    assert info.value.workflow_id == "dup"
    assert store.load("dup") == first


def test_load_of_an_unknown_id_raises_not_found(store: Store) -> None:
    with pytest.raises(WorkflowNotFound) as info:
        store.load("nope")
    assert info.value.workflow_id == "nope"


# -- save (compare-and-swap) -------------------------------------------------------


def test_save_at_the_current_version_bumps_it(store: Store) -> None:
    store.create("s", "expense", "running", b"v1", at(10))
    saved = store.save("s", 1, "waiting", b"v2", at(20))
    assert saved == Record("s", "expense", "waiting", b"v2", 2, at(20))
    assert store.load("s") == saved
    again = store.save("s", 2, "done", b"v3", None)
    assert again == Record("s", "expense", "done", b"v3", 3, None)
    assert store.load("s") == again


def test_save_at_a_stale_version_conflicts_and_writes_nothing(store: Store) -> None:
    store.create("s", "expense", "running", b"v1", at(10))
    current = store.save("s", 1, "waiting", b"v2", at(20))
    with pytest.raises(Conflict) as info:
        store.save("s", 1, "done", b"lost", None)
    assert (info.value.workflow_id, info.value.expected, info.value.actual) == ("s", 1, 2)
    assert store.load("s") == current
    with pytest.raises(Conflict):
        store.save("s", 3, "done", b"from the future", None)
    assert store.load("s") == current


def test_save_of_a_missing_record_conflicts(store: Store) -> None:
    with pytest.raises(Conflict) as info:
        store.save("ghost", 1, "running", b"x", None)
    assert info.value.actual is None
    store.create("gone", "expense", "running", b"x", None)
    store.delete("gone")
    with pytest.raises(Conflict) as info:
        store.save("gone", 1, "running", b"x", None)
    assert info.value.actual is None
    with pytest.raises(WorkflowNotFound):
        store.load("gone")


# -- delete ------------------------------------------------------------------------


def test_delete_removes_the_record_and_its_wakeup(store: Store) -> None:
    store.create("d", "expense", "waiting", b"x", at(-10))
    store.create("keep", "expense", "waiting", b"y", at(-5))
    store.delete("d")
    with pytest.raises(WorkflowNotFound):
        store.load("d")
    with pytest.raises(WorkflowNotFound):
        store.delete("d")
    assert [r.id for r in store.claim_due(NOW, 10, LEASE)] == ["keep"]
    assert [r.id for r in store.list().records] == ["keep"]
    assert store.create("d", "expense", "new", b"z", None).version == 1


# -- list --------------------------------------------------------------------------

IDS = ["B-2", "a-1", "a_1", "Z9", "ä", "b", "a", "10", "9", "a-10", "a-2", "é", "Ω"]


def _fill(store: Store) -> dict[str, Record]:
    records = {}
    for i, id in enumerate(IDS):
        workflow = "pizza" if i % 2 else "expense"
        status = ("running", "waiting", "done")[i % 3]
        records[id] = store.create(id, workflow, status, id.encode(), None)
    return records


def _walk(store: Store, limit: int, **filters: str) -> list[Record]:
    """Every page of a listing, checking each page's size and cursor on the way."""
    seen: list[Record] = []
    after: str | None = None
    for _ in range(100):
        page = store.list(limit=limit, after=after, **filters)
        assert len(page.records) <= limit
        seen.extend(page.records)
        if page.next_cursor is None:
            return seen
        assert len(page.records) == limit
        assert page.next_cursor == page.records[-1].id
        after = page.next_cursor
    raise AssertionError("pagination did not end")


@pytest.mark.parametrize(
    "filters",
    [{}, {"workflow": "expense"}, {"status": "waiting"}, {"workflow": "pizza", "status": "done"}],
    ids=["all", "workflow", "status", "both"],
)
def test_list_filters_and_pages_in_code_point_order(store: Store, filters: dict[str, str]) -> None:
    records = _fill(store)
    expected = [
        records[id]
        for id in sorted(IDS)
        if all(getattr(records[id], key) == value for key, value in filters.items())
    ]
    assert expected, "the fixture data must exercise every filter"
    for limit in (1, 2, 3, len(expected), 100):
        assert _walk(store, limit, **filters) == expected


def test_list_has_no_cursor_when_the_last_page_is_exactly_full(store: Store) -> None:
    for id in ("a", "b", "c", "d"):
        store.create(id, "expense", "running", b"", None)
    first = store.list(limit=2)
    assert [r.id for r in first.records] == ["a", "b"] and first.next_cursor == "b"
    last = store.list(limit=2, after="b")
    assert [r.id for r in last.records] == ["c", "d"] and last.next_cursor is None
    empty = store.list(limit=2, after="d")
    assert empty.records == [] and empty.next_cursor is None
    assert [r.id for r in store.list(after="a-missing").records] == ["b", "c", "d"]
    with pytest.raises(ValueError):
        store.list(limit=0)


def test_list_follows_status_changes_and_deletes(store: Store) -> None:
    store.create("x", "expense", "running", b"", None)
    store.create("y", "expense", "running", b"", None)
    store.save("x", 1, "done", b"", None)
    assert [r.id for r in store.list(status="running").records] == ["y"]
    assert [r.id for r in store.list(status="done").records] == ["x"]
    assert [r.id for r in store.list(workflow="expense", status="done").records] == ["x"]
    assert [r.id for r in store.list(workflow="expense", status="running").records] == ["y"]
    store.delete("y")
    assert [r.id for r in store.list(workflow="expense").records] == ["x"]
    assert store.list(status="running").records == []
    assert store.list(workflow="pizza").records == []


# -- time ------------------------------------------------------------------------------


def test_wake_at_is_stored_as_aware_utc(store: Store) -> None:
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2030, 6, 1, 14, 30, 15, 123456, tzinfo=plus_two)
    created = store.create("tz", "expense", "waiting", b"", local)
    for record in (created, store.load("tz")):
        assert record.wake_at == local
        assert record.wake_at is not None and record.wake_at.tzinfo is UTC
        assert (record.wake_at.hour, record.wake_at.microsecond) == (12, 123456)
    naive = datetime(2030, 6, 1, 9, 0, 0, 1)  # taken as UTC
    saved = store.save("tz", 1, "waiting", b"", naive)
    for record in (saved, store.load("tz")):
        assert record.wake_at == naive.replace(tzinfo=UTC)
        assert record.wake_at is not None and record.wake_at.tzinfo is UTC


# -- claim_due ------------------------------------------------------------------------


def test_claim_due_takes_only_due_records_earliest_first(store: Store) -> None:
    store.create("late", "expense", "waiting", b"1", at(-1))
    store.create("early", "expense", "waiting", b"2", at(-3600))
    store.create("exact", "expense", "waiting", b"3", NOW)
    store.create("future", "expense", "waiting", b"4", at(1))
    store.create("never", "expense", "waiting", b"5", None)
    store.create("tie-b", "expense", "waiting", b"6", at(-60))
    store.create("tie-a", "expense", "waiting", b"7", at(-60))

    claimed = store.claim_due(NOW, 10, LEASE)
    assert [r.id for r in claimed] == ["early", "tie-a", "tie-b", "late", "exact"]
    for record in claimed:
        assert record.version == 2 and record.wake_at == NOW + LEASE
        assert record.wake_at is not None and record.wake_at.tzinfo is UTC
        assert store.load(record.id) == record
    assert store.load("future").version == 1 and store.load("never").version == 1


def test_a_claim_holds_until_its_lease_runs_out(store: Store) -> None:
    store.create("job", "expense", "waiting", b"", at(-1))
    (first,) = store.claim_due(NOW, 10, LEASE)
    assert store.claim_due(NOW, 10, LEASE) == []
    assert store.claim_due(NOW + LEASE - timedelta(microseconds=1), 10, LEASE) == []
    (again,) = store.claim_due(NOW + LEASE, 10, LEASE)  # the first worker died
    assert again.version == first.version + 1 == 3
    assert again.wake_at == NOW + 2 * LEASE
    with pytest.raises(Conflict):  # the first claimer's save now loses
        store.save("job", first.version, "done", b"", None)
    assert store.save("job", again.version, "done", b"", None).version == 4
    assert store.claim_due(NOW + 10 * LEASE, 10, LEASE) == []


def test_claim_due_respects_limit_and_takes_the_earliest(store: Store) -> None:
    for i in range(10):
        store.create(f"r{i}", "expense", "waiting", b"", at(-100 + (i * 7) % 10))
    expected = sorted((f"r{i}" for i in range(10)), key=lambda id: store.load(id).wake_at or NOW)
    batches = [store.claim_due(NOW, 4, LEASE) for _ in range(4)]
    assert [len(b) for b in batches] == [4, 4, 2, 0]
    assert [r.id for b in batches for r in b] == expected
    assert store.claim_due(NOW, 0, LEASE) == []


def test_claim_due_accepts_a_non_utc_now(store: Store) -> None:
    store.create("j", "expense", "waiting", b"", at(-1))
    local_now = NOW.astimezone(timezone(timedelta(hours=-5)))
    (claimed,) = store.claim_due(local_now, 10, LEASE)
    assert claimed.wake_at == NOW + LEASE and claimed.wake_at is not None
    assert claimed.wake_at.tzinfo is UTC


def test_rescheduling_moves_the_wakeup(store: Store) -> None:
    record = store.create("r", "expense", "waiting", b"", at(-10))
    for i in range(20):  # many reschedules leave no trace behind
        record = store.save("r", record.version, "waiting", b"", at(100 + i))
    record = store.save("r", record.version, "waiting", b"", at(-5))
    assert [r.id for r in store.claim_due(NOW, 10, LEASE)] == ["r"]
    assert store.claim_due(NOW, 10, LEASE) == []
    store.save("r", record.version + 1, "done", b"", None)  # done: nothing scheduled
    assert store.claim_due(NOW + timedelta(days=365), 10, LEASE) == []


def test_a_zero_lease_claims_each_record_once_per_call(store: Store) -> None:
    store.create("a", "expense", "waiting", b"", at(-1))
    store.create("b", "expense", "waiting", b"", at(-2))
    assert [r.id for r in store.claim_due(NOW, 10, timedelta(0))] == ["b", "a"]
    assert {r.version for r in store.claim_due(NOW, 10, timedelta(0))} == {3}


# -- concurrency: threads --------------------------------------------------------------


def _increment(store: Store, times: int) -> int:
    """Add 1 to the shared counter ``times`` times with load -> save -> retry; the conflicts."""
    conflicts = 0
    for _ in range(times):
        while True:
            record = store.load("counter")
            count = msgpack.unpackb(record.blob)["count"]
            time.sleep(random.random() / 1000)  # widen the race window: contention is the point
            blob = msgpack.packb({"count": count + 1})
            try:
                store.save("counter", record.version, "running", blob, None)
                break
            except Conflict:
                conflicts += 1
    return conflicts


def _run_threads(count: int, work: Callable[[], Any]) -> list[Any]:
    results: list[Any] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run() -> None:
        try:
            barrier.wait(10)
            results.append(work())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return results


def test_concurrent_threads_lose_no_update(store: Store) -> None:
    store.create("counter", "counter", "running", msgpack.packb({"count": 0}), None)
    threads, times = 6, 20
    _run_threads(threads, lambda: _increment(store, times))
    final = store.load("counter")
    assert msgpack.unpackb(final.blob)["count"] == threads * times
    assert final.version == 1 + threads * times


def _claim_all(store: Store) -> list[str]:
    got: list[str] = []
    while batch := store.claim_due(NOW, 7, timedelta(hours=1)):
        got.extend(record.id for record in batch)
    return got


def test_concurrent_threads_claim_each_record_once(store: Store) -> None:
    ids = [f"job-{i:03}" for i in range(120)]
    for i, id in enumerate(ids):
        store.create(id, "expense", "waiting", b"", at(-i))
    claimed = [id for batch in _run_threads(6, lambda: _claim_all(store)) for id in batch]
    assert sorted(claimed) == ids
    assert {store.load(id).version for id in ids} == {2}


# -- concurrency: processes ---------------------------------------------------------------


def _process_main(work: Callable[[Store], Any], spec: StoreSpec, start: Any, results: Any) -> None:
    """A child process: open its own store, wait for the others, work, report."""
    try:
        store = spec.open()
        start.wait(30)
        outcome = ("ok", work(store))
        store.close()
    except BaseException:
        outcome = ("error", traceback.format_exc())
    results.put(outcome)


def _run_processes(spec: StoreSpec, count: int, work: Callable[[Store], Any]) -> list[Any]:
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_process_main, args=(work, spec, start, results)) for _ in range(count)
    ]
    for proc in procs:
        proc.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    errors = [detail for kind, detail in outcomes if kind == "error"]
    assert not errors, "\n".join(errors)
    return [value for _, value in outcomes]


def _increment_25(store: Store) -> int:
    return _increment(store, 25)


def test_concurrent_processes_lose_no_update(shared_spec: StoreSpec) -> None:
    with shared_spec.open() as store:
        store.create("counter", "counter", "running", msgpack.packb({"count": 0}), None)
        procs = 4
        _run_processes(shared_spec, procs, _increment_25)
        final = store.load("counter")
    assert msgpack.unpackb(final.blob)["count"] == procs * 25
    assert final.version == 1 + procs * 25


def test_concurrent_processes_claim_each_record_once(shared_spec: StoreSpec) -> None:
    ids = [f"job-{i:03}" for i in range(300)]
    with shared_spec.open() as store:
        for i, id in enumerate(ids):
            store.create(id, "expense", "waiting", b"", at(-(i * 37 % 300)))
        claimed = [id for batch in _run_processes(shared_spec, 4, _claim_all) for id in batch]
        assert sorted(claimed) == ids
        assert {r.version for r in _walk(store, 100)} == {2}
        assert store.claim_due(NOW, 10, LEASE) == []


# -- remember ------------------------------------------------------------------------------


def _soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def test_remember_is_true_once_per_key(store: Store) -> None:
    until = _soon(3600)
    assert store.remember("msg-1", until) is True
    assert store.remember("msg-1", until) is False
    assert store.remember("msg-1", _soon(7200)) is False  # a later ``until`` does not renew it
    assert store.remember("msg-2", until) is True
    assert store.remember("ünï/çødé:key 1", until) is True
    assert store.remember("ünï/çødé:key 1", until) is False


def test_a_remembered_key_counts_as_absent_once_expired(store: Store) -> None:
    # A window wide enough that a loaded machine does not let it pass between two calls.
    assert store.remember("short", _soon(1.5)) is True
    assert store.remember("short", _soon(3600)) is False
    time.sleep(1.6)
    assert store.remember("short", _soon(3600)) is True  # expired: taken again, for an hour
    assert store.remember("short", _soon(3600)) is False


def test_remember_with_an_until_already_past_records_nothing(store: Store) -> None:
    past = datetime.now(UTC) - timedelta(seconds=5)
    assert store.remember("late", past) is True
    assert store.remember("late", past) is True
    assert store.remember("late", _soon(3600)) is True
    assert store.remember("late", _soon(3600)) is False


def test_remember_takes_naive_datetimes_as_utc(store: Store) -> None:
    naive_in_an_hour = (datetime.now(UTC) + timedelta(hours=1)).replace(tzinfo=None)
    assert store.remember("naive", naive_in_an_hour) is True
    assert store.remember("naive", naive_in_an_hour) is False
    # Naive and a minute ago, read as UTC: already expired, whatever the machine's zone.
    naive_past = (datetime.now(UTC) - timedelta(minutes=1)).replace(tzinfo=None)
    assert store.remember("naive-past", naive_past) is True
    assert store.remember("naive-past", _soon(3600)) is True


def test_remember_keys_are_apart_from_records(store: Store) -> None:
    store.create("same", "expense", "running", b"x", None)
    assert store.remember("same", _soon(3600)) is True
    assert store.load("same").blob == b"x"
    assert [r.id for r in store.list().records] == ["same"]
    store.delete("same")
    assert store.remember("same", _soon(3600)) is False


def test_concurrent_threads_remember_a_key_once(store: Store) -> None:
    until = _soon(3600)
    for round in range(5):
        results = _run_threads(8, lambda round=round: store.remember(f"race-{round}", until))
        assert sorted(results) == [False] * 7 + [True]


def _remember_race(store: Store) -> list[bool]:
    until = datetime.now(UTC) + timedelta(hours=1)
    return [store.remember(f"race-{i}", until) for i in range(20)]


def test_concurrent_processes_remember_a_key_once(shared_spec: StoreSpec) -> None:
    outcomes = _run_processes(shared_spec, 4, _remember_race)
    for i in range(20):
        assert sum(results[i] for results in outcomes) == 1, f"race-{i}"


# -- sync and async over the same records ---------------------------------------------------


@pytest.fixture(params=ALL_KINDS)
def both(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """A sync store and the async store over the same records (the async one behind the
    sync API): what one writes, the other must read, with the same versions and errors."""
    for spec in make_spec(request.param, tmp_path):
        if spec.kind == "memory":
            sync: Store = MemoryStore()
            other = SyncOverAsync(AsyncMemoryStore(sync))
        else:
            sync, other = spec.open_sync(), SyncOverAsync(spec.open_async())
        try:
            yield sync, other
        finally:
            other.close()
            sync.close()


def test_sync_and_async_stores_read_each_others_records(both: tuple[Store, Store]) -> None:
    sync, aio = both
    written = sync.create("from-sync", "expense", "running", BLOB, at(30))
    assert aio.load("from-sync") == written
    saved = aio.save("from-sync", 1, "waiting", b"by async", at(-5))
    assert (
        sync.load("from-sync")
        == saved
        == Record("from-sync", "expense", "waiting", b"by async", 2, at(-5))
    )
    other = aio.create("from-async", "pizza", "waiting", b"x", None)
    assert sync.load("from-async") == other
    for store in (sync, aio):
        assert store.list().records == [other, saved]
        assert store.list(workflow="expense", status="waiting").records == [saved]
        assert store.list(status="waiting", limit=1) == aio.list(status="waiting", limit=1)


def test_sync_and_async_stores_share_versions_claims_and_keys(both: tuple[Store, Store]) -> None:
    sync, aio = both
    sync.create("job", "expense", "waiting", b"", at(-1))
    aio.create("exists", "expense", "running", b"kept", None)
    with pytest.raises(WorkflowExists):
        sync.create("exists", "other", "done", b"lost", None)
    with pytest.raises(WorkflowExists):
        aio.create("job", "other", "done", b"lost", None)
    assert sync.load("exists").blob == b"kept" and aio.load("job").workflow == "expense"

    (claimed,) = aio.claim_due(NOW, 10, LEASE)
    assert claimed.version == 2 and sync.claim_due(NOW, 10, LEASE) == []  # the lease holds
    with pytest.raises(Conflict) as info:  # a save from the version before the claim loses
        sync.save("job", 1, "done", b"", None)
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert sync.save("job", claimed.version, "done", b"", None).version == 3
    with pytest.raises(Conflict):
        aio.save("job", 2, "done", b"", None)

    until = _soon(3600)
    assert sync.remember("replay", until) is True
    assert aio.remember("replay", until) is False
    assert aio.remember("other-key", until) is True
    assert sync.remember("other-key", until) is False

    aio.delete("job")
    with pytest.raises(WorkflowNotFound):
        sync.load("job")
    with pytest.raises(WorkflowNotFound):
        sync.delete("job")
