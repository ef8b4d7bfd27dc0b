"""Benchmarks of DAG scheduling and of the middleware stack.

Run from the project root::

    .venv/bin/python benchmarks/bench_dag.py            # full run, about half a minute
    .venv/bin/python benchmarks/bench_dag.py --quick    # a few seconds, rough figures
    .venv/bin/python benchmarks/bench_dag.py --json bench_dag.json

Figures (warm-up rounds, then several timed repeats; the median and the best
repeat are reported, garbage collection paused while a repeat is timed, as in
``bench_core.py``):

(a) one resume of a random DAG of N nodes (seeded; node k runs after 0-3
    random earlier nodes; every node one step, so one thread each), from
    ``new_state`` to FINISHED, against a straight workflow ``S(Step x N)``
    of the same number of steps: µs per node, the DAG/straight ratio, and how
    the per-node time grows from N = 100 to 1 000 (to 10 000): about 1 when
    scheduling is linear, 10 if it were quadratic.
(b) one resume of a straight workflow of 1 000 steps with no middleware, an
    empty stack (``middleware=[gorch.Middleware()]``) and
    ``gorch.LoggingMiddleware`` on a logger that emits at INFO, into a
    ``NullHandler`` (the cost of building the records) and into a formatting
    handler writing to ``os.devnull`` (records formatted with their fields):
    µs per step and the ratio to no middleware.

Only the standard library is used for measuring.
"""

import argparse
import itertools
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench_core import linear_class
from benchkit import emit, environment, fmt, measure, table

import gorch
from gorch import DAG, S, Step

FINISHED = gorch.WorkflowStatus.FINISHED
SEED = 20240501
MAX_DEPS = 3
MIDDLEWARE_STEPS = 1000


# --------------------------------------------------------------------------- workflows


def random_deps(n: int, seed: int = SEED) -> list[list[int]]:
    """For each node k, 0-3 distinct random earlier nodes (seeded: the same DAG every run)."""
    rnd = random.Random(seed * 1_000_003 + n)
    return [sorted(rnd.sample(range(k), min(k, rnd.randint(0, MAX_DEPS)))) for k in range(n)]


def depth_of(deps: list[list[int]]) -> int:
    """Nodes on the longest dependency chain."""
    depth: list[int] = []
    for ds in deps:
        depth.append(1 + max((depth[d] for d in ds), default=0))
    return max(depth, default=0)


def dag_class(deps: list[list[int]], record: bool = False) -> type[gorch.Workflow]:
    """A class whose definition is always the DAG ``deps`` (a static shape)."""
    n = len(deps)
    after = [[f"n{d}" for d in ds] for ds in deps]

    class RandomDag(gorch.Workflow):
        i: int = 0
        order: list[str] = []

        def definition(self) -> gorch.Section:
            inc = self.inc
            return S(DAG("dag", *[Step(f"n{k}", inc, after=after[k]) for k in range(n)]))

        def inc(self) -> None:
            self.i += 1

    if not record:
        return RandomDag

    class RecordingDag(RandomDag):
        def on_step_start(self, ctx: gorch.StepContext) -> None:
            self.order.append(ctx.step)

    return RecordingDag


def check_dag_order(deps: list[list[int]]) -> None:
    """Run the DAG once (untimed) and check every node ran once, after its dependencies."""
    wf: Any = dag_class(deps, record=True)()
    state = gorch.new_state("dag-check", "dag")
    if gorch.resume(wf, state) is not FINISHED:
        raise AssertionError(f"the {len(deps)}-node DAG did not finish")
    position = {name: k for k, name in enumerate(wf.order)}
    if len(wf.order) != len(deps) or len(position) != len(deps):
        raise AssertionError(f"{len(wf.order)} steps ran for {len(deps)} nodes")
    for k, ds in enumerate(deps):
        for d in ds:
            if position[f"n{d}"] > position[f"n{k}"]:
                raise AssertionError(f"node n{k} ran before its dependency n{d}")


# --------------------------------------------------------------------------- timing


class Config:
    """How much to measure; ``quick`` trades precision for speed."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.repeats = 3 if quick else 9
        self.warmup = 1 if quick else 2
        # (a): nodes -> workflows resumed per repeat
        self.dag_sizes = {100: 20, 1000: 2} if quick else {100: 200, 1000: 20, 10000: 3}
        # (b): workflows of MIDDLEWARE_STEPS steps resumed per repeat
        self.mw_count = 2 if quick else 20


def _resume(item: tuple[Any, gorch.State]) -> tuple[gorch.WorkflowStatus, int]:
    wf, state = item
    return gorch.resume(wf, state), wf.i


# --------------------------------------------------------------------------- benchmarks


def bench_dag(cfg: Config) -> dict[str, dict[str, float]]:
    """(a) one resume of a random N-node DAG and of N straight steps, new_state to FINISHED."""
    out: dict[str, dict[str, float]] = {}
    for n, count in cfg.dag_sizes.items():
        deps = random_deps(n)
        check_dag_order(deps)
        dag = dag_class(deps)
        line = linear_class(n)

        def prepare_dag(cls: Any = dag) -> tuple[Any, gorch.State]:
            return cls(), gorch.new_state("dag", "dag")

        def prepare_line(cls: Any = line) -> tuple[Any, gorch.State]:
            return cls(), gorch.new_state("linear", "linear")

        def done(r: Any, n: int = n) -> bool:
            return bool(r == (FINISHED, n))

        d = measure(prepare_dag, _resume, count, cfg, check=done)
        s = measure(prepare_line, _resume, count, cfg, check=done)
        build = measure(lambda cls=dag: cls(), lambda wf: wf.definition(), count, cfg)
        out[str(n)] = {
            "edges": float(sum(map(len, deps))),
            "depth": float(depth_of(deps)),
            "dag_resume_us_median": d["median_us"],
            "dag_resume_us_best": d["best_us"],
            "dag_us_per_node_median": d["median_us"] / n,
            "dag_us_per_node_best": d["best_us"] / n,
            "dag_build_us_median": build["median_us"],
            "linear_us_per_step_median": s["median_us"] / n,
            "linear_us_per_step_best": s["best_us"] / n,
            "dag_over_linear": d["median_us"] / s["median_us"],
        }
    return out


def growth(dag: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per-node (per-step) time at each size over the size ten times smaller."""
    out: dict[str, float] = {}
    sizes = sorted(dag, key=int)
    for small, big in itertools.pairwise(sizes):
        a, b = dag[small], dag[big]
        key = f"{small}_to_{big}"
        out[f"dag_{key}"] = b["dag_us_per_node_median"] / a["dag_us_per_node_median"]
        out[f"linear_{key}"] = b["linear_us_per_step_median"] / a["linear_us_per_step_median"]
    return out


def _quiet_logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)  # LoggingMiddleware's records are emitted
    logger.propagate = False
    return logger


def bench_middleware(cfg: Config) -> dict[str, dict[str, float]]:
    """(b) one resume of MIDDLEWARE_STEPS straight steps under each middleware stack."""
    devnull = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    try:
        stream = logging.StreamHandler(devnull)
        stream.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s "
                "%(gorch_workflow_id)s %(gorch_thread)s %(gorch_attempt)s",
                defaults={"gorch_thread": "-", "gorch_attempt": "-"},  # a resume has neither
            )
        )
        null_logger = _quiet_logger("gorch.bench.null", logging.NullHandler())
        stream_logger = _quiet_logger("gorch.bench.stream", stream)
        stacks: dict[str, list[object]] = {
            "none": [],
            "empty": [gorch.Middleware()],
            "logging_null": [gorch.LoggingMiddleware(null_logger)],
            "logging_stream": [gorch.LoggingMiddleware(stream_logger)],
        }
        n = MIDDLEWARE_STEPS
        cls = linear_class(n)
        out: dict[str, dict[str, float]] = {}
        for name, stack in stacks.items():

            def op(item: tuple[Any, gorch.State], stack: list[object] = stack) -> Any:
                wf, state = item
                if stack:
                    return gorch.resume(wf, state, middleware=stack), wf.i
                return gorch.resume(wf, state), wf.i

            res = measure(
                lambda: (cls(), gorch.new_state("mw", "linear")),
                op,
                cfg.mw_count,
                cfg,
                check=lambda r: r == (FINISHED, n),
            )
            out[name] = {
                "us_per_step_median": res["median_us"] / n,
                "us_per_step_best": res["best_us"] / n,
            }
        base = out["none"]["us_per_step_median"]
        for name in ("empty", "logging_null", "logging_stream"):
            out[name]["over_none"] = out[name]["us_per_step_median"] / base
        return out
    finally:
        devnull.close()


# --------------------------------------------------------------------------- report


def render(report: dict[str, Any]) -> str:
    fig = report["figures"]
    meta = report["meta"]
    out: list[str] = [
        f"gorch {meta['gorch']} DAG and middleware benchmarks — Python {meta['python']} "
        f"({meta['implementation']}), {'quick' if meta['quick'] else 'full'} run, "
        f"median and best of {meta['repeats']} repeats after {meta['warmup']} warm-up",
        "",
        f"(a) random DAG of N nodes (seed {meta['seed']}, each after 0-{MAX_DEPS} earlier nodes)"
        " vs S(Step x N): one resume from new_state to FINISHED",
    ]
    rows = [
        [
            n,
            f"{v['edges']:.0f}",
            f"{v['depth']:.0f}",
            fmt(v["dag_resume_us_median"]),
            fmt(v["dag_us_per_node_median"]),
            fmt(v["dag_us_per_node_best"]),
            fmt(v["linear_us_per_step_median"]),
            f"{v['dag_over_linear']:.2f}",
            fmt(v["dag_build_us_median"]),
        ]
        for n, v in fig["a_dag"].items()
    ]
    header = [
        "nodes",
        "edges",
        "depth",
        "DAG total µs",
        "DAG µs/node",
        "best",
        "S µs/step",
        "DAG/S",
        "DAG build µs",
    ]
    out.append(table(rows, header))
    out.append("   (depth: nodes on the longest chain; build µs: one definition() call,")
    out.append("    already in the total)")
    g = fig["a_growth"]
    for key in (k.removeprefix("dag_") for k in g if k.startswith("dag_")):
        small, big = key.split("_to_")
        ratio = int(big) // int(small)
        out.append(
            f"-> per-node time x{g['dag_' + key]:.2f} from {small} to {big} nodes "
            f"(straight: x{g['linear_' + key]:.2f}; quadratic would be x{ratio})"
        )
    out.append("")

    out.append(f"(b) middleware on one resume of S(Step x {MIDDLEWARE_STEPS})")
    b = fig["b_middleware"]
    labels = {
        "none": "no middleware",
        "empty": "[Middleware()]",
        "logging_null": "LoggingMiddleware, NullHandler",
        "logging_stream": "LoggingMiddleware, formatted to /dev/null",
    }
    base = b["none"]["us_per_step_median"]
    out.append(
        table(
            [
                [
                    labels[name],
                    fmt(v["us_per_step_median"]),
                    fmt(v["us_per_step_best"]),
                    "" if name == "none" else f"{v['us_per_step_median'] - base:+.2f}",
                    "1.00" if name == "none" else f"{v['over_none']:.2f}",
                ]
                for name, v in b.items()
            ],
            ["", "µs/step", "best", "overhead µs/step", "x none"],
        )
    )
    return "\n".join(out)


def run_all(cfg: Config) -> dict[str, Any]:
    t0 = time.perf_counter()
    dag = bench_dag(cfg)
    figures = {
        "a_dag": dag,
        "a_growth": growth(dag),
        "b_middleware": bench_middleware(cfg),
    }
    return {
        "meta": {
            **environment(),
            "quick": cfg.quick,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "seed": SEED,
            "wall_seconds": time.perf_counter() - t0,
            "units": "µs unless named otherwise (edges, depth: counts; *_over_*, "
            "*_to_*: ratios); median and best over repeats",
        },
        "figures": figures,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    report = run_all(Config(quick=args.quick))
    emit(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
