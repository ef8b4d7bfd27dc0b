"""Idle ``run_due`` on PostgreSQL after many timers fired: does the wake-up index stay fast?

Run from the project root::

    .venv/bin/python benchmarks/bench_wakeup.py            # 10^5 timers fired, a few minutes
    .venv/bin/python benchmarks/bench_wakeup.py --quick    # 2 000 timers, rough figures
    .venv/bin/python benchmarks/bench_wakeup.py --json wakeup.json

PostgreSQL is found at ``GORCH_PG_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``); the run works in a table of its
own (``gorch_bench_wake_*``, autovacuum turned off on it) and drops it at the end.

Every fired timer leaves dead entries in the wake-up index below ``now`` (the
version it was claimed from, and its lease once that is over), and only VACUUM
removes them, not while any session holds an older snapshot. What is timed is
one idle ``Engine.run_due()`` (nothing due: one claim that finds nothing),
median of many calls, on the same table by two stores:

* ``gorch``: ``PostgresStore`` as shipped (claims scan from its floor, see
  ``gorch/stores/_floor.py``);
* ``no floor``: the same store with every claim scanning the whole wake-up
  index (what gorch did before).

Rounds of due records are bulk-loaded (COPY) and fired (claim in batches of
500 with a 1 s lease, then one save each that ends the record, as ``run_due``
does), until 10^5 (2 000 with ``--quick``) have fired. After each round, once
the leases have run out, the idle call is timed while a snapshot of our own
is held open (a long transaction elsewhere, as on a busy server: nothing can
be cleaned up), and once more at the end with the snapshot released. No
VACUUM runs: autovacuum is off on the table.

Only the standard library is used for measuring.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bench_engine import PG_DSN, WORKFLOWS, server_problem
from benchkit import emit, environment, fmt, table

from gorch.engine import Engine
from gorch.stores._common import redact_url
from gorch.stores._floor import WakeFloor

LEASE = timedelta(seconds=1)
BATCH = 500
PAUSE = 6.0  # seconds after a round: the leases run out and the floor's margin passes


class Config:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.rounds = [1000, 1000] if quick else [1000, 9000, 40000, 50000]
        self.idle_calls = 50 if quick else 200


class NoFloor(WakeFloor):
    """Every claim scans the wake-up index from its start."""

    def bound(self, now: datetime) -> tuple[datetime | None, int]:
        return None, 0


def _idle_ms(engine: Engine, calls: int) -> float:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        if engine.run_due(limit=100):
            raise AssertionError("nothing should be due")
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def run(cfg: Config) -> dict[str, Any]:
    import psycopg
    from psycopg import sql

    from gorch.stores.postgres import PostgresStore

    name = f"gorch_bench_wake_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier(name)
    admin = psycopg.connect(PG_DSN, autocommit=True)
    holder = psycopg.connect(PG_DSN)  # our own snapshot, held open during the rounds
    floored = PostgresStore(PG_DSN, table=name)
    plain = PostgresStore(PG_DSN, table=name)
    plain._ops.floor = NoFloor()
    rows: list[dict[str, float]] = []
    t_start = time.perf_counter()
    try:
        floored.migrate()
        admin.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(ident))
        engines = {"gorch": Engine(floored, WORKFLOWS), "plain": Engine(plain, WORKFLOWS)}
        for e in engines.values():
            _idle_ms(e, 5)  # connect, prepare
        empty = {k: _idle_ms(e, cfg.idle_calls) for k, e in engines.items()}
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT 1")  # the snapshot is taken: nothing dead can go from now on
        copy = sql.SQL("COPY {} (id, workflow, status, blob, version, wake_at) FROM STDIN").format(
            ident
        )
        fired = 0
        for count in cfg.rounds:
            past = datetime.now(UTC) - timedelta(hours=1)
            with admin.cursor().copy(copy) as cp:
                for i in range(count):
                    cp.write_row((f"w{fired + i:07d}", "approval", "waiting", b"x" * 200, 1, past))
            # Written behind the store's back: tell it, as its own create() would have.
            floored._ops.floor.wrote(past)
            t0 = time.perf_counter()
            while batch := floored.claim_due(datetime.now(UTC), BATCH, LEASE):
                for rec in batch:
                    floored.save(rec.id, rec.version, "finished", b"y" * 200, None)
            fire_s = time.perf_counter() - t0
            fired += count
            time.sleep(PAUSE)
            rows.append(
                {
                    "fired": float(fired),
                    "fire_s": fire_s,
                    **{f"{k}_idle_ms": _idle_ms(e, cfg.idle_calls) for k, e in engines.items()},
                }
            )
            print(f"bench_wakeup: {fired} fired: {rows[-1]}", file=sys.stderr)
        holder.rollback()  # the snapshot is gone: scans may now mark dead entries as such
        released = {k: _idle_ms(e, cfg.idle_calls) for k, e in engines.items()}
        dead = admin.execute(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = %s", (name,)
        ).fetchone()
    finally:
        floored.close()
        plain.close()
        holder.close()
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(f"{name}_seen")))
        admin.close()
    last = rows[-1]
    return {
        "meta": {
            **environment(),
            "quick": cfg.quick,
            "postgres": redact_url(PG_DSN),
            "idle_calls": cfg.idle_calls,
            "lease_s": LEASE.total_seconds(),
            "wall_seconds": time.perf_counter() - t_start,
        },
        "figures": {
            "empty_gorch_idle_ms": empty["gorch"],
            "empty_plain_idle_ms": empty["plain"],
            "rounds": rows,
            "released_gorch_idle_ms": released["gorch"],
            "released_plain_idle_ms": released["plain"],
            "dead_tuples": float(dead[0]) if dead else 0.0,
            "gorch_after_over_empty": last["gorch_idle_ms"] / empty["gorch"],
            "plain_after_over_empty": last["plain_idle_ms"] / empty["plain"],
        },
    }


def render(report: dict[str, Any]) -> str:
    fig = report["figures"]
    out = [
        f"gorch {report['meta']['gorch']} wake-up index benchmark: idle Engine.run_due() on "
        f"PostgreSQL, median of {report['meta']['idle_calls']} calls (ms)",
        "",
    ]
    body = [
        ["0 (empty table)", "-", fmt(fig["empty_gorch_idle_ms"]), fmt(fig["empty_plain_idle_ms"])]
    ]
    for r in fig["rounds"]:
        body.append(
            [
                f"{r['fired']:,.0f}",
                fmt(r["fire_s"]),
                fmt(r["gorch_idle_ms"]),
                fmt(r["plain_idle_ms"]),
            ]
        )
    body.append(
        [
            "snapshot released",
            "",
            fmt(fig["released_gorch_idle_ms"]),
            fmt(fig["released_plain_idle_ms"]),
        ]
    )
    out.append(table(body, ["timers fired", "fire s", "gorch ms", "no floor ms"]))
    out.append(
        f"-> after {fig['rounds'][-1]['fired']:,.0f} timers: gorch "
        f"{fig['gorch_after_over_empty']:.2f}x its empty-table cost, without the floor "
        f"{fig['plain_after_over_empty']:.2f}x ({fig['dead_tuples']:,.0f} dead tuples, no VACUUM)"
    )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 000 timers (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    problem = server_problem("postgres")
    if problem is not None:
        print(f"bench_wakeup: PostgreSQL unreachable: {problem}", file=sys.stderr)
        return 2
    report = run(Config(args.quick))
    emit(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
