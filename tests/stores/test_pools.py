"""Bounded connection pools: many threads (or tasks) share at most ``pool_max`` connections.

Counted on the server itself: PostgreSQL's ``pg_stat_activity`` and Redis's
``CLIENT LIST``, filtered on an application / client name unique to the test,
so other users of the shared servers never count.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from store_support import PG_DSN, REDIS_URL, StoreSpec, make_spec, require_server

from gorch.errors import StoreUnavailable
from gorch.stores import Store, UnsupportedStoreURL, open_async_store, open_store

THREADS = 40
POOL_MAX = 3


def _with(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


@pytest.fixture
def pg_spec(tmp_path: Path) -> Iterator[StoreSpec]:
    yield from make_spec("postgres", tmp_path)


def _pg_connections(app: str) -> int:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def _pg_connections_gone(app: str, within: float = 5.0) -> bool:
    """Whether the server lists no session of ``app``: a closed connection's backend
    leaves ``pg_stat_activity`` a moment after the client hung up, not at once."""
    deadline = time.monotonic() + within
    while _pg_connections(app):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _hammer(store: Store, peak: Callable[[], None], threads: int = THREADS) -> None:
    """``threads`` threads each create, save and load records at once; ``peak()`` is
    sampled while they run."""
    go = threading.Event()

    def work(t: int) -> None:
        go.wait(10)
        for i in range(5):
            rec = store.create(f"t{t}-{i}", "w", "waiting", b"x", None)
            store.save(rec.id, 1, "done", b"y" * 100, None)
            assert store.load(rec.id).version == 2

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(work, t) for t in range(threads)]
        go.set()
        while not all(f.done() for f in futures):
            peak()
            time.sleep(0.005)
        for f in futures:
            f.result()


def test_forty_threads_share_at_most_pool_max_postgres_connections(pg_spec: StoreSpec) -> None:
    app = f"gorch-pool-{uuid.uuid4().hex[:12]}"
    url = _with(PG_DSN, f"application_name={app}&pool_min=1&pool_max={POOL_MAX}")
    store = open_store(url)
    # open_store gives a plain PostgresStore; put it in the test's own table
    from gorch.stores.postgres import PostgresStore

    assert isinstance(store, PostgresStore) and store.pool_max == POOL_MAX
    store.close()
    store = PostgresStore(store.url, table=pg_spec.namespace, pool_max=POOL_MAX)
    seen: list[int] = []
    try:
        _hammer(store, lambda: seen.append(_pg_connections(app)))
        seen.append(_pg_connections(app))
        assert len(store.list(limit=1000).records) == THREADS * 5
    finally:
        store.close()
    assert 1 <= max(seen) <= POOL_MAX, seen
    assert _pg_connections_gone(app)  # close() closed them all


def test_forty_tasks_share_at_most_pool_max_async_postgres_connections(
    pg_spec: StoreSpec,
) -> None:
    from gorch.stores.aio_postgres import AsyncPostgresStore

    app = f"gorch-apool-{uuid.uuid4().hex[:12]}"
    dsn = _with(PG_DSN, f"application_name={app}")
    store = AsyncPostgresStore(dsn, table=pg_spec.namespace, pool_max=POOL_MAX)
    seen: list[int] = []

    async def work(t: int) -> None:
        for i in range(5):
            rec = await store.create(f"t{t}-{i}", "w", "waiting", b"x", None)
            await store.save(rec.id, 1, "done", b"y", None)

    async def main() -> None:
        tasks = [asyncio.create_task(work(t)) for t in range(THREADS)]
        while not all(t.done() for t in tasks):
            seen.append(await asyncio.to_thread(_pg_connections, app))
        await asyncio.gather(*tasks)
        assert len((await store.list(limit=1000)).records) == THREADS * 5
        await store.close()

    asyncio.run(main())
    # the schema is created on one connection of its own, outside the pool
    assert 1 <= max(seen) <= POOL_MAX + 1, seen
    assert _pg_connections_gone(app)


def test_a_busy_sync_pool_says_so_and_writes_nothing(pg_spec: StoreSpec) -> None:
    import psycopg
    from psycopg import sql

    from gorch.stores.postgres import PostgresStore

    store = PostgresStore(PG_DSN, table=pg_spec.namespace, pool_max=1, pool_timeout=0.2)
    store.create("a", "w", "s", b"v1", None)
    with psycopg.connect(PG_DSN) as locker:  # our own connection holds the row lock
        locker.execute(
            sql.SQL("SELECT 1 FROM {} WHERE id = 'a' FOR UPDATE").format(
                sql.Identifier(pg_spec.namespace)
            )
        )
        with ThreadPoolExecutor(1) as pool:
            saving = pool.submit(store.save, "a", 1, "t", b"v2", None)
            time.sleep(0.3)  # the only pooled connection now waits on the row lock
            with pytest.raises(StoreUnavailable) as info:
                store.create("b", "w", "s", b"", None)
            assert "pool_max" in str(info.value) and "nothing was written" in str(info.value)
            locker.rollback()
            assert saving.result(10).version == 2
    assert [r.id for r in store.list().records] == ["a"]
    store.close()


def test_forty_threads_share_at_most_pool_max_redis_connections() -> None:
    require_server("redis")
    import redis

    from gorch.stores.redis import RedisStore

    name = f"gorch-pool-{uuid.uuid4().hex[:12]}"
    prefix = f"gorch-test-{uuid.uuid4().hex[:12]}"
    admin = redis.Redis.from_url(REDIS_URL)

    def connections() -> int:
        return sum(1 for c in admin.client_list() if c.get("name") == name)

    url = _with(REDIS_URL, f"client_name={name}&pool_max={POOL_MAX}&pool_timeout=10")
    store = open_store(url)
    assert isinstance(store, RedisStore) and store.pool_max == POOL_MAX
    store.close()
    store = RedisStore(_with(REDIS_URL, f"client_name={name}"), prefix, pool_max=POOL_MAX)
    seen: list[int] = []
    try:
        _hammer(store, lambda: seen.append(connections()))
        seen.append(connections())
    finally:
        keys = list(admin.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            admin.delete(*keys)
        store.close()
        admin.close()
    assert 1 <= max(seen) <= POOL_MAX, seen


def test_a_busy_redis_pool_says_so_and_writes_nothing() -> None:
    require_server("redis")
    from gorch.stores.redis import RedisStore

    prefix = f"gorch-test-{uuid.uuid4().hex[:12]}"
    store = RedisStore(REDIS_URL, prefix, pool_max=1, pool_timeout=0.2)
    held = store._client.connection_pool.get_connection()  # the only connection, taken
    try:
        with pytest.raises(StoreUnavailable) as info:
            store.create("a", "w", "s", b"", None)
        message = str(info.value)
        assert "pool_max" in message and message.endswith("nothing was written")
    finally:
        store._client.connection_pool.release(held)
    with pytest.raises(Exception, match="a"):
        store.load("a")  # WorkflowNotFound: nothing was created
    store.close()


# -- URL options -----------------------------------------------------------------------------


def test_postgres_url_pool_options_reach_the_sync_store() -> None:
    pytest.importorskip("psycopg_pool")
    from gorch.stores.postgres import DEFAULT_POOL_MAX, PostgresStore

    plain = open_store("postgresql://gorch:pw@127.0.0.1:5432/test")
    assert isinstance(plain, PostgresStore) and plain.pool_max == DEFAULT_POOL_MAX
    assert plain.prepare_threshold == 0
    libpq = "sslmode=disable&application_name=a%20b"
    url = f"postgresql://gorch:pw@127.0.0.1:5432/test?pool_min=0&pool_max=4&{libpq}"
    tuned = open_store(url + "&pool_timeout=1.5&prepare_threshold=none")
    assert isinstance(tuned, PostgresStore)
    assert (tuned.pool_min, tuned.pool_max, tuned.pool_timeout) == (0, 4, 1.5)
    assert tuned.prepare_threshold is None
    assert tuned.url.endswith("?" + libpq)  # libpq's options stay as sent, ours are gone


@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("postgresql://u:hunter2@h/db?pool_max=ten", "pool_max"),
        ("postgresql://u:hunter2@h/db?pool_min=5&pool_max=2", "pool_min"),
        ("postgresql://u:hunter2@h/db?pool_timeout=0", "pool_timeout"),
        ("postgresql://u:hunter2@h/db?prepare_threshold=-1", "prepare_threshold"),
        ("redis://:hunter2@h/0?pool_max=0", "pool_max"),
        ("redis://:hunter2@h/0?pool_timeout=soon", "pool_timeout"),
    ],
)
def test_bad_pool_options_are_refused_by_both_openers(url: str, option: str) -> None:
    pytest.importorskip("psycopg_pool")
    pytest.importorskip("redis")
    opener: Any
    for opener in (open_store, open_async_store):
        with pytest.raises(UnsupportedStoreURL) as info:
            opener(url)
        assert option in str(info.value) and "hunter2" not in str(info.value)


def test_a_connection_lent_by_the_store_works_in_its_table_and_goes_back(
    pg_spec: StoreSpec,
) -> None:
    """``connection()`` lends a pooled connection (as a queue in the same database uses
    it): it sees the store's table, and the pool has it back after the block, also
    after an error inside it."""
    from psycopg import sql

    from gorch.stores.aio_postgres import AsyncPostgresStore
    from gorch.stores.postgres import PostgresStore

    table = sql.Identifier(pg_spec.namespace)
    store = PostgresStore(PG_DSN, table=pg_spec.namespace, pool_max=1, pool_timeout=2)
    store.create("a", "w", "s", b"v1", None)
    for _ in range(3):  # one connection in all: each block must hand it back
        with pytest.raises(ZeroDivisionError), store.connection() as conn:
            row = conn.execute(sql.SQL("SELECT version FROM {} WHERE id = 'a'").format(table))
            assert row.fetchone() == (1,)
            raise ZeroDivisionError
    assert store.save("a", 1, "t", b"v2", None).version == 2
    store.close()

    async def lend() -> None:
        astore = AsyncPostgresStore(PG_DSN, table=pg_spec.namespace, pool_max=1, pool_timeout=2)
        for _ in range(3):
            async with astore.connection() as conn:
                cur = await conn.execute(
                    sql.SQL("SELECT version FROM {} WHERE id = 'a'").format(table)
                )
                assert await cur.fetchone() == (2,)
        assert (await astore.save("a", 2, "t", b"v3", None)).version == 3
        await astore.close()

    asyncio.run(lend())


def _kept_bytes(conn: Any) -> int:
    """Bytes of result data the pooled connection's kept cursor still holds."""
    cursor = getattr(conn, "statements", None)
    result = None if cursor is None else cursor.pgresult
    if result is None:
        return 0
    return sum(
        len(result.get_value(row, col) or b"")
        for row in range(result.ntuples)
        for col in range(result.nfields)
    )


BIG = b"\x00\x01" * 500_000  # a 1 MB blob


def test_an_idle_pooled_connection_keeps_no_blob_nor_history(pg_spec: StoreSpec) -> None:
    """Each pooled connection keeps a cursor for small statements; what a load or a
    history read brings back (a blob, a log) is never left in it."""
    from gorch.stores.postgres import PostgresStore

    store = PostgresStore(PG_DSN, table=pg_spec.namespace, pool_min=1, pool_max=1)
    try:
        entry = '{"at": "2026-01-01T00:00:00Z", "kind": "step", "name": "' + "x" * 10_000 + '"}'
        rec = store.create("big", "w", "waiting", BIG, None, history=[entry] * 50)
        rec = store.save("big", rec.version, "waiting", BIG, None)  # a small statement last...
        assert store.load("big").blob == BIG  # ...then a large result
        assert len(store.history("big").entries) == 50
        pool = store._ready()
        conn = pool.getconn()
        try:
            assert conn.statements is not None  # the small statements ran on the kept cursor
            assert _kept_bytes(conn) < 1_000
        finally:
            pool.putconn(conn)
    finally:
        store.close()


def test_an_idle_async_pooled_connection_keeps_no_blob(pg_spec: StoreSpec) -> None:
    from gorch.stores.aio_postgres import AsyncPostgresStore

    async def main() -> None:
        store = AsyncPostgresStore(PG_DSN, table=pg_spec.namespace, pool_min=1, pool_max=1)
        try:
            rec = await store.create("big", "w", "waiting", BIG, None)
            await store.save("big", rec.version, "waiting", BIG, None)
            assert (await store.load("big")).blob == BIG
            pool = await store._ready()
            conn = await pool.getconn()
            try:
                assert conn.statements is not None
                assert _kept_bytes(conn) < 1_000
            finally:
                await pool.putconn(conn)
        finally:
            await store.close()

    asyncio.run(main())
