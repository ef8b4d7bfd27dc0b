"""What every ``gorch`` command shares: settings, loading the app, output, the group."""

from __future__ import annotations

import contextlib
import getpass
import importlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import pydantic

import gorch
from gorch.engine import Engine, Snapshot
from gorch.errors import GorchError
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
