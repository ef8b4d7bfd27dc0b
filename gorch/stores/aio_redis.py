"""Redis for asyncio: ``redis.asyncio`` running the sync store's Lua scripts on its keys.

Every write is one of :mod:`gorch.stores.redis`'s scripts, imported from it, so
atomicity is the server's and a sync and an async store under one prefix are
the same store. Faults follow the sync store too: reads and ``remember`` (made
idempotent by a token) are tried once more when the connection drops; other
writes are not, since a re-sent compare-and-swap that did land the first time
would report a false ``Conflict``, so ``StoreUnavailable`` says the outcome is
unknown. The client's pool grows a connection per concurrent call, up to
``max_connections`` when the URL sets it. A client belongs to one event loop.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar, cast

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.typing import EncodableT

from gorch.errors import Conflict, StoreUnavailable, WorkflowExists, WorkflowNotFound
from gorch.stores._common import (
    check_limit,
    matches,
    opt_utc,
    page_cursor,
    redact_url,
    scrub,
    to_micros,
    to_utc,
)
from gorch.stores.base import AsyncStore, Page, Record
from gorch.stores.redis import (
    _CLAIM,
    _CREATE,
    _DELETE,
    _LOST,
    _REMEMBER,
    _SAVE,
    _is_fault,
    _now_micros,
    _record,
    _score,
)

_T = TypeVar("_T")


class AsyncRedisStore(AsyncStore):
    """An :class:`AsyncStore` in Redis under ``prefix`` (default ``gorch``), the keys
    :class:`~gorch.stores.redis.RedisStore` uses."""

    def __init__(
        self,
        url: str,
        prefix: str = "gorch",
        *,
        connect_timeout: float = 10.0,
        socket_timeout: float = 30.0,
    ) -> None:
        """``url`` is a redis-py URL (``redis://``, ``rediss://``); its options win over ours."""
        if not prefix:
            raise ValueError("prefix must not be empty")
        self._url = url
        self.url = redact_url(url)
        self.prefix = prefix
        self._client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._create = self._client.register_script(_CREATE)
        self._save = self._client.register_script(_SAVE)
        self._delete = self._client.register_script(_DELETE)
        self._claim = self._client.register_script(_CLAIM)
        self._remember = self._client.register_script(_REMEMBER)
        self._wake = f"{prefix}:wake"
        self._all = f"{prefix}:idx:all"

    # -- keys and errors (the layout of gorch.stores.redis) -----------------------------

    def _rec(self, id: str) -> str:
        return f"{self.prefix}:rec:{id}"

    def _index(self, workflow: str | None, status: str | None) -> str:
        if workflow is not None and status is not None:
            return f"{self.prefix}:idx:ws:{len(workflow.encode())}:{workflow}:{status}"
        if workflow is not None:
            return f"{self.prefix}:idx:wf:{workflow}"
        if status is not None:
            return f"{self.prefix}:idx:st:{status}"
        return self._all

    async def _call(self, fn: Callable[[], Awaitable[_T]], *, retry: bool = False) -> _T:
        """Await ``fn()``, turning driver faults into ``StoreUnavailable`` (see the sync store)."""
        for attempt in (1, 2):
            try:
                return await fn()
            except RedisError as exc:
                if not _is_fault(exc):
                    raise
                if retry and attempt == 1 and isinstance(exc, _LOST):
                    continue
                self._fail(exc, retry)
        raise AssertionError("unreachable")

    def _fail(self, exc: RedisError, read: bool) -> NoReturn:
        message = scrub(" ".join(str(exc).split()), self._url)
        if not isinstance(exc, _LOST):
            context = "; nothing was written"  # the server refused the command
        elif read:
            context = ""
        else:
            context = "; a write in flight may or may not have been applied"
        raise StoreUnavailable(
            f"Redis store {self.url} is unavailable: {type(exc).__name__}: {message}{context}"
        ) from exc

    # -- the protocol -----------------------------------------------------------------

    async def create(
        self, id: str, workflow: str, status: str, blob: bytes, wake_at: datetime | None
    ) -> Record:
        wake = opt_utc(wake_at)
        wake_us = "" if wake is None else str(to_micros(wake))
        score = "" if wake is None else _score(to_micros(wake))
        keys = [
            self._rec(id),
            self._wake,
            self._all,
            self._index(workflow, None),
            self._index(None, status),
            self._index(workflow, status),
        ]
        args: builtins.list[EncodableT] = [
            self.prefix,
            id,
            workflow,
            status,
            blob,
            wake_us,
            score,
            _now_micros(),
        ]
        if not await self._call(lambda: self._create(keys=keys, args=args)):
            raise WorkflowExists(id)
        return Record(id, workflow, status, bytes(blob), 1, wake)

    async def load(self, id: str) -> Record:
        async def fetch() -> dict[bytes, bytes]:
            return await cast(Awaitable[dict[bytes, bytes]], self._client.hgetall(self._rec(id)))

        fields = await self._call(fetch, retry=True)
        if not fields:
            raise WorkflowNotFound(id)
        return _record(id, fields)

    async def save(
        self,
        id: str,
        expected_version: int,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
    ) -> Record:
        wake = opt_utc(wake_at)
        wake_us = "" if wake is None else str(to_micros(wake))
        score = "" if wake is None else _score(to_micros(wake))
        args: builtins.list[EncodableT] = [
            self.prefix,
            id,
            expected_version,
            status,
            blob,
            wake_us,
            score,
            _now_micros(),
        ]
        keys = [self._rec(id), self._wake]
        result = cast(
            builtins.list[Any], await self._call(lambda: self._save(keys=keys, args=args))
        )
        if result[0] == 0:
            raise Conflict(id, expected_version, int(result[1]) if len(result) > 1 else None)
        return Record(id, result[2].decode(), status, bytes(blob), int(result[1]), wake)

    async def delete(self, id: str) -> None:
        keys = [self._rec(id), self._wake, self._all]
        if not await self._call(lambda: self._delete(keys=keys, args=[self.prefix, id])):
            raise WorkflowNotFound(id)

    async def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        check_limit(limit)
        low = b"-" if after is None else b"(" + after.encode()
        index = self._index(workflow, status)

        async def fetch() -> tuple[builtins.list[bytes], builtins.list[dict[bytes, bytes]]]:
            raw = cast(
                builtins.list[bytes],
                await self._client.zrangebylex(index, low, b"+", start=0, num=limit + 1),
            )
            if not raw:
                return raw, []
            async with self._client.pipeline(transaction=True) as pipe:
                for id in raw[:limit]:
                    pipe.hgetall(self._rec(id.decode()))
                hashes = await pipe.execute()
            return raw, cast(builtins.list[dict[bytes, bytes]], hashes)

        raw, hashes = await self._call(fetch, retry=True)
        ids = [i.decode() for i in raw]
        # A record may change between the two round trips: re-check it still belongs here.
        records = [
            record
            for id, fields in zip(ids, hashes, strict=False)
            if fields and matches(record := _record(id, fields), workflow, status)
        ]
        return Page(records, page_cursor(ids, limit))

    async def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        if limit < 1:
            return []
        now = to_utc(now)
        until = now + lease
        until_us = to_micros(until)
        args: builtins.list[EncodableT] = [
            self.prefix,
            _score(to_micros(now)),
            limit,
            str(until_us),
            _score(until_us),
            _now_micros(),
        ]
        rows = cast(
            builtins.list[builtins.list[Any]],
            await self._call(lambda: self._claim(keys=[self._wake], args=args)),
        )
        return [
            Record(id.decode(), wf.decode(), st.decode(), bytes(blob), int(version), until)
            for id, wf, st, blob, version in rows
        ]

    async def remember(self, key: str, until: datetime) -> bool:
        until_ms = max(1, -(-to_micros(until) // 1000))  # rounded up: never expire early
        args: builtins.list[EncodableT] = [uuid.uuid4().hex, until_ms]
        keys = [f"{self.prefix}:seen:{key}"]
        return bool(await self._call(lambda: self._remember(keys=keys, args=args), retry=True))

    async def close(self) -> None:
        """Release the client's connection pool."""
        await self._client.aclose()
