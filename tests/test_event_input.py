"""Event input that could never be stored (issue 10 item 6 and 7, at the core).

Lone surrogates and input nested deeper than gorch accepts are refused with
``InvalidEventInput`` before any handler runs, for typed, untyped, ``Handler``
and no-input handlers alike, and the state and data stay byte-identical.
"""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
from pydantic import Field

import gorch
from gorch import On, S, Select, Step
from gorch.handlers import MAX_INPUT_DEPTH


class Payload(pydantic.BaseModel):
    note: str = ""
    extra: Any = None


class Untyped(gorch.Handler):
    """A Handler subclass without ``input_type``: input reaches ``handle`` as it is."""

    def __init__(self, wf: Inbox) -> None:
        self.wf = wf

    def handle(self, req: gorch.EventRequest, input: Any) -> Any:
        return self.wf.on_any(input)


class Inbox(gorch.Workflow):
    got: list[Any] = Field(default_factory=list)
    calls: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "wait",
                On("typed", self.on_typed),
                On("any", self.on_any),
                On("bare", self.on_bare),
                On("object", Untyped(self)),
                On("nothing", self.on_nothing),
            ),
            Step("after", lambda: None),
        )

    def on_typed(self, p: Payload) -> str:
        self.calls += 1
        self.got.append(p.model_dump())
        return p.note

    def on_any(self, value: Any) -> Any:
        self.calls += 1
        self.got.append(value)
        return value

    def on_bare(self, value):  # type: ignore[no-untyped-def]  # an unannotated handler
        self.calls += 1
        self.got.append(value)
        return value

    def on_nothing(self) -> None:
        self.calls += 1


def waiting() -> tuple[Inbox, gorch.State]:
    wf = Inbox()
    state = gorch.new_state("inbox-1", "inbox")
    assert gorch.resume(wf, state) is gorch.WorkflowStatus.WAITING
    return wf, state


def nested_lists(depth: int, leaf: Any = "x") -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def nested_maps(depth: int, leaf: Any = "x") -> Any:
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


DATA_EVENTS = ["typed", "any", "bare", "object"]


def as_payload(event: str, value: Any) -> Any:
    """``value`` where the event's handler takes it (inside the model for the typed one)."""
    return {"note": "n", "extra": value} if event == "typed" else value


SURROGATES = [
    "\ud800",
    "ok \udfff ok",
    ["fine", "\udc00"],
    {"\ud800": 1},
    {"k": {"k": ("t", "\ud83d")}},
]


@pytest.mark.parametrize("event", DATA_EVENTS)
@pytest.mark.parametrize("value", SURROGATES, ids=range(len(SURROGATES)))
def test_lone_surrogates_are_invalid_input_and_change_nothing(event: str, value: Any) -> None:
    wf, state = waiting()
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.InvalidEventInput, match="surrogate"):
        gorch.handle_event(wf, state, event, as_payload(event, value))
    assert wf.calls == 0
    assert gorch.dumps(wf, state) == before


@pytest.mark.parametrize("event", DATA_EVENTS)
@pytest.mark.parametrize("depth", [MAX_INPUT_DEPTH + 1, 300, 1000, 100_000])
@pytest.mark.parametrize("make", [nested_lists, nested_maps])
def test_input_nested_too_deep_is_invalid_input_and_changes_nothing(
    event: str, depth: int, make: Any
) -> None:
    wf, state = waiting()
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.InvalidEventInput, match="nested") as info:
        gorch.handle_event(wf, state, event, as_payload(event, make(depth)))
    assert str(MAX_INPUT_DEPTH) in str(info.value)
    assert len(str(info.value)) < 500
    assert wf.calls == 0
    assert gorch.dumps(wf, state) == before


@pytest.mark.parametrize("event", ["typed", "any", "object"])
def test_deep_json_input_is_invalid_input(event: str) -> None:
    wf, state = waiting()
    before = gorch.dumps(wf, state)
    text = json.dumps(as_payload(event, nested_lists(MAX_INPUT_DEPTH + 5)))
    for raw in (text, text.encode()):
        with pytest.raises(gorch.InvalidEventInput):
            gorch.handle_event(wf, state, event, raw if event == "typed" else json.loads(raw))
    assert gorch.dumps(wf, state) == before


@pytest.mark.parametrize("value", [nested_lists(5000), nested_maps(5000), {"a": "\ud800"}, 1])
def test_any_input_to_a_no_input_handler_is_invalid_input_not_handler_failed(value: Any) -> None:
    wf, state = waiting()
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.InvalidEventInput, match="no input") as info:
        gorch.handle_event(wf, state, "nothing", value)
    assert len(str(info.value)) < 500
    assert gorch.dumps(wf, state) == before


@pytest.mark.parametrize("event", DATA_EVENTS)
def test_input_within_the_limits_is_delivered_and_stored(event: str) -> None:
    wf, state = waiting()
    value = {"text": "naïve 😀 \u2028", "deep": nested_maps(MAX_INPUT_DEPTH - 3)}
    gorch.handle_event(wf, state, event, as_payload(event, value))
    assert wf.calls == 1
    assert gorch.resume(wf, state) is gorch.WorkflowStatus.FINISHED
    back, _ = gorch.loads(gorch.dumps(wf, state), Inbox)
    stored = back.got[0]["extra"] if event == "typed" else back.got[0]
    assert stored["text"] == "naïve 😀 \u2028"


def test_refused_input_leaves_the_event_deliverable() -> None:
    wf, state = waiting()
    with pytest.raises(gorch.InvalidEventInput):
        gorch.handle_event(wf, state, "any", {"a": "\ud800"})
    assert gorch.handle_event(wf, state, "any", {"a": "fine"}) == {"a": "fine"}
    assert gorch.resume(wf, state) is gorch.WorkflowStatus.FINISHED
    assert gorch.loads(gorch.dumps(wf, state), Inbox)[0].got == [{"a": "fine"}]


def test_a_cycle_in_input_is_invalid_input() -> None:
    wf, state = waiting()
    loop: list[Any] = []
    loop.append(loop)
    loop.append(loop)
    with pytest.raises(gorch.InvalidEventInput, match="nested"):
        gorch.handle_event(wf, state, "any", loop)
