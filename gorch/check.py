"""The pre-deploy check: which stored instances would the current code strand?

Cursor names are the contract with stored instances (SPEC §6). Before a
deploy, :meth:`gorch.Engine.check` loads every in-flight instance (resuming,
waiting or retrying) against the code about to ship and reports each one that
``resume`` or ``send`` would refuse: a cursor, an awaited event, a thread or a
DAG node that is gone, data that no longer validates, a definition that no
longer builds from the instance's data, a blob that does not load at all.
Nothing runs: no step, handler or hook is called; only ``definition()`` is
built from each instance's own data. Finished and cancelled instances are
not looked at: nothing resumes them.

What it cannot see: the input a caller will send. An event's handler may
now expect another input model; make new fields optional and the check of the
event's existence is all a deploy needs.

The scan is written once, sans-IO like the Engine's operations: it yields
store calls that :class:`gorch.Engine` and :class:`gorch.AsyncEngine` perform.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Literal

import pydantic

from gorch.codec import loads
from gorch.errors import DefinitionError, SerializationError
from gorch.index import graph_of
from gorch.interpreter import Placement, locate_threads
from gorch.snapshot import ACTIVE_STATUSES, InstanceStatus
from gorch.state import ACTIVE_EVENT, State, ThreadStatus
from gorch.statements import DAG, Select
from gorch.workflow import Workflow

if TYPE_CHECKING:
    from gorch.engine import EngineCore, Op
    from gorch.stores.base import Page

ProblemKind = Literal[
    "unknown_workflow",
    "blob_corrupt",
    "data_invalid",
    "definition_error",
    "cursor_missing",
    "thread_missing",
    "event_missing",
    "dag_node_missing",
]

Progress = Callable[[int, "int | None"], object]
"""``progress(done, total)``: instances checked so far; ``total`` is None (stores don't count)."""

#: The order the statuses are scanned in (each status is paged on its own).
_SCANNED = (InstanceStatus.RESUMING, InstanceStatus.WAITING, InstanceStatus.RETRYING)
assert frozenset(_SCANNED) == ACTIVE_STATUSES


class CheckProblem(pydantic.BaseModel):
    """One reason one stored instance would not go on under the current code."""

    id: str
    workflow: str
    kind: ProblemKind
    detail: str
    thread: str = ""
    """The thread concerned, when the problem is a thread's."""


class CheckReport(pydantic.BaseModel):
    """What :meth:`gorch.Engine.check` found; ``ok`` is False when any instance would break."""

    ok: bool
    checked: int
    """How many in-flight instances were checked."""
    problems: list[CheckProblem]


def check_blob(
    id: str, workflow: str, blob: bytes, workflows: Mapping[str, type[Workflow]]
) -> list[CheckProblem]:
    """The problems of one stored blob under ``workflows`` (the current code); [] if none."""
    cls = workflows.get(workflow)
    if cls is None:
        known = ", ".join(sorted(workflows)) or "none"
        detail = f"no workflow {workflow!r} is registered (registered: {known})"
        return [CheckProblem(id=id, workflow=workflow, kind="unknown_workflow", detail=detail)]
    try:
        wf, state = loads(blob, cls)
    except SerializationError as e:
        # codec.loads words a blob that decodes but whose data the model refuses so:
        kind: ProblemKind = (
            "data_invalid" if str(e).startswith("the blob's data") else "blob_corrupt"
        )
        return [CheckProblem(id=id, workflow=workflow, kind=kind, detail=str(e))]
    return check_state(wf, state, id=id, workflow=workflow)


def check_state(
    wf: Workflow, state: State, *, id: str = "", workflow: str = ""
) -> list[CheckProblem]:
    """The problems of a loaded instance under ``type(wf)``'s current ``definition()``."""
    id, workflow = id or state.id, workflow or state.workflow

    def problem(kind: ProblemKind, detail: str, thread: str = "") -> CheckProblem:
        return CheckProblem(id=id, workflow=workflow, kind=kind, detail=detail, thread=thread)

    try:
        placed = locate_threads(wf, state)
    except DefinitionError as e:
        return [problem("definition_error", str(e))]
    found = {p.thread.id: p for p in placed}
    out: list[CheckProblem] = []
    for p in placed:
        t = p.thread
        if p.problem:
            out.append(problem(_kind(p, found), p.problem, t.id))
        elif isinstance(p.stmt, Select) and t.status is ThreadStatus.WAITING_EVENT:
            cases = {c.event for c in p.stmt.cases}
            out.extend(
                problem(
                    "event_missing",
                    f"thread {t.id!r} awaits event {we.req.name!r} in Select {t.cur_step!r}, "
                    f"which no longer has that case (cases: {', '.join(sorted(cases))})",
                    t.id,
                )
                for we in t.wait_events
                if we.status in ACTIVE_EVENT and not we.handled and we.req.name not in cases
            )
        elif isinstance(p.stmt, DAG) and t.nodes:
            order = graph_of(p.stmt).order
            out.extend(
                problem(
                    "dag_node_missing",
                    f"DAG {p.stmt.name!r} no longer has node {node!r}, which thread {t.id!r} "
                    f"recorded as {status.value} (nodes: {', '.join(order)})",
                    t.id,
                )
                for node, status in t.nodes.items()
                if node not in order
            )
    return out


def _kind(p: Placement, found: Mapping[str, Placement]) -> ProblemKind:
    """Which kind of problem a thread that cannot be placed has."""
    t = p.thread
    parent = found.get(t.parent) if t.parent else None
    if parent is not None and isinstance(parent.stmt, DAG):
        return "dag_node_missing"
    if t.cur_step and p.known and t.case:
        return "event_missing"  # the Select is there, the case that was handled is not
    if not t.cur_step or p.known:
        return "thread_missing"  # its Go is gone, or the cursor is now in another thread
    return "cursor_missing"


def check_op(core: EngineCore, page_size: int, progress: Progress | None) -> Op[CheckReport]:
    """Page over every in-flight instance of the store and check it against ``core``'s code."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    problems: list[CheckProblem] = []
    checked = 0
    for status in _SCANNED:
        after: str | None = None
        while True:
            page: Page = yield from core._read(
                "list", (), {"status": status.value, "limit": page_size, "after": after}
            )
            for rec in page.records:
                problems.extend(check_blob(rec.id, rec.workflow, rec.blob, core.workflows))
            checked += len(page.records)
            if progress is not None and page.records:
                progress(checked, None)
            if page.next_cursor is None:
                break
            after = page.next_cursor
    return report(checked, problems)


def report(checked: int, problems: Iterable[CheckProblem]) -> CheckReport:
    """A report over ``checked`` instances: ok when there is no problem."""
    found = list(problems)
    return CheckReport(ok=not found, checked=checked, problems=found)


def format_report(rep: CheckReport) -> str:
    """A plain-text report for humans: one line per problem."""
    head = f"checked {rep.checked} instance(s): " + (
        "ok" if rep.ok else f"{len(rep.problems)} problem(s)"
    )
    lines = [head]
    for p in rep.problems:
        where = f" [{p.thread}]" if p.thread else ""
        lines.append(f"  {p.workflow} {p.id}{where}: {p.kind}: {p.detail}")
    return "\n".join(lines)
