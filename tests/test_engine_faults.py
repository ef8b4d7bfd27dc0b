"""Real store faults under ``gorch.Engine``: nothing acknowledged is lost, nothing applied twice.

Each case lands one real fault on the store's own connection at one store call
of ``start``, ``send``, ``resume`` or ``run_due`` (see ``stores/fault_support``):

* PostgreSQL: the store's backend terminated while its statement waits on a
  table lock (``statement``), while its COMMIT waits on a deferred trigger
  (``commit``: rolled back), or after its COMMIT went through and before the
  reply arrived (``reply``: committed, the store cannot know);
* Redis: the store's connection killed while its command is held back before
  the server (``before``), after the server ran it with the reply dropped
  (``after``), or while idle between two calls (``idle``);
* SQLite: another process holding the write lock past the store's busy timeout.

``once``: the fault happens one time; the Engine (or the store) retries and
the call behaves exactly as without the fault. ``outage``: the fault lasts
until the call has returned or raised; the call raises ``StoreUnavailable``
only where nothing it was asked for was saved, or returns what was saved, and
the instance finishes once the store is back (the call repeated, then
``run_due`` once the call's lease is over). Either way each event is applied
once (``paid``) and each step's effect is saved once (``reserved``, ``shipped``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from stores.fault_support import (
    WAIT,
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
    wait_until,
)
from stores.store_support import StoreSpec, make_spec

import gorch
from gorch import On, S, Select, Step
from gorch.engine import DueResult, Engine, Snapshot
from gorch.errors import StoreUnavailable, WorkflowNotFound
from gorch.stores import Record, SQLiteStore, Store

RUNS: list[str] = []
"""Every step and handler run in this process, in order."""

ID = "order-1"
LEASE = 30.0


class Order(gorch.Workflow):
    reserved: int = 0
    paid: int = 0
    shipped: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Step("reserve", self.reserve),
            Select("await payment", On("pay", self.pay)),
            Step("ship", self.ship),
        )

    def reserve(self) -> None:
        RUNS.append("reserve")
        self.reserved += 1

    def pay(self) -> int:
        RUNS.append("pay")
        self.paid += 1
        return self.paid

    def ship(self) -> None:
        RUNS.append("ship")
        self.shipped += 1


WORKFLOWS: dict[str, type[gorch.Workflow]] = {"order": Order}


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    RUNS.clear()
    yield
    RUNS.clear()


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


# --------------------------------------------------------------------------- harnesses


@dataclass
class Harness:
    """A hooked store of one backend and the faults that can be injected into it."""

    store: Any
    inject: Callable[[str, bool], None]
    """``inject(mode, outage)``: called at the pause point, in the store's thread."""
    end: Callable[[], None]
    """The fault is over (locks released, the proxy serves again)."""
    landed: Callable[[], int]
    """How many times the fault struck (backends terminated, connections killed, lock waits)."""
    outage: Callable[[], None] = lambda: None
    """Take the store down for whoever uses it, from any thread, until ``end()``."""


def _pg_harness(spec: StoreSpec) -> Iterator[Harness]:
    proxy = FaultProxy(*pg_address(spec.target))
    store = pg_store(proxied_dsn(spec.target, proxy.port), spec.namespace)
    store.migrate()  # before any lock: creating an index would queue behind it
    fault = PgFault(spec.target, store, spec.namespace)
    fault.install_gate()

    def inject(mode: str, outage: bool) -> None:
        if mode == "statement":
            fault.lock(outage=outage)
        elif mode == "commit":
            fault.gate(outage=outage)
        else:
            assert mode == "reply" and not outage
            fault.reply_lost(proxy)

    try:
        yield Harness(
            store,
            inject,
            fault.end,
            lambda: len(fault.terminated),
            lambda: fault.lock(outage=True),  # every backend of the store that waits ends
        )
    finally:
        fault.close()
        store.close()
        proxy.close()


def _redis_harness(spec: StoreSpec) -> Iterator[Harness]:
    from gorch.stores.redis import RedisStore

    proxy = FaultProxy(*redis_address(spec.target))
    store = hooked(RedisStore)(proxied_redis_url(spec.target, proxy.port), spec.namespace)
    fault = RedisFault(spec.target, store, proxy)
    idle_kills: list[int] = []

    def inject(mode: str, outage: bool) -> None:
        if mode == "before":
            fault.killed_before_sent(outage=outage)
        elif mode == "after":
            fault.killed_after_applied(outage=outage)
        else:  # the connection dies while idle, between two calls
            assert mode == "idle" and not outage
            client_id = redis_own_client_id(store)
            redis_kill(spec.target, client_id)
            redis_store_sees_close(store)
            idle_kills.append(client_id)

    try:
        yield Harness(
            store,
            inject,
            fault.end,
            lambda: len(fault.killed) + len(idle_kills),
            proxy.down,  # the store's connections are cut, and new ones too
        )
    finally:
        fault.end()
        store.close()
        proxy.close()


class _SQLite(hooked(SQLiteStore)):  # type: ignore[misc]
    """Calls ``on_unavailable`` each time the store reports itself unavailable."""

    on_unavailable: Callable[[], None] = staticmethod(lambda: None)

    def _unavailable(self, exc: Any) -> StoreUnavailable:
        self.on_unavailable()
        return super()._unavailable(exc)  # type: ignore[no-any-return]


def _sqlite_harness(path: Path) -> Iterator[Harness]:
    store = _SQLite(path, timeout=0.1)
    locks: list[SQLiteLock] = []
    failures: list[int] = []

    def release() -> None:
        for lock in locks:
            lock.release()

    def inject(mode: str, outage: bool) -> None:
        assert mode == "locked"
        locks.append(SQLiteLock(str(path)))

        def failed() -> None:
            failures.append(1)
            if not outage:
                release()  # the other process is done: the next try gets through

        store.on_unavailable = failed

    try:
        yield Harness(
            store,
            inject,
            release,
            lambda: len(failures),
            lambda: locks.append(SQLiteLock(str(path))),
        )
    finally:
        release()
        store.close()


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[Harness]:
    for spec in make_spec("postgres", tmp_path):
        yield from _pg_harness(spec)


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[Harness]:
    for spec in make_spec("redis", tmp_path):
        yield from _redis_harness(spec)


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[Harness]:
    yield from _sqlite_harness(tmp_path / "gorch.db")


# --------------------------------------------------------------------------- one case


OPS = ("start", "send", "resume", "run_due")
POINTS: list[tuple[str, str, int]] = [
    # (operation, store call, n-th such call in it): every store call the operation makes
    ("start", "create", 1),  # the instance is created, leased to this call
    ("start", "save", 1),  # "reserve" ran: saved, waiting for "pay"
    ("send", "load", 1),
    ("send", "save", 1),  # the event is saved (paid = 1)
    ("send", "save", 2),  # the resume after it: "ship" ran, finished
    ("resume", "load", 1),
    ("resume", "save", 1),  # "reserve" ran
    ("run_due", "claim_due", 1),
    ("run_due", "save", 1),  # "reserve" ran
]
WRITES = [p for p in POINTS if p[1] != "load"]


def _stored(store: Store) -> Record | None:
    try:
        return store.load(ID)
    except WorkflowNotFound:
        return None


def _data(store: Store) -> dict[str, Any]:
    rec = store.load(ID)
    wf, _ = gorch.loads(rec.blob, Order)
    return {"status": rec.status, **wf.model_dump()}


def _act(op: str, engine: Engine) -> Any:
    if op == "start":
        return engine.start("order", ID)
    if op == "send":
        return engine.send(ID, "pay")
    if op == "resume":
        return engine.resume(ID)
    return engine.run_due()


def _check_clean_result(op: str, result: Any) -> None:
    """What the operation returns when no fault is left to see."""
    if op == "start" or op == "resume":
        assert isinstance(result, Snapshot) and result.status == "waiting"
    elif op == "send":
        assert result == 1
    else:
        assert [(r.id, r.outcome, r.status) for r in result] == [(ID, "processed", "waiting")]


FINAL = {
    "start": {"status": "waiting", "reserved": 1, "paid": 0, "shipped": 0},
    "resume": {"status": "waiting", "reserved": 1, "paid": 0, "shipped": 0},
    "run_due": {"status": "waiting", "reserved": 1, "paid": 0, "shipped": 0},
    "send": {"status": "finished", "reserved": 1, "paid": 1, "shipped": 1},
}


def check_case(h: Harness, op: str, method: str, n: int, mode: str, outage: bool) -> None:
    store = h.store
    engine = Engine(store, WORKFLOWS, store_retries=1, lease=LEASE)
    if op == "send":
        engine.start("order", ID)
    elif op in ("resume", "run_due"):  # created with its first resume pending, due now
        Engine(store, WORKFLOWS, defer_resume=True).start("order", ID)
    RUNS.clear()
    before = _stored(store)
    store.at(method, n, lambda: h.inject(mode, outage))

    result: Any = None
    error: StoreUnavailable | None = None
    try:
        result = _act(op, engine)
    except StoreUnavailable as e:
        error = e
    finally:
        h.end()
    assert store.hooks.fired, f"the operation made no call {method} #{n}: the fault never landed"
    assert h.landed() >= 1, "the fault was armed but never struck"

    if not outage:  # one fault: retried where it is safe, as if nothing had happened
        assert error is None, f"one fault must be retried transparently, got {error}"
        if mode in ("reply", "after") and method == "claim_due":
            # The claim committed, its reply was lost: the instance stays leased to the
            # lost claim until the lease runs out, then the next run_due takes it.
            assert result == []
            assert store.load(ID).wake_at > later(LEASE / 2)
            result = engine.run_due(now=later(LEASE + 5))
        _check_clean_result(op, result)
        assert _data(store) == FINAL[op]
        assert (["pay", "ship"] if op == "send" else ["reserve"]) == RUNS  # nothing re-ran
        return

    # An outage: the call reports it, or returns what is saved.
    point = (op, method, n)
    if point in (("send", "save", 2), ("start", "save", 1)):
        # The call's own write was saved (the created record, the event); its
        # resume was not: it returns, and run_due carries on after its lease.
        assert error is None, f"{op} must not fail once its write is saved: {error}"
        if op == "send":
            assert result == 1
            assert _data(store) == {"status": "resuming", "reserved": 1, "paid": 1, "shipped": 0}
        else:
            assert isinstance(result, Snapshot) and result.status == "resuming"
            assert _data(store)["reserved"] == 0
    elif point == ("run_due", "save", 1):
        [due] = result
        assert (due.id, due.outcome) == (ID, "failed")
        assert "StoreUnavailable" in due.error and store.url in due.error
        assert store.load(ID).wake_at > later(LEASE / 2)  # still leased to this call
    else:
        assert error is not None, f"{op} must report an outage it could not get past"
        message = str(error)
        assert store.url in message and "unavailable" in message
        if op == "start":
            assert _stored(store) is None, "start raised, so nothing may have been created"
        else:
            assert _stored(store) == before, f"{op} raised, so nothing may have been written"
    # The store is back: what a caller does now finishes the instance, once.
    if error is not None:
        if op == "send":
            assert engine.send(ID, "pay") == 1  # the retried send applies the event once
        else:
            _check_clean_result(op, _act(op, engine))
    engine.run_due(now=later(LEASE + 5), limit=None)
    assert _data(store) == FINAL[op]
    assert RUNS.count("pay") >= (op == "send")  # a handler may re-run; its event is saved once


def _ids(points: list[tuple[str, str, int]]) -> list[str]:
    return [f"{op}-{method}{n}" for op, method, n in points]


# --------------------------------------------------------------------------- PostgreSQL


@pytest.mark.parametrize("outage", [False, True], ids=["once", "outage"])
@pytest.mark.parametrize(("op", "method", "n"), POINTS, ids=_ids(POINTS))
def test_postgres_backend_terminated_during_a_statement(
    pg: Harness, op: str, method: str, n: int, outage: bool
) -> None:
    check_case(pg, op, method, n, "statement", outage)


@pytest.mark.parametrize("outage", [False, True], ids=["once", "outage"])
@pytest.mark.parametrize(("op", "method", "n"), WRITES, ids=_ids(WRITES))
def test_postgres_backend_terminated_during_commit(
    pg: Harness, op: str, method: str, n: int, outage: bool
) -> None:
    check_case(pg, op, method, n, "commit", outage)


@pytest.mark.parametrize(("op", "method", "n"), WRITES, ids=_ids(WRITES))
def test_postgres_backend_terminated_after_commit_before_the_reply(
    pg: Harness, op: str, method: str, n: int
) -> None:
    check_case(pg, op, method, n, "reply", False)


# --------------------------------------------------------------------------- Redis


@pytest.mark.parametrize("outage", [False, True], ids=["once", "outage"])
@pytest.mark.parametrize(("op", "method", "n"), POINTS, ids=_ids(POINTS))
def test_redis_connection_killed_before_the_command_ran(
    rds: Harness, op: str, method: str, n: int, outage: bool
) -> None:
    check_case(rds, op, method, n, "before", outage)


@pytest.mark.parametrize(("op", "method", "n"), WRITES, ids=_ids(WRITES))
def test_redis_connection_killed_after_the_command_ran(
    rds: Harness, op: str, method: str, n: int
) -> None:
    check_case(rds, op, method, n, "after", False)


@pytest.mark.parametrize(("op", "method", "n"), POINTS, ids=_ids(POINTS))
def test_redis_connection_killed_between_calls(rds: Harness, op: str, method: str, n: int) -> None:
    check_case(rds, op, method, n, "idle", False)


# --------------------------------------------------------------------------- SQLite


@pytest.mark.parametrize("outage", [False, True], ids=["once", "outage"])
@pytest.mark.parametrize(("op", "method", "n"), WRITES, ids=_ids(WRITES))
def test_sqlite_locked_by_another_process(
    lite: Harness, op: str, method: str, n: int, outage: bool
) -> None:
    check_case(lite, op, method, n, "locked", outage)


# --------------------------------------------------------------------------- disk full

_DISK_FULL = """
import json, os, resource, signal, sys

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead

import gorch
from gorch import On, S, Select, Step
from gorch.engine import Engine
from gorch.errors import StoreUnavailable
from gorch.stores import SQLiteStore

RUNS = []


class Note(gorch.Workflow):
    text: str = ""
    notes: int = 0
    done: int = 0

    def definition(self):
        return S(Select("await note", On("note", self.note)), Step("finish", self.finish))

    def note(self, text: str) -> int:
        RUNS.append("note")
        self.text = text
        self.notes += 1
        return self.notes

    def finish(self):
        RUNS.append("finish")
        self.done += 1


path = sys.argv[1]
store = SQLiteStore(path, timeout=1)
engine = Engine(store, {"note": Note}, store_retries=1)
engine.start("note", "n-1")
before = store.load("n-1")
size = max(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
out = {}
try:
    out["first"] = engine.send("n-1", "note", "x" * 2_000_000)
except StoreUnavailable as e:
    out["error"] = str(e)
out["unchanged"] = store.load("n-1") == before
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space was freed
out["second"] = engine.send("n-1", "note", "x" * 2_000_000)
snap = engine.get("n-1")
out["final"] = [snap.status, snap.data["notes"], snap.data["done"], len(snap.data["text"])]
out["runs"] = RUNS
print(json.dumps(out))
"""


def test_sqlite_disk_full_during_send(tmp_path: Path) -> None:
    """A write past the process's file-size limit (a full disk) applies nothing, says so,
    and the same send succeeds, once, when there is room again."""
    child = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, str(tmp_path / "full.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert "first" not in out, "the send reported success for an event it could not save"
    assert "full" in out["error"] and "nothing was written" in out["error"]
    assert "full.db" in out["error"]
    assert out["unchanged"] is True
    assert out["second"] == 1  # applied once: the failed attempt left nothing behind
    assert out["final"] == ["finished", 1, 1, 2_000_000]
    assert out["runs"].count("finish") == 1


# --------------------------------------------------------------------------- the worker


def _store_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in list(caplog.records) if "worker: store error" in r.getMessage()]


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "redis"])
def test_the_worker_survives_store_faults_and_stops_when_asked(
    kind: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    h: Harness = request.getfixturevalue({"sqlite": "lite", "postgres": "pg", "redis": "rds"}[kind])
    store = h.store
    deferred = Engine(store, WORKFLOWS, defer_resume=True)
    engine = Engine(store, WORKFLOWS, store_retries=0, lease=LEASE)
    processed: list[DueResult] = []
    returned: list[int] = []
    stop = threading.Event()

    def work() -> None:
        returned.append(
            engine.work(
                poll=0.01, max_backoff=0.2, should_stop=stop.is_set, on_result=processed.append
            )
        )

    worker = threading.Thread(target=work, daemon=True)
    with caplog.at_level(logging.INFO, logger="gorch"):
        h.outage()  # the store fails under a running worker
        worker.start()
        wait_until(lambda: len(_store_errors(caplog)) >= 3, "the worker logged three store errors")
        assert worker.is_alive(), "a store error ended the worker"
        h.end()  # the store is back: work that arrived meanwhile is done
        for i in range(2):
            deferred.start("order", f"w-{i}")
        wait_until(lambda: len(processed) == 2, "the worker processed both instances")
        assert sorted((r.id, r.outcome, r.status) for r in processed) == [
            ("w-0", "processed", "waiting"),
            ("w-1", "processed", "waiting"),
        ]
        errors_before_stop = len(_store_errors(caplog))
        h.outage()  # down again: a stop request still ends the worker
        wait_until(
            lambda: len(_store_errors(caplog)) > errors_before_stop, "the worker hit the outage"
        )
        stop.set()
        worker.join(WAIT)
        assert not worker.is_alive(), "the worker did not stop when asked"
        h.end()
    assert returned == [2]
    errors = _store_errors(caplog)
    for record in errors:
        message = record.getMessage()
        assert "\n" not in message and record.exc_info is None  # one line, no traceback
        assert store.url in message and "retrying in" in message
    assert any("the store answers again" in r.getMessage() for r in caplog.records)
    assert RUNS == ["reserve", "reserve"]
    for i in range(2):
        rec = store.load(f"w-{i}")
        wf, _ = gorch.loads(rec.blob, Order)
        assert (rec.status, wf.reserved) == ("waiting", 1)
