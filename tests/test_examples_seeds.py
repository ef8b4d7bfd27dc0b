"""The flow-orchestrator and LightFlow README examples run as scripts and tell what they did.

Each example runs as a script (as a reader would run it) and the test checks
what it printed and how it ended. The middleware and the isolated DAG they
show are checked in this process too, where a script cannot show it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import example_support
import pytest
from example_support import EXAMPLES

import gorch
from gorch import DAG, S, Step


def run_example(name: str) -> str:
    return example_support.run_example(name, timeout=120)


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


def lines_of(text: str, prefix: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]


# --------------------------------------------------------------------------- LightFlow's README


def test_lightflow_readme_prints_what_lightflow_prints() -> None:
    out = run_example("lightflow_readme.py")
    simple, sep, peek = out.partition("== simple_with_peek")
    assert sep, out

    lines = [line for line in simple.splitlines() if line and not line.startswith(("==", " "))]
    assert len(lines) == 3, simple
    task = re.fullmatch(
        r"Task put_task being run in DAG main_dag for workflow simple \(([0-9a-f]{32})\) on (.+)",
        lines[0],
    )
    assert task, lines[0]
    assert task.group(2) == socket.gethostname()
    assert lines[1] == "The value is: 5"
    assert lines[2] == "-> finished"

    # The second instance has an id of its own.
    other = re.search(r"for workflow simple_with_peek \(([0-9a-f]{32})\)", peek)
    assert other and other.group(1) != task.group(1)


def test_lightflow_readme_isolation_refuses_a_non_ancestor_and_keeps_the_rest() -> None:
    out = run_example("lightflow_readme.py")
    peek = out.partition("== simple_with_peek")[2]
    refusal = (
        "peek_task: StepResultError: step 'peek_task': the result of 'put_task' is not "
        "visible here: in an isolated DAG a node reads only the results of its ancestors"
    )
    assert f"-> failed: failed nodes: {refusal}" in peek
    assert "peek_task read" not in peek  # the read raised: the task went no further
    assert "The value is: 5" in peek  # print_task, downstream of put_task, still ran
    assert "put_task=completed" in peek and "print_task=completed" in peek
    assert "peek_task=failed" in peek
    assert "stored results: {'put_task': {'value': 5}}" in peek


@pytest.mark.parametrize("isolated", [True, False])
def test_lightflow_readme_dag_reads_only_ancestors_when_isolated(
    isolated: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ex = load_example("lightflow_readme")

    class Peek(ex.SimpleWithPeek):  # type: ignore[name-defined,misc]
        def definition(self) -> gorch.Section:
            return S(
                DAG(
                    ex.DAG_NAME,
                    Step(self.put_task),
                    Step(self.print_task, after=self.put_task),
                    Step(self.peek_task),
                    isolated=isolated,
                )
            )

    engine = gorch.Engine(f"sqlite:///{tmp_path}/gorch.db", workflows={"peek": Peek})
    snap = engine.start("peek", "p-1")
    out = capsys.readouterr().out
    if not isolated:  # the same DAG without isolation: the sibling's result is readable
        assert snap.status == "finished"
        assert "peek_task read 5 (isolation did not hold)" in out
        return

    assert snap.status == "failed"
    assert "the result of 'put_task' is not visible here" in snap.error
    before = engine.store.load("p-1")
    _, state = gorch.loads(before.blob, Peek)
    assert state.results == {"put_task": {"value": 5}}

    # Retrying runs only the refused node, which is refused again; what the
    # others kept is still there and they do not run again.
    with pytest.raises(gorch.DAGFailed) as failed:
        engine.retry("p-1")
    out = capsys.readouterr().out
    assert list(failed.value.failed) == ["peek_task"]
    assert "is not visible here" in failed.value.failed["peek_task"]
    snap = engine.get("p-1")
    assert snap.status == "failed" and "is not visible here" in snap.error
    assert "Task put_task" not in out and "The value is" not in out
    _, state = gorch.loads(engine.store.load("p-1").blob, Peek)
    assert state.results == {"put_task": {"value": 5}}
    assert snap.data == engine.get("p-1").data == {}


# ------------------------------------------------------- flow-orchestrator: middleware


def test_flow_middleware_times_out_retries_and_fails_the_slow_step() -> None:
    out = run_example("flow_middleware.py")
    sync, sep, aio = out.partition("== AsyncEngine")
    assert sep, out
    first, sep, later = sync.partition("== 1 s later")
    assert sep, sync

    # First run: the two slow calls time out, the rest of the DAG goes on.
    timed_out = "failed: StepTimeout: step '{}' took {} s, over its timeout of 0.3 s"
    assert re.search(
        r"step 'send-analytics' of api-call 'user-7' \(attempt 1\) "
        + timed_out.format("send-analytics", r"0\.\d+"),
        first,
    )
    assert "step 'save-profile' of api-call 'user-7' (attempt 1) ok" in first  # its own limit
    assert "step 'notify-user' of api-call 'user-7' (attempt 1) ok" in first
    assert "stored: status=retrying" in first

    # The retry of send-analytics is fast and succeeds; render-avatar is never fast.
    assert "step 'send-analytics' of api-call 'user-7' (attempt 2) ok" in later
    avatar = re.findall(r"step 'render-avatar' of api-call 'user-7' \(attempt (\d)\) (\w+)", sync)
    assert avatar == [("1", "failed"), ("2", "failed"), ("3", "failed"), ("4", "failed")]
    assert len(lines_of(sync, "ALERT:")) == 1
    alert = lines_of(sync, "ALERT:")[0]
    assert alert.startswith("ALERT: api-call 'user-7' failed for good: DAG 'api-call'")
    assert "render-avatar: StepTimeout" in alert
    assert sync.index("(attempt 4) failed") < sync.index("ALERT:")
    stored = lines_of(sync, "stored: status=")
    assert stored[-1] == "stored: status=failed" and stored[:-1] == ["stored: status=retrying"] * 3
    assert "send-analytics=completed, render-avatar=failed" in sync.rsplit("stored: DAG", 1)[1]
    # The timed-out attempts' changes were not kept; everything else was.
    assert "analytics_sent=True profile_saved=True notified=True avatar=None" in sync

    # Under the AsyncEngine the async step is cancelled at the limit.
    assert "-> failed: StepTimeout: step 'call-partner' was cancelled, over its timeout" in aio
    assert "cancelled at the limit: True" in aio
    assert "finished_call=False" in aio


class _Calls(gorch.Workflow):
    done: list[str] = []

    def definition(self) -> gorch.Section:
        return S(Step("fast", self.fast), Step("slow", self.slow))

    def fast(self) -> int:
        self.done.append("fast")
        return 7

    def slow(self, fast: int) -> int:
        time.sleep(0.2)
        self.done.append("slow")
        return fast + 1


def test_timeout_middleware_fails_a_late_plain_step_under_both_apis() -> None:
    ex = load_example("flow_middleware")

    for run in ("sync", "async"):
        wf, state = _Calls(), gorch.new_state("c-1", "calls")
        mw = [ex.TimeoutMiddleware(0.1)]
        with pytest.raises(gorch.StepFailed) as failed:
            if run == "sync":
                gorch.resume(wf, state, middleware=mw)
            else:
                asyncio.run(gorch.aresume(wf, state, middleware=mw))
        assert failed.value.step == "slow", run
        cause = failed.value.__cause__
        assert isinstance(cause, gorch.StepTimeout), run
        assert cause.timeout == 0.1 and cause.took is not None and cause.took >= 0.2
        assert state.results == {"fast": 7}, run  # the late result is dropped
        assert state.threads[0].cur_step == "slow" and state.threads[0].attempts == 1

        # A step with a limit of its own that it keeps passes, and its result is kept.
        wf, state = _Calls(), gorch.new_state("c-2", "calls")
        mw = [ex.TimeoutMiddleware(0.1, limits={"slow": 5})]
        if run == "sync":
            gorch.resume(wf, state, middleware=mw)
        else:
            asyncio.run(gorch.aresume(wf, state, middleware=mw))
        assert state.status == gorch.WorkflowStatus.FINISHED, run
        assert state.results == {"fast": 7, "slow": 8}


class _OwnTimeout(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Step("call", self.call))

    async def call(self) -> None:
        raise TimeoutError("the partner said: try later")


def test_timeout_middleware_leaves_a_step_s_own_timeout_error_alone() -> None:
    ex = load_example("flow_middleware")
    state = gorch.new_state("o-1", "own")
    with pytest.raises(gorch.StepFailed) as failed:
        asyncio.run(gorch.aresume(_OwnTimeout(), state, middleware=[ex.TimeoutMiddleware(5)]))
    assert type(failed.value.__cause__) is TimeoutError
    assert "try later" in str(failed.value.__cause__)


# --------------------------------------------------------- flow-orchestrator: pipeline


def test_flow_pipeline_resumes_after_a_crash_without_rerunning_completed_nodes() -> None:
    out = run_example("flow_pipeline.py")
    first, sep, second = out.partition("== process 2")
    assert sep, out

    def nodes(text: str) -> list[str]:
        return list(dict.fromkeys(re.findall(r"^\s+\[([\w-]+)\]", text, re.MULTILINE)))

    # Process 1 ran every node up to store-data, then died in it.
    assert nodes(first) == [
        "fetch-data",
        "validate-data",
        "transform-data",
        "enrich-data",
        "aggregate-data",
        "store-data",
    ]
    assert "[store-data] the process dies here" in first
    assert "-> process 1 exited with code 3" in first
    assert "not reached" not in first

    # Process 2: the five completed nodes and their outputs were saved before the crash.
    completed = "fetch-data, validate-data, transform-data, enrich-data, aggregate-data"
    assert f"stored: status=resuming, completed: {completed}" in second
    assert f"stored outputs: {completed}" in second
    # Only store-data (again) and generate-report run; store-data reads the saved output.
    assert nodes(second) == ["store-data", "generate-report"]
    totals = "{'north': 62.5, 'south': 9.9, 'west': 3.0}"
    assert f"[aggregate-data] totals by region: {totals}" in first
    assert f"[store-data] got {totals} from aggregate-data" in second
    assert "run_due -> batch-2024-05-01: resume, status=finished" in second
    assert "-> finished" in second
    report = (
        "report of batch-2024-05-01 (batch-2024-05-01.store-data.json): "
        "north: 62.50 EUR; south: 9.90 EUR; west: 3.00 EUR"
    )
    assert f'GetOutput("generate-report") -> {report}' in second
    # The idempotency key made the repeated write land on the same row.
    assert "warehouse: ['batch-2024-05-01.store-data.json']" in second


def test_flow_pipeline_nodes_read_outputs_by_name(tmp_path: Path) -> None:
    ex = load_example("flow_pipeline")
    (tmp_path / "wh").mkdir()
    engine = gorch.Engine(f"sqlite:///{tmp_path}/gorch.db", workflows=ex.WORKFLOWS)
    snap = engine.start("data-processing", "b-1", {"warehouse": str(tmp_path / "wh")})
    assert snap.status == "finished"
    out: dict[str, Any] = ex.outputs(engine, "b-1")
    assert list(out) == [
        "fetch-data",
        "validate-data",
        "transform-data",
        "enrich-data",
        "aggregate-data",
        "store-data",
        "generate-report",
    ]
    valid = [r for r in ex.SOURCE if r["cents"] >= 0]
    assert out["validate-data"] == valid
    assert out["aggregate-data"] == {"north": 62.5, "south": 9.9, "west": 3.0}
    assert (
        tmp_path / "wh" / out["store-data"]
    ).read_text() == '{"north": 62.5, "south": 9.9, "west": 3.0}'
