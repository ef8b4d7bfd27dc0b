"""A snapshot the Engine returns works its threads and awaited events out when first
read: every way of reading it (attributes, dumps, JSON, equality, copies, pickling,
repr, a FastAPI-style TypeAdapter) sees the same values as a snapshot made at once."""

from __future__ import annotations

import copy
import pickle
from datetime import timedelta
from typing import Any

import pydantic
import pytest

import gorch
from gorch import On, S, Select, Step, Timeout
from gorch.engine import Engine
from gorch.snapshot import EventInfo, Snapshot, ThreadInfo, snapshot_of


class Decision(pydantic.BaseModel):
    approved: bool


class Approval(gorch.Workflow):
    amount: float
    status: str = "pending"

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "await decision",
                On("decide", self.decide),
                Timeout("expired", timedelta(days=3), Step("escalate", self.escalate)),
            ),
            Step("close", self.close),
        )

    def decide(self, d: Decision) -> None:
        self.status = "approved" if d.approved else "rejected"

    def escalate(self) -> None:
        self.status = "escalated"

    def close(self) -> None:
        pass


def started() -> tuple[Engine, Snapshot]:
    engine = Engine("memory://", {"approval": Approval})
    return engine, engine.start("approval", "a-1", {"amount": 12.5})


def eager(snap: Snapshot) -> dict[str, Any]:
    """What the snapshot holds, read field by field (which completes it)."""
    return {name: getattr(snap, name) for name in Snapshot.model_fields}


def test_a_started_snapshot_reads_like_one_made_at_once() -> None:
    engine, snap = started()
    assert snap.status == "waiting" and snap.version == 1
    assert snap.data == {"amount": 12.5, "status": "pending"}
    assert [t.cur_step for t in snap.threads] == ["await decision"]
    assert [e.name for e in snap.awaited] == ["decide", "expired"]
    assert snap.awaited[0].input_schema is not None and snap.awaited[1].input_schema is None
    assert snap.error == ""
    assert snap == engine.get("a-1")
    assert isinstance(snap.threads[0], ThreadInfo) and isinstance(snap.awaited[0], EventInfo)


@pytest.mark.parametrize(
    "read",
    [
        lambda s: s.model_dump(mode="json"),
        lambda s: pydantic.TypeAdapter(Snapshot).dump_python(s, mode="json"),
        lambda s: pydantic.TypeAdapter(list[Snapshot]).dump_python([s], mode="json")[0],
    ],
    ids=["model_dump", "type_adapter", "nested"],
)
def test_every_serialization_path_sees_the_lazy_fields(read: Any) -> None:
    engine, snap = started()
    dumped = read(snap)
    assert list(dumped) == list(Snapshot.model_fields)  # in declared order
    assert [t["cur_step"] for t in dumped["threads"]] == ["await decision"]
    assert [e["name"] for e in dumped["awaited"]] == ["decide", "expired"]
    assert dumped == engine.get("a-1").model_dump(mode="json")


def test_json_equality_copies_pickle_and_repr_see_the_lazy_fields() -> None:
    engine, _ = started()
    fresh = engine.get("a-1").model_dump_json()
    for make in (
        lambda s: s,
        copy.copy,
        copy.deepcopy,
        lambda s: s.model_copy(),
        lambda s: pickle.loads(pickle.dumps(s)),
    ):
        snap = engine.get("a-1")  # each starts lazy
        assert make(snap).model_dump_json() == fresh
    snap = engine.get("a-1")
    assert "await decision" in repr(snap)
    assert dict(engine.get("a-1"))["threads"][0].cur_step == "await decision"
    assert engine.get("a-1") == engine.get("a-1")
    assert engine.get("a-1") != Snapshot.model_validate({**eager(snap), "error": "boom"})


def test_a_field_set_before_the_lazy_ones_are_read_is_kept() -> None:
    _, snap = started()
    snap.error = "set by the caller"
    assert snap.error == "set by the caller"
    assert snap.model_dump()["error"] == "set by the caller"
    assert [t.cur_step for t in snap.threads] == ["await decision"]


def test_the_lazy_fields_are_as_the_instance_was_when_made() -> None:
    """The snapshot of a start is unchanged by what happens to the instance later."""
    engine, snap = started()
    engine.send("a-1", "decide", {"approved": True})
    assert engine.get("a-1").status == "finished"
    assert snap.status == "waiting"
    assert [e.name for e in snap.awaited] == ["decide", "expired"]
    assert snap.data["status"] == "pending"


def test_data_is_copied_when_the_caller_passes_the_workflow_object() -> None:
    engine = Engine("memory://", {"approval": Approval})
    wf = Approval(amount=3.0)
    snap = engine.start("approval", "a-2", wf)
    wf.status = "changed by the caller afterwards"
    assert snap.data["status"] == "pending"


def test_the_json_schema_is_that_of_the_declared_fields() -> None:
    schema = Snapshot.model_json_schema(mode="serialization")
    assert set(schema["properties"]) == set(Snapshot.model_fields)
    assert set(schema["required"]) >= {"id", "workflow", "status", "threads", "awaited", "data"}


def test_snapshot_of_a_finished_instance_has_no_awaited_events() -> None:
    engine, _ = started()
    engine.send("a-1", "decide", {"approved": False})
    rec = engine.store.load("a-1")
    wf, state = gorch.loads(rec.blob, Approval)
    snap = snapshot_of(rec, wf, state)
    assert snap.status == "finished" and snap.awaited == [] and snap.next_wakeup is None
    assert snap.data["status"] == "rejected"


def test_snapshot_parts_are_the_models_pydantic_would_construct() -> None:
    """The parts are made without model_construct's walk, holding what it would hold."""
    _, snap = started()
    for part in [snap, *snap.threads, *snap.awaited]:
        fields = {name: getattr(part, name) for name in type(part).model_fields}
        made = type(part).model_construct(**fields)
        computed = set(type(part).model_computed_fields)  # EventInfo's lazy input_schema
        assert part.model_dump(exclude=computed) == made.model_dump(exclude=computed)
        assert part.__dict__ == made.__dict__
        assert part.model_fields_set == made.model_fields_set
        assert part.__pydantic_extra__ is made.__pydantic_extra__ is None
