"""The edge of a request: the body (size, media type, strict JSON) and the small parameters.

What JSON or HTTP can refuse is refused here, before the Engine or the store
sees it, so that no client input turns into a 500 further in:

* ``NaN``, ``Infinity``, ``-Infinity`` are not JSON (400 ``MalformedJSON``);
  nor is a lone surrogate (``"\\ud800"``: not Unicode text) or a body that
  is not UTF-8;
* a number no float holds (``1e400``), an integer of more than
  :data:`MAX_INT_DIGITS` digits and nesting deeper than :data:`MAX_JSON_DEPTH`
  are 422 ``InvalidRequest``. A big integer within that is the handler's to
  validate (the JSON Schema of an ``int`` has no bound); if what the workflow
  keeps of it cannot be stored, the Engine refuses it and the request is a 422;
* ``?pc=`` and ``Idempotency-Key`` are checked for what they may be.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from starlette.datastructures import Headers
from starlette.types import Receive

from gorch.http.errors import HTTPError

MAX_JSON_DEPTH = 64
"""Arrays and objects nested deeper than this are refused: no webhook needs more, and
the stored blob (the workflow's own nesting on top) must stay well within what the
codec and the interpreter handle."""

PC_PATTERN = r"^[0-9]{1,15}$"
"""``?pc=``: the decimal digits of a wait's pc, as the snapshot gives it (at most 15, so
it stays a JSON-safe integer). Documented as such: a JSON Schema ``integer`` would also
admit ``3.0`` or ``1e2``, which a query string should not."""

KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
"""An idempotency key: 1-255 printable ASCII characters without spaces (a UUID fits)."""
_KEY = re.compile(KEY_PATTERN)
_PC = re.compile(PC_PATTERN)
MAX_INT_DIGITS = 1000
"""Longer integers are refused before they are converted (that costs quadratic time)."""


@dataclass(frozen=True, slots=True)
class Payload:
    """A request body as received, and its parsed JSON (None for an empty body)."""

    raw: bytes
    value: Any


def _too_large(max_body: int) -> HTTPError:
    return HTTPError(
        413,
        "PayloadTooLarge",
        f"the request body is larger than {max_body} bytes",
        max_body=max_body,
    )


async def read_body(headers: Headers, receive: Receive, max_body: int) -> bytes | None:
    """At most ``max_body`` bytes of body (by Content-Length, then by counting); None if gone."""
    length = headers.get("content-length")
    if length is not None:
        if not re.fullmatch(r"[0-9]{1,20}", length.strip()):
            raise HTTPError(400, "InvalidRequest", f"bad Content-Length {length!r}")
        if int(length) > max_body:
            raise _too_large(max_body)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > max_body:
            raise _too_large(max_body)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _malformed(detail: str) -> NoReturn:
    raise HTTPError(400, "MalformedJSON", detail)


def _unsupported(detail: str) -> NoReturn:
    raise HTTPError(422, "InvalidRequest", detail)


def _constant(name: str) -> NoReturn:
    _malformed(f"the body is not valid JSON: {name} is not a JSON value")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _unsupported(f"the number {text[:40]} is out of range (a 64-bit float)")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        _unsupported(f"the integer {text[:40]}... has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _check_tree(value: Any) -> None:
    """Depth and text of parsed JSON, without recursion (the input may be deep)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, (list, dict)):
            if depth >= MAX_JSON_DEPTH:
                _unsupported(f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        _malformed(
            f"the body is not valid JSON text: a lone surrogate in {text[:40]!r} "
            "(\\ud800-\\udfff must come in pairs)"
        )


def parse_json(headers: Headers, body: bytes) -> Any:
    """The body's JSON value, strictly: 415, 400 or 422 for anything gorch cannot take as is."""
    media = headers.get("content-type", "").partition(";")[0].strip().lower()
    if not (media == "application/json" or re.fullmatch(r"application/[^/\s]+\+json", media)):
        raise HTTPError(
            415,
            "UnsupportedMediaType",
            f"the body must be application/json, got {media or 'no Content-Type'!r}",
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        _malformed(f"the body is not UTF-8: {e}")
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        _unsupported(f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
    except ValueError as e:
        _malformed(f"the body is not valid JSON: {e}")
    _check_tree(value)
    return value


def check_key(key: str, header: str) -> str:
    """An idempotency key as the Engine takes it; 422 ``InvalidRequest`` otherwise."""
    if not _KEY.fullmatch(key):
        _unsupported(
            f"{header} must be 1-255 printable ASCII characters without spaces "
            f"(a UUID is a good choice), got {key[:60]!r}"
        )
    return key


def parse_pc(text: str | None) -> int | None:
    """``?pc=``: a non-negative integer of at most 15 ASCII digits (422 otherwise)."""
    if text is None:
        return None
    if not _PC.fullmatch(text):
        msg = "Input should be a non-negative integer of at most 15 digits"
        raise HTTPError(
            422,
            "InvalidRequest",
            f"query.pc: {msg}, got {text[:40]!r}",
            errors=[{"type": "int_parsing", "loc": ["query", "pc"], "msg": msg}],
        )
    return int(text)
