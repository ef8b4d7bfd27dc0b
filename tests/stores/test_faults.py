"""Real faults on a store's own connection: what each backend promises when it loses it.

A store either gets past a fault by itself (a read, or a write it knows did
not run, tried again on a new connection) or raises ``StoreUnavailable`` whose
message names the store and says whether the write may have been applied. It
never reports a write that ran as one that did not ("nothing was written"), and
never applies one twice. See ``fault_support`` for how the faults are made
(only on the store's own connections) and ``tests/test_engine_faults.py`` for
what the Engine makes of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fault_support import (
    FaultProxy,
    PgFault,
    RedisFault,
    SQLiteLock,
    hooked,
    pg_address,
    pg_store,
    proxied_dsn,
    proxied_redis_url,
    redis_address,
    redis_kill,
    redis_own_client_id,
    redis_store_sees_close,
)
from store_support import StoreSpec, make_spec

from gorch.errors import StoreUnavailable, WorkflowNotFound
from gorch.stores import Record, SQLiteStore, Store

PAST = datetime(2020, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=30)
METHODS = ["create", "save", "load", "delete", "claim_due", "remember"]
WRITES = [m for m in METHODS if m != "load"]


def _prepare(store: Store) -> None:
    store.create("r", "w", "waiting", b"one", PAST)  # due: claim_due takes it


def _call(store: Store, method: str) -> Any:
    """One call of ``method`` on the prepared store."""
    if method == "create":
        return store.create("new", "w", "waiting", b"new", None)
    if method == "save":
        return store.save("r", 1, "done", b"two", None)
    if method == "load":
        return store.load("r")
    if method == "delete":
        return store.delete("r")
    if method == "claim_due":
        return store.claim_due(datetime.now(UTC), 10, LEASE)
    return store.remember("key-1", datetime.now(UTC) + timedelta(hours=1))


def _snapshot(store: Store) -> tuple[Record | None, Record | None]:
    """The two records the calls can change (remembered keys are checked by calling again)."""

    def load(id: str) -> Record | None:
        try:
            return store.load(id)
        except WorkflowNotFound:
            return None

    return load("r"), load("new")


def _check_applied_once(store: Store, method: str, result: Any, before: Any, after: Any) -> None:
    """``after`` is ``before`` with the call applied exactly once."""
    r0, new0 = before
    r1, new1 = after
    assert r0 is not None and r0.version == 1 and new0 is None
    if method == "create":
        assert new1 is not None and (new1.blob, new1.version) == (b"new", 1) and r1 == r0
    elif method == "save":
        assert r1 is not None and (r1.status, r1.blob, r1.version) == ("done", b"two", 2)
        assert result.version == 2 and new1 is None
    elif method == "load":
        assert result == r0 and after == before
    elif method == "delete":
        assert r1 is None and new1 is None
    elif method == "claim_due":
        assert [(c.id, c.version) for c in result] == [("r", 2)]
        assert r1 is not None and r1.version == 2 and r1.blob == b"one"  # claimed once
    else:
        assert result is True and after == before
        assert _call(store, "remember") is False  # recorded: a second try is a replay


def _check_untouched(before: Any, after: Any) -> None:
    assert after == before, "the store said nothing was written, yet something changed"


def _retry_applies_once(store: Store, method: str, before: Any) -> None:
    """The fault is over: the same call goes through, once (a key not yet recorded)."""
    _check_applied_once(store, method, _call(store, method), before, _snapshot(store))


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_spec(tmp_path: Path) -> Iterator[StoreSpec]:
    yield from make_spec("postgres", tmp_path)


@pytest.fixture
def pg(pg_spec: StoreSpec) -> Iterator[tuple[Any, PgFault, FaultProxy]]:
    proxy = FaultProxy(*pg_address(pg_spec.target))
    store = pg_store(proxied_dsn(pg_spec.target, proxy.port), pg_spec.namespace)
    store.migrate()
    fault = PgFault(pg_spec.target, store, pg_spec.namespace)
    fault.install_gate()
    _prepare(store)
    try:
        yield store, fault, proxy
    finally:
        fault.close()
        store.close()
        proxy.close()


def _with_fault(store: Any, method: str, arm: Callable[[], None], end: Callable[[], None]) -> Any:
    """Call ``method`` with the fault armed right before it; (result, error, before, after)."""
    before = _snapshot(store)
    store.at(method, 1, arm)
    result: Any = None
    error: StoreUnavailable | None = None
    try:
        result = _call(store, method)
    except StoreUnavailable as e:
        error = e
    finally:
        end()
    assert store.hooks.fired, "the fault never landed"
    return result, error, before, _snapshot(store)


REPEATABLE = ["load", "remember"]  # a read, and the write made idempotent by its token
UNKNOWN = "the connection was lost during the write, so it may or may not have been applied"


@pytest.mark.parametrize("method", METHODS)
def test_postgres_statement_terminated_once(
    pg: tuple[Any, PgFault, FaultProxy], method: str
) -> None:
    """The backend ends while the statement waits for a lock. A read, or a write safe to
    repeat, runs again on a new connection; any other write was sent in autocommit and
    could have committed as far as the store can tell: it says the outcome is unknown
    (here it was not applied), and trying again applies it once."""
    store, fault, _ = pg
    opened = len(store.pids)
    result, error, before, after = _with_fault(store, method, fault.lock, fault.end)
    assert len(fault.terminated) == 1
    if method in REPEATABLE:
        assert error is None
        assert len(store.pids) == opened + 1  # on a new connection
        _check_applied_once(store, method, result, before, after)
        return
    assert error is not None and UNKNOWN in str(error)
    assert f"PostgreSQL store {store.url} is unavailable" in str(error)
    _check_untouched(before, after)
    _retry_applies_once(store, method, before)


@pytest.mark.parametrize("method", METHODS)
def test_postgres_statement_terminated_every_time_is_reported(
    pg: tuple[Any, PgFault, FaultProxy], method: str
) -> None:
    store, fault, _ = pg
    result, error, before, after = _with_fault(
        store, method, lambda: fault.lock(outage=True), fault.end
    )
    assert error is not None, f"{method} returned {result!r} though every try was terminated"
    message = str(error)
    assert f"PostgreSQL store {store.url} is unavailable" in message
    assert "terminating connection due to administrator command" in message
    if method != "load":
        assert message.endswith(UNKNOWN)
    # Tried once more on a new connection only when that is safe.
    assert len(fault.terminated) == (2 if method in REPEATABLE else 1)
    _check_untouched(before, after)
    # The server is back: the same call goes through, once.
    _retry_applies_once(store, method, before)


@pytest.mark.parametrize("method", METHODS)
def test_postgres_statement_refused_writes_nothing_and_says_so(
    pg_spec: StoreSpec, method: str
) -> None:
    """A fault that leaves the connection up (here a lock timeout) ends the statement
    uncommitted: the store says nothing was written (a read: just unavailable)."""
    import psycopg
    from psycopg import sql

    url = pg_spec.target + ("&" if "?" in pg_spec.target else "?")
    url += "options=-c%20lock_timeout%3D50"
    store = pg_store(url, pg_spec.namespace)
    store.migrate()
    _prepare(store)
    before = _snapshot(store)
    with psycopg.connect(pg_spec.target) as locker:
        locker.execute(
            sql.SQL("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE").format(
                sql.Identifier(pg_spec.namespace), sql.Identifier(f"{pg_spec.namespace}_seen")
            )
        )
        with pytest.raises(StoreUnavailable) as info:
            _call(store, method)
        locker.rollback()
    message = str(info.value)
    assert "lock timeout" in message
    if method != "load":
        assert message.endswith("nothing was written")
    _check_untouched(before, _snapshot(store))
    _retry_applies_once(store, method, before)
    store.close()


@pytest.mark.parametrize("method", WRITES)
def test_postgres_commit_terminated_is_an_unknown_outcome_unless_safe_to_repeat(
    pg: tuple[Any, PgFault, FaultProxy], method: str
) -> None:
    """The backend ends while the write's commit waits: it is rolled back, but the store
    cannot tell; it says so, except for remember(), which it can safely repeat."""
    store, fault, _ = pg
    result, error, before, after = _with_fault(store, method, fault.gate, fault.end)
    assert len(fault.terminated) == 1
    if method == "remember":
        assert error is None
        _check_applied_once(store, method, result, before, after)
        return
    assert error is not None
    assert UNKNOWN in str(error)
    _check_untouched(before, after)  # it was not: the session ended before its commit
    _retry_applies_once(store, method, before)


@pytest.mark.parametrize("method", WRITES)
def test_postgres_reply_of_a_commit_lost_is_an_unknown_outcome_applied_once(
    pg: tuple[Any, PgFault, FaultProxy], method: str
) -> None:
    """The write committed and the connection died before its reply came back."""
    store, fault, proxy = pg
    result, error, before, after = _with_fault(
        store, method, lambda: fault.reply_lost(proxy), fault.end
    )
    assert len(fault.terminated) == 1
    if method == "remember":  # tried again: its own first attempt counts as its own
        assert error is None
    else:
        assert error is not None
        assert "may or may not have been applied" in str(error)
        if method in ("save", "claim_due"):  # what the lost reply would have said
            result = store.load("r") if method == "save" else [store.load("r")]
    _check_applied_once(store, method, result, before, after)


# --------------------------------------------------------------------------- Redis


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[tuple[Any, RedisFault, str]]:
    from gorch.stores.redis import RedisStore

    for spec in make_spec("redis", tmp_path):
        proxy = FaultProxy(*redis_address(spec.target))
        store = hooked(RedisStore)(proxied_redis_url(spec.target, proxy.port), spec.namespace)
        _prepare(store)
        try:
            yield store, RedisFault(spec.target, store, proxy), spec.target
        finally:
            store.close()
            proxy.close()


@pytest.mark.parametrize("method", METHODS)
def test_redis_connection_killed_between_calls_is_replaced(
    rds: tuple[Any, RedisFault, str], method: str
) -> None:
    store, _, url = rds
    killed: list[int] = []

    def kill() -> None:
        killed.append(redis_own_client_id(store))
        redis_kill(url, killed[-1])
        redis_store_sees_close(store)

    result, error, before, after = _with_fault(store, method, kill, lambda: None)
    assert error is None and len(killed) == 1
    assert redis_own_client_id(store) != killed[0]  # it runs on a new connection
    _check_applied_once(store, method, result, before, after)


@pytest.mark.parametrize("method", METHODS)
def test_redis_connection_killed_before_the_command_ran(
    rds: tuple[Any, RedisFault, str], method: str
) -> None:
    store, fault, _ = rds
    result, error, before, after = _with_fault(store, method, fault.killed_before_sent, fault.end)
    assert len(fault.killed) == 1
    if method in ("load", "remember"):  # safe to repeat: tried again on a new connection
        assert error is None
        _check_applied_once(store, method, result, before, after)
        return
    assert error is not None
    message = str(error)
    assert f"Redis store {store.url} is unavailable: ConnectionError" in message
    assert message.endswith("a write in flight may or may not have been applied")
    _check_untouched(before, after)  # it was not
    _retry_applies_once(store, method, before)


@pytest.mark.parametrize("method", WRITES)
def test_redis_connection_killed_after_the_command_ran(
    rds: tuple[Any, RedisFault, str], method: str
) -> None:
    store, fault, _ = rds
    result, error, before, after = _with_fault(store, method, fault.killed_after_applied, fault.end)
    assert len(fault.killed) == 1
    if method == "remember":
        assert error is None  # repeated with the same token: still its own, not a replay
    else:
        assert error is not None and "may or may not have been applied" in str(error)
        if method in ("save", "claim_due"):  # what the lost reply would have said
            result = store.load("r") if method == "save" else [store.load("r")]
    _check_applied_once(store, method, result, before, after)


@pytest.mark.parametrize("method", METHODS)
def test_redis_down_is_reported(rds: tuple[Any, RedisFault, str], method: str) -> None:
    store, fault, _ = rds
    result, error, before, after = _with_fault(
        store, method, lambda: fault.killed_before_sent(outage=True), fault.end
    )
    assert error is not None, f"{method} returned {result!r} with the server unreachable"
    assert f"Redis store {store.url} is unavailable" in str(error)
    _check_untouched(before, after)
    _retry_applies_once(store, method, before)


# --------------------------------------------------------------------------- SQLite


@pytest.mark.parametrize("method", WRITES)
def test_sqlite_locked_by_another_process_past_the_busy_timeout(
    tmp_path: Path, method: str
) -> None:
    path = tmp_path / "locked.db"
    store = hooked(SQLiteStore)(path, timeout=0.1)
    _prepare(store)
    locks: list[SQLiteLock] = []
    try:
        result, error, before, after = _with_fault(
            store,
            method,
            lambda: locks.append(SQLiteLock(str(path))),
            lambda: locks[0].release(),
        )
        assert error is not None, f"{method} returned {result!r} while another process wrote"
        message = str(error)
        assert f"SQLite store sqlite:///{path} is unavailable: the database is locked" in message
        assert "busy timeout (0.1 s); nothing was written, try again later" in message
        _check_untouched(before, after)
        # The other process is done: the same call goes through, once.
        _retry_applies_once(store, method, before)
    finally:
        for lock in locks:
            lock.release()
        store.close()


def test_sqlite_reads_go_on_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    with SQLiteStore(path, timeout=0.1) as store:
        _prepare(store)
        lock = SQLiteLock(str(path))
        try:
            assert store.load("r").blob == b"one"
            assert [r.id for r in store.list().records] == ["r"]
        finally:
            lock.release()


_DISK_FULL = """
import json, os, resource, signal, sys

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG

from gorch.errors import StoreUnavailable
from gorch.stores import SQLiteStore

path = sys.argv[1]
store = SQLiteStore(path, timeout=1)
store.create("r", "w", "waiting", b"one", None)
before = store.load("r")
size = max(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
out = {}
for name, call in [
    ("save", lambda: store.save("r", 1, "done", b"x" * 2_000_000, None)),
    ("create", lambda: store.create("big", "w", "waiting", b"x" * 2_000_000, None)),
]:
    try:
        call()
        out[name] = "written"
    except StoreUnavailable as e:
        out[name] = str(e)
out["unchanged"] = store.load("r") == before and not store.list(workflow="w").records[1:]
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space was freed
out["after"] = store.save("r", 1, "done", b"x" * 2_000_000, None).version
print(json.dumps(out))
"""


def test_sqlite_disk_full_writes_nothing_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "full.db"
    child = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    for name in ("save", "create"):
        assert out[name] != "written", f"{name} past the file-size limit reported success"
        assert f"SQLite store sqlite:///{path} is unavailable" in out[name]
        assert "the disk is full or the process hit its file-size limit" in out[name]
        assert "nothing was written" in out[name]
    assert out["unchanged"] is True
    assert out["after"] == 2
