"""The history log and the plain columns, on every store (sync and async).

A record's history is appended in the same write as its save (so a save that
loses its compare-and-swap appends nothing), capped per record with the oldest
dropped and counted, and removed with the record.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from store_support import StoreSpec

from gorch.errors import Conflict, WorkflowExists, WorkflowNotFound
from gorch.stores import HistoryLog, Store

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def entry(n: int, **extra: object) -> str:
    return json.dumps({"kind": "step", "n": n, **extra})


def numbers(log: HistoryLog) -> list[int]:
    return [json.loads(e)["n"] for e in log.entries]


def test_a_new_record_has_the_history_it_was_created_with(store: Store) -> None:
    store.create("h-1", "wf", "running", b"x", None, history=[entry(1, text="ünï")])
    log = store.history("h-1")
    assert [json.loads(e) for e in log.entries] == [{"kind": "step", "n": 1, "text": "ünï"}]
    assert log.dropped == 0


def test_a_record_created_without_history_has_an_empty_log(store: Store) -> None:
    store.create("h-1", "wf", "running", b"x", None)
    assert store.history("h-1") == HistoryLog([], 0)


def test_saves_append_in_order_and_a_save_without_entries_keeps_the_log(store: Store) -> None:
    rec = store.create("h-1", "wf", "running", b"x", None, history=[entry(1)])
    rec = store.save("h-1", rec.version, "waiting", b"y", NOW, history=[entry(2), entry(3)])
    rec = store.save("h-1", rec.version, "waiting", b"z", None)
    assert numbers(store.history("h-1")) == [1, 2, 3]
    assert store.load("h-1").blob == b"z"


def test_a_log_over_its_cap_keeps_the_newest_and_counts_the_dropped(store: Store) -> None:
    rec = store.create("h-1", "wf", "running", b"x", None, history=[entry(1)], history_limit=3)
    for n in range(2, 8):
        rec = store.save("h-1", rec.version, "running", b"x", None, history=[entry(n)],
                         history_limit=3)  # fmt: skip
    log = store.history("h-1")
    assert numbers(log) == [5, 6, 7]
    assert log.dropped == 4
    # A batch bigger than the cap on its own keeps its newest entries too.
    store.save("h-1", rec.version, "done", b"x", None, history=[entry(n) for n in range(8, 13)],
               history_limit=3)  # fmt: skip
    log = store.history("h-1")
    assert numbers(log) == [10, 11, 12]
    assert log.dropped == 9


def test_a_create_over_the_cap_keeps_the_newest(store: Store) -> None:
    store.create("h-1", "wf", "running", b"x", None, history=[entry(1), entry(2)], history_limit=1)
    assert store.history("h-1") == HistoryLog([store.history("h-1").entries[0]], 1)
    assert numbers(store.history("h-1")) == [2]


def test_a_save_that_loses_its_swap_appends_nothing(store: Store) -> None:
    rec = store.create("h-1", "wf", "running", b"x", None, history=[entry(1)])
    store.save("h-1", rec.version, "running", b"y", None, history=[entry(2)])
    with pytest.raises(Conflict):
        store.save("h-1", rec.version, "running", b"lost", None, history=[entry(99)])
    assert numbers(store.history("h-1")) == [1, 2]
    assert store.load("h-1").blob == b"y"


def test_a_refused_create_keeps_the_first_records_history(store: Store) -> None:
    store.create("h-1", "wf", "running", b"x", None, history=[entry(1)])
    with pytest.raises(WorkflowExists):
        store.create("h-1", "wf", "running", b"other", None, history=[entry(2)])
    assert numbers(store.history("h-1")) == [1]


def test_a_bad_history_limit_is_refused_and_writes_nothing(store: Store) -> None:
    rec = store.create("h-1", "wf", "running", b"x", None, history=[entry(1)])
    with pytest.raises(ValueError, match="history_limit"):
        store.save("h-1", rec.version, "done", b"y", None, history=[entry(2)], history_limit=0)
    assert store.load("h-1") == rec
    assert numbers(store.history("h-1")) == [1]


def test_history_of_a_missing_record_raises(store: Store) -> None:
    with pytest.raises(WorkflowNotFound):
        store.history("nope")


def test_a_deleted_record_takes_its_history_along(store: Store) -> None:
    store.create("h-1", "wf", "running", b"x", None, history=[entry(1)])
    store.delete("h-1")
    with pytest.raises(WorkflowNotFound):
        store.history("h-1")
    store.create("h-1", "wf", "running", b"x", None)  # a new record starts a new log
    assert store.history("h-1") == HistoryLog([], 0)


def test_a_claim_keeps_the_history(store: Store) -> None:
    store.create("h-1", "wf", "running", b"x", NOW, history=[entry(1)])
    (claimed,) = store.claim_due(NOW, 10, NOW - NOW)
    store.save("h-1", claimed.version, "waiting", b"y", None, history=[entry(2)])
    assert numbers(store.history("h-1")) == [1, 2]


# -- plain columns (the SQL stores) ------------------------------------------------------


def _sql_rows(spec: StoreSpec, query: str) -> list[tuple[object, ...]]:
    """``query`` (``{t}`` for the table) run on the store's database by plain SQL."""
    if spec.kind == "sqlite":
        with sqlite3.connect(spec.target) as conn:
            return conn.execute(query.format(t="gorch_workflows")).fetchall()
    import psycopg

    with psycopg.connect(spec.target) as conn:
        return conn.execute(query.format(t=f'"{spec.namespace}"')).fetchall()  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_status_workflow_times_and_cursors_are_plain_columns(
    kind: str, store_spec: StoreSpec, store: Store
) -> None:
    if store_spec.kind != kind:
        pytest.skip("a test of another store's columns")
    rec = store.create("c-1", "expense", "running", b"x", None, cursors=["approve"])
    store.create("c-2", "expense", "running", b"x", None)
    store.save("c-1", rec.version, "waiting", b"y", None, cursors=["approve", "pay"])
    rows = _sql_rows(
        store_spec, "SELECT id, workflow, cursors FROM {t} WHERE status = 'waiting' ORDER BY id"
    )
    assert len(rows) == 1
    id, workflow, cursors = rows[0]
    assert (id, workflow) == ("c-1", "expense")
    assert (json.loads(cursors) if isinstance(cursors, str) else cursors) == ["approve", "pay"]
    (created, updated), *_ = _sql_rows(
        store_spec, "SELECT created_at, updated_at FROM {t} WHERE id = 'c-1'"
    )
    assert created is not None and updated is not None
    assert created <= updated  # type: ignore[operator]


ODD_NAMES = ['say "hi"', "back\\slash", "a,b", "{braces}", "NULL", "", " spaced ", "é \u2603"]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_cursor_names_are_kept_verbatim_whatever_their_characters(
    kind: str, store_spec: StoreSpec, store: Store
) -> None:
    """Quotes, backslashes, commas, braces, 'NULL', empty: each name is one element, as is."""
    if store_spec.kind != kind:
        pytest.skip("a test of another store's columns")
    rec = store.create("odd", "expense", "running", b"x", None, cursors=ODD_NAMES[:3])
    read = "SELECT cursors FROM {t} WHERE id = 'odd'"
    [(created,)] = _sql_rows(store_spec, read)
    assert (json.loads(created) if isinstance(created, str) else created) == ODD_NAMES[:3]
    for history in ([], ['{"at": "2026-01-01T00:00:00Z", "kind": "step"}']):
        rec = store.save(
            "odd", rec.version, "waiting", b"y", None, history=history, cursors=ODD_NAMES
        )
        [(cursors,)] = _sql_rows(store_spec, read)
        assert (json.loads(cursors) if isinstance(cursors, str) else cursors) == ODD_NAMES


# -- migration of a table made by an earlier version -------------------------------------

_OLD_SQLITE = """CREATE TABLE gorch_workflows (
    id TEXT PRIMARY KEY, workflow TEXT NOT NULL, status TEXT NOT NULL, blob BLOB NOT NULL,
    version INTEGER NOT NULL, wake_at INTEGER, updated_at INTEGER NOT NULL)"""


def test_an_older_sqlite_table_gets_the_new_columns(tmp_path: Path) -> None:
    from gorch.stores import SQLiteStore

    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as conn:
        conn.execute(_OLD_SQLITE)
        conn.execute(
            "INSERT INTO gorch_workflows VALUES ('old-1', 'wf', 'finished', x'01', 3, NULL, 42)"
        )
    for n in (1, 2):  # opening it again finds nothing to do
        store = SQLiteStore(path)
        try:
            rec = store.load("old-1")
            assert (rec.status, rec.blob) == ("finished", b"\x01" if n == 1 else b"\x02")
            assert numbers(store.history("old-1")) == list(range(1, n))
            store.save("old-1", rec.version, "finished", b"\x02", None, history=[entry(n)])
            assert numbers(store.history("old-1")) == list(range(1, n + 1))
        finally:
            store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT created_at FROM gorch_workflows").fetchone() == (42,)


def test_an_older_postgres_table_gets_the_new_columns(tmp_path: Path) -> None:
    import psycopg
    from psycopg import sql
    from store_support import PG_DSN, require_server

    require_server("postgres")
    from gorch.stores.postgres import PostgresStore

    table = f"gorch_test_old_{abs(hash(str(tmp_path))) % 10**9}"
    ident = sql.Identifier(table)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                'CREATE TABLE {} (id text COLLATE "C" PRIMARY KEY, workflow text NOT NULL,'
                " status text NOT NULL, blob bytea NOT NULL, version bigint NOT NULL,"
                " wake_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident)
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} VALUES ('old-1', 'wf', 'finished', '\\x01', 3, NULL,"
                " '2020-01-01T00:00:00Z')"
            ).format(ident)
        )
    try:
        for n in (1, 2):
            store = PostgresStore(PG_DSN, table=table)
            try:
                rec = store.load("old-1")
                assert rec.status == "finished"
                assert numbers(store.history("old-1")) == list(range(1, n))
                rec = store.save("old-1", rec.version, "finished", b"\x02", None,
                                 history=[entry(n)], cursors=["a"])  # fmt: skip
                assert numbers(store.history("old-1")) == list(range(1, n + 1))
                store.create("new-1", "wf", "running", b"x", None)
            finally:
                store.delete("new-1")
                store.close()
        with psycopg.connect(PG_DSN) as conn:
            created = conn.execute(
                sql.SQL("SELECT created_at FROM {} WHERE id = 'old-1'").format(ident)
            ).fetchone()
            assert created == (datetime(2020, 1, 1, tzinfo=UTC),)
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            for name in (table, f"{table}_seen"):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
