"""Smoke test of benchmarks/bench_wakeup.py (needs PostgreSQL: skipped without it, failed
in CI). Timings are never asserted: only that each figure is there and positive."""

from pathlib import Path
from typing import Any

from bench_support import leaves, load_bench
from stores.store_support import require_server


def test_a_small_run_writes_every_figure(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    require_server("postgres")
    bench = load_bench("bench_wakeup")
    monkeypatch.setattr(bench, "PAUSE", 0.0)  # no need to wait for leases in a smoke test
    cfg = bench.Config(quick=True)
    cfg.rounds = [200, 300]
    cfg.idle_calls = 5

    report = bench.run(cfg)

    figures = dict(report["figures"])
    assert [r["fired"] for r in figures["rounds"]] == [200.0, 500.0]
    # (the server's statistics of dead tuples lag behind: they may still read 0)
    assert isinstance(figures.pop("dead_tuples"), float)
    for path, value in leaves({**figures, "rounds": dict(enumerate(figures["rounds"]))}):
        assert isinstance(value, float) and value > 0, path
    assert set(figures) == {
        "empty_gorch_idle_ms",
        "empty_plain_idle_ms",
        "rounds",
        "released_gorch_idle_ms",
        "released_plain_idle_ms",
        "gorch_after_over_empty",
        "plain_after_over_empty",
    }
    print(bench.render(report))  # the report as it was, dead tuples included
    assert "timers fired" in capsys.readouterr().out
