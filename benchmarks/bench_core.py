"""Micro-benchmarks of the gorch core (``resume`` / ``handle_event`` / ``dumps`` / ``loads``).

Run from the project root::

    .venv/bin/python benchmarks/bench_core.py            # full run, well under a minute
    .venv/bin/python benchmarks/bench_core.py --quick    # a few seconds, rough figures
    .venv/bin/python benchmarks/bench_core.py --json bench.json
    .venv/bin/python benchmarks/bench_core.py --go /path/to/gorchestrate/async

Figures (all measured with warm-up rounds, then several timed repeats; the
median and the best repeat are reported, garbage collection paused while a
repeat is timed, as ``timeit`` does):

(a) gorchestrate's own benchmark: For / Step / For + Select, driven by two
    events to the end; one op = new workflow + new_state + 3 resumes + 2 events.
    Also the shape a store-backed Engine uses: the event's handler a
    ``gorch.Handler`` with a setup and a teardown, and a checkpoint callback.
    With ``--go DIR`` (a checkout of gorchestrate/async, see README.md), Go's
    own benchmark of this workflow runs right before and right after, and
    each figure is given as a factor of Go's time (the goal: at most 2.5x).
(b) one resume of a straight workflow of N steps, from ``new_state`` to FINISHED:
    total and per-step cost, which should stay flat as N grows.
(c) ``gorch.dumps`` / ``gorch.loads`` of the SPEC's Expense example waiting in
    its Select (typed handler + 3-day Timeout), and the blob size.
(d) a loop of events (``For i < N`` around a Select): cost per iteration
    (handle_event + resume), and the first vs the last tenth of the loop, which
    should cost the same.

Only the standard library is used for measuring.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pydantic
from benchkit import (
    GO_BENCH,
    add_go_options,
    emit,
    environment,
    fmt,
    go_checkout,
    measure,
    run_go,
    summary,
    table,
    timed,
)

import gorch
from gorch import For, If, On, Return, S, Select, Step, Timeout

FINISHED = gorch.WorkflowStatus.FINISHED
WAITING = gorch.WorkflowStatus.WAITING

# gorchestrate/async (Go) runs benchmark (a) at about this speed on the machines
# it was measured on (see benchmarks/README.md); ``--go DIR`` measures it in the run.
GO_REFERENCE_US_PER_OP = (17.0, 22.3)
#: gorch's goal for (a), with or without the Handler: at most this factor of Go's time.
TARGET_GO_FACTOR = 2.5
TARGET_US_PER_OP = TARGET_GO_FACTOR * GO_REFERENCE_US_PER_OP[1]


# --------------------------------------------------------------------------- workflows


class GorchestrateBench(gorch.Workflow):
    """The workflow of gorchestrate's ``BenchmarkWorkflow``."""

    i: int = 0

    def definition(self) -> gorch.Section:
        return S(
            For("loop", self.i < 5, Step("inc", self.inc)),
            Step("reset", self.reset),
            For(
                "loop2",
                self.i < 2,
                Select("wait", On("event", self.got_event, Step("inc2", self.inc))),
            ),
        )

    def inc(self) -> None:
        self.i += 1

    def reset(self) -> None:
        self.i = 0

    def got_event(self) -> None:
        return None


class Receipt(gorch.Handler):
    """A handler with a setup and a teardown, as a store-backed instance has."""

    def setup(self, req: gorch.EventRequest) -> str | None:
        return None

    def handle(self, req: gorch.EventRequest, input: Any) -> Any:
        return None

    def teardown(self, req: gorch.EventRequest, handled: bool) -> None:
        return None


_RECEIPT = Receipt()


class HandlerBench(GorchestrateBench):
    """(a) with a Handler object that has setup and teardown."""

    def definition(self) -> gorch.Section:
        return S(
            For("loop", self.i < 5, Step("inc", self.inc)),
            Step("reset", self.reset),
            For(
                "loop2",
                self.i < 2,
                Select("wait", On("event", _RECEIPT, Step("inc2", self.inc))),
            ),
        )


def linear_class(n: int) -> type[gorch.Workflow]:
    """A class whose definition is always the same ``n`` steps (a static shape)."""

    class StaticLinear(gorch.Workflow):
        i: int = 0

        def definition(self) -> gorch.Section:
            inc = self.inc
            return S(*[Step(f"step{k}", inc) for k in range(n)])

        def inc(self) -> None:
            self.i += 1

    return StaticLinear


class Linear(gorch.Workflow):
    """A straight sequence of ``n`` steps, ``n`` a field: the shape varies with the data,
    so gorch validates each call's first build (a cost per statement)."""

    n: int
    i: int = 0

    def definition(self) -> gorch.Section:
        inc = self.inc
        return S(*[Step(f"step{k}", inc) for k in range(self.n)])

    def inc(self) -> None:
        self.i += 1


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Expense(gorch.Workflow):
    """The SPEC's example: notify, then wait for a decision or a 3-day timeout."""

    amount: float
    status: str = "new"
    approver: str = ""

    def definition(self) -> gorch.Section:
        return S(
            Step("notify manager", self.notify),
            Select(
                "await decision",
                On("decide", self.on_decide),
                Timeout("expired", timedelta(days=3), Step("escalate", self.escalate), Return()),
            ),
            If(self.status == "approved", Step("pay", self.pay)).Else(
                Step("tell requester", self.reject)
            ),
        )

    def on_decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        self.approver = d.by
        return {"status": self.status}

    def notify(self) -> None:
        self.status = "pending"

    def escalate(self) -> None:
        self.status = "escalated"

    def pay(self) -> None:
        self.status = "paid"

    def reject(self) -> None:
        self.status = "rejected"


class EventLoop(gorch.Workflow):
    """``For i < n`` around a Select: every iteration waits for one ``tick``."""

    n: int
    i: int = 0

    def definition(self) -> gorch.Section:
        return S(
            For(
                "loop",
                self.i < self.n,
                Select("wait", On("tick", self.on_tick, Step("inc", self.inc))),
            ),
        )

    def on_tick(self) -> None:
        return None

    def inc(self) -> None:
        self.i += 1


# --------------------------------------------------------------------------- timing


class Config:
    """How much to measure; ``quick`` trades precision for speed."""

    def __init__(self, quick: bool, go: str | None = None, go_bench: str = GO_BENCH) -> None:
        self.quick = quick
        self.go = go  # a checkout of gorchestrate/async to run Go's benchmark in
        self.go_bench = go_bench
        self.repeats = 3 if quick else 9
        self.warmup = 1 if quick else 2
        self.a_ops = 200 if quick else 8000
        # (b): steps -> workflows resumed per repeat
        self.b_sizes = (
            {1: 100, 10: 30, 100: 5, 1000: 1}
            if quick
            else {1: 8000, 10: 2000, 100: 200, 1000: 20, 10000: 3}
        )
        self.c_ops = 200 if quick else 10000
        # (d): loop iterations -> workflows driven per repeat
        self.d_sizes = {100: 2} if quick else {100: 50, 1000: 5}


_timed = timed


# --------------------------------------------------------------------------- benchmarks


def _gorchestrate_op(_: object) -> gorch.WorkflowStatus:
    wf = GorchestrateBench()
    state = gorch.new_state("bench", "bench")
    gorch.resume(wf, state)
    gorch.handle_event(wf, state, "event")
    gorch.resume(wf, state)
    gorch.handle_event(wf, state, "event")
    return gorch.resume(wf, state)


def _counting_checkpoint() -> Callable[[gorch.CheckpointKind], None]:
    """A checkpoint callback of one op: it counts the saves it is asked for."""
    saves = [0]

    def checkpoint(kind: gorch.CheckpointKind) -> None:
        saves[0] += 1

    return checkpoint


def _handler_op(_: object) -> gorch.WorkflowStatus:
    wf = HandlerBench()
    state = gorch.new_state("bench", "bench")
    checkpoint = _counting_checkpoint()
    gorch.resume(wf, state, checkpoint)
    gorch.handle_event(wf, state, "event")
    gorch.resume(wf, state, checkpoint)
    gorch.handle_event(wf, state, "event")
    return gorch.resume(wf, state, checkpoint)


# --------------------------------------------------------------------------- the floor of (a)
#
# What any interpreter keeping SPEC §1 must do for (a), and nothing else: the
# same 13 ``definition()`` builds (one at the start of each of the five calls,
# one before each condition or Select read after a step or handler changed
# data), the same calls of the steps, the handler (and its setup / teardown)
# and the checkpoint callback, each with what it is given (an EventRequest per
# awaited event), and the workflow and state they work on. No cursor is looked
# up, no thread or wait recorded: the interpreter's own work is what gorch
# costs above this line. Written for this one workflow, as the SQL floors of
# ``bench_floors.py`` are for theirs; ``check_floor`` proves it does the same.


def _floor_op(
    cls: type[GorchestrateBench], checkpoint: Callable[[gorch.CheckpointKind], None] | None
) -> int:
    """(a) by hand: returns the workflow's ``i`` at the end (2, as gorch's run ends)."""
    wf = cls()
    state = gorch.new_state("bench", "bench")
    # resume 1: the first loop, reset, the second loop's condition, the Select's setup
    root = wf.definition()
    loop = root.stmts[0]
    while loop.cond:  # type: ignore[attr-defined]
        loop.body[0].fn()  # type: ignore[attr-defined]
        if checkpoint is not None:
            checkpoint(gorch.CheckpointKind.AFTER_STEP)
        loop = wf.definition().stmts[0]
    root.stmts[1].fn()  # type: ignore[attr-defined]
    if checkpoint is not None:
        checkpoint(gorch.CheckpointKind.AFTER_STEP)
    root = wf.definition()
    pc = 0
    while root.stmts[2].cond:  # type: ignore[attr-defined]
        pc += 1
        req = gorch.EventRequest(state.id, "main", "event", pc)
        handler = root.stmts[2].body[0].cases[0].handler  # type: ignore[attr-defined]
        if isinstance(handler, gorch.Handler):
            req.setup_data = handler.setup(req)
            if checkpoint is not None:
                checkpoint(gorch.CheckpointKind.AFTER_SETUP)
        if checkpoint is not None:
            checkpoint(gorch.CheckpointKind.AFTER_RESUME)
        # handle_event: a build, the handler
        case = wf.definition().stmts[2].body[0].cases[0]  # type: ignore[attr-defined]
        if isinstance(case.handler, gorch.Handler):
            case.handler.handle(req, None)
        else:
            case.handler()
        # resume: a build, the teardown, the case's step, the loop's condition
        case = wf.definition().stmts[2].body[0].cases[0]  # type: ignore[attr-defined]
        if isinstance(case.handler, gorch.Handler):
            case.handler.teardown(req, True)
            if checkpoint is not None:
                checkpoint(gorch.CheckpointKind.AFTER_TEARDOWN)
        case.body[0].fn()
        if checkpoint is not None:
            checkpoint(gorch.CheckpointKind.AFTER_STEP)
        root = wf.definition()
    if checkpoint is not None:
        checkpoint(gorch.CheckpointKind.AFTER_RESUME)
    return wf.i


def _floor_plain(_: object) -> int:
    return _floor_op(GorchestrateBench, None)


def _floor_handler(_: object) -> int:
    return _floor_op(HandlerBench, _counting_checkpoint())


def check_floor() -> dict[str, int]:
    """Run (a) once through gorch and once through the floor, counting builds, step and
    handler calls and checkpoints; AssertionError unless both did the same.

    Returns the counts (per op: builds, calls of user code, checkpoints; ``i`` at the end).
    """
    counts: dict[str, dict[str, int]] = {}
    for side in ("gorch", "floor"):
        seen = counts[side] = {"builds": 0, "calls": 0, "checkpoints": 0, "i": 0}

        def count(what: str, seen: dict[str, int] = seen) -> None:
            seen[what] += 1

        class Counted(HandlerBench):
            def definition(self) -> gorch.Section:
                count("builds")
                return super().definition()

            def inc(self) -> None:
                count("calls")
                super().inc()

            def reset(self) -> None:
                count("calls")
                super().reset()

        class CountedReceipt(Receipt):
            def setup(self, req: gorch.EventRequest) -> str | None:
                count("calls")
                return None

            def handle(self, req: gorch.EventRequest, input: Any) -> Any:
                count("calls")
                return None

            def teardown(self, req: gorch.EventRequest, handled: bool) -> None:
                count("calls")

        def checkpoint(kind: gorch.CheckpointKind) -> None:
            count("checkpoints")

        global _RECEIPT
        saved, _RECEIPT = _RECEIPT, CountedReceipt()
        try:
            if side == "gorch":
                wf = Counted()
                state = gorch.new_state("bench", "bench")
                gorch.resume(wf, state, checkpoint)
                for _ in range(2):
                    gorch.handle_event(wf, state, "event")
                    gorch.resume(wf, state, checkpoint)
                if state.status is not FINISHED:
                    raise AssertionError(f"(a) through gorch ended {state.status}")
                seen["i"] = wf.i
            else:
                seen["i"] = _floor_op(Counted, checkpoint)
        finally:
            _RECEIPT = saved
    if counts["floor"] != counts["gorch"]:
        raise AssertionError(f"the floor of (a) does other work than gorch: {counts}")
    return counts["gorch"]


def bench_gorchestrate(cfg: Config) -> dict[str, float]:
    """(a) new workflow + new_state → resume → event → resume → event → resume.

    Then the same with a setup/teardown Handler and a checkpoint callback, and
    both through the floor (the builds and calls SPEC §1 obliges, checked first
    to be gorch's own). With ``cfg.go``, Go's benchmark runs before and after
    all four (its best run each time).
    """
    check_floor()
    check = lambda s: s is FINISHED  # noqa: E731
    ends = lambda i: i == 2  # noqa: E731
    go_us: list[float] = []
    if cfg.go is not None:
        go_us.append(min(run_go(cfg.go, cfg.go_bench, cfg.a_ops, cfg.repeats)) * 1e6)
    res = measure(lambda: None, _gorchestrate_op, cfg.a_ops, cfg, check=check)
    hres = measure(lambda: None, _handler_op, cfg.a_ops, cfg, check=check)
    fres = measure(lambda: None, _floor_plain, cfg.a_ops, cfg, check=ends)
    fhres = measure(lambda: None, _floor_handler, cfg.a_ops, cfg, check=ends)
    out = {
        "us_per_op_median": res["median_us"],
        "us_per_op_best": res["best_us"],
        "handler_us_per_op_median": hres["median_us"],
        "handler_us_per_op_best": hres["best_us"],
        "floor_us_per_op_median": fres["median_us"],
        "floor_us_per_op_best": fres["best_us"],
        "handler_floor_us_per_op_median": fhres["median_us"],
        "handler_floor_us_per_op_best": fhres["best_us"],
    }
    if cfg.go is not None:
        go_us.append(min(run_go(cfg.go, cfg.go_bench, cfg.a_ops, cfg.repeats)) * 1e6)
        go = statistics.fmean(go_us)
        out["go_us_per_op"] = go
        out["go_us_per_op_before"], out["go_us_per_op_after"] = go_us
        out["over_go"] = res["median_us"] / go
        out["handler_over_go"] = hres["median_us"] / go
    return out


def bench_linear(cfg: Config) -> dict[str, dict[str, float]]:
    """(b) one resume of an N-step straight workflow, from new_state to FINISHED."""
    out: dict[str, dict[str, float]] = {}
    for n, count in cfg.b_sizes.items():
        static = linear_class(n)

        def prepare(n: int = n, cls: Any = static) -> tuple[Any, gorch.State]:
            return cls(), gorch.new_state(f"linear-{n}", "linear")

        def prepare_dynamic(n: int = n) -> tuple[Any, gorch.State]:
            return Linear(n=n), gorch.new_state(f"linear-{n}", "linear")

        def op(item: tuple[Any, gorch.State]) -> tuple[gorch.WorkflowStatus, int]:
            wf, state = item
            return gorch.resume(wf, state), wf.i

        res = measure(prepare, op, count, cfg, check=lambda r, n=n: r == (FINISHED, n))
        dyn = measure(prepare_dynamic, op, count, cfg, check=lambda r, n=n: r == (FINISHED, n))
        build = measure(lambda cls=static: cls(), lambda wf: wf.definition(), count, cfg)
        out[str(n)] = {
            "resume_us_median": res["median_us"],
            "resume_us_best": res["best_us"],
            "us_per_step_median": res["median_us"] / n,
            "us_per_step_best": res["best_us"] / n,
            "us_per_step_dynamic_median": dyn["median_us"] / n,
            "definition_build_us_median": build["median_us"],
        }
    return out


def _waiting_expense() -> tuple[Expense, gorch.State]:
    wf = Expense(amount=120.0)
    state = gorch.new_state("exp-42", "expense")
    if gorch.resume(wf, state) is not WAITING:
        raise AssertionError("the Expense workflow should wait for its decision")
    return wf, state


def bench_codec(cfg: Config) -> dict[str, float]:
    """(c) dumps / loads of the Expense example waiting in its Select."""
    wf, state = _waiting_expense()
    blob = gorch.dumps(wf, state)
    if gorch.dumps(*gorch.loads(blob, Expense)) != blob:
        raise AssertionError("the Expense blob does not round-trip")
    dumps = measure(
        lambda: None, lambda _: gorch.dumps(wf, state), cfg.c_ops, cfg, check=blob.__eq__
    )
    loads = measure(lambda: None, lambda _: gorch.loads(blob, Expense), cfg.c_ops, cfg)
    # A loaded workflow must be usable: deliver the decision and finish.
    wf2, state2 = gorch.loads(blob, Expense)
    gorch.handle_event(wf2, state2, "decide", {"approved": True, "by": "ann"})
    if gorch.resume(wf2, state2) is not FINISHED or wf2.status != "paid":
        raise AssertionError("the loaded Expense workflow did not finish as paid")
    return {
        "dumps_us_median": dumps["median_us"],
        "dumps_us_best": dumps["best_us"],
        "loads_us_median": loads["median_us"],
        "loads_us_best": loads["best_us"],
        "blob_bytes": float(len(blob)),
    }


def _drive_loop(n: int) -> list[float]:
    """Run an ``n``-iteration event loop to the end; seconds per iteration."""
    wf = EventLoop(n=n)
    state = gorch.new_state(f"loop-{n}", "loop")
    gorch.resume(wf, state)
    handle_event, resume, clock = gorch.handle_event, gorch.resume, time.perf_counter
    per_iter: list[float] = []
    for _ in range(n):
        t0 = clock()
        handle_event(wf, state, "tick")
        resume(wf, state)
        per_iter.append(clock() - t0)
    if state.status is not FINISHED or wf.i != n:
        raise AssertionError(f"the {n}-iteration event loop did not finish ({state.status})")
    return per_iter


def bench_event_loop(cfg: Config) -> dict[str, dict[str, float]]:
    """(d) For i < N around a Select, driven to the end: µs per iteration."""
    out: dict[str, dict[str, float]] = {}
    for n, count in cfg.d_sizes.items():
        totals: list[float] = []
        first: list[float] = []
        last: list[float] = []
        tenth = max(1, n // 10)
        for r in range(cfg.warmup + cfg.repeats):
            runs: list[list[float]] = []

            def run(runs: list[list[float]] = runs, n: int = n, count: int = count) -> int:
                for _ in range(count):
                    runs.append(_drive_loop(n))
                return count

            _timed(run)
            if r < cfg.warmup:
                continue
            totals.append(statistics.fmean(sum(it) / n for it in runs))
            first.append(statistics.fmean(statistics.fmean(it[:tenth]) for it in runs))
            last.append(statistics.fmean(statistics.fmean(it[-tenth:]) for it in runs))
        total = summary(totals)
        first_us = statistics.median(first) * 1e6
        last_us = statistics.median(last) * 1e6
        out[str(n)] = {
            "us_per_iter_median": total["median_us"],
            "us_per_iter_best": total["best_us"],
            "first_tenth_us_per_iter": first_us,
            "last_tenth_us_per_iter": last_us,
            "last_over_first": last_us / first_us,
        }
    return out


# --------------------------------------------------------------------------- report


_table = table
_f = fmt


def render(report: dict[str, Any]) -> str:
    fig = report["figures"]
    meta = report["meta"]
    out: list[str] = [
        f"gorch {meta['gorch']} core benchmarks — Python {meta['python']} "
        f"({meta['implementation']}), {'quick' if meta['quick'] else 'full'} run, "
        f"median and best of {meta['repeats']} repeats after {meta['warmup']} warm-up",
        "",
    ]

    a = fig["a_gorchestrate"]
    factor = report["reference"]["target_go_factor"]
    out.append("(a) gorchestrate benchmark: new wf + new_state, 3 resumes, 2 events")
    rows = [
        ("gorch (Python)", "us_per_op"),
        ("gorch, Handler with setup/teardown + checkpoint", "handler_us_per_op"),
        ("floor: SPEC's 13 builds + user calls alone", "floor_us_per_op"),
        ("floor, Handler with setup/teardown + checkpoint", "handler_floor_us_per_op"),
    ]
    go: float | None = None
    if "go_us_per_op" in a:  # Go measured in this run
        go = a["go_us_per_op"]
        go_row = ["gorchestrate (Go), this run", _f(go), "", "1x"]

        def vs_go(us: float) -> str:
            return f"{us / go:.2f}x"

        over = max(a["over_go"], a["handler_over_go"])
        verdict = f"-> {'within' if over <= factor else 'ABOVE'} {factor}x Go's time"
    else:
        lo, hi = report["reference"]["go_us_per_op"]
        go_row = ["gorchestrate (Go, reference)", f"{lo:.0f}-{hi:.0f}", "", "1x"]

        def vs_go(us: float) -> str:
            return f"{us / hi:.1f}-{us / lo:.1f}x"

        target = report["reference"]["target_us_per_op"]
        over = max(a["us_per_op_median"], a["handler_us_per_op_median"])
        verdict = (
            f"-> {'within' if over <= target else 'ABOVE'} {factor}x the slower reference "
            f"(<= {target:.0f} µs/op); --go DIR measures Go in the same run"
        )
    lines = [
        [label, _f(a[f"{key}_median"]), _f(a[f"{key}_best"]), vs_go(a[f"{key}_median"])]
        for label, key in rows
    ]
    lines.append(go_row)
    out.append(_table(lines, ["", "µs/op median", "µs/op best", "vs Go"]))
    out.append(verdict)
    own = a["us_per_op_median"] - a["floor_us_per_op_median"]
    hown = a["handler_us_per_op_median"] - a["handler_floor_us_per_op_median"]
    budget = factor * (go if go is not None else report["reference"]["go_us_per_op"][1])
    out.append(
        f"   (the interpreter's own work, gorch minus its floor: {own:.1f} µs/op, with the "
        f"Handler {hown:.1f}; {factor}x Go leaves it {budget - a['floor_us_per_op_median']:.1f}"
        f" and {budget - a['handler_floor_us_per_op_median']:.1f})"
    )
    out.append("")

    out.append("(b) straight workflow of N steps: one resume from new_state to FINISHED")
    out.append(
        _table(
            [
                [
                    n,
                    _f(v["resume_us_median"]),
                    _f(v["resume_us_best"]),
                    _f(v["us_per_step_median"]),
                    _f(v["us_per_step_best"]),
                    _f(v["definition_build_us_median"]),
                    _f(v["us_per_step_dynamic_median"]),
                ]
                for n, v in fig["b_linear"].items()
            ],
            [
                "steps",
                "total µs",
                "best µs",
                "µs/step",
                "best µs/step",
                "build µs",
                "µs/step, n a field",
            ],
        )
    )
    out.append("   (build µs: one definition() call, already included in the total;")
    out.append("    'n a field': one class whose shape varies with data, validated every call)")
    out.append("")

    c = fig["c_codec"]
    out.append("(c) Expense example waiting in its Select (typed On + 3-day Timeout)")
    out.append(
        _table(
            [
                ["gorch.dumps", _f(c["dumps_us_median"]), _f(c["dumps_us_best"])],
                ["gorch.loads", _f(c["loads_us_median"]), _f(c["loads_us_best"])],
            ],
            ["", "µs median", "µs best"],
        )
    )
    out.append(f"   blob: {c['blob_bytes']:.0f} bytes")
    out.append("")

    out.append("(d) event loop For i < N { Select(On tick) }: handle_event + resume per iteration")
    out.append(
        _table(
            [
                [
                    n,
                    _f(v["us_per_iter_median"]),
                    _f(v["us_per_iter_best"]),
                    _f(v["first_tenth_us_per_iter"]),
                    _f(v["last_tenth_us_per_iter"]),
                    f"{v['last_over_first']:.2f}",
                ]
                for n, v in fig["d_event_loop"].items()
            ],
            ["iterations", "µs/iter", "best", "first 10%", "last 10%", "last/first"],
        )
    )
    return "\n".join(out)


def run_all(cfg: Config) -> dict[str, Any]:
    t0 = time.perf_counter()
    figures = {
        "a_gorchestrate": bench_gorchestrate(cfg),
        "b_linear": bench_linear(cfg),
        "c_codec": bench_codec(cfg),
        "d_event_loop": bench_event_loop(cfg),
    }
    return {
        "meta": {
            **environment(),
            "quick": cfg.quick,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "wall_seconds": time.perf_counter() - t0,
            "units": "µs unless named otherwise; median and best over repeats",
        },
        "reference": {
            "go_us_per_op": list(GO_REFERENCE_US_PER_OP),
            "target_go_factor": TARGET_GO_FACTOR,
            "target_us_per_op": TARGET_US_PER_OP,
        },
        "figures": figures,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    add_go_options(parser, "run its benchmark before and after (a)")
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    go = go_checkout(parser, args)
    report = run_all(Config(quick=args.quick, go=go, go_bench=args.go_bench))
    emit(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
