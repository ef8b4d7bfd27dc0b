"""LightFlow's parallel example (examples/lightflow_parallel.py) runs and says what it did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def task_lines(text: str) -> list[str]:
    """The tasks in the order LightFlow's print_info callback announced them."""
    return [line.split()[1] for line in text.splitlines() if line.strip().startswith("Task ")]


def test_lightflow_parallel_joins_after_every_lane_across_two_processes() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "lightflow_parallel.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    first, sep, second = done.stdout.partition("== process 2")
    assert sep, done.stdout

    # Process 1: branch_task, then the lanes that have their data; the join waits.
    assert task_lines(first) == ["branch_task", "lane1_print_task", "lane3_print_task"]
    assert "being run in DAG main_dag for workflow parallel (par-1)" in first
    assert "-> waiting" in first
    assert "stored: DAG nodes: branch_task=completed" in first  # "lanes" has not ended
    assert "threads waiting for an event: main_dag.lanes/lanes.lane2" in first

    # Process 2: the last lane, then the join (the sync point), once each.
    assert task_lines(second) == ["lane2_print_task", "join_task"]
    assert "-> finished" in second
    assert "ran: branch_task, lane1_print_task, lane3_print_task, lane2_print_task, join_task" in (
        second
    )
