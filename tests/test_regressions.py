"""Behaviours found by review, each pinned by a test that failed before its fix."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgpack
import pydantic
import pytest
from freezegun import freeze_time
from pydantic import PlainSerializer, PlainValidator

import gorch
from gorch import For, Go, If, On, S, Select, Step, Timeout
from gorch.engine import Engine
from gorch.retry import Retry
from gorch.stores import MemoryStore


def logged(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


class A(pydantic.BaseModel):
    a: int


class B(pydantic.BaseModel):
    b: str


class Wrapped(gorch.Workflow):
    got: list[str] = []

    def definition(self) -> gorch.Section:
        return S(For("loop", True, Select("s", On("a", self.on_a), On("b", self.on_b))))

    @logged
    def on_a(self, d: A) -> None:
        self.got.append(f"a={d.a}")

    @logged
    def on_b(self, d: B) -> None:
        self.got.append(f"b={d.b}")


def test_handlers_wrapped_by_one_decorator_keep_their_own_input_types() -> None:
    wf, state = Wrapped(), gorch.new_state("w", "w")
    gorch.resume(wf, state)
    gorch.handle_event(wf, state, "a", {"a": 1})
    gorch.resume(wf, state)
    gorch.handle_event(wf, state, "b", {"b": "x"})
    assert wf.got == ["a=1", "b=x"]


class NotAStr(gorch.Handler):
    def setup(self, req: gorch.EventRequest) -> str:
        return 42  # type: ignore[return-value]


class BadSetup(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Select("s", On("e", NotAStr())))


def test_a_setup_returning_a_non_str_is_a_setup_error_and_the_blob_loads() -> None:
    wf, state = BadSetup(), gorch.new_state("s", "s")
    with pytest.raises(gorch.SetupError, match="str or None"):
        gorch.resume(wf, state)
    blob = gorch.dumps(wf, state)
    assert gorch.dumps(*gorch.loads(blob, BadSetup)) == blob
    assert gorch.next_wakeup(state) is None


class Picky(gorch.Workflow):
    items: list[int] = []

    def definition(self) -> gorch.Section:
        return S(If(lambda: self.items[0] > 0, Step("first", lambda: None)))


class BadId(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Go("g", Step("x", lambda: None), id=lambda: {}["missing"]))


@pytest.mark.parametrize("cls", [Picky, BadId])
def test_a_raising_condition_or_go_id_is_a_definition_error_and_changes_nothing(
    cls: type[gorch.Workflow],
) -> None:
    wf, state = cls(), gorch.new_state("c", "c")
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError, match="raised"):
        gorch.resume(wf, state)
    assert gorch.dumps(wf, state) == before


class Opaque:
    pass


class OpaqueInput(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(Select("s", On("e", self.on_e)))

    def on_e(self, x: Opaque) -> None:
        pass


def test_a_handler_annotation_pydantic_cannot_validate_is_a_definition_error() -> None:
    with pytest.raises(gorch.DefinitionError, match="cannot be validated"):
        gorch.resume(OpaqueInput(), gorch.new_state("o", "o"))


ran: list[str] = []


class PerItem(gorch.Workflow):
    items: list[str] = []

    def definition(self) -> gorch.Section:
        return S(
            *[Step(x, functools.partial(ran.append, x)) for x in self.items],
            Select("wait", On("go")),
        )


def test_a_duplicate_step_made_by_data_is_refused_before_it_runs() -> None:
    gorch.resume(PerItem(items=["a", "b"]), gorch.new_state("1", "p"))
    ran.clear()
    with pytest.raises(gorch.DefinitionError, match="'a'"):
        gorch.resume(PerItem(items=["a", "b", "a"]), gorch.new_state("2", "p"))
    assert ran == ["a", "b"]


CHARGE_CALLS: list[str] = []


class Charge(gorch.Workflow):
    tries: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Step("charge", self.charge, retry=Retry(attempts=5, backoff=3600)),
            Select("done", On("ok")),
        )

    def charge(self) -> None:
        CHARGE_CALLS.append("charge")
        self.tries += 1
        raise RuntimeError("card declined")


def test_an_unknown_event_to_a_retrying_instance_does_not_spend_its_retries() -> None:
    CHARGE_CALLS.clear()
    engine = Engine(MemoryStore(), {"charge": Charge})
    engine.start("charge", "c1")
    assert engine.get("c1").status == "retrying"
    with pytest.raises(gorch.EventNotFound):
        engine.send("c1", "typo")
    snap = engine.get("c1")
    assert snap.status == "retrying"
    assert CHARGE_CALLS == ["charge"]  # the step did not run again
    assert snap.data["tries"] == 0  # saved with the data the failed step started from
    assert snap.threads[0].attempts == 1


class Reminder(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(
            Select("first", Timeout("t1", 5, Step("noted", lambda: None))),
            Select("second", Timeout("t2", 5)),
        )


def test_a_timer_set_up_by_run_due_is_due_on_time_not_at_the_end_of_the_lease() -> None:
    engine = Engine(MemoryStore(), {"reminder": Reminder}, lease=600)
    with freeze_time("2026-01-01 00:00:00"):
        engine.start("reminder", "r1")
    now = datetime(2026, 1, 1, 0, 0, 6, tzinfo=UTC)
    with freeze_time(now):
        [result] = engine.run_due()
    assert result.fired == ["t1"]
    assert engine.get("r1").next_wakeup == now + timedelta(seconds=5)


class Thing:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Thing)

    __hash__ = object.__hash__


class NoSchema(gorch.Workflow):
    """A field pydantic serialises but cannot describe in JSON schema."""

    thing: Annotated[Thing, PlainValidator(lambda v: Thing()), PlainSerializer(lambda v: "t")] = (
        Thing()
    )
    tags: set[str] = set()

    def definition(self) -> gorch.Section:
        return S()


def test_a_workflow_without_a_json_schema_still_dumps_with_sets_sorted() -> None:
    wf = NoSchema(tags={f"tag-{i}" for i in range(20)})
    blob = gorch.dumps(wf, gorch.new_state("n", "n"))
    back, state = gorch.loads(blob, NoSchema)
    assert back.tags == wf.tags
    assert gorch.dumps(back, state) == blob
    names = [f"tag-{i}" for i in range(20)]
    reverse = set()
    for name in reversed(names):
        reverse.add(name)
    other = gorch.dumps(NoSchema(tags=reverse), gorch.new_state("n", "n"))
    assert other == blob  # sets are written in one canonical order
    assert sorted(msgpack.unpackb(blob)[3]["tags"]) == sorted(names)
