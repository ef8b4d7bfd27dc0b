"""Step results: what a step returns is kept with the state, and later steps read it.

A step's return value (unless None) is kept in ``State.results`` under the
step's name, in its JSON form (``pydantic_core.to_jsonable_python``), so it is
saved in the same checkpoint as the step itself and reads the same after a
reload. A later step reads it in one of three ways:

* a parameter named after the step: ``def load(extract): ...``;
* the one parameter left over, for the step that comes directly before it
  in the definition (``extract >> transform``, a DAG node with one
  dependency, the first step of a Parallel branch after the step before the
  Parallel): ``def transform(data): ...``;
* ``ctx: gorch.StepContext``: ``ctx.result("extract")``, ``ctx.results``,
  and the workflow id, step name, attempt and thread.

An annotated parameter gets the value validated by pydantic against its
annotation (``def load(order: Order)``); an unannotated one gets the JSON
form, as a copy of its own (changing it changes no stored result).
Introspection happens once per function (by code object), so a step that
takes no parameter costs nothing more.

Results live in namespaces: the main thread's steps, and the branches of a
Parallel or DAG it runs, keep them under the step's name; a thread started by
``Go`` (and the branches it runs) keeps them under ``"{thread id}/{step}"``,
so two workers running the same statements never read each other's results.
A thread reads its own namespace first, then the main thread's.
"""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import pydantic
import pydantic_core

from gorch.errors import DefinitionError, StepResultError
from gorch.hooks import StepContext

#: The largest result a step may return, as msgpack bytes: results live in the
#: state blob, read and written on every save. Keep bigger data elsewhere (a
#: field, a file, your database) and return a reference to it.
MAX_RESULT_BYTES = 64 * 1024

_CTX = "ctx"
_RESULT = "result"


class Param:
    """One parameter of a step function: what it is filled with."""

    __slots__ = ("adapter", "default", "kind", "name")

    def __init__(
        self, name: str, kind: str, adapter: pydantic.TypeAdapter[Any] | None, default: bool
    ) -> None:
        self.name = name
        self.kind = kind
        self.adapter = adapter
        self.default = default


Plan = tuple[Param, ...]

log = logging.getLogger("gorch")

#: Plans by code object (closures of one ``def`` share their parameters), by
#: partial's function and bound names, or by a callable object's class.
plans: dict[Any, Plan] = {}


def plan_of(fn: Callable[..., Any]) -> Plan:
    """The parameters ``fn`` takes (empty for the usual ``fn()``)."""
    key = _plan_key(fn)
    if key is not None:
        plan = plans.get(key)
        if plan is not None:
            return plan
    plan = _introspect(fn)
    if key is not None:
        plans[key] = plan
    return plan


def _plan_key(fn: Any) -> Any:
    """What ``fn``'s parameters depend on only, or None (then it is read each time)."""
    if isinstance(fn, functools.partial):
        inner = _plan_key(fn.func)
        if inner is None:
            return None
        return ("partial", inner, len(fn.args), tuple(sorted(fn.keywords)))
    func = getattr(fn, "__func__", fn)
    if hasattr(func, "__wrapped__"):  # wrappers of one decorator share their code
        return None
    code = getattr(func, "__code__", None)
    if code is not None:
        return code
    if not inspect.isroutine(fn):
        return type(fn)  # a callable object: its class's __call__
    return None


def _hints_target(fn: Any, follow: bool) -> Any:
    """Where ``fn``'s annotations are: a partial's function, an object's ``__call__``,
    and with ``follow`` the function a forwarding wrapper wraps."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    target = getattr(fn, "__func__", fn)
    if not inspect.isroutine(target):
        target = type(target).__call__
    return inspect.unwrap(target) if follow else target


def _forwards(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` passes ``*args`` / ``**kwargs`` on (a decorator's wrapper): then the
    wrapped function's parameters are what it takes. A wrapper with a fixed signature of
    its own (``functools.wraps`` on a function that takes nothing) takes only those."""
    try:
        own = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):
        return False
    kinds = {p.kind for p in own.parameters.values()}
    return inspect.Parameter.VAR_POSITIONAL in kinds or inspect.Parameter.VAR_KEYWORD in kinds


def _introspect(fn: Callable[..., Any]) -> Plan:
    follow = _forwards(fn)
    try:
        sig = inspect.signature(fn, follow_wrapped=follow)
    except (TypeError, ValueError):  # a builtin or a C callable: called with nothing
        return ()
    params = [
        p
        for p in sig.parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
    ]
    if not params:
        return ()
    try:
        hints = typing.get_type_hints(_hints_target(fn, follow), include_extras=True)
    except Exception as e:  # an unresolved forward reference
        raise DefinitionError(f"cannot resolve the annotations of step function {fn!r}: {e}") from e
    out: list[Param] = []
    for p in params:
        ann = hints.get(p.name, inspect.Parameter.empty)
        default = p.default is not p.empty
        if ann is StepContext or (ann is inspect.Parameter.empty and p.name == "ctx"):
            out.append(Param(p.name, _CTX, None, default))
            continue
        adapter = None
        if ann is not inspect.Parameter.empty and ann is not Any:
            try:
                adapter = pydantic.TypeAdapter(ann)
            except Exception as e:
                raise DefinitionError(
                    f"step function {fn!r}: parameter {p.name!r} has a type pydantic cannot "
                    f"validate ({e})"
                ) from e
        out.append(Param(p.name, _RESULT, adapter, default))
    return tuple(out)


def arguments(
    step: str,
    plan: Plan,
    results: Mapping[str, Any],
    hidden: frozenset[str],
    steps: frozenset[str],
    previous: str | None,
) -> dict[str, Any]:
    """The keyword arguments of a step call (a ``StepContext`` stands for ``ctx``).

    ``results`` are the results this step may read (copies), by step name;
    ``steps`` the names of every Step of the workflow (a parameter named after
    one reads that step's result); ``previous`` the step that comes directly
    before this one, whose result the one other parameter gets.
    """
    kwargs: dict[str, Any] = {}
    loose = [p for p in plan if p.kind == _RESULT and p.name not in steps]
    required = [p for p in loose if not p.default]
    if len(required) > 1:
        raise StepResultError(
            step,
            f"parameters {', '.join(repr(p.name) for p in required)} name no step; name "
            "each after the step whose result it takes, or take ctx: gorch.StepContext",
        )
    positional = required[0] if required else loose[0] if len(loose) == 1 else None
    for p in plan:
        if p.kind == _CTX:
            kwargs[p.name] = _CTX
            continue
        source = p.name if p.name in steps else previous if p is positional else None
        if source is None:
            if p.default:
                continue
            raise StepResultError(
                step,
                f"parameter {p.name!r} names no step, and no single step comes directly "
                "before this one to take a result from; name it after the step whose "
                "result it takes, or take ctx: gorch.StepContext",
            )
        if source not in results:
            if p.default:
                continue
            ctx = StepContext("", "", "", step, 0, None, results=results, hidden=hidden)  # type: ignore[arg-type]
            ctx.result(source)  # raises the error that says why
        value = results[source]
        if p.adapter is not None:
            try:
                value = p.adapter.validate_python(value)
            except pydantic.ValidationError as e:
                raise StepResultError(
                    step,
                    f"the result of {source!r} does not validate as parameter {p.name!r}: "
                    f"{e.error_count()} error(s), first: {e.errors()[0]['msg']}",
                ) from e
        kwargs[p.name] = value
    return kwargs


def bind(fn: Callable[..., Any], kwargs: dict[str, Any], ctx: StepContext) -> Callable[[], Any]:
    """``fn`` with its arguments: a zero-argument callable, as every step is run."""
    args = {k: (ctx if v is _CTX else v) for k, v in kwargs.items()}
    return lambda: fn(**args)


def keep(results: dict[str, Any], key: str, value: Any) -> None:
    """Keep what a step returned (a copy of its JSON form) under ``key``; None drops it.

    A value that cannot be kept (not JSON-able, or over ``MAX_RESULT_BYTES``) is
    not kept, with a warning: the step's effects happened, so failing it would
    run them again. A step that reads it gets an error saying so.
    """
    results.pop(key, None)
    if value is None:
        return
    try:
        packed = msgpack.packb(pydantic_core.to_jsonable_python(value), use_bin_type=True)
    except Exception as e:
        log.warning(
            "gorch: the result of step %r (%s) is not kept with the state: %s; return "
            "JSON-able data or a pydantic model (or None)",
            key,
            type(value).__name__,
            e,
        )
        return
    if len(packed) > MAX_RESULT_BYTES:
        log.warning(
            "gorch: the result of step %r is not kept: %d bytes, over the limit of %d; keep "
            "large data elsewhere (a field, a file, your database) and return a reference",
            key,
            len(packed),
            MAX_RESULT_BYTES,
        )
        return
    results[key] = msgpack.unpackb(packed, raw=False)  # a copy: nothing shares it


def copy_of(value: Any) -> Any:
    """A deep copy of a kept result (JSON-mode data), so a reader cannot change it."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)
