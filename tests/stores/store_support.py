"""What the store tests share: the servers, and how to open one isolated store of each kind.

PostgreSQL and Redis are the real thing (``GORCH_PG_DSN``, ``GORCH_REDIS_URL``).
A missing server skips its tests on a developer's machine, but fails the run
when ``CI`` or ``GORCH_REQUIRE_SERVICES`` is set: CI must never go green by
skipping the backends it is meant to check.

Every kind also comes as its async store (``StoreSpec.aio``): ``open()`` then
gives :class:`SyncOverAsync`, the async store driven by a private event loop,
so one set of contract tests checks both.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextvars
import functools
import os
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gorch.stores import (
    AsyncMemoryStore,
    AsyncSQLiteStore,
    AsyncStore,
    MemoryStore,
    Page,
    Record,
    SQLiteStore,
    Store,
)
from gorch.stores.base import HistoryLog, NewRecord

PG_DSN = os.environ.get("GORCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GORCH_REDIS_URL", "redis://127.0.0.1:6379/15")

ALL_KINDS = ["memory", "sqlite", "postgres", "redis"]
SHARED_KINDS = ["sqlite", "postgres", "redis"]  # stores that several processes can share


def variants(kinds: list[str]) -> list[Any]:
    """``(kind, aio)`` params: each kind as its sync store, then as its async one."""
    return [
        pytest.param((kind, aio), id=f"{kind}-async" if aio else kind)
        for kind in kinds
        for aio in (False, True)
    ]


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
    aio: bool = False  # open() drives the async store through SyncOverAsync

    def open(self) -> Store:
        if self.aio:
            return SyncOverAsync(self.open_async())
        return self.open_sync()

    def open_sync(self) -> Store:
        if self.kind == "memory":
            return MemoryStore()
        if self.kind == "sqlite":
            return SQLiteStore(self.target)
        if self.kind == "postgres":
            from gorch.stores.postgres import PostgresStore

            return PostgresStore(self.target, table=self.namespace)
        from gorch.stores.redis import RedisStore

        return RedisStore(self.target, prefix=self.namespace)

    def open_async(self) -> AsyncStore:
        """The async store over the same records as :meth:`open_sync` (memory: a new one)."""
        if self.kind == "memory":
            return AsyncMemoryStore()
        if self.kind == "sqlite":
            return AsyncSQLiteStore(self.target)
        if self.kind == "postgres":
            from gorch.stores.aio_postgres import AsyncPostgresStore

            return AsyncPostgresStore(self.target, table=self.namespace)
        from gorch.stores.aio_redis import AsyncRedisStore

        return AsyncRedisStore(self.target, prefix=self.namespace)


_T = TypeVar("_T")


class SyncOverAsync(Store):
    """An async store behind the sync ``Store`` API, run on its own event loop thread.

    Each call is a task on that one loop, so calls from several test threads
    interleave there as an async app's tasks would (sharing the store's pool).
    The caller's context variables (a test clock) go along with each call.
    """

    def __init__(self, store: AsyncStore) -> None:
        self.aio = store
        self.url = store.url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="gorch-test-loop", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _run(self, call: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        context = contextvars.copy_context()
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def start() -> None:
            task = self._loop.create_task(call(), context=context)
            task.add_done_callback(functools.partial(_settle, done))

        self._loop.call_soon_threadsafe(start)
        return done.result()

    def create(
        self,
        id: str,
        workflow: str,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        **options: Any,
    ) -> Record:
        return self._run(lambda: self.aio.create(id, workflow, status, blob, wake_at, **options))

    def create_many(self, records: Sequence[NewRecord], **options: Any) -> builtins.list[str]:
        return self._run(lambda: self.aio.create_many(records, **options))

    def load(self, id: str) -> Record:
        return self._run(lambda: self.aio.load(id))

    def save(
        self,
        id: str,
        expected_version: int,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        **options: Any,
    ) -> Record:
        return self._run(
            lambda: self.aio.save(id, expected_version, status, blob, wake_at, **options)
        )

    def history(self, id: str) -> HistoryLog:
        return self._run(lambda: self.aio.history(id))

    def purge(self, before: datetime, statuses: Sequence[str], limit: int) -> builtins.list[str]:
        return self._run(lambda: self.aio.purge(before, statuses, limit))

    def delete(self, id: str) -> None:
        self._run(lambda: self.aio.delete(id))

    def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        return self._run(
            lambda: self.aio.list(workflow=workflow, status=status, limit=limit, after=after)
        )

    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        return self._run(lambda: self.aio.claim_due(now, limit, lease))

    def remember(self, key: str, until: datetime) -> bool:
        return self._run(lambda: self.aio.remember(key, until))

    def close(self) -> None:
        """Close the async store, then stop and join the loop (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self.aio.close)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def _settle(done: concurrent.futures.Future[_T], task: asyncio.Task[_T]) -> None:
    if task.cancelled():
        done.cancel()
    elif (exc := task.exception()) is not None:
        done.set_exception(exc)
    else:
        done.set_result(task.result())


def _drop(spec: StoreSpec) -> None:
    """Remove everything a test wrote to a shared server."""
    if spec.kind == "postgres":
        import psycopg
        from psycopg import sql

        with psycopg.connect(spec.target, autocommit=True) as conn:
            for table in (spec.namespace, f"{spec.namespace}_seen"):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
    elif spec.kind == "redis":
        import redis

        client = redis.Redis.from_url(spec.target)
        keys = list(client.scan_iter(match=f"{spec.namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def make_spec(kind: str, tmp_path: Path, *, aio: bool = False) -> Iterator[StoreSpec]:
    """A fresh, isolated store of ``kind`` (``aio``: opened as its async store);
    cleaned up after the test."""
    token = uuid.uuid4().hex[:12]
    if kind == "memory":
        yield StoreSpec("memory", "", aio=aio)
        return
    if kind == "sqlite":
        yield StoreSpec("sqlite", str(tmp_path / "gorch.db"), aio=aio)
        return
    require_server(kind)
    if kind == "postgres":
        spec = StoreSpec("postgres", PG_DSN, f"gorch_test_{token}", aio=aio)
    else:
        spec = StoreSpec("redis", REDIS_URL, f"gorch-test-{token}", aio=aio)
    try:
        yield spec
    finally:
        _drop(spec)
