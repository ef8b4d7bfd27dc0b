"""LightFlow's README example (the ``simple`` workflow) as an isolated gorch DAG.

LightFlow's README starts the workflow ``simple``: two tasks in a DAG called
``main_dag``, where ``put_task`` stores 5 under ``value`` in the data object
it hands downstream and ``print_task`` prints it::

    put_task --> print_task          d.define({put_task: print_task})

    put_task:   print('Task {task_name} being run in DAG {dag_name} '
                      'for workflow {workflow_name} ({workflow_id}) '
                      'on {worker_hostname}'); data['value'] = 5
    print_task: print('The value is: {}'.format(data['value']))

In LightFlow each task gets ``(data, store, signal, context)``. The data
object travels along the DAG's edges only: a task sees what its upstream
tasks put there, and nothing from tasks that are not upstream of it.

In gorch:

* the tasks are the workflow's methods, ``Step(self.put_task)`` and
  ``Step(self.print_task, after=self.put_task)``, in ``DAG("main_dag", ...)``;
* the data object is the step's result: ``put_task`` returns
  ``{"value": 5}`` and ``print_task(data)`` gets it (a DAG node with one
  dependency reads that dependency's result through its one parameter);
* the context is ``ctx: gorch.StepContext``: ``ctx.step`` is the task name,
  ``ctx.workflow`` and ``ctx.workflow_id`` the workflow's name and id (a
  generated one, as LightFlow's are); the worker's host name is the host
  running the step;
* ``DAG(..., isolated=True)`` gives LightFlow's scoping: a node reads only the
  results of its ancestors (and of steps outside the DAG). The second run
  adds ``peek_task``, which is not downstream of ``put_task``: where LightFlow
  would hand it an empty data object, gorch refuses its read with a
  ``StepResultError`` that says why, and the node fails; ``print_task`` is not
  affected, and nothing ``put_task`` kept is lost.

Both runs use an Engine on a temporary SQLite file.

Run it with ``.venv/bin/python examples/lightflow_readme.py``.
"""

from __future__ import annotations

import socket
import tempfile
from typing import Any

import gorch
from gorch import DAG, S, Step

DAG_NAME = "main_dag"


class Simple(gorch.Workflow):
    """Two tasks exchanging data: ``put_task`` stores 5, ``print_task`` prints it."""

    def definition(self) -> gorch.Section:
        return S(
            DAG(
                DAG_NAME,
                Step(self.put_task),
                Step(self.print_task, after=self.put_task),
                isolated=True,
            )
        )

    def put_task(self, ctx: gorch.StepContext) -> dict[str, Any]:
        print(
            f"Task {ctx.step} being run in DAG {DAG_NAME} "
            f"for workflow {ctx.workflow} ({ctx.workflow_id}) "
            f"on {socket.gethostname()}"
        )
        return {"value": 5}

    def print_task(self, data: dict[str, Any]) -> None:
        print(f"The value is: {data['value']}")


class SimpleWithPeek(Simple):
    """The same DAG with a third task that is not downstream of ``put_task``."""

    def definition(self) -> gorch.Section:
        return S(
            DAG(
                DAG_NAME,
                Step(self.put_task),
                Step(self.print_task, after=self.put_task),
                Step(self.peek_task),  # depends on nothing: put_task is not its ancestor
                isolated=True,
            )
        )

    def peek_task(self, ctx: gorch.StepContext) -> None:
        value = ctx.result("put_task")["value"]  # refused: not an ancestor
        print(f"peek_task read {value} (isolation did not hold)")


def show(engine: gorch.Engine, wf_id: str) -> gorch.Snapshot:
    snap = engine.get(wf_id)
    print(f"   stored: status={snap.status.value}")
    for t in snap.threads:
        if t.nodes:
            print(f"   stored: DAG nodes: {', '.join(f'{n}={s}' for n, s in t.nodes.items())}")
        for node, error in t.node_errors.items():
            print(f"   stored: {node} error: {error}")
    return snap


def stored_results(engine: gorch.Engine, wf_id: str, cls: type[gorch.Workflow]) -> dict[str, Any]:
    """The step results kept in the stored state (what later steps read)."""
    _, state = gorch.loads(engine.store.load(wf_id).blob, cls)
    return dict(state.results)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine = gorch.Engine(
            f"sqlite:///{tmp}/gorch.db",
            workflows={"simple": Simple, "simple_with_peek": SimpleWithPeek},
        )

        print("== lightflow workflow start simple")
        snap = engine.start("simple")  # the id is generated, as LightFlow's are
        print(f"-> {snap.status.value}")
        show(engine, snap.id)

        print()
        print("== simple_with_peek: peek_task is not downstream of put_task")
        snap = engine.start("simple_with_peek")
        print(f"-> {snap.status.value}: {snap.error}")
        show(engine, snap.id)
        print(f"   stored results: {stored_results(engine, snap.id, SimpleWithPeek)}")


if __name__ == "__main__":
    main()
