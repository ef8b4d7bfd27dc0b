"""``open_store`` URLs, unreachable servers, and what each backend promises beyond the contract."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fault_support import pg_store, pg_terminate, redis_kill, redis_own_client_id
from store_support import PG_DSN, REDIS_URL, StoreSpec, make_spec, require_server

from gorch.errors import StoreError, StoreUnavailable
from gorch.stores import (
    MemoryStore,
    SQLiteStore,
    Store,
    UnsupportedStoreURL,
    open_store,
)


def _with_scheme(url: str, scheme: str) -> str:
    return scheme + "://" + url.split("://", 1)[1]


def _round_trip(store: Store) -> None:
    store.create("ping", "probe", "running", b"\x00", None)
    assert store.load("ping").blob == b"\x00"
    store.delete("ping")


def test_memory_url() -> None:
    store = open_store("memory://")
    assert isinstance(store, MemoryStore) and store.url == "memory://"
    _round_trip(store)


def test_sqlite_relative_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///rel.db") as store:
        assert isinstance(store, SQLiteStore) and store.url == "sqlite:///rel.db"
        _round_trip(store)
    assert (tmp_path / "rel.db").is_file()


def test_sqlite_absolute_url(tmp_path: Path) -> None:
    path = tmp_path / "abs.db"
    with open_store(f"sqlite:///{path}") as store:
        assert store.url == f"sqlite:///{path}"
        assert str(path).startswith("/") and store.url.startswith("sqlite:////")
        _round_trip(store)
    assert path.is_file()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "POSTGRES"])
def test_postgres_urls(scheme: str) -> None:
    pytest.importorskip("psycopg")
    from gorch.stores.postgres import PostgresStore

    url = _with_scheme("postgresql://gorch:pw-123@127.0.0.1:5432/test", scheme)
    with open_store(url) as store:  # connects lazily: nothing is created here
        assert isinstance(store, PostgresStore)
        assert store.table == "gorch_workflows"
        expected = _with_scheme("postgresql://gorch:***@127.0.0.1:5432/test", scheme.lower())
        assert store.url == expected


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_redis_urls(scheme: str) -> None:
    pytest.importorskip("redis")
    from gorch.stores.redis import RedisStore

    url = _with_scheme("redis://:pw-123@127.0.0.1:6379/15", scheme)
    with open_store(url) as store:  # connects lazily
        assert isinstance(store, RedisStore) and store.prefix == "gorch"
        assert store.url == _with_scheme("redis://:***@127.0.0.1:6379/15", scheme)


@pytest.mark.parametrize(
    "url",
    [
        "mongodb://user:hunter2@db/x",
        "sqlite://relative.db",
        "sqlite:///",
        "no-scheme",
        "memory://x",
    ],
)
def test_unsupported_urls_say_what_is_supported(url: str) -> None:
    with pytest.raises(UnsupportedStoreURL) as info:
        open_store(url)
    assert isinstance(info.value, ValueError) and isinstance(info.value, StoreError)
    message = str(info.value)
    for scheme in ("memory://", "sqlite:///", "postgresql://", "redis://"):
        assert scheme in message
    assert "hunter2" not in message


# -- unreachable servers -------------------------------------------------------------------


def test_unreachable_postgres_names_the_url_without_password() -> None:
    pytest.importorskip("psycopg")
    url = "postgresql://gorch:s3cr3t-pw@127.0.0.1:1/gorch?connect_timeout=3"
    store = open_store(url)
    assert "s3cr3t-pw" not in store.url
    with pytest.raises(StoreUnavailable) as info:
        store.load("anything")
    message = str(info.value)
    assert "postgresql://gorch:***@127.0.0.1:1/gorch" in message
    assert "s3cr3t-pw" not in message
    with pytest.raises(StoreUnavailable):  # and it stays an error, not a hang or a crash
        store.create("x", "w", "s", b"", None)


def test_unreachable_redis_names_the_url_without_password() -> None:
    pytest.importorskip("redis")
    url = "redis://gorch:s3cr3t-pw@127.0.0.1:1/0"
    store = open_store(url)
    assert "s3cr3t-pw" not in store.url
    with pytest.raises(StoreUnavailable) as info:
        store.load("anything")
    message = str(info.value)
    assert "redis://gorch:***@127.0.0.1:1/0" in message
    assert "s3cr3t-pw" not in message
    with pytest.raises(StoreUnavailable):
        store.claim_due(datetime.now(UTC), 1, timedelta(seconds=1))


def test_sqlite_in_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "missing" / "x.db")
    with pytest.raises(StoreUnavailable) as info:
        store.load("x")
    assert str(tmp_path / "missing" / "x.db") in str(info.value)


def test_sqlite_refuses_an_in_memory_database() -> None:
    with pytest.raises(ValueError, match="MemoryStore"):
        SQLiteStore(":memory:")


# -- what the backends set up --------------------------------------------------------------


def test_sqlite_uses_wal_and_indexes_wake_at(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    with SQLiteStore(path) as store:
        store.create("a", "w", "s", b"", None)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    plan = " ".join(
        str(row[-1])
        for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM gorch_workflows"
            " WHERE wake_at IS NOT NULL AND wake_at <= 0 ORDER BY wake_at, id LIMIT 5"
        )
    )
    assert "gorch_workflows_wake_at" in plan
    conn.close()


@pytest.fixture
def pg_spec(tmp_path: Path) -> Iterator[StoreSpec]:
    yield from make_spec("postgres", tmp_path)


def test_postgres_migrate_is_idempotent_and_claims_use_the_partial_index(
    pg_spec: StoreSpec,
) -> None:
    import psycopg

    from gorch.stores.postgres import PostgresStore

    store = PostgresStore(PG_DSN, table=pg_spec.namespace)
    store.migrate()
    store.migrate()
    store.create("a", "w", "s", b"", None)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        indexes: dict[str, str] = dict(
            conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s",
                (pg_spec.namespace,),
            ).fetchall()
        )
        wake = indexes[f"{pg_spec.namespace}_wake_at_idx"]
        assert "wake_at IS NOT NULL" in wake
        collation = conn.execute(
            "SELECT collation_name FROM information_schema.columns"
            " WHERE table_name = %s AND column_name = 'id'",
            (pg_spec.namespace,),
        ).fetchone()
        assert collation == ("C",)
    store.close()


def test_postgres_rejects_a_bad_table_name() -> None:
    pytest.importorskip("psycopg")
    from gorch.stores.postgres import PostgresStore

    with pytest.raises(ValueError):
        PostgresStore(PG_DSN, table="a.b.c")


def test_redis_prefixes_keep_stores_apart() -> None:
    require_server("redis")
    from gorch.stores.redis import RedisStore

    one, two = (RedisStore(REDIS_URL, prefix=f"gorch-test-{uuid.uuid4().hex[:12]}") for _ in "12")
    try:
        one.create("same-id", "w", "s", b"one", None)
        two.create("same-id", "w", "s", b"two", None)
        assert one.load("same-id").blob == b"one" and two.load("same-id").blob == b"two"
    finally:
        for store in (one, two):
            store.delete("same-id")
            store.close()


def test_postgres_recovers_from_a_connection_killed_while_idle(pg_spec: StoreSpec) -> None:
    store = pg_store(PG_DSN, pg_spec.namespace)
    store.create("a", "w", "s", b"x", None)
    [pid] = store.pids  # from pg_backend_pid() on the store's own connection
    # A restart, an idle timeout: only the store's backend ends, nobody else's.
    assert pg_terminate(PG_DSN, store, pid)
    assert store.load("a").blob == b"x"
    assert store.save("a", 1, "t", b"y", None).version == 2
    assert len(store.pids) == 2 and store.pids[1] != pid  # it did reconnect
    store.close()


def test_redis_recovers_from_a_connection_killed_while_idle() -> None:
    require_server("redis")
    from gorch.stores.redis import RedisStore

    store = RedisStore(REDIS_URL, prefix=f"gorch-test-{uuid.uuid4().hex[:12]}")
    store.create("a", "w", "s", b"x", None)
    killed = redis_own_client_id(store)
    redis_kill(REDIS_URL, killed)  # only the store's own connection, by its id
    try:
        assert store.load("a").blob == b"x"
        assert store.save("a", 1, "t", b"y", None).version == 2
        assert redis_own_client_id(store) != killed  # it did reconnect
    finally:
        store.delete("a")
        store.close()
