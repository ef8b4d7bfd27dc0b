"""``gorch run-due`` and ``gorch worker``: running the work that is due."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from types import FrameType

import click

from gorch.cli.base import (
    CLIError,
    Settings,
    _emit,
    _engine,
    _progress,
    _shared_options,
    _stamp,
    cli,
)
from gorch.engine import DueResult

# --------------------------------------------------------------------------- running due work


def _result_line(r: DueResult) -> str:
    if r.outcome == "skipped":
        return f"{r.id}: skipped (taken over by another runner)"
    fired = f" fired {r.fired}" if r.fired else ""
    err = f" ERROR {r.error}" if r.error else ""
    return f"{r.id}: {r.action}{fired} -> {r.status or '?'}{err}"


def _counts(results: Sequence[DueResult]) -> dict[str, int]:
    return {
        outcome: sum(r.outcome == outcome for r in results)
        for outcome in ("processed", "skipped", "failed")
    }


def _log_to_stderr() -> None:
    """One line per warning on stderr (store errors, failed instances), no tracebacks."""
    logger = logging.getLogger("gorch")
    if not logger.handlers:
        formatter = logging.Formatter(
            "%(asctime)sZ gorch %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


@cli.command(
    "run-due",
    epilog="Exit status 1 if any instance failed or the store is unavailable.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    metavar="N",
    help="process at most N due instances (default 100); the rest wait for the next run",
)
@click.option("--all", "drain", is_flag=True, help="drain everything due now (each instance once)")
@_shared_options
@click.pass_obj
def run_due(s: Settings, limit: int | None, drain: bool) -> int:
    """Fire due timers, retries and pending resumes once, and report each instance:
    processed, skipped (taken over by another runner) or failed."""
    if drain and limit is not None:
        raise CLIError("--limit and --all exclude each other")
    most = None if drain else (100 if limit is None else limit)
    _log_to_stderr()
    engine = _engine(s)
    between: list[datetime] = []  # when each instance was done: run_due looks up between them
    with _progress(s, "running due instances", most) as advance:

        def tick() -> bool:
            between.append(datetime.now(UTC))
            if len(between) > 1:
                advance(1)
            return False

        results = engine.run_due(limit=most, should_stop=tick)
    end = datetime.now(UTC)
    stamps = [_stamp(between[i + 1] if i + 1 < len(between) else end) for i in range(len(results))]
    counts = _counts(results)
    if s.json:
        rows = [
            {"at": at, **r.model_dump(mode="json")} for at, r in zip(stamps, results, strict=True)
        ]
        _emit({"results": rows, **counts})
    else:
        for at, r in zip(stamps, results, strict=True):
            print(f"{at} {_result_line(r)}")
        print(", ".join(f"{n} {outcome}" for outcome, n in counts.items()))
    return 1 if counts["failed"] else 0


@cli.command()
@click.option("--poll", type=float, default=1.0, show_default=True, help="seconds between polls")
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="instances run per poll (each claimed just before it runs)",
)
@click.option("--quiet", is_flag=True, help="don't print each processed instance")
@_shared_options
@click.pass_obj
def worker(s: Settings, poll: float, batch: int, quiet: bool) -> None:
    """Run run-due in a loop; SIGTERM or SIGINT stops it after the instance in hand."""
    _log_to_stderr()
    engine = _engine(s)
    stopping = False

    def note(message: str) -> None:
        print(f"{_stamp()} gorch worker: {message}", file=sys.stderr, flush=True)

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        note(f"{signal.Signals(signum).name}, stopping after this workflow")

    def show(r: DueResult) -> None:
        if s.json:
            print(json.dumps({"at": _stamp(), **r.model_dump(mode="json")}), flush=True)
        else:
            print(f"{_stamp()} {_result_line(r)}", flush=True)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    note(f"polling {engine.store.url or 'the store'} every {poll}s")
    done = engine.work(
        poll=poll, batch=batch, should_stop=lambda: stopping, on_result=None if quiet else show
    )
    note(f"stopped after {done} workflows")
