"""Redis for asyncio: ``redis.asyncio`` sending the sync store's requests on its keys.

The keys, the Lua scripts (every write is one) and the requests of each
operation are :class:`~gorch.stores.redis_scripts.RedisScripts`'s, the ones
:class:`~gorch.stores.redis.RedisStore` sends, so atomicity is the server's and
a sync and an async store under one prefix are the same store. Faults follow
the same rule (:meth:`~gorch.stores.redis_scripts.RedisScripts.settle`): reads
and ``remember`` (made idempotent by a token) are tried once more when the
connection drops; other writes are not, since a re-sent compare-and-swap that
did land the first time would report a false ``Conflict``, so
``StoreUnavailable`` says the outcome is unknown. The client's pool opens a
connection per concurrent call, up to ``pool_max`` (a call waits up to
``pool_timeout`` seconds for a free one). A client belongs to one event loop.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gorch.stores._ops import AsyncConnectorStore, Op, arun_steps
from gorch.stores._options import DEFAULT_POOL_MAX, DEFAULT_POOL_TIMEOUT, check_pool
from gorch.stores.redis_scripts import (
    SCRIPTS,
    RedisScripts,
    Request,
    Script,
    Transaction,
)

_T = TypeVar("_T")


class AsyncRedisStore(AsyncConnectorStore):
    """An :class:`AsyncStore` in Redis under ``prefix`` (default ``gorch``), the keys
    :class:`~gorch.stores.redis.RedisStore` uses."""

    def __init__(
        self,
        url: str,
        prefix: str = "gorch",
        *,
        connect_timeout: float = 10.0,
        socket_timeout: float = 30.0,
        pool_max: int = DEFAULT_POOL_MAX,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
    ) -> None:
        """``url`` is a redis-py URL (``redis://``, ``rediss://``); its options win over ours;
        the pool options are :class:`~gorch.stores.redis.RedisStore`'s."""
        check_pool(0, pool_max, pool_timeout)
        self._ops: RedisScripts = RedisScripts(url, prefix)
        self.url = self._ops.url
        self.prefix = prefix
        self.pool_max, self.pool_timeout = pool_max, pool_timeout
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_max,
            timeout=pool_timeout,
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._client: redis.asyncio.Redis = redis.asyncio.Redis(connection_pool=pool)
        self._scripts = {name: self._client.register_script(lua) for name, lua in SCRIPTS.items()}
        self._backfilled = False

    async def _run(self, op: Op[_T]) -> _T:
        """Run ``op``; a fault is retried or reported as :meth:`RedisScripts.settle` says."""
        for attempt in (1, 2):
            try:
                return await arun_steps(op.steps(), self._send)
            except RedisError as exc:
                self._ops.settle(
                    exc, op, last=attempt == 2, pool=(self.pool_max, self.pool_timeout)
                )
        raise AssertionError("unreachable")

    async def _send(self, request: Request) -> Any:
        if isinstance(request, Script):
            return await self._scripts[request.name](keys=request.keys, args=request.args)
        if isinstance(request, Transaction):
            async with self._client.pipeline(transaction=True) as pipe:
                for command in request.commands:
                    pipe.execute_command(*command)
                return await pipe.execute()
        # a Command
        return await self._client.execute_command(*request.args)  # type: ignore[no-untyped-call]

    async def purge(
        self, before: datetime, statuses: Sequence[str], limit: int
    ) -> builtins.list[str]:
        if not self._backfilled:  # records of an older gorch join the purge index first
            await self.migrate()
        return await super().purge(before, statuses, limit)

    async def migrate(self) -> int:
        """Bring the keys up to date: index the records saved before the purge index
        existed (once per prefix; a marker key remembers it); how many were added."""
        added = await self._run(self._ops.backfill_purge_index())
        self._backfilled = True
        return added

    async def close(self) -> None:
        """Release the client's connection pool."""
        await self._client.aclose(close_connection_pool=True)
