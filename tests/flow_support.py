"""Workflow helpers shared by the Parallel / DAG / operator tests."""

from __future__ import annotations

from typing import Any

from pydantic import Field

import gorch


class Logged(gorch.Workflow):
    """Steps append their name to ``log``; names listed in ``fail`` raise instead."""

    log: list[str] = Field(default_factory=list)
    fail: list[str] = Field(default_factory=list)

    def run(self, what: str) -> Any:
        def step() -> None:
            self.log.append(what)
            if what in self.fail:
                raise RuntimeError(f"{what} broke")

        return step


def noop() -> None:
    pass


def new(wf: gorch.Workflow) -> gorch.State:
    return gorch.new_state(f"{type(wf).__name__}-1", type(wf).__name__)
