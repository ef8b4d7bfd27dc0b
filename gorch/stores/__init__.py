"""Workflow stores: one protocol, four backends, and :func:`open_store` to pick one by URL.

``PostgresStore`` and ``RedisStore`` are imported on first use, so the core
works without psycopg or redis-py installed (``pip install 'gorch[postgres]'``
or ``'gorch[redis]'`` adds them).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from gorch.errors import StoreError
from gorch.stores._common import redact_url
from gorch.stores.base import Page, Record, Store
from gorch.stores.memory import MemoryStore
from gorch.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from gorch.stores.postgres import PostgresStore
    from gorch.stores.redis import RedisStore

__all__ = [
    "SUPPORTED_SCHEMES",
    "MemoryStore",
    "Page",
    "PostgresStore",
    "Record",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "UnsupportedStoreURL",
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

_LAZY = {
    "PostgresStore": ("gorch.stores.postgres", "psycopg", "postgres"),
    "RedisStore": ("gorch.stores.redis", "redis", "redis"),
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
    module_name, driver, extra = _LAZY[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != driver:
            raise
        raise ImportError(
            f"{name} needs the {driver!r} package: pip install 'gorch[{extra}]'"
        ) from exc


def open_store(url: str) -> Store:
    """The store a URL names, so configuration can be one string (an env var, a CLI flag)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise UnsupportedStoreURL(redact_url(url), "it has no scheme")
    if scheme == "memory":
        if rest.strip("/"):
            raise UnsupportedStoreURL(redact_url(url), "memory:// takes no path")
        return MemoryStore()
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise UnsupportedStoreURL(
                redact_url(url), "a SQLite URL is sqlite:/// followed by a file path"
            )
        return SQLiteStore(rest[1:])
    if scheme in ("postgresql", "postgres"):
        postgres: type[PostgresStore] = _import_backend("PostgresStore").PostgresStore
        return postgres(f"{scheme}://{rest}")  # drivers expect a lower-case scheme
    if scheme in ("redis", "rediss"):
        redis_store: type[RedisStore] = _import_backend("RedisStore").RedisStore
        return redis_store(f"{scheme}://{rest}")
    raise UnsupportedStoreURL(redact_url(url), f"unknown scheme {scheme + '://'!r}")
