"""Compare the core's speed in two source trees, run alternately on the same machine.

Run from the project root::

    .venv/bin/python benchmarks/bench_compare.py BASE_TREE NEW_TREE
    .venv/bin/python benchmarks/bench_compare.py ../base . --figures a,handler --rounds 9
    .venv/bin/python benchmarks/bench_compare.py ../base . --instructions --json cmp.json

Each tree is a checkout of the project (a directory holding ``gorch/``). Every
round runs each figure once per tree, each run in a fresh interpreter whose
``gorch`` is that tree's, in alternating order (base first, then new first),
so that a machine whose speed drifts (shared CPUs) slows both alike. The
workloads are this script's own (``bench_core.py`` and ``bench_dag.py`` next
to it), the same code for both trees. A run times ``--repeats`` batches of
``--ops`` ops after a warm-up batch, with the garbage collector paused, and
keeps its best batch; the table shows, per tree, the median over rounds, and
the ratio new/base (the median of each round's ratio; below 1 is faster).

``--instructions`` also counts instructions per op under valgrind's callgrind
(needs ``valgrind``): the difference between a run of ``2n`` and of ``n`` ops,
divided by ``n``, so start-up and imports cancel out. Instruction counts hardly
move with the machine's load: a steadier measure than time on a shared machine.

Figures:

  a        bench_core (a): new workflow + new_state, resume, event, resume, event,
           resume (gorchestrate's benchmark); µs per op
  handler  (a) with a setup/teardown Handler and a checkpoint callback; µs per op
  step     one resume of 1 000 straight steps (bench_core (b)); µs per step
  step10k  one resume of 10 000 straight steps; µs per step (should equal ``step``)
  dag      one resume of a random 1 000-node DAG (bench_dag (a)); µs per node
  loop     For i < 100 around a Select, driven to the end (bench_core (d)); µs per iteration
  mw       ``step`` with ``middleware=[gorch.Middleware()]`` (an empty stack); µs per step

``--go DIR`` also runs gorchestrate's own Go benchmark of (a)'s workflow
(``go test -bench`` in ``DIR``, a checkout of github.com/gorchestrate/async,
which is not part of this repository) once per round, in turn with the trees,
for figures ``a`` and ``handler``, and adds each tree's factor against it (the
median of each round's own factor). The Go benchmark has a handler and a
checkpoint callback, as ``handler`` has. How to build it: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from benchkit import add_go_options, go_checkout, run_go

HERE = os.path.dirname(os.path.abspath(__file__))

#: figure -> (default ops per batch, units per op, what one unit is)
FIGURES: dict[str, tuple[int, int, str]] = {
    "a": (2000, 1, "op"),
    "handler": (2000, 1, "op"),
    "step": (20, 1000, "step"),
    "step10k": (2, 10000, "step"),
    "dag": (4, 1000, "node"),
    "loop": (20, 100, "iteration"),
    "mw": (20, 1000, "step"),
}

#: Figures whose workflow is gorchestrate's benchmark (compared with Go under ``--go``).
GO_FIGURES = ("a", "handler")

# The code a child interpreter runs: argv = tree, figure, ops, repeats, warmup[, "count"].
# With "count" (under callgrind), the warm-up batches are followed by one batch run
# through functools.reduce, the only code callgrind counts (see ``instructions``).
CHILD = r"""
import functools, gc, json, sys, time
tree, figure, ops, repeats, warmup = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
count = sys.argv[6:] == ["count"]
sys.path[:0] = [tree, BENCH_DIR]
import gorch
assert gorch.__file__.startswith(tree), (gorch.__file__, tree)
import bench_core as bc

FINISHED = gorch.WorkflowStatus.FINISHED

# A workflow class is made once per run: the first resume of a new class validates
# and indexes its definition (a one-off cost per class), which is not what a
# figure measures; a class made per batch would charge it to that batch's ops.
_classes = {}

def made_once(key, make):
    if key not in _classes:
        _classes[key] = make()
    return _classes[key]

def items_and_op():
    if figure == "a":
        return [None] * ops, bc._gorchestrate_op
    if figure == "handler":
        return [None] * ops, bc._handler_op
    if figure in ("step", "step10k", "mw"):
        n = 10000 if figure == "step10k" else 1000
        cls = made_once(n, lambda: bc.linear_class(n))
        mw = [gorch.Middleware()] if figure == "mw" else ()
        items = [(cls(), gorch.new_state("s", "linear")) for _ in range(ops)]
        return items, lambda it: gorch.resume(it[0], it[1], middleware=mw)
    if figure == "dag":
        import bench_dag as bd
        cls = made_once("dag", lambda: bd.dag_class(bd.random_deps(1000)))
        items = [(cls(), gorch.new_state("d", "dag")) for _ in range(ops)]
        return items, lambda it: gorch.resume(it[0], it[1])
    if figure == "loop":
        def drive(_):
            wf = bc.EventLoop(n=100)
            state = gorch.new_state("l", "loop")
            gorch.resume(wf, state)
            for _ in range(100):
                gorch.handle_event(wf, state, "tick")
                gorch.resume(wf, state)
            return state.status
        return [None] * ops, drive
    raise SystemExit(f"unknown figure {figure!r}")

samples = []
for r in range(warmup + (1 if count else repeats)):
    items, op = items_and_op()
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    if count and r >= warmup:  # counted: the ops alone, no start-up, import or warm-up
        out = []
        functools.reduce(lambda _, it: out.append(op(it)), items, None)
    else:
        out = [op(it) for it in items]
    took = time.perf_counter() - t0
    gc.enable()
    assert all(o is FINISHED for o in out), out[:3]
    if r >= warmup:
        samples.append(took / ops)
print(json.dumps({"seconds_per_op": samples, "gorch": gorch.__file__}))
"""


def child_code() -> str:
    return CHILD.replace("BENCH_DIR", repr(HERE))


def run_child(tree: str, figure: str, ops: int, repeats: int, warmup: int) -> list[float]:
    """Seconds per op of each timed batch, in a fresh interpreter importing ``tree``'s gorch."""
    cmd = [sys.executable, "-c", child_code(), tree, figure, str(ops), str(repeats), str(warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tree)
    return list(json.loads(out.stdout.splitlines()[-1])["seconds_per_op"])


def instructions(tree: str, figure: str, ops: int) -> float:
    """Instructions per op under callgrind, counted inside the measured batch only.

    The child runs one warm-up batch, then one batch of ``ops`` ops inside
    ``functools.reduce``, and callgrind collects only while that C function runs
    (``--toggle-collect``): start-up, imports and the warm-up are not counted, so
    two trees with the same code give the same count, whatever their paths. A
    Python without the symbol (stripped) collects nothing: then the count is the
    difference between a run of ``2n`` ops and one of ``n``, divided by ``n``.
    """
    collected = _callgrind(tree, figure, ops, toggle=True)
    if collected:
        return collected / ops
    return (_callgrind(tree, figure, 2 * ops) - _callgrind(tree, figure, ops)) / (2 * ops)


def _callgrind(tree: str, figure: str, ops: int, toggle: bool = False) -> int:
    """Instructions callgrind collects in a child run of ``ops`` ops (see :func:`instructions`)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={os.path.join(tmp, 'cg.out')}",
            *(["--collect-atstart=no", "--toggle-collect=functools_reduce"] if toggle else []),
            sys.executable,
            "-c",
            child_code(),
            tree,
            figure,
            str(ops),
            "1",
            "1",
            *(["count"] if toggle else []),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tree, env=env)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def compare(
    trees: Sequence[str],
    figures: Sequence[str],
    rounds: int,
    repeats: int,
    scale: float,
    instr: bool,
    go: tuple[str, str] | None = None,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for figure in figures:
        ops, units, unit = FIGURES[figure]
        ops = max(1, int(ops * scale))
        per_tree: list[list[float]] = [[] for _ in trees]
        with_go = go if figure in GO_FIGURES else None
        go_us: list[float] = []
        for r in range(rounds):
            order = range(len(trees)) if r % 2 == 0 else reversed(range(len(trees)))
            if with_go is not None and r % 2 == 0:  # Go first in even rounds, last in odd
                go_us.append(min(run_go(*with_go, ops, repeats)) * 1e6)
            for k in order:
                samples = run_child(trees[k], figure, ops, repeats, 1)
                per_tree[k].append(min(samples) / units * 1e6)
            if with_go is not None and r % 2 == 1:
                go_us.append(min(run_go(*with_go, ops, repeats)) * 1e6)
        base = per_tree[0]
        entry: dict[str, Any] = {
            "unit": f"µs per {unit}",
            "us": [statistics.median(v) for v in per_tree],
            "us_rounds": per_tree,
            "ratio": [
                statistics.median(v / b for v, b in zip(col, base, strict=True)) for col in per_tree
            ],
        }
        if go_us:
            entry["go_us"] = statistics.median(go_us)
            entry["go_us_rounds"] = go_us
            entry["vs_go"] = [
                statistics.median(v / g for v, g in zip(col, go_us, strict=True))
                for col in per_tree
            ]
        if instr:
            ins = [instructions(tree, figure, max(1, ops // 10)) / units for tree in trees]
            entry["instructions"] = ins
            entry["instructions_ratio"] = [i / ins[0] for i in ins]
        results[figure] = entry
        print("...", render_row(figure, entry, len(trees)), file=sys.stderr, flush=True)
    return {"trees": list(trees), "rounds": rounds, "repeats": repeats, "figures": results}


def render_row(figure: str, e: dict[str, Any], n: int) -> str:
    cells = [f"{figure:<8}", f"{e['unit']:<18}"]
    for k in range(n):
        cells.append(f"{e['us'][k]:9.2f}")
        if k:
            cells.append(f"{e['ratio'][k]:6.3f}x")
    if "instructions" in e:
        for k in range(n):
            cells.append(f"{e['instructions'][k]:11,.0f}")
            if k:
                cells.append(f"{e['instructions_ratio'][k]:6.3f}x")
    if "vs_go" in e:
        cells.append(f"Go {e['go_us']:.2f}: " + ", ".join(f"{x:.2f}x" for x in e["vs_go"]))
    return "  ".join(cells)


def render(report: dict[str, Any]) -> str:
    trees = report["trees"]
    lines = [f"tree {k}: {t}" for k, t in enumerate(trees)]
    head = ["figure  ", f"{'unit':<18}"]
    for k in range(len(trees)):
        head.append(f"{'tree ' + str(k):>9}")
        if k:
            head.append(f"{'ratio':>7}")
    if any("instructions" in e for e in report["figures"].values()):
        for k in range(len(trees)):
            head.append(f"{'instr ' + str(k):>11}")
            if k:
                head.append(f"{'ratio':>7}")
    lines.append("  ".join(head))
    for figure, e in report["figures"].items():
        lines.append(render_row(figure, e, len(trees)))
    lines.append(
        f"(median over {report['rounds']} rounds, each the best of {report['repeats']} "
        "batches; ratio: the median of each round's tree k / tree 0)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="source trees; the first is the base")
    parser.add_argument("--figures", default="a,handler", help=f"of {', '.join(FIGURES)}")
    parser.add_argument("--rounds", type=int, default=7, help="runs per tree and figure")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per run")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the ops per batch")
    parser.add_argument("--instructions", action="store_true", help="also count (callgrind)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    add_go_options(parser, "run its benchmark in turn")
    args = parser.parse_args(argv)
    figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        parser.error(f"unknown figures {unknown}; known: {', '.join(FIGURES)}")
    trees = [os.path.abspath(t) for t in args.trees]
    for t in trees:
        if not os.path.isfile(os.path.join(t, "gorch", "__init__.py")):
            parser.error(f"{t} holds no gorch/ package")
    checkout = go_checkout(parser, args)
    go = None if checkout is None else (checkout, args.go_bench)
    report = compare(trees, figures, args.rounds, args.repeats, args.scale, args.instructions, go)
    print(render(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
