"""Bulk start: ``Engine.start_many`` of the approval workflow, 10^6 waiting instances.

Run from the project root::

    .venv/bin/python benchmarks/bench_bulk.py                 # 10^6 per store: minutes
    .venv/bin/python benchmarks/bench_bulk.py --quick         # 2 000 per store, seconds
    .venv/bin/python benchmarks/bench_bulk.py --count 100000 --stores sqlite --json bulk.json

Each store (SQLite in a temporary file, PostgreSQL at ``GORCH_PG_DSN`` in a
table of its own) gets ``--count`` approval workflows from one
``engine.start_many`` call (batches of ``--batch``); every one blocks in its
Select at once, so each is written waiting, with its 3-day timer in the
wake-up index. Timed: the call, from the first item to the last commit. Then
counted (untimed): the records in status ``waiting`` must be ``--count``. In
the same run, ``engine.start`` of a sample of instances one by one gives the
speed-up per instance. The goal: 10^6 in under 2 minutes on SQLite and on
PostgreSQL. Everything written is removed at the end.

Only the standard library is used for measuring.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from bench_engine import PG_DSN, WORKFLOW, WORKFLOWS, server_problem
from benchkit import emit, environment, fmt, table

from gorch.engine import Engine
from gorch.stores import Store
from gorch.stores._common import redact_url

ALL_STORES = ("sqlite", "postgres")
GOAL_SECONDS = 120.0  # for 10^6


class Config:
    def __init__(self, count: int, batch: int, stores: Sequence[str], sample: int) -> None:
        self.count = count
        self.batch = batch
        self.stores = tuple(stores)
        self.sample = sample


def _items(count: int) -> Iterator[dict[str, Any]]:
    for i in range(count):
        yield {"amount": float(i % 1000)}


class Place:
    """A fresh store of one kind, how to count its waiting records, and how to remove it."""

    def __init__(self, kind: str, workdir: str) -> None:
        self.kind = kind
        token = uuid.uuid4().hex[:8]
        if kind == "sqlite":
            from gorch.stores import SQLiteStore

            self.path = os.path.join(workdir, f"bulk-{token}.db")
            self.store: Store = SQLiteStore(self.path)
        else:
            from gorch.stores.postgres import PostgresStore

            self.table = f"gorch_bench_bulk_{token}"
            self.store = PostgresStore(PG_DSN, table=self.table)

    def waiting(self) -> int:
        if self.kind == "sqlite":
            import sqlite3

            with sqlite3.connect(self.path) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM gorch_workflows WHERE status = 'waiting'"
                    " AND wake_at IS NOT NULL"
                ).fetchone()
        else:
            import psycopg
            from psycopg import sql

            with psycopg.connect(PG_DSN) as conn:
                row = conn.execute(
                    sql.SQL(
                        "SELECT count(*) FROM {} WHERE status = 'waiting' AND wake_at IS NOT NULL"
                    ).format(sql.Identifier(self.table))
                ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.store.close()
        if self.kind == "postgres":
            import psycopg
            from psycopg import sql

            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                for t in (self.table, f"{self.table}_seen"):
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(t)))


def bench(kind: str, cfg: Config, workdir: str) -> dict[str, float]:
    place = Place(kind, workdir)
    try:
        engine = Engine(place.store, WORKFLOWS)
        engine.start_many(WORKFLOW, _items(10))  # schema, connections, warm caches
        t0 = time.perf_counter()
        ids = engine.start_many(WORKFLOW, _items(cfg.count), batch=cfg.batch)
        bulk_s = time.perf_counter() - t0
        if len(ids) != cfg.count:
            raise AssertionError(f"start_many returned {len(ids)} ids, not {cfg.count}")
        t0 = time.perf_counter()
        for item in _items(cfg.sample):
            engine.start(WORKFLOW, data=item)
        one_s = time.perf_counter() - t0
        waiting = place.waiting()
        if waiting != cfg.count + 10 + cfg.sample:
            raise AssertionError(f"{waiting} waiting records, not {cfg.count + 10 + cfg.sample}")
        return {
            "count": float(cfg.count),
            "batch": float(cfg.batch),
            "seconds": bulk_s,
            "instances_per_s": cfg.count / bulk_s,
            "us_per_instance": bulk_s / cfg.count * 1e6,
            "start_us_per_instance": one_s / cfg.sample * 1e6,
            "start_over_bulk": (one_s / cfg.sample) / (bulk_s / cfg.count),
            "projected_s_per_million": bulk_s / cfg.count * 1e6,
        }
    finally:
        place.close()


def run(cfg: Config) -> dict[str, Any]:
    t0 = time.perf_counter()
    skipped: dict[str, str] = {}
    figures: dict[str, Any] = {}
    workdir = tempfile.mkdtemp(prefix="gorch-bulk-")
    try:
        for kind in cfg.stores:
            if kind == "postgres" and (problem := server_problem("postgres")) is not None:
                skipped[kind] = f"server unreachable ({problem[:80]})"
                print(f"bench_bulk: {kind}: {skipped[kind]}", file=sys.stderr)
                continue
            figures[kind] = bench(kind, cfg, workdir)
            print(f"bench_bulk: {kind}: {figures[kind]}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "meta": {
            **environment(),
            "stores": list(cfg.stores),
            "count": cfg.count,
            "batch": cfg.batch,
            "sample": cfg.sample,
            "postgres": redact_url(PG_DSN) if "postgres" in cfg.stores else "",
            "goal_seconds_per_million": GOAL_SECONDS,
            "wall_seconds": time.perf_counter() - t0,
        },
        "skipped": skipped,
        "figures": figures,
    }


def render(report: dict[str, Any]) -> str:
    meta = report["meta"]
    rows = []
    for kind in meta["stores"]:
        if kind in report["skipped"]:
            rows.append([kind, "-", "-", "-", "-", "-", f"skipped: {report['skipped'][kind]}"])
            continue
        v = report["figures"][kind]
        verdict = "within" if v["projected_s_per_million"] <= GOAL_SECONDS else "ABOVE"
        rows.append(
            [
                kind,
                f"{v['count']:,.0f}",
                fmt(v["seconds"]),
                fmt(v["instances_per_s"]),
                fmt(v["us_per_instance"]),
                f"{v['start_over_bulk']:.1f}x",
                f"{v['projected_s_per_million']:.0f} s per 10^6 ({verdict} {GOAL_SECONDS:.0f} s)",
            ]
        )
    header = [
        "store",
        "instances",
        "seconds",
        "per s",
        "µs each",
        "start/bulk",
        "10^6 at this rate",
    ]
    return "\n".join(
        [
            f"gorch {meta['gorch']} bulk start: Engine.start_many('approval', ...), batches of "
            f"{meta['batch']}, every instance written waiting; start() of {meta['sample']} for"
            " comparison",
            "",
            table(rows, header),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 000 instances (smoke test)")
    parser.add_argument("--count", type=int, default=None, help="instances per store")
    parser.add_argument("--batch", type=int, default=1000, help="records per write")
    parser.add_argument(
        "--stores", default=",".join(ALL_STORES), help=f"comma-separated, of {ALL_STORES}"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = [s for s in stores if s not in ALL_STORES]
    if unknown or not stores:
        parser.error(f"unknown store(s) {unknown}; choose from {','.join(ALL_STORES)}")
    count = args.count or (2000 if args.quick else 1_000_000)
    cfg = Config(count, args.batch, stores, sample=100 if args.quick else 1000)
    report = run(cfg)
    emit(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
