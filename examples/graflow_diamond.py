"""Graflow's diamond with return values, as a pipeline run by the Engine on SQLite.

Graflow's diamond: ``src >> (double | triple) >> combine`` where ``src``
takes a ``value`` parameter, and each task passes its result on through the
channel (``ctx.get_channel().set("doubled", ...)``); ``combine`` adds them:
5 * 2 + 5 * 3 = 25. In gorch what a task returns is kept with the instance,
and a task reads it by declaring a parameter:

* the flow's input is a pydantic model (``Params``); ``p.workflow(input=Params)``
  gives the workflow class its fields (what ``Engine.start`` takes), and a
  first step named ``input`` hands them to ``source(input: Params)``;
* ``double(source)`` names the task whose result it takes; ``triple(value)``
  has one parameter that names no task, so it takes the result of the one
  task it comes after (``source``); ``combine(double, triple)`` names both.

The workflow class is an ordinary ``gorch.Workflow``: the Engine stores it
in SQLite. The first time, the service ``triple`` calls is down: the DAG
ends with ``triple`` failed and ``combine`` skipped (``source`` and
``double`` completed). A new Engine on the same file (a restarted process)
retries the instance: only ``triple`` and ``combine`` run.

Run it with ``.venv/bin/python examples/graflow_diamond.py``.
"""

from __future__ import annotations

import tempfile

import pydantic

import gorch
from gorch.pipeline import Pipeline, task


class Params(pydantic.BaseModel):
    value: int


SERVICE = {"up": False}  # the service triple needs: down during the first run


@task
def source(input: Params) -> int:
    print(f"   source: value={input.value}")
    return input.value


@task
def double(source: int) -> int:
    print(f"   double: {source} * 2 = {source * 2}")
    return source * 2


@task
def triple(value: int) -> int:
    if not SERVICE["up"]:
        print("   triple: the service is down")
        raise ConnectionError("service unavailable")
    print(f"   triple: {value} * 3 = {value * 3}")
    return value * 3


@task
def combine(double: int, triple: int) -> int:
    print(f"   combine: {double} + {triple} = {double + triple}")
    return double + triple


with Pipeline("diamond") as pipeline:
    source >> (double | triple) >> combine

Diamond = pipeline.workflow(input=Params)


def show(engine: gorch.Engine, wf_id: str) -> None:
    snap = engine.get(wf_id)
    print(f"   stored: status={snap.status.value}")
    for t in snap.threads:
        if t.nodes:
            print(f"   stored: nodes {', '.join(f'{n}={s}' for n, s in t.nodes.items())}")
    _, state = gorch.loads(engine.store.load(wf_id).blob, Diamond)
    print(f"   stored: results {state.results}")


def main() -> None:
    print(f"== the diamond: {Diamond(value=0).definition()!r}")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/gorch.db"

        print()
        print("== process 1: start with value=5 (triple's service is down)")
        engine = gorch.Engine(url, workflows={"diamond": Diamond})
        snap = engine.start("diamond", "d-1", {"value": 5})
        print(f"-> {snap.status.value}: {snap.error}")
        show(engine, "d-1")

        print()
        print("== process 2: the service is back; a new Engine retries the instance")
        SERVICE["up"] = True
        engine = gorch.Engine(url, workflows={"diamond": Diamond})
        snap = engine.retry("d-1")
        print(f"-> {snap.status.value}")
        show(engine, "d-1")
        _, state = gorch.loads(engine.store.load("d-1").blob, Diamond)
        print(f"   result: {state.results['combine']}")


if __name__ == "__main__":
    main()
