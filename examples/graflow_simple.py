"""Graflow's simple pipeline as a gorch pipeline: three tasks, ``start >> middle >> end``.

In Graflow the tasks are decorated functions, wired inside a ``with
workflow("simple_pipeline") as ctx:`` block and run with
``ctx.execute("start")``. In gorch:

* ``@task`` (from :mod:`gorch.pipeline`) makes a function a task named after
  it; the task is still the function, and can be shared between pipelines;
* ``with Pipeline("simple_pipeline") as p:`` records every ``>>`` written in
  the block as edges of ``p``;
* ``p.execute()`` runs it in this process (``p.workflow()`` is the same
  pipeline as a ``gorch.Workflow`` class for an Engine: see
  ``graflow_diamond.py``);
* ``p.execute(start_at="middle")`` is Graflow's ``ctx.execute("middle")``:
  ``start`` is skipped, ``middle`` and ``end`` run;
* ``p.execute(max_steps=2)`` is Graflow's ``max_steps``: the call stops after
  two tasks. What it leaves is an ordinary gorch instance: it goes to a msgpack
  blob and back, as between two processes, and ``gorch.resume`` runs ``end``.

Run it with ``.venv/bin/python examples/graflow_simple.py``.
"""

from __future__ import annotations

import gorch
from gorch.pipeline import Pipeline, task


@task
def start() -> None:
    print("   Starting!")


@task
def middle() -> None:
    print("   Middle!")


@task
def end() -> None:
    print("   End!")


def main() -> None:
    with Pipeline("simple_pipeline") as p:
        start >> middle >> end

    print("== the pipeline")
    print(f"   name: {p.name}")
    print(f"   tasks: {len(p.tasks)} ({', '.join(p.tasks)})")
    print(f"   dependencies: {len(p.edges)} ({', '.join(f'{a} -> {b}' for a, b in p.edges)})")
    print(f"   as a workflow: {p.workflow()().definition()!r}")

    print()
    print("== execute from start")
    run = p.execute()
    print(f"-> {run.status.value} after {run.steps} steps")

    print()
    print("== execute from middle (start is skipped)")
    run = p.execute(start_at="middle")
    print(f"-> {run.status.value} after {run.steps} steps")

    print()
    print("== execute with a budget of 2 steps")
    run = p.execute(max_steps=2)
    print(f"-> {run.status.value} after {run.steps} steps")
    blob = gorch.dumps(run.wf, run.state)
    print(f"   saved: {len(blob)} bytes")
    print("   ... later, from the blob: gorch.resume runs what is left")
    wf, state = gorch.loads(blob, type(run.wf))
    status = gorch.resume(wf, state)
    print(f"-> {status.value}")

    print()
    print("Pipeline completed successfully!")


if __name__ == "__main__":
    main()
