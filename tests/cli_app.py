"""The app the CLI tests name with ``--app cli_app:engine`` or ``--app cli_app:WORKFLOWS``.

``engine`` runs on the store named by ``GORCH_STORE`` (a SQLite file in the tests),
or in memory when it is unset.
"""

from __future__ import annotations

import os
from typing import ClassVar

import gorch
from gorch import On, S, Select, Step
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


class Charge(gorch.Workflow):
    """A step that fails while ``Charge.broken`` is set (tests flip it), then a wait."""

    broken: ClassVar[bool] = False
    amount: int
    charged: bool = False

    def definition(self) -> gorch.Section:
        return S(Step("charge", self.charge), Select("receipt", On("ack", self.ack)))

    def charge(self) -> None:
        if Charge.broken:
            raise RuntimeError("card declined")
        self.charged = True

    def ack(self) -> None:
        pass


WORKFLOWS: dict[str, type[gorch.Workflow]] = {
    "expense": DemoExpense,
    "ticket": Ticket,
    "charge": Charge,
}

NONE: dict[str, type[gorch.Workflow]] = {}


class TicketRenamed(Ticket):
    """The next release of Ticket: its wait was renamed, so stored tickets would be stranded."""

    def definition(self) -> gorch.Section:
        return S(Select("pending", On("close", self.close)))


NEXT_RELEASE: dict[str, type[gorch.Workflow]] = {**WORKFLOWS, "ticket": TicketRenamed}

engine = Engine(os.environ.get("GORCH_STORE") or "memory://", WORKFLOWS)

not_an_app = 42
