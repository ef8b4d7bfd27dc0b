"""The app the CLI tests name with ``--app cli_app:engine`` or ``--app cli_app:WORKFLOWS``.

``engine`` runs on the store named by ``GORCH_STORE`` (a SQLite file in the tests),
or in memory when it is unset.
"""

from __future__ import annotations

import os

import gorch
from gorch import On, S, Select
from gorch.demo import DemoExpense
from gorch.engine import Engine


class Ticket(gorch.Workflow):
    """Open until someone closes it."""

    title: str
    closed_by: str = ""

    def definition(self) -> gorch.Section:
        return S(Select("open", On("close", self.close)))

    def close(self, by: str) -> str:
        self.closed_by = by
        return f"closed by {by}"


WORKFLOWS: dict[str, type[gorch.Workflow]] = {"expense": DemoExpense, "ticket": Ticket}

NONE: dict[str, type[gorch.Workflow]] = {}

engine = Engine(os.environ.get("GORCH_STORE") or "memory://", WORKFLOWS)

not_an_app = 42
