"""Graflow's multi-stage pattern, declared as separate edges over shared tasks.

Graflow's operators demo names a multi-stage shape,
``(load_a | load_b) >> validate >> (process_a | process_b) >> store``, and
its low-level API builds graphs one ``add_edge`` at a time. In gorch both
go into one pipeline: every ``>>`` / ``|`` written inside the ``with``
block and every ``p.edge(before, after)`` between tasks it has (Graflow's
``add_node`` is ``p.add``) adds edges, and statements that
share a task (``validate``, ``store``) add up to one graph. The pipeline
runs as one DAG: a task starts as soon as every task it comes after has
completed.

* ``store(process_a, process_b)`` reads both results by name; ``validate``
  reads the two loads by name too, ``process_a(rows)`` takes the result of the
  one task it comes after.
* A step budget (``gorch.pipeline.resume(..., max_steps=3)``) stops the first
  call after three tasks; each checkpoint saves the instance as a msgpack
  blob, as a store would. A second call, from the blob, runs the rest.
* An edge that closes a cycle (``store -> validate``) is refused when it is
  declared, naming the cycle; nothing in the pipeline changes.

Run it with ``.venv/bin/python examples/graflow_edges.py``.
"""

from __future__ import annotations

import gorch
from gorch.pipeline import Pipeline, PipelineError, resume, task


@task
def load_a() -> list[int]:
    print("   load_a: 3 rows")
    return [1, 2, 3]


@task
def load_b() -> list[int]:
    print("   load_b: 2 rows")
    return [10, 20]


@task
def validate(load_a: list[int], load_b: list[int]) -> list[int]:
    rows = [r for r in load_a + load_b if r > 0]
    print(f"   validate: {len(rows)} valid rows")
    return rows


@task
def process_a(rows: list[int]) -> int:
    print(f"   process_a: sum {sum(rows)}")
    return sum(rows)


@task
def process_b(rows: list[int]) -> int:
    print(f"   process_b: max {max(rows)}")
    return max(rows)


@task
def store(process_a: int, process_b: int) -> str:
    line = f"sum={process_a} max={process_b}"
    print(f"   store: {line}")
    return line


with Pipeline("multi_stage") as pipeline:
    (load_a | load_b) >> validate  # stage 1, fan-in
    validate >> (process_a | process_b)  # stage 2, fan-out from the shared task
    pipeline.add(store)  # stage 3: a task, then one edge at a time
    pipeline.edge(process_a, store)
    pipeline.edge("process_b", "store")  # a task of the pipeline, by name

MultiStage = pipeline.workflow()


def main() -> None:
    print("== edges, as declared")
    for a, b in pipeline.edges:
        print(f"   {a} -> {b}")

    print()
    print("== a cycle is refused where it is declared")
    try:
        pipeline.edge(store, validate)
    except PipelineError as e:
        print(f"   PipelineError: {e}")
    print(f"   edges still: {len(pipeline.edges)}")

    print()
    print("== call 1: a budget of 3 steps, saving at every checkpoint")
    wf, state = MultiStage(), gorch.new_state("ms-1", "multi_stage")
    saved: list[bytes] = []
    status = resume(wf, state, lambda kind: saved.append(gorch.dumps(wf, state)), max_steps=3)
    print(f"-> {status.value}; results so far: {sorted(state.results)}")

    print()
    print("== call 2: from the last save, with no budget")
    wf, state = gorch.loads(saved[-1], MultiStage)
    status = resume(wf, state)
    print(f"-> {status.value}: {state.results['store']}")


if __name__ == "__main__":
    main()
