"""Workflow stores: one protocol, four backends, and :func:`open_store` to pick one by URL.

Each backend has an asyncio twin (``Async...Store``, opened by :func:`open_async_store`)
over the same tables, files and keys, so sync and async code can share one store.
``PostgresStore`` and ``RedisStore`` (and their async twins) are imported on first
use, so the core works without psycopg or redis-py installed (``pip install
'gorch[postgres]'`` or ``'gorch[redis]'`` adds them).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, TypedDict
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from gorch.errors import StoreError
from gorch.stores._common import redact_url
from gorch.stores.aio_memory import AsyncMemoryStore
from gorch.stores.aio_sqlite import AsyncSQLiteStore
from gorch.stores.base import (
    DEFAULT_HISTORY_LIMIT,
    AsyncStore,
    HistoryLog,
    Page,
    Record,
    Store,
    UnsupportedByStore,
)
from gorch.stores.memory import MemoryStore
from gorch.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from gorch.stores.aio_postgres import AsyncPostgresStore
    from gorch.stores.aio_redis import AsyncRedisStore
    from gorch.stores.postgres import PostgresStore
    from gorch.stores.redis import RedisStore

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "SUPPORTED_SCHEMES",
    "AsyncMemoryStore",
    "AsyncPostgresStore",
    "AsyncRedisStore",
    "AsyncSQLiteStore",
    "AsyncStore",
    "HistoryLog",
    "MemoryStore",
    "Page",
    "PostgresStore",
    "Record",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "UnsupportedByStore",
    "UnsupportedStoreURL",
    "open_async_store",
    "open_store",
]

SUPPORTED_SCHEMES = (
    "memory://",
    "sqlite:///",
    "postgresql://",
    "postgres://",
    "redis://",
    "rediss://",
)

_LAZY = {  # class -> (module, the packages it needs, the extra that installs them)
    "PostgresStore": ("gorch.stores.postgres", ("psycopg",), "postgres"),
    "RedisStore": ("gorch.stores.redis", ("redis",), "redis"),
    "AsyncPostgresStore": ("gorch.stores.aio_postgres", ("psycopg", "psycopg_pool"), "postgres"),
    "AsyncRedisStore": ("gorch.stores.aio_redis", ("redis",), "redis"),
}


class UnsupportedStoreURL(StoreError, ValueError):
    """A store URL whose scheme (or shape) no backend understands."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        super().__init__(
            f"cannot open store {url!r}: {reason}; supported: memory://, "
            "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
            "postgresql://user@host:port/db (or postgres://), redis://host:port/db (or rediss://)"
        )


def __getattr__(name: str) -> object:
    """Import a server backend only when asked for, with a hint if its driver is missing."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(_import_backend(name), name)


def _import_backend(name: str) -> ModuleType:
    module_name, drivers, extra = _LAZY[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name not in drivers:
            raise
        raise ImportError(
            f"{name} needs the {exc.name!r} package: pip install 'gorch[{extra}]'"
        ) from exc


def _parse(url: str) -> tuple[str, str]:
    """``(kind, target)``: the backend a URL names, and what its class is opened with."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise UnsupportedStoreURL(redact_url(url), "it has no scheme")
    if scheme == "memory":
        if rest.strip("/"):
            raise UnsupportedStoreURL(redact_url(url), "memory:// takes no path")
        return "memory", ""
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise UnsupportedStoreURL(
                redact_url(url), "a SQLite URL is sqlite:/// followed by a file path"
            )
        return "sqlite", rest[1:]
    if scheme in ("postgresql", "postgres"):
        return "postgres", f"{scheme}://{rest}"  # drivers expect a lower-case scheme
    if scheme in ("redis", "rediss"):
        return "redis", f"{scheme}://{rest}"
    raise UnsupportedStoreURL(redact_url(url), f"unknown scheme {scheme + '://'!r}")


def open_store(url: str) -> Store:
    """The store a URL names, so configuration can be one string (an env var, a CLI flag)."""
    kind, target = _parse(url)
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SQLiteStore(target)
    if kind == "postgres":
        postgres: type[PostgresStore] = _import_backend("PostgresStore").PostgresStore
        return postgres(_pool_options(target)[0])  # one connection per thread: no pool
    redis_store: type[RedisStore] = _import_backend("RedisStore").RedisStore
    return redis_store(target)


def open_async_store(url: str) -> AsyncStore:
    """:func:`open_store` for asyncio: the async store over the same records a URL names.

    A PostgreSQL URL may also set its connection pool: ``pool_min`` (connections
    kept open, default 1), ``pool_max`` (the most at once, default 10) and
    ``pool_timeout`` (seconds a call waits for a free connection, default 30),
    e.g. ``postgresql://app@db/prod?pool_max=20``; they are not passed to libpq.
    :func:`open_store` accepts and ignores them, so both can read one setting.
    Opening connects to no server: the first call does.
    """
    kind, target = _parse(url)
    if kind == "memory":
        return AsyncMemoryStore()
    if kind == "sqlite":
        return AsyncSQLiteStore(target)
    if kind == "postgres":
        module = _import_backend("AsyncPostgresStore")
        postgres: type[AsyncPostgresStore] = module.AsyncPostgresStore
        dsn, pool = _pool_options(target)
        try:
            return postgres(dsn, **pool)
        except ValueError as exc:
            raise UnsupportedStoreURL(redact_url(url), str(exc)) from None
    redis_store: type[AsyncRedisStore] = _import_backend("AsyncRedisStore").AsyncRedisStore
    return redis_store(target)


class _PoolOptions(TypedDict, total=False):
    pool_min: int
    pool_max: int
    pool_timeout: float


_POOL_OPTIONS = ("pool_min", "pool_max", "pool_timeout")


def _pool_options(url: str) -> tuple[str, _PoolOptions]:
    """The URL without gorch's ``pool_*`` query options (libpq refuses unknown ones),
    and those options as keyword arguments."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    found = {key: value for key, value in pairs if key in _POOL_OPTIONS}
    options = _PoolOptions()
    try:
        if "pool_min" in found:
            options["pool_min"] = int(found["pool_min"])
        if "pool_max" in found:
            options["pool_max"] = int(found["pool_max"])
        if "pool_timeout" in found:
            options["pool_timeout"] = float(found["pool_timeout"])
    except ValueError as exc:
        raise UnsupportedStoreURL(
            redact_url(url), f"a pool option is not a number: {exc}"
        ) from None
    if not found:
        return url, options
    rest = [(k, v) for k, v in pairs if k not in _POOL_OPTIONS]
    query = urlencode(rest, quote_via=quote)  # %20, not +: libpq does not read + as a space
    return urlunsplit(parts._replace(query=query)), options
