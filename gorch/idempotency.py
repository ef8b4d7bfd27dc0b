"""Idempotency keys: what makes a retried ``start`` or ``send`` apply nothing twice.

A key is kept in the instance's own state (``State.meta``), so it is saved by
the same compare-and-swap as the event it names: the key and the event commit
together or not at all, in every store, with no second table to keep in step.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from uuid import UUID, uuid5

import pydantic_core

from gorch.errors import IdempotencyKeyReused, InvalidIdempotencyKey
from gorch.state import State
from gorch.workflow import Workflow

KEY_PREFIX = "gorch.key:"
"""``State.meta`` entries of the keys of sends: key → the event, its input's digest, the output."""
START_KEY = "gorch.start"
"""``State.meta`` entry of the key a start was made with, and its data's digest."""
_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
_NAMESPACE = UUID("5b0c3f4e-2a7d-4f43-9a1e-6f1d2c9b7a10")


def check_key(key: object) -> str:
    """An idempotency key is 1-255 printable ASCII characters (what an HTTP header carries)."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise InvalidIdempotencyKey(key)
    return key


def key_id(name: str, key: str) -> str:
    """The instance id a keyed start of workflow ``name`` gets: the same for the same key."""
    return uuid5(_NAMESPACE, f"{name}\x00{check_key(key)}").hex


def _digest(value: Any) -> str:
    """A short fingerprint of JSON-like data, independent of key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _input_digest(input: Any) -> str:
    """The fingerprint of an event's input: JSON text and the data it parses to are alike."""
    value = input
    if isinstance(input, (bytes, bytearray, str)):
        try:
            value = json.loads(input)
        except ValueError:
            value = bytes(input).hex() if isinstance(input, (bytes, bytearray)) else input
    try:
        return _digest(pydantic_core.to_jsonable_python(value, serialize_unknown=True))
    except (ValueError, TypeError, RecursionError):
        return _digest(repr(value))


def start_digest(key: str, wf: Workflow) -> str:
    """What a keyed start records: the key and the digest of the data it started with."""
    return f"{check_key(key)} {_digest(wf.model_dump(mode='json'))}"


def check_repeated_start(workflow_id: str, key: str, recorded: str | None, digest: str) -> None:
    """``IdempotencyKeyReused`` unless the instance was started with this key and data."""
    if recorded != digest:
        same_key = bool(recorded) and recorded.split(" ")[0] == key  # type: ignore[union-attr]
        raise IdempotencyKeyReused(workflow_id, key, "other data" if same_key else "another start")


def remember_send(state: State, key: str, event: str, input: Any, output: Any, keep: int) -> None:
    """Record a keyed send in ``state`` (saved with the event), keeping the last ``keep`` keys."""
    meta = state.meta
    keys = [k for k in meta if k.startswith(KEY_PREFIX)]
    for old in keys[: max(0, len(keys) - keep + 1)]:
        del meta[old]  # oldest first: dicts keep insertion order, and so does the codec
    try:
        out = pydantic_core.to_jsonable_python(output, serialize_unknown=True)
    except (ValueError, TypeError, RecursionError):
        out = None
    record = {"event": event, "input": _input_digest(input), "output": out}
    meta[KEY_PREFIX + key] = json.dumps(record, separators=(",", ":"), default=str)


def repeated_send(state: State, key: str, event: str, input: Any) -> tuple[bool, Any]:
    """``(True, first output)`` if ``key`` was used for this very send, ``(False, None)`` if
    it is new; ``IdempotencyKeyReused`` if it was used for another event or input."""
    seen = state.meta.get(KEY_PREFIX + key)
    if seen is None:
        return False, None
    first = json.loads(seen)
    if first.get("event") != event:
        raise IdempotencyKeyReused(state.id, key, f"event {first.get('event')!r}")
    if first.get("input") != _input_digest(input):
        raise IdempotencyKeyReused(state.id, key, f"event {event!r} with other input")
    return True, first.get("output")
