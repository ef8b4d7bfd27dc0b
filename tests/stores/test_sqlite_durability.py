"""SQLite's durability is a setting: ``PRAGMA synchronous`` from the URL, FULL unless told."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gorch.stores import (
    AsyncSQLiteStore,
    SQLiteStore,
    UnsupportedStoreURL,
    open_async_store,
    open_store,
)

LEVELS = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}


def _level(store: SQLiteStore) -> int:
    """``PRAGMA synchronous`` on the store's own connection (it is per connection)."""
    store.list(limit=1)
    return int(store._conns.get().execute("PRAGMA synchronous").fetchone()[0])


def test_the_default_is_full(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'a.db'}")
    assert isinstance(store, SQLiteStore)
    assert store.synchronous == "FULL" and _level(store) == LEVELS["FULL"]
    assert store.url == f"sqlite:///{tmp_path / 'a.db'}"
    store.close()


@pytest.mark.parametrize(
    ("value", "level"),
    [("normal", "NORMAL"), ("OFF", "OFF"), ("Full", "FULL"), ("extra", "EXTRA"), ("1", "NORMAL")],
)
def test_the_url_sets_it(tmp_path: Path, value: str, level: str) -> None:
    path = tmp_path / "a.db"
    store = open_store(f"sqlite:///{path}?synchronous={value}")
    assert isinstance(store, SQLiteStore) and store.path == str(path)
    assert store.synchronous == level and _level(store) == LEVELS[level]
    store.create("x", "w", "s", b"", None)
    store.close()
    # the setting is the connection's, not the file's: the file works the same either way
    assert sqlite3.connect(path).execute("SELECT id FROM gorch_workflows").fetchall() == [("x",)]


def test_the_url_of_a_store_names_a_non_default_level(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'a.db'}?synchronous=normal&timeout=2.5")
    assert isinstance(store, SQLiteStore) and store.timeout == 2.5
    assert store.url.endswith("a.db?synchronous=normal")
    again = open_store(store.url)  # the store's URL opens the same store, set the same way
    assert isinstance(again, SQLiteStore) and again.synchronous == "NORMAL"
    store.close()
    again.close()


def test_the_async_store_takes_the_same_option(tmp_path: Path) -> None:
    store = open_async_store(f"sqlite:///{tmp_path / 'a.db'}?synchronous=normal")
    assert isinstance(store, AsyncSQLiteStore) and store.store.synchronous == "NORMAL"

    async def main() -> None:
        await store.create("x", "w", "s", b"", None)
        await store.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("synchronous=sometimes", "off, normal, full, extra"),
        ("synchronous=7", "off, normal, full, extra"),
        ("synchronous=", "off, normal, full, extra"),
        ("journal_mode=delete", "unknown option 'journal_mode'"),
        ("timeout=-1", "timeout"),
    ],
)
def test_a_bad_option_is_refused_before_anything_is_opened(
    tmp_path: Path, query: str, said: str
) -> None:
    for opener in (open_store, open_async_store):
        with pytest.raises(UnsupportedStoreURL) as info:
            opener(f"sqlite:///{tmp_path / 'a.db'}?{query}")
        assert said in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no file was created


def test_the_class_refuses_a_bad_level_too(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous must be one of"):
        SQLiteStore(tmp_path / "a.db", synchronous="fast")
