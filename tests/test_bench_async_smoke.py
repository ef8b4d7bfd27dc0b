"""Smoke test of benchmarks/bench_async.py on SQLite (and PostgreSQL when it answers).

Timings are never asserted: only that each figure is there and is a positive number.
"""

import json
from pathlib import Path
from typing import Any

from bench_support import leaves, load_bench

APPROVAL_ROWS = {"sync_1", "sync_32", "async_1", "async_32"}
APPROVAL_KEYS = {
    "us_per_workflow_median",
    "us_per_workflow_best",
    "workflows_per_s",
    "throughput_vs_sync_1",
}
FAN_ROWS = {"sync_engine", "async_engine", "async_engine_executor"}
FAN_KEYS = {"wall_ms_median", "wall_ms_best", "speedup_vs_sync"}


def test_quick_run_writes_every_figure(tmp_path: Path, capsys: Any) -> None:
    bench = load_bench("bench_async")
    out = tmp_path / "async.json"

    assert bench.main(["--quick", "--stores", "sqlite", "--json", out]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    figures = report["figures"]
    assert set(figures) == {"approval", "fan_out"}
    assert set(figures["approval"]) == {"sqlite"}
    assert set(figures["approval"]["sqlite"]) == APPROVAL_ROWS
    for name, row in figures["approval"]["sqlite"].items():
        assert set(row) == APPROVAL_KEYS, name
    assert figures["approval"]["sqlite"]["sync_1"]["throughput_vs_sync_1"] == 1.0
    assert set(figures["fan_out"]) == FAN_ROWS
    for name, row in figures["fan_out"].items():
        assert set(row) == FAN_KEYS, name

    found = leaves(figures)
    assert len(found) == 4 * 4 + 3 * 3
    for path, value in found:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), path
        assert value > 0, path

    meta = report["meta"]
    assert meta["quick"] is True and meta["stores"] == ["sqlite"]
    assert meta["concurrency"] == [1, 32]
    assert report["skipped"] == {"approval": {}}

    printed = capsys.readouterr().out
    for text in ("(1)", "(2)", "AsyncEngine, 32 tasks", "Engine, 32 threads", "sqlite"):
        assert text in printed


def test_an_unknown_store_is_refused(capsys: Any) -> None:
    bench = load_bench("bench_async")
    try:
        bench.main(["--stores", "oracle"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an unknown store was accepted")
    assert "unknown store" in capsys.readouterr().err
