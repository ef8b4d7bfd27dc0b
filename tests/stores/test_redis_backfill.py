"""Redis: records saved before the purge index existed are indexed before a first purge."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from store_support import REDIS_URL, require_server


@pytest.fixture
def prefix() -> Iterator[str]:
    require_server("redis")
    import redis

    name = f"gorch-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _as_if_old(prefix: str, ids: list[str]) -> None:
    """What an earlier gorch left: the records, but no purge index and no marker."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}:upd:*"):
        client.delete(key)
    client.delete(f"{prefix}:meta:purge_index")
    assert all(client.exists(f"{prefix}:rec:{id}") for id in ids)
    client.close()


def test_old_records_are_indexed_and_purged(prefix: str) -> None:
    from gorch.stores.redis import RedisStore

    old = RedisStore(REDIS_URL, prefix)
    ids = [f"old-{i}" for i in range(2500)]  # more than one SCAN page
    for id in ids:
        old.create(id, "w", "finished", b"x", None)
    old.create("live", "w", "waiting", b"x", None)
    old.close()
    _as_if_old(prefix, [*ids, "live"])

    store = RedisStore(REDIS_URL, prefix)
    later = datetime.now(UTC) + timedelta(minutes=1)
    gone = store.purge(later, ["finished"], 5000)
    assert sorted(gone) == sorted(ids)
    assert [r.id for r in store.list().records] == ["live"]
    assert store.migrate() == 0  # done once: the marker says so
    store.close()


def test_migrate_indexes_them_and_is_safe_to_repeat(prefix: str) -> None:
    from gorch.stores.aio_redis import AsyncRedisStore
    from gorch.stores.redis import RedisStore

    sync = RedisStore(REDIS_URL, prefix)
    sync.create("a", "w", "cancelled", b"x", None)
    sync.create("b", "w", "finished", b"x", None)
    _as_if_old(prefix, ["a", "b"])
    assert sync.migrate() == 2
    assert sync.migrate() == 0

    async def purge() -> list[str]:
        store = AsyncRedisStore(REDIS_URL, prefix)
        try:
            return await store.purge(datetime.now(UTC) + timedelta(minutes=1), ["cancelled"], 10)
        finally:
            await store.close()

    assert asyncio.run(purge()) == ["a"]
    sync.close()
