"""``Record`` is a frozen value whose ``__init__`` is written by hand (for speed): it must
stay the one the dataclass would write."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from datetime import UTC, datetime

import pytest

from gorch.stores.base import Record

WAKE = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_init_takes_every_field_in_order_and_sets_it() -> None:
    fields = [f.name for f in dataclasses.fields(Record)]
    assert list(inspect.signature(Record).parameters) == fields
    values = ("id-1", "approval", "waiting", b"blob", 3, WAKE)
    by_position = Record(*values)
    by_name = Record(**dict(zip(fields, values, strict=True)))
    for record in (by_position, by_name):
        assert tuple(getattr(record, name) for name in fields) == values
    assert by_position == by_name and hash(by_position) == hash(by_name)
    assert repr(by_position).startswith("Record(id='id-1', workflow='approval'")


def test_stays_a_frozen_value() -> None:
    record = Record("id-1", "approval", "waiting", b"blob", 3, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.version = 4  # type: ignore[misc]
    newer = dataclasses.replace(record, version=4, wake_at=WAKE)
    assert (newer.version, newer.wake_at, record.version) == (4, WAKE, 3)
    assert pickle.loads(pickle.dumps(record)) == record
    assert record != newer
