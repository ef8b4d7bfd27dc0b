"""The Engine's CPU cost against its floor, in instructions (callgrind): a steady figure.

Run from the project root (needs ``valgrind``)::

    .venv/bin/python benchmarks/bench_engine_cpu.py                    # memory, SQLite
    .venv/bin/python benchmarks/bench_engine_cpu.py --stores memory,sqlite,postgres
    .venv/bin/python benchmarks/bench_engine_cpu.py --workflows 300 --json cpu.json

``bench_engine.py`` times gorch against a hand-written floor (its figure (2)),
but on a shared machine the floor itself moves by tens of per cent from one
run to the next. This script counts what this process executes instead, which
hardly moves with the machine's load: the approval workflow of
``bench_engine.py`` (``start``, then ``send("decide")``, to the end) run by the
Engine, and the same three stages run by the floor of ``bench_engine.py``
(``bench_floors.py``), in instructions per workflow.

* ``memory``: the Engine on the memory store against gorch's bare core with a
  dict (the memory goal's baseline, 1.5x).
* ``sqlite``: the Engine on the SQLite store against the SQLite floor with
  its wake-up index, both with ``synchronous=OFF``: only the CPU (Python and
  SQLite's own code), not the disk. The goal of 1.3x is on time at full
  durability, where waiting for the disk is part of both sides.
* ``postgres``: the client's side only (gorch, psycopg and libpq), not the
  server's work nor the round trips.

On SQLite and PostgreSQL a third side, ``core``, runs gorch's bare core (no
Engine) on the floor's own SQL (``bench_floors.CoreRowFloor``): the core's
share of gorch's cost against the floor's.

Each count runs in a fresh interpreter (``PYTHONHASHSEED=0``) that first runs
``--warmup`` workflows uncounted, then ``--workflows`` workflows inside
``functools.reduce``, and callgrind collects only while that C function runs
(``--toggle-collect``): imports, set-up and the warm-up are not counted. A
Python whose symbols are stripped collects nothing there; the count is then the
difference between a run of ``2n`` workflows and one of ``n``, divided by ``n``.

Only the standard library is used for measuring.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchkit import emit, environment, fmt, table

HERE = os.path.dirname(os.path.abspath(__file__))
STORES = ("memory", "sqlite", "postgres")
SIDES = ("gorch", "floor", "core")
GOALS = {"memory": 1.5, "sqlite": 1.3, "postgres": 1.3}

# The child: one side of one store, ``warmup`` workflows, then ``count`` of them inside
# functools.reduce (the only code callgrind counts with --toggle-collect).
CHILD = r"""
import atexit, functools, json, os, shutil, sys, tempfile, uuid
sys.path.insert(0, BENCH_DIR)
import bench_engine as be
from bench_floors import CoreFloor, CoreRowFloor, PostgresFloor, SQLiteFloor

kind, side, warmup, count, toggle = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
workdir = tempfile.mkdtemp(prefix="gorch-cpu-")
if side == "gorch":
    from gorch.engine import Engine
    if kind == "memory":
        store = "memory://"
    elif kind == "sqlite":
        store = f"sqlite:///{workdir}/gorch.db?synchronous=off"
    else:
        from gorch.stores.postgres import PostgresStore
        table = f"gorch_bench_cpu_{uuid.uuid4().hex[:8]}"
        store = PostgresStore(be.PG_DSN, table=table)
    engine = Engine(store, be.WORKFLOWS)

    def close():
        engine.store.close()
        if kind == "postgres":
            import psycopg
            with psycopg.connect(be.PG_DSN, autocommit=True) as conn:
                for t in (table, f"{table}_seen"):
                    conn.execute(f'DROP TABLE IF EXISTS "{t}"')

    def one(_, wid):
        engine.start(be.WORKFLOW, wid, {"amount": 120.0})
        engine.send(wid, "decide", be.DECISION)
        return None

    def check(wid):
        return engine.get(wid).status
else:
    if kind == "memory":
        floor = CoreFloor(be.WORKFLOW, be.Approval)
    elif kind == "sqlite":
        floor = SQLiteFloor(f"{workdir}/floor.db", "OFF", timers=True)
    else:
        floor = PostgresFloor(be.PG_DSN, timers=True)
    if side == "core":  # gorch's bare core on the floor's SQL
        floor = CoreRowFloor(floor, be.WORKFLOW, be.Approval)
    close = floor.close

    def one(_, wid):
        floor.create(wid, 120.0)
        state, version = floor.apply(wid, be.DECISION)
        floor.finish(wid, state, version)
        return None

    def check(wid):
        return floor.stage(wid)

atexit.register(shutil.rmtree, workdir, True)
atexit.register(close)  # runs first
for i in range(warmup):
    one(None, f"warm-{i:06d}")
ids = [f"w-{i:06d}" for i in range(count)]
if toggle:
    functools.reduce(one, ids, None)
else:
    for wid in ids:
        one(None, wid)
assert all(getattr(s, "value", s) == "finished" for s in map(check, ids[:: max(1, count // 10)]))
print(json.dumps({"done": count}))
"""


def _child_code() -> str:
    return CHILD.replace("BENCH_DIR", repr(HERE))


def _collected(kind: str, side: str, warmup: int, count: int, toggle: bool) -> int:
    """Instructions callgrind collects in one child run (see the module's docstring)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={os.path.join(tmp, 'cg.out')}",
            *(["--collect-atstart=no", "--toggle-collect=functools_reduce"] if toggle else []),
            sys.executable,
            "-c",
            _child_code(),
            kind,
            side,
            str(warmup),
            str(count),
            str(int(toggle)),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind}/{side} failed under valgrind:\n{out.stderr[-3000:]}")
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def instructions(kind: str, side: str, warmup: int, count: int) -> float:
    """Instructions per workflow of ``side`` on ``kind``, counted inside the measured batch."""
    collected = _collected(kind, side, warmup, count, toggle=True)
    if collected:
        return collected / count
    small = _collected(kind, side, warmup, count, toggle=False)
    return (_collected(kind, side, warmup, 2 * count, toggle=False) - small) / count


def server_problem(kind: str) -> str | None:
    """Why PostgreSQL cannot be measured (None: it answers)."""
    if kind != "postgres":
        return None
    sys.path.insert(0, HERE)
    import bench_engine

    return bench_engine.server_problem(kind)


def run_all(stores: Sequence[str], warmup: int, count: int) -> dict[str, Any]:
    """Every side of every store, counted in children run side by side (one per CPU:
    a count does not depend on what else the machine runs)."""
    skipped = {k: why for k in stores if (why := server_problem(k)) is not None}
    live = [k for k in stores if k not in skipped]
    # (on memory, the floor is the bare core already)
    runs = [(kind, side) for kind in live for side in SIDES if side != "core" or kind != "memory"]
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        counts = dict(
            zip(runs, pool.map(lambda run: instructions(*run, warmup, count), runs), strict=True)
        )
    figures: dict[str, dict[str, float]] = {}
    for kind in live:
        gorch, floor = counts[kind, "gorch"], counts[kind, "floor"]
        figures[kind] = {
            "gorch_instructions_per_workflow": gorch,
            "floor_instructions_per_workflow": floor,
            "gorch_over_floor": gorch / floor,
            "goal": GOALS[kind],
        }
        if (kind, "core") in counts:
            core = counts[kind, "core"]
            figures[kind]["core_instructions_per_workflow"] = core
            figures[kind]["core_over_floor"] = core / floor
    return {
        "meta": {**environment(), "warmup": warmup, "workflows": count, "stores": list(stores)},
        "figures": figures,
        "skipped": skipped,
    }


def render(report: dict[str, Any]) -> str:
    rows = []
    for kind, f in report["figures"].items():
        rows.append(
            [
                kind,
                fmt(f["gorch_instructions_per_workflow"] / 1000),
                fmt(f["floor_instructions_per_workflow"] / 1000),
                f"{f['gorch_over_floor']:.2f}x",
                f"<= {f['goal']}x (time)",
                _core(f),
            ]
        )
    for kind, why in report["skipped"].items():
        rows.append([kind, "-", "-", "-", f"skipped: {why[:60]}", ""])
    meta = report["meta"]
    return "\n".join(
        [
            f"gorch {meta['gorch']} engine CPU — Python {meta['python']}, instructions per"
            f" approval workflow (start -> send -> finished), {meta['workflows']} counted"
            f" after {meta['warmup']} uncounted",
            table(rows, ["store", "gorch k instr", "floor k instr", "ratio", "goal", "core alone"]),
            "   (memory: against the bare core with a dict; sqlite: synchronous=OFF, CPU only;",
            "    postgres: the client's side only. Goals are on time, at full durability.",
            "    core alone: gorch's bare core on the floor's SQL, no Engine, k instr and ratio.)",
        ]
    )


def _core(f: dict[str, float]) -> str:
    if "core_instructions_per_workflow" not in f:
        return ""
    return f"{fmt(f['core_instructions_per_workflow'] / 1000)} ({f['core_over_floor']:.2f}x)"


def _stores(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in STORES]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown store(s) {', '.join(unknown) or '(none)'}; choose from {','.join(STORES)}"
        )
    return list(dict.fromkeys(kinds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", type=_stores, default=["memory", "sqlite"], metavar="LIST")
    parser.add_argument("--workflows", type=int, default=200, help="counted per run")
    parser.add_argument("--warmup", type=int, default=100, help="run first, not counted")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    if args.workflows < 1 or args.warmup < 0:
        parser.error("--workflows must be at least 1 and --warmup at least 0")
    report = run_all(args.stores, args.warmup, args.workflows)
    emit(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
