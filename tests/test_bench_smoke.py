"""Smoke test of benchmarks/bench_core.py: it runs and reports every figure.

Timings are never asserted: only that each figure is there and is a positive number.
"""

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from bench_support import leaves, load_bench, stand_in_go

EXPECTED = {
    "a_gorchestrate": {
        "us_per_op_median",
        "us_per_op_best",
        "handler_us_per_op_median",
        "handler_us_per_op_best",
        "floor_us_per_op_median",
        "floor_us_per_op_best",
        "handler_floor_us_per_op_median",
        "handler_floor_us_per_op_best",
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
    assert len(leaves) >= 4 + 5 + 4 * 5 + 5
    for path, value in leaves:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), path
        assert value > 0, path

    assert report["meta"]["quick"] is True
    assert report["reference"]["target_us_per_op"] > 0

    printed = capsys.readouterr().out
    for title in ("(a)", "(b)", "(c)", "(d)"):
        assert title in printed


@pytest.mark.parametrize(
    ("go_ns", "verdict"),
    [(1_000_000_000, "within"), (1_000, "ABOVE")],  # Go at 1 s/op, then at 1 µs/op
)
def test_quick_run_with_go_gives_each_figure_as_a_factor_of_go(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch, go_ns: int, verdict: str
) -> None:
    """``--go DIR``: Go's benchmark runs before and after (a), and (a) is read against it."""
    bench = _load_bench()
    log, env = stand_in_go(tmp_path, go_ns)  # its second call's best run is 1 µs slower
    monkeypatch.setenv("PATH", env["PATH"])
    go_dir = tmp_path / "async"
    go_dir.mkdir()
    out = tmp_path / "b.json"

    assert bench.main(["--quick", "--go", go_dir, "--json", out]) == 0

    a = json.loads(out.read_text(encoding="utf-8"))["figures"]["a_gorchestrate"]
    before, after = go_ns / 1000, go_ns / 1000 + 1
    assert a["go_us_per_op_before"] == pytest.approx(before, rel=1e-12, abs=1e-6)
    assert a["go_us_per_op_after"] == pytest.approx(after, rel=1e-12, abs=1e-6)
    assert a["go_us_per_op"] == pytest.approx((before + after) / 2)
    assert a["over_go"] == pytest.approx(a["us_per_op_median"] / a["go_us_per_op"])
    assert a["handler_over_go"] == pytest.approx(a["handler_us_per_op_median"] / a["go_us_per_op"])
    assert len(log.read_text().splitlines()) == 2  # before and after, in the checkout
    printed = capsys.readouterr().out
    assert "gorchestrate (Go), this run" in printed
    assert f"{a['over_go']:.2f}x" in printed
    assert f"-> {verdict} 2.5x Go's time" in printed


def test_go_must_be_a_directory(tmp_path: Path) -> None:
    bench = _load_bench()
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--quick", "--go", tmp_path / "missing"])
    assert exit_.value.code == 2


def test_the_floor_of_a_does_what_gorch_must_and_no_less(monkeypatch: pytest.MonkeyPatch) -> None:
    """(a)'s floor makes gorch's builds, user calls and checkpoints (counted, not assumed)."""
    bench = _load_bench()
    counts = bench.check_floor()
    # SPEC §1: a build at the start of each call, and one before each read after a change
    assert counts["builds"] > 5
    assert counts["i"] == 2

    floor_op = bench._floor_op

    def one_build_short(cls: Any, checkpoint: Any) -> int:
        # the same walk, but the second build hands back the first one's tree
        builds: list[Any] = []

        class Skipping(cls):  # type: ignore[misc, valid-type]
            def definition(self) -> Any:
                if len(builds) == 1:
                    builds.append(None)
                    return builds[0]
                root = super().definition()
                builds.append(root)
                return root

        return int(floor_op(Skipping, checkpoint))

    monkeypatch.setattr(bench, "_floor_op", one_build_short)
    with pytest.raises(AssertionError, match="other work than gorch"):
        bench.check_floor()
