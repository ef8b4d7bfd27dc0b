"""The ``gorch`` command line: inspect and drive stored workflows, run workers.

Where the workflow classes come from: ``--app module:attr`` (or ``GORCH_APP``)
names an :class:`gorch.Engine`, or a mapping of workflow names to classes. The
store is the engine's, unless ``--store URL`` (or ``GORCH_STORE``) says
otherwise. Output is for humans by default and JSON with ``--json``; errors
are one line on stderr and exit code 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, cast

from gorch.codec import loads
from gorch.engine import DueResult, Engine, Snapshot
from gorch.errors import GorchError, UnknownWorkflow
from gorch.workflow import Workflow

DEFAULT_STORE = "sqlite:///gorch.db"


class CLIError(Exception):
    """A problem with the command line itself (exit code 2)."""


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


def _engine(args: argparse.Namespace) -> Engine:
    app_spec = args.app or os.environ.get("GORCH_APP")
    store_url = args.store or os.environ.get("GORCH_STORE")
    workflows: Mapping[str, type[Workflow]] = {}
    engine: Engine | None = None
    if app_spec:
        app = _load_app(app_spec)
        if isinstance(app, Engine):
            engine = app
        elif isinstance(app, Mapping):
            workflows = app
        else:
            raise CLIError(f"--app {app_spec!r} is neither a gorch.Engine nor a mapping")
    if engine is not None and not store_url:
        return engine
    if engine is not None:
        workflows = engine.workflows
    return Engine(store_url or DEFAULT_STORE, workflows)


def _json(obj: Any) -> str:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    elif isinstance(obj, list):
        obj = [o.model_dump(mode="json") if hasattr(o, "model_dump") else o for o in obj]
    return json.dumps(obj, indent=2, default=str)


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


def cmd_show(args: argparse.Namespace) -> None:
    snap = _engine(args).get(args.id)
    print(_json(snap)) if args.json else _print_snapshot(snap)


def cmd_send(args: argparse.Namespace) -> None:
    payload: Any = None
    if args.input is not None:
        try:
            payload = json.loads(args.input)
        except json.JSONDecodeError as e:
            raise CLIError(f"INPUT must be JSON: {e}") from e
    engine = _engine(args)
    out = engine.send(args.id, args.event, payload, thread_id=args.thread, pc=args.pc, key=args.key)
    if args.json:
        print(_json({"output": out, "workflow": engine.get(args.id).model_dump(mode="json")}))
    else:
        print(f"output: {json.dumps(out, default=str)}")
        _print_snapshot(engine.get(args.id))


def cmd_list(args: argparse.Namespace) -> None:
    page = _engine(args).list(
        workflow=args.workflow, status=args.status, limit=args.limit, after=args.after
    )
    if args.json:
        print(_json(page))
        return
    for item in page.items:
        wake = f"  wakes {item.wake_at:%Y-%m-%d %H:%M:%S}" if item.wake_at else ""
        print(f"{item.id}  {item.workflow}  {item.status}  v{item.version}{wake}")
    if page.next_cursor:
        print(f"(more: --after {page.next_cursor})")


def _print_result(r: DueResult) -> None:
    fired = f" fired {r.fired}" if r.fired else ""
    if r.outcome == "skipped":
        print(f"{r.id}: skipped (taken over by another runner)", flush=True)
        return
    err = f" ERROR {r.error}" if r.error else ""
    print(f"{r.id}: {r.action}{fired} -> {r.status or '?'}{err}", flush=True)


def _counts(results: Sequence[DueResult]) -> dict[str, int]:
    return {
        outcome: sum(r.outcome == outcome for r in results)
        for outcome in ("processed", "skipped", "failed")
    }


def cmd_run_due(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be at least 1, got {args.limit}")
    limit = None if args.all else (100 if args.limit is None else args.limit)
    _log_to_stderr()
    results = _engine(args).run_due(limit=limit)
    counts = _counts(results)
    if args.json:
        print(_json({"results": [r.model_dump(mode="json") for r in results], **counts}))
    else:
        for r in results:
            _print_result(r)
        print(", ".join(f"{n} {outcome}" for outcome, n in counts.items()))
    return 1 if counts["failed"] else 0


def _log_to_stderr() -> None:
    """One line per warning on stderr (store errors, failed instances), no tracebacks."""
    logger = logging.getLogger("gorch")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s gorch %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


def cmd_worker(args: argparse.Namespace) -> None:
    _log_to_stderr()
    engine = _engine(args)
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        print(
            f"gorch worker: {signal.Signals(signum).name}, stopping after this workflow",
            file=sys.stderr,
            flush=True,
        )

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    on_result: Callable[[DueResult], None] | None = None
    if not args.quiet:
        on_result = (
            (lambda r: print(_json(r).replace("\n", ""), flush=True))
            if args.json
            else _print_result
        )
    print(
        f"gorch worker: polling {engine.store.url or 'the store'} every {args.poll}s",
        file=sys.stderr,
        flush=True,
    )
    done = engine.work(
        poll=args.poll, batch=args.batch, should_stop=lambda: stopping, on_result=on_result
    )
    print(f"gorch worker: stopped after {done} workflows", file=sys.stderr, flush=True)


def cmd_migrate(args: argparse.Namespace) -> None:
    store = _engine(args).store
    migrate = getattr(store, "migrate", None)
    if migrate is None:
        if args.json:
            print(_json({"store": store.url, "migrated": False}))
        else:
            print(f"{type(store).__name__} needs no migration")
        return
    migrate()
    if args.json:
        print(_json({"store": store.url, "migrated": True}))
    else:
        print(f"schema ready in {store.url or type(store).__name__}")


def _env_value(var: str | None, flag: str) -> str | None:
    """The value of the environment variable a flag names (secrets stay off the command line)."""
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise CLIError(f"{flag} names the environment variable {var!r}, which is unset or empty")
    return value


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from gorch.http import create_app
    except ImportError as e:
        raise CLIError(
            f"gorch serve needs FastAPI and uvicorn: pip install 'gorch[http]' ({e})"
        ) from e
    if not (args.app or os.environ.get("GORCH_APP")):
        raise CLIError("gorch serve needs --app module:engine (or GORCH_APP)")
    secret = _env_value(args.secret_env, "--secret-env")
    token = _env_value(args.token_env, "--token-env")
    if args.max_body <= 0:
        raise CLIError(f"--max-body must be positive, got {args.max_body}")
    if not (secret or token) and not args.insecure:
        raise CLIError(
            "gorch serve refuses to start without --secret-env or --token-env: anyone who "
            "reaches the port could start, drive and read workflows; pass --insecure to "
            "serve without them (local development only)"
        )
    engine = _engine(args)
    app = create_app(engine, secret=secret, token=token, max_body=args.max_body)
    guards = [name for name, on in (("token", token), ("signed requests", secret)) if on]
    print(
        f"gorch serve: {', '.join(engine.workflows) or 'no workflows'} on "
        f"http://{args.host}:{args.port} (docs at /docs"
        + (
            f"; {' and '.join(guards)} required"
            if guards
            else "; INSECURE: no token and no signature required"
        )
        + ")",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _mermaid() -> Callable[..., str]:
    try:
        module = importlib.import_module("gorch.graph")
    except ImportError as e:
        raise CLIError(f"Mermaid diagrams need gorch.graph: {e}") from e
    return cast(Callable[..., str], module.mermaid)


def _workflow_class(args: argparse.Namespace) -> tuple[str, type[Workflow]]:
    """TARGET as ``module:Class``, or as a workflow name registered in ``--app``."""
    target: str = args.target
    if ":" in target:
        obj = _load_app(target)
        if not (isinstance(obj, type) and issubclass(obj, Workflow)):
            raise CLIError(f"{target!r} is not a gorch.Workflow subclass")
        return obj.__name__, obj
    app_spec = args.app or os.environ.get("GORCH_APP")
    if not app_spec:
        raise CLIError(f"{target!r} is not 'module:Class'; to name a workflow, pass --app")
    app = _load_app(app_spec)
    workflows = app.workflows if isinstance(app, Engine) else app
    if not isinstance(workflows, Mapping):
        raise CLIError(f"--app {app_spec!r} is neither a gorch.Engine nor a mapping")
    if target not in workflows:
        raise UnknownWorkflow(target, list(workflows))
    return target, workflows[target]


def cmd_graph(args: argparse.Namespace) -> None:
    if (args.target is None) == (args.id is None):
        raise CLIError("graph needs module:Class (or a workflow name with --app), or --id ID")
    mermaid = _mermaid()
    if args.id is not None:
        engine = _engine(args)
        rec = engine.store.load(Engine._check_id(args.id))
        cls = engine.workflows.get(rec.workflow)
        if cls is None:
            raise UnknownWorkflow(rec.workflow, list(engine.workflows))
        wf, state = loads(rec.blob, cls)  # the instance: its data may shape the definition
        name, wid, text = rec.workflow, rec.id, mermaid(wf, state)
    else:
        name, cls = _workflow_class(args)
        wid, text = None, mermaid(cls)
    if args.json:
        print(_json({"workflow": name, "id": wid, "mermaid": text}))
    else:
        print(text.rstrip("\n"))


def cmd_demo(args: argparse.Namespace) -> None:
    from gorch.demo import run_demo

    stages = run_demo(args.store or os.environ.get("GORCH_STORE") or "memory://", quiet=args.json)
    if args.json:
        print(
            _json(
                [
                    {"stage": title, "workflow": snap.model_dump(mode="json")}
                    for title, snap in stages
                ]
            )
        )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help=f"store URL (env GORCH_STORE; default {DEFAULT_STORE})")
    common.add_argument(
        "--app", help="module:attr naming an Engine or a workflows mapping (env GORCH_APP)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = argparse.ArgumentParser(
        prog="gorch", description="Long-running workflows that live in your own database."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", parents=[common], help="run an expense approval end to end")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("show", parents=[common], help="show one workflow instance")
    p.add_argument("id")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("send", parents=[common], help="deliver an event")
    p.add_argument("id")
    p.add_argument("event")
    p.add_argument("input", nargs="?", help="the event's input as JSON")
    p.add_argument("--thread", help="thread id, when several threads await the event")
    p.add_argument("--pc", type=int, help="the wait's pc: refuse the event if the wait is over")
    p.add_argument(
        "--key",
        help="idempotency key: sending again with the same key applies nothing twice",
    )
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("list", parents=[common], help="list instances")
    p.add_argument("--status", help="resuming, waiting, retrying, failed, finished, cancelled")
    p.add_argument("--workflow", help="workflow name")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--after", help="the cursor printed at the end of the previous page")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "run-due",
        parents=[common],
        help="fire due timers, retries and resumes once",
        description="Claim due instances one at a time and run them; print what was "
        "processed, skipped (taken over by another runner) and failed. Exit status 1 if "
        "any failed or the store is unavailable.",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="process at most N due instances (default 100); the rest wait for the next run",
    )
    group.add_argument(
        "--all", action="store_true", help="drain everything due now (each instance once)"
    )
    p.set_defaults(func=cmd_run_due)

    p = sub.add_parser(
        "worker", parents=[common], help="run run-due in a loop until SIGTERM/SIGINT"
    )
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls when idle")
    p.add_argument(
        "--batch", type=int, default=10, help="instances run per poll (each claimed just before)"
    )
    p.add_argument("--quiet", action="store_true", help="don't print each processed instance")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", parents=[common], help="create the store's schema")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "graph",
        parents=[common],
        help="print a Mermaid diagram of a workflow class, or of an instance with its cursors",
    )
    p.add_argument("target", nargs="?", help="module:Class, or a workflow name registered in --app")
    p.add_argument("--id", help="an instance id (with --app): mark where its threads are")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser(
        "serve", parents=[common], help="serve the webhook and REST API (needs gorch[http])"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--secret-env",
        metavar="VAR",
        help="environment variable holding the HMAC secret: POST/PUT must be signed",
    )
    p.add_argument(
        "--token-env",
        metavar="VAR",
        help="environment variable holding the bearer token every route but /healthz needs",
    )
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body, bytes")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve without a token or a secret (local development only)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except CLIError as e:
        print(f"gorch: {e}", file=sys.stderr)
        return 2
    except GorchError as e:
        message = " ".join(str(e).split())  # one line, whatever the error's text
        print(f"gorch: {type(e).__name__}: {message}", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
