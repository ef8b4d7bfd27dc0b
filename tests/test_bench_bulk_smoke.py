"""Smoke test of benchmarks/bench_bulk.py at a tiny size (SQLite; PostgreSQL when it answers).

Timings are never asserted: only that each figure is there and is a positive number,
and that the benchmark checked what it wrote (every instance stored waiting).
"""

import json
from pathlib import Path
from typing import Any

import pytest
from bench_support import leaves, load_bench
from stores.store_support import require_server

KEYS = {
    "count",
    "batch",
    "seconds",
    "instances_per_s",
    "us_per_instance",
    "start_us_per_instance",
    "start_over_bulk",
    "projected_s_per_million",
}


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_tiny_run_writes_every_figure(store: str, tmp_path: Path, capsys: Any) -> None:
    if store == "postgres":
        require_server("postgres")
    bench = load_bench("bench_bulk")
    out = tmp_path / "bulk.json"

    assert bench.main(["--count", "300", "--batch", "64", "--stores", store, "--json", out]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["skipped"] == {}
    row = report["figures"][store]
    assert set(row) == KEYS
    assert row["count"] == 300 and row["batch"] == 64
    for path, value in leaves(report["figures"]):
        assert isinstance(value, float) and value > 0, path
    assert report["meta"]["goal_seconds_per_million"] == 120
    assert store in capsys.readouterr().out
