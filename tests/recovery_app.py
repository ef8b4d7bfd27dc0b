"""Workflows and child-process entry points for the crash-recovery and multi-process tests.

They live in an importable module (not in the test files) so that processes
started with the "spawn" method can import them by name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pydantic

import gorch
from gorch import For, Go, On, S, Select, Step, WaitFor
from gorch.engine import Engine

STEPS = 8
"""How many steps a Pipeline runs, one after the other."""


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line with a single O_APPEND write, so concurrent writers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class Pipeline(gorch.Workflow):
    """Eight steps in a row after a ``go`` event, and an inbox thread that takes notes meanwhile.

    ``start`` leaves it waiting for ``go`` (with the inbox's wait saved); the
    ``send`` of ``go`` runs the steps. Each step appends ``start k PID`` to
    ``workdir/log``, waits while the file ``workdir/hold-k`` exists (so a test
    can freeze it in flight), sleeps ``step_sleep`` seconds, records ``k`` in
    ``done`` and appends ``done k PID``.
    """

    workdir: str
    step_sleep: float = 0.0
    done: list[int] = []
    notes: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            # The inbox is spawned first, so it reaches its Select before any step runs.
            Go("inbox", For("inbox loop", True, Select("await note", On("note", self.on_note)))),
            Select("await go", On("go")),
            Go("pipeline", *[Step(f"step {k}", self._step(k)) for k in range(1, STEPS + 1)]),
            WaitFor("pipeline done", lambda: len(self.done) >= STEPS),
        )

    def _step(self, k: int) -> Any:
        return lambda: self.run_step(k)

    def run_step(self, k: int) -> None:
        log = Path(self.workdir) / "log"
        append_line(log, f"start {k} {os.getpid()}")
        hold = Path(self.workdir) / f"hold-{k}"
        while hold.exists():
            time.sleep(0.01)
        time.sleep(self.step_sleep)
        self.done.append(k)
        append_line(log, f"done {k} {os.getpid()}")

    def on_note(self, text: str) -> int:
        self.notes.append(text)
        return len(self.notes)


class Inc(pydantic.BaseModel):
    by: int
    key: str
    """Unique per send, so a double application shows up as a repeated key."""
    pause: float = 0.0
    """Seconds the handler takes: a wider window for another process to save first."""


class Counter(gorch.Workflow):
    """Counts ``inc`` events forever (until an absurd count)."""

    count: int = 0
    keys: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            For(
                "count forever",
                lambda: self.count < 10**9,
                Select("await inc", On("inc", self.on_inc)),
            )
        )

    def on_inc(self, inc: Inc) -> int:
        time.sleep(inc.pause)
        self.count += inc.by
        self.keys.append(inc.key)
        return self.count


WORKFLOWS: dict[str, type[gorch.Workflow]] = {"pipeline": Pipeline, "counter": Counter}


def run_pipeline(spec: Any, workflow_id: str, workdir: str, step_sleep: float) -> None:
    """Child process: start a Pipeline and send ``go``, which runs it to the end (or the kill)."""
    engine = Engine(spec.open(), WORKFLOWS)
    engine.start("pipeline", workflow_id, {"workdir": workdir, "step_sleep": step_sleep})
    engine.send(workflow_id, "go")


def send_incs(
    spec: Any, workflow_id: str, sender: int, count: int, start_at: float, pause: float
) -> tuple[list[str], list[int]]:
    """Child process: send ``count`` inc events; return the errors and the handlers' outputs."""
    engine = Engine(spec.open(), WORKFLOWS)
    errors: list[str] = []
    outputs: list[int] = []
    time.sleep(max(0.0, start_at - time.time()))  # all senders begin together
    for i in range(count):
        try:
            inc = {"by": 1, "key": f"{sender}-{i}", "pause": pause}
            outputs.append(engine.send(workflow_id, "inc", inc))
        except Exception as e:  # reported to the parent, which fails the test
            errors.append(f"send {sender}-{i}: {type(e).__name__}: {e}")
    engine.store.close()
    return errors, outputs
