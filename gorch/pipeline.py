"""Pipelines: tasks as decorated functions, wired with ``>>`` and ``|``, run as a gorch DAG.

For code written the Graflow / Prefect way -- functions first, wiring second::

    @task
    def extract() -> list[int]: ...
    @task
    def double(extract: list[int]) -> list[int]: ...

    with Pipeline("etl") as p:
        extract >> (double | triple) >> load
        p.edge(extract, audit)              # a separately declared edge

    Etl = p.workflow()                      # a gorch.Workflow subclass

A :class:`Task` is a plain function with a name (its ``__name__``); it can be
called as the function and used in any number of pipelines. Inside a
``with Pipeline(...)`` block every ``>>`` and ``|`` over tasks records its
edges in that pipeline; outside one they build a :class:`Flow` value that
``Pipeline(name, flow)`` or ``p.add(flow)`` takes. ``a >> b`` adds an edge
from every last task of ``a`` to every first task of ``b``; ``a | b`` puts
both side by side. Edges declared in separate statements over shared tasks
add up: the pipeline is the graph of all of them.

:meth:`Pipeline.workflow` turns the graph into a workflow class whose
definition is one :class:`gorch.DAG` named after the pipeline, one ``Step``
per task, so the Engine runs, persists and resumes it like any other, and
task parameters read earlier results exactly as step parameters do (see
:mod:`gorch.results`). Mistakes are refused where they are written, with a
:class:`PipelineError`: a cycle (named), two different tasks under one
name, a task run in parallel with itself, an edge to a task the pipeline
does not have, an unknown start task, a step budget below 1.

``start_at`` runs a task and everything after it, skipping the rest (as
Graflow's ``execute(start_node)``); ``max_steps`` (:func:`resume`,
:meth:`Pipeline.execute`) stops a call after that many tasks, leaving an
instance that a later call goes on with.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import pydantic

from gorch.errors import DefinitionError
from gorch.hooks import CallNext, StepContext
from gorch.index import index_definition
from gorch.interpreter import resume as _resume
from gorch.results import plan_of
from gorch.state import CheckpointKind, State, WorkflowStatus, new_state
from gorch.statements import DAG, If, Section, Step, Stmt
from gorch.tasks import (
    _ACTIVE,
    Flow,
    Part,
    PipelineError,
    Task,
    TaskRef,
    _as_flow,
    _Graph,
    _short,
    task,
)
from gorch.workflow import Workflow

__all__ = [
    "Flow",
    "Pipeline",
    "PipelineError",
    "PipelineRun",
    "PipelineWorkflow",
    "Task",
    "resume",
    "task",
]

_PAST = datetime(1970, 1, 1, tzinfo=UTC)  # a deadline that lets no step start
_INPUT = "input"


# --------------------------------------------------------------------------- the pipeline


class Pipeline:
    """A named graph of tasks that becomes a workflow class (:meth:`workflow`).

    ``Pipeline("etl", a >> b, c)`` takes flows and tasks; so does :meth:`add`.
    As a context manager, every ``>>`` / ``|`` over tasks inside the block
    (and every ``@task`` decorated there) is added to it. :meth:`edge`
    declares one edge between tasks it already has.
    """

    def __init__(self, name: str, *parts: Part) -> None:
        if not isinstance(name, str) or not name or name != name.strip():
            raise PipelineError(f"a pipeline's name must be a non-empty str, got {name!r}")
        self.name = name
        self._graph = _Graph()
        self._classes: dict[Any, type[PipelineWorkflow]] = {}
        self.add(*parts)

    # ---- building

    def add(self, *parts: Part) -> Pipeline:
        """Add tasks and flows (their tasks and edges) to the pipeline."""
        for part in parts:
            flow = _as_flow(part, self, "add", part)
            self._graph.merge(flow.graph, f"pipeline {self.name!r}: add({part!r})")
        return self

    def merge(self, graph: _Graph, where: str) -> None:
        """Add a graph built by ``>>`` / ``|`` inside this pipeline's ``with`` block."""
        self._graph.merge(graph, where)

    def edge(self, src: TaskRef, dst: TaskRef) -> Pipeline:
        """Run ``dst`` after ``src``; both must be tasks of the pipeline already."""
        where = f"pipeline {self.name!r}: edge({_short(src)}, {_short(dst)})"
        a, b = self._known(src, where), self._known(dst, where)
        self._graph.add_edge(a, b, where)
        return self

    def _known(self, ref: object, where: str) -> str:
        if isinstance(ref, Task):
            have = self._graph.tasks.get(ref.name)
            if have is not None and not have.same_as(ref):
                self._graph.add_task(ref, where)  # raises: two tasks, one name
            name = ref.name
        elif isinstance(ref, str):
            name = ref
        else:
            raise PipelineError(f"{where}: {_short(ref)} is not a task or a task's name")
        if name not in self._graph.tasks:
            raise PipelineError(
                f"{where}: task {name!r} is not in the pipeline (its tasks: "
                f"{', '.join(self._graph.tasks) or 'none'}); add it first (p.add, or wire "
                "it with >> or |)"
            )
        return name

    def __enter__(self) -> Pipeline:
        if self in _ACTIVE.get():
            raise PipelineError(f"pipeline {self.name!r} is already open in a with block")
        _ACTIVE.set((*_ACTIVE.get(), self))
        return self

    def __exit__(self, *exc: object) -> None:
        active = _ACTIVE.get()
        _ACTIVE.set(tuple(p for p in active if p is not self))

    # ---- reading

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names, in the order they were added."""
        return tuple(self._graph.tasks)

    @property
    def edges(self) -> list[tuple[str, str]]:
        """The edges ``(before, after)``, in the order they were declared."""
        return list(self._graph.edges)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, tasks={list(self.tasks)}, edges={len(self.edges)})"

    # ---- running

    def workflow(
        self,
        *,
        input: type[pydantic.BaseModel] | None = None,
        input_step: str = _INPUT,
        start_at: TaskRef | None = None,
        class_name: str | None = None,
    ) -> type[PipelineWorkflow]:
        """A :class:`gorch.Workflow` subclass running this pipeline as one DAG.

        ``input`` (a pydantic model) gives the class its fields: what a caller
        passes at start (``Engine.start(name, id, {...})``, declared as the
        workflow's ``start_input``). A first step named ``input_step`` returns
        them, so a task reads the input through a parameter of that name
        (``def source(input: Order)``). ``start_at`` is the default of the
        instances' ``start_at`` field. The class is built from the pipeline as
        it is now; later changes to the pipeline do not reach it.

        Raises :class:`PipelineError` for what cannot run: an empty pipeline,
        a name used twice (a task named like the pipeline or the input step),
        an unknown ``start_at``, a task parameter that no result can fill.
        """
        key = (
            input,
            input_step,
            _ref_name(start_at),
            class_name,
            tuple((n, id(t.fn)) for n, t in self._graph.tasks.items()),
            tuple(self._graph.edges),
        )
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = _build(self, input, input_step, start_at, class_name)
        return cls

    def execute(
        self,
        input: pydantic.BaseModel | None = None,
        *,
        start_at: TaskRef | None = None,
        max_steps: int | None = None,
        id: str | None = None,
    ) -> PipelineRun:
        """Run the pipeline in this process, without a store (Graflow's ``execute``).

        ``input`` is an instance of the input model, ``start_at`` the task to
        start from, ``max_steps`` how many tasks this call may run. Returns a
        :class:`PipelineRun`: its ``wf`` and ``state`` are an ordinary gorch
        instance (``gorch.dumps`` them, ``resume`` them later).
        """
        _check_budget(max_steps)
        cls = self.workflow(input=type(input) if input is not None else None)
        name = _ref_name(start_at)
        _check_start(cls.__pipeline__, name)
        data = input.model_dump() if input is not None else {}
        wf = cls(**data, start_at=name)
        state = new_state(id or f"{self.name}-1", self.name)
        run = PipelineRun(wf, state)
        return run.resume(max_steps=max_steps)


def _ref_name(ref: object) -> str | None:
    if ref is None:
        return None
    if isinstance(ref, Task):
        return ref.name
    if isinstance(ref, str):
        return ref
    raise PipelineError(f"start_at names a task (the task or its name), got {ref!r}")


def _check_start(spec: _Spec, name: str | None) -> None:
    if name is not None and name not in spec.preds:
        raise PipelineError(
            f"pipeline {spec.name!r} has no task {name!r} to start at; its tasks: "
            f"{', '.join(spec.order)}"
        )


def _check_budget(max_steps: object) -> None:
    if max_steps is None:
        return
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise PipelineError(
            f"max_steps is how many tasks a call may run: an int of at least 1 "
            f"(or None for no limit), got {max_steps!r}"
        )


# --------------------------------------------------------------------------- the workflow


@dataclass(eq=False)
class _Spec:
    """A pipeline frozen into what its workflow class runs."""

    name: str
    tasks: dict[str, Task]
    order: tuple[str, ...]  # topological, ties in the order tasks were added
    preds: dict[str, tuple[str, ...]]
    succs: dict[str, tuple[str, ...]]
    input_step: str | None
    input_fields: frozenset[str]
    bodies: dict[str | None, tuple[Stmt, ...]] = field(default_factory=dict)

    def body(self, start_at: str | None) -> tuple[Stmt, ...]:
        """The statements run from ``start_at`` (None: all); built once per start task.

        The DAG of the tasks that run. The tasks before ``start_at`` follow in a
        branch never taken: they keep their names in the definition, so a
        parameter named after one is known to read a result that is not there
        (it takes its default, or the step fails saying which result is missing).
        """
        found = self.bodies.get(start_at)
        if found is None:
            keep = set(self.order) if start_at is None else self.after(start_at)
            nodes = []
            for n in self.order:
                if n in keep:
                    t = self.tasks[n]
                    after = [p for p in self.preds[n] if p in keep] or None
                    nodes.append(Step(n, t.fn, retry=t.retry, timeout=t.timeout, after=after))
            found = (DAG(self.name, *nodes),)
            skipped = [Step(n, self.tasks[n].fn) for n in self.order if n not in keep]
            if skipped:
                found += (If(skipped_before_start, *skipped),)
            self.bodies[start_at] = found
        return found

    def after(self, start: str) -> set[str]:
        """``start`` and every task reachable from it."""
        seen, todo = {start}, [start]
        while todo:
            for m in self.succs[todo.pop()]:
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen


def skipped_before_start() -> bool:
    """The condition of the branch holding the tasks before ``start_at``: never true."""
    return False


class PipelineWorkflow(Workflow):
    """Base class of the workflow classes :meth:`Pipeline.workflow` builds.

    ``start_at`` (a task name, or None for all) is chosen when an instance
    starts and kept for its lifetime: the instance runs that task and every
    task after it. A task before it does not run and has no result: a
    parameter named after it takes its default, or the task fails with
    :class:`gorch.StepResultError` naming it.
    """

    __pipeline__: ClassVar[_Spec]

    start_at: str | None = None

    @pydantic.field_validator("start_at")
    @classmethod
    def _known_start(cls, value: str | None) -> str | None:
        spec = cls.__dict__.get("__pipeline__")
        if value is not None and spec is not None and value not in spec.preds:
            raise ValueError(
                f"no task {value!r} to start at; the tasks are {', '.join(spec.order)}"
            )
        return value

    def definition(self) -> Section:
        spec = type(self).__pipeline__
        body = spec.body(self.start_at)
        if spec.input_step is None:
            return Section(*body)
        return Section(Step(spec.input_step, self._pipeline_input), *body)

    def _pipeline_input(self) -> dict[str, Any]:
        fields = type(self).__pipeline__.input_fields
        return self.model_dump(mode="json", include=set(fields))


def _build(
    p: Pipeline,
    input: type[pydantic.BaseModel] | None,
    input_step: str,
    start_at: TaskRef | None,
    class_name: str | None,
) -> type[PipelineWorkflow]:
    g = p._graph
    where = f"pipeline {p.name!r}"
    if not g.tasks:
        raise PipelineError(f"{where} has no tasks")
    if input is not None and not (
        isinstance(input, type) and issubclass(input, pydantic.BaseModel)
    ):
        raise PipelineError(f"{where}: input must be a pydantic model class, got {input!r}")
    if input is not None and (not isinstance(input_step, str) or not input_step):
        raise PipelineError(f"{where}: input_step must be a non-empty str, got {input_step!r}")
    for clash in (p.name, input_step if input is not None else None):
        if clash is not None and clash in g.tasks:
            what = "the pipeline (its DAG)" if clash == p.name else "the input step"
            raise PipelineError(
                f"{where}: task {clash!r} has the name of {what}; names are cursors and "
                "must be unique: rename the task, @task(name='...')"
            )
    preds: dict[str, list[str]] = {n: [] for n in g.tasks}
    for a, b in g.edges:
        preds[b].append(a)
    spec = _Spec(
        name=p.name,
        tasks=dict(g.tasks),
        order=_topological(g, preds),
        preds={n: tuple(v) for n, v in preds.items()},
        succs={n: tuple(v) for n, v in g.succ.items()},
        input_step=input_step if input is not None else None,
        input_fields=frozenset(input.model_fields) if input is not None else frozenset(),
    )
    start = _ref_name(start_at)
    _check_start(spec, start)
    _check_parameters(spec)
    fields: dict[str, Any] = {}
    if input is not None:
        if "start_at" in input.model_fields:
            raise PipelineError(
                f"{where}: the input model {input.__name__} has a field 'start_at', which "
                "pipeline workflows keep for the task to start at; rename the field"
            )
        for n, info in input.model_fields.items():
            fields[n] = (info.annotation, copy.copy(info))
    fields["start_at"] = (str | None, start)
    module = getattr(next(iter(spec.tasks.values())).fn, "__module__", __name__)
    cls = pydantic.create_model(
        class_name or _class_name(p.name),
        __base__=PipelineWorkflow,
        __module__=module,
        __doc__=f"The pipeline {p.name!r} as a workflow: one DAG of its tasks.",
        **fields,
    )
    cls.__pipeline__ = spec
    cls.start_input = tuple(input.model_fields) if input is not None else ()
    # Refuse now what the interpreter would refuse at the first resume.
    for name in (None, start):
        root = cls.model_construct(start_at=name).definition()
        index_definition(root, cls.__qualname__)
    return cls


def _topological(g: _Graph, preds: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Tasks in dependency order; among the ready ones, the order they were added."""
    left = {n: len(v) for n, v in preds.items()}
    rank = {n: i for i, n in enumerate(g.tasks)}
    ready = [n for n in g.tasks if not left[n]]
    out: list[str] = []
    while ready:
        ready.sort(key=rank.__getitem__)
        n = ready.pop(0)
        out.append(n)
        for m in g.succ[n]:
            left[m] -= 1
            if not left[m]:
                ready.append(m)
    return tuple(out)  # the graph is acyclic: every edge was checked when added


def _check_parameters(spec: _Spec) -> None:
    """Refuse a task parameter no result can fill (the step would fail at run time)."""
    names = set(spec.tasks)
    if spec.input_step is not None:
        names.add(spec.input_step)
    for n, t in spec.tasks.items():
        try:
            plan = plan_of(t.fn)
        except DefinitionError as e:
            raise PipelineError(f"pipeline {spec.name!r}, task {n!r}: {e}") from e
        loose = [p for p in plan if p.kind == "result" and p.name not in names and not p.default]
        where = f"pipeline {spec.name!r}: task {n!r}"
        if len(loose) > 1:
            raise PipelineError(
                f"{where}: parameters {', '.join(repr(p.name) for p in loose)} name no task; "
                "name each after the task whose result it takes"
            )
        if loose and len(spec.preds[n]) != 1:
            got = (
                f"comes after {len(spec.preds[n])} tasks ({', '.join(spec.preds[n])})"
                if spec.preds[n]
                else "comes after no task"
            )
            feed = f" or the input step {spec.input_step!r}" if spec.input_step else ""
            raise PipelineError(
                f"{where}: parameter {loose[0].name!r} names no task, and the task {got}, "
                f"so no single result fills it; name it after a task{feed}"
            )


def _class_name(name: str) -> str:
    words = [w for w in re.split(r"[^0-9A-Za-z]+", name) if w]
    base = "".join(w[:1].upper() + w[1:] for w in words) or "Pipeline"
    return base if base[0].isalpha() else f"P{base}"


# --------------------------------------------------------------------------- running with a budget


class _Budget:
    """Counts the tasks that completed in one call (a middleware around each step)."""

    def __init__(self, tasks: Iterable[str] | None) -> None:
        self.tasks = frozenset(tasks) if tasks is not None else None
        self.used = 0

    def around_step(self, ctx: StepContext, call_next: CallNext) -> Any:
        out = call_next()
        if self.tasks is None or ctx.step in self.tasks:
            self.used += 1
        return out


class _OutOfSteps(Exception):
    """Raised by the checkpoint once the budget is spent: ends the call there."""


def resume(
    wf: Workflow,
    state: State,
    checkpoint: Callable[[CheckpointKind], Any] | None = None,
    *,
    max_steps: int | None = None,
    middleware: Sequence[object] = (),
) -> WorkflowStatus:
    """:func:`gorch.resume` that runs at most ``max_steps`` tasks (all steps, for a
    workflow that is not a pipeline); the status it returns.

    A step budget for debugging, as ``deadline`` is a time budget: when the
    budget is spent, no further step starts, and the call returns
    ``resuming`` with the work left for any later ``resume`` (``finished``
    when nothing was left). The budget is this call's, not the instance's:
    nothing of it is saved. ``checkpoint`` is called as by ``gorch.resume``.
    """
    return _budgeted(wf, state, checkpoint, max_steps, middleware)[0]


def _budgeted(
    wf: Workflow,
    state: State,
    checkpoint: Callable[[CheckpointKind], Any] | None,
    max_steps: int | None,
    middleware: Sequence[object] = (),
) -> tuple[WorkflowStatus, int]:
    """Resume with a step budget: the status, and how many tasks completed."""
    _check_budget(max_steps)
    spec = type(wf).__dict__.get("__pipeline__")
    budget = _Budget(spec.tasks if isinstance(spec, _Spec) else None)

    def counted(kind: CheckpointKind) -> Any:
        if checkpoint is not None:
            checkpoint(kind)
        if max_steps is not None and kind is CheckpointKind.AFTER_STEP and budget.used >= max_steps:
            raise _OutOfSteps

    try:
        status = _resume(wf, state, counted, middleware=(*middleware, budget))
    except _OutOfSteps:
        # Spent, right after a checkpoint: let the walk settle (joins, the end) without
        # starting a step, so the status says whether work is left.
        status = _resume(wf, state, checkpoint, middleware=middleware, deadline=_PAST)
    return status, budget.used


@dataclass(eq=False)
class PipelineRun:
    """A pipeline instance run in this process: ``wf`` and ``state``, and how far it got."""

    wf: PipelineWorkflow
    state: State
    steps: int = 0
    """Tasks completed by the last call."""

    @property
    def status(self) -> WorkflowStatus:
        return self.state.status

    @property
    def results(self) -> dict[str, Any]:
        """What each task returned (its JSON form; None is not kept), by task name."""
        tasks = type(self.wf).__pipeline__.tasks
        return {k: v for k, v in self.state.results.items() if k in tasks}

    def result(self, task: TaskRef) -> Any:
        """What ``task`` returned; ``KeyError`` when it has not run or returned None."""
        name = _ref_name(task)
        if name not in type(self.wf).__pipeline__.tasks:
            raise PipelineError(f"the pipeline has no task {name!r}")
        return self.state.results[name]

    def resume(self, *, max_steps: int | None = None) -> PipelineRun:
        """Go on, with at most ``max_steps`` more tasks (None: to the end)."""
        _, self.steps = _budgeted(self.wf, self.state, None, max_steps)
        return self

    def __iter__(self) -> Iterator[Any]:
        """``wf, state = run``."""
        return iter((self.wf, self.state))
