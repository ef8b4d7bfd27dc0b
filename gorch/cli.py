"""The ``gorch`` command line: start, drive, inspect and purge stored workflows; run workers.

Where the workflow classes come from: ``--app module:attr`` (or ``GORCH_APP``)
names an :class:`gorch.Engine`, or a mapping of workflow names to classes. The
store is the engine's, unless ``--store URL`` (or ``GORCH_STORE``) says
otherwise; with neither, a command that needs a store says so rather than
creating one in the working directory. ``--app``, ``--store`` and ``--json``
may come before or after the command name.

Output is for humans by default; with ``--json`` stdout carries JSON only and
an error is one JSON line on stderr (``{"error": name, "detail": message}``,
the HTTP API's shape). Exit codes: 0 done, 1 a gorch error (one line, no
traceback) or something that would break (``check``, ``run-due``), 2 bad usage.
"""

from __future__ import annotations

import contextlib
import getpass
import importlib
import inspect
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, cast

import click
import pydantic

import gorch
from gorch.codec import loads
from gorch.engine import RETAINED_STATUSES, DueResult, Engine, Snapshot
from gorch.errors import GorchError, UnknownWorkflow
from gorch.history import HistoryEntry
from gorch.workflow import Workflow

NEEDS_STORE = (
    "pass --store URL (or set GORCH_STORE), e.g. --store sqlite:///gorch.db, "
    "or --app module:engine (or GORCH_APP) naming a gorch.Engine"
)


class CLIError(Exception):
    """A problem with the command line itself (exit code 2)."""


@dataclass
class Settings:
    """The options every command shares, wherever they were given on the line."""

    app: str | None = None
    store: str | None = None
    json: bool = False
    json_hint: bool = False
    """``--json`` appears on the line: errors found before the options are parsed obey it."""

    @property
    def app_spec(self) -> str | None:
        return self.app or os.environ.get("GORCH_APP") or None

    @property
    def store_url(self) -> str | None:
        return self.store or os.environ.get("GORCH_STORE") or None


# --------------------------------------------------------------------------- the app and store


def _load_app(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"--app must look like 'module:attribute', got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CLIError(f"cannot import {module_name!r} for --app: {e}") from e
    finally:
        sys.path.pop(0)
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise CLIError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _app_workflows(spec: str) -> Engine | Mapping[str, type[Workflow]]:
    app = _load_app(spec)
    if isinstance(app, Engine | Mapping):
        return app
    raise CLIError(f"--app {spec!r} is neither a gorch.Engine nor a mapping")


def _engine(s: Settings) -> Engine:
    """The app's engine, or one on ``--store`` with the app's workflows.

    An engine this function opens a store for is closed when the command ends.
    """
    app = _app_workflows(s.app_spec) if s.app_spec else None
    url = s.store_url
    if isinstance(app, Engine) and not url:
        return app
    if not url:
        name = click.get_current_context().info_name
        raise CLIError(f"{name} needs a store: {NEEDS_STORE}")
    workflows = app.workflows if isinstance(app, Engine) else (app or {})
    engine = Engine(url, workflows)
    click.get_current_context().call_on_close(engine.store.close)
    return engine


# --------------------------------------------------------------------------- who acts


def _actor(by: str | None) -> str:
    """Who runs the command, for the instance's history: ``--by``, else ``cli:$USER``."""
    if by:
        return by
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment nor the passwd file
        user = "unknown"
    return f"cli:{user}"


def _by(method: Callable[..., Any], by: str | None) -> dict[str, str]:
    """``{"by": ...}`` for an Engine method that takes it (it goes to the history), else {}."""
    try:
        takes = "by" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        takes = False
    return {"by": _actor(by)} if takes else {}


_BY_HELP = "who is acting, written to the instance's history (default: cli:$USER)"


# --------------------------------------------------------------------------- output


def _plain(obj: Any) -> Any:
    if isinstance(obj, pydantic.BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, list | tuple):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _emit(obj: Any) -> None:
    print(json.dumps(_plain(obj), indent=2, default=str))


def _stamp(at: datetime | None = None) -> str:
    """An instant as the lines of ``run-due`` and ``worker`` show it (UTC, ISO 8601)."""
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _print_snapshot(s: Snapshot) -> None:
    print(f"{s.id}  ({s.workflow})  {s.status.value}  v{s.version}")
    if s.error:
        print(f"  error: {s.error}")
    for t in s.threads:
        extra = f"  attempts={t.attempts}" if t.attempts else ""
        print(f"  thread {t.id}: {t.status} at {t.cur_step or '(start)'}{extra}")
    for e in s.awaited:
        due = f"  due {e.due:%Y-%m-%d %H:%M:%S} UTC" if e.due else ""
        print(f"  awaits {e.name!r} (thread {e.thread_id}, pc {e.pc}){due}")
    if s.next_wakeup:
        print(f"  next wake-up: {s.next_wakeup:%Y-%m-%d %H:%M:%S} UTC")
    print("  data: " + json.dumps(s.data, default=str))


def _show(s: Settings, snap: Snapshot) -> None:
    _emit(snap) if s.json else _print_snapshot(snap)


@contextlib.contextmanager
def _progress(
    s: Settings, description: str, total: int | None, *, counted: bool = True
) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr while a long operation runs: on a terminal only, never with
    ``--json``. Yields ``advance(n)``."""
    if s.json or not sys.stderr.isatty():
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns.append(BarColumn())
    if counted:
        columns.append(MofNCompleteColumn())
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


_AGE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _parse_when(text: str, now: datetime | None = None) -> datetime:
    """An instant given as ISO 8601 (UTC unless it says otherwise) or as an age: ``30d``,
    ``12h``, ``1w2d`` (that long before now)."""
    age = text.strip().lower()
    if age and _AGE.sub("", age) == "":
        delta = timedelta()
        for amount, unit in _AGE.findall(age):
            delta += timedelta(**{_UNITS[unit]: int(amount)})
        return (now or datetime.now(UTC)) - delta
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CLIError(
            f"{text!r} is neither an ISO 8601 date/time (2024-05-01, 2024-05-01T12:00:00+02:00) "
            "nor an age (30d, 12h, 1w)"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CLIError(f"{what} must be JSON: {e}") from e


# --------------------------------------------------------------------------- the group


def _set(field: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        settings = ctx.ensure_object(Settings)
        if field == "json":
            settings.json = settings.json or bool(value)
        elif value is not None:
            setattr(settings, field, value)

    return callback


def _shared_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--app``, ``--store``, ``--json``: on the group and on every command, so either
    place works (the command's own wins)."""
    options = [
        click.option(
            "--app",
            metavar="MODULE:ATTR",
            expose_value=False,
            callback=_set("app"),
            help="an Engine or a mapping of workflow classes (env GORCH_APP)",
        ),
        click.option(
            "--store",
            metavar="URL",
            expose_value=False,
            callback=_set("store"),
            help="store URL, instead of the app engine's (env GORCH_STORE)",
        ),
        click.option(
            "--json",
            is_flag=True,
            expose_value=False,
            callback=_set("json"),
            help="print JSON only (errors as JSON on stderr)",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    settings = ctx.ensure_object(Settings)
    if settings.json_hint:
        print(json.dumps({"version": gorch.__version__}))
    else:
        print(f"gorch {gorch.__version__}")
    ctx.exit()


class GorchGroup(click.Group):
    """Runs a command and turns what goes wrong into an exit code and a one-line message
    (JSON with ``--json``), whether called as ``main([...])``, from ``CliRunner`` or as
    the console script."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        words = argv[: argv.index("--")] if "--" in argv else argv
        settings = Settings(json_hint="--json" in words)
        extra.setdefault("obj", settings)
        code = _run(
            lambda: super(GorchGroup, self).main(
                argv, prog_name or "gorch", complete_var, standalone_mode=False, **extra
            ),
            settings,
        )
        if standalone_mode:
            sys.exit(code)
        return code


def _error(s: Settings, name: str, message: str, human: str) -> None:
    if s.json or s.json_hint:
        print(json.dumps({"error": name, "detail": message}), file=sys.stderr)
    else:
        print(human, file=sys.stderr)


def _run(call: Callable[[], Any], s: Settings) -> int:
    """Call the command; map its outcome to an exit code, with no traceback for errors a
    user can act on and none for a reader that went away (``gorch list | head -1``)."""
    try:
        try:
            code = call()
            sys.stdout.flush()
        except CLIError as e:
            _error(s, "UsageError", _one_line(str(e)), f"gorch: {_one_line(str(e))}")
            return 2
        except GorchError as e:
            name, message = type(e).__name__, _one_line(str(e))
            _error(s, name, message, f"gorch: {name}: {message}")
            return 1
        except click.exceptions.NoArgsIsHelpError as e:
            print(e.format_message(), file=sys.stderr)
            return e.exit_code
        except click.ClickException as e:
            if s.json or s.json_hint:
                _error(s, "UsageError", _one_line(e.format_message()), "")
            else:
                e.show()
            return e.exit_code
        except click.Abort:
            _error(s, "Interrupted", "interrupted", "gorch: interrupted")
            return 130
        except Exception as e:
            if not (s.json or s.json_hint):
                raise
            _error(s, type(e).__name__, _one_line(str(e)), "")
            return 1
    except BrokenPipeError:
        # Whatever is still buffered for stdout can't be written: send it nowhere, so that
        # the flush at exit does not complain either.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code if isinstance(code, int) else 0


@click.group(
    "gorch",
    cls=GorchGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Long-running workflows that live in your own database.",
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="print gorch's version (as JSON with --json)",
)
@_shared_options
def cli() -> None:
    pass


# --------------------------------------------------------------------------- instances


@cli.command()
@click.argument("workflow")
@click.argument("data", required=False)
@click.option("--id", "wid", metavar="ID", help="the instance's id (default: a new one)")
@click.option("--key", help="idempotency key: starting again with it creates nothing twice")
@click.option("--by", metavar="WHO", help=_BY_HELP)
@_shared_options
@click.pass_obj
def start(
    s: Settings,
    workflow: str,
    data: str | None,
    wid: str | None,
    key: str | None,
    by: str | None,
) -> None:
    """Start an instance of WORKFLOW with DATA (a JSON object) and run it until it waits."""
    fields = _json_arg(data, "DATA")
    if fields is not None and not isinstance(fields, dict):
        raise CLIError(f"DATA must be a JSON object, got {type(fields).__name__}")
    engine = _engine(s)
    _show(s, engine.start(workflow, wid, fields, key=key, **_by(engine.start, by)))


@cli.command()
@click.argument("id")
@click.argument("event")
@click.argument("input", required=False)
@click.option("--thread", help="thread id, when several threads await the event")
@click.option("--pc", type=int, help="the wait's pc: refuse the event if the wait is over")
@click.option("--key", help="idempotency key: sending again with it applies nothing twice")
@click.option("--by", metavar="WHO", help=_BY_HELP)
@_shared_options
@click.pass_obj
def send(
    s: Settings,
    id: str,
    event: str,
    input: str | None,
    thread: str | None,
    pc: int | None,
    key: str | None,
    by: str | None,
) -> None:
    """Deliver EVENT to instance ID, with INPUT as JSON."""
    payload = _json_arg(input, "INPUT")
    engine = _engine(s)
    who = _by(engine.send, by)
    out = engine.send(id, event, payload, thread_id=thread, pc=pc, key=key, **who)
    snap = engine.get(id)
    if s.json:
        _emit({"output": out, "workflow": snap})
    else:
        print(f"output: {json.dumps(out, default=str)}")
        _print_snapshot(snap)


@cli.command()
@click.argument("id")
@_shared_options
@click.pass_obj
def show(s: Settings, id: str) -> None:
    """Show one instance: status, threads, awaited events, next wake-up, data."""
    _show(s, _engine(s).get(id))


@cli.command()
@click.argument("id")
@click.option("--by", metavar="WHO", help=_BY_HELP)
@_shared_options
@click.pass_obj
def cancel(s: Settings, id: str, by: str | None) -> None:
    """Cancel instance ID: tear down what it awaits."""
    engine = _engine(s)
    _show(s, engine.cancel(id, **_by(engine.cancel, by)))


@cli.command()
@click.argument("id")
@click.option("--by", metavar="WHO", help=_BY_HELP)
@_shared_options
@click.pass_obj
def retry(s: Settings, id: str, by: str | None) -> None:
    """Re-arm failed instance ID (attempt counts reset) and resume it now."""
    engine = _engine(s)
    _show(s, engine.retry(id, **_by(engine.retry, by)))


@cli.command()
@click.argument("id")
@_shared_options
@click.pass_obj
def resume(s: Settings, id: str) -> None:
    """Run pending (or failed) instance ID until it waits."""
    _show(s, _engine(s).resume(id))


def _history_line(e: HistoryEntry) -> str:
    parts = [_stamp(e.at), f"{e.kind:<9}", e.name or "-"]
    if e.thread_id:
        parts.append(f"thread={e.thread_id}")
    if e.pc is not None:
        parts.append(f"pc={e.pc}")
    if e.attempt is not None:
        parts.append(f"attempt={e.attempt}")
    if e.duration is not None:
        parts.append(f"{e.duration * 1000:.1f}ms")
    if e.by:
        parts.append(f"by={e.by}")
    if e.input is not None:
        parts.append("input=" + json.dumps(e.input, default=str))
    if e.output is not None:
        parts.append("output=" + json.dumps(e.output, default=str))
    if e.error:
        parts.append(f"ERROR {_one_line(e.error)}")
    return "  ".join(parts)


@cli.command()
@click.argument("id")
@_shared_options
@click.pass_obj
def history(s: Settings, id: str) -> None:
    """What happened to instance ID, oldest first: start, steps, events, timers, the end."""
    entries = _engine(s).history(id)
    if s.json:
        _emit({"id": id, "entries": list(entries), "dropped": entries.dropped})
        return
    if entries.dropped:
        print(f"({entries.dropped} older entries no longer kept)")
    for e in entries:
        print(_history_line(e))


@cli.command("list")
@click.option("--status", help="resuming, waiting, retrying, failed, finished or cancelled")
@click.option("--workflow", help="workflow name")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--after", metavar="CURSOR", help="the cursor printed at the end of the last page")
@_shared_options
@click.pass_obj
def list_(
    s: Settings, status: str | None, workflow: str | None, limit: int, after: str | None
) -> None:
    """List instances in id order, a page at a time."""
    page = _engine(s).list(workflow=workflow, status=status, limit=limit, after=after)
    if s.json:
        _emit(page)
        return
    for item in page.items:
        wake = f"  wakes {item.wake_at:%Y-%m-%d %H:%M:%S}" if item.wake_at else ""
        print(f"{item.id}  {item.workflow}  {item.status}  v{item.version}{wake}")
    if page.next_cursor:
        print(f"(more: --after {page.next_cursor})")


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


# --------------------------------------------------------------------------- the store


@cli.command()
@click.option(
    "--finished-before",
    "before",
    required=True,
    metavar="WHEN",
    help="ISO 8601 date/time (UTC unless it has an offset), or an age: 30d, 12h, 1w",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["finished", "cancelled", "failed"]),
    help="purge instances with this status (repeatable; default finished and cancelled)",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="instances deleted per write",
)
@_shared_options
@click.pass_obj
def purge(s: Settings, before: str, statuses: tuple[str, ...], batch: int) -> None:
    """Delete finished and cancelled instances (and their history) last updated before WHEN,
    in batches, without locking the table."""
    when = _parse_when(before)
    chosen = statuses or RETAINED_STATUSES
    engine = _engine(s)
    with _progress(s, "purging", None) as advance:
        deleted = 0

        def progress(done: int, _total: int | None) -> None:
            nonlocal deleted
            advance(done - deleted)
            deleted = done

        purged = engine.purge(finished_before=when, statuses=chosen, batch=batch, progress=progress)
    if s.json:
        _emit({"purged": purged, "finished_before": when.isoformat(), "statuses": list(chosen)})
    else:
        print(
            f"purged {purged} instance(s) ({', '.join(chosen)}) "
            f"last updated before {when:%Y-%m-%d %H:%M:%S} UTC"
        )


@cli.command()
@click.option(
    "--page-size",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="instances loaded per store query",
)
@_shared_options
@click.pass_obj
def check(s: Settings, page_size: int) -> int:
    """Check every in-flight instance against the code of --app before a deploy: exit 1
    when one would break (a cursor, event, thread or DAG node gone, data no longer valid,
    a blob that does not load), 0 when all would go on."""
    from gorch.check import format_report

    if not s.app_spec:
        raise CLIError("gorch check needs --app module:engine (or GORCH_APP): the code to check")
    engine = _engine(s)
    with _progress(s, "checking instances", None) as advance:
        seen = 0

        def progress(done: int, _total: int | None) -> None:
            nonlocal seen
            advance(done - seen)
            seen = done

        report = engine.check(page_size=page_size, progress=progress)
    if s.json:
        _emit(report)
    else:
        print(format_report(report))
    return 0 if report.ok else 1


@cli.command()
@_shared_options
@click.pass_obj
def migrate(s: Settings) -> None:
    """Bring the store's schema up to date (tables, columns, indexes)."""
    store = _engine(s).store
    name = store.url or type(store).__name__
    migrator = getattr(store, "migrate", None)
    if migrator is None:
        if s.json:
            _emit({"store": store.url, "migrated": False})
        else:
            print(f"{name}: {type(store).__name__} needs no migration (opening it sets it up)")
        return
    applied = migrator()
    if s.json:
        _emit({"store": store.url, "migrated": True, **({"applied": applied} if applied else {})})
    else:
        print(f"schema ready in {name}")


# --------------------------------------------------------------------------- serving


def _env_value(var: str | None, flag: str) -> str | None:
    """The value of the environment variable a flag names (secrets stay off the command line)."""
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise CLIError(f"{flag} names the environment variable {var!r}, which is unset or empty")
    return value


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--secret-env",
    metavar="VAR",
    help="environment variable holding the HMAC secret: POST/PUT must be signed",
)
@click.option(
    "--token-env",
    metavar="VAR",
    help="environment variable holding the bearer token every route but /healthz needs",
)
@click.option("--max-body", type=int, default=1 << 20, show_default=True, help="bytes")
@click.option("--insecure", is_flag=True, help="serve without a token or a secret (local only)")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
@_shared_options
@click.pass_obj
def serve(
    s: Settings,
    host: str,
    port: int,
    secret_env: str | None,
    token_env: str | None,
    max_body: int,
    insecure: bool,
    log_level: str,
) -> None:
    """Serve the webhook and REST API (needs gorch[http])."""
    try:
        import uvicorn

        from gorch.http import create_app
    except ImportError as e:
        raise CLIError(
            f"gorch serve needs FastAPI and uvicorn: pip install 'gorch[http]' ({e})"
        ) from e
    if not s.app_spec:
        raise CLIError("gorch serve needs --app module:engine (or GORCH_APP)")
    secret = _env_value(secret_env, "--secret-env")
    token = _env_value(token_env, "--token-env")
    if max_body <= 0:
        raise CLIError(f"--max-body must be positive, got {max_body}")
    if not (secret or token) and not insecure:
        raise CLIError(
            "gorch serve refuses to start without --secret-env or --token-env: anyone who "
            "reaches the port could start, drive and read workflows; pass --insecure to "
            "serve without them (local development only)"
        )
    engine = _engine(s)
    app = create_app(engine, secret=secret, token=token, max_body=max_body)
    guards = [name for name, on in (("token", token), ("signed requests", secret)) if on]
    print(
        f"gorch serve: {', '.join(engine.workflows) or 'no workflows'} on "
        f"http://{host}:{port} (docs at /docs, inspector at /inspect"
        + (
            f"; {' and '.join(guards)} required"
            if guards
            else "; INSECURE: no token and no signature required"
        )
        + ")",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)


# --------------------------------------------------------------------------- diagrams and demo


def _mermaid() -> Callable[..., str]:
    try:
        module = importlib.import_module("gorch.graph")
    except ImportError as e:
        raise CLIError(f"Mermaid diagrams need gorch.graph: {e}") from e
    return cast(Callable[..., str], module.mermaid)


def _workflow_class(s: Settings, target: str) -> tuple[str, type[Workflow]]:
    """TARGET as ``module:Class``, or as a workflow name registered in ``--app``."""
    if ":" in target:
        obj = _load_app(target)
        if not (isinstance(obj, type) and issubclass(obj, Workflow)):
            raise CLIError(f"{target!r} is not a gorch.Workflow subclass")
        return obj.__name__, obj
    if not s.app_spec:
        raise CLIError(f"{target!r} is not 'module:Class'; to name a workflow, pass --app")
    app = _app_workflows(s.app_spec)
    workflows = app.workflows if isinstance(app, Engine) else app
    if target not in workflows:
        raise UnknownWorkflow(target, list(workflows))
    return target, workflows[target]


@cli.command()
@click.argument("target", required=False)
@click.option("--id", "wid", metavar="ID", help="an instance: mark where its threads are")
@_shared_options
@click.pass_obj
def graph(s: Settings, target: str | None, wid: str | None) -> None:
    """Print a Mermaid diagram of TARGET (module:Class, or a workflow name in --app), or of
    an instance with its cursors (--id)."""
    if (target is None) == (wid is None):
        raise CLIError("graph needs module:Class (or a workflow name with --app), or --id ID")
    mermaid = _mermaid()
    if wid is not None:
        engine = _engine(s)
        rec = engine.store.load(Engine._check_id(wid))
        cls = engine.workflows.get(rec.workflow)
        if cls is None:
            raise UnknownWorkflow(rec.workflow, list(engine.workflows))
        wf, state = loads(rec.blob, cls)  # the instance: its data may shape the definition
        name, shown, text = rec.workflow, rec.id, mermaid(wf, state)
    else:
        assert target is not None
        name, cls = _workflow_class(s, target)
        shown, text = None, mermaid(cls)
    if s.json:
        _emit({"workflow": name, "id": shown, "mermaid": text})
    else:
        print(text.rstrip("\n"))


@cli.command()
@_shared_options
@click.pass_obj
def demo(s: Settings) -> None:
    """Run an expense approval end to end (in memory unless --store)."""
    from gorch.demo import run_demo

    stages = run_demo(s.store_url or "memory://", quiet=s.json)
    if s.json:
        _emit([{"stage": title, "workflow": snap} for title, snap in stages])


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    return cast(int, cli.main(argv, "gorch", standalone_mode=False))


if __name__ == "__main__":
    sys.exit(main())
