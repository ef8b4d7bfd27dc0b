"""``gorch purge``, ``check`` and ``migrate``: looking after the store."""

from __future__ import annotations

import click

from gorch.cli.base import (
    CLIError,
    Settings,
    _emit,
    _engine,
    _parse_when,
    _progress,
    _shared_options,
    cli,
)
from gorch.engine import RETAINED_STATUSES

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
