"""Benchmarks of the gorch Engine against real stores (memory, SQLite, PostgreSQL, Redis).

Run from the project root::

    .venv/bin/python benchmarks/bench_engine.py            # full run, a minute or two
    .venv/bin/python benchmarks/bench_engine.py --quick    # a few seconds, rough figures
    .venv/bin/python benchmarks/bench_engine.py --stores memory,sqlite --json engine.json

PostgreSQL and Redis are found at ``GORCH_PG_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``) and ``GORCH_REDIS_URL`` (default
``redis://127.0.0.1:6379/15``); a server that does not answer is skipped, with
a note in the table. Every run works in its own Postgres table, Redis key
prefix and temporary SQLite files, and removes them at the end.

Figures (warm-up rounds, then several timed repeats; median and best repeat,
garbage collection paused while a repeat is timed, as in ``bench_core.py``):

(1) the approval workflow (a Select with a typed ``On("decide")`` handler and a
    3-day ``Timeout``, then one step), driven by the Engine: ``start`` (it
    waits), ``send("decide")`` (it finishes). Workflows/s and µs per workflow
    on each store, split into start and send, and the store calls one workflow
    costs.
(2) gorch against a hand-written floor on the same store, timed in turn with
    (1), repeat after repeat (see ``bench_floors.py``): on SQLite and
    PostgreSQL a dict state machine keeping msgpack in one row per workflow
    that commits after each of the same three stages (create; apply the
    event; finish) with single statements, at the same durability (SQLite:
    WAL and the store's ``synchronous``); on memory, gorch's own core
    (``resume``, ``handle_event``, ``dumps``, ``loads``) with a dict. gorch's
    ratio to it; the goals are 1.3x (SQLite, PostgreSQL) and 1.5x (memory).
(3) ``Engine.run_due(now, limit=1000)`` with 1 000 due workflows (their
    Timeout expired) among 100 000 stored (10 000 with ``--quick``), against
    the same 1 000 due among 1 000 stored. The records are bulk-loaded with
    real ``gorch.dumps`` blobs. The time must not grow with the records that
    are not due: both timings and their ratio are reported, for ``run_due``
    (claim + fire the timer + run the steps + save) and for the store's
    ``claim_due`` alone (the index lookup the ratio is about).
(4) the blob size of a waiting approval workflow, and the floor's.

Only the standard library is used for measuring.
"""

import argparse
import contextlib
import functools
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
import pydantic
from bench_floors import CoreFloor, CoreRowFloor, PostgresFloor, SQLiteFloor, new_state
from benchkit import count_calls, emit, environment, fmt, table, timed

import gorch
from gorch import On, S, Select, Step, Timeout
from gorch.engine import DueResult, Engine
from gorch.stores import Store, open_store
from gorch.stores._common import redact_url

PG_DSN = os.environ.get("GORCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GORCH_REDIS_URL", "redis://127.0.0.1:6379/15")

ALL_STORES = ("memory", "sqlite", "postgres", "redis")
SERVER_STORES = ("postgres", "redis")
FLOOR_GOALS = {"memory": 1.5, "sqlite": 1.3, "postgres": 1.3}
"""The most gorch may cost per workflow, in times its floor on the same store."""

WORKFLOW = "approval"
DECISION = {"approved": True, "by": "ann"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- the workflow


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Approval(gorch.Workflow):
    """Wait for a decision (typed handler) or three days, then close the request."""

    amount: float
    status: str = "pending"
    approver: str = ""
    closed: bool = False

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "await decision",
                On("decide", self.on_decide),
                Timeout("expired", timedelta(days=3), Step("escalate", self.escalate)),
            ),
            Step("close", self.close),
        )

    def on_decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        self.approver = d.by
        return {"status": self.status}

    def escalate(self) -> None:
        self.status = "escalated"

    def close(self) -> None:
        self.closed = True


WORKFLOWS: dict[str, type[gorch.Workflow]] = {WORKFLOW: Approval}


# --------------------------------------------------------------------------- stores


def server_problem(kind: str) -> str | None:
    """Why the server (or driver) for ``kind`` cannot be used, or None when it answers."""
    try:
        if kind == "postgres":
            import psycopg

            with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
        elif kind == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
            try:
                client.ping()
            finally:
                client.close()
    except Exception as exc:
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    return None


@dataclass
class Site:
    """One isolated store of one kind, and what the benchmark needs to fill and drop it."""

    kind: str
    store: Store
    path: str = ""  # SQLite file
    namespace: str = ""  # Postgres table / Redis key prefix
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Close the store and remove everything the benchmark wrote."""
        with contextlib.suppress(Exception):
            self.store.close()
        for closer in reversed(self._closers):
            closer()
        if self.kind == "sqlite":
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path + suffix)
        elif self.kind == "postgres":
            import psycopg
            from psycopg import sql

            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                for table in (self.namespace, f"{self.namespace}_seen"):
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        elif self.kind == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            try:
                batch: list[bytes] = []
                for key in client.scan_iter(match=f"{self.namespace}:*", count=5000):
                    batch.append(key)
                    if len(batch) >= 5000:
                        client.delete(*batch)
                        batch.clear()
                if batch:
                    client.delete(*batch)
            finally:
                client.close()


def open_site(kind: str, workdir: str, label: str) -> Site:
    """A fresh, empty store of ``kind``: its own SQLite file, Postgres table or Redis prefix."""
    token = uuid.uuid4().hex[:8]
    if kind == "memory":
        return Site(kind, open_store("memory://"))
    if kind == "sqlite":
        path = os.path.join(workdir, f"{label}-{token}.db")
        return Site(kind, open_store(f"sqlite:///{path}"), path=path)
    if kind == "postgres":
        from gorch.stores.postgres import PostgresStore

        table = f"gorch_bench_{label}_{token}"
        return Site(kind, PostgresStore(PG_DSN, table=table), namespace=table)
    if kind == "redis":
        from gorch.stores.redis import RedisStore

        prefix = f"gorch-bench-{label}-{token}"
        return Site(kind, RedisStore(REDIS_URL, prefix=prefix), namespace=prefix)
    raise ValueError(f"unknown store {kind!r}")


@contextlib.contextmanager
def site(kind: str, workdir: str, label: str) -> Iterator[Site]:
    s = open_site(kind, workdir, label)
    try:
        yield s
    finally:
        s.close()


def _micros(when: datetime) -> int:
    return (when - EPOCH) // timedelta(microseconds=1)


Row = tuple[str, bytes, datetime]  # id, gorch blob, wake_at


class BulkLoader:
    """Fast inserts and deletes of waiting records, for the run_due benchmark only.

    SQLite: one transaction of ``executemany`` into the store's table.
    PostgreSQL: ``COPY``. Redis: the store's own ``create`` / ``delete`` Lua
    scripts, queued on a pipeline. Memory: the store's ``create`` / ``delete``.
    Every record is what ``Store.create`` would write: version 1, status
    ``waiting``, the blob and its ``wake_at``.
    """

    def __init__(self, s: Site) -> None:
        self.site = s
        self.kind = s.kind
        if self.kind == "sqlite":
            s.store.list(limit=1)  # let the store create its schema
            self.conn = sqlite3.connect(s.path, isolation_level=None, timeout=30.0)
            s._closers.append(self.conn.close)
        elif self.kind == "postgres":
            import psycopg
            from psycopg import sql

            s.store.migrate()  # type: ignore[attr-defined]
            self.pg = psycopg.connect(PG_DSN, autocommit=True)
            s._closers.append(self.pg.close)
            table = sql.Identifier(s.namespace)
            self._copy = sql.SQL(
                "COPY {} (id, workflow, status, blob, version, wake_at) FROM STDIN"
            ).format(table)
            self._delete = sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(table)
            self._analyze = sql.SQL("ANALYZE {}").format(table)

    def insert(self, rows: Sequence[Row]) -> None:
        if self.kind == "sqlite":
            stamp = time.time_ns() // 1000
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "INSERT INTO gorch_workflows (id, workflow, status, blob, version, wake_at,"
                " updated_at) VALUES (?, ?, 'waiting', ?, 1, ?, ?)",
                ((id, WORKFLOW, blob, _micros(when), stamp) for id, blob, when in rows),
            )
            self.conn.execute("COMMIT")
        elif self.kind == "postgres":
            with self.pg.transaction(), self.pg.cursor().copy(self._copy) as copy:
                for id, blob, when in rows:
                    copy.write_row((id, WORKFLOW, "waiting", blob, 1, when))
        elif self.kind == "redis":
            for chunk in _chunks(rows, 5000):
                with self._pipelined() as store:
                    for id, blob, when in chunk:
                        store.create(id, WORKFLOW, "waiting", blob, when)
        else:
            for id, blob, when in rows:
                self.site.store.create(id, WORKFLOW, "waiting", blob, when)

    def delete(self, ids: Sequence[str]) -> None:
        if self.kind == "sqlite":
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("DELETE FROM gorch_workflows WHERE id = ?", ((i,) for i in ids))
            self.conn.execute("COMMIT")
        elif self.kind == "postgres":
            self.pg.execute(self._delete, (list(ids),))
        elif self.kind == "redis":
            for chunk in _chunks(ids, 5000):
                with self._pipelined() as store:
                    for id in chunk:
                        store.delete(id)
        else:
            for id in ids:
                self.site.store.delete(id)

    def analyze(self) -> None:
        """Postgres: refresh the planner's statistics after the bulk load, as autovacuum would."""
        if self.kind == "postgres":
            self.pg.execute(self._analyze)

    @contextlib.contextmanager
    def _pipelined(self) -> Iterator["_Pipelined"]:
        """The store's own create / delete scripts, queued on one pipeline; every queued
        result is checked when it is sent."""
        store: Any = self.site.store
        queued = _Pipelined(store, store._client.pipeline(transaction=False))
        yield queued
        results = queued.pipe.execute()
        if not all(r == 1 for r in results):
            raise RuntimeError("a pipelined Redis create/delete did not apply")


class _Pipelined:
    """A RedisStore's create and delete, their scripts queued on ``pipe`` instead of sent."""

    def __init__(self, store: Any, pipe: Any) -> None:
        self.store, self.pipe = store, pipe

    def _queue(self, op: Any) -> None:
        request = next(op.steps())  # the one Script the operation sends
        self.store._scripts[request.name](keys=request.keys, args=request.args, client=self.pipe)

    def create(self, id: str, workflow: str, status: str, blob: bytes, wake: datetime) -> None:
        self._queue(self.store._ops.create(id, workflow, status, blob, wake, (), 200, ()))

    def delete(self, id: str) -> None:
        self._queue(self.store._ops.delete(id))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --------------------------------------------------------------------------- timing


class Config:
    """How much to measure; ``quick`` trades precision for speed."""

    def __init__(self, quick: bool, stores: Sequence[str]) -> None:
        self.quick = quick
        self.stores = tuple(stores)
        self.repeats = 3 if quick else 5
        self.warmup = 1
        # (1) approval workflows per repeat, per store
        self.approval_count = (
            {"memory": 100, "sqlite": 20, "postgres": 20, "redis": 50}
            if quick
            else {"memory": 2000, "sqlite": 200, "postgres": 200, "redis": 1000}
        )
        # (3) run_due: each timing processes 1 000 workflows (a few commits each)
        self.due = 1000
        self.stored = 10_000 if quick else 100_000
        self.due_warmup = 0 if quick else 1
        self.due_repeats = 1 if quick else 3


_timed = timed


def _med_best(samples: Sequence[float]) -> tuple[float, float]:
    return statistics.median(samples), min(samples)


# --------------------------------------------------------------------------- (1) + (2)


def _approval_runner(engine: Engine, check: Callable[[str], str]) -> Callable[[str, int], Any]:
    """``run(prefix, count)`` -> (seconds, start seconds, send seconds) for ``count`` workflows."""
    start, send, clock = engine.start, engine.send, time.perf_counter

    def run(prefix: str, count: int) -> tuple[float, float, float]:
        ids = [f"{prefix}-{i:06d}" for i in range(count)]
        split = [0.0, 0.0]

        def batch() -> None:
            t_start = t_send = 0.0
            for wid in ids:
                t0 = clock()
                start(WORKFLOW, wid, {"amount": 120.0})
                t1 = clock()
                send(wid, "decide", DECISION)
                t2 = clock()
                t_start += t1 - t0
                t_send += t2 - t1
            split[:] = [t_start, t_send]

        elapsed = _timed(batch)
        for wid in ids:
            if check(wid) != "finished":
                raise AssertionError(f"approval workflow {wid} did not finish: {check(wid)}")
        return elapsed, split[0], split[1]

    return run


Floor = CoreFloor | CoreRowFloor | SQLiteFloor | PostgresFloor


def _floor_runner(floor: Floor) -> Callable[[str, int], tuple[float, float, float]]:
    clock = time.perf_counter

    def run(prefix: str, count: int) -> tuple[float, float, float]:
        ids = [f"{prefix}-{i:06d}" for i in range(count)]
        split = [0.0, 0.0]

        def batch() -> None:
            t_start = t_send = 0.0
            for wid in ids:
                t0 = clock()
                floor.create(wid, 120.0)
                t1 = clock()
                state, version = floor.apply(wid, DECISION)
                floor.finish(wid, state, version)
                t2 = clock()
                t_start += t1 - t0
                t_send += t2 - t1
            split[:] = [t_start, t_send]

        elapsed = _timed(batch)
        for wid in ids:
            if floor.stage(wid) != "finished":
                raise AssertionError(f"floor workflow {wid} did not finish")
        return elapsed, split[0], split[1]

    return run


def _interleaved(
    runners: dict[str, Callable[[str, int], tuple[float, float, float]]], count: int, cfg: Config
) -> dict[str, dict[str, float]]:
    """Time every runner once per repeat, in turn, so that drift hits them alike."""
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runners}
    for r in range(cfg.warmup + cfg.repeats):
        for name, run in runners.items():
            result = run(f"{name}-r{r}", count)
            if r >= cfg.warmup:
                samples[name].append(result)
    out: dict[str, dict[str, float]] = {}
    for name, rows in samples.items():
        per_wf = [total / count * 1e6 for total, _, _ in rows]
        median, best = _med_best(per_wf)
        out[name] = {
            "workflows_per_s": 1e6 / median,
            "us_per_workflow_median": median,
            "us_per_workflow_best": best,
            "start_us_median": statistics.median(s / count * 1e6 for _, s, _ in rows),
            "send_us_median": statistics.median(s / count * 1e6 for _, _, s in rows),
        }
    return out


def open_floors(kind: str, s: Site) -> dict[str, Floor]:
    """The hand-written floors for gorch on ``kind`` (see ``bench_floors``), at equal
    durability: ``floor`` (the goal's; on SQL stores the *equivalent* one, with a
    wake-up index and a lease, as gorch keeps) and, on SQL stores, ``minimal``."""
    if kind == "memory":
        return {"floor": CoreFloor(WORKFLOW, Approval)}
    if kind == "sqlite":
        sync = s.store.synchronous  # type: ignore[attr-defined]
        return {
            "floor": SQLiteFloor(s.path, sync, timers=True),
            "minimal": SQLiteFloor(s.path, sync),
            "core": CoreRowFloor(SQLiteFloor(s.path, sync, timers=True), WORKFLOW, Approval),
        }
    if kind == "postgres":
        return {
            "floor": PostgresFloor(PG_DSN, timers=True),
            "minimal": PostgresFloor(PG_DSN),
            "core": CoreRowFloor(PostgresFloor(PG_DSN, timers=True), WORKFLOW, Approval),
        }
    return {}


def bench_approval(kind: str, cfg: Config, workdir: str) -> dict[str, dict[str, float]]:
    """(1) on one store and (2) its floor, timed in turn, repeat after repeat."""
    count = cfg.approval_count[kind]
    with site(kind, workdir, "approval") as s:
        engine = Engine(s.store, WORKFLOWS)
        runners = {kind: _approval_runner(engine, lambda wid: s.store.load(wid).status)}
        floors = open_floors(kind, s)
        for name, floor in floors.items():
            runners[name] = _floor_runner(floor)
        try:
            return _interleaved(runners, count, cfg)
        finally:
            for floor in floors.values():
                floor.close()


def store_calls() -> dict[str, float]:
    """Store calls one approval workflow makes (start + send), counted on a MemoryStore."""
    store = open_store("memory://")
    counts = count_calls(store, ("create", "save", "load"))
    engine = Engine(store, WORKFLOWS)
    engine.start(WORKFLOW, "calls-1", {"amount": 120.0})
    writes_start = counts["create"] + counts["save"]
    engine.send("calls-1", "decide", DECISION)
    writes = counts["create"] + counts["save"]
    return {
        "writes_per_workflow": float(writes),
        "writes_in_start": float(writes_start),
        "writes_in_send": float(writes - writes_start),
        "loads_per_workflow": float(counts["load"]),
        "floor_writes_per_workflow": 3.0,
        "floor_loads_per_workflow": 1.0,
    }


# --------------------------------------------------------------------------- (3)


def waiting_rows(stored: int, due: int, now: datetime) -> tuple[list[Row], list[str]]:
    """``stored`` waiting approval records, ``due`` of them with their Timeout expired.

    Each blob is ``gorch.dumps`` of a real waiting workflow, its id and its timer
    set per record: due ones an hour ago (the Timeout fires on ``run_due``),
    the others in 30 days. The due ones are spread evenly through the id range.
    """
    wf = Approval(amount=120.0)
    state = gorch.new_state("template", WORKFLOW)
    if gorch.resume(wf, state) is not gorch.WorkflowStatus.WAITING:
        raise AssertionError("the approval workflow should wait for its decision")
    timer = next(we.req for t in state.threads for we in t.wait_events if we.req.name == "expired")
    step = stored // due
    rows: list[Row] = []
    due_ids: list[str] = []
    past, future = now - timedelta(hours=1), now + timedelta(days=30)
    dumps = gorch.dumps
    for i in range(stored):
        wid = f"wf-{i:07d}"
        is_due = i % step == 0 and len(due_ids) < due
        when = (past if is_due else future) + timedelta(microseconds=i)
        state.id = wid
        for t in state.threads:
            for we in t.wait_events:
                we.req.workflow_id = wid
        timer.setup_data = when.isoformat()
        rows.append((wid, dumps(wf, state), when))
        if is_due:
            due_ids.append(wid)
    return rows, due_ids


class DueCase:
    """One store holding ``rows``; ``due`` of them are reset to due before each timing."""

    def __init__(self, s: Site, rows: Sequence[Row], due_ids: Sequence[str]) -> None:
        self.site = s
        self.loader = BulkLoader(s)
        self.loader.insert(rows)
        self.loader.analyze()
        wanted = set(due_ids)
        self.due_rows = [r for r in rows if r[0] in wanted]
        self.engine = Engine(s.store, WORKFLOWS)
        self.stored = len(rows)

    def reset(self) -> None:
        """Put the due records back as they were: waiting, timer expired, version 1."""
        ids = [r[0] for r in self.due_rows]
        self.loader.delete(ids)
        self.loader.insert(self.due_rows)

    def time_run_due(self, limit: int) -> float:
        results: list[DueResult] = []
        engine = self.engine

        def run() -> None:
            while len(results) < len(self.due_rows):
                batch = engine.run_due(datetime.now(UTC), limit=limit)
                if not batch:
                    break
                results.extend(batch)

        elapsed = _timed(run)
        self._check(results)
        return elapsed

    def time_claim(self, limit: int) -> float:
        claimed: list[Any] = []
        store, lease = self.site.store, timedelta(seconds=60)

        def run() -> None:
            claimed.extend(store.claim_due(datetime.now(UTC), limit, lease))

        elapsed = _timed(run)
        if sorted(r.id for r in claimed) != sorted(r[0] for r in self.due_rows):
            raise AssertionError(f"claim_due claimed {len(claimed)} records, not the due ones")
        return elapsed

    def _check(self, results: Sequence[Any]) -> None:
        due = {r[0] for r in self.due_rows}
        if len(results) != len(due) or {r.id for r in results} != due:
            raise AssertionError(f"run_due processed {len(results)} records, not the due ones")
        for r in results:
            if r.error or r.action != "timer" or r.fired != ["expired"] or r.status != "finished":
                raise AssertionError(f"run_due did not fire and finish {r.id}: {r!r}")


def bench_run_due(
    kind: str, cfg: Config, workdir: str, data: tuple[list[Row], list[str]]
) -> dict[str, float]:
    """(3) run_due over ``cfg.due`` due records among ``cfg.stored`` vs among ``cfg.due``."""
    rows, due_ids = data
    wanted = set(due_ids)
    small_rows = [r for r in rows if r[0] in wanted]
    with site(kind, workdir, "due_small") as s_small, site(kind, workdir, "due_big") as s_big:
        t0 = time.perf_counter()
        big = DueCase(s_big, rows, due_ids)
        load_s = time.perf_counter() - t0
        small = DueCase(s_small, small_rows, due_ids)
        cases = {"small": small, "big": big}
        run: dict[str, list[float]] = {"small": [], "big": []}
        claim: dict[str, list[float]] = {"small": [], "big": []}
        for r in range(cfg.due_warmup + cfg.due_repeats):
            for name, case in cases.items():
                case.reset()
                claim_s = case.time_claim(cfg.due)
                case.reset()
                run_s = case.time_run_due(cfg.due)
                if r >= cfg.due_warmup:
                    claim[name].append(claim_s)
                    run[name].append(run_s)
    small_med, small_best = _med_best(run["small"])
    big_med, big_best = _med_best(run["big"])
    claim_small = statistics.median(claim["small"])
    claim_big = statistics.median(claim["big"])
    return {
        "due": float(cfg.due),
        "stored_small": float(len(small_rows)),
        "stored_big": float(len(rows)),
        "bulk_load_s": load_s,
        "run_due_ms_small_median": small_med * 1e3,
        "run_due_ms_small_best": small_best * 1e3,
        "run_due_ms_big_median": big_med * 1e3,
        "run_due_ms_big_best": big_best * 1e3,
        "us_per_due_small": small_med / cfg.due * 1e6,
        "us_per_due_big": big_med / cfg.due * 1e6,
        "run_due_big_over_small": big_med / small_med,
        "claim_ms_small_median": claim_small * 1e3,
        "claim_ms_big_median": claim_big * 1e3,
        "claim_big_over_small": claim_big / claim_small,
    }


# --------------------------------------------------------------------------- (4)


def blob_sizes() -> dict[str, float]:
    """Bytes stored for one approval workflow waiting for its decision, and the floor's."""
    store = open_store("memory://")
    Engine(store, WORKFLOWS).start(WORKFLOW, "blob-1", {"amount": 120.0})
    stored = store.load("blob-1")
    if stored.status != "waiting":
        raise AssertionError(f"the approval workflow should wait, not be {stored.status}")
    floor = msgpack.packb(new_state(120.0), use_bin_type=True)
    return {
        "gorch_waiting_bytes": float(len(stored.blob)),
        "floor_waiting_bytes": float(len(floor)),
    }


# --------------------------------------------------------------------------- report


_table = table
_f = fmt


def _skip_row(kind: str, why: str, ncols: int) -> list[str]:
    """A table row saying why a store was skipped, its note in the last column."""
    return [kind, *["-"] * (ncols - 2), f"skipped: {why}"]


def render(report: dict[str, Any]) -> str:
    fig = report["figures"]
    meta = report["meta"]
    skipped: dict[str, dict[str, str]] = report["skipped"]
    out: list[str] = [
        f"gorch {meta['gorch']} engine benchmarks — Python {meta['python']} "
        f"({meta['implementation']}), {'quick' if meta['quick'] else 'full'} run, "
        f"median and best of {meta['repeats']} repeats after {meta['warmup']} warm-up",
        "",
    ]
    header = ["store", "wf/s", "µs/wf", "best µs/wf", "start µs", "send µs", "note"]
    rows: list[list[str]] = []
    for kind in meta["stores"]:
        if kind in skipped["approval"]:
            rows.append(_skip_row(kind, skipped["approval"][kind], len(header)))
            continue
        v = fig["approval"][kind]
        rows.append(
            [
                kind,
                _f(v["workflows_per_s"]),
                _f(v["us_per_workflow_median"]),
                _f(v["us_per_workflow_best"]),
                _f(v["start_us_median"]),
                _f(v["send_us_median"]),
                f"{meta['approval_count'][kind]} wf/repeat",
            ]
        )
    calls = fig["store_calls"]
    out.append("(1) approval workflow: start -> send('decide') -> finished")
    out.append("    Select(On 'decide' typed handler, Timeout 3 days) then Step 'close'")
    out.append(_table(rows, header))
    out.append(
        f"   store calls per workflow: {calls['writes_per_workflow']:.0f} writes "
        f"({calls['writes_in_start']:.0f} in start, {calls['writes_in_send']:.0f} in send), "
        f"{calls['loads_per_workflow']:.0f} loads; the floor: "
        f"{calls['floor_writes_per_workflow']:.0f} writes, "
        f"{calls['floor_loads_per_workflow']:.0f} load"
    )
    out.append("")

    out.append(
        "(2) gorch against its floor, timed in turn (memory: gorch's core with a dict;"
        " SQLite, PostgreSQL: msgpack in one row, 3 commits, same durability, with a"
        " wake-up index and a lease as gorch keeps them; 'minimal': without them;"
        " 'core alone': gorch's bare core on the floor's SQL, no Engine)"
    )
    rows = []
    for kind in meta["stores"]:
        f2 = fig["floor"].get(kind)
        if f2 is None:
            continue
        g = fig["approval"][kind]
        ratio, goal = f2["gorch_over_floor"], f2["goal"]
        verdict = "within" if ratio <= goal else "ABOVE"
        minimal = f2.get("gorch_over_minimal")
        core = f2.get("core_over_floor")
        rows.append(
            [
                kind,
                _f(g["us_per_workflow_median"]),
                _f(f2["us_per_workflow_median"]),
                _f(g["start_us_median"] - f2["start_us_median"]),
                _f(g["send_us_median"] - f2["send_us_median"]),
                f"{ratio:.2f}x",
                f"<= {goal:g}x ({verdict})",
                "" if minimal is None else f"{minimal:.2f}x",
                "" if core is None else f"{core:.2f}x",
            ]
        )
    if rows:
        header = [
            "store",
            "gorch µs/wf",
            "floor µs/wf",
            "+start µs",
            "+send µs",
            "ratio",
            "goal",
            "vs minimal",
            "core alone",
        ]
        out.append(_table(rows, header))
        for kind in meta["stores"]:
            f2 = fig["floor"].get(kind, {})
            if "core_over_floor" in f2:
                room = f2["goal"] - f2["core_over_floor"]
                added = f2["gorch_over_floor"] - f2["core_over_floor"]
                out.append(
                    f"   {kind}: the bare core on the floor's SQL is {f2['core_over_floor']:.2f}x"
                    f" the floor; the {f2['goal']:g}x goal leaves {room:+.2f}x for the Engine"
                    f" and the store, which add {added:.2f}x"
                )
    else:
        out.append("   (no store with a floor among --stores)")
    out.append("")

    out.append(
        f"(3) run_due(now, limit={meta['due']:,}): {meta['due']:,} due (Timeout expired) "
        f"among {meta['due']:,} vs {meta['stored']:,} stored; median and best of "
        f"{meta['due_repeats']} repeats after {meta['due_warmup']} warm-up"
    )
    header = ["store", "stored", "run_due ms", "best ms", "µs/due wf", "claim_due ms", "note"]
    rows = []
    for kind in meta["due_stores"]:
        if kind in skipped["run_due"]:
            rows.append(_skip_row(kind, skipped["run_due"][kind], len(header)))
            continue
        v = fig["run_due"][kind]
        for size in ("small", "big"):
            rows.append(
                [
                    kind if size == "small" else "",
                    f"{v[f'stored_{size}']:,.0f}",
                    _f(v[f"run_due_ms_{size}_median"]),
                    _f(v[f"run_due_ms_{size}_best"]),
                    _f(v[f"us_per_due_{size}"]),
                    _f(v[f"claim_ms_{size}_median"]),
                    "",
                ]
            )
        rows.append(
            [
                "",
                "big/small",
                f"{v['run_due_big_over_small']:.2f}x",
                "",
                "",
                f"{v['claim_big_over_small']:.2f}x",
                f"(bulk load {v['bulk_load_s']:.1f} s)",
            ]
        )
    out.append(_table(rows, header))
    out.append("   (run_due: claim + fire the timer + run 'escalate' and 'close' + saves;")
    out.append("    claim_due: the store's claim of the due records alone; ratio ≈ 1 is the goal)")
    out.append("")

    b = fig["blob"]
    out.append("(4) stored blob of one approval workflow waiting in its Select")
    out.append(
        _table(
            [
                ["gorch.dumps (in the store)", f"{b['gorch_waiting_bytes']:.0f}"],
                ["floor's msgpack dict", f"{b['floor_waiting_bytes']:.0f}"],
            ],
            ["", "bytes"],
        )
    )
    return "\n".join(out)


def _lost_connection(exc: BaseException) -> bool:
    """Whether ``exc`` says a server connection failed (not a bug in gorch or here)."""
    from gorch.errors import StoreUnavailable

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (StoreUnavailable, ConnectionError, TimeoutError)):
            return True
        module = type(seen).__module__
        if module.startswith(("redis", "psycopg")) and type(seen).__name__ in (
            "ConnectionError",
            "TimeoutError",
            "OperationalError",
            "InterfaceError",
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _guarded(kind: str, section: str, run: Callable[[], Any], notes: dict[str, str]) -> Any:
    """``run()``; for a server store, one retry after a lost connection, then a note.

    The servers may be shared (another client can restart them or kill our
    connections): such a failure skips the store in this section instead of
    ending the whole run. Any other error, and every error on memory or SQLite,
    propagates.
    """
    attempts = 2 if kind in SERVER_STORES else 1
    for attempt in range(attempts):
        try:
            return run()
        except Exception as exc:
            if kind not in SERVER_STORES or not _lost_connection(exc):
                raise
            why = " ".join(f"{type(exc).__name__}: {exc}".split())[:80]
            print(f"bench_engine: {section} on {kind}: {why}", file=sys.stderr)
            if attempt == attempts - 1:
                notes[kind] = f"connection lost ({why})"
    return None


def run_all(cfg: Config) -> dict[str, Any]:
    t0 = time.perf_counter()
    unreachable: dict[str, str] = {}
    for kind in cfg.stores:
        if kind in SERVER_STORES:
            problem = server_problem(kind)
            if problem is not None:
                unreachable[kind] = f"server unreachable ({problem[:80]})"
    skipped: dict[str, dict[str, str]] = {"approval": dict(unreachable), "run_due": {}}
    skipped["run_due"].update(unreachable)
    live = [k for k in cfg.stores if k not in unreachable]
    due_stores = list(cfg.stores)
    figures: dict[str, Any] = {"approval": {}, "floor": {}, "run_due": {}}
    sections: dict[str, float] = {}
    workdir = tempfile.mkdtemp(prefix="gorch-bench-")
    try:
        for kind in live:
            t1 = time.perf_counter()
            result = _guarded(
                kind,
                "(1) approval",
                functools.partial(bench_approval, kind, cfg, workdir),
                skipped["approval"],
            )
            sections[f"approval/{kind}"] = time.perf_counter() - t1
            if result is None:
                continue
            figures["approval"][kind] = result[kind]
            if "floor" in result:
                floor = result["floor"]
                floor["gorch_over_floor"] = (
                    result[kind]["us_per_workflow_median"] / floor["us_per_workflow_median"]
                )
                floor["goal"] = FLOOR_GOALS[kind]
                if "minimal" in result:
                    minimal = result["minimal"]["us_per_workflow_median"]
                    floor["minimal_us_per_workflow_median"] = minimal
                    floor["gorch_over_minimal"] = result[kind]["us_per_workflow_median"] / minimal
                if "core" in result:  # the bare core on the floor's SQL
                    core = result["core"]["us_per_workflow_median"]
                    floor["core_us_per_workflow_median"] = core
                    floor["core_over_floor"] = core / floor["us_per_workflow_median"]
                figures["floor"][kind] = floor
        figures["store_calls"] = store_calls()
        if live:
            t1 = time.perf_counter()
            data = waiting_rows(cfg.stored, cfg.due, datetime.now(UTC))
            sections["run_due/blobs"] = time.perf_counter() - t1
            for kind in live:
                t1 = time.perf_counter()
                result = _guarded(
                    kind,
                    "(3) run_due",
                    functools.partial(bench_run_due, kind, cfg, workdir, data),
                    skipped["run_due"],
                )
                sections[f"run_due/{kind}"] = time.perf_counter() - t1
                if result is not None:
                    figures["run_due"][kind] = result
        figures["blob"] = blob_sizes()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "meta": {
            **environment(),
            "quick": cfg.quick,
            "repeats": cfg.repeats,
            "due_repeats": cfg.due_repeats,
            "due_warmup": cfg.due_warmup,
            "warmup": cfg.warmup,
            "stores": list(cfg.stores),
            "due_stores": due_stores,
            "approval_count": {k: cfg.approval_count[k] for k in cfg.stores},
            "due": cfg.due,
            "stored": cfg.stored,
            "postgres": redact_url(PG_DSN) if "postgres" in cfg.stores else "",
            "redis": redact_url(REDIS_URL) if "redis" in cfg.stores else "",
            "sqlite_dir": os.path.dirname(workdir),
            "wall_seconds": time.perf_counter() - t0,
            "section_seconds": sections,
            "units": "µs unless named otherwise (ms, s, bytes, per-second, ratios x)",
        },
        "reference": {"floor_goals": FLOOR_GOALS},
        "skipped": skipped,
        "figures": figures,
    }


def _stores(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ALL_STORES]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown store(s) {', '.join(unknown) or '(none)'}; choose from {','.join(ALL_STORES)}"
        )
    return list(dict.fromkeys(kinds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    parser.add_argument(
        "--stores",
        type=_stores,
        default=list(ALL_STORES),
        metavar="LIST",
        help=f"comma-separated stores to measure (default: {','.join(ALL_STORES)})",
    )
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    report = run_all(Config(quick=args.quick, stores=args.stores))
    emit(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
