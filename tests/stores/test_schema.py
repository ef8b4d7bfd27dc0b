"""The indexes of the SQL stores: only those that pay for themselves, and old ones dropped.

Each index costs every write that touches its columns (on PostgreSQL, nearly
every save, since saves change ``wake_at`` or ``status``): a table keeps its
primary key, the wake-up index (claims) and the ended index (purge); the
indexes of earlier versions on ``workflow``, ``status`` and ``(status,
updated_at)`` are dropped when a store opens (SQLite) or migrates (PostgreSQL)
the table.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from store_support import PG_DSN, require_server

from gorch.stores import SQLiteStore
from gorch.stores.sqlite import TERMINAL_SQL

OLD_SQLITE_INDEXES = (
    "CREATE INDEX gorch_workflows_workflow ON gorch_workflows (workflow, id)",
    "CREATE INDEX gorch_workflows_status ON gorch_workflows (status, id)",
    "CREATE INDEX gorch_workflows_purge ON gorch_workflows (status, updated_at)",
)


def _sqlite_indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'gorch_workflows'"
        ).fetchall()
    return {row[0] for row in rows}


def test_a_new_sqlite_file_has_the_two_indexes(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    with SQLiteStore(path) as store:
        store.create("a", "w", "s", b"", None)
    assert _sqlite_indexes(path) == {
        "sqlite_autoindex_gorch_workflows_1",  # the primary key
        "gorch_workflows_wake_at",
        "gorch_workflows_ended",
    }


def test_the_indexes_of_an_older_sqlite_file_are_dropped_and_its_records_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.db"
    with SQLiteStore(path) as store:
        store.create("a", "w", "finished", b"x", None)
    with sqlite3.connect(path) as conn:
        for ddl in OLD_SQLITE_INDEXES:
            conn.execute(ddl)
    with SQLiteStore(path) as store:
        assert store.load("a").blob == b"x"
    assert "gorch_workflows_status" not in _sqlite_indexes(path)
    assert _sqlite_indexes(path) == {
        "sqlite_autoindex_gorch_workflows_1",
        "gorch_workflows_wake_at",
        "gorch_workflows_ended",
    }


def test_a_sqlite_purge_of_ended_statuses_reads_the_ended_index(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    with SQLiteStore(path) as store:
        store.create("a", "w", "finished", b"", None)
        before = datetime.now(UTC) + timedelta(minutes=1)
        assert store.purge(before, ["finished", "cancelled"], 10) == ["a"]
    with sqlite3.connect(path) as conn:
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM gorch_workflows WHERE status IN (?, ?)"
                f" AND updated_at < ? AND {TERMINAL_SQL} ORDER BY updated_at LIMIT ?",
                ("finished", "cancelled", 0, 10),
            )
        )
    assert "gorch_workflows_ended" in plan


def _sqlite_index_sql(path: Path, name: str) -> str:
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()
    return str(row[0])


def test_the_ended_index_of_an_older_sqlite_file_is_built_again_as_defined_now(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.db"
    with SQLiteStore(path) as store:
        store.create("a", "w", "finished", b"x", None)
        store.create("b", "w", "waiting", b"y", None)
    with sqlite3.connect(path) as conn:  # as gorch wrote it before: an IN list
        conn.execute("DROP INDEX gorch_workflows_ended")
        conn.execute(
            "CREATE INDEX gorch_workflows_ended ON gorch_workflows (status, updated_at)"
            " WHERE status IN ('finished', 'cancelled', 'failed')"
        )
    with SQLiteStore(path) as store:
        assert store.load("a").blob == b"x"
        before = datetime.now(UTC) + timedelta(minutes=1)
        assert store.purge(before, ["finished"], 10) == ["a"]
        assert store.load("b").blob == b"y"
    assert TERMINAL_SQL in _sqlite_index_sql(path, "gorch_workflows_ended")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.fixture
def pg_table() -> Iterator[str]:
    require_server("postgres")
    import psycopg
    from psycopg import sql

    table = f"gorch_test_{uuid.uuid4().hex[:12]}"
    yield table
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for name in (table, f"{table}_seen"):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


def _pg_indexes(table: str) -> set[str]:
    import psycopg

    with psycopg.connect(PG_DSN) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,)
        ).fetchall()
    return {row[0] for row in rows}


def test_postgres_keeps_two_indexes_and_drops_the_old_ones(pg_table: str) -> None:
    import psycopg
    from psycopg import sql

    from gorch.stores.postgres import PostgresStore

    store = PostgresStore(PG_DSN, table=pg_table)
    store.create("a", "w", "finished", b"x", None)
    expected = {f"{pg_table}_pkey", f"{pg_table}_wake_at_idx", f"{pg_table}_ended_idx"}
    assert _pg_indexes(pg_table) == expected
    t = sql.Identifier(pg_table)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for suffix, columns in (
            ("workflow_idx", "workflow, id"),
            ("status_idx", "status, id"),
            ("status_updated_idx", "status, updated_at"),
        ):
            conn.execute(
                sql.SQL("CREATE INDEX {} ON {} (" + columns + ")").format(
                    sql.Identifier(f"{pg_table}_{suffix}"), t
                )
            )
    assert len(_pg_indexes(pg_table)) == 6
    store.migrate()
    assert _pg_indexes(pg_table) == expected
    assert store.load("a").blob == b"x"
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert store.purge(later, ["finished"], 10) == ["a"]
    store.close()
