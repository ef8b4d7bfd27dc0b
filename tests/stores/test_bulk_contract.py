"""``Store.create_many``: a batch of new records in one write, all or nothing.

Runs on every store, sync and async (see ``conftest``), like the contract suite.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from gorch.stores import Store
from gorch.stores.base import NewRecord

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
BLOB = bytes(range(256)) * 2


def entry(n: int) -> str:
    return json.dumps({"n": n, "text": 'é\u2028"quoted"'})


def batch(n: int, prefix: str = "b") -> list[NewRecord]:
    return [
        NewRecord(
            f"{prefix}-{i:04d}",
            "bulk",
            "waiting" if i % 2 else "resuming",
            BLOB + bytes([i % 256]),
            NOW + timedelta(seconds=i - n // 2) if i % 3 else None,
            history=[entry(i)],
            cursors=[f"step {i}"],
        )
        for i in range(n)
    ]


def test_a_batch_is_inserted_at_version_one_with_everything_create_writes(store: Store) -> None:
    records = batch(120)
    assert store.create_many(records) == []
    for r in records:
        got = store.load(r.id)
        assert (got.workflow, got.status, got.blob, got.version) == (
            r.workflow,
            r.status,
            r.blob,
            1,
        )
        assert got.wake_at == r.wake_at
        assert [json.loads(e) for e in store.history(r.id).entries] == [
            json.loads(e) for e in r.history
        ]
    page = store.list(workflow="bulk", limit=1000)
    assert [rec.id for rec in page.records] == sorted(r.id for r in records)
    due = {r.id for r in records if r.wake_at is not None and r.wake_at <= NOW}
    claimed = store.claim_due(NOW, 1000, LEASE)
    assert {c.id for c in claimed} == due  # in the wake-up index
    assert [c.wake_at for c in claimed] == [NOW + LEASE] * len(due)


def test_a_taken_id_writes_nothing_and_is_named(store: Store) -> None:
    before = store.create("b-0007", "other", "waiting", b"mine", NOW, history=[entry(0)])
    records = batch(20)
    assert store.create_many(records) == ["b-0007"]
    assert store.load("b-0007") == before  # untouched
    assert [json.loads(e) for e in store.history("b-0007").entries] == [json.loads(entry(0))]
    assert [r.id for r in store.list(limit=100).records] == ["b-0007"]  # nothing else
    assert store.claim_due(NOW + timedelta(days=1), 100, LEASE) == [
        before.__class__("b-0007", "other", "waiting", b"mine", 2, NOW + timedelta(days=1) + LEASE)
    ]


def test_several_taken_ids_are_all_named(store: Store) -> None:
    assert store.create_many(batch(10)) == []
    again = batch(10) + batch(5, prefix="c")
    assert sorted(store.create_many(again)) == [f"b-{i:04d}" for i in range(10)]
    assert len(store.list(limit=100).records) == 10  # no "c-..." was written


def test_an_empty_batch_is_nothing(store: Store) -> None:
    assert store.create_many([]) == []
    assert store.list().records == []


def test_the_history_cap_applies_to_each_record(store: Store) -> None:
    record = NewRecord("h", "bulk", "waiting", b"x", None, history=[entry(i) for i in range(5)])
    assert store.create_many([record], history_limit=2) == []
    log = store.history("h")
    assert [json.loads(e)["n"] for e in log.entries] == [3, 4] and log.dropped == 3
