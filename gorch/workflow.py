"""``Workflow``, the pydantic base class of user workflows, and ``WaitGroup``."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import pydantic

from gorch.retry import Retry
from gorch.statements import Section, WaitFor

if TYPE_CHECKING:
    from gorch.hooks import EventContext, StepContext
    from gorch.state import EventRequest

#: The lifecycle hooks a workflow class may override (see :class:`Workflow`).
STEP_HOOKS = ("on_step_start", "on_step_end", "on_step_error")


class Workflow(pydantic.BaseModel):
    """Base class of workflows: pydantic fields hold the data, ``definition()`` the logic.

    ``definition()`` is called again whenever the interpreter needs a value
    computed from current data (a bool condition, a Timeout, a Select's cases),
    so it must be cheap and free of side effects. Step functions and handlers
    may come from an earlier build within one call: read data through ``self``
    when they run, never from variables captured while ``definition()`` ran.

    ``start_input`` names the fields a caller outside the process may set when
    it starts an instance (``POST /workflows/{name}`` of :mod:`gorch.http`);
    every other field is internal state. Nothing is declared by default, so an
    HTTP start takes no data at all until the workflow says which fields it may.
    ``Engine.start(data=...)`` from Python is trusted and takes any field.
    """

    start_input: ClassVar[tuple[str, ...]] = ()
    """Names of the fields an untrusted start (HTTP) may set, e.g. ``("item", "qty")``."""

    default_retry: ClassVar[Retry | None] = None
    """The :class:`gorch.Retry` of every step that sets none (``Step(..., retry=)`` wins)."""

    __gorch_plain_fields__: ClassVar[frozenset[str]] = frozenset()
    """Fields set as pydantic sets them with no validation: straight into ``__dict__``."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        names = cls.start_input
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise TypeError(
                f"{cls.__name__}.start_input must be a tuple of field names, got {names!r}"
            )
        unknown = [n for n in names if n not in cls.model_fields]
        if unknown:
            raise TypeError(
                f"{cls.__name__}.start_input names {unknown!r}, which are not fields of "
                f"{cls.__name__}; its fields are {sorted(cls.model_fields)!r}"
            )
        cls.start_input = tuple(names)
        config = cls.model_config
        if config.get("validate_assignment") or config.get("frozen"):
            cls.__gorch_plain_fields__ = frozenset()
        else:
            cls.__gorch_plain_fields__ = frozenset(
                name
                for name, info in cls.model_fields.items()
                if not info.frozen and not isinstance(getattr(cls, name, None), property)
            )

    def __setattr__(self, name: str, value: Any) -> None:
        # Steps set fields all the time: what pydantic does for a plain field
        # (no validation, no freezing), without its two calls per assignment.
        if name in self.__gorch_plain_fields__:
            self.__dict__[name] = value
            self.__pydantic_fields_set__.add(name)
        else:
            super().__setattr__(name, value)

    @classmethod
    def start_input_model(cls) -> type[pydantic.BaseModel]:
        """A model of the declared ``start_input`` fields alone; any other field is refused.

        Built once per class from the fields themselves (types, defaults,
        constraints, aliases), so the declaration cannot drift from the model.
        """
        model = _START_MODELS.get(cls)
        if model is None:
            config = {k: v for k, v in cls.model_config.items() if k != "title"}
            config["extra"] = "forbid"
            fields: dict[str, Any] = {
                name: (cls.model_fields[name].annotation, copy.copy(cls.model_fields[name]))
                for name in cls.start_input
            }
            model = pydantic.create_model(
                f"{cls.__name__}Input",
                __config__=pydantic.ConfigDict(**config),  # type: ignore[typeddict-item]
                __doc__=f"What a caller may set when it starts an instance of {cls.__name__}.",
                __module__=cls.__module__,
                **fields,
            )
            _START_MODELS[cls] = model
        return model

    def definition(self) -> Section:
        raise NotImplementedError(f"{type(self).__name__} must implement definition()")

    # Lifecycle hooks: no-ops unless overridden (and then only they cost anything).
    # An exception raised by a step hook is that step's failure (StepFailed); by
    # ``on_event``, the handler's (HandlerFailed, state unchanged). ``on_waiting``
    # and ``on_finish`` run after the final checkpoint: what they raise is logged.

    def on_step_start(self, ctx: StepContext) -> None:
        """Before a step (or a WaitFor's handler) runs."""

    def on_step_end(self, ctx: StepContext) -> None:
        """After a step returned."""

    def on_step_error(self, ctx: StepContext, error: Exception) -> None:
        """After a step (or a hook around it) raised ``error``."""

    def on_event(self, ctx: EventContext, output: Any) -> None:
        """After an event's handler returned ``output``."""

    def on_waiting(self, awaited: list[EventRequest]) -> None:
        """At the end of a resume that left the workflow waiting for ``awaited``."""

    def on_finish(self) -> None:
        """At the end of the resume in which the workflow finished."""

    def on_start(self) -> None:
        """Before anything of an instance runs, in its first resume (any API).

        What it raises propagates with nothing changed, and the next resume
        calls it again. A resume that dies before its first save also calls
        it again: keep it idempotent.
        """

    def on_failed(self, error: Exception) -> None:
        """At the end of a resume that failed for good (the counterpart of ``on_finish``).

        ``error`` is the :class:`gorch.StepFailed` of a step with no attempt
        left under its :class:`gorch.Retry` (the first failure, without one),
        or a :class:`gorch.DAGFailed`. The state is saved before; what the hook
        raises is logged.
        """


_START_MODELS: dict[type[Workflow], type[pydantic.BaseModel]] = {}
"""``Workflow.start_input_model`` per class (classes live as long as the process)."""


class WaitGroup(pydantic.BaseModel):
    """Counts running threads; ``wait(name)`` blocks until the count is back to zero.

    Keep it as a field of the workflow (``wg: gorch.WaitGroup = WaitGroup()``) and
    mutate it in place with ``add`` / ``done``: the ``WaitFor`` from ``wait``
    reads this instance when its condition is checked.
    """

    count: int = 0

    def add(self, n: int = 1) -> None:
        """Add ``n`` (may be negative) to the counter."""
        if self.count + n < 0:
            raise ValueError(f"WaitGroup counter would go negative ({self.count} + {n})")
        self.count += n

    def done(self) -> None:
        """One thread finished."""
        self.add(-1)

    def wait(self, name: str) -> WaitFor:
        """A statement that blocks until the counter is zero."""
        return WaitFor(name, self._is_zero)

    def _is_zero(self) -> bool:
        return self.count == 0
