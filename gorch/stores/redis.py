"""Redis (redis-py): records in hashes, wake-ups in a sorted set, every write a Lua script.

A Lua script runs atomically on the server, so compare-and-swap (check the
version, write, bump it) and a claim (take the earliest due ids, push their
wake-up past the lease, bump their versions) each happen as one step that no
other client can interleave with, whichever machine it runs on.

Keys, all under ``prefix``::

    {prefix}:rec:{id}                       hash: workflow status blob version wake_at updated_at
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
"""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.typing import EncodableT

from gorch.errors import Conflict, StoreUnavailable, WorkflowExists, WorkflowNotFound
from gorch.stores._common import (
    check_limit,
    from_micros,
    matches,
    opt_utc,
    page_cursor,
    redact_url,
    scrub,
    to_micros,
    to_utc,
)
from gorch.stores.base import Page, Record, Store

_KEYS_LUA = """
local p = ARGV[1]
local function st_key(s) return p .. ':idx:st:' .. s end
local function ws_key(w, s) return p .. ':idx:ws:' .. string.len(w) .. ':' .. w .. ':' .. s end
local function wf_key(w) return p .. ':idx:wf:' .. w end
"""

# KEYS: rec wake all wf st ws; ARGV: prefix id workflow status blob wake_us score updated_us
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'workflow', ARGV[3], 'status', ARGV[4], 'blob', ARGV[5],
           'version', 1, 'wake_at', ARGV[6], 'updated_at', ARGV[8])
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[2], ARGV[7], ARGV[2]) end
for i = 3, 6 do redis.call('ZADD', KEYS[i], 0, ARGV[2]) end
return 1
"""

# KEYS: rec wake; ARGV: prefix id expected status blob wake_us score updated_us
_SAVE = (
    _KEYS_LUA
    + """
local current = redis.call('HGET', KEYS[1], 'version')
if not current then return {0} end
if tonumber(current) ~= tonumber(ARGV[3]) then return {0, tonumber(current)} end
local wf = redis.call('HGET', KEYS[1], 'workflow')
local old = redis.call('HGET', KEYS[1], 'status')
if old ~= ARGV[4] then
  redis.call('ZREM', st_key(old), ARGV[2])
  redis.call('ZREM', ws_key(wf, old), ARGV[2])
  redis.call('ZADD', st_key(ARGV[4]), 0, ARGV[2])
  redis.call('ZADD', ws_key(wf, ARGV[4]), 0, ARGV[2])
end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'blob', ARGV[5], 'wake_at', ARGV[6],
           'updated_at', ARGV[8])
if ARGV[6] == '' then
  redis.call('ZREM', KEYS[2], ARGV[2])
else
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[2])
end
return {1, version, wf}
"""
)

# KEYS: rec wake all; ARGV: prefix id
_DELETE = (
    _KEYS_LUA
    + """
local f = redis.call('HMGET', KEYS[1], 'workflow', 'status')
if not f[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', wf_key(f[1]), ARGV[2])
redis.call('ZREM', st_key(f[2]), ARGV[2])
redis.call('ZREM', ws_key(f[1], f[2]), ARGV[2])
return 1
"""
)

# KEYS: wake; ARGV: prefix now_score limit until_us until_score updated_us
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. ':rec:' .. id
  if redis.call('EXISTS', key) == 1 then
    local version = redis.call('HINCRBY', key, 'version', 1)
    redis.call('HSET', key, 'wake_at', ARGV[4], 'updated_at', ARGV[6])
    redis.call('ZADD', KEYS[1], ARGV[5], id)
    local f = redis.call('HMGET', key, 'workflow', 'status', 'blob')
    out[#out + 1] = {id, f[1], f[2], f[3], version}
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""


# KEYS: seen; ARGV: token until_ms. True if taken now, or earlier by this very token (a retry).
_REMEMBER = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PXAT', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""

_T = TypeVar("_T")
_LOST = (RedisConnectionError, RedisTimeoutError)
"""The connection was refused, dropped or timed out (includes a failed AUTH, LOADING)."""
_SERVER_FAULTS = (
    OutOfMemoryError,
    ReadOnlyError,
    NoPermissionError,
    MasterDownError,
    TryAgainError,
    ClusterDownError,
)
"""Replies that mean the server cannot serve the store now: full (maxmemory), a replica
after a failover, an ACL that forbids the commands."""
_FAULT_PREFIXES = ("MISCONF", "BUSY", "NOREPLICAS", "MASTERDOWN")  # refused, nothing applied


def _is_fault(exc: RedisError) -> bool:
    if isinstance(exc, _LOST + _SERVER_FAULTS):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_FAULT_PREFIXES)


def _score(micros: int) -> str:
    """Epoch seconds as Redis parses them back to the same double (repr round-trips)."""
    return repr(micros / 1_000_000)


def _now_micros() -> str:
    return str(time.time_ns() // 1000)


class RedisStore(Store):
    """A store in Redis under ``prefix`` (default ``gorch``).

    redis-py's client is thread-safe and re-opens its connections after a
    ``fork``; a pooled connection that died while idle is replaced before use.
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
    ) -> None:
        """``url`` is a redis-py URL (``redis://``, ``rediss://``); its options win over ours."""
        if not prefix:
            raise ValueError("prefix must not be empty")
        self._url = url
        self.url = redact_url(url)
        self.prefix = prefix
        self._client = redis.Redis.from_url(
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

    # -- keys and errors -----------------------------------------------------------

    def _rec(self, id: str) -> str:
        return f"{self.prefix}:rec:{id}"

    def _index(self, workflow: str | None, status: str | None) -> str:
        """The id set that holds exactly the records passing these filters."""
        if workflow is not None and status is not None:
            return f"{self.prefix}:idx:ws:{len(workflow.encode())}:{workflow}:{status}"
        if workflow is not None:
            return f"{self.prefix}:idx:wf:{workflow}"
        if status is not None:
            return f"{self.prefix}:idx:st:{status}"
        return self._all

    def _call(self, fn: Callable[[], _T], *, retry: bool = False) -> _T:
        """Run ``fn``, turning driver faults into ``StoreUnavailable`` naming the safe URL.

        ``retry``: ``fn`` is safe to repeat (a read), so a dropped connection is
        replaced and ``fn`` runs once more before the error is reported.
        """
        for attempt in (1, 2):
            try:
                return fn()
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

    def create(
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
        created = self._call(lambda: self._create(keys=keys, args=args))
        if not created:
            raise WorkflowExists(id)
        return Record(id, workflow, status, bytes(blob), 1, wake)

    def load(self, id: str) -> Record:
        fields = cast(
            dict[bytes, bytes], self._call(lambda: self._client.hgetall(self._rec(id)), retry=True)
        )
        if not fields:
            raise WorkflowNotFound(id)
        return _record(id, fields)

    def save(
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
        result = cast(
            builtins.list[Any],
            self._call(lambda: self._save(keys=[self._rec(id), self._wake], args=args)),
        )
        if result[0] == 0:
            raise Conflict(id, expected_version, int(result[1]) if len(result) > 1 else None)
        return Record(id, result[2].decode(), status, bytes(blob), int(result[1]), wake)

    def delete(self, id: str) -> None:
        deleted = self._call(
            lambda: self._delete(
                keys=[self._rec(id), self._wake, self._all], args=[self.prefix, id]
            )
        )
        if not deleted:
            raise WorkflowNotFound(id)

    def list(
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

        def fetch() -> tuple[builtins.list[bytes], builtins.list[dict[bytes, bytes]]]:
            raw = cast(
                builtins.list[bytes],
                self._client.zrangebylex(index, low, b"+", start=0, num=limit + 1),
            )
            if not raw:
                return raw, []
            pipe = self._client.pipeline(transaction=True)
            for id in raw[:limit]:
                pipe.hgetall(self._rec(id.decode()))
            return raw, cast(builtins.list[dict[bytes, bytes]], pipe.execute())

        raw, hashes = self._call(fetch, retry=True)
        ids = [i.decode() for i in raw]
        # A record may change between the two round trips: re-check it still belongs here.
        records = [
            record
            for id, fields in zip(ids, hashes, strict=False)
            if fields and matches(record := _record(id, fields), workflow, status)
        ]
        return Page(records, page_cursor(ids, limit))

    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
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
            self._call(lambda: self._claim(keys=[self._wake], args=args)),
        )
        return [
            Record(id.decode(), wf.decode(), st.decode(), bytes(blob), int(version), until)
            for id, wf, st, blob, version in rows
        ]

    def remember(self, key: str, until: datetime) -> bool:
        until_ms = max(1, -(-to_micros(until) // 1000))  # rounded up: never expire early
        args: builtins.list[EncodableT] = [uuid.uuid4().hex, until_ms]
        keys = [f"{self.prefix}:seen:{key}"]
        return bool(self._call(lambda: self._remember(keys=keys, args=args), retry=True))

    def close(self) -> None:
        """Release the client's connection pool."""
        self._client.close()


def _record(id: str, fields: dict[bytes, bytes]) -> Record:
    wake = fields.get(b"wake_at", b"")
    return Record(
        id,
        fields[b"workflow"].decode(),
        fields[b"status"].decode(),
        fields[b"blob"],
        int(fields[b"version"]),
        from_micros(int(wake)) if wake else None,
    )
