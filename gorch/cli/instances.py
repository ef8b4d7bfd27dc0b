"""The commands on instances: ``start``, ``send``, ``show``, ``cancel``, ``retry``,
``resume``, ``history`` and ``list``."""

from __future__ import annotations

import json

import click

from gorch.cli.base import (
    _BY_HELP,
    CLIError,
    Settings,
    _by,
    _emit,
    _engine,
    _json_arg,
    _one_line,
    _print_snapshot,
    _shared_options,
    _show,
    _stamp,
    cli,
)
from gorch.history import HistoryEntry

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


def _act(s: Settings, action: str, id: str, by: str | None) -> None:
    """Call the Engine's ``action`` on instance ``id`` as ``by``; show the snapshot."""
    engine = _engine(s)
    method = getattr(engine, action)
    _show(s, method(id, **_by(method, by)))


@cli.command()
@click.argument("id")
@click.option("--by", metavar="WHO", help=_BY_HELP)
@_shared_options
@click.pass_obj
def cancel(s: Settings, id: str, by: str | None) -> None:
    """Cancel instance ID: tear down what it awaits."""
    _act(s, "cancel", id, by)


@cli.command()
@click.argument("id")
@click.option("--by", metavar="WHO", help=_BY_HELP)
@_shared_options
@click.pass_obj
def retry(s: Settings, id: str, by: str | None) -> None:
    """Re-arm failed instance ID (attempt counts reset) and resume it now."""
    _act(s, "retry", id, by)


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
