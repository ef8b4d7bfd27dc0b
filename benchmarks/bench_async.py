"""Benchmarks of ``gorch.AsyncEngine`` against the sync ``gorch.Engine``.

Run from the project root::

    .venv/bin/python benchmarks/bench_async.py            # full run, about a minute
    .venv/bin/python benchmarks/bench_async.py --quick    # a few seconds, rough figures
    .venv/bin/python benchmarks/bench_async.py --stores sqlite --json async.json

PostgreSQL is found at ``GORCH_PG_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``); a server that does not answer
is skipped, with a note in the table. Every run works in its own Postgres
tables and temporary SQLite files, and removes them at the end.

Figures (warm-up rounds, then several timed repeats; median and best repeat,
garbage collection paused while a repeat is timed):

(1) the approval workflow of ``bench_engine.py`` (a Select with a typed
    ``On("decide")`` handler and a 3-day ``Timeout``, then one step): ``start``
    (it waits), ``send("decide")`` (it finishes). The same plain-function
    workflow through the sync ``Engine`` and through ``AsyncEngine`` (on the
    async store of the same backend), with 1 and 32 workflows in flight (32
    threads for the sync Engine, 32 tasks on one event loop for the async
    one). µs per workflow (wall time / workflows) and workflows/s, and each
    row's throughput against the sync Engine at concurrency 1 in the same run.
(2) a fan-out of 10 independent steps that each wait 50 ms on I/O: the sync
    ``Engine`` (``time.sleep``, the steps run one after the other),
    ``AsyncEngine`` (``asyncio.sleep``, the steps run at once) and
    ``AsyncEngine`` with plain ``time.sleep`` steps on a 10-thread executor.
    Wall time of one workflow, in ms, against the sync Engine.

Only the standard library is used for measuring.
"""

import argparse
import asyncio
import contextlib
import functools
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench_engine import DECISION, PG_DSN, WORKFLOW, WORKFLOWS, server_problem
from benchkit import emit, environment, fmt, table

import gorch
from gorch import Parallel, S, Step
from gorch.stores import MemoryStore, Store
from gorch.stores.aio_memory import AsyncMemoryStore
from gorch.stores.base import AsyncStore

ALL_STORES = ("sqlite", "postgres")
CONCURRENCY = (1, 32)
FAN_OUT = 10
FAN_WAIT = 0.05  # seconds each fan-out step waits


# --------------------------------------------------------------------------- stores


@dataclass
class Pair:
    """A sync store and an async store of one backend, each on its own empty records."""

    kind: str
    sync: Store
    aio: AsyncStore
    tables: list[str] = field(default_factory=list)


def open_pair(kind: str, workdir: str) -> Pair:
    token = uuid.uuid4().hex[:8]
    if kind == "sqlite":
        from gorch.stores import SQLiteStore
        from gorch.stores.aio_sqlite import AsyncSQLiteStore

        return Pair(
            kind,
            SQLiteStore(os.path.join(workdir, f"sync-{token}.db")),
            AsyncSQLiteStore(os.path.join(workdir, f"async-{token}.db")),
        )
    if kind == "postgres":
        from gorch.stores.aio_postgres import AsyncPostgresStore
        from gorch.stores.postgres import PostgresStore

        sync_table, async_table = f"gorch_bench_sync_{token}", f"gorch_bench_async_{token}"
        return Pair(
            kind,
            # One connection per workflow in flight for both: a pool smaller than the
            # concurrency would make the figures measure waiting for connections.
            PostgresStore(PG_DSN, table=sync_table, pool_max=max(CONCURRENCY)),
            AsyncPostgresStore(PG_DSN, table=async_table, pool_max=max(CONCURRENCY)),
            [sync_table, async_table],
        )
    raise ValueError(f"unknown store {kind!r}")


def drop_tables(tables: Sequence[str]) -> None:
    if not tables:
        return
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for t in tables:
            for name in (t, f"{t}_seen"):  # the store's remembered keys live in a second table
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


# --------------------------------------------------------------------------- timing


class Config:
    """How much to measure; ``quick`` trades precision for speed."""

    def __init__(self, quick: bool, stores: Sequence[str]) -> None:
        self.quick = quick
        self.stores = tuple(stores)
        self.warmup = 1
        self.repeats = 2 if quick else 5
        # (1) approval workflows per repeat
        self.approval_count = 32 if quick else 320
        # (2) fan-out workflows per repeat (each takes 50 ms to 0.5 s)
        self.fan_count = 1 if quick else 3


def _summary(per_op: Sequence[float]) -> dict[str, float]:
    us = [s * 1e6 for s in per_op]
    return {"median_us": statistics.median(us), "best_us": min(us)}


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def measure_sync(run: Callable[[list[str]], None], count: int, cfg: Config) -> dict[str, float]:
    """Seconds per item of ``run(ids)`` over ``count`` fresh ids, median and best of repeats."""
    samples = []
    for r in range(cfg.warmup + cfg.repeats):
        ids = [uuid.uuid4().hex for _ in range(count)]
        with _no_gc():
            t0 = time.perf_counter()
            run(ids)
            elapsed = time.perf_counter() - t0
        if r >= cfg.warmup:
            samples.append(elapsed / count)
    return _summary(samples)


async def measure_async(
    run: Callable[[list[str]], Awaitable[None]], count: int, cfg: Config
) -> dict[str, float]:
    """:func:`measure_sync` for a coroutine."""
    samples = []
    for r in range(cfg.warmup + cfg.repeats):
        ids = [uuid.uuid4().hex for _ in range(count)]
        with _no_gc():
            t0 = time.perf_counter()
            await run(ids)
            elapsed = time.perf_counter() - t0
        if r >= cfg.warmup:
            samples.append(elapsed / count)
    return _summary(samples)


def _row(m: dict[str, float]) -> dict[str, float]:
    return {
        "us_per_workflow_median": m["median_us"],
        "us_per_workflow_best": m["best_us"],
        "workflows_per_s": 1e6 / m["median_us"],
    }


# --------------------------------------------------------------------------- (1) approval


def _check(snap: gorch.Snapshot) -> None:
    if snap.status != "finished":
        raise AssertionError(f"benchmark workflow {snap.id} ended {snap.status}")


def sync_approval(
    engine: gorch.Engine, pool: ThreadPoolExecutor, concurrency: int
) -> Callable[[list[str]], None]:
    def one(id: str) -> None:
        engine.start(WORKFLOW, id, {"amount": 100})
        engine.send(id, "decide", DECISION)

    if concurrency == 1:

        def run(ids: list[str]) -> None:
            for id in ids:
                one(id)

        return run

    def run_pool(ids: list[str]) -> None:
        list(pool.map(one, ids))

    return run_pool


def async_approval(
    engine: gorch.AsyncEngine, concurrency: int
) -> Callable[[list[str]], Awaitable[None]]:
    async def one(id: str) -> None:
        await engine.start(WORKFLOW, id, {"amount": 100})
        await engine.send(id, "decide", DECISION)

    async def run(ids: list[str]) -> None:
        todo = iter(ids)

        async def worker() -> None:
            for id in todo:
                await one(id)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    return run


async def bench_approval(kind: str, workdir: str, cfg: Config) -> dict[str, Any]:
    pair = open_pair(kind, workdir)
    try:
        sync_engine = gorch.Engine(pair.sync, WORKFLOWS)
        async_engine = gorch.AsyncEngine(pair.aio, WORKFLOWS)
        rows: dict[str, Any] = {}
        for c in CONCURRENCY:
            with ThreadPoolExecutor(c) as pool:
                run = sync_approval(sync_engine, pool, c)
                rows[f"sync_{c}"] = _row(
                    await asyncio.to_thread(measure_sync, run, cfg.approval_count, cfg)
                )
        for c in CONCURRENCY:
            rows[f"async_{c}"] = _row(
                await measure_async(async_approval(async_engine, c), cfg.approval_count, cfg)
            )
        for summary in (await async_engine.list(limit=3)).items:
            _check(await async_engine.get(summary.id))
        for summary in sync_engine.list(limit=3).items:
            _check(sync_engine.get(summary.id))
        base = rows["sync_1"]["workflows_per_s"]
        for row in rows.values():
            row["throughput_vs_sync_1"] = row["workflows_per_s"] / base
        return rows
    finally:
        pair.sync.close()
        await pair.aio.close()
        drop_tables(pair.tables)


# --------------------------------------------------------------------------- (2) fan-out


class SyncFan(gorch.Workflow):
    """Ten independent steps that block 50 ms each (``time.sleep``: a blocking API call)."""

    done: dict[str, bool] = {}

    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "fan",
                *(S(Step(f"call {i}", functools.partial(self.call, i))) for i in range(FAN_OUT)),
            )
        )

    def call(self, i: int) -> None:
        time.sleep(FAN_WAIT)
        self.done[str(i)] = True  # a key per branch: branches run on copies of the data


class AsyncFan(gorch.Workflow):
    """Ten independent steps that await 50 ms each (an async API call)."""

    done: dict[str, bool] = {}

    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "fan",
                *(S(Step(f"call {i}", functools.partial(self.call, i))) for i in range(FAN_OUT)),
            )
        )

    async def call(self, i: int) -> None:
        await asyncio.sleep(FAN_WAIT)
        self.done[str(i)] = True


FANS: dict[str, type[gorch.Workflow]] = {"sync fan": SyncFan, "async fan": AsyncFan}


def _fanned(snap: gorch.Snapshot) -> None:
    if snap.status != "finished" or len(snap.data["done"]) != FAN_OUT:
        raise AssertionError(f"fan-out ended {snap.status} with {snap.data}")


async def bench_fan_out(cfg: Config) -> dict[str, Any]:
    sync_engine = gorch.Engine(MemoryStore(), FANS)
    async_engine = gorch.AsyncEngine(AsyncMemoryStore(), FANS)
    pool = ThreadPoolExecutor(FAN_OUT)
    threaded = gorch.AsyncEngine(AsyncMemoryStore(), FANS, executor=pool)

    def run_sync(ids: list[str]) -> None:
        for id in ids:
            _fanned(sync_engine.start("sync fan", id))

    def run_async(engine: gorch.AsyncEngine, name: str) -> Callable[[list[str]], Awaitable[None]]:
        async def run(ids: list[str]) -> None:
            for id in ids:
                _fanned(await engine.start(name, id))

        return run

    try:
        rows = {
            "sync_engine": await asyncio.to_thread(measure_sync, run_sync, cfg.fan_count, cfg),
            "async_engine": await measure_async(
                run_async(async_engine, "async fan"), cfg.fan_count, cfg
            ),
            "async_engine_executor": await measure_async(
                run_async(threaded, "sync fan"), cfg.fan_count, cfg
            ),
        }
    finally:
        pool.shutdown()
    base = rows["sync_engine"]["median_us"]
    return {
        name: {
            "wall_ms_median": m["median_us"] / 1000,
            "wall_ms_best": m["best_us"] / 1000,
            "speedup_vs_sync": base / m["median_us"],
        }
        for name, m in rows.items()
    }


# --------------------------------------------------------------------------- report


async def run_all_async(cfg: Config) -> dict[str, Any]:
    approval: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    workdir = tempfile.mkdtemp(prefix="gorch-bench-async-")
    try:
        for kind in cfg.stores:
            problem = server_problem(kind)
            if problem is not None:
                skipped[kind] = problem
                continue
            approval[kind] = await bench_approval(kind, workdir, cfg)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    fan_out = await bench_fan_out(cfg)
    return {
        "meta": {
            **environment(),
            "quick": cfg.quick,
            "stores": list(cfg.stores),
            "approval_workflows": cfg.approval_count,
            "repeats": cfg.repeats,
            "concurrency": list(CONCURRENCY),
            "fan_out": {"steps": FAN_OUT, "wait_s": FAN_WAIT, "workflows": cfg.fan_count},
        },
        "figures": {"approval": approval, "fan_out": fan_out},
        "skipped": {"approval": skipped},
    }


def run_all(cfg: Config) -> dict[str, Any]:
    return asyncio.run(run_all_async(cfg))


LABELS = {
    "sync_1": "Engine, 1 at a time",
    "sync_32": "Engine, 32 threads",
    "async_1": "AsyncEngine, 1 at a time",
    "async_32": "AsyncEngine, 32 tasks",
}
FAN_LABELS = {
    "sync_engine": "Engine (time.sleep, one after the other)",
    "async_engine": "AsyncEngine (asyncio.sleep, at once)",
    "async_engine_executor": "AsyncEngine (time.sleep, 10-thread executor)",
}


def render(report: dict[str, Any]) -> str:
    figures = report["figures"]
    out = ["(1) approval workflow (start -> send -> finished): sync Engine vs AsyncEngine"]
    rows = [
        [
            kind,
            LABELS[name],
            fmt(row["us_per_workflow_median"]),
            fmt(row["us_per_workflow_best"]),
            fmt(row["workflows_per_s"]),
            f"{row['throughput_vs_sync_1']:.2f}x",
        ]
        for kind, by_name in figures["approval"].items()
        for name, row in by_name.items()
    ]
    rows += [
        [kind, f"skipped: {why}", "", "", "", ""]
        for kind, why in report["skipped"]["approval"].items()
    ]
    out.append(
        table(rows, ["store", "driver", "µs/wf median", "µs/wf best", "wf/s", "vs Engine x1"])
    )
    fan = report["meta"]["fan_out"]
    out.append("")
    out.append(
        f"(2) fan-out: {fan['steps']} independent steps each waiting "
        f"{fan['wait_s'] * 1000:.0f} ms (memory store), wall time per workflow"
    )
    out.append(
        table(
            [
                [
                    FAN_LABELS[name],
                    fmt(row["wall_ms_median"]),
                    fmt(row["wall_ms_best"]),
                    f"{row['speedup_vs_sync']:.1f}x",
                ]
                for name, row in figures["fan_out"].items()
            ],
            ["driver", "ms median", "ms best", "vs Engine"],
        )
    )
    return "\n".join(out)


def _stores(value: str) -> list[str]:
    stores = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in stores if s not in ALL_STORES]
    if unknown or not stores:
        raise argparse.ArgumentTypeError(
            f"unknown store(s) {unknown or value!r}; choose from {', '.join(ALL_STORES)}"
        )
    return stores


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
