"""msgpack blobs: ``dumps(wf, state)`` and ``loads(blob, cls)``.

Layout: ``["gorch", FORMAT_VERSION, state, data]`` where ``state`` is a compact
array (see ``_pack_state``) and ``data`` is the workflow's pydantic JSON-mode
dump. Nothing in a blob is ever unpickled or evaluated: msgpack extension
types are refused, every state field is type-checked, and the data goes
through the class's validator (its ``model_validate``, when the class overrides it).

``dumps`` writes the data as the model re-validates it, so that
``dumps(*loads(b, Cls)) == b`` for every blob it wrote and "state unchanged"
can be checked by comparing bytes.
"""

from __future__ import annotations

import inspect
import json
import reprlib
from typing import Any, TypeVar

import msgpack
import pydantic
import pydantic_core

from gorch.errors import SerializationError, summarize_validation
from gorch.state import (
    EventRequest,
    EventStatus,
    NodeStatus,
    State,
    Thread,
    ThreadStatus,
    WaitEvent,
    WorkflowStatus,
)
from gorch.workflow import Workflow

MAGIC = "gorch"
FORMAT_VERSION = 1

#: The deepest nesting of maps and lists a blob's data may have (the data map is level 1).
#: pydantic serialises at most about 255 levels, so ``dumps`` never writes deeper data;
#: ``loads`` refuses it instead of letting Python's recursion limit decide.
MAX_DATA_DEPTH = 256

W = TypeVar("W", bound=Workflow)

_WF_STATUS = list(WorkflowStatus)
_TH_STATUS = list(ThreadStatus)
_EV_STATUS = list(EventStatus)
_ND_STATUS = list(NodeStatus)
_ND_CODE = {s: i for i, s in enumerate(_ND_STATUS)}
_WF_CODE = {s: i for i, s in enumerate(_WF_STATUS)}
_TH_CODE = {s: i for i, s in enumerate(_TH_STATUS)}
_EV_CODE = {s: i for i, s in enumerate(_EV_STATUS)}


_short = reprlib.Repr()
_short.maxlevel = 3
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6


def short_repr(value: Any) -> str:
    """A bounded repr for error messages: data from users may be huge or nested deep."""
    try:
        return _short.repr(value)
    except Exception:  # a deep model's own __repr__ recursing, or a broken __repr__
        return f"<{type(value).__name__} object>"


def canonical_data(wf: Workflow) -> dict[str, Any]:
    """The workflow's data as it will load back (JSON-mode dump of a re-validated copy)."""
    cls = type(wf)
    try:
        first = _dump(wf, warnings=False)
        again = _validate(cls, first)
        data = _dump(again)
        if _has_sets(cls):
            _sort_sets(again, data)
        return data
    except pydantic.ValidationError as e:
        errors = summarize_validation(e.errors(include_url=False, include_input=False))
        raise SerializationError(
            f"the data of {cls.__name__} {short_repr(wf)} would not load back: {errors}"
        ) from e
    except RecursionError as e:
        raise SerializationError(
            f"the data of {cls.__name__} is nested too deep to serialise "
            f"(at most {MAX_DATA_DEPTH} levels)"
        ) from e
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as e:
        hint = ""
        if "utf-8" in str(e).lower():
            hint = (
                "; bytes are written as UTF-8 text: for binary data set "
                "model_config = ConfigDict(ser_json_bytes='base64', val_json_bytes='base64')"
            )
        raise SerializationError(
            f"the data of {cls.__name__} cannot be serialised: {e}{hint}"
        ) from e


def _dump(model: pydantic.BaseModel, warnings: bool = True) -> dict[str, Any]:
    """``model.model_dump`` in the codec's mode: JSON, round trip, by alias.

    Through the class's serializer itself when the class keeps pydantic's
    ``model_dump`` (the wrapper costs more than a small model's dump, and this runs
    at every save); through its own ``model_dump`` when it overrides it.
    """
    cls = type(model)
    if (_kept.get(cls) or _kept_of(cls))[0]:
        out = cls.__pydantic_serializer__.to_python(
            model, mode="json", round_trip=True, by_alias=True, warnings=warnings
        )
    else:
        out = model.model_dump(mode="json", round_trip=True, by_alias=True, warnings=warnings)
    return out  # type: ignore[no-any-return]


def _validate(cls: type[W], data: Any) -> W:
    """``cls.model_validate(data)``, through the class's validator itself unless the
    class overrides ``model_validate`` (one may migrate old data there)."""
    if (_kept.get(cls) or _kept_of(cls))[1]:
        return cls.__pydantic_validator__.validate_python(data)  # type: ignore[no-any-return]
    return cls.model_validate(data)


_kept: dict[type, tuple[bool, bool]] = {}


def _kept_of(cls: type[pydantic.BaseModel]) -> tuple[bool, bool]:
    """Whether ``cls`` leaves pydantic's ``model_dump`` and ``model_validate`` as they are
    (remembered per class)."""

    def keeps(name: str) -> bool:
        return inspect.getattr_static(cls, name) is inspect.getattr_static(pydantic.BaseModel, name)

    kept = _kept[cls] = (keeps("model_dump"), keeps("model_validate"))
    return kept


_set_classes: dict[type, bool] = {}


def _has_sets(cls: type[pydantic.BaseModel]) -> bool:
    """Whether the model has a set-typed field anywhere (cached per class)."""
    found = _set_classes.get(cls)
    if found is None:
        try:
            schema = json.dumps(cls.model_json_schema(mode="serialization"))
        except Exception:  # a type without a JSON schema: look for sets in every dump
            found = True
        else:
            found = '"uniqueItems": true' in schema
        _set_classes[cls] = found
    return found


def _set_key(item: Any) -> bytes:
    return msgpack.packb(item, use_bin_type=True)  # type: ignore[no-any-return]


def _sort_sets(value: Any, dumped: Any) -> Any:
    """Sort, in place, the dumped lists of set values: hash order differs between processes."""
    if isinstance(value, (set, frozenset)) and type(dumped) is list:
        dumped.sort(key=_set_key)
    elif isinstance(value, pydantic.BaseModel) and type(dumped) is dict:
        for name, field in type(value).model_fields.items():
            key = field.alias or name
            if key in dumped:
                _sort_sets(getattr(value, name), dumped[key])
    elif isinstance(value, dict) and type(dumped) is dict:
        for v, dv in zip(value.values(), dumped.values(), strict=False):
            _sort_sets(v, dv)
    elif isinstance(value, (list, tuple)) and type(dumped) is list:
        for v, dv in zip(value, dumped, strict=False):
            _sort_sets(v, dv)
    return dumped


def _pack_thread_extra(t: Thread) -> list[Any]:
    """Fields most threads leave at their defaults: written only when set."""
    if not t.parent and not t.nodes and not t.node_errors:
        return []
    return [t.parent, {k: _ND_CODE[v] for k, v in t.nodes.items()}, dict(t.node_errors)]


def _pack_state(state: State) -> list[Any]:
    packed = [
        state.id,
        state.workflow,
        _WF_CODE[state.status],
        state.pc,
        [
            [
                t.id,
                t.name,
                _TH_CODE[t.status],
                t.cur_step,
                t.pc,
                t.error,
                t.attempts,
                t.case,
                [
                    [
                        we.req.name,
                        we.req.pc,
                        we.req.setup_data,
                        _EV_CODE[we.status],
                        we.handled,
                        we.error,
                        we.select,
                    ]
                    for we in t.wait_events
                ],
                *_pack_thread_extra(t),
            ]
            for t in state.threads
        ],
    ]
    if state.meta or state.results:
        packed.append(dict(state.meta))
    if state.results:
        packed.append(dict(state.results))
    return packed


def dumps(wf: Workflow, state: State) -> bytes:
    """Serialise a workflow and its state to msgpack bytes."""
    data = canonical_data(wf)
    try:
        return msgpack.packb([MAGIC, FORMAT_VERSION, _pack_state(state), data], use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError, KeyError) as e:
        raise SerializationError(f"cannot serialise workflow {state.id!r}: {e}") from e


def _reject_ext(code: int, data: bytes) -> Any:
    raise SerializationError(f"msgpack extension type {code} is not allowed in a gorch blob")


class _Bad(Exception):
    pass


def _s(v: Any, what: str) -> str:
    if type(v) is not str:
        raise _Bad(f"{what} must be a str, got {type(v).__name__}")
    return v


def _i(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:
        raise _Bad(f"{what} must be a non-negative int, got {v!r}")
    return v


def _arr(v: Any, n: int | None, what: str) -> list[Any]:
    if type(v) is not list or (n is not None and len(v) != n):
        size = f" of {n}" if n is not None else ""
        raise _Bad(f"{what} must be an array{size}, got {type(v).__name__}")
    return v


def _str_map(v: Any, what: str, str_values: bool = True) -> dict[str, Any]:
    if type(v) is not dict or not all(type(k) is str for k in v):
        raise _Bad(f"{what} must be a map with str keys, got {v!r}")
    if str_values and not all(type(x) is str for x in v.values()):
        raise _Bad(f"{what} must map str to str, got {v!r}")
    return v


def _enum(v: Any, values: list[Any], what: str) -> Any:
    if type(v) is not int or not 0 <= v < len(values):
        raise _Bad(f"{what} has an unknown code {v!r}")
    return values[v]


def _unpack_state(raw: Any) -> State:
    items = _arr(raw, None, "state")
    if len(items) not in (5, 6, 7):
        raise _Bad(f"state must have 5 to 7 items, got {len(items)}")
    sid, wname, status, pc, threads = items[:5]
    state = State(
        id=_s(sid, "state.id"),
        workflow=_s(wname, "state.workflow"),
        status=_enum(status, _WF_STATUS, "state.status"),
        pc=_i(pc, "state.pc"),
    )
    if len(items) >= 6:
        state.meta = _str_map(items[5], "state.meta")
        if len(items) == 7:
            results = _str_map(items[6], "state.results", str_values=False)
            if not results:
                raise _Bad("state.results is written only when not empty")
            _check_plain(results)
            if None in results.values():
                raise _Bad("state.results never holds None")
            state.results = results
        elif not state.meta:
            raise _Bad("state.meta is written only when not empty")
    for traw in _arr(threads, None, "state.threads"):
        titems = _arr(traw, None, "thread")
        if len(titems) not in (9, 12):
            raise _Bad(f"a thread must have 9 or 12 items, got {len(titems)}")
        tid, name, tstatus, cur, tpc, err, attempts, case, events = titems[:9]
        t = Thread(
            id=_s(tid, "thread.id"),
            name=_s(name, "thread.name"),
            status=_enum(tstatus, _TH_STATUS, "thread.status"),
            cur_step=_s(cur, "thread.cur_step"),
            pc=_i(tpc, "thread.pc"),
            error=_s(err, "thread.error"),
            attempts=_i(attempts, "thread.attempts"),
            case=_s(case, "thread.case"),
        )
        if len(titems) == 12:
            t.parent = _s(titems[9], "thread.parent")
            t.nodes = {
                k: _enum(v, _ND_STATUS, "thread.nodes")
                for k, v in _str_map(titems[10], "thread.nodes", str_values=False).items()
            }
            t.node_errors = _str_map(titems[11], "thread.node_errors")
            if not _pack_thread_extra(t):
                raise _Bad("thread extras are written only when set")
        for eraw in _arr(events, None, "thread.wait_events"):
            ename, epc, setup_data, estatus, handled, eerr, select = _arr(eraw, 7, "wait event")
            if setup_data is not None:
                _s(setup_data, "event.setup_data")
            if type(handled) is not bool:
                raise _Bad(f"event.handled must be a bool, got {handled!r}")
            t.wait_events.append(
                WaitEvent(
                    req=EventRequest(
                        workflow_id=state.id,
                        thread_id=t.id,
                        name=_s(ename, "event.name"),
                        pc=_i(epc, "event.pc"),
                        setup_data=setup_data,
                    ),
                    status=_enum(estatus, _EV_STATUS, "event.status"),
                    handled=handled,
                    error=_s(eerr, "event.error"),
                    select=_s(select, "event.select"),
                )
            )
        state.threads.append(t)
    return state


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _check_plain(data: dict[str, Any]) -> None:
    """Refuse data holding what a JSON-mode dump never writes, or nested too deep.

    Iterative, so that no blob can reach Python's recursion limit.
    """
    scalars = _SCALARS
    todo: list[tuple[Any, int]] = [(data, 1)]
    pop, push = todo.pop, todo.append
    while todo:
        value, depth = pop()
        if depth > MAX_DATA_DEPTH:
            raise _Bad(f"the workflow data is nested deeper than {MAX_DATA_DEPTH} levels")
        if type(value) is dict:
            for k, v in value.items():
                if type(k) is not str:
                    raise _Bad("the workflow data holds a map key that is not a str")
                if type(v) in scalars:
                    continue
                push((v, depth + 1))
        elif type(value) is list:
            for v in value:
                if type(v) not in scalars:
                    push((v, depth + 1))
        elif type(value) not in scalars:
            raise _Bad("the workflow data holds a non-JSON value")


def loads(blob: bytes, cls: type[W]) -> tuple[W, State]:
    """Load a blob written by :func:`dumps`; raise :class:`SerializationError` otherwise."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SerializationError(f"a gorch blob is bytes, got {type(blob).__name__}")
    if not blob:
        raise SerializationError("empty blob: nothing to load")
    try:
        obj = msgpack.unpackb(
            blob, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True
        )
    except SerializationError:
        raise
    except msgpack.StackError:
        raise SerializationError(
            f"corrupt gorch blob: nested deeper than msgpack reads "
            f"(gorch data has at most {MAX_DATA_DEPTH} levels)"
        ) from None
    except Exception as e:  # msgpack's own errors: truncated, extra data, bad format
        raise SerializationError(f"not a gorch blob (corrupt msgpack: {e})") from e
    if type(obj) is not list or len(obj) != 4 or obj[0] != MAGIC:
        raise SerializationError("not a gorch blob (missing the 'gorch' header)")
    version = obj[1]
    if type(version) is not int or version < 1:
        raise SerializationError(f"not a gorch blob (bad format version {version!r})")
    if version > FORMAT_VERSION:
        raise SerializationError(
            f"the blob has format version {version}, written by a newer gorch; "
            f"this gorch reads format version {FORMAT_VERSION}: upgrade gorch"
        )
    try:
        state = _unpack_state(obj[2])
    except _Bad as e:
        raise SerializationError(f"corrupt gorch blob: {e}") from None
    except ValueError as e:  # wrong number of fields to unpack
        raise SerializationError(f"corrupt gorch blob: {e}") from None
    data = obj[3]
    if type(data) is not dict:
        raise SerializationError("corrupt gorch blob: the workflow data is not a map")
    try:
        _check_plain(data)
    except _Bad as e:
        raise SerializationError(f"corrupt gorch blob: {e}") from None
    try:
        wf = _validate(cls, data)
    except pydantic.ValidationError as e:
        errors = summarize_validation(e.errors(include_url=False, include_input=False))
        raise SerializationError(
            f"the blob's data does not validate as {cls.__name__}: {errors}"
        ) from e
    except Exception as e:  # a validator of the class raising something else
        raise SerializationError(
            f"the blob's data does not load as {cls.__name__}: a validator raised "
            f"{type(e).__name__}: {short_repr(e)}"
        ) from e
    return wf, state


# --------------------------------------------------------------------------- changes of data

#: One change found by :func:`diff_data`: (path of keys, "set" | "del" | "add", value).
Change = tuple[tuple[str, ...], str, Any]


def diff_data(base: Any, after: Any, path: tuple[str, ...] = ()) -> list[Change]:
    """The changes that turn JSON-mode data ``base`` into ``after``.

    Maps are compared key by key; a list that only grew at its end is an
    ``add`` of the new items (so two branches appending to one list both keep
    their items); anything else that differs is a ``set`` of the new value.
    """
    if type(base) is dict and type(after) is dict:
        out: list[Change] = []
        for k, v in after.items():
            if k not in base:
                out.append(((*path, k), "set", v))
            elif base[k] != v:
                out.extend(diff_data(base[k], v, (*path, k)))
        out.extend(((*path, k), "del", None) for k in base if k not in after)
        return out
    if base == after and type(base) is type(after):
        return []
    if type(base) is list and type(after) is list and after[: len(base)] == base:
        return [(path, "add", after[len(base) :])]
    return [(path, "set", after)]


def apply_changes(data: dict[str, Any], changes: list[Change]) -> set[str]:
    """Apply :func:`diff_data` changes to ``data`` in place; return the top-level keys touched.

    Where ``data`` no longer has the shape a change was made against (another
    change replaced a map with a value), the change's whole top-level key is
    not merged deeper: the value there is set.
    """
    touched: set[str] = set()
    for path, op, value in changes:
        touched.add(path[0])
        parent: Any = data
        for k in path[:-1]:
            nxt = parent.get(k) if type(parent) is dict else None
            if type(nxt) is not dict:
                nxt = parent[k] = {}
            parent = nxt
        key = path[-1]
        if op == "del":
            parent.pop(key, None)
        elif op == "add" and type(parent.get(key)) is list:
            parent[key] = [*parent[key], *value]
        else:
            parent[key] = value
    return touched
