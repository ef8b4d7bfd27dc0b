"""``Store.purge`` on every store (sync and async): old records in given statuses go, in
batches, each one only if it still matches when it is deleted."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from store_support import StoreSpec

from gorch.errors import WorkflowNotFound
from gorch.stores import Store

LATER = timedelta(minutes=1)


def ids(store: Store) -> list[str]:
    return [r.id for r in store.list(limit=1000).records]


def make(store: Store, id: str, status: str) -> None:
    store.create(id, "wf", status, b"x", None, history=[json.dumps({"n": 1})])


def test_purge_removes_old_records_in_the_given_statuses_only(store: Store) -> None:
    for id, status in [("a", "finished"), ("b", "cancelled"), ("c", "waiting"), ("d", "failed")]:
        make(store, id, status)
    gone = store.purge(datetime.now(UTC) + LATER, ["finished", "cancelled"], 100)
    assert sorted(gone) == ["a", "b"]
    assert ids(store) == ["c", "d"]
    with pytest.raises(WorkflowNotFound):
        store.history("a")  # the history goes with the record
    assert [json.loads(e) for e in store.history("c").entries] == [{"n": 1}]


def test_purge_keeps_records_updated_since(store: Store) -> None:
    make(store, "old", "finished")
    make(store, "touched", "finished")
    time.sleep(0.005)  # the stores stamp updates in microseconds
    cut = datetime.now(UTC)
    time.sleep(0.005)
    rec = store.load("touched")
    store.save("touched", rec.version, "finished", b"y", None)
    make(store, "new", "finished")
    assert store.purge(cut, ["finished"], 100) == ["old"]
    assert ids(store) == ["new", "touched"]


def test_purge_goes_in_batches_of_its_limit(store: Store) -> None:
    for i in range(7):
        make(store, f"r-{i}", "finished")
    before = datetime.now(UTC) + LATER
    sizes = []
    while batch := store.purge(before, ["finished"], 3):
        sizes.append(len(batch))
    assert sizes == [3, 3, 1]
    assert ids(store) == []


def test_a_record_moved_out_of_the_status_stays(store: Store) -> None:
    make(store, "a", "failed")
    rec = store.load("a")
    store.save("a", rec.version, "resuming", b"x", None)  # a retry landed first
    assert store.purge(datetime.now(UTC) + LATER, ["failed"], 10) == []
    assert store.load("a").status == "resuming"


@pytest.mark.parametrize(
    ("statuses", "limit", "error"),
    [([], 10, ValueError), (["finished"], 0, ValueError), ("finished", 10, TypeError)],
)
def test_bad_purge_arguments_are_refused_and_delete_nothing(
    store: Store, statuses: list[str], limit: int, error: type[Exception]
) -> None:
    make(store, "a", "finished")
    before = store.load("a")
    with pytest.raises(error):
        store.purge(datetime.now(UTC) + LATER, statuses, limit)
    assert store.load("a") == before


def test_a_purge_racing_a_save_on_postgres_never_deletes_the_moved_record(
    store_spec: StoreSpec, store: Store
) -> None:
    """A save holds the row (moving it out of ``failed``) while the purge runs: the purge
    skips it, and after the save commits the record is no longer a candidate."""
    if store_spec.kind != "postgres":
        pytest.skip("row locks are PostgreSQL's; the other stores purge under one lock")
    import psycopg
    from psycopg import sql

    make(store, "a", "failed")
    make(store, "b", "failed")
    with psycopg.connect(store_spec.target) as conn:  # a transaction of our own, held open
        conn.execute(
            sql.SQL(
                "UPDATE {} SET status = 'resuming', version = version + 1 WHERE id = 'a'"
            ).format(sql.Identifier(store_spec.namespace))
        )
        result: list[list[str]] = []
        racer = threading.Thread(
            target=lambda: result.append(store.purge(datetime.now(UTC) + LATER, ["failed"], 10))
        )
        racer.start()
        racer.join(30)
        assert result == [["b"]]  # "a" is locked by the save: skipped, not waited for
        conn.commit()
    assert store.load("a").status == "resuming"
    assert store.purge(datetime.now(UTC) + LATER, ["failed"], 10) == []
