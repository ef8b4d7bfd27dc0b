"""Event handlers: the ``Handler`` protocol, typed function handlers and timers.

A Select case's handler is either a :class:`Handler` instance or a plain
callable. Callables are introspected once per function (not per build) and
wrapped so that input is validated by pydantic against the annotation of the
first parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from types import UnionType
from typing import Annotated, Any, get_args, get_origin, is_typeddict

import pydantic

from gorch import clock
from gorch.errors import DefinitionError, InvalidEventInput, summarize_validation
from gorch.state import EventRequest


class Handler:
    """Base class of event handlers; every hook is a no-op by default.

    * ``setup(req)`` runs when the wait begins (at the end of the ``resume`` that
      blocked); its return value is stored as ``req.setup_data``.
    * ``handle(req, input)`` runs in ``handle_event``; its return value is the
      event's output.
    * ``teardown(req, handled)`` runs on the next ``resume`` once the wait is
      over; ``handled`` says whether this event was the one delivered.

    Set ``input_type`` to have ``input`` validated (dict, model, or JSON
    bytes/str) before ``handle`` runs; ``output_type`` documents the output.
    """

    input_type: Any = None
    output_type: Any = None

    def setup(self, req: EventRequest) -> str | None:
        return None

    def handle(self, req: EventRequest, input: Any) -> Any:
        return None

    def teardown(self, req: EventRequest, handled: bool) -> None:
        return None


_NO_TYPE = object()


def _wants_json_str(tp: Any) -> bool:
    """Whether a str input should be parsed as JSON for annotation ``tp``."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _wants_json_str(get_args(tp)[0])
    if origin is typing.Union or origin is UnionType:
        return any(_wants_json_str(a) for a in get_args(tp) if a is not type(None))
    base = origin if origin is not None else tp
    if not isinstance(base, type):
        return False
    if issubclass(base, (str, bytes, bytearray)):
        return False
    return (
        issubclass(base, pydantic.BaseModel)
        or dataclasses.is_dataclass(base)
        or is_typeddict(base)
        or issubclass(base, (Mapping, Iterable))
    )


class InputType:
    """A validator for one input annotation: dict / model / JSON bytes or str."""

    __slots__ = ("adapter", "json_str", "type")

    _cache: dict[Any, InputType] = {}

    def __init__(self, tp: Any) -> None:
        self.type = tp
        try:
            self.adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(tp)
        except pydantic.PydanticUserError as e:
            raise DefinitionError(f"input annotation {tp!r} cannot be validated: {e}") from e
        self.json_str = _wants_json_str(tp)

    @classmethod
    def of(cls, tp: Any) -> InputType:
        try:
            return cls._cache[tp]
        except KeyError:
            pass
        except TypeError:  # unhashable annotation
            return cls(tp)
        it = cls._cache[tp] = cls(tp)
        return it

    def validate(self, event: str, value: Any) -> Any:
        try:
            if isinstance(value, (bytes, bytearray, memoryview)):
                return self.adapter.validate_json(bytes(value))
            if isinstance(value, str) and self.json_str:
                return self.adapter.validate_json(value)
            return self.adapter.validate_python(value)
        except pydantic.ValidationError as e:
            errors = e.errors(include_url=False, include_context=False)
            raise InvalidEventInput(event, summarize_validation(errors), errors) from e


class _Signature:
    """What was learnt from a callable handler's signature (cached per function)."""

    __slots__ = ("input", "output_type", "takes_input")

    def __init__(self, takes_input: bool, input: InputType | None, output_type: Any) -> None:
        self.takes_input = takes_input
        self.input = input
        self.output_type = output_type

    def validate(self, event: str, value: Any) -> Any:
        if not self.takes_input:
            if value is not None:
                raise InvalidEventInput(event, f"the handler takes no input, got {value!r}")
            return None
        return self.input.validate(event, value) if self.input is not None else value


_signatures: dict[Any, _Signature] = {}


def _signature_key(fn: Callable[..., Any]) -> Any:
    func = getattr(fn, "__func__", fn)
    if hasattr(func, "__wrapped__"):  # wrappers made by one decorator share their code
        func = inspect.unwrap(func)
    code = getattr(func, "__code__", None)
    if code is not None:
        return code
    return func if inspect.isroutine(func) else type(func)


def _introspect(fn: Callable[..., Any]) -> _Signature:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise DefinitionError(f"cannot read the signature of handler {fn!r}: {e}") from e
    params = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(params) > 1:
        raise DefinitionError(
            f"handler {fn!r} takes {len(params)} required arguments; "
            "a handler takes its input or nothing"
        )
    target = getattr(fn, "__func__", fn)
    if not inspect.isroutine(target):
        target = type(target).__call__
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception as e:  # unresolved forward reference
        raise DefinitionError(f"cannot resolve the annotations of handler {fn!r}: {e}") from e
    out = hints.get("return", _NO_TYPE)
    if not params:
        return _Signature(False, None, None if out is _NO_TYPE else out)
    ann = hints.get(params[0].name, _NO_TYPE)
    input_type = None if ann is _NO_TYPE or ann is Any else InputType.of(ann)
    return _Signature(True, input_type, None if out is _NO_TYPE else out)


def signature_of(fn: Callable[..., Any]) -> _Signature:
    if isinstance(fn, functools.partial):  # partials of different functions share a type
        return _introspect(fn)
    key = _signature_key(fn)
    sig = _signatures.get(key)
    if sig is None:
        sig = _signatures[key] = _introspect(fn)
    return sig


class FunctionHandler(Handler):
    """Adapts a plain callable ``fn(input) -> output`` (or ``fn()``) to :class:`Handler`."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.sig = signature_of(fn)
        self.input_type = self.sig.input.type if self.sig.input else None
        self.output_type = self.sig.output_type

    def handle(self, req: EventRequest, input: Any) -> Any:
        if self.sig.takes_input:
            return self.fn(input)
        return self.fn()


class TimerHandler(Handler):
    """The handler behind :class:`gorch.Timeout`: its setup stores the due time.

    ``setup_data`` is the due time as an ISO 8601 UTC timestamp; any handler
    whose setup returns such a timestamp is a timer for ``next_wakeup`` and
    ``due_events``.
    """

    def __init__(self, after: timedelta | float) -> None:
        if isinstance(after, bool) or not isinstance(after, (timedelta, int, float)):
            raise DefinitionError(f"Timeout needs a timedelta or seconds, got {after!r}")
        self.after = after if isinstance(after, timedelta) else timedelta(seconds=after)

    def setup(self, req: EventRequest) -> str:
        return (clock.now() + self.after).isoformat()


def validate_input(handler: Handler | None, event: str, value: Any) -> Any:
    """Validate ``value`` for ``handler``; raise :class:`InvalidEventInput` if it won't do."""
    if isinstance(handler, FunctionHandler):
        return handler.sig.validate(event, value)
    if handler is None:
        if value is not None:
            raise InvalidEventInput(
                event, f"the event has no handler and takes no input, got {value!r}"
            )
        return None
    if handler.input_type is not None:
        return InputType.of(handler.input_type).validate(event, value)
    return value


def call_handler(obj: Any, event: str, req: EventRequest, input: Any) -> Any:
    """Validate ``input`` for a case's handler (any accepted form) and call it.

    Raises :class:`InvalidEventInput` before calling; exceptions raised by the
    handler itself are wrapped in :class:`HandlerCallError`.
    """
    if obj is None or isinstance(obj, Handler):
        value = validate_input(obj, event, input)
        if obj is None:
            return None
        try:
            return obj.handle(req, value)
        except Exception as e:
            raise HandlerCallError(e) from e
    if not callable(obj):
        raise DefinitionError(
            f"handler of event {event!r} must be a gorch.Handler or a callable, got {obj!r}"
        )
    sig = signature_of(obj)
    value = sig.validate(event, input)
    try:
        return obj(value) if sig.takes_input else obj()
    except Exception as e:
        raise HandlerCallError(e) from e


class HandlerCallError(Exception):
    """Internal: carries an exception raised inside a handler out of :func:`call_handler`."""

    def __init__(self, error: Exception) -> None:
        self.error = error
