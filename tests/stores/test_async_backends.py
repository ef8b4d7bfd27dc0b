"""The async stores beyond the contract: ``open_async_store`` URLs, pool settings,
unreachable or busy servers, lost connections, and the caller's clock.

The contract itself (``test_contract.py``) runs on every async store too.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from store_support import PG_DSN, REDIS_URL, StoreSpec, make_spec, require_server

from gorch import clock
from gorch.errors import StoreError, StoreUnavailable
from gorch.stores import (
    AsyncMemoryStore,
    AsyncSQLiteStore,
    AsyncStore,
    MemoryStore,
    UnsupportedStoreURL,
    open_async_store,
    open_store,
)


def _with_scheme(url: str, scheme: str) -> str:
    return scheme + "://" + url.split("://", 1)[1]


async def _round_trip(store: AsyncStore) -> None:
    await store.create("ping", "probe", "running", b"\x00", None)
    assert (await store.load("ping")).blob == b"\x00"
    await store.delete("ping")


# -- URLs ----------------------------------------------------------------------------------


def test_memory_url() -> None:
    store = open_async_store("memory://")
    assert isinstance(store, AsyncMemoryStore) and store.url == "memory://"
    asyncio.run(_round_trip(store))


def test_async_memory_store_can_share_a_sync_one() -> None:
    sync = MemoryStore()
    store = AsyncMemoryStore(sync)
    sync.create("a", "w", "s", b"x", None)
    assert asyncio.run(store.load("a")) == sync.load("a")


def test_sqlite_urls_open_the_same_file_as_the_sync_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for url in ("sqlite:///rel.db", f"sqlite:///{tmp_path / 'abs.db'}"):
        store = open_async_store(url)
        assert isinstance(store, AsyncSQLiteStore) and store.url == url

        async def main(store: AsyncStore = store) -> None:
            async with store:
                await store.create("a", "w", "s", b"async", None)

        asyncio.run(main())
        with open_store(url) as sync:
            assert sync.load("a").blob == b"async"
    assert (tmp_path / "rel.db").is_file() and (tmp_path / "abs.db").is_file()


def test_sqlite_threads_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threads"):
        AsyncSQLiteStore(tmp_path / "x.db", threads=0)


def test_a_closed_async_store_opens_again_on_use(tmp_path: Path) -> None:
    """Like the sync stores: close() releases connections; a later call gets new ones."""

    async def main() -> None:
        store = AsyncSQLiteStore(tmp_path / "x.db")
        await store.create("a", "w", "s", b"", None)
        await store.close()
        await store.close()  # twice is harmless
        assert (await store.load("a")).id == "a"
        await store.close()

    asyncio.run(main())


def test_sqlite_in_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    store = AsyncSQLiteStore(tmp_path / "missing" / "x.db")
    with pytest.raises(StoreUnavailable) as info:
        asyncio.run(store.load("x"))
    assert str(tmp_path / "missing" / "x.db") in str(info.value)


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "POSTGRES"])
def test_postgres_urls_and_pool_options(scheme: str) -> None:
    pytest.importorskip("psycopg_pool")
    from gorch.stores.aio_postgres import (
        DEFAULT_POOL_MAX,
        DEFAULT_POOL_MIN,
        DEFAULT_POOL_TIMEOUT,
        AsyncPostgresStore,
    )

    url = _with_scheme("postgresql://gorch:pw-123@127.0.0.1:5432/test", scheme)
    store = open_async_store(url)  # connects lazily: nothing is created here
    assert isinstance(store, AsyncPostgresStore) and store.table == "gorch_workflows"
    assert store.url == _with_scheme("postgresql://gorch:***@127.0.0.1:5432/test", scheme.lower())
    assert (store.pool_min, store.pool_max, store.pool_timeout) == (
        DEFAULT_POOL_MIN,
        DEFAULT_POOL_MAX,
        DEFAULT_POOL_TIMEOUT,
    )
    libpq = "sslmode=disable&options=-c%20statement_timeout%3D5000"
    tuned = open_async_store(f"{url}?pool_min=2&pool_max=20&{libpq}&pool_timeout=2.5")
    assert isinstance(tuned, AsyncPostgresStore)
    assert (tuned.pool_min, tuned.pool_max, tuned.pool_timeout) == (2, 20, 2.5)
    assert "pool_" not in tuned.url and tuned.url.endswith("?" + libpq)  # libpq's stay as sent


@pytest.mark.parametrize(
    "query", ["pool_max=ten", "pool_min=5&pool_max=2", "pool_max=0", "pool_timeout=0"]
)
def test_bad_pool_options_are_unsupported_urls(query: str) -> None:
    pytest.importorskip("psycopg_pool")
    with pytest.raises(UnsupportedStoreURL) as info:
        open_async_store(f"postgresql://gorch:hunter2@127.0.0.1:5432/test?{query}")
    assert "pool_" in str(info.value) and "hunter2" not in str(info.value)


def test_the_sync_store_reads_the_same_pool_options() -> None:
    """One setting for both: the sync store pools its connections the same way."""
    require_server("postgres")
    token = uuid.uuid4().hex[:12]
    url = PG_DSN + ("&" if "?" in PG_DSN else "?") + "pool_max=3"
    from gorch.stores.postgres import PostgresStore

    store = open_store(url)
    assert isinstance(store, PostgresStore) and "pool_max" not in store.url
    assert store.pool_max == 3
    store.close()
    table = f"gorch_test_{token}"
    with PostgresStore(store.url, table=table) as sync:  # the cleaned URL works as a DSN
        try:
            sync.create("a", "w", "s", b"", None)
        finally:
            _drop_pg(table)


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_redis_urls(scheme: str) -> None:
    pytest.importorskip("redis")
    from gorch.stores.aio_redis import AsyncRedisStore

    url = _with_scheme("redis://:pw-123@127.0.0.1:6379/15", scheme)
    store = open_async_store(url)  # connects lazily
    assert isinstance(store, AsyncRedisStore) and store.prefix == "gorch"
    assert store.url == _with_scheme("redis://:***@127.0.0.1:6379/15", scheme)
    asyncio.run(store.close())


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
        open_async_store(url)
    assert isinstance(info.value, ValueError) and isinstance(info.value, StoreError)
    for scheme in ("memory://", "sqlite:///", "postgresql://", "redis://"):
        assert scheme in str(info.value)
    assert "hunter2" not in str(info.value)


def test_a_missing_pool_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg_pool", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "gorch.stores.aio_postgres", raising=False)
    with pytest.raises(ImportError) as info:
        open_async_store("postgresql://127.0.0.1/test")
    assert "psycopg_pool" in str(info.value) and "gorch[postgres]" in str(info.value)
    with pytest.raises(ImportError, match=r"gorch\[postgres\]"):
        import gorch.stores

        gorch.stores.AsyncPostgresStore  # noqa: B018 - the lazy attribute is the point


# -- unreachable and busy servers ----------------------------------------------------------


def test_unreachable_postgres_names_the_url_without_password() -> None:
    pytest.importorskip("psycopg_pool")
    store = open_async_store("postgresql://gorch:s3cr3t-pw@127.0.0.1:1/gorch?connect_timeout=3")
    assert "s3cr3t-pw" not in store.url

    async def main() -> None:
        with pytest.raises(StoreUnavailable) as info:
            await store.load("anything")
        message = str(info.value)
        assert "postgresql://gorch:***@127.0.0.1:1/gorch" in message
        assert "s3cr3t-pw" not in message and "refused" in message.lower()
        with pytest.raises(StoreUnavailable):  # and it stays an error, not a hang or a crash
            await store.create("x", "w", "s", b"", None)
        await store.close()

    asyncio.run(main())


def test_unreachable_redis_names_the_url_without_password() -> None:
    pytest.importorskip("redis")
    store = open_async_store("redis://gorch:s3cr3t-pw@127.0.0.1:1/0")

    async def main() -> None:
        with pytest.raises(StoreUnavailable) as info:
            await store.load("anything")
        message = str(info.value)
        assert "redis://gorch:***@127.0.0.1:1/0" in message and "s3cr3t-pw" not in message
        with pytest.raises(StoreUnavailable):
            await store.claim_due(datetime.now(UTC), 1, timedelta(seconds=1))
        await store.close()

    asyncio.run(main())


@pytest.fixture
def pg_spec(tmp_path: Path) -> Iterator[StoreSpec]:
    yield from make_spec("postgres", tmp_path, aio=True)


def _drop_pg(table: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for name in (table, f"{table}_seen"):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


def test_a_busy_pool_says_so_and_writes_nothing(pg_spec: StoreSpec) -> None:
    """Every pooled connection held past ``pool_timeout``: StoreUnavailable names the pool."""
    import psycopg
    from psycopg import sql

    from gorch.stores.aio_postgres import AsyncPostgresStore

    store = AsyncPostgresStore(PG_DSN, table=pg_spec.namespace, pool_max=1, pool_timeout=0.2)
    table = sql.Identifier(pg_spec.namespace)

    async def main() -> None:
        await store.create("a", "w", "s", b"v1", None)
        with psycopg.connect(PG_DSN) as locker:  # our own connection holds the row lock
            locker.execute(sql.SQL("SELECT 1 FROM {} WHERE id = 'a' FOR UPDATE").format(table))
            locker_pid = locker.info.backend_pid
            saving = asyncio.create_task(store.save("a", 1, "t", b"v2", None))
            await _until_blocked_by(locker_pid)  # the only pooled connection waits on it
            with pytest.raises(StoreUnavailable) as info:
                await store.create("b", "w", "s", b"", None)
            assert "pool_max" in str(info.value) and "nothing was written" in str(info.value)
            locker.rollback()
            assert (await saving).version == 2
        assert [r.id for r in (await store.list()).records] == ["a"]
        await store.close()

    asyncio.run(main())


async def _until_blocked_by(pid: int) -> None:
    """Wait until some backend waits on a lock held by ``pid`` (our locker's backend)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as admin:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cursor = await admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                (pid,),
            )
            row = await cursor.fetchone()
            if row is not None and row[0] > 0:
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the save never waited on the row lock")


def test_a_cancelled_postgres_write_applies_nothing_and_frees_its_connection(
    pg_spec: StoreSpec,
) -> None:
    """asyncio cancellation mid-statement: the server cancels it, the pool gets the
    connection back usable, and the record is as it was."""
    import psycopg
    from psycopg import sql

    from gorch.stores.aio_postgres import AsyncPostgresStore

    store = AsyncPostgresStore(PG_DSN, table=pg_spec.namespace, pool_max=1)

    async def main() -> None:
        before = await store.create("a", "w", "s", b"v1", None)
        with psycopg.connect(PG_DSN) as locker:
            query = sql.SQL("SELECT 1 FROM {} WHERE id = 'a' FOR UPDATE")
            locker.execute(query.format(sql.Identifier(pg_spec.namespace)))
            saving = asyncio.create_task(store.save("a", 1, "t", b"v2", None))
            await _until_blocked_by(locker.info.backend_pid)
            saving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await saving
            locker.rollback()
        assert await store.load("a") == before
        assert (await store.save("a", 1, "t", b"v3", None)).blob == b"v3"  # the one connection
        await store.close()

    asyncio.run(main())


def test_postgres_recovers_from_a_pooled_connection_killed_while_idle(
    pg_spec: StoreSpec,
) -> None:
    import psycopg

    from gorch.stores.aio_postgres import AsyncPostgresStore

    store = AsyncPostgresStore(PG_DSN, table=pg_spec.namespace, pool_min=1, pool_max=1)

    async def own_pid() -> int:
        assert store._pool is not None
        async with store._pool.connection() as conn:  # the pool's only connection
            row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        assert row is not None
        return int(row[0])

    async def main() -> None:
        await store.create("a", "w", "s", b"x", None)
        pid = await own_pid()
        with psycopg.connect(PG_DSN, autocommit=True) as admin:  # only the store's backend
            row = admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
            assert row == (True,)
        assert (await store.load("a")).blob == b"x"
        assert (await store.save("a", 1, "t", b"y", None)).version == 2
        assert await own_pid() != pid  # it did reconnect
        await store.close()

    asyncio.run(main())


def test_redis_recovers_from_a_connection_killed_while_idle() -> None:
    require_server("redis")
    import redis

    from gorch.stores.aio_redis import AsyncRedisStore

    store = AsyncRedisStore(REDIS_URL, prefix=f"gorch-test-{uuid.uuid4().hex[:12]}")

    async def main() -> None:
        await store.create("a", "w", "s", b"x", None)
        killed = int(await store._client.client_id())  # the pool's one (most recent) connection
        admin = redis.Redis.from_url(REDIS_URL)
        try:
            assert admin.execute_command("CLIENT", "KILL", "ID", str(killed)) == 1
        finally:
            admin.close()
        try:
            assert (await store.load("a")).blob == b"x"
            assert (await store.save("a", 1, "t", b"y", None)).version == 2
            assert int(await store._client.client_id()) != killed  # it did reconnect
        finally:
            await store.delete("a")
            await store.close()

    asyncio.run(main())


# -- the caller's context -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_remember_reads_the_callers_clock(kind: str, tmp_path: Path) -> None:
    """A test clock set in the calling task applies, even where the call runs on a thread."""
    store = AsyncMemoryStore() if kind == "memory" else AsyncSQLiteStore(tmp_path / "c.db")
    until = datetime.now(UTC) + timedelta(hours=1)

    async def main() -> None:
        assert await store.remember("k", until) is True
        assert await store.remember("k", until) is False
        with clock.use_clock(lambda: until + timedelta(seconds=1)):
            assert await store.remember("k", until + timedelta(hours=1)) is True
        await store.close()

    asyncio.run(main())
