"""``gorch serve``, ``graph`` and ``demo``: the HTTP app, diagrams and the demo."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import cast

import click

from gorch.cli.base import (
    CLIError,
    Settings,
    _app_workflows,
    _emit,
    _engine,
    _load_app,
    _shared_options,
    cli,
)
from gorch.codec import loads
from gorch.engine import Engine
from gorch.errors import UnknownWorkflow
from gorch.workflow import Workflow

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
