"""Two pipelines built from the composition operators and a DAG.

1. ``extract >> (transform_a | transform_b) >> load``: ``>>`` is a sequence,
   ``|`` a Parallel whose branches run as threads and are joined before
   ``load`` runs. Each step passes its result on, as in Graflow: what a step
   returns is kept with the state, ``transform_a(rows)`` takes the result of
   the step before the Parallel, and ``load`` names the two it takes.
2. A fan-out / fan-in of three: ``split`` feeds three ``count-N`` nodes of a
   DAG, and ``merge`` runs after all three. One shard's data arrives late (an
   event), so the first ``resume`` stops with two shards counted and ``merge``
   still waiting for the third; the state goes to a blob and back, as it
   would between two requests, and the event finishes the job.

The on_step_start hook prints which thread runs each step.
Run it with ``.venv/bin/python examples/etl.py``.
"""

from __future__ import annotations

import gorch
from gorch import DAG, Node, On, S, Select, Step

RAW = [
    "2024-05-01,book,12.50",
    "2024-05-01,lamp,40.00",
    "2024-05-02,book,12.50",
    "bad line",
    "2024-05-02,pen,1.20",
]

SENTENCE = "the quick brown fox jumps over the lazy dog"


class Etl(gorch.Workflow):
    loaded: str = ""

    def definition(self) -> gorch.Section:
        return (
            Step("extract", self.extract)
            >> (Step("transform_a", self.transform_a) | Step("transform_b", self.transform_b))
            >> Step("load", self.load)
        )

    def extract(self) -> list[list[str]]:
        rows = [line.split(",") for line in RAW if line.count(",") == 2]
        print(f"      extract: {len(rows)} valid rows of {len(RAW)}")
        return rows

    def transform_a(self, rows: list[list[str]]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for _, item, price in rows:
            totals[item] = round(totals.get(item, 0) + float(price), 2)
        print(f"      transform_a: totals by item {totals}")
        return totals

    def transform_b(self, rows: list[list[str]]) -> list[str]:
        days = sorted({day for day, _, _ in rows})
        print(f"      transform_b: days {days}")
        return days

    def load(self, transform_a: dict[str, float], transform_b: list[str]) -> None:
        self.loaded = f"{len(transform_a)} items over {len(transform_b)} days"
        print(f"      load: wrote {self.loaded}")

    def on_step_start(self, ctx: gorch.StepContext) -> None:
        print(f"   [{ctx.thread_id}] {ctx.step}")


class FanOut(gorch.Workflow):
    words: list[str] = []
    shards: list[list[str]] = []
    counts: dict[str, int] = {}
    total: int = 0

    def definition(self) -> gorch.Section:
        return S(
            DAG(
                "wordcount",
                Step("split", self.split),
                Step("count-0", lambda: self.count(0), after=["split"]),
                Step("count-1", lambda: self.count(1), after=["split"]),
                Node(
                    "count-2",
                    Select("await shard 2", On("shard-2-ready", self.shard_ready)),
                    Step("count shard 2", lambda: self.count(2)),
                    after=["split"],
                ),
                Step("merge", self.merge, after=["count-0", "count-1", "count-2"]),
            )
        )

    def split(self) -> None:
        self.shards = [self.words[i::3] for i in range(3)]
        print(f"      split: {len(self.words)} words into 3 shards")

    def count(self, shard: int) -> None:
        self.counts[str(shard)] = len(self.shards[shard])
        print(f"      shard {shard}: {self.counts[str(shard)]} words")

    def shard_ready(self, extra: list[str]) -> None:
        self.shards[2].extend(extra)

    def merge(self) -> None:
        self.total = sum(self.counts.values())
        print(f"      merge: {self.total} words from shards {sorted(self.counts)}")

    def on_step_start(self, ctx: gorch.StepContext) -> None:
        print(f"   [{ctx.thread_id}] {ctx.step}")


def main() -> None:
    print("== 1. extract >> (transform_a | transform_b) >> load")
    print(f"   definition: {Etl().definition()!r}")
    wf = Etl()
    state = gorch.new_state("etl-1", "etl")
    status = gorch.resume(wf, state)
    print(f"-> {status.value}: {wf.loaded}")
    print(f"   results kept with the state: {sorted(state.results)}")

    print()
    print("== 2. fan-out / fan-in of three: split -> count-0 | count-1 | count-2 -> merge")
    fan = FanOut(words=SENTENCE.split())
    state = gorch.new_state("wc-1", "wordcount")
    status = gorch.resume(fan, state)
    dag = state.thread(gorch.MAIN_THREAD)
    assert dag is not None
    nodes = ", ".join(f"{n}={s}" for n, s in dag.nodes.items())
    print(f"-> {status.value}: nodes ended: {nodes}")
    print(f"   awaited: {[(t, e) for t, e, _ in gorch.awaited_events(state)]}")
    blob = gorch.dumps(fan, state)
    print(f"   saved: {len(blob)} bytes; merge has not run (total={fan.total})")

    print()
    print("   ... shard 2's data arrives: load the blob, deliver the event, resume")
    fan, state = gorch.loads(blob, FanOut)
    gorch.handle_event(fan, state, "shard-2-ready", ["again", "and", "again"])
    status = gorch.resume(fan, state)
    print(f"-> {status.value}: counts={fan.counts} total={fan.total}")


if __name__ == "__main__":
    main()
