"""Helpers every backend shares: one UTC/microsecond convention and password-free URLs.

Keeping these in one place is what makes the four stores interchangeable: the
same instant round-trips to the same ``datetime`` and the same id order
everywhere (code-point order, which is also UTF-8 byte order).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Generic, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gorch.stores.base import Record

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_SECRET_KEYS = frozenset({"password", "pass", "passwd"})
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def to_utc(when: datetime) -> datetime:
    """The same instant in UTC; a naive datetime is taken as UTC (the protocol's rule)."""
    if when.tzinfo is UTC:  # the common case (the Engine's clock): nothing to convert
        return when
    if when.tzinfo is None or when.utcoffset() is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def opt_utc(when: datetime | None) -> datetime | None:
    """:func:`to_utc` that lets "nothing scheduled" through."""
    if when is None or when.tzinfo is UTC:
        return when
    return to_utc(when)


def to_micros(when: datetime) -> int:
    """Exact integer microseconds since the epoch: sortable, and lossless unlike a float."""
    return (to_utc(when) - EPOCH) // _MICROSECOND


def from_micros(micros: int) -> datetime:
    """Inverse of :func:`to_micros`, always timezone-aware UTC."""
    return EPOCH + timedelta(microseconds=micros)


def check_limit(limit: int) -> None:
    """A page needs room for at least one record, or the cursor could never advance."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")


def page_cursor(ids: list[str], limit: int) -> str | None:
    """Given up to ``limit + 1`` matching ids, the cursor of the page (None on the last one)."""
    return ids[limit - 1] if len(ids) > limit else None


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe to log and put in errors."""
    if "://" not in url:  # a libpq key=value string
        return _KV_PASSWORD.sub(r"\1***", url)
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_KEYS for k, _ in pairs):
            query = urlencode(
                [(k, "***" if k.lower() in _SECRET_KEYS else v) for k, v in pairs], safe="*"
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_password(url: str) -> str | None:
    """The password a URL carries, so it can be scrubbed from a driver's error text."""
    if "://" not in url:
        match = _KV_PASSWORD.search(url)
        return match.group(2).strip("'") if match else None
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return None
    if password:
        return password
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() in _SECRET_KEYS and value:
            return value
    return None


def scrub(text: str, url: str) -> str:
    """``text`` with the URL's password (if any) masked: drivers sometimes echo the DSN."""
    password = url_password(url)
    if password and len(password) >= 3:
        return text.replace(password, "***")
    return text


def matches(record: Record, workflow: str | None, status: str | None) -> bool:
    """Whether a record passes :meth:`Store.list`'s filters."""
    return (workflow is None or record.workflow == workflow) and (
        status is None or record.status == status
    )


class Closable(Protocol):
    """What :class:`PerThread` needs of a connection."""

    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


class PerThread(Generic[C]):
    """One connection per thread, opened on first use, for drivers whose connections
    must not be shared between threads (sqlite3) or would serialise them (psycopg).

    Connections of threads that have ended are closed when the next one is opened.
    After a ``fork`` the child never touches the parent's connections (closing them
    could end the parent's session or corrupt SQLite's locks): it keeps them
    referenced, unused, and opens its own.
    """

    def __init__(self, open: Callable[[], C]) -> None:
        self._open = open
        self._lock = threading.Lock()
        self._conns: dict[threading.Thread, C] = {}
        self._inherited: list[C] = []
        self._pid = os.getpid()

    def get(self) -> C:
        """This thread's connection, opening it if needed."""
        if os.getpid() != self._pid:
            self._after_fork()
        thread = threading.current_thread()
        conn = self._conns.get(thread)
        if conn is not None:
            return conn
        conn = self._open()
        with self._lock:
            ended = [t for t in self._conns if not t.is_alive()]
            stale = [self._conns.pop(t) for t in ended]
            self._conns[thread] = conn
        for old in stale:
            _close_quietly(old)
        return conn

    def discard(self) -> None:
        """Close this thread's connection (it broke); the next call opens a fresh one."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            conn = self._conns.pop(threading.current_thread(), None)
        if conn is not None:
            _close_quietly(conn)

    def close_all(self) -> None:
        """Close every connection this process opened."""
        if os.getpid() != self._pid:
            self._after_fork()
            return
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for conn in conns:
            _close_quietly(conn)

    def _after_fork(self) -> None:
        # The parent's lock may have been held by a thread that does not exist here.
        self._lock = threading.Lock()
        self._inherited.extend(self._conns.values())
        self._conns = {}
        self._pid = os.getpid()


def _close_quietly(conn: Closable) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def check_history_limit(limit: int) -> None:
    """A history log must keep at least its newest entry."""
    if limit < 1:
        raise ValueError(f"history_limit must be at least 1, got {limit}")


def append_history(
    old: list[str], dropped: int, new: Sequence[str], limit: int
) -> tuple[list[str], int]:
    """``old + new`` cut to the newest ``limit`` entries, and the dropped count raised to match."""
    entries = [*old, *new]
    excess = max(0, len(entries) - limit)
    return entries[excess:], dropped + excess


def check_purge(statuses: Sequence[str], limit: int) -> list[str]:
    """The statuses of a purge, refused when they could never match or the batch is empty."""
    check_limit(limit)
    if isinstance(statuses, str):
        raise TypeError(f"statuses must be a sequence of statuses, not the string {statuses!r}")
    found = list(dict.fromkeys(statuses))
    if not found:
        raise ValueError("statuses must name at least one status")
    return found
