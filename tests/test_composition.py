"""Parallel and the composition operators ``>>`` and ``|`` (SPEC §5).

``Parallel(name, *branches)`` runs each branch as its own thread named
``"{parallel}.{label}"`` and continues once every branch has ended; ``a >> b``
is ``S(a, b)`` and ``a | b`` a Parallel of both; chains flatten.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flow_support import Logged, new, noop
from freezegun import freeze_time

import gorch
from gorch import CheckpointKind as CK
from gorch import (
    For,
    Go,
    If,
    On,
    Parallel,
    S,
    Section,
    Select,
    Step,
    Timeout,
)
from gorch import ThreadStatus as TS
from gorch import WorkflowStatus as WS

MAIN = gorch.MAIN_THREAD
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- helpers


def threads(state: gorch.State) -> dict[str, tuple[TS, str, str]]:
    """``id -> (status, cur_step, parent)`` of every thread."""
    return {t.id: (t.status, t.cur_step, t.parent) for t in state.threads}


def roundtrip(wf: Any, state: gorch.State) -> tuple[Any, gorch.State]:
    return gorch.loads(gorch.dumps(wf, state), type(wf))


def deliver_all(wf: gorch.Workflow, state: gorch.State) -> None:
    """Deliver every awaited event to its own thread, with its pc."""
    for tid, event, pc in gorch.awaited_events(state):
        gorch.handle_event(wf, state, event, thread_id=tid, pc=pc)


# --------------------------------------------------------------------------- Parallel


class TwoBranches(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Step("start", self.run("start")),
            Parallel(
                "par",
                Step("a", self.run("a")),
                S(
                    Step("b1", self.run("b1")),
                    Select("wait b", On("go")),
                    Step("b2", self.run("b2")),
                ),
            ),
            Step("end", self.run("end")),
        )


def test_parallel_runs_each_branch_as_a_thread_and_continues_when_all_ended() -> None:
    wf = TwoBranches()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    assert wf.log == ["start", "a", "b1"]  # "end" waits for the join
    assert threads(state) == {
        MAIN: (TS.WAITING_CONDITION, "par", ""),
        "par.b1>>wait b>>b2": (TS.WAITING_EVENT, "wait b", MAIN),
    }
    b = state.thread("par.b1>>wait b>>b2")
    assert b is not None and b.name == "par.b1>>wait b>>b2"

    wf, state = roundtrip(wf, state)  # the join survives a save
    gorch.handle_event(wf, state, "go", thread_id="par.b1>>wait b>>b2")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["start", "a", "b1", "b2", "end"]
    assert state.threads == []


class SameEventTwice(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "approvals",
                S(Select("ask ann", On("approve")), Step("ann ok", self.run("ann"))),
                S(Select("ask bob", On("approve")), Step("bob ok", self.run("bob"))),
            ),
            Step("done", self.run("done")),
        )


def test_branches_waiting_on_the_same_event_are_told_apart_by_thread_id() -> None:
    wf = SameEventTwice()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    ann, bob = "approvals.ask ann>>ann ok", "approvals.ask bob>>bob ok"
    assert [(t, e) for t, e, _ in gorch.awaited_events(state)] == [
        (ann, "approve"),
        (bob, "approve"),
    ]
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.AmbiguousEvent):
        gorch.handle_event(wf, state, "approve")
    assert gorch.dumps(wf, state) == before

    gorch.handle_event(wf, state, "approve", thread_id=bob)
    assert gorch.resume(wf, state) is WS.WAITING
    assert wf.log == ["bob"]  # the join still waits for ann
    gorch.handle_event(wf, state, "approve", thread_id=ann)
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["bob", "ann", "done"]


class TimedBranch(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "par",
                S(
                    Select("wait", On("go"), Timeout("late", timedelta(hours=1))),
                    Step("x", self.run("x")),
                ),
                Step("y", self.run("y")),
            ),
            Step("end", self.run("end")),
        )


def test_a_branch_waits_on_a_timer_like_any_thread() -> None:
    wf = TimedBranch()
    state = new(wf)
    with freeze_time(T0):
        assert gorch.resume(wf, state) is WS.WAITING
    assert gorch.next_wakeup(state) == T0 + timedelta(hours=1)
    assert gorch.due_events(state, T0 + timedelta(minutes=59)) == []
    (req,) = gorch.due_events(state, T0 + timedelta(hours=1))
    assert (req.name, req.thread_id) == ("late", "par.wait>>x")
    gorch.handle_event(
        wf, state, req.name, thread_id=req.thread_id, pc=req.pc, now=T0 + timedelta(hours=1)
    )
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["y", "x", "end"]


class LoopedParallel(Logged):
    i: int = 0

    def inc(self) -> None:
        self.i += 1

    def tagged(self, what: str) -> Any:
        return lambda: self.log.append(f"{what}{self.i}")

    def definition(self) -> gorch.Section:
        return S(
            For(
                "loop",
                self.i < 3,
                Parallel(
                    "par",
                    S(Select("wait a", On("ev")), Step("a", self.tagged("a"))),
                    S(Select("wait b", On("ev")), Step("b", self.tagged("b"))),
                ),
                Step("inc", self.inc),
            ),
            Step("end", self.run("end")),
        )


def test_parallel_inside_for_reuses_thread_ids_each_iteration() -> None:
    wf = LoopedParallel()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    ids = ["par.wait a>>a", "par.wait b>>b"]
    pcs: list[int] = []
    for i in range(3):
        awaited = gorch.awaited_events(state)
        assert [t for t, _, _ in awaited] == ids  # the same ids every iteration
        pcs += [pc for _, _, pc in awaited]
        # an event aimed at the previous iteration's wait is stale
        if i:
            before = gorch.dumps(wf, state)
            with pytest.raises(gorch.StaleEvent):
                gorch.handle_event(wf, state, "ev", thread_id=ids[0], pc=pcs[0])
            assert gorch.dumps(wf, state) == before
        deliver_all(wf, state)
        wf, state = roundtrip(wf, state)
        gorch.resume(wf, state)
    assert state.status is WS.FINISHED
    assert wf.log == ["a0", "b0", "a1", "b1", "a2", "b2", "end"]
    assert len(set(pcs)) == 6 and pcs == sorted(pcs)


class NestedParallel(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "outer",
                Parallel(
                    "inner",
                    S(Select("wait i", On("go")), Step("i1", self.run("i1"))),
                    Step("i2", self.run("i2")),
                ),
                Step("o", self.run("o")),
            ),
            Step("end", self.run("end")),
        )


def test_nested_parallel_joins_inner_then_outer() -> None:
    wf = NestedParallel()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    waiting_branch = "outer.inner/inner.wait i>>i1"
    assert threads(state) == {
        MAIN: (TS.WAITING_CONDITION, "outer", ""),
        "outer.inner": (TS.WAITING_CONDITION, "inner", MAIN),
        waiting_branch: (TS.WAITING_EVENT, "wait i", "outer.inner"),
    }
    # the inner branches are created when "outer.inner" runs, after "outer.o"
    assert wf.log == ["o", "i2"]
    wf, state = roundtrip(wf, state)
    gorch.handle_event(wf, state, "go")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["o", "i2", "i1", "end"]


class ParallelInGo(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Go(
                "worker",
                Parallel(
                    "par",
                    S(Select("wait", On("go")), Step("a", self.run("a"))),
                    Step("b", self.run("b")),
                ),
                Step("worker done", self.run("worker done")),
            ),
            Select("main wait", On("stop")),
        )


def test_parallel_inside_a_go_thread_prefixes_child_ids() -> None:
    wf = ParallelInGo()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    assert threads(state) == {
        MAIN: (TS.WAITING_EVENT, "main wait", ""),
        "worker": (TS.WAITING_CONDITION, "par", ""),
        "worker/par.wait>>a": (TS.WAITING_EVENT, "wait", "worker"),
    }
    gorch.handle_event(wf, state, "go", thread_id="worker/par.wait>>a")
    assert gorch.resume(wf, state) is WS.WAITING
    assert wf.log == ["b", "a", "worker done"]
    assert [t.id for t in state.threads] == [MAIN]


class FailingBranch(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Step("start", self.run("start")),
            Parallel(
                "par",
                Step("ok", self.run("ok")),
                S(Step("flaky", self.run("flaky")), Step("after flaky", self.run("after"))),
                Step("ok2", self.run("ok2")),
            ),
            Step("end", self.run("end")),
        )


def test_a_failing_branch_lets_its_siblings_finish_and_a_retry_runs_only_it() -> None:
    """A Parallel is a DAG without edges: the join reports the failed branches."""
    wf = FailingBranch(fail=["flaky"])
    state = new(wf)
    with pytest.raises(gorch.ParallelFailed) as info:
        gorch.resume(wf, state)
    assert info.value.step == "par" and info.value.attempts == 1
    assert info.value.failed == {"flaky>>after flaky": "RuntimeError: flaky broke"}
    assert "failed branches: flaky>>after flaky: RuntimeError: flaky broke" in str(info.value)
    assert state.thread("par.flaky>>after flaky") is None  # the branch ended, failed
    main = state.thread(MAIN)
    assert main is not None and (main.cur_step, main.error) == ("par", info.value.error)
    assert wf.log == ["start", "ok", "flaky", "ok2"]  # its siblings went on

    wf, state = roundtrip(wf, state)
    with pytest.raises(gorch.ParallelFailed):
        gorch.resume(wf, state)
    assert wf.log == ["start", "ok", "flaky", "ok2", "flaky"]  # only the failed branch re-ran

    wf.fail = []
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["start", "ok", "flaky", "ok2", "flaky", "flaky", "after", "end"]


def test_crash_at_any_checkpoint_of_a_parallel_gives_the_same_result() -> None:
    def drive(wf: Any, state: gorch.State, blobs: list[bytes] | None) -> tuple[Any, gorch.State]:
        def save(kind: CK) -> None:
            if blobs is not None:
                blobs.append(gorch.dumps(wf, state))

        while gorch.resume(wf, state, save) is not WS.FINISHED:
            deliver_all(wf, state)
        return wf, state

    blobs: list[bytes] = []
    wf, state = drive(NestedParallel(), new(NestedParallel()), blobs)
    final = gorch.dumps(wf, state)
    assert len(blobs) >= 5
    for blob in blobs:
        wf2, state2 = gorch.loads(blob, NestedParallel)
        if state2.status is WS.FINISHED:
            continue
        wf2, state2 = drive(wf2, state2, None)
        assert wf2.log == ["o", "i2", "i1", "end"]
        assert gorch.dumps(wf2, state2) == final


class Labels(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "p",
                Step("named", noop),
                S(Step("s1", noop), Step("s2", noop)),
                If(True, Step("in if", noop)),
                Select("sel", On("go")),
            ),
        )


def test_branch_threads_are_named_after_the_branch_labels() -> None:
    wf = Labels()
    par = wf.definition().stmts[0]
    assert isinstance(par, Parallel)
    assert [g.name for g in par.branches] == ["p.named", "p.s1>>s2", "p.in if", "p.sel"]
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    assert [t.id for t in state.threads] == [MAIN, "p.sel"]
    gorch.handle_event(wf, state, "go")
    assert gorch.resume(wf, state) is WS.FINISHED


class EmptyParallel(Logged):
    def definition(self) -> gorch.Section:
        return S(Parallel("nothing"), Step("after", self.run("after")))


def test_empty_parallel_just_continues() -> None:
    wf = EmptyParallel()
    assert gorch.resume(wf, new(wf)) is WS.FINISHED
    assert wf.log == ["after"]


class ParallelClash(Logged):
    def definition(self) -> gorch.Section:
        return S(Step("par", noop), Parallel("par", Step("a", noop)))


def test_parallel_name_is_a_cursor_and_must_be_unique() -> None:
    wf = ParallelClash()
    state = new(wf)
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError, match="'par'"):
        gorch.resume(wf, state)
    assert gorch.dumps(wf, state) == before


# --------------------------------------------------------------------------- >> and |


def steps(*names: str) -> list[Step]:
    return [Step(n, noop) for n in names]


def test_rshift_is_a_section_and_chains_flatten() -> None:
    a, b, c, d = steps("a", "b", "c", "d")
    ab = a >> b
    assert type(ab) is Section and ab.stmts == (a, b)
    abc = a >> b >> c
    assert type(abc) is Section and abc.stmts == (a, b, c)
    assert (a >> (b >> c)).stmts == (a, b, c)
    assert (S(a, b) >> S(c, d)).stmts == (a, b, c, d)
    assert ab.stmts == (a, b)  # operands are not modified


def test_or_is_one_parallel_and_chains_flatten() -> None:
    a, b, c, d = steps("a", "b", "c", "d")
    ab = a | b
    assert type(ab) is Parallel
    assert ab.name == "a|b"
    assert [g.name for g in ab.branches] == ["a|b.a", "a|b.b"]
    assert [g.body for g in ab.branches] == [(a,), (b,)]

    abc = a | b | c
    assert abc.name == "a|b|c"
    assert [g.body for g in abc.branches] == [(a,), (b,), (c,)]
    abcd = (a | b) | (c | d)
    assert abcd.name == "a|b|c|d"
    assert [g.body for g in abcd.branches] == [(a,), (b,), (c,), (d,)]
    assert [g.body for g in (a | (b | c)).branches] == [(a,), (b,), (c,)]
    assert [g.name for g in ab.branches] == ["a|b.a", "a|b.b"]  # unchanged by later |


def test_a_named_parallel_is_a_branch_not_flattened() -> None:
    a, b, c = steps("a", "b", "c")
    named = Parallel("p", a, b)
    out = named | c
    assert out.name == "p|c"
    assert [g.body for g in out.branches] == [(named,), (c,)]


def test_sequence_binds_tighter_than_parallel() -> None:
    a, b, c = steps("a", "b", "c")
    out = a >> b | c
    assert type(out) is Parallel
    assert out.name == "a>>b|c"
    assert [g.name for g in out.branches] == ["a>>b|c.a>>b", "a>>b|c.c"]
    assert [g.body for g in out.branches] == [(a, b), (c,)]
    # a section branch keeps its statements when the chain goes on
    more = out | Step("d", noop)
    assert [g.body for g in more.branches][:2] == [(a, b), (c,)]


def test_derived_parallel_name_is_stable_across_builds() -> None:
    class Ops(Logged):
        def definition(self) -> gorch.Section:
            return S(Step("x", noop) | Step("y", noop) | Step("z", noop))

    names = {Ops().definition().stmts[0].name for _ in range(3)}  # type: ignore[attr-defined]
    assert names == {"x|y|z"}


class Etl(Logged):
    def definition(self) -> gorch.Section:
        return (
            Step("extract", self.run("extract"))
            >> (Step("a", self.run("a")) | Step("b", self.run("b")))
            >> Step("load", self.run("load"))
        )


def test_operator_chain_is_a_complete_definition() -> None:
    wf = Etl()
    state = new(wf)
    seen: list[list[str]] = []
    assert gorch.resume(wf, state, lambda k: seen.append(sorted(t.id for t in state.threads)))
    assert state.status is WS.FINISHED
    assert wf.log == ["extract", "a", "b", "load"]
    assert [MAIN, "a|b.a", "a|b.b"] in seen  # the branches ran as threads


class EtlWaiting(Logged):
    def definition(self) -> gorch.Section:
        return (
            Step("extract", self.run("extract"))
            >> (Step("a", self.run("a")) | (Select("wait", On("go")) >> Step("b", self.run("b"))))
            >> Step("load", self.run("load"))
        )


def test_operator_parallel_survives_a_save_between_builds() -> None:
    wf = EtlWaiting()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    assert threads(state) == {
        MAIN: (TS.WAITING_CONDITION, "a|wait>>b", ""),
        "a|wait>>b.wait>>b": (TS.WAITING_EVENT, "wait", MAIN),
    }
    wf, state = roundtrip(wf, state)  # a new build finds the cursor by its derived name
    gorch.handle_event(wf, state, "go")
    assert gorch.resume(wf, state) is WS.FINISHED
    assert wf.log == ["extract", "a", "b", "load"]


@pytest.mark.parametrize(
    ("make", "op", "left", "right"),
    [
        (lambda s: s >> 3, ">>", "Step('s')", "3"),
        (lambda s: 3 >> s, ">>", "3", "Step('s')"),
        (lambda s: s | "x", "|", "Step('s')", "'x'"),
        (lambda s: "x" | s, "|", "'x'", "Step('s')"),
        (lambda s: s | print, "|", "Step('s')", "print"),
        (lambda s: s >> None, ">>", "Step('s')", "None"),
        (lambda s: [s] >> s, ">>", "[Step('s')]", "Step('s')"),
    ],
)
def test_non_statement_operand_is_a_type_error_naming_both(
    make: Any, op: str, left: str, right: str
) -> None:
    with pytest.raises(TypeError) as info:
        make(Step("s", noop))
    msg = str(info.value)
    assert left in msg and right in msg and op in msg
    assert msg.index(left) < msg.index(right)  # in the order they were written


class TwoWorkers(Logged):
    n: int = 0

    def spawn(self) -> None:
        self.n += 1

    def tagged(self, what: str) -> Any:
        return lambda: self.log.append(what)

    def definition(self) -> gorch.Section:
        return S(
            For(
                "spawn",
                self.n < 2,
                Step("count", self.spawn),
                Go(
                    "worker",
                    Parallel(
                        "par",
                        S(Select("wait", On("go")), Step("a", self.tagged("a"))),
                        Step("b", self.tagged("b")),
                    ),
                    id=lambda: f"w{self.n}",
                ),
            ),
            Select("main wait", On("stop")),
        )


def test_one_parallel_run_by_two_go_threads_keeps_their_branches_apart() -> None:
    wf = TwoWorkers()
    state = new(wf)
    assert gorch.resume(wf, state) is WS.WAITING
    assert threads(state) == {
        MAIN: (TS.WAITING_EVENT, "main wait", ""),
        "w1": (TS.WAITING_CONDITION, "par", ""),
        "w2": (TS.WAITING_CONDITION, "par", ""),
        "w1/par.wait>>a": (TS.WAITING_EVENT, "wait", "w1"),
        "w2/par.wait>>a": (TS.WAITING_EVENT, "wait", "w2"),
    }
    assert wf.log == ["b", "b"]
    gorch.handle_event(wf, state, "go", thread_id="w2/par.wait>>a")
    assert gorch.resume(wf, state) is WS.WAITING
    assert sorted(t.id for t in state.threads) == [MAIN, "w1", "w1/par.wait>>a"]
    gorch.handle_event(wf, state, "go", thread_id="w1/par.wait>>a")
    assert gorch.resume(wf, state) is WS.WAITING
    assert [t.id for t in state.threads] == [MAIN]
    assert wf.log == ["b", "b", "a", "a"]


class UnnamedBranches(Logged):
    def definition(self) -> gorch.Section:
        return S(
            If(True, Step("a", self.run("a"))) | If(True, Step("b", self.run("b"))),
            If(True, Step("c", self.run("c"))) | If(True, Step("d", self.run("d"))),
        )


def test_two_operator_parallels_of_unnamed_branches_do_not_clash() -> None:
    wf = UnnamedBranches()
    assert gorch.resume(wf, new(wf)) is WS.FINISHED
    assert wf.log == ["a", "b", "c", "d"]


def test_operator_parallel_of_unnamed_branches_alone_runs() -> None:
    class One(Logged):
        def definition(self) -> gorch.Section:
            return S(If(True, Step("a", self.run("a"))) | If(True, Step("b", self.run("b"))))

    wf = One()
    assert gorch.resume(wf, new(wf)) is WS.FINISHED
    assert wf.log == ["a", "b"]
