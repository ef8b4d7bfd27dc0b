"""The examples are part of the documentation: each one runs, and says what it did."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "status=waiting" in out
    assert "paid 120.00, approved by ann" in out
    assert "no answer in 3 days: escalated" in out
    assert "late webhook refused: WorkflowFinishedError" in out


def test_quickstart_runs_as_a_script() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "-- started" in done.stdout
