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
form. Introspection happens once per function (by code object), so a step
that takes no parameter costs nothing more.
"""

from __future__ import annotations

import inspect
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

#: Plans by code object: closures of one ``def`` share their parameters.
plans: dict[Any, Plan] = {}


def plan_of(fn: Callable[..., Any]) -> Plan:
    """The parameters ``fn`` takes (empty for the usual ``fn()``)."""
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    cacheable = code is not None and not hasattr(func, "__wrapped__")
    if cacheable:
        plan = plans.get(code)
        if plan is not None:
            return plan
    plan = _introspect(fn)
    if cacheable:
        plans[code] = plan
    return plan


def _introspect(fn: Callable[..., Any]) -> Plan:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or a C callable: called with nothing
        return ()
    params = [
        p
        for p in sig.parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
    ]
    if not params:
        return ()
    target = getattr(fn, "__func__", fn)
    if not inspect.isroutine(target):
        target = type(target).__call__
    try:
        hints = typing.get_type_hints(target, include_extras=True)
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
    steps: Mapping[str, Any],
    previous: str | None,
) -> dict[str, Any]:
    """The keyword arguments of a step call (a ``StepContext`` stands for ``ctx``).

    ``steps`` holds every statement name of the workflow (a parameter named
    after one reads that step's result), ``previous`` the step that comes
    directly before this one, whose result the one other parameter gets.
    """
    kwargs: dict[str, Any] = {}
    loose = [p for p in plan if p.kind == _RESULT and p.name not in steps and not p.default]
    if len(loose) > 1:
        raise StepResultError(
            step,
            f"parameters {', '.join(repr(p.name) for p in loose)} name no step; name each "
            "after the step whose result it takes, or take ctx: gorch.StepContext",
        )
    for p in plan:
        if p.kind == _CTX:
            kwargs[p.name] = _CTX
            continue
        source = p.name if p.name in steps else previous if p in loose else None
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


def keep(results: dict[str, Any], step: str, value: Any) -> None:
    """Keep what ``step`` returned (its JSON form), or StepResultError; None drops it."""
    if value is None:
        results.pop(step, None)
        return
    try:
        plain = pydantic_core.to_jsonable_python(value)
        size = len(msgpack.packb(plain, use_bin_type=True))
    except Exception as e:
        raise StepResultError(
            step,
            f"its result ({type(value).__name__}) cannot be kept with the state: {e}. "
            "Return JSON-able data or a pydantic model (or None)",
        ) from e
    if size > MAX_RESULT_BYTES:
        raise StepResultError(
            step,
            f"its result is {size} bytes, over the limit of {MAX_RESULT_BYTES}: keep large "
            "data elsewhere (a field, a file, your database) and return a reference to it",
        )
    results[step] = plain
