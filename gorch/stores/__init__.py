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
from typing import TYPE_CHECKING, Any

from gorch.errors import StoreError
from gorch.stores._common import redact_url
from gorch.stores._options import (
    POSTGRES_OPTIONS,
    REDIS_OPTIONS,
    SQLITE_OPTIONS,
    parse_query,
    take_options,
)
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
    "PostgresStore": ("gorch.stores.postgres", ("psycopg", "psycopg_pool"), "postgres"),
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


def _parse(url: str) -> tuple[str, str, str]:
    """``(kind, target, query)``: the backend a URL names, what its class is opened with,
    and (SQLite only) the options after ``?``."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise UnsupportedStoreURL(redact_url(url), "it has no scheme")
    if scheme == "memory":
        if rest.strip("/"):
            raise UnsupportedStoreURL(redact_url(url), "memory:// takes no path")
        return "memory", "", ""
    if scheme == "sqlite":
        path, _, query = rest.partition("?")
        if not path.startswith("/") or path == "/":
            raise UnsupportedStoreURL(
                redact_url(url), "a SQLite URL is sqlite:/// followed by a file path"
            )
        return "sqlite", path[1:], query
    if scheme in ("postgresql", "postgres"):
        return "postgres", f"{scheme}://{rest}", ""  # drivers expect a lower-case scheme
    if scheme in ("redis", "rediss"):
        return "redis", f"{scheme}://{rest}", ""
    raise UnsupportedStoreURL(redact_url(url), f"unknown scheme {scheme + '://'!r}")


def _options(url: str, kind: str, target: str, query: str) -> tuple[str, dict[str, Any]]:
    """The target without gorch's own query options, and those options (see
    :mod:`gorch.stores._options`); a bad one is an ``UnsupportedStoreURL``."""
    try:
        if kind == "sqlite":
            return target, parse_query(query, SQLITE_OPTIONS, strict=True)[0]
        if kind == "postgres":
            return take_options(target, POSTGRES_OPTIONS)
        if kind == "redis":
            return take_options(target, REDIS_OPTIONS)
    except ValueError as exc:
        raise UnsupportedStoreURL(redact_url(url), str(exc)) from None
    return target, {}


def open_store(url: str) -> Store:
    """The store a URL names, so configuration can be one string (an env var, a CLI flag).

    Query options gorch reads itself (and does not pass to the driver):

    * ``sqlite:///path.db?synchronous=normal``: SQLite's ``PRAGMA synchronous``
      (``off``, ``normal``, ``full`` (the default), ``extra``) and ``timeout``,
      the seconds a writer waits for another one;
    * ``postgresql://...?pool_min=1&pool_max=10&pool_timeout=30``: the connection
      pool (connections kept open, the most at once, seconds a call waits for a
      free one) and ``prepare_threshold`` (0: prepare every statement on first
      use, the default; ``none``: never, for PgBouncer in transaction mode);
    * ``redis://...?pool_max=10&pool_timeout=30``: the connection pool.

    Opening connects to no server: the first call does.
    """
    kind, target, query = _parse(url)
    target, options = _options(url, kind, target, query)
    try:
        if kind == "memory":
            return MemoryStore()
        if kind == "sqlite":
            return SQLiteStore(target, **options)
        if kind == "postgres":
            postgres: type[PostgresStore] = _import_backend("PostgresStore").PostgresStore
            return postgres(target, **options)
        redis_store: type[RedisStore] = _import_backend("RedisStore").RedisStore
        return redis_store(target, **options)
    except ValueError as exc:  # a pool that cannot work (pool_min > pool_max, ...)
        raise UnsupportedStoreURL(redact_url(url), str(exc)) from None


def open_async_store(url: str) -> AsyncStore:
    """:func:`open_store` for asyncio: the async store over the same records a URL names,
    with the same query options. Opening connects to no server: the first call does."""
    kind, target, query = _parse(url)
    target, options = _options(url, kind, target, query)
    try:
        if kind == "memory":
            return AsyncMemoryStore()
        if kind == "sqlite":
            return AsyncSQLiteStore(target, **options)
        if kind == "postgres":
            module = _import_backend("AsyncPostgresStore")
            postgres: type[AsyncPostgresStore] = module.AsyncPostgresStore
            return postgres(target, **options)
        redis_store: type[AsyncRedisStore] = _import_backend("AsyncRedisStore").AsyncRedisStore
        return redis_store(target, **options)
    except ValueError as exc:
        raise UnsupportedStoreURL(redact_url(url), str(exc)) from None
