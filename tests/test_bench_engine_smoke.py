"""Smoke test of benchmarks/bench_engine.py on the memory and SQLite stores.

Timings are never asserted: only that each figure is there and is a positive number.
"""

import json
from pathlib import Path
from types import ModuleType
from typing import Any

from bench_support import leaves, load_bench

STORES = ["memory", "sqlite"]

APPROVAL_KEYS = {
    "workflows_per_s",
    "us_per_workflow_median",
    "us_per_workflow_best",
    "start_us_median",
    "send_us_median",
}
FLOOR_KEYS = APPROVAL_KEYS | {"gorch_over_floor", "goal"}
MINIMAL_KEYS = {"minimal_us_per_workflow_median", "gorch_over_minimal"}
CORE_KEYS = {"core_us_per_workflow_median", "core_over_floor"}
CALL_KEYS = {
    "writes_per_workflow",
    "writes_in_start",
    "writes_in_send",
    "loads_per_workflow",
    "floor_writes_per_workflow",
    "floor_loads_per_workflow",
}
DUE_KEYS = {
    "due",
    "stored_small",
    "stored_big",
    "bulk_load_s",
    "run_due_ms_small_median",
    "run_due_ms_small_best",
    "run_due_ms_big_median",
    "run_due_ms_big_best",
    "us_per_due_small",
    "us_per_due_big",
    "run_due_big_over_small",
    "claim_ms_small_median",
    "claim_ms_big_median",
    "claim_big_over_small",
}
BLOB_KEYS = {"gorch_waiting_bytes", "floor_waiting_bytes"}


def _load_bench() -> ModuleType:
    return load_bench("bench_engine")


_leaves = leaves


def test_quick_run_writes_every_figure(tmp_path: Path, capsys: Any) -> None:
    bench = _load_bench()
    out = tmp_path / "engine.json"

    assert bench.main(["--quick", "--stores", ",".join(STORES), "--json", out]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    figures = report["figures"]
    assert set(figures) == {"approval", "floor", "store_calls", "run_due", "blob"}
    assert set(figures["approval"]) == set(STORES)
    for kind, row in figures["approval"].items():
        assert set(row) == APPROVAL_KEYS, kind
    assert set(figures["floor"]) == set(STORES)  # memory: the bare core; sqlite: SQL by hand
    assert set(figures["floor"]["memory"]) == FLOOR_KEYS
    assert set(figures["floor"]["sqlite"]) == FLOOR_KEYS | MINIMAL_KEYS | CORE_KEYS
    sqlite = figures["floor"]["sqlite"]
    assert (
        sqlite["core_over_floor"]
        == sqlite["core_us_per_workflow_median"] / (sqlite["us_per_workflow_median"])
    )
    assert figures["floor"]["memory"]["goal"] == 1.5
    assert figures["floor"]["sqlite"]["goal"] == 1.3
    assert set(figures["store_calls"]) == CALL_KEYS
    assert set(figures["run_due"]) == set(STORES)
    for kind, row in figures["run_due"].items():
        assert set(row) == DUE_KEYS, kind
        assert row["due"] == 1000, kind
        assert row["stored_small"] == 1000, kind
        assert row["stored_big"] == 10_000, kind
    assert set(figures["blob"]) == BLOB_KEYS

    leaves = _leaves(figures)
    assert len(leaves) == 2 * 5 + 2 * 7 + 2 + 2 + 6 + 2 * 14 + 2
    for path, value in leaves:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), path
        assert value > 0, path

    meta = report["meta"]
    assert meta["quick"] is True
    assert meta["stores"] == STORES
    assert report["skipped"] == {"approval": {}, "run_due": {}}
    assert report["reference"]["floor_goals"] == {"memory": 1.5, "sqlite": 1.3, "postgres": 1.3}

    printed = capsys.readouterr().out
    for title in ("(1)", "(2)", "(3)", "(4)"):
        assert title in printed
    for kind in STORES:  # the ratio to the floor is printed for each store that has one
        ratio = figures["floor"][kind]["gorch_over_floor"]
        assert f"{ratio:.2f}x" in printed
    for kind in STORES:
        assert kind in printed
    core = figures["floor"]["sqlite"]["core_over_floor"]
    assert f"sqlite: the bare core on the floor's SQL is {core:.2f}x the floor" in printed


def test_temporary_files_are_removed(tmp_path: Path, monkeypatch: Any) -> None:
    """The SQLite files live in a private temporary directory that is gone afterwards."""
    bench = _load_bench()
    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))
    cfg = bench.Config(quick=True, stores=["sqlite"])
    cfg.approval_count = {"sqlite": 2}
    cfg.repeats = 1
    cfg.stored = 20
    cfg.due = 5

    report = bench.run_all(cfg)

    assert report["figures"]["run_due"]["sqlite"]["stored_big"] == 20
    assert list(tmp_path.iterdir()) == []
