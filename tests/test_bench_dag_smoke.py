"""Smoke test of benchmarks/bench_dag.py: it runs and reports every figure.

Timings are never asserted: only that each figure is there and is a positive number.
"""

import itertools
import json
from pathlib import Path
from typing import Any

from bench_support import leaves, load_bench

DAG_KEYS = {
    "edges",
    "depth",
    "dag_resume_us_median",
    "dag_resume_us_best",
    "dag_us_per_node_median",
    "dag_us_per_node_best",
    "dag_build_us_median",
    "linear_us_per_step_median",
    "linear_us_per_step_best",
    "dag_over_linear",
}
MIDDLEWARE = {
    "none": {"us_per_step_median", "us_per_step_best"},
    "empty": {"us_per_step_median", "us_per_step_best", "over_none"},
    "logging_null": {"us_per_step_median", "us_per_step_best", "over_none"},
    "logging_stream": {"us_per_step_median", "us_per_step_best", "over_none"},
}


def test_quick_run_writes_every_figure(tmp_path: Path, capsys: Any) -> None:
    bench = load_bench("bench_dag")
    out = tmp_path / "dag.json"

    assert bench.main(["--quick", "--json", out]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    figures = report["figures"]
    assert set(figures) == {"a_dag", "a_growth", "b_middleware"}
    assert {"100", "1000"} <= set(figures["a_dag"])
    for n, row in figures["a_dag"].items():
        assert set(row) == DAG_KEYS, n
    sizes = sorted(figures["a_dag"], key=int)
    expected_growth = {
        f"{kind}_{a}_to_{b}" for a, b in itertools.pairwise(sizes) for kind in ("dag", "linear")
    }
    assert "dag_100_to_1000" in expected_growth
    assert set(figures["a_growth"]) == expected_growth
    assert {k: set(v) for k, v in figures["b_middleware"].items()} == MIDDLEWARE

    all_leaves = leaves(figures)
    assert len(all_leaves) >= 2 * len(DAG_KEYS) + 2 + 2 + 3 * 3
    for path, value in all_leaves:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), path
        assert value > 0, path

    assert report["meta"]["quick"] is True

    printed = capsys.readouterr().out
    assert "(a)" in printed and "(b)" in printed
    assert "from 100 to 1000 nodes" in printed
    assert "LoggingMiddleware, NullHandler" in printed


def test_random_dags_are_seeded_and_respect_the_shape() -> None:
    bench = load_bench("bench_dag")
    deps = bench.random_deps(1000)
    assert deps == bench.random_deps(1000)
    assert all(len(ds) <= 3 and all(d < k for d in ds) for k, ds in enumerate(deps))
    assert len(set(map(len, deps))) == 4  # every count from 0 to 3 occurs
    bench.check_dag_order(bench.random_deps(100))  # raises if a node ran before its deps
