"""What the store tests share: the servers, and how to open one isolated store of each kind.

PostgreSQL and Redis are the real thing (``GORCH_PG_DSN``, ``GORCH_REDIS_URL``).
A missing server skips its tests on a developer's machine, but fails the run
when ``CI`` or ``GORCH_REQUIRE_SERVICES`` is set: CI must never go green by
skipping the backends it is meant to check.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gorch.stores import MemoryStore, SQLiteStore, Store

PG_DSN = os.environ.get("GORCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GORCH_REDIS_URL", "redis://127.0.0.1:6379/15")

ALL_KINDS = ["memory", "sqlite", "postgres", "redis"]
SHARED_KINDS = ["sqlite", "postgres", "redis"]  # stores that several processes can share


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


def services_required() -> bool:
    """Whether a missing PostgreSQL or Redis must fail the run instead of skipping."""
    return _truthy(os.environ.get("CI")) or _truthy(os.environ.get("GORCH_REQUIRE_SERVICES"))


@functools.cache
def _server_problem(kind: str) -> str | None:
    """Why the server for ``kind`` can't be used, or None when it answers."""
    try:
        if kind == "postgres":
            import psycopg

            with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
        elif kind == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
            client.ping()
            client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def require_server(kind: str) -> None:
    """Skip (locally) or fail (CI) a test whose server is absent."""
    problem = _server_problem(kind)
    if problem is None:
        return
    message = f"{kind} server not usable: {problem}"
    if services_required():
        pytest.fail(f"{message} (CI or GORCH_REQUIRE_SERVICES is set)", pytrace=False)
    pytest.skip(message)


@dataclass(frozen=True)
class StoreSpec:
    """How to open one test's store, picklable so child processes can open their own."""

    kind: str
    target: str  # file path or server URL
    namespace: str = ""  # Postgres table or Redis prefix, unique to the test

    def open(self) -> Store:
        if self.kind == "memory":
            return MemoryStore()
        if self.kind == "sqlite":
            return SQLiteStore(self.target)
        if self.kind == "postgres":
            from gorch.stores.postgres import PostgresStore

            return PostgresStore(self.target, table=self.namespace)
        from gorch.stores.redis import RedisStore

        return RedisStore(self.target, prefix=self.namespace)


def _drop(spec: StoreSpec) -> None:
    """Remove everything a test wrote to a shared server."""
    if spec.kind == "postgres":
        import psycopg
        from psycopg import sql

        with psycopg.connect(spec.target, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(spec.namespace)))
    elif spec.kind == "redis":
        import redis

        client = redis.Redis.from_url(spec.target)
        keys = list(client.scan_iter(match=f"{spec.namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def make_spec(kind: str, tmp_path: Path) -> Iterator[StoreSpec]:
    """A fresh, isolated store of ``kind``; cleaned up after the test."""
    token = uuid.uuid4().hex[:12]
    if kind == "memory":
        yield StoreSpec("memory", "")
        return
    if kind == "sqlite":
        yield StoreSpec("sqlite", str(tmp_path / "gorch.db"))
        return
    require_server(kind)
    if kind == "postgres":
        spec = StoreSpec("postgres", PG_DSN, f"gorch_test_{token}")
    else:
        spec = StoreSpec("redis", REDIS_URL, f"gorch-test-{token}")
    try:
        yield spec
    finally:
        _drop(spec)
