"""No silent skip, ever (issue 12 item 1).

The sync ``resume`` / ``handle_event`` refuse a workflow that has an async step,
handler, hook, condition or middleware with ``DefinitionError`` naming it and the
async API, before anything runs or changes (the blob is byte-identical and no
checkpoint is called). A plain callable that returns an awaitable is refused
where it is called, and its step is not recorded as done.
"""

from __future__ import annotations

import functools
import gc
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pydantic
import pytest
from pydantic import Field

import gorch
from gorch import DAG, Case, For, Go, If, On, Parallel, S, Select, Step, Switch, WaitFor

ASYNC_API = r"aresume|ahandle_event|AsyncEngine"


@pytest.fixture(autouse=True)
def _no_never_awaited_warning() -> Iterator[None]:
    """A refused coroutine is closed: no 'was never awaited' warning, ever."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
        gc.collect()
    assert not [w for w in seen if "never awaited" in str(w.message)], [
        str(w.message) for w in seen
    ]


class Base(gorch.Workflow):
    log: list[str] = Field(default_factory=list)
    ready: bool = False

    def first(self) -> None:
        self.log.append("first")

    async def later(self) -> None:
        self.log.append("later")

    def sync_later(self) -> None:
        self.log.append("sync later")


def refuses(wf: gorch.Workflow, state: gorch.State | None = None, *names: str) -> str:
    """Assert the sync resume refuses ``wf`` before anything changes; return the message."""
    state = state or gorch.new_state("wf-1", type(wf).__name__)
    before = gorch.dumps(wf, state)
    saves: list[gorch.CheckpointKind] = []
    with pytest.raises(gorch.DefinitionError, match=ASYNC_API) as info:
        gorch.resume(wf, state, saves.append)
    assert saves == []
    assert gorch.dumps(wf, state) == before
    for name in names:
        assert name in str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------- steps


class AsyncAfterSync(Base):
    def definition(self) -> gorch.Section:
        return S(Step("first", self.first), Step("later", self.later))


def test_an_async_step_is_refused_before_the_steps_before_it_run() -> None:
    wf = AsyncAfterSync()
    refuses(wf, None, "'later'", "later")
    assert wf.log == []


def make(body: Callable[[Base], gorch.Stmt]) -> Base:
    cls = type(
        "Flow", (Base,), {"definition": lambda self: S(Step("first", self.first), body(self))}
    )
    return cls()  # type: ignore[no-any-return]


NESTED: dict[str, Callable[[Base], gorch.Stmt]] = {
    "in a branch not taken": lambda w: If(False, Step("later", w.later)),
    "in a Go": lambda w: Go("bg", Step("later", w.later)),
    "in a Parallel": lambda w: Parallel("p", Step("a", w.first), Step("later", w.later)),
    "behind |": lambda w: Step("a", w.sync_later) | Step("later", w.later),
    "in a DAG node": lambda w: DAG(
        "d", Step("a", w.sync_later), Step("later", w.later, after=["a"])
    ),
    "in a loop": lambda w: For("loop", lambda: not w.ready, Step("later", w.later)),
    "in a Select's case body": lambda w: Select("s", On("go", Step("later", w.later))),
}


@pytest.mark.parametrize("where", NESTED)
def test_an_async_step_anywhere_in_the_definition_is_refused(where: str) -> None:
    wf = make(NESTED[where])
    refuses(wf, None, "later")
    assert wf.log == []


async def free_async(x: int = 0) -> None:
    return None


class AsyncCallable:
    async def __call__(self) -> None:
        return None


def wrapping(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        return await fn(*args)

    return wrapper


@wrapping
async def decorated() -> None:
    return None


CALLABLES: dict[str, Callable[[], Any]] = {
    "functools.partial": functools.partial(free_async, 1),
    "partial of a partial": functools.partial(functools.partial(free_async), 2),
    "object with async __call__": AsyncCallable(),
    "decorated": decorated,
    "lambda-free async function": free_async,
}


@pytest.mark.parametrize("kind", CALLABLES)
def test_async_callables_of_every_shape_are_refused(kind: str) -> None:
    fn = CALLABLES[kind]
    wf = make(lambda w: Step("later", fn))
    refuses(wf, None, "'later'")
    assert wf.log == []


# ------------------------------------------------------------------ conditions, ids, WaitFor


class AsyncCond(Base):
    async def is_ready(self) -> bool:
        return True

    async def thread_id(self) -> str:
        return "t"


CONDITIONS: dict[str, Callable[[AsyncCond], gorch.Stmt]] = {
    "If": lambda w: If(w.is_ready, Step("x", w.first)),
    "ElseIf": lambda w: If(False, Step("x", w.first)).ElseIf(w.is_ready, Step("y", w.first)),
    "Switch": lambda w: Switch(Case(w.is_ready, Step("x", w.first))),
    "For": lambda w: For("loop", w.is_ready, Step("x", w.first)),
    "WaitFor": lambda w: WaitFor("wait", w.is_ready),
    "WaitFor handler": lambda w: WaitFor("wait", True, w.later),
    "Go id": lambda w: Go("bg", Step("x", w.first), id=w.thread_id),
}


@pytest.mark.parametrize("where", CONDITIONS)
def test_async_conditions_ids_and_waitfor_handlers_are_refused(where: str) -> None:
    cls = type(
        "Flow",
        (AsyncCond,),
        {"definition": lambda self: S(Step("first", self.first), CONDITIONS[where](self))},
    )
    wf = cls()
    msg = refuses(wf)
    assert "async" in msg
    assert wf.log == []


# --------------------------------------------------------------------------- handlers


class Decision(pydantic.BaseModel):
    ok: bool


class AsyncHandle(gorch.Handler):
    async def handle(self, req: gorch.EventRequest, input: Any) -> Any:
        return "handled"


class AsyncSetup(gorch.Handler):
    async def setup(self, req: gorch.EventRequest) -> str | None:
        return None


class AsyncTeardown(gorch.Handler):
    async def teardown(self, req: gorch.EventRequest, handled: bool) -> None:
        return None


class Handlers(Base):
    kind: str = "function"

    async def on_decide(self, d: Decision) -> str:
        self.log.append("decided")
        return "ok"

    def definition(self) -> gorch.Section:
        handler: Any = {
            "function": self.on_decide,
            "handle": AsyncHandle(),
            "setup": AsyncSetup(),
            "teardown": AsyncTeardown(),
        }[self.kind]
        return S(Step("first", self.first), Select("wait", On("decide", handler), On("other")))


@pytest.mark.parametrize("kind", ["function", "handle", "setup", "teardown"])
def test_async_handlers_are_refused_by_resume_and_handle_event(kind: str) -> None:
    wf = Handlers(kind=kind)
    msg = refuses(wf, None, "'decide'")
    assert wf.log == []
    # A state already waiting in the Select (as saved by an earlier deploy): still refused.
    state = gorch.new_state("wf-1", "handlers")
    state.threads[0].status = gorch.ThreadStatus.WAITING_EVENT
    state.threads[0].cur_step = "wait"
    state.pc = 1
    state.status = gorch.WorkflowStatus.WAITING
    state.threads[0].wait_events = [
        gorch.WaitEvent(gorch.EventRequest("wf-1", gorch.MAIN_THREAD, e, 1), select="wait")
        for e in ("decide", "other")
    ]
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError, match=ASYNC_API) as info:
        gorch.handle_event(wf, state, "decide", {"ok": True})
    assert "decide" in str(info.value) and msg
    assert gorch.dumps(wf, state) == before
    assert wf.log == []


# ------------------------------------------------------------ hooks, middleware, checkpoints


HOOKS = ["on_step_start", "on_step_end", "on_step_error", "on_event", "on_waiting", "on_finish"]


@pytest.mark.parametrize("hook", HOOKS)
def test_async_lifecycle_hooks_are_refused(hook: str) -> None:
    async def hook_fn(self: Any, *args: Any) -> None:
        return None

    cls = type(
        "Hooked",
        (Base,),
        {hook: hook_fn, "definition": lambda self: S(Step("first", self.first))},
    )
    wf = cls()
    refuses(wf, None, hook)
    assert wf.log == []


class AsyncStepMiddleware(gorch.Middleware):
    async def around_step(self, ctx: gorch.StepContext, call_next: Any) -> Any:
        return await call_next()


class AsyncEventMiddleware:
    async def around_event(self, ctx: gorch.EventContext, call_next: Any) -> Any:
        return await call_next()


class AsyncResumeMiddleware(gorch.Middleware):
    async def around_resume(self, ctx: gorch.ResumeContext, call_next: Any) -> Any:
        return await call_next()


@pytest.mark.parametrize(
    "middleware", [AsyncStepMiddleware(), AsyncEventMiddleware(), AsyncResumeMiddleware()]
)
def test_async_middleware_is_refused_by_resume_and_handle_event(middleware: object) -> None:
    wf = make(lambda w: Select("wait", On("go")))
    state = gorch.new_state("wf-1", "flow")
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError, match=ASYNC_API) as info:
        gorch.resume(wf, state, middleware=[middleware])
    assert type(middleware).__name__ in str(info.value)
    assert gorch.dumps(wf, state) == before and wf.log == []
    gorch.resume(wf, state)
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError, match=ASYNC_API):
        gorch.handle_event(wf, state, "go", middleware=[middleware])
    assert gorch.dumps(wf, state) == before


def test_an_async_checkpoint_is_refused_before_anything_runs() -> None:
    wf = make(lambda w: Step("second", w.sync_later))
    state = gorch.new_state("wf-1", "flow")
    before = gorch.dumps(wf, state)

    async def save(kind: gorch.CheckpointKind) -> None:
        return None

    with pytest.raises(gorch.DefinitionError, match=ASYNC_API):
        gorch.resume(wf, state, save)
    assert gorch.dumps(wf, state) == before and wf.log == []


def test_an_async_definition_is_refused() -> None:
    class AsyncDefinition(Base):
        async def definition(self) -> gorch.Section:  # type: ignore[override]
            return S()

    with pytest.raises(gorch.DefinitionError, match="async"):
        gorch.resume(AsyncDefinition(), gorch.new_state("wf-1", "x"))


# ------------------------------------------------------------ awaitables from plain callables


class ReturnsCoroutine(Base):
    def definition(self) -> gorch.Section:
        return S(
            Step("first", self.first),
            Step("sneaky", lambda: self.later()),
            Step("never", self.sync_later),
        )


def test_a_plain_step_returning_a_coroutine_is_not_recorded_as_done() -> None:
    wf = ReturnsCoroutine()
    state = gorch.new_state("wf-1", "x")
    saves: list[gorch.CheckpointKind] = []
    with pytest.raises(gorch.DefinitionError, match=ASYNC_API) as info:
        gorch.resume(wf, state, saves.append)
    assert "'sneaky'" in str(info.value) and "awaitable" in str(info.value)
    t = state.threads[0]
    assert (t.cur_step, t.status, t.attempts, t.error) == (
        "sneaky",
        gorch.ThreadStatus.EXECUTING,
        0,
        "",
    )
    assert wf.log == ["first"]  # the coroutine's body never ran; the step after it neither
    assert saves == [gorch.CheckpointKind.AFTER_STEP]  # only the step before it was saved


class DataChoosesAsync(Base):
    """Same shape for every instance; the function of 'work' depends on the data."""

    use_async: bool = False

    def definition(self) -> gorch.Section:
        return S(
            Step("first", self.first),
            Step("work", self.later if self.use_async else self.sync_later),
        )


def test_an_async_step_that_only_some_data_chooses_is_refused_where_it_runs() -> None:
    wf = DataChoosesAsync()
    assert gorch.resume(wf, gorch.new_state("a", "x")) is gorch.WorkflowStatus.FINISHED
    wf = DataChoosesAsync(use_async=True)
    state = gorch.new_state("b", "x")
    with pytest.raises(gorch.DefinitionError, match=ASYNC_API):
        gorch.resume(wf, state)
    assert state.threads[0].cur_step == "work"
    assert state.threads[0].status is gorch.ThreadStatus.EXECUTING
    assert "later" not in wf.log


class CoroutineHandler(Base):
    def definition(self) -> gorch.Section:
        return S(Select("wait", On("go", lambda: self.later())))


def test_a_plain_handler_returning_a_coroutine_changes_nothing() -> None:
    wf = CoroutineHandler()
    state = gorch.new_state("wf-1", "x")
    gorch.resume(wf, state)
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError, match=ASYNC_API) as info:
        gorch.handle_event(wf, state, "go")
    assert "'go'" in str(info.value)
    assert gorch.dumps(wf, state) == before


def test_a_plain_condition_returning_a_coroutine_is_refused() -> None:
    class Cond(Base):
        async def check(self) -> bool:
            return False

        def definition(self) -> gorch.Section:
            return S(If(lambda: self.check(), Step("x", self.first)))

    wf = Cond()
    state = gorch.new_state("wf-1", "x")
    before = gorch.dumps(wf, state)
    with pytest.raises(gorch.DefinitionError, match=ASYNC_API):
        gorch.resume(wf, state)
    assert gorch.dumps(wf, state) == before and wf.log == []


# --------------------------------------------------------------------------- what still works


def test_sync_callables_of_every_shape_still_run() -> None:
    class Callable_:
        def __call__(self) -> None:
            calls.append("object")

    calls: list[str] = []

    def plain(tag: str) -> None:
        calls.append(tag)

    @functools.wraps(plain)
    def deco() -> None:
        plain("decorated")

    class Flow(Base):
        def definition(self) -> gorch.Section:
            return S(
                Step("partial", functools.partial(plain, "partial")),
                Step("object", Callable_()),
                Step("decorated", deco),
                Step("builtin", calls.clear),
                Step("after", functools.partial(plain, "after")),
            )

    assert gorch.resume(Flow(), gorch.new_state("wf-1", "x")) is gorch.WorkflowStatus.FINISHED
    assert calls == ["after"]
