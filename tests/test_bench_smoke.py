"""Smoke test of benchmarks/bench_core.py: it runs and reports every figure.

Timings are never asserted: only that each figure is there and is a positive number.
"""

import json
from pathlib import Path
from types import ModuleType
from typing import Any

from bench_support import leaves, load_bench

EXPECTED = {
    "a_gorchestrate": {
        "us_per_op_median",
        "us_per_op_best",
        "handler_us_per_op_median",
        "handler_us_per_op_best",
    },
    "c_codec": {
        "dumps_us_median",
        "dumps_us_best",
        "loads_us_median",
        "loads_us_best",
        "blob_bytes",
    },
}
LINEAR_KEYS = {
    "resume_us_median",
    "resume_us_best",
    "us_per_step_median",
    "us_per_step_best",
    "us_per_step_dynamic_median",
    "definition_build_us_median",
}
LOOP_KEYS = {
    "us_per_iter_median",
    "us_per_iter_best",
    "first_tenth_us_per_iter",
    "last_tenth_us_per_iter",
    "last_over_first",
}


def _load_bench() -> ModuleType:
    return load_bench("bench_core")


_leaves = leaves


def test_quick_run_writes_every_figure(tmp_path: Path, capsys: Any) -> None:
    bench = _load_bench()
    out = tmp_path / "b.json"

    assert bench.main(["--quick", "--json", out]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    figures = report["figures"]
    assert set(figures) == {"a_gorchestrate", "b_linear", "c_codec", "d_event_loop"}
    for group, keys in EXPECTED.items():
        assert set(figures[group]) == keys, group
    assert {"1", "10", "100", "1000"} <= set(figures["b_linear"])
    for n, row in figures["b_linear"].items():
        assert set(row) == LINEAR_KEYS, n
    assert "100" in figures["d_event_loop"]
    for n, row in figures["d_event_loop"].items():
        assert set(row) == LOOP_KEYS, n

    leaves = _leaves(figures)
    assert len(leaves) >= 2 + 5 + 4 * 5 + 5
    for path, value in leaves:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), path
        assert value > 0, path

    assert report["meta"]["quick"] is True
    assert report["reference"]["target_us_per_op"] > 0

    printed = capsys.readouterr().out
    for title in ("(a)", "(b)", "(c)", "(d)"):
        assert title in printed
