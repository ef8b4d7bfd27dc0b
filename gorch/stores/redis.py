"""Redis (redis-py): records in hashes, wake-ups in a sorted set, every write a Lua script.

A Lua script runs atomically on the server, so compare-and-swap (check the
version, write, bump it) and a claim (take the earliest due ids, push their
wake-up past the lease, bump their versions) each happen as one step that no
other client can interleave with, whichever machine it runs on.

Keys, all under ``prefix``::

    {prefix}:rec:{id}                       hash: workflow status blob version wake_at updated_at
                                            created_at cursors (JSON) history_dropped
    {prefix}:hist:{id}                      list: the history log, oldest first (JSON each)
    {prefix}:upd:{status}                   sorted set: ids in a status by updated_at (for purge)
    {prefix}:wake                           sorted set: id scored by wake_at (epoch seconds)
    {prefix}:idx:all                        sorted set of every id, all scored 0 (lexicographic)
    {prefix}:idx:wf:{workflow}              ... of the ids of one workflow
    {prefix}:idx:st:{status}                ... of the ids in one status
    {prefix}:idx:ws:{len}:{workflow}:{status}  ... of both (len: workflow's UTF-8 byte length)

Remembered keys are ``{prefix}:seen:{key}``, expired by Redis itself (``PXAT``,
by the server's clock).

The id sets let ``list`` page through any filter with ``ZRANGEBYLEX`` instead
of scanning. ``wake_at`` is kept exactly (integer microseconds) in the hash;
the score is only for ordering. Scripts derive some key names from data, so
the store needs a standalone Redis (or a cluster with a ``{hash-tag}`` prefix).

The keys, the scripts and the requests of each operation are
:class:`~gorch.stores.redis_scripts.RedisScripts`'s; this module only sends them.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from gorch.stores._ops import ConnectorStore, Op, run_steps
from gorch.stores._options import DEFAULT_POOL_MAX, DEFAULT_POOL_TIMEOUT, check_pool
from gorch.stores.redis_scripts import (
    SCRIPTS,
    RedisScripts,
    Request,
    Script,
    Transaction,
)

_T = TypeVar("_T")


class RedisStore(ConnectorStore):
    """A store in Redis under ``prefix`` (default ``gorch``).

    redis-py's client is thread-safe and re-opens its connections after a
    ``fork``; a pooled connection that died while idle is replaced before use,
    and the pool is bounded (``pool_max``).
    Reads (and ``remember``, made idempotent by a token) are tried once more when
    the connection drops. Writes are not: once a command is sent, a dropped
    connection cannot tell whether it ran, and a re-sent compare-and-swap whose
    first attempt did land would report a false ``Conflict``; ``StoreUnavailable``
    says the outcome is unknown, and the caller settles it by reading back.
    """

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
        """``url`` is a redis-py URL (``redis://``, ``rediss://``); its options win over ours.

        At most ``pool_max`` connections are open at once (redis-py's
        ``BlockingConnectionPool``, shared by every thread); a call waits up to
        ``pool_timeout`` seconds for a free one.
        """
        check_pool(0, pool_max, pool_timeout)
        self._ops: RedisScripts = RedisScripts(url, prefix)
        self.url = self._ops.url
        self.prefix = prefix
        self.pool_max, self.pool_timeout = pool_max, pool_timeout
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_max,
            timeout=pool_timeout,
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._client = redis.Redis(connection_pool=pool)
        self._client.auto_close_connection_pool = True
        self._scripts = {name: self._client.register_script(lua) for name, lua in SCRIPTS.items()}
        self._backfilled = False

    def _run(self, op: Op[_T]) -> _T:
        """Run ``op``; a fault is retried or reported as :meth:`RedisScripts.settle` says."""
        for attempt in (1, 2):
            try:
                return run_steps(op.steps(), self._send)
            except RedisError as exc:
                self._ops.settle(exc, op, last=attempt == 2, pool=self._pool_info())
        raise AssertionError("unreachable")

    def _pool_info(self) -> tuple[int, float]:
        return self.pool_max, self.pool_timeout

    def _send(self, request: Request) -> Any:
        if isinstance(request, Script):
            return self._scripts[request.name](keys=request.keys, args=request.args)
        if isinstance(request, Transaction):
            pipe = self._client.pipeline(transaction=True)
            for command in request.commands:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            return pipe.execute()
        # a Command
        return self._client.execute_command(*request.args)  # type: ignore[no-untyped-call]

    def purge(self, before: datetime, statuses: Sequence[str], limit: int) -> builtins.list[str]:
        if not self._backfilled:  # records of an older gorch join the purge index first
            self.migrate()
        return super().purge(before, statuses, limit)

    def migrate(self) -> int:
        """Bring the keys up to date: index the records saved before the purge index
        existed (once per prefix; a marker key remembers it); how many were added."""
        added = self._run(self._ops.backfill_purge_index())
        self._backfilled = True
        return added

    def close(self) -> None:
        """Release the client's connection pool."""
        self._client.close()
