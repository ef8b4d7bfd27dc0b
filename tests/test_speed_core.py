"""The core's fast paths keep their meaning, and bench_compare.py reports what it measures.

Timings are never asserted.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bench_support import stand_in_go

import gorch
from gorch import For, Go, On, S, Select, Step, Timeout

ROOT = Path(__file__).resolve().parent.parent


class SetupOnly(gorch.Handler):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def setup(self, req: gorch.EventRequest) -> str | None:
        self.log.append(f"setup {req.name}")
        return None


class TeardownOnly(gorch.Handler):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def teardown(self, req: gorch.EventRequest, handled: bool) -> None:
        self.log.append(f"teardown {req.name} {handled}")


class TeardownSubclass(TeardownOnly):
    """Inherits its teardown: it still has one."""


LOG: list[str] = []


class Waits(gorch.Workflow):
    n: int = 0

    def definition(self) -> gorch.Section:
        return S(
            For(
                "loop",
                self.n < 2,
                Select(
                    "wait",
                    On("a", SetupOnly(LOG), Step("inc_a", self.inc)),
                    On("b", TeardownOnly(LOG), Step("inc_b", self.inc)),
                    On("c", TeardownSubclass(LOG), Step("inc_c", self.inc)),
                    On("d", self.plain, Step("inc_d", self.inc)),
                    Timeout("t", 3600, Step("inc_t", self.inc)),
                ),
            )
        )

    def inc(self) -> None:
        self.n += 1

    def plain(self) -> None:
        LOG.append("plain")


def test_setup_and_teardown_run_only_where_a_handler_type_overrides_them() -> None:
    LOG.clear()
    wf, state = Waits(), gorch.new_state("w", "waits")
    saved: list[gorch.CheckpointKind] = []
    assert gorch.resume(wf, state, saved.append) is gorch.WorkflowStatus.WAITING
    assert LOG == ["setup a"]  # the timer's setup stores its due time, not logged
    statuses = {we.req.name: we.status for we in state.threads[0].wait_events}
    assert set(statuses.values()) == {gorch.EventStatus.SETUP}
    assert saved.count(gorch.CheckpointKind.AFTER_SETUP) == 2  # SetupOnly and the Timeout

    LOG.clear()
    gorch.handle_event(wf, state, "d")
    assert LOG == ["plain"]
    kept = {we.req.name: we.status for we in state.threads[0].wait_events}
    # only the handlers with a teardown (own or inherited) wait for it
    assert kept == {
        "b": gorch.EventStatus.PENDING_TEARDOWN,
        "c": gorch.EventStatus.PENDING_TEARDOWN,
    }
    LOG.clear()
    saved.clear()
    gorch.resume(wf, state, saved.append)
    assert LOG[:2] == ["teardown b False", "teardown c False"]
    assert saved[:2] == [gorch.CheckpointKind.AFTER_TEARDOWN] * 2
    assert wf.n == 1


def test_a_handler_type_patched_before_its_first_use_is_seen() -> None:
    """The per-type answer is taken when the type is first met, from the type itself."""

    class Late(gorch.Handler):
        pass

    calls: list[str] = []

    def setup(self: Any, req: gorch.EventRequest) -> str | None:
        calls.append(req.name)
        return None

    Late.setup = setup  # type: ignore[method-assign]

    class W(gorch.Workflow):
        def definition(self) -> gorch.Section:
            return S(Select("wait", On("e", Late())))

    gorch.resume(W(), gorch.new_state("l", "late"))
    assert calls == ["e"]


def test_a_refused_async_checkpoint_changes_nothing() -> None:
    async def checkpoint(kind: gorch.CheckpointKind) -> None:
        return None

    wf, state = Waits(), gorch.new_state("w", "waits")
    with pytest.raises(gorch.DefinitionError, match="checkpoint callback"):
        gorch.resume(wf, state, checkpoint)
    assert state == gorch.new_state("w", "waits")
    assert wf.n == 0


class Tagged(gorch.Handler):
    """Logs which build made it (``tag``); its setup changes the workflow's data."""

    def __init__(self, wf: "ByMode", tag: str) -> None:
        self.wf, self.tag = wf, tag

    def setup(self, req: gorch.EventRequest) -> str | None:
        self.wf.log.append(f"setup {req.name} {self.tag}")
        self.wf.mode = "y"
        return None

    def teardown(self, req: gorch.EventRequest, handled: bool) -> None:
        self.wf.log.append(f"teardown {req.name} {self.tag} {handled}")


class ByMode(gorch.Workflow):
    mode: str = "x"
    log: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            Go("g", Select("wait g", On("e", Tagged(self, self.mode)))),
            Select("wait main", On("m", Tagged(self, self.mode))),
        )


def test_setup_and_teardown_use_handlers_built_from_current_data() -> None:
    """The Select a thread blocked on is reused for its setup only while no setup has
    changed the data since: the second setup below reads a build made after the first."""
    wf, state = ByMode(), gorch.new_state("m", "by-mode")
    assert gorch.resume(wf, state) is gorch.WorkflowStatus.WAITING
    assert wf.log == ["setup m x", "setup e y"]
    wf.log.clear()
    gorch.handle_event(wf, state, "m")
    assert gorch.resume(wf, state) is gorch.WorkflowStatus.FINISHED
    # the teardowns read the build of the data as it is now (mode "y")
    assert wf.log == ["teardown m y True", "teardown e y False"]


def _compare(*args: object) -> list[str]:
    """The command line of benchmarks/bench_compare.py with ``args``."""
    return [sys.executable, str(ROOT / "benchmarks" / "bench_compare.py"), *map(str, args)]


def test_bench_compare_reports_each_tree_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    cmd = _compare(ROOT, ROOT, "--figures", "a,handler", "--rounds", "1", "--repeats", "1")
    cmd += ["--scale", "0.01", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, timeout=300)
    assert "ratio" in done.stdout
    report = json.loads(out.read_text())
    assert report["trees"] == [str(ROOT), str(ROOT)]
    for figure in ("a", "handler"):
        entry = report["figures"][figure]
        assert len(entry["us"]) == 2 and all(v > 0 for v in entry["us"])
        assert entry["ratio"][0] == 1.0 and entry["ratio"][1] > 0


def test_bench_compare_refuses_an_unknown_figure() -> None:
    cmd = _compare(ROOT, "--figures", "x")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "unknown figures" in done.stderr


def test_bench_compare_counting_run_makes_one_batch_through_reduce() -> None:
    """The run callgrind counts (``count``): one warm-up batch, then one batch of ops."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_compare
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    cmd = [sys.executable, "-c", bench_compare.child_code(), str(ROOT), "a", "3", "5", "1", "count"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, timeout=120)
    report = json.loads(done.stdout.splitlines()[-1])
    assert len(report["seconds_per_op"]) == 1 and report["seconds_per_op"][0] > 0


def test_bench_compare_go_runs_the_go_benchmark_in_turn_and_gives_the_factor(
    tmp_path: Path,
) -> None:
    log, env = stand_in_go(tmp_path, 20000)  # best runs: 20 µs/op, then 21 µs/op
    go_dir = tmp_path / "async"
    go_dir.mkdir()
    out = tmp_path / "cmp.json"
    cmd = _compare(ROOT, "--figures", "a,step", "--rounds", "2", "--repeats", "2")
    cmd += ["--scale", "0.01", "--go", str(go_dir), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    report = json.loads(out.read_text())
    a = report["figures"]["a"]
    assert a["go_us_rounds"] == [20.0, 21.0]  # each round's own Go run, its best
    assert a["go_us"] == 20.5
    per_round = [us / go for us, go in zip(a["us_rounds"][0], [20.0, 21.0], strict=True)]
    assert a["vs_go"][0] == pytest.approx(statistics.median(per_round))
    assert "vs_go" not in report["figures"]["step"]  # not gorchestrate's workflow
    calls = log.read_text().splitlines()
    assert len(calls) == 2  # figure a only, one run per round, in the checkout
    for call in calls:
        where, args = call.split(" ", 1)
        assert where == str(go_dir)
        # at least 10 000 iterations a run, as many runs as the trees' batches
        assert args == "test -run ^$ -bench ^BenchmarkXxx$ -benchtime 10000x -count 2"
    assert "Go 20.50" in done.stdout


def test_bench_compare_go_says_when_the_benchmark_is_missing(tmp_path: Path) -> None:
    _, env = stand_in_go(tmp_path, 20000)
    cmd = _compare(ROOT, "--figures", "a", "--rounds", "1", "--repeats", "1", "--scale", "0.01")
    cmd += ["--go", str(tmp_path), "--go-bench", "BenchmarkWorkflow"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode != 0
    assert "no BenchmarkWorkflow figure in the output of go test" in done.stderr
