"""Store settings a URL may carry: connection pools, prepared statements, SQLite's durability.

One configuration string (an environment variable, a CLI flag) should be able
to say everything about a store, so gorch reads a few query options of its own
and removes them before the URL reaches the driver (libpq and redis-py refuse
options they do not know):

* PostgreSQL: ``pool_min``, ``pool_max``, ``pool_timeout``, ``prepare_threshold``;
* Redis: ``pool_max``, ``pool_timeout``;
* SQLite: ``synchronous`` (and ``timeout``, the busy timeout).

A value that does not parse, or a pool that cannot work, raises ``ValueError``
with the option's name; :func:`gorch.stores.open_store` reports it as an
``UnsupportedStoreURL`` naming the (password-free) URL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

DEFAULT_POOL_MIN = 1
"""Connections a PostgreSQL pool keeps open while idle."""
DEFAULT_POOL_MAX = 10
"""The most connections a pool opens at once (PostgreSQL and Redis): threads or tasks
beyond it wait for a free connection instead of opening more."""
DEFAULT_POOL_TIMEOUT = 30.0
"""Seconds a call waits for a free pooled connection before the store reports itself
unavailable (nothing was sent, so nothing was written)."""
DEFAULT_PREPARE_THRESHOLD: int | None = 0
"""psycopg prepares a statement on a connection after this many executions: 0 prepares
every statement the first time (gorch runs the same few statements all day); None
never prepares (PgBouncer in transaction mode before 1.21)."""

SYNCHRONOUS = {"off": "OFF", "normal": "NORMAL", "full": "FULL", "extra": "EXTRA"}
"""SQLite's ``PRAGMA synchronous`` levels, by the names a URL may use (any case, or 0-3)."""
DEFAULT_SYNCHRONOUS = "full"


def check_pool(pool_min: int, pool_max: int, pool_timeout: float) -> None:
    """``ValueError`` unless the pool can hold at least one connection and wait a while."""
    if not 0 <= pool_min <= pool_max or pool_max < 1:
        raise ValueError(
            f"need 0 <= pool_min <= pool_max and pool_max >= 1, got pool_min={pool_min},"
            f" pool_max={pool_max}"
        )
    if not pool_timeout > 0:
        raise ValueError(f"pool_timeout must be a positive number of seconds, got {pool_timeout}")


def synchronous_level(value: str) -> str:
    """The ``PRAGMA synchronous`` keyword for ``value`` (a level's name or number)."""
    text = str(value).strip().lower()
    names = list(SYNCHRONOUS)
    if text.isdigit() and int(text) < len(names):
        text = names[int(text)]
    if text not in SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {', '.join(names)} (or 0-3), got {value!r}")
    return SYNCHRONOUS[text]


def _threshold(value: str) -> int | None:
    if value.strip().lower() in ("none", "off", "never"):
        return None
    number = int(value)
    if number < 0:
        raise ValueError(f"prepare_threshold must be 0 or more (or none), got {value}")
    return number


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"must be a positive number of seconds, got {value}")
    return number


POSTGRES_OPTIONS: Mapping[str, Callable[[str], Any]] = {
    "pool_min": int,
    "pool_max": int,
    "pool_timeout": float,
    "prepare_threshold": _threshold,
}
REDIS_OPTIONS: Mapping[str, Callable[[str], Any]] = {"pool_max": int, "pool_timeout": float}
SQLITE_OPTIONS: Mapping[str, Callable[[str], Any]] = {
    "synchronous": synchronous_level,
    "timeout": _positive,
}


def parse_query(
    query: str, known: Mapping[str, Callable[[str], Any]], *, strict: bool = False
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The options of ``known`` in a URL's query text, parsed, and the other pairs.

    With ``strict`` any other option is refused (SQLite has no driver to pass
    them on to). ``ValueError`` names the option that does not parse.
    """
    options: dict[str, Any] = {}
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        parse = known.get(key)
        if parse is None:
            if strict:
                raise ValueError(
                    f"unknown option {key!r}; this store takes {', '.join(sorted(known))}"
                )
            rest.append((key, value))
            continue
        try:
            options[key] = parse(value)
        except ValueError as exc:
            raise ValueError(f"bad value for {key}: {exc}") from None
    return options, rest


def take_options(url: str, known: Mapping[str, Callable[[str], Any]]) -> tuple[str, dict[str, Any]]:
    """``url`` without the query options in ``known``, and those options parsed; the
    other options stay as they were sent, for the driver."""
    parts = urlsplit(url)
    options, rest = parse_query(parts.query, known)
    if not options:
        return url, options
    query = urlencode(rest, quote_via=quote)  # %20, not +: libpq does not read + as a space
    return urlunsplit(parts._replace(query=query)), options
