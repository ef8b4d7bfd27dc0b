"""Smoke test of benchmarks/bench_engine_cpu.py on the memory store (needs valgrind).

Counts are never asserted against a figure: only that both sides were counted,
inside the measured batch (a count that included start-up and imports would be
hundreds of times larger), and that the ratio is theirs.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from bench_support import load_bench


def _count(tmp_path: Path, store: str) -> dict[str, Any]:
    """A run of three counted workflows on ``store``: its report."""
    bench = load_bench("bench_engine_cpu")
    out = tmp_path / "cpu.json"
    args = ["--stores", store, "--workflows", "3", "--warmup", "2", "--json", out]
    assert bench.main(args) == 0
    report: dict[str, Any] = json.loads(out.read_text())
    return report


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_memory_counts_both_sides_inside_the_batch(tmp_path: Path, capsys: Any) -> None:
    report = _count(tmp_path, "memory")
    f = report["figures"]["memory"]
    gorch, floor = f["gorch_instructions_per_workflow"], f["floor_instructions_per_workflow"]
    # Per workflow, each side runs the core at least (hundreds of thousands of instructions);
    # a count of the whole process (imports: about a billion) would be far above this.
    assert 50_000 < floor < gorch < 20_000_000
    assert f["gorch_over_floor"] == pytest.approx(gorch / floor)
    assert report["skipped"] == {} and report["meta"]["workflows"] == 3
    assert "memory" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_sqlite_counts_the_bare_core_on_the_floors_sql(tmp_path: Path, capsys: Any) -> None:
    """SQL stores have a third side: gorch's core without the Engine, on the floor's SQL."""
    f = _count(tmp_path, "sqlite")["figures"]["sqlite"]
    gorch, floor = f["gorch_instructions_per_workflow"], f["floor_instructions_per_workflow"]
    core = f["core_instructions_per_workflow"]
    # the core does more than the hand-written state machine, the Engine more than the core
    assert floor < core < gorch
    assert f["core_over_floor"] == pytest.approx(core / floor)
    assert f"({f['core_over_floor']:.2f}x)" in capsys.readouterr().out


def test_an_unknown_store_is_refused() -> None:
    bench = load_bench("bench_engine_cpu")
    with pytest.raises(SystemExit):
        bench.main(["--stores", "mongo"])
