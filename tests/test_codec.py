"""Serialization (SPEC section 2): ``gorch.dumps`` / ``gorch.loads``.

Exact round-trips of pydantic-serialisable data, byte stability, data that would not load back,
and refusal of corrupt, foreign, extended or future blobs with ``SerializationError``.
"""

from __future__ import annotations

import enum
import os
import pickle
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

import msgpack
import pydantic
import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gorch
from gorch import If, On, Return, S, Select, Step, Timeout

# --------------------------------------------------------------------------- models


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mood(enum.StrEnum):
    CALM = "calm"
    ANGRY = "angry"


class Address(pydantic.BaseModel):
    street: str
    city: str
    geo: tuple[float, float] | None = None


class Person(pydantic.BaseModel):
    name: str
    born: date
    addresses: list[Address] = []
    tags: dict[str, list[int]] = {}
    manager: Person | None = None


class Rich(gorch.Workflow):
    when: datetime
    amount: Decimal
    ref: uuid.UUID
    color: Color
    level: Level
    mood: Mood
    owner: Person
    people: list[Person] = []
    by_city: dict[str, Address] = {}
    maybe: int | None = None
    maybe_model: Address | None = None
    ratio: float = 0.0
    flag: bool = False
    raw: bytes = b""
    wait: timedelta = timedelta(0)
    kind: Literal["a", "b"] = "a"
    anything: Any = None

    def definition(self) -> gorch.Section:
        return S(
            Step("prepare", lambda: None),
            Select("wait", On("go", Step("after", lambda: None))),
        )


def rich(**over: Any) -> Rich:
    ann = Person(
        name="Ann",
        born=date(1980, 2, 29),
        addresses=[Address(street="Main 1", city="Oslo", geo=(59.91, 10.75))],
        tags={"x": [1, 2, 3], "": []},
    )
    values: dict[str, Any] = dict(
        when=datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        amount=Decimal("12345678901234567890.000000001"),
        ref=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        color=Color.GREEN,
        level=Level.HIGH,
        mood=Mood.ANGRY,
        owner=Person(name="Bob", born=date(1970, 1, 1), manager=ann),
        people=[ann, Person(name="Cy", born=date(2000, 12, 31))],
        by_city={"oslo": Address(street="a", city="Oslo"), "rome": Address(street="b", city="R")},
        maybe=None,
        maybe_model=Address(street="s", city="c"),
        ratio=0.1,
        flag=True,
        raw=b"binary",
        wait=timedelta(days=2, microseconds=5),
        kind="b",
        anything={"nested": [1, "two", 3.5, None, True]},
    )
    values.update(over)
    return Rich(**values)


def roundtrip(wf: gorch.Workflow, state: gorch.State | None = None) -> tuple[Any, gorch.State]:
    state = state if state is not None else gorch.new_state("id-1", "rich")
    blob = gorch.dumps(wf, state)
    assert type(blob) is bytes
    out = gorch.loads(blob, type(wf))
    assert gorch.dumps(*out) == blob
    return out


# --------------------------------------------------------------------------- exact round-trips


def test_every_field_type_round_trips_exactly() -> None:
    wf = rich()
    back, state = roundtrip(wf)
    assert type(back) is Rich
    assert back == wf
    assert back.model_dump() == wf.model_dump()
    assert state == gorch.new_state("id-1", "rich")


def test_aware_datetime_keeps_instant_offset_and_microseconds() -> None:
    for tz in (UTC, timezone(timedelta(hours=-3, minutes=-30)), ZoneInfo("Europe/Oslo")):
        when = datetime(2031, 7, 1, 23, 59, 59, 999999, tzinfo=tz)
        back, _ = roundtrip(rich(when=when))
        assert back.when == when
        assert back.when.utcoffset() == when.utcoffset()
        assert back.when.microsecond == 999999
        assert back.when.tzinfo is not None


@pytest.mark.parametrize(
    "value",
    ["0", "0.1", "1.10", "-0.000", "1E+3", "3.141592653589793238462643383279", "-42"],
)
def test_decimal_round_trips_digit_for_digit(value: str) -> None:
    back, _ = roundtrip(rich(amount=Decimal(value)))
    assert type(back.amount) is Decimal
    assert back.amount == Decimal(value)
    assert str(back.amount) == str(Decimal(value))


def test_uuid_and_enums_come_back_as_their_types() -> None:
    ref = uuid.uuid4()
    back, _ = roundtrip(rich(ref=ref, color=Color.RED, level=Level.LOW, mood=Mood.CALM))
    assert type(back.ref) is uuid.UUID and back.ref == ref
    assert back.color is Color.RED
    assert back.level is Level.LOW
    assert back.mood is Mood.CALM


def test_nested_models_lists_dicts_and_optionals() -> None:
    wf = rich(maybe=7, maybe_model=None, people=[], by_city={})
    back, _ = roundtrip(wf)
    assert back.maybe == 7
    assert back.maybe_model is None
    assert back.people == [] and back.by_city == {}
    assert back.owner.manager is not None
    assert type(back.owner.manager) is Person
    assert back.owner.manager.addresses[0].geo == (59.91, 10.75)
    assert type(back.owner.manager.addresses[0]) is Address


aware_datetimes = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12, minutes=-15))]
    ),
)
addresses = st.builds(Address, street=st.text(), city=st.text(), geo=st.none())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    when=aware_datetimes,
    amount=st.decimals(allow_nan=False, allow_infinity=False),
    ref=st.uuids(),
    color=st.sampled_from(Color),
    level=st.sampled_from(Level),
    mood=st.sampled_from(Mood),
    by_city=st.dictionaries(st.text(), addresses, max_size=3),
    maybe=st.none() | st.integers(min_value=-(2**63), max_value=2**64 - 1),
    ratio=st.floats(allow_nan=False, allow_infinity=False),
    anything=st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=8,
    ),
)
def test_random_values_round_trip_exactly_and_byte_stably(**values: Any) -> None:
    wf = rich(**values)
    back, _ = roundtrip(wf)
    assert back == wf
    assert back.when.utcoffset() == wf.when.utcoffset()
    assert str(back.amount) == str(wf.amount)


class Binary(gorch.Workflow):
    """Binary data: pydantic's JSON mode writes bytes as base64 when the model says so."""

    model_config = pydantic.ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
    raw: bytes = b""

    def definition(self) -> gorch.Section:
        return S()


def test_bytes_field_that_is_not_utf8_says_how_to_store_it() -> None:
    state = gorch.new_state("b", "b")
    with pytest.raises(gorch.SerializationError, match="base64"):
        gorch.dumps(rich(raw=bytes(range(256))), state)


def test_bytes_field_with_any_content_round_trips_as_base64() -> None:
    wf = Binary(raw=bytes(range(256)))
    blob = gorch.dumps(wf, gorch.new_state("b", "b"))
    back, _ = gorch.loads(blob, Binary)
    assert back.raw == bytes(range(256))
    assert gorch.dumps(*gorch.loads(blob, Binary)) == blob


class Camel(gorch.Workflow):
    """Field aliases are common when a workflow's data mirrors a camelCase JSON API."""

    order_id: str = pydantic.Field(alias="orderId")
    total_cents: int = pydantic.Field(default=0, alias="totalCents")

    def definition(self) -> gorch.Section:
        return S(Select("wait", On("go")))


def test_aliased_fields_round_trip() -> None:
    wf = Camel(orderId="A-17", totalCents=1250)
    back, _ = roundtrip(wf)
    assert back == wf
    assert (back.order_id, back.total_cents) == ("A-17", 1250)


# --------------------------------------------------------------------------- byte stability


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -0.0, 5e-324])
def test_special_floats_round_trip_byte_stably(value: float) -> None:
    state = gorch.new_state("id-1", "rich")
    blob = gorch.dumps(rich(ratio=value), state)
    back, _ = gorch.loads(blob, Rich)
    assert repr(back.ratio) == repr(value)
    assert gorch.dumps(back, state) == blob


def test_dumps_is_deterministic_and_equal_data_gives_equal_bytes() -> None:
    state = gorch.new_state("id-1", "rich")
    assert gorch.dumps(rich(), state) == gorch.dumps(rich(), state)
    assert gorch.dumps(rich(), state) != gorch.dumps(rich(flag=False), state)


_SET_PROGRAM = """
import sys
import gorch

class Tagged(gorch.Workflow):
    tags: set[str] = set()

    def definition(self):
        return gorch.S()

if sys.argv[1] == "dump":
    wf = Tagged(tags={f"tag-{i}" for i in range(30)})
    sys.stdout.buffer.write(gorch.dumps(wf, gorch.new_state("t", "tagged")))
else:
    blob = sys.stdin.buffer.read()
    sys.stdout.buffer.write(gorch.dumps(*gorch.loads(blob, Tagged)))
"""


def _in_process(seed: str, mode: str, stdin: bytes = b"") -> bytes:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run(
        [sys.executable, "-c", _SET_PROGRAM, mode],
        input=stdin,
        capture_output=True,
        env=env,
        check=True,
        timeout=60,
    )
    return done.stdout


def test_byte_stability_holds_in_another_process() -> None:
    """A blob written by one worker is re-dumped identically by another.

    String hashing differs between processes, so a set field must not be written in hash order.
    """
    blob = _in_process("1", "dump")
    assert blob
    assert _in_process("1", "load", blob) == blob
    for seed in ("2", "3", "4"):
        assert _in_process(seed, "load", blob) == blob, f"PYTHONHASHSEED={seed}"


def test_round_trip_of_a_state_with_threads_waits_and_errors_is_exact() -> None:
    class Flaky(gorch.Handler):
        def setup(self, req: gorch.EventRequest) -> str:
            raise RuntimeError("mail server down")

    class Busy(gorch.Workflow):
        fail: bool = True

        def definition(self) -> gorch.Section:
            return S(
                gorch.Go("side", Select("side wait", On("poke", Flaky()), Timeout("t", 60))),
                Select("main wait", On("go")),
                Step("risky", self.risky),
            )

        def risky(self) -> None:
            if self.fail:
                raise ValueError("not yet")

    with freeze_time("2031-01-01T00:00:00Z"):
        wf, state = Busy(), gorch.new_state("busy", "busy")
        with pytest.raises(gorch.SetupError):
            gorch.resume(wf, state)
        gorch.handle_event(wf, state, "go")
        with pytest.raises(gorch.StepFailed):
            gorch.resume(wf, state)
    main = state.thread(gorch.MAIN_THREAD)
    assert main is not None and main.attempts == 1 and main.error
    side = state.thread("side")
    assert side is not None
    assert {we.status for we in side.wait_events} == {
        gorch.EventStatus.SETUP_ERROR,
        gorch.EventStatus.SETUP,
    }
    back_wf, back_state = roundtrip(wf, state)
    assert back_wf == wf
    assert back_state == state


def test_int_in_float_field_is_written_as_float() -> None:
    wf = rich(ratio=0.5)
    state = gorch.new_state("id-1", "rich")
    wf.ratio = 3  # a step assigned an int: no validation on assignment
    blob = gorch.dumps(wf, state)
    assert blob == gorch.dumps(rich(ratio=3.0), state)
    back, _ = gorch.loads(blob, Rich)
    assert type(back.ratio) is float and back.ratio == 3.0
    assert gorch.dumps(back, state) == blob


def test_step_that_puts_an_int_in_a_float_field_keeps_blobs_stable() -> None:
    class Account(gorch.Workflow):
        balance: float = 0.5

        def definition(self) -> gorch.Section:
            return S(Step("reset", self.reset), Select("wait", On("go")))

        def reset(self) -> None:
            self.balance = 10

    wf, state = Account(), gorch.new_state("acc", "account")
    blobs: list[bytes] = []
    gorch.resume(wf, state, lambda kind: blobs.append(gorch.dumps(wf, state)))
    for blob in blobs:
        back_wf, back_state = gorch.loads(blob, Account)
        assert type(back_wf.balance) is float
        assert gorch.dumps(back_wf, back_state) == blob


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("maybe", "not a number"),  # a str in an int field
        ("level", 99),  # not a member of the enum
        ("owner", "Bob"),  # a str where a model is expected
        ("anything", object()),  # cannot be serialised at all
    ],
)
def test_data_that_would_not_load_back_raises_at_dumps(field: str, value: Any) -> None:
    wf = rich()
    setattr(wf, field, value)  # steps assign without validation
    with pytest.raises(gorch.SerializationError):
        gorch.dumps(wf, gorch.new_state("id-1", "rich"))


# --------------------------------------------------------------------------- refusing bad blobs


@pytest.fixture
def blob() -> bytes:
    wf, state = rich(), gorch.new_state("id-1", "rich")
    gorch.resume(wf, state)
    return gorch.dumps(wf, state)


def test_empty_blob_is_refused() -> None:
    with pytest.raises(gorch.SerializationError):
        gorch.loads(b"", Rich)


def test_every_truncation_of_a_real_blob_is_refused(blob: bytes) -> None:
    assert gorch.loads(blob, Rich)[1].status is gorch.WorkflowStatus.WAITING
    for n in range(len(blob)):
        with pytest.raises(gorch.SerializationError):
            gorch.loads(blob[:n], Rich)


def test_trailing_garbage_is_refused(blob: bytes) -> None:
    with pytest.raises(gorch.SerializationError):
        gorch.loads(blob + b"\x00", Rich)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(gorch.SerializationError):
        gorch.loads(data, Rich)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_real_blob_loads_or_raises_serialization_error(data: st.DataObject) -> None:
    wf, state = rich(), gorch.new_state("id-1", "rich")
    gorch.resume(wf, state)
    good = bytearray(gorch.dumps(wf, state))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] = data.draw(st.integers(0, 255))
    try:
        back_wf, back_state = gorch.loads(bytes(good), Rich)
    except gorch.SerializationError:
        return
    assert type(back_wf) is Rich
    assert type(back_state) is gorch.State


@pytest.mark.parametrize(
    "foreign",
    [
        msgpack.packb({"gorch": 1, "state": [], "data": {}}),
        msgpack.packb(["other", 1, [], {}]),
        msgpack.packb(["gorch"]),
        msgpack.packb("gorch"),
        msgpack.packb(1),
        msgpack.packb(None),
        msgpack.packb([]),
        msgpack.packb(["gorch", "1", [], {}]),
        msgpack.packb(["gorch", 0, [], {}]),
        msgpack.packb(["gorch", 1, [], {}]),
        msgpack.packb(["gorch", 1, ["id", "wf", 0, 0, []], []]),
        b'{"gorch": 1}',
        b"\x80\x04\x95",
    ],
)
def test_foreign_input_is_refused(foreign: bytes) -> None:
    with pytest.raises(gorch.SerializationError):
        gorch.loads(foreign, Rich)


def test_blob_of_another_workflow_class_is_refused(blob: bytes) -> None:
    class Other(gorch.Workflow):
        total: int

        def definition(self) -> gorch.Section:
            return S()

    with pytest.raises(gorch.SerializationError):
        gorch.loads(blob, Other)


class Boom:
    """Unpickling this would call ``Boom.explode``."""

    exploded = False

    @classmethod
    def explode(cls) -> None:
        cls.exploded = True

    def __reduce__(self) -> Any:
        return (Boom.explode, ())


def test_a_pickle_is_never_unpickled() -> None:
    payload = pickle.dumps(Boom())
    with pytest.raises(gorch.SerializationError):
        gorch.loads(payload, Rich)
    with pytest.raises(gorch.SerializationError):
        gorch.loads(msgpack.packb(["gorch", 1, payload, {}]), Rich)
    assert not Boom.exploded


def _rebuild(blob: bytes, changes: dict[int, Any]) -> bytes:
    """A blob re-packed with some of its top-level items replaced (by position)."""
    items = msgpack.unpackb(blob)
    for pos, value in changes.items():
        items[pos] = value
    return msgpack.packb(items, use_bin_type=True)


def test_blob_with_an_extension_type_is_refused(blob: bytes) -> None:
    with pytest.raises(gorch.SerializationError):
        gorch.loads(msgpack.packb(msgpack.ExtType(7, blob)), Rich)
    items = msgpack.unpackb(blob)
    data = items[-1]
    assert isinstance(data, dict)
    data["anything"] = msgpack.ExtType(42, b"payload")
    with pytest.raises(gorch.SerializationError):
        gorch.loads(_rebuild(blob, {3: data}), Rich)


def test_blob_with_a_msgpack_timestamp_is_refused(blob: bytes) -> None:
    """The timestamp extension (type -1) is an extension type like any other."""
    data = msgpack.unpackb(blob)[-1]
    data["anything"] = msgpack.Timestamp(1_700_000_000, 5)
    with pytest.raises(gorch.SerializationError):
        gorch.loads(_rebuild(blob, {3: data}), Rich)


def test_blob_from_a_newer_format_version_asks_to_upgrade(blob: bytes) -> None:
    assert msgpack.unpackb(blob)[1] == gorch.FORMAT_VERSION
    newer = _rebuild(blob, {1: gorch.FORMAT_VERSION + 1})
    with pytest.raises(gorch.SerializationError, match=r"(?i)upgrade"):
        gorch.loads(newer, Rich)


@pytest.mark.parametrize("value", ["a string", None, 42, ["list"], {"a": 1}])
def test_non_bytes_input_is_refused(value: Any) -> None:
    with pytest.raises(gorch.SerializationError):
        gorch.loads(value, Rich)


def test_bytes_like_blobs_from_database_drivers_load(blob: bytes) -> None:
    for view in (bytearray(blob), memoryview(blob)):
        wf, state = gorch.loads(view, Rich)  # type: ignore[arg-type]
        assert gorch.dumps(wf, state) == blob


# --------------------------------------------------------------------------- size


class Decision(pydantic.BaseModel):
    approved: bool
    by: str


class Expense(gorch.Workflow):
    """The SPEC's quickstart workflow."""

    amount: float
    status: str = "new"
    approver: str = ""

    def definition(self) -> gorch.Section:
        return S(
            Step("notify manager", lambda: None),
            Select(
                "await decision",
                On("decide", self.on_decide),
                Timeout("expired", timedelta(days=3), Step("escalate", lambda: None), Return()),
            ),
            If(self.status == "approved", Step("pay", lambda: None)).Else(
                Step("tell requester", lambda: None)
            ),
        )

    def on_decide(self, d: Decision) -> dict[str, str]:
        self.status = "approved" if d.approved else "rejected"
        self.approver = d.by
        return {"status": self.status}


def test_waiting_quickstart_workflow_is_well_under_one_kib() -> None:
    wf, state = Expense(amount=120.0), gorch.new_state("exp-42", "expense")
    with freeze_time("2031-01-01T00:00:00Z"):
        assert gorch.resume(wf, state) is gorch.WorkflowStatus.WAITING
    blob = gorch.dumps(wf, state)
    assert len(blob) < 512, len(blob)
    _, back_state = gorch.loads(blob, Expense)
    assert gorch.awaited_events(back_state) == gorch.awaited_events(state)
    assert gorch.next_wakeup(back_state) == datetime(2031, 1, 4, tzinfo=UTC)


# ----------------------------------------------------------------- nesting depth (issue 10)


class Tree(pydantic.BaseModel):
    child: Tree | None = None


class Deep(gorch.Workflow):
    anything: Any = None
    tree: Tree | None = None
    count: int = 0

    def definition(self) -> gorch.Section:
        return S(Step("noop", lambda: None))


def nested_lists(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def nested_maps(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


def tree(depth: int) -> Tree:
    node = Tree()
    for _ in range(depth):
        node = Tree(child=node)
    return node


def deep_blob(data: Any) -> bytes:
    """A well-formed blob whose data is ``data`` (as a foreign writer could make it)."""
    return blob_with_data(msgpack.packb(data, use_bin_type=True))


def blob_with_data(data: bytes) -> bytes:
    """A blob with a valid header and state, and ``data`` as the msgpack bytes of its data."""
    state = gorch.new_state("deep-1", "deep")
    header = msgpack.unpackb(gorch.dumps(Deep(), state))[:3]
    return b"\x94" + b"".join(msgpack.packb(h, use_bin_type=True) for h in header) + data


def anything_nested(level: bytes, depth: int) -> bytes:
    """``{"anything": <depth levels of level> 1}``, written byte by byte (no packer limit)."""
    return blob_with_data(b"\x81\xa8anything" + level * depth + b"\x01")


@pytest.mark.parametrize("depth", [300, 340, 1000, 3000])
@pytest.mark.parametrize("level", [b"\x91", b"\x81\xa1k"], ids=["lists", "maps"])
def test_loads_refuses_data_nested_too_deep_with_serialization_error(
    level: bytes, depth: int
) -> None:
    with pytest.raises(gorch.SerializationError, match="nested"):
        gorch.loads(anything_nested(level, depth), Deep)


def test_loads_refuses_a_blob_nested_deeper_than_msgpack_reads() -> None:
    with pytest.raises(gorch.SerializationError):
        gorch.loads(anything_nested(b"\x91", 100_000), Deep)


def test_the_deepest_data_dumps_writes_loads_back() -> None:
    """The depth limit of ``loads`` is above what ``dumps`` can write: every blob loads."""
    state = gorch.new_state("deep-1", "deep")
    deepest = 0
    for depth in range(200, 300):
        try:
            blob = gorch.dumps(Deep(anything=nested_maps(depth)), state)
        except gorch.SerializationError:
            break
        deepest = depth
        assert gorch.dumps(*gorch.loads(blob, Deep)) == blob
    assert deepest >= 200


@pytest.mark.parametrize("depth", [300, 1000, 5000])
def test_dumps_refuses_data_nested_too_deep_with_serialization_error(depth: int) -> None:
    state = gorch.new_state("deep-1", "deep")
    for wf in (Deep(anything=nested_lists(depth)), Deep(anything=nested_maps(depth))):
        with pytest.raises(gorch.SerializationError, match=r"nested|depth"):
            gorch.dumps(wf, state)
    with pytest.raises(gorch.SerializationError):
        gorch.dumps(Deep(tree=tree(depth)), state)


def test_dumps_of_deep_data_that_would_not_load_back_raises_serialization_error() -> None:
    """The error message shows a bounded part of the data (its repr used to recurse)."""
    wf = Deep(tree=tree(220))
    wf.count = "not a number"  # type: ignore[assignment]  # steps assign without validation
    with pytest.raises(gorch.SerializationError, match="would not load back") as info:
        gorch.dumps(wf, gorch.new_state("deep-1", "deep"))
    assert len(str(info.value)) < 2000


def test_loads_turns_any_error_of_a_validator_into_serialization_error() -> None:
    class Picky(gorch.Workflow):
        name: str = ""

        @pydantic.field_validator("name")
        @classmethod
        def _no_x(cls, v: str) -> str:
            if v == "x":
                raise KeyError("x is not allowed")
            return v

        def definition(self) -> gorch.Section:
            return S()

    blob = deep_blob({"name": "x"})
    with pytest.raises(gorch.SerializationError, match="KeyError"):
        gorch.loads(blob, Picky)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.binary(max_size=300)
    | msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True))
    | st.tuples(msgpack_values, msgpack_values).map(
        lambda sv: msgpack.packb(["gorch", 1, sv[0], sv[1]], use_bin_type=True)
    )
    | st.tuples(st.sampled_from([b"\x91", b"\x81\xa1k"]), st.integers(1, 5000)).map(
        lambda ld: anything_nested(*ld)
    )
)
def test_loads_of_any_bytes_raises_only_serialization_error(raw: bytes) -> None:
    for cls in (Deep, Rich):
        try:
            wf, state = gorch.loads(raw, cls)
        except gorch.SerializationError:
            continue
        assert type(wf) is cls
        assert type(state) is gorch.State


class Versioned(gorch.Workflow):
    """A class whose validator upgrades what it reads to a newer model (a subclass)."""

    n: int = 0

    @pydantic.model_validator(mode="wrap")
    @classmethod
    def _upgrade(cls, data: Any, handler: Any) -> Any:
        made = handler(data)
        if cls is Versioned:
            return VersionedV2(n=made.n)
        return made

    def definition(self) -> gorch.Section:
        return S(Step("noop", self.noop))

    def noop(self) -> None:
        return None


class VersionedV2(Versioned):
    v: int = 2


def test_a_save_writes_the_data_as_the_validator_gives_it_back() -> None:
    """The blob holds the re-validated copy's dump, even when that copy is another model."""
    wf = Versioned.model_construct(n=3)
    state = gorch.new_state("v-1", "versioned")
    blob = gorch.dumps(wf, state)
    assert msgpack.unpackb(blob)[3] == {"n": 3, "v": 2}
    loaded, _ = gorch.loads(blob, Versioned)
    assert type(loaded) is VersionedV2 and loaded.v == 2
    assert gorch.dumps(loaded, state) == blob


class Tally(gorch.Workflow):
    """An older version of Migrating: the field was called ``sum``."""

    sum: int = 0

    def definition(self) -> gorch.Section:
        return S()


class Migrating(gorch.Workflow):
    """Renames an older version's field in its own ``model_validate``."""

    total: int = 0

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Migrating:
        if isinstance(obj, dict) and "sum" in obj:
            obj = {("total" if k == "sum" else k): v for k, v in obj.items()}
        return super().model_validate(obj, *args, **kwargs)

    def definition(self) -> gorch.Section:
        return S()


def test_a_class_that_overrides_model_validate_loads_through_it() -> None:
    """The codec calls pydantic's validator directly only for classes that keep its own."""
    state = gorch.new_state("m-1", "migrating")
    old_blob = gorch.dumps(Tally(sum=7), state)
    wf, _ = gorch.loads(old_blob, Migrating)
    assert wf.total == 7
    assert msgpack.unpackb(gorch.dumps(wf, state))[3] == {"total": 7}
