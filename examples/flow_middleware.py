"""flow-orchestrator's middleware stack (logging, retry, timeout) around gorch steps.

In flow-orchestrator a middleware wraps a node's action, and a stack applies
several, the first one outermost::

    stack := workflow.NewMiddlewareStack()
    stack.Use(workflow.LoggingMiddleware())               // start, end, duration, error
    stack.Use(workflow.RetryMiddleware(3, 1*time.Second)) // 3 retries, 1 s apart
    stack.Use(workflow.TimeoutMiddleware(30*time.Second)) // each attempt bounded
    builder.AddNode("api-call").WithAction(stack.Apply(myAction))

so each attempt is bounded by the timeout, a timed-out attempt is retried,
and the log line covers all of it.

In gorch the same stack is:

* **Logging**: ``gorch.LoggingMiddleware``, given to the Engine, so it wraps
  every step (and resume, and handler call) of every instance; its records
  carry the context as ``gorch_*`` fields.
* **Timeout**: ``TimeoutMiddleware`` below, about thirty lines on
  ``gorch.Middleware``. Every step gets a default limit, and chosen steps a
  limit of their own. An attempt that ran longer fails with
  ``gorch.StepTimeout``, as ``Step(timeout=)`` does: the step's failure, its
  result dropped, its changes to the data not saved. A plain step cannot be
  interrupted safely, so it is failed when it returns late (flow-orchestrator
  cancels the action's context, then waits for the action to return too);
  an ``async def`` step under ``gorch.AsyncEngine`` is cancelled at the limit.
* **Retry**: a retry policy, ``default_retry = gorch.Retry(attempts=4,
  backoff=1, multiplier=1)`` (the first run and 3 retries, 1 s apart). It is
  not a loop around the call: each failed attempt is saved, and ``run_due``
  (a cron job, a worker) runs the next one when the backoff is over, in
  this process or another. A virtual clock (``gorch.clock.use_clock``) stands
  in for the wait here.
* ``Alert``, a middleware with an ``on_failed`` phase, hears of a run that
  failed for good once the failure is saved.

The workflow is a small API pipeline as a DAG::

    fetch-user ─┬─ send-analytics   (slow once: timed out, then retried)
                ├─ render-avatar    (always too slow: fails for good)
                └─ save-profile ─── notify-user   (save-profile: Step(timeout=1.0), its own)

Run it with ``.venv/bin/python examples/flow_middleware.py``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import gorch
from gorch import DAG, S, Step
from gorch.clock import use_clock
from gorch.hooks import CallNext

DEFAULT_LIMIT = 0.3
"""Seconds a step attempt may take, unless the middleware is told otherwise."""
SLOW = 0.6
"""How long the slow calls take: over the default limit."""


# --------------------------------------------------------------------------- the Timeout middleware


class TimeoutMiddleware(gorch.Middleware):
    """Fail every step attempt that takes longer than its limit, with ``gorch.StepTimeout``.

    ``default`` is every step's limit in seconds; ``limits`` gives chosen steps
    (by name) their own. A plain step runs to its end (Python cannot stop it
    safely) and fails if it was late; under the async API an ``async def``
    step is cancelled at its limit. The failure is the step's own, so its
    retry policy decides what comes next.

    A step with a ``Step(timeout=)`` of its own (``ctx.timeout``) is left to
    the core, which checks that limit right around the step.
    """

    def __init__(self, default: float, limits: Mapping[str, float] | None = None) -> None:
        self.default = default
        self.limits = dict(limits or {})

    def limit(self, step: str) -> float:
        return self.limits.get(step, self.default)

    def around_step(self, ctx: gorch.StepContext, call_next: CallNext) -> Any:
        if ctx.timeout is not None:
            return call_next()
        limit = self.limit(ctx.step)
        began = time.monotonic()
        out = call_next()
        took = time.monotonic() - began
        if took > limit:
            raise gorch.StepTimeout(ctx.step, limit, took)
        return out

    async def around_step_async(self, ctx: gorch.StepContext, call_next: CallNext) -> Any:
        if ctx.timeout is not None:
            return await call_next()
        limit = self.limit(ctx.step)
        began = time.monotonic()
        try:
            async with asyncio.timeout(limit) as scope:
                out = await call_next()
        except TimeoutError:
            if scope.expired():  # our limit, not a TimeoutError the step raised itself
                raise gorch.StepTimeout(ctx.step, limit) from None
            raise
        # A plain step under the async API ran inside call_next() without yielding
        # to the event loop, so nothing could cancel it: fail it if it was late.
        took = time.monotonic() - began
        if took > limit:
            raise gorch.StepTimeout(ctx.step, limit, took)
        return out


class Alert(gorch.Middleware):
    """Tell someone when a run has failed for good (after the failure is saved)."""

    def on_failed(self, ctx: gorch.ResumeContext, error: Exception) -> None:
        print(f"   ALERT: {ctx.workflow} {ctx.workflow_id!r} failed for good: {error}")


# --------------------------------------------------------------------------- the workflow


class ApiCall(gorch.Workflow):
    user_id: int
    user: dict[str, Any] = {}
    analytics_sent: bool = False
    profile_saved: bool = False
    notified: bool = False

    default_retry = gorch.Retry(attempts=4, backoff=1.0, multiplier=1.0)

    def definition(self) -> gorch.Section:
        return S(
            DAG(
                "api-call",
                Step("fetch-user", self.fetch_user),
                Step("send-analytics", self.send_analytics, after="fetch-user"),
                Step("render-avatar", self.render_avatar, after="fetch-user"),
                Step("save-profile", self.save_profile, after="fetch-user", timeout=1.0),
                Step("notify-user", self.notify_user, after="save-profile"),
            )
        )

    def fetch_user(self) -> dict[str, Any]:
        self.user = {"id": self.user_id, "name": "Ann"}
        return self.user

    def send_analytics(self, ctx: gorch.StepContext) -> None:
        if ctx.attempt == 1:
            time.sleep(SLOW)  # the analytics endpoint is slow this once
        self.analytics_sent = True

    def render_avatar(self) -> None:
        time.sleep(SLOW)  # always slower than the limit
        self.user["avatar"] = "ann.png"  # dropped with the failed attempt

    def save_profile(self) -> str:
        time.sleep(DEFAULT_LIMIT / 2 * 3)  # over the default limit, within its own
        self.profile_saved = True
        return f"profile-{self.user_id}"

    def notify_user(self, save_profile: str) -> None:
        self.notified = save_profile == f"profile-{self.user_id}"


class SlowAsync(gorch.Workflow):
    """One ``async def`` step that would take 5 s."""

    finished_call: bool = False

    def definition(self) -> gorch.Section:
        return S(Step("call-partner", self.call_partner))

    async def call_partner(self) -> None:
        await asyncio.sleep(5)
        self.finished_call = True


# --------------------------------------------------------------------------- the story


class VirtualClock:
    """What ``gorch.clock.use_clock`` reads: time moves only when told to."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def show(engine: gorch.Engine, wf_id: str) -> gorch.Snapshot:
    snap = engine.get(wf_id)
    print(f"   stored: status={snap.status.value}")
    for t in snap.threads:
        if t.nodes:
            print(f"   stored: DAG nodes: {', '.join(f'{n}={s}' for n, s in t.nodes.items())}")
        elif t.error:
            print(f"   stored: {t.cur_step}: attempts={t.attempts}, error={t.error}")
    return snap


def sync_stack(url: str) -> None:
    clock = VirtualClock()
    engine = gorch.Engine(
        url,
        workflows={"api-call": ApiCall},
        middleware=[
            gorch.LoggingMiddleware("gorch"),  # outermost: logs what the timeout decided
            TimeoutMiddleware(DEFAULT_LIMIT),
            Alert(),
        ],
    )
    with use_clock(clock):
        print("== the first run: two calls are too slow")
        engine.start("api-call", "user-7", {"user_id": 7})
        show(engine, "user-7")

        n = 0
        while engine.get("user-7").status.value == "retrying":
            n += 1
            clock.now += timedelta(seconds=1)
            print()
            print(f"== {n} s later: run_due runs the retries that are due")
            for r in engine.run_due():
                print(f"   run_due -> {r.id}: {r.action}, status={r.status}")
            show(engine, "user-7")

    d = engine.get("user-7").data
    print()
    print(
        f"== data: analytics_sent={d['analytics_sent']} profile_saved={d['profile_saved']} "
        f"notified={d['notified']} avatar={d['user'].get('avatar')}"
    )


async def async_stack(url: str) -> None:
    engine = gorch.AsyncEngine(
        url,
        workflows={"slow-async": SlowAsync},
        middleware=[TimeoutMiddleware(DEFAULT_LIMIT)],
    )
    began = time.monotonic()
    snap = await engine.start("slow-async", "partner-1")
    took = time.monotonic() - began
    print(f"-> {snap.status.value}: {snap.error}")
    print(f"   the 5 s call was cancelled at the limit: {took < 5}")
    print(f"   finished_call={snap.data['finished_call']}")


def main() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("   log %(levelname)-7s %(message)s"))
    logger = logging.getLogger("gorch")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    with tempfile.TemporaryDirectory() as tmp:
        sync_stack(f"sqlite:///{tmp}/gorch.db")
        logger.removeHandler(handler)

        print()
        print("== AsyncEngine: an async step is cancelled at the limit")
        asyncio.run(async_stack(f"sqlite:///{tmp}/gorch.db"))


if __name__ == "__main__":
    main()
