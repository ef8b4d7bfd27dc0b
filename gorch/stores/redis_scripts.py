"""Redis's side of the store, written once for the sync and the async connector.

Nothing here does I/O. :class:`RedisScripts` names the keys of one prefix (the
layout is in :mod:`gorch.stores.redis`), holds the Lua scripts that make every
write atomic, and describes each store operation as an
:class:`~gorch.stores._ops.Op`: a generator of requests (a :class:`Script`, a :class:`Command`, a
:class:`Transaction`; each one's reply is sent back in) that builds the
arguments, maps replies to records and raises the protocol's errors. It also
holds the rule that decides, after a driver error, whether to try again or what
to report (:meth:`RedisScripts.settle`). :class:`~gorch.stores.redis.RedisStore`
and :class:`~gorch.stores.aio_redis.AsyncRedisStore` are the connectors: they
send the requests, blocking or awaited, through their own client.
"""

from __future__ import annotations

import builtins
import json
import time
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeAlias, TypeVar

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
from redis.typing import EncodableT

from gorch.errors import Conflict, StoreUnavailable, WorkflowExists, WorkflowNotFound
from gorch.stores._common import (
    check_history_limit,
    check_limit,
    check_purge,
    from_micros,
    matches,
    opt_utc,
    page_cursor,
    redact_url,
    scrub,
    to_micros,
    to_utc,
)
from gorch.stores._ops import Op
from gorch.stores.base import HistoryLog, NewRecord, Page, Record

T = TypeVar("T")

KEYS_LUA = """
local p = ARGV[1]
local function st_key(s) return p .. ':idx:st:' .. s end
local function ws_key(w, s) return p .. ':idx:ws:' .. string.len(w) .. ':' .. w .. ':' .. s end
local function wf_key(w) return p .. ':idx:wf:' .. w end
local function upd_key(s) return p .. ':upd:' .. s end
local function hist_key(id) return p .. ':hist:' .. id end
-- Append ARGV[first..] to the history list, keep the newest `limit`, count the rest.
local function append_history(rec, hist, first, limit)
  if #ARGV < first then return end
  redis.call('RPUSH', hist, unpack(ARGV, first))
  local n = redis.call('LLEN', hist)
  if n > limit then
    redis.call('LTRIM', hist, n - limit, -1)
    redis.call('HINCRBY', rec, 'history_dropped', n - limit)
  end
end
-- Remove record `id` (of workflow `w`, in status `s`) and every index entry of it.
local function drop(id, w, s)
  redis.call('DEL', p .. ':rec:' .. id, hist_key(id))
  redis.call('ZREM', p .. ':wake', id)
  redis.call('ZREM', p .. ':idx:all', id)
  redis.call('ZREM', wf_key(w), id)
  redis.call('ZREM', st_key(s), id)
  redis.call('ZREM', ws_key(w, s), id)
  redis.call('ZREM', upd_key(s), id)
end
"""

# KEYS: rec wake all wf st ws hist; ARGV: prefix id workflow status blob wake_us score
# updated_us updated_score limit cursors entries...
CREATE = (
    KEYS_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'workflow', ARGV[3], 'status', ARGV[4], 'blob', ARGV[5],
           'version', 1, 'wake_at', ARGV[6], 'updated_at', ARGV[8], 'created_at', ARGV[8],
           'cursors', ARGV[11], 'history_dropped', 0)
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[2], ARGV[7], ARGV[2]) end
for i = 3, 6 do redis.call('ZADD', KEYS[i], 0, ARGV[2]) end
redis.call('ZADD', upd_key(ARGV[4]), ARGV[9], ARGV[2])
redis.call('DEL', KEYS[7])
append_history(KEYS[1], KEYS[7], 12, tonumber(ARGV[10]))
return 1
"""
)

# ARGV: prefix updated_us updated_score limit count, then per record: id workflow status
# blob wake_us wake_score cursors nhist entries... All or nothing: the ids already taken,
# or an empty list once every record is created.
CREATE_MANY = (
    KEYS_LUA
    + """
local n = tonumber(ARGV[5])
local starts = {}
local taken = {}
local i = 6
for r = 1, n do
  starts[r] = i
  if redis.call('EXISTS', p .. ':rec:' .. ARGV[i]) == 1 then taken[#taken + 1] = ARGV[i] end
  i = i + 8 + tonumber(ARGV[i + 7])
end
if #taken > 0 then return taken end
local limit = tonumber(ARGV[4])
for r = 1, n do
  local j = starts[r]
  local id, w, s = ARGV[j], ARGV[j + 1], ARGV[j + 2]
  local key = p .. ':rec:' .. id
  local nh = tonumber(ARGV[j + 7])
  local dropped = 0
  if nh > limit then dropped = nh - limit end
  redis.call('HSET', key, 'workflow', w, 'status', s, 'blob', ARGV[j + 3], 'version', 1,
             'wake_at', ARGV[j + 4], 'updated_at', ARGV[2], 'created_at', ARGV[2],
             'cursors', ARGV[j + 6], 'history_dropped', dropped)
  if ARGV[j + 4] ~= '' then redis.call('ZADD', p .. ':wake', ARGV[j + 5], id) end
  redis.call('ZADD', p .. ':idx:all', 0, id)
  redis.call('ZADD', wf_key(w), 0, id)
  redis.call('ZADD', st_key(s), 0, id)
  redis.call('ZADD', ws_key(w, s), 0, id)
  redis.call('ZADD', upd_key(s), ARGV[3], id)
  redis.call('DEL', hist_key(id))
  if nh > dropped then
    redis.call('RPUSH', hist_key(id), unpack(ARGV, j + 8 + dropped, j + 7 + nh))
  end
end
return {}
"""
)

# KEYS: rec wake hist; ARGV: prefix id expected status blob wake_us score updated_us
# updated_score limit cursors entries...
SAVE = (
    KEYS_LUA
    + """
local current = redis.call('HGET', KEYS[1], 'version')
if not current then return {0} end
if tonumber(current) ~= tonumber(ARGV[3]) then return {0, tonumber(current)} end
local wf = redis.call('HGET', KEYS[1], 'workflow')
local old = redis.call('HGET', KEYS[1], 'status')
if old ~= ARGV[4] then
  redis.call('ZREM', st_key(old), ARGV[2])
  redis.call('ZREM', ws_key(wf, old), ARGV[2])
  redis.call('ZREM', upd_key(old), ARGV[2])
  redis.call('ZADD', st_key(ARGV[4]), 0, ARGV[2])
  redis.call('ZADD', ws_key(wf, ARGV[4]), 0, ARGV[2])
end
redis.call('ZADD', upd_key(ARGV[4]), ARGV[9], ARGV[2])
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'blob', ARGV[5], 'wake_at', ARGV[6],
           'updated_at', ARGV[8], 'cursors', ARGV[11])
if ARGV[6] == '' then
  redis.call('ZREM', KEYS[2], ARGV[2])
else
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[2])
end
append_history(KEYS[1], KEYS[3], 12, tonumber(ARGV[10]))
return {1, version, wf}
"""
)

# KEYS: rec; ARGV: prefix id
DELETE = (
    KEYS_LUA
    + """
local f = redis.call('HMGET', KEYS[1], 'workflow', 'status')
if not f[1] then return 0 end
drop(ARGV[2], f[1], f[2])
return 1
"""
)

# ARGV: prefix before_us before_score limit statuses...
# Candidates come from each status's index by update time; each is deleted only if
# its hash still says that status and an older update (the index may lag a claim).
PURGE = (
    KEYS_LUA
    + """
local out = {}
local left = tonumber(ARGV[4])
for i = 5, #ARGV do
  if left <= 0 then break end
  local s = ARGV[i]
  local ids = redis.call('ZRANGEBYSCORE', upd_key(s), '-inf', '(' .. ARGV[3], 'LIMIT', 0, left)
  for _, id in ipairs(ids) do
    local f = redis.call('HMGET', p .. ':rec:' .. id, 'workflow', 'status', 'updated_at')
    if not f[1] or f[2] ~= s then
      redis.call('ZREM', upd_key(s), id)
    elseif tonumber(f[3]) < tonumber(ARGV[2]) then
      drop(id, f[1], s)
      out[#out + 1] = id
      left = left - 1
    end
  end
end
return out
"""
)

# ARGV: prefix id... Puts each record in the purge index of its status (if not there yet),
# scored by its updated_at: records saved before that index existed become purgeable.
BACKFILL = (
    KEYS_LUA
    + """
local added = 0
for i = 2, #ARGV do
  local f = redis.call('HMGET', p .. ':rec:' .. ARGV[i], 'status', 'updated_at')
  if f[1] then
    local at = tonumber(f[2]) or 0
    added = added + redis.call('ZADD', upd_key(f[1]), 'NX', at / 1000000, ARGV[i])
  end
end
return added
"""
)

# KEYS: wake; ARGV: prefix now_score limit until_us until_score updated_us updated_score
CLAIM = (
    KEYS_LUA
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  local key = p .. ':rec:' .. id
  if redis.call('EXISTS', key) == 1 then
    local version = redis.call('HINCRBY', key, 'version', 1)
    redis.call('HSET', key, 'wake_at', ARGV[4], 'updated_at', ARGV[6])
    redis.call('ZADD', KEYS[1], ARGV[5], id)
    local f = redis.call('HMGET', key, 'workflow', 'status', 'blob')
    redis.call('ZADD', upd_key(f[2]), ARGV[7], id)
    out[#out + 1] = {id, f[1], f[2], f[3], version}
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""
)


# KEYS: seen; ARGV: token until_ms. True if taken now, or earlier by this very token (a retry).
REMEMBER = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PXAT', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""

LOST = (RedisConnectionError, RedisTimeoutError)
"""The connection was refused, dropped or timed out (includes a failed AUTH, LOADING)."""
SERVER_FAULTS = (
    OutOfMemoryError,
    ReadOnlyError,
    NoPermissionError,
    MasterDownError,
    TryAgainError,
    ClusterDownError,
)
"""Replies that mean the server cannot serve the store now: full (maxmemory), a replica
after a failover, an ACL that forbids the commands."""
FAULT_PREFIXES = ("MISCONF", "BUSY", "NOREPLICAS", "MASTERDOWN")  # refused, nothing applied


def is_fault(exc: RedisError) -> bool:
    """Whether a driver error means the store is unusable now, rather than a bug of ours."""
    if isinstance(exc, LOST + SERVER_FAULTS):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(FAULT_PREFIXES)


def pool_exhausted(exc: RedisError) -> bool:
    """Whether redis-py's ``BlockingConnectionPool`` gave up waiting for a free connection
    (raised before anything is sent: nothing was written)."""
    return isinstance(exc, RedisConnectionError) and str(exc) == "No connection available."


def score(micros: int) -> str:
    """Epoch seconds as Redis parses them back to the same double (repr round-trips)."""
    return repr(micros / 1_000_000)


def _stamp() -> tuple[str, str]:
    """``updated_at`` as the scripts take it: exact microseconds, and the score to order by."""
    micros = time.time_ns() // 1000
    return str(micros), score(micros)


SCRIPTS = {
    "create": CREATE,
    "create_many": CREATE_MANY,
    "save": SAVE,
    "delete": DELETE,
    "claim": CLAIM,
    "remember": REMEMBER,
    "purge": PURGE,
    "backfill": BACKFILL,
}
"""Every script by name; a connector registers each once with its client."""


@dataclass(frozen=True, slots=True)
class Script:
    """Run the script :data:`SCRIPTS` names ``name`` (atomic on the server)."""

    name: str
    keys: builtins.list[str]
    args: builtins.list[EncodableT]


@dataclass(frozen=True, slots=True)
class Command:
    """One command, e.g. ``("HGETALL", key)``; its reply parsed as redis-py parses it."""

    args: tuple[EncodableT, ...]


@dataclass(frozen=True, slots=True)
class Transaction:
    """Commands sent together in MULTI/EXEC, in one round trip; their replies as a list."""

    commands: builtins.list[tuple[EncodableT, ...]]


Request: TypeAlias = Script | Command | Transaction
Steps: TypeAlias = Generator[Request, Any, T]
"""An operation's requests in order; each one's reply is sent back in."""


def record(id: str, fields: dict[bytes, bytes]) -> Record:
    """The record of the hash of ``id``."""
    wake = fields.get(b"wake_at", b"")
    return Record(
        id,
        fields[b"workflow"].decode(),
        fields[b"status"].decode(),
        fields[b"blob"],
        int(fields[b"version"]),
        from_micros(int(wake)) if wake else None,
    )


def _wake_args(wake: datetime | None) -> tuple[str, str]:
    """``wake_at`` as the scripts take it: exact microseconds, and the score to order by."""
    if wake is None:
        return "", ""
    micros = to_micros(wake)
    return str(micros), score(micros)


class RedisScripts:
    """The keys of one store under ``prefix``, the requests of its operations, and the
    rules around them. ``url`` is kept only to scrub its password from driver errors."""

    def __init__(self, url: str, prefix: str) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty")
        self._url = url
        self.url = redact_url(url)
        self.prefix = prefix
        self.wake = f"{prefix}:wake"
        self.all = f"{prefix}:idx:all"

    # -- keys and faults -----------------------------------------------------------

    def rec(self, id: str) -> str:
        """The hash of record ``id``."""
        return f"{self.prefix}:rec:{id}"

    def index(self, workflow: str | None, status: str | None) -> str:
        """The id set that holds exactly the records passing these filters."""
        if workflow is not None and status is not None:
            return f"{self.prefix}:idx:ws:{len(workflow.encode())}:{workflow}:{status}"
        if workflow is not None:
            return f"{self.prefix}:idx:wf:{workflow}"
        if status is not None:
            return f"{self.prefix}:idx:st:{status}"
        return self.all

    def hist(self, id: str) -> str:
        """The list of record ``id``'s history entries."""
        return f"{self.prefix}:hist:{id}"

    def seen(self, key: str) -> str:
        """Where :meth:`remember` records ``key``."""
        return f"{self.prefix}:seen:{key}"

    def unavailable(self, exc: RedisError, read: bool) -> StoreUnavailable:
        """The error a fault is reported as: the safe URL, the driver's reason, what it means
        (``read``: nothing in flight could have changed the store)."""
        message = scrub(" ".join(str(exc).split()), self._url)
        if not isinstance(exc, LOST):
            context = "; nothing was written"  # the server refused the command
        elif read:
            context = ""
        else:
            context = "; a write in flight may or may not have been applied"
        return StoreUnavailable(
            f"Redis store {self.url} is unavailable: {type(exc).__name__}: {message}{context}"
        )

    def settle(
        self, exc: RedisError, op: Op[Any], *, last: bool, pool: tuple[int, float] | None = None
    ) -> None:
        """After an attempt at ``op`` ended in ``exc``: return to try once more, or raise.

        Only an operation safe to repeat (a read, an idempotent write) is tried
        again, once, when the connection dropped (a new one replaces it). Once a
        write is sent, a dropped connection cannot tell whether it ran, and a
        re-sent compare-and-swap whose first attempt did land would report a
        false ``Conflict``: ``StoreUnavailable`` says the outcome is unknown, and
        the caller settles it by reading back.
        An error that is no fault (a bug of ours) is raised as it is.
        """
        if pool is not None and pool_exhausted(exc):
            pool_max, pool_timeout = pool
            message = scrub(" ".join(str(exc).split()), self._url)
            raise StoreUnavailable(
                f"Redis store {self.url} is unavailable: {message} (all {pool_max} pooled"
                f" connections stayed busy for {pool_timeout:g} s; raise pool_max or"
                " pool_timeout in the URL); nothing was written"
            ) from exc
        if not is_fault(exc):
            raise exc
        repeatable = not op.write or op.idempotent
        if repeatable and not last and isinstance(exc, LOST):
            return
        raise self.unavailable(exc, repeatable) from exc

    # -- the operations ----------------------------------------------------------------

    def create(
        self,
        id: str,
        workflow: str,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        history: Sequence[str],
        history_limit: int,
        cursors: Sequence[str],
    ) -> Op[Record]:
        check_history_limit(history_limit)
        wake = opt_utc(wake_at)
        wake_us, wake_score = _wake_args(wake)
        keys = [
            self.rec(id),
            self.wake,
            self.all,
            self.index(workflow, None),
            self.index(None, status),
            self.index(workflow, status),
            self.hist(id),
        ]
        args: builtins.list[EncodableT] = [
            self.prefix,
            id,
            workflow,
            status,
            blob,
            wake_us,
            wake_score,
            *_stamp(),
            history_limit,
            json.dumps(list(cursors)),
            *history,
        ]

        def steps() -> Steps[Record]:
            if not (yield Script("create", keys, args)):
                raise WorkflowExists(id)
            return Record(id, workflow, status, bytes(blob), 1, wake)

        return Op(steps)

    def create_many(
        self, records: Sequence[NewRecord], history_limit: int
    ) -> Op[builtins.list[str]]:
        check_history_limit(history_limit)
        args: builtins.list[EncodableT] = [self.prefix, *_stamp(), history_limit, len(records)]
        for r in records:
            args.extend(
                (
                    r.id,
                    r.workflow,
                    r.status,
                    r.blob,
                    *_wake_args(opt_utc(r.wake_at)),
                    json.dumps(list(r.cursors)),
                    len(r.history),
                    *r.history,
                )
            )

        def steps() -> Steps[builtins.list[str]]:
            taken = yield Script("create_many", [], args)
            return [id.decode() for id in taken]

        return Op(steps)

    def load(self, id: str) -> Op[Record]:
        def steps() -> Steps[Record]:
            fields = yield Command(("HGETALL", self.rec(id)))
            if not fields:
                raise WorkflowNotFound(id)
            return record(id, fields)

        return Op(steps, write=False)

    def save(
        self,
        id: str,
        expected_version: int,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        history: Sequence[str],
        history_limit: int,
        cursors: Sequence[str],
    ) -> Op[Record]:
        check_history_limit(history_limit)
        wake = opt_utc(wake_at)
        wake_us, wake_score = _wake_args(wake)
        args: builtins.list[EncodableT] = [
            self.prefix,
            id,
            expected_version,
            status,
            blob,
            wake_us,
            wake_score,
            *_stamp(),
            history_limit,
            json.dumps(list(cursors)),
            *history,
        ]

        def steps() -> Steps[Record]:
            result = yield Script("save", [self.rec(id), self.wake, self.hist(id)], args)
            if result[0] == 0:
                raise Conflict(id, expected_version, int(result[1]) if len(result) > 1 else None)
            return Record(id, result[2].decode(), status, bytes(blob), int(result[1]), wake)

        return Op(steps)

    def delete(self, id: str) -> Op[None]:
        def steps() -> Steps[None]:
            if not (yield Script("delete", [self.rec(id)], [self.prefix, id])):
                raise WorkflowNotFound(id)

        return Op(steps)

    def history(self, id: str) -> Op[HistoryLog]:
        read = Transaction(
            [
                ("EXISTS", self.rec(id)),
                ("LRANGE", self.hist(id), 0, -1),
                ("HGET", self.rec(id), "history_dropped"),
            ]
        )

        def steps() -> Steps[HistoryLog]:
            exists, entries, dropped = yield read
            if not exists:
                raise WorkflowNotFound(id)
            return HistoryLog([e.decode() for e in entries], int(dropped or 0))

        return Op(steps, write=False)

    def purge(
        self, before: datetime, statuses: Sequence[str], limit: int
    ) -> Op[builtins.list[str]]:
        """Delete old records by the purge index (see :meth:`backfill_purge_index` for the
        records saved before it existed: the connector runs it before a first purge)."""
        wanted = check_purge(statuses, limit)
        before_us = to_micros(before)
        args: builtins.list[EncodableT] = [
            self.prefix,
            before_us,
            score(before_us),
            limit,
            *wanted,
        ]

        def steps() -> Steps[builtins.list[str]]:
            ids = yield Script("purge", [], args)
            return [i.decode() for i in ids]

        # Repeating it after an unknown outcome deletes only what still matches: safe.
        return Op(steps, idempotent=True)

    def list(
        self, workflow: str | None, status: str | None, limit: int, after: str | None
    ) -> Op[Page]:
        check_limit(limit)
        low = b"-" if after is None else b"(" + after.encode()
        page = ("ZRANGEBYLEX", self.index(workflow, status), low, b"+", "LIMIT", 0, limit + 1)

        def steps() -> Steps[Page]:
            ids = [i.decode() for i in (yield Command(page))]
            hashes = []
            if ids:
                hashes = yield Transaction([("HGETALL", self.rec(id)) for id in ids[:limit]])
            # A record may change between the two round trips: re-check it still belongs here.
            records = [
                rec
                for id, fields in zip(ids, hashes, strict=False)
                if fields and matches(rec := record(id, fields), workflow, status)
            ]
            return Page(records, page_cursor(ids, limit))

        return Op(steps, write=False)

    def backfill_purge_index(self) -> Op[int]:
        """Put the records saved before the purge index existed into it; how many.

        Done once per prefix (a marker key says so afterwards): ``SCAN`` over the
        record hashes, a batch at a time, each batch one script (``ZADD NX``: a
        record already indexed keeps its entry). Safe to repeat, and to run while
        the store is in use: a record saved meanwhile indexes itself.
        """
        marker = f"{self.prefix}:meta:purge_index"
        match = f"{self.prefix}:rec:*"
        start = len(self.prefix) + len(":rec:")

        def steps() -> Steps[int]:
            if (yield Command(("GET", marker))):
                return 0
            added = 0
            cursor: EncodableT = 0
            while True:
                cursor, keys = yield Command(("SCAN", cursor, "MATCH", match, "COUNT", 1000))
                ids = [k.decode()[start:] for k in keys]
                if ids:
                    added += int((yield Script("backfill", [], [self.prefix, *ids])))
                if int(cursor) == 0:
                    break
            yield Command(("SET", marker, "1"))
            return added

        return Op(steps, idempotent=True)

    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> Op[builtins.list[Record]]:
        now = to_utc(now)
        until = now + lease
        until_us = to_micros(until)
        args: builtins.list[EncodableT] = [
            self.prefix,
            score(to_micros(now)),
            limit,
            str(until_us),
            score(until_us),
            *_stamp(),
        ]

        def steps() -> Steps[builtins.list[Record]]:
            rows = yield Script("claim", [self.wake], args)
            return [
                Record(id.decode(), wf.decode(), st.decode(), bytes(blob), int(version), until)
                for id, wf, st, blob, version in rows
            ]

        return Op(steps)

    def remember(self, key: str, until: datetime) -> Op[bool]:
        until_ms = max(1, -(-to_micros(until) // 1000))  # rounded up: never expire early
        # The token tells our own earlier, applied attempt from a rival's: safe to repeat.
        args: builtins.list[EncodableT] = [uuid.uuid4().hex, until_ms]

        def steps() -> Steps[bool]:
            return bool((yield Script("remember", [self.seen(key)], args)))

        return Op(steps, idempotent=True)
