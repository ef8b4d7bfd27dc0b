"""The SQLite store counts each record's history entries in a column of its own.

A save that appends to the log decides from the count whether the oldest
entries must go, instead of parsing the whole JSON log (three times) on every
save: below the cap a save never reads the log. The count is kept exact, is
filled in for files written before it existed, and a count left behind by a
writer that did not keep it (an older version during an upgrade) is made exact
again at the next trim.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gorch.stores import SQLiteStore


def _entries(start: int, n: int) -> list[str]:
    return [
        json.dumps({"at": "2026-12-07T00:00:00Z", "kind": "step", "name": f"s{i}"})
        for i in range(start, start + n)
    ]


def _columns(path: Path, id: str) -> tuple[int, int, int]:
    """(entries in the log, history_count, history_dropped) as stored."""
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT json_array_length(history), history_count, history_dropped"
            " FROM gorch_workflows WHERE id = ?",
            (id,),
        ).fetchone()
    return row


def _names(store: SQLiteStore, id: str) -> list[str]:
    return [json.loads(e)["name"] for e in store.history(id).entries]


@settings(max_examples=30, deadline=None)
@given(
    first=st.integers(0, 6),
    saves=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 8)), max_size=12),
)
def test_the_count_follows_the_log_through_appends_trims_and_changed_limits(
    tmp_path_factory, first: int, saves: list[tuple[int, int]]
) -> None:
    path = tmp_path_factory.mktemp("h") / "g.db"
    with SQLiteStore(path) as store:
        store.create("a", "w", "waiting", b"x", None, history=_entries(0, first), history_limit=5)
        written = first
        kept = list(range(first))[-5:]
        version = 1
        for n, limit in saves:
            store.save(
                "a",
                version,
                "waiting",
                b"x",
                None,
                history=_entries(written, n),
                history_limit=limit,
            )
            version += 1
            if n:  # a save without entries leaves the log as it is, whatever the limit
                kept = (kept + list(range(written, written + n)))[-limit:]
            written += n
            length, count, dropped = _columns(path, "a")
            assert length == count == len(kept)
            assert dropped == written - len(kept)
            assert _names(store, "a") == [f"s{i}" for i in kept]


def test_a_file_written_before_the_count_gets_it_filled_in(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    with SQLiteStore(path) as store:
        store.create("a", "w", "waiting", b"x", None, history=_entries(0, 3))
        store.create("b", "w", "waiting", b"y", None)
    with sqlite3.connect(path) as conn:  # the table as an earlier version made it
        conn.execute("ALTER TABLE gorch_workflows DROP COLUMN history_count")
    with SQLiteStore(path) as store:
        assert store.load("b").blob == b"y"  # the store opens the file (and migrates it)
        assert _columns(path, "a") == (3, 3, 0)
        assert _columns(path, "b") == (0, 0, 0)
        store.save("a", 1, "waiting", b"x", None, history=_entries(3, 2), history_limit=4)
        assert _names(store, "a") == ["s1", "s2", "s3", "s4"]
        assert _columns(path, "a") == (4, 4, 1)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_count_that_lags_the_log_is_made_exact_at_the_next_trim(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    with SQLiteStore(path) as store:
        store.create("a", "w", "waiting", b"x", None, history=_entries(0, 4), history_limit=5)
        with sqlite3.connect(path) as conn:  # as a writer that does not keep the count leaves it
            conn.execute("UPDATE gorch_workflows SET history_count = 1")
        store.save("a", 1, "waiting", b"x", None, history=_entries(4, 1), history_limit=5)
        assert _columns(path, "a") == (5, 2, 0)  # under the cap by the count: appended
        store.save("a", 2, "waiting", b"x", None, history=_entries(5, 4), history_limit=5)
        assert _columns(path, "a") == (5, 5, 4)  # over the cap: trimmed by the log itself
        assert _names(store, "a") == ["s4", "s5", "s6", "s7", "s8"]
