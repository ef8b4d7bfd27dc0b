"""LightFlow's "parallel" example as a gorch DAG: a branch, three lanes, and a join.

In LightFlow the tasks are objects wired by a dict::

                /-> lane1_print_task \\
    branch_task --> lane2_print_task  --> join_task
                \\-> lane3_print_task /

    d.define({branch_task: [lane1_print_task, lane2_print_task, lane3_print_task],
              lane1_print_task: join_task, lane2_print_task: join_task,
              lane3_print_task: join_task})

In gorch the tasks are the workflow's methods:

* ``Step(self.branch_task)`` is a step named after its method, ``branch_task``;
* the three lanes are one statement, ``lanes = Parallel("lanes", ...)`` (or
  ``a | b | c``), and the DAG takes it as a node: ``Node(lanes, after=[...])``
  makes it start after ``branch_task`` (a composite placed in a DAG as is
  would depend on nothing);
* ``after=[lanes]`` is LightFlow's join: ``join_task`` waits for every lane.
  ``after=`` takes the method (``self.branch_task``), the Step, the name, or
  the composite statement itself.

The second lane waits for its data to arrive (an event), so the first
process stops with the DAG half done; a second Engine on the same SQLite file
delivers the event, and the join runs. The ``on_step_start`` hook prints what
LightFlow's ``print_info`` callback prints.

Run it with ``.venv/bin/python examples/lightflow_parallel.py``.
"""

from __future__ import annotations

import tempfile

import gorch
from gorch import DAG, Node, On, Parallel, S, Select, Step

DAG_NAME = "main_dag"


class ParallelLanes(gorch.Workflow):
    ran: list[str] = []

    def definition(self) -> gorch.Section:
        lanes = Parallel(
            "lanes",
            Step(self.lane1_print_task),
            S(Select("lane2 data", On("lane2 ready")), Step(self.lane2_print_task), name="lane2"),
            Step(self.lane3_print_task),
        )
        return S(
            DAG(
                DAG_NAME,
                Step(self.branch_task),
                Node(lanes, after=[self.branch_task]),  # named "lanes", after its label
                Step(self.join_task, after=[lanes]),  # the join: all three lanes ended
            )
        )

    def branch_task(self) -> None:
        self.ran.append("branch_task")

    def lane1_print_task(self) -> None:
        self.ran.append("lane1_print_task")

    def lane2_print_task(self) -> None:
        self.ran.append("lane2_print_task")

    def lane3_print_task(self) -> None:
        self.ran.append("lane3_print_task")

    def join_task(self) -> None:
        self.ran.append("join_task")

    def on_step_start(self, ctx: gorch.StepContext) -> None:
        print(
            f"   Task {ctx.step} being run in DAG {DAG_NAME} "
            f"for workflow {ctx.workflow} ({ctx.workflow_id})"
        )


def show(engine: gorch.Engine, wf_id: str) -> None:
    snap = engine.get(wf_id)
    print(f"   stored: status={snap.status.value}")
    for t in snap.threads:
        if t.nodes:
            print(f"   stored: DAG nodes: {', '.join(f'{n}={s}' for n, s in t.nodes.items())}")
    waiting = sorted(t.id for t in snap.threads if t.status == "waiting_event")
    if waiting:
        print(f"   stored: threads waiting for an event: {', '.join(waiting)}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/gorch.db"
        workflows = {"parallel": ParallelLanes}

        print("== process 1: start the DAG (lane 2's data is not there yet)")
        engine = gorch.Engine(url, workflows=workflows)
        snap = engine.start("parallel", "par-1")
        print(f"-> {snap.status.value}")
        show(engine, "par-1")

        print()
        print("== process 2: lane 2's data arrives")
        engine = gorch.Engine(url, workflows=workflows)
        engine.send("par-1", "lane2 ready")  # returns the event handler's output (none here)
        snap = engine.get("par-1")
        print(f"-> {snap.status.value}")
        show(engine, "par-1")
        ran = snap.data["ran"]
        assert ran[-1] == "join_task" and len(ran) == len(set(ran)) == 5, ran
        print(f"   ran: {', '.join(ran)}")


if __name__ == "__main__":
    main()
