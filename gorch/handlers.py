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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from types import UnionType
from typing import Annotated, Any, get_args, get_origin, is_typeddict

import pydantic

from gorch import clock
from gorch.codec import short_repr
from gorch.errors import DefinitionError, InvalidEventInput, summarize_validation
from gorch.state import EventRequest

if typing.TYPE_CHECKING:
    from gorch.statements import Timeout

#: The deepest nesting of containers an event's input may have. Stored data may
#: nest at most :data:`gorch.codec.MAX_DATA_DEPTH` levels, and a handler usually
#: keeps its input a few levels down in the workflow's data.
MAX_INPUT_DEPTH = 128


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


# --------------------------------------------------------------------------- async callables

#: Code flags of functions whose call returns an awaitable (or an async iterator).
_ASYNC_CODE = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR

#: How to use the async API, for error messages of the sync one.
ASYNC_API_HINT = (
    "the sync gorch.resume / gorch.handle_event / gorch.Engine cannot run it: use "
    "`await gorch.aresume(...)` and `await gorch.ahandle_event(...)`, or gorch.AsyncEngine"
)


def is_async(fn: object) -> bool:
    """Whether calling ``fn`` gives something to await: ``async def``, also behind a
    bound method, ``functools.partial`` or an object whose ``__call__`` is async.

    Cheap for functions and bound methods (one code-flag test), the common case
    checked for every step of a definition. A plain function that returns an
    awaitable is not detected here: the interpreter checks what calls return.
    """
    try:
        return bool(fn.__code__.co_flags & _ASYNC_CODE)  # type: ignore[attr-defined]
    except AttributeError:
        pass
    if isinstance(fn, functools.partial):
        return is_async(fn.func)
    if inspect.ismethod(fn):
        return is_async(fn.__func__)
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return True  # e.g. marked with inspect.markcoroutinefunction
    if inspect.isroutine(fn) or isinstance(fn, type):
        return False  # builtins, and classes (calling one makes an instance)
    call = type(fn).__dict__.get("__call__") or getattr(type(fn), "__call__", None)  # noqa: B004
    return call is not None and is_async(call)


def describe(fn: object) -> str:
    """A callable as a user recognises it in a message: ``Expense.notify``, ``partial(f)``."""
    if isinstance(fn, functools.partial):
        return f"functools.partial({describe(fn.func)})"
    name = getattr(fn, "__qualname__", None)
    if isinstance(name, str):
        return name
    return f"{type(fn).__qualname__} object"


def is_awaitable(value: object) -> bool:
    """Whether a call's result is something to await (or an async generator never run)."""
    if type(value) in _PLAIN_RESULTS:  # what handlers and setups return most: no ABC check
        return False
    return inspect.isawaitable(value) or inspect.isasyncgen(value)


#: Built-in types of results that are never awaitable (asking ``Awaitable`` costs more).
_PLAIN_RESULTS = frozenset({str, dict, list, tuple, int, float, bool, bytes, type(None)})


def discard(value: object) -> None:
    """Close a coroutine or async generator that will never run (no 'never awaited' warning)."""
    close = getattr(value, "close", None) if inspect.iscoroutine(value) else None
    if close is not None:
        close()
    elif inspect.isasyncgen(value):
        value.aclose().close()


class SyncCallRefused(DefinitionError):
    """The sync API met something to await; nothing was recorded as done."""


def refuse_awaitable(value: object, what: str) -> SyncCallRefused:
    """The error for a plain callable that returned an awaitable under the sync API."""
    discard(value)
    return SyncCallRefused(
        f"{what} returned an awaitable ({type(value).__name__}) instead of a result; "
        f"it is async, and {ASYNC_API_HINT}"
    )


_HANDLER_METHODS = ("setup", "handle", "teardown")
_async_handler_methods: dict[type, tuple[str, ...]] = {}


def async_handler_methods(handler: Handler) -> tuple[str, ...]:
    """The methods of a :class:`Handler` subclass that are async (cached per class)."""
    cls = type(handler)
    found = _async_handler_methods.get(cls)
    if found is None:
        found = _async_handler_methods[cls] = tuple(
            m for m in _HANDLER_METHODS if is_async(getattr(cls, m))
        )
    return found


# --------------------------------------------------------------------------- input checks


_LEAVES = frozenset({int, float, bool, type(None), bytes, bytearray})


def _surrogate_at(s: str) -> int:
    """Index of the first lone surrogate in ``s`` (which UTF-8 cannot encode), or -1."""
    if s.isascii():
        return -1
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return -1


def _children(value: Any) -> Iterable[Any] | None:
    """The values inside a container of input, None for a leaf."""
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return value
    if isinstance(value, pydantic.BaseModel):
        extra = value.__pydantic_extra__
        return [*value.__dict__.values(), *(extra.values() if extra else ())]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, f.name) for f in dataclasses.fields(value)]
    return None


def check_input(event: str, value: Any) -> None:
    """Refuse input that no store could keep: lone surrogates, or nesting too deep.

    Checked before any handler runs (typed or not), so such input is the
    caller's error (:class:`InvalidEventInput`), never a failure to save later.
    Iterative: a cycle or a million levels cost no recursion.
    """
    t = type(value)
    if t in _LEAVES:
        return
    if t is str:
        at = _surrogate_at(value)
        if at >= 0:
            raise InvalidEventInput(event, _surrogate_message(value, at))
        return
    seen: dict[int, int] = {}  # container id -> the deepest level it was checked at
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        kind = type(item)
        if kind in _LEAVES:
            continue
        if kind is str or isinstance(item, str):
            at = _surrogate_at(item)
            if at >= 0:
                raise InvalidEventInput(event, _surrogate_message(item, at))
            continue
        inner = _children(item)
        if inner is None:
            continue
        if depth >= MAX_INPUT_DEPTH:
            raise InvalidEventInput(
                event,
                f"the input is nested deeper than {MAX_INPUT_DEPTH} levels "
                "(lists, maps and models inside each other)",
            )
        key = id(item)
        if seen.get(key, -1) >= depth:
            continue
        seen[key] = depth
        todo.extend((v, depth + 1) for v in inner)


def _surrogate_message(s: str, at: int) -> str:
    return (
        f"a string holds a lone surrogate {s[at]!r} at index {at} "
        f"({short_repr(s)}): text must be valid Unicode"
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
                out = self.adapter.validate_json(bytes(value))
            elif isinstance(value, str) and self.json_str:
                out = self.adapter.validate_json(value)
            else:
                return self.adapter.validate_python(value)
        except pydantic.ValidationError as e:
            errors = e.errors(include_url=False, include_context=False)
            raise InvalidEventInput(event, summarize_validation(errors), errors) from e
        check_input(event, out)  # parsed from JSON: its nesting was not checked yet
        return out


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
                raise InvalidEventInput(
                    event, f"the handler takes no input, got {short_repr(value)}"
                )
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
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    if code is not None and not hasattr(func, "__wrapped__"):  # the common case, inline
        sig = _signatures.get(code)
        if sig is not None:
            return sig
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
    ``due_events``. The due time is ``after`` from when the wait begins, or
    ``at``: an aware datetime, or a zero-argument callable returning one. The
    callable is called by ``setup`` only -- when the Select starts waiting --
    never when the timer fires, so a due time stays what it was set to.
    """

    def __init__(
        self,
        after: timedelta | float | None = None,
        *,
        at: datetime | Callable[[], Any] | None = None,
    ) -> None:
        self.after: timedelta | None = None
        self.at: datetime | Callable[[], Any] | None = None
        if at is not None:
            if after is not None:
                raise DefinitionError("a Timeout takes after= or at=, not both")
            self.at = aware_due_time(at, "Timeout at=") if isinstance(at, date) else at
            if not callable(self.at) and not isinstance(self.at, datetime):
                raise DefinitionError(
                    "Timeout at= needs an aware datetime or a zero-argument callable "
                    f"returning one, got {at!r}"
                )
            return
        if isinstance(after, bool) or not isinstance(after, (timedelta, int, float)):
            raise DefinitionError(f"Timeout needs a timedelta or seconds, got {after!r}")
        self.after = after if isinstance(after, timedelta) else timedelta(seconds=after)

    @classmethod
    def of(cls, case: Timeout) -> TimerHandler:
        """The handler of a Select's :class:`gorch.Timeout` case (built on each use)."""
        at = case.at
        if at is None:
            return cls(case.after)
        return cls(case.after, at=at)

    def setup(self, req: EventRequest) -> str | Awaitable[str]:  # type: ignore[override]
        if self.after is not None:
            return (clock.now() + self.after).isoformat()
        at = self.at
        if isinstance(at, datetime):
            return at.isoformat()
        assert at is not None
        where = f"the at= of Timeout {req.name!r} ({describe(at)})"
        when = at()
        if is_awaitable(when):  # async at=: awaited by aresume (the sync API refused it)
            return _await_due(when, where)
        return aware_due_time(when, where).isoformat()


async def _await_due(when: Any, where: str) -> str:
    return aware_due_time(await when, where).isoformat()


def aware_due_time(when: object, where: str) -> datetime:
    """``when`` as an aware UTC datetime; a clear :class:`DefinitionError` for anything else.

    A naive datetime is refused rather than guessed: the same wall-clock time
    is hours apart between the server's zone and UTC, and a timer that fires
    hours early or late is a bug found in production.
    """
    if not isinstance(when, datetime):
        if isinstance(when, date):
            raise DefinitionError(
                f"{where} gave the date {when!r}, which has no time of day: "
                "give a datetime with a timezone, e.g. datetime(2025, 1, 31, 9, tzinfo=UTC)"
            )
        raise DefinitionError(f"{where} must be an aware datetime, got {short_repr(when)}")
    if when.utcoffset() is None:
        raise DefinitionError(
            f"{where} is the naive datetime {when.isoformat()}: a due time needs a timezone, "
            "e.g. datetime(..., tzinfo=UTC) or a ZoneInfo; naive times are refused, "
            "not guessed"
        )
    return when.astimezone(UTC)


def validate_input(handler: Handler | None, event: str, value: Any) -> Any:
    """Validate ``value`` for ``handler``; raise :class:`InvalidEventInput` if it won't do."""
    if issubclass(type(handler), FunctionHandler):
        return handler.sig.validate(event, value)  # type: ignore[union-attr]
    if handler is None:
        if value is not None:
            raise InvalidEventInput(
                event, f"the event has no handler and takes no input, got {short_repr(value)}"
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
    # (Type tests: ``isinstance`` costs several times more when the answer is no,
    # as it is for the plain callables most handlers are.)
    if obj is None or issubclass(type(obj), Handler):
        if obj is None:  # takes no input: refused by validate_input
            validate_input(obj, event, input)
            return None
        if input is not None:
            check_input(event, input)
        value = validate_input(obj, event, input)
        try:
            return obj.handle(req, value)
        except Exception as e:
            raise HandlerCallError(e) from e
    if not callable(obj):
        raise DefinitionError(
            f"handler of event {event!r} must be a gorch.Handler or a callable, got {obj!r}"
        )
    sig = signature_of(obj)
    if input is not None and sig.takes_input:  # no input: refused by validate
        check_input(event, input)
    value = sig.validate(event, input)
    try:
        return obj(value) if sig.takes_input else obj()
    except Exception as e:
        raise HandlerCallError(e) from e


class HandlerCallError(Exception):
    """Internal: carries an exception raised inside a handler out of :func:`call_handler`."""

    def __init__(self, error: Exception) -> None:
        self.error = error
