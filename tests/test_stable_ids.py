"""Thread ids of Parallel branches survive renames inside the branch (SPEC §6).

A stored instance is saved with one version of a class and resumed with the
next, in which statements inside a branch were renamed: it must finish.
"""

from __future__ import annotations

import pytest
from flow_support import Logged, new

import gorch
from gorch import On, Parallel, S, Select, Step
from gorch import ThreadStatus as TS
from gorch import WorkflowStatus as WS


def ids(state: gorch.State) -> list[str]:
    return [t.id for t in state.threads]


def redeploy(
    wf: gorch.Workflow, state: gorch.State, cls: type[Logged]
) -> tuple[Logged, gorch.State]:
    """Save with the old class, load with the new one (a deploy between two calls)."""
    return gorch.loads(gorch.dumps(wf, state), cls)


# --------------------------------------------------------------------------- unnamed sections


class Died(Exception):
    """The process dies right after a save."""


def after_first_step(wf: gorch.Workflow, state: gorch.State) -> tuple[gorch.Workflow, gorch.State]:
    """The instance as saved right after its first step (the process then died)."""
    saved: list[bytes] = []

    def checkpoint(kind: gorch.CheckpointKind) -> None:
        saved.append(gorch.dumps(wf, state))
        raise Died

    with pytest.raises(Died):
        gorch.resume(wf, state, checkpoint)
    return gorch.loads(saved[0], type(wf))


class V1(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "par",
                Step("a", self.run("a")),
                S(Step("b1", self.run("b1")), Select("wait", On("go")), Step("b2", self.run("b2"))),
            ),
            Step("end", self.run("end")),
        )


class V2(Logged):
    """V1 with both steps around the branch's Select renamed."""

    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "par",
                Step("a", self.run("a")),
                S(
                    Step("b1 renamed", self.run("b1")),
                    Select("wait", On("go")),
                    Step("b2 renamed", self.run("b2")),
                ),
            ),
            Step("end", self.run("end")),
        )


def test_a_stored_branch_thread_finishes_after_a_rename_inside_its_branch() -> None:
    wf, state = V1(), new(V1())
    assert gorch.resume(wf, state) is WS.WAITING
    (branch,) = [t for t in state.threads if t.parent]
    assert branch.id == "par.b1>>wait>>b2"  # an unnamed section keeps its (old) label

    wf2, state2 = redeploy(wf, state, V2)
    gorch.handle_event(wf2, state2, "go")
    assert gorch.resume(wf2, state2) is WS.FINISHED
    assert wf2.log == ["a", "b1", "b2", "end"]


def test_a_branch_not_started_yet_finds_its_branch_after_a_rename() -> None:
    """Saved after branch ``a``'s step: the section's thread is stored before it ever ran."""
    wf, state = after_first_step(V1(), new(V1()))
    waiting = {t.id: t.cur_step for t in state.threads}
    assert waiting == {gorch.MAIN_THREAD: "par", "par.a": "a", "par.b1>>wait>>b2": ""}

    wf2, state2 = redeploy(wf, state, V2)
    assert gorch.resume(wf2, state2) is WS.WAITING
    assert [(tid, e) for tid, e, _ in gorch.awaited_events(state2)] == [("par.b1>>wait>>b2", "go")]
    gorch.handle_event(wf2, state2, "go")
    assert gorch.resume(wf2, state2) is WS.FINISHED
    assert wf2.log == ["a", "b1", "b2", "end"]


def test_a_rename_that_moves_the_cursor_out_of_the_branch_is_still_refused() -> None:
    class Moved(Logged):
        def definition(self) -> gorch.Section:
            return S(
                Select("wait", On("go")),
                Parallel("par", Step("a", self.run("a")), Step("b", self.run("b"))),
            )

    wf, state = V1(), new(V1())
    gorch.resume(wf, state)
    wf2, state2 = redeploy(wf, state, Moved)
    before = gorch.dumps(wf2, state2)
    with pytest.raises(gorch.CursorNotFound):
        gorch.resume(wf2, state2)
    assert gorch.dumps(wf2, state2) == before


# --------------------------------------------------------------------------- named sections


class Named1(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "par",
                Step("a", self.run("a")),
                S(Select("wait", On("go")), Step("b", self.run("b")), name="review"),
            ),
            Step("end", self.run("end")),
        )


class Named2(Logged):
    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "par",
                Step("a", self.run("a")),
                S(
                    Step("new first step", self.run("new")),
                    Select("wait for it", On("go")),
                    Step("b renamed", self.run("b")),
                    name="review",
                ),
            ),
            Step("end", self.run("end")),
        )


def test_a_named_section_branch_is_labelled_by_its_name() -> None:
    wf, state = Named1(), new(Named1())
    assert gorch.resume(wf, state) is WS.WAITING
    assert ids(state) == [gorch.MAIN_THREAD, "par.review"]
    fresh, fresh_state = Named2(), new(Named2())
    gorch.resume(fresh, fresh_state)
    assert ids(fresh_state) == [gorch.MAIN_THREAD, "par.review"]  # same id, new statements


def test_an_unstarted_named_branch_runs_its_new_body() -> None:
    wf, state = after_first_step(Named1(), new(Named1()))
    assert state.thread("par.review") is not None  # not started yet
    wf2, state2 = redeploy(wf, state, Named2)
    assert gorch.resume(wf2, state2) is WS.WAITING
    review = state2.thread("par.review")
    assert review is not None and (review.status, review.cur_step) == (
        TS.WAITING_EVENT,
        "wait for it",
    )
    gorch.handle_event(wf2, state2, "go")
    assert gorch.resume(wf2, state2) is WS.FINISHED
    assert wf2.log == ["a", "new", "b", "end"]


def test_a_named_section_is_not_flattened_by_rshift() -> None:
    a, b, c = (Step(n, lambda: None) for n in "abc")
    named = S(a, b, name="ab")
    seq = named >> c
    assert seq.stmts == (named, c)
    par = named | c
    assert par.name == "ab|c"
    assert [g.name for g in par.branches] == ["ab|c.ab", "ab|c.c"]


def test_operator_parallel_of_named_sections_survives_renames() -> None:
    class Op1(Logged):
        def definition(self) -> gorch.Section:
            return S(
                S(Select("w", On("go")), Step("x", self.run("x")), name="left")
                | S(Step("y", self.run("y")), name="right"),
                Step("end", self.run("end")),
            )

    class Op2(Logged):
        def definition(self) -> gorch.Section:
            return S(
                S(Select("w", On("go")), Step("x2", self.run("x")), name="left")
                | S(Step("y2", self.run("y")), name="right"),
                Step("end", self.run("end")),
            )

    wf, state = Op1(), new(Op1())
    assert gorch.resume(wf, state) is WS.WAITING
    assert ids(state) == [gorch.MAIN_THREAD, "left|right.left"]
    wf2, state2 = redeploy(wf, state, Op2)
    gorch.handle_event(wf2, state2, "go")
    assert gorch.resume(wf2, state2) is WS.FINISHED
    assert wf2.log == ["y", "x", "end"]


def test_single_statement_branches_keep_their_ids() -> None:
    p = Parallel("par", Step("a", lambda: None), S(Step("b", lambda: None)))
    assert [g.name for g in p.branches] == ["par.a", "par.b"]
    assert [g.name for g in (Step("a", lambda: None) | Step("b", lambda: None)).branches] == [
        "a|b.a",
        "a|b.b",
    ]


def test_a_section_name_must_be_a_non_empty_str() -> None:
    class Bad(Logged):
        def definition(self) -> gorch.Section:
            return S(
                Parallel("par", S(Step("a", self.run("a")), name=""), Step("b", self.run("b")))
            )

    with pytest.raises(gorch.DefinitionError, match="section"):
        gorch.resume(Bad(), new(Bad()))
