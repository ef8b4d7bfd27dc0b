"""The ``gorch`` command line, through click's ``CliRunner`` and as a real process.

Workflow classes come from ``tests/cli_app.py`` (``--app cli_app:engine``); the
store is a SQLite file per test, named by ``GORCH_STORE`` or ``--store``.
Errors are one line on stderr (one JSON line with ``--json``) and nothing on
stdout: exit code 1 for a GorchError, 2 for bad usage.
"""

from __future__ import annotations

import inspect
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cli_app
import pytest
from click.testing import CliRunner
from stores.store_support import PG_DSN, require_server

import gorch
from gorch.cli import _parse_when, cli, main
from gorch.demo import DemoExpense
from gorch.engine import Engine
from gorch.stores import Store

TESTS_DIR = Path(__file__).resolve().parent
APP = ["--app", "cli_app:engine"]
APPROVE = '{"approved": true, "by": "ann"}'
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)

    def error_line(self) -> str:
        """The one line of an error on stderr (and nothing on stdout)."""
        assert self.out == ""
        lines = self.err.splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{self.err}"
        return lines[0]

    def json_error(self) -> dict[str, str]:
        """The error as ``--json`` prints it: one JSON line on stderr, nothing on stdout."""
        body: dict[str, str] = json.loads(self.error_line())
        assert set(body) == {"error", "detail"}
        return body


@pytest.fixture
def cli_run() -> Any:
    """Run the ``gorch`` group through click's CliRunner: exit code, stdout, stderr."""
    runner = CliRunner()

    def run(*argv: str) -> Run:
        result = runner.invoke(cli, list(argv), catch_exceptions=False)
        return Run(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("GORCH_STORE", url)
    monkeypatch.delenv("GORCH_APP", raising=False)
    return url


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    """An Engine on the same SQLite file as the CLI, to set up and check instances."""
    e = Engine(store_url, cli_app.WORKFLOWS)
    yield e
    e.store.close()


@pytest.fixture
def broken_charge() -> Iterator[None]:
    cli_app.Charge.broken = True
    yield
    cli_app.Charge.broken = False


def record(store: Store, id: str) -> tuple[bytes, int, str, datetime | None]:
    rec = store.load(id)
    return rec.blob, rec.version, rec.status, rec.wake_at


# --------------------------------------------------------------------------- demo and --version


def test_demo_runs_an_expense_approval_end_to_end(
    cli_run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GORCH_STORE", raising=False)
    run = cli_run("demo")
    assert (run.code, run.err) == (0, "")
    assert "store: memory://" in run.out
    assert "paid, approved by ann" in run.out
    assert "fired ['expired']" in run.out
    assert "no answer within 3 days: escalated" in run.out


def test_demo_keeps_its_instances_in_the_given_store(cli_run: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    assert cli_run("demo", "--store", url).code == 0
    engine = Engine(url, {"expense": DemoExpense})
    items = engine.list().items
    assert sorted(i.status for i in items) == ["finished", "finished"]
    assert sorted(engine.get(i.id).data["status"] for i in items) == ["escalated", "paid"]


def test_demo_json_prints_json(cli_run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GORCH_STORE", raising=False)
    stages = cli_run("demo", "--json").json()
    assert [s["workflow"]["status"] for s in stages][-1] == "finished"
    assert all(set(s) == {"stage", "workflow"} for s in stages)


def test_version(cli_run: Any) -> None:
    assert cli_run("--version").out == f"gorch {gorch.__version__}\n"
    assert cli_run("--json", "--version").json() == {"version": gorch.__version__}
    assert cli_run("--version", "--json").json() == {"version": gorch.__version__}


# --------------------------------------------------------------------------- start


def test_start_runs_the_instance_until_it_waits(cli_run: Any, engine: Engine) -> None:
    run = cli_run("start", "expense", '{"amount": 120}', "--id", "exp-1", *APP)
    assert (run.code, run.err) == (0, "")
    assert run.out.splitlines()[0].startswith("exp-1  (expense)  waiting")
    assert engine.get("exp-1").data["history"] == ["manager asked to approve 120.00"]


def test_start_json_is_the_snapshot_and_a_key_starts_once(cli_run: Any, engine: Engine) -> None:
    first = cli_run("start", "ticket", '{"title": "printer"}', "--key", "k-1", "--json", *APP)
    shown = first.json()
    assert (shown["workflow"], shown["status"]) == ("ticket", "waiting")
    assert shown == json.loads(engine.get(shown["id"]).model_dump_json())
    again = cli_run("start", "ticket", '{"title": "printer"}', "--key", "k-1", "--json", *APP)
    assert again.json()["id"] == shown["id"]
    assert [i.id for i in engine.list().items] == [shown["id"]]


@pytest.mark.parametrize(
    ("argv", "code", "expected"),
    [
        (["start", "ticket", "[1]"], 2, "JSON object"),
        (["start", "ticket", "{title"], 2, "must be JSON"),
        (["start", "nope", "{}"], 1, "UnknownWorkflow"),
        (["start", "ticket", '{"title": 3}'], 1, "InvalidWorkflowData"),
    ],
    ids=["not-an-object", "not-json", "unknown-workflow", "invalid-data"],
)
def test_start_refuses_bad_input_and_creates_nothing(
    cli_run: Any, engine: Engine, argv: list[str], code: int, expected: str
) -> None:
    run = cli_run(*argv, "--id", "t-1", *APP)
    assert run.code == code
    assert expected in run.error_line()
    assert engine.list().items == []


def test_start_of_an_existing_id_leaves_it_alone(cli_run: Any, engine: Engine) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    before = record(engine.store, "t-1")
    run = cli_run("start", "ticket", '{"title": "other"}', "--id", "t-1", *APP)
    assert run.code == 1
    assert "WorkflowExists" in run.error_line()
    assert record(engine.store, "t-1") == before


# --------------------------------------------------------------------------- show


def test_show_prints_status_awaited_events_and_data(cli_run: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    run = cli_run("show", "exp-1", *APP)
    assert (run.code, run.err) == (0, "")
    assert run.out.splitlines()[0].startswith("exp-1  (expense)  waiting")
    assert "awaits 'decide'" in run.out and "awaits 'expired'" in run.out
    assert '"amount": 120.0' in run.out


def test_show_json_is_the_snapshot(cli_run: Any, engine: Engine) -> None:
    snap = engine.start("expense", "exp-1", {"amount": 120})
    shown = cli_run("show", "exp-1", "--json", *APP).json()
    assert shown["id"] == "exp-1" and shown["workflow"] == "expense"
    assert shown["status"] == "waiting"
    assert shown["data"]["amount"] == 120.0
    assert sorted(e["name"] for e in shown["awaited"]) == ["decide", "expired"]
    assert datetime.fromisoformat(shown["next_wakeup"]) == snap.next_wakeup
    assert shown == json.loads(engine.get("exp-1").model_dump_json())


def test_show_of_an_unknown_id_is_a_one_line_error(cli_run: Any, engine: Engine) -> None:
    run = cli_run("show", "nope", *APP)
    assert run.code == 1
    line = run.error_line()
    assert line.startswith("gorch: WorkflowNotFound:") and "'nope'" in line


def test_show_of_an_invalid_id_is_a_one_line_error(cli_run: Any, engine: Engine) -> None:
    run = cli_run("show", "not an id", *APP)
    assert run.code == 1
    assert "InvalidWorkflowId" in run.error_line()


# --------------------------------------------------------------------------- send


def test_send_json_returns_the_output_and_the_instance(cli_run: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    run = cli_run("send", "exp-1", "decide", APPROVE, "--json", *APP)
    assert (run.code, run.err) == (0, "")
    sent = run.json()
    assert set(sent) == {"output", "workflow"}
    assert sent["output"] == {"status": "approved"}
    assert sent["workflow"]["status"] == "finished"
    assert sent["workflow"]["data"]["status"] == "paid"
    assert engine.get("exp-1").data["history"][-1] == "paid, approved by ann"


def test_send_prints_the_output_for_humans(cli_run: Any, engine: Engine) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    run = cli_run("send", "t-1", "close", '"bob"', *APP)
    assert run.code == 0
    assert run.out.splitlines()[0] == 'output: "closed by bob"'
    assert "t-1  (ticket)  finished" in run.out
    assert engine.get("t-1").data["closed_by"] == "bob"


def test_send_with_thread_and_pc(cli_run: Any, engine: Engine) -> None:
    snap = engine.start("ticket", "t-1", {"title": "printer"})
    pc = snap.awaited[0].pc
    args = ("send", "t-1", "close", '"bob"', "--thread", "_main_", "--pc", str(pc), *APP)
    assert cli_run(*args).code == 0
    assert engine.get("t-1").status == "finished"


def test_send_with_a_key_applies_the_event_once(cli_run: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    args = ("send", "exp-1", "decide", APPROVE, "--key", "k-1", "--json", *APP)
    first = cli_run(*args).json()
    after = record(engine.store, "exp-1")
    again = cli_run(*args).json()
    assert again["output"] == first["output"] == {"status": "approved"}
    assert record(engine.store, "exp-1") == after
    other = cli_run(
        "send", "exp-1", "decide", '{"approved": false, "by": "x"}', "--key", "k-1", *APP
    )
    assert other.code == 1
    assert "IdempotencyKeyReused" in other.error_line()


def test_send_of_a_stale_pc_is_refused(cli_run: Any, engine: Engine) -> None:
    snap = engine.start("ticket", "t-1", {"title": "printer"})
    before = record(engine.store, "t-1")
    run = cli_run("send", "t-1", "close", '"bob"', "--pc", str(snap.awaited[0].pc + 1), *APP)
    assert run.code == 1
    assert "StaleEvent" in run.error_line()
    assert record(engine.store, "t-1") == before


def test_send_of_input_that_is_not_json_is_a_usage_error(cli_run: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    before = record(engine.store, "exp-1")
    run = cli_run("send", "exp-1", "decide", "{approved: yes}", *APP)
    assert run.code == 2
    assert "JSON" in run.error_line()
    assert record(engine.store, "exp-1") == before


def test_send_of_invalid_input_is_a_one_line_error(cli_run: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    before = record(engine.store, "exp-1")
    run = cli_run("send", "exp-1", "decide", '{"approved": "maybe"}', *APP)
    assert run.code == 1
    assert record(engine.store, "exp-1") == before
    line = run.error_line()  # pydantic's message spans lines; the CLI must keep it to one
    assert line.startswith("gorch: InvalidEventInput:") and "decide" in line


def test_send_to_a_cancelled_instance_is_refused(cli_run: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    engine.cancel("exp-1")
    before = record(engine.store, "exp-1")
    run = cli_run("send", "exp-1", "decide", APPROVE, *APP)
    assert run.code == 1
    assert "WorkflowNotActive" in run.error_line()
    assert record(engine.store, "exp-1") == before


# --------------------------------------------------------------------------- cancel, retry, resume


def test_cancel(cli_run: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    shown = cli_run("cancel", "exp-1", "--json", *APP).json()
    assert (shown["id"], shown["status"], shown["awaited"]) == ("exp-1", "cancelled", [])
    assert engine.get("exp-1").status == "cancelled"
    before = record(engine.store, "exp-1")
    again = cli_run("cancel", "exp-1", *APP)
    assert again.code == 1
    assert "WorkflowNotActive" in again.error_line()
    assert record(engine.store, "exp-1") == before


def test_retry_rearms_a_failed_instance(cli_run: Any, engine: Engine, broken_charge: None) -> None:
    snap = engine.start("charge", "c-1", {"amount": 3})
    assert snap.status == "failed"
    before = record(engine.store, "c-1")
    still = cli_run("retry", "c-1", "--json", *APP)
    assert still.code == 1
    assert still.json_error()["error"] == "StepFailed" and "card declined" in still.err
    assert engine.get("c-1").status == "failed"
    cli_app.Charge.broken = False
    human = cli_run("retry", "c-1", *APP)
    assert human.out.splitlines()[0].startswith("c-1  (charge)  waiting")
    assert engine.get("c-1").data["charged"] is True
    refused = cli_run("retry", "c-1", *APP)  # waiting, not failed: nothing to retry
    assert refused.code == 1 and "WorkflowNotActive" in refused.error_line()
    assert before != record(engine.store, "c-1")


def test_resume_runs_a_deferred_start(cli_run: Any, store_url: str) -> None:
    deferred = Engine(store_url, cli_app.WORKFLOWS, defer_resume=True)
    deferred.start("expense", "exp-d", {"amount": 5})
    assert deferred.get("exp-d").data["history"] == []
    shown = cli_run("resume", "exp-d", "--json", *APP).json()
    assert shown["status"] == "waiting"
    assert shown["data"]["history"] == ["manager asked to approve 5.00"]
    assert cli_run("resume", "nope", *APP).code == 1


# --------------------------------------------------------------------------- list


def test_list_filters_by_status_and_workflow(cli_run: Any, engine: Engine) -> None:
    for i in (1, 2, 3):
        engine.start("expense", f"exp-{i}", {"amount": i})
    engine.send("exp-2", "decide", {"approved": True, "by": "ann"})
    engine.start("ticket", "t-1", {"title": "printer"})

    run = cli_run("list", "--status", "waiting", "--workflow", "expense", "--json", *APP)
    page = run.json()
    assert set(page) == {"items", "next_cursor"}
    assert [i["id"] for i in page["items"]] == ["exp-1", "exp-3"]
    assert {(i["workflow"], i["status"]) for i in page["items"]} == {("expense", "waiting")}
    assert page["next_cursor"] is None

    human = cli_run("list", "--status", "waiting", *APP)
    assert [line.split()[:3] for line in human.out.splitlines()] == [
        ["exp-1", "expense", "waiting"],
        ["exp-3", "expense", "waiting"],
        ["t-1", "ticket", "waiting"],
    ]
    finished = cli_run("list", "--status", "finished", "--json", *APP).json()
    assert [i["id"] for i in finished["items"]] == ["exp-2"]


def test_list_pages_with_limit_and_after(cli_run: Any, engine: Engine) -> None:
    for i in (1, 2, 3):
        engine.start("expense", f"exp-{i}", {"amount": i})
    first = cli_run("list", "--limit", "2", "--json", *APP).json()
    assert [i["id"] for i in first["items"]] == ["exp-1", "exp-2"]
    assert first["next_cursor"]
    second = cli_run("list", "--limit", "2", "--after", first["next_cursor"], "--json", *APP)
    assert [i["id"] for i in second.json()["items"]] == ["exp-3"]
    assert second.json()["next_cursor"] is None
    human = cli_run("list", "--limit", "2", *APP)
    assert f"--after {first['next_cursor']}" in human.out.splitlines()[-1]


def test_list_without_an_app_or_a_store_says_what_it_needs(
    cli_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GORCH_STORE", raising=False)
    monkeypatch.delenv("GORCH_APP", raising=False)
    monkeypatch.chdir(tmp_path)
    for argv in (["list"], ["list", "--app", "cli_app:WORKFLOWS"]):
        run = cli_run(*argv)
        assert run.code == 2
        line = run.error_line()
        assert "needs a store" in line
        assert all(word in line for word in ("--store", "GORCH_STORE", "--app", "GORCH_APP"))
    as_json = cli_run("list", "--json").json_error()
    assert as_json["error"] == "UsageError" and "--store" in as_json["detail"]
    assert list(tmp_path.iterdir()) == []  # no ./gorch.db appeared


# --------------------------------------------------------------------------- run-due / worker


def test_run_due_finishes_deferred_resumes(cli_run: Any, store_url: str) -> None:
    deferred = Engine(store_url, cli_app.WORKFLOWS, defer_resume=True)
    deferred.start("expense", "exp-d", {"amount": 5})
    assert deferred.get("exp-d").data["history"] == []

    before = datetime.now(UTC).replace(microsecond=0)
    report = cli_run("run-due", "--json", *APP).json()
    assert set(report) == {"results", "processed", "skipped", "failed"}
    assert [(r["id"], r["action"], r["status"], r["error"]) for r in report["results"]] == [
        ("exp-d", "resume", "waiting", "")
    ]
    assert datetime.fromisoformat(report["results"][0]["at"]) >= before
    assert (report["processed"], report["skipped"], report["failed"]) == (1, 0, 0)
    assert deferred.get("exp-d").data["history"] == ["manager asked to approve 5.00"]
    assert cli_run("run-due", "--json", *APP).json() == {
        "results": [],
        "processed": 0,
        "skipped": 0,
        "failed": 0,
    }
    human = cli_run("run-due", *APP)
    assert human.out.splitlines() == ["0 processed, 0 skipped, 0 failed"]


def test_run_due_lines_carry_timestamps(cli_run: Any, store_url: str) -> None:
    deferred = Engine(store_url, cli_app.WORKFLOWS, defer_resume=True)
    for i in range(3):
        deferred.start("expense", f"exp-{i}", {"amount": i + 1})
    lines = cli_run("run-due", *APP).out.splitlines()
    assert [re.sub(STAMP, "T", line) for line in lines] == [
        "T exp-0: resume -> waiting",
        "T exp-1: resume -> waiting",
        "T exp-2: resume -> waiting",
        "3 processed, 0 skipped, 0 failed",
    ]


def test_run_due_limit_and_all(cli_run: Any, store_url: str) -> None:
    deferred = Engine(store_url, cli_app.WORKFLOWS, defer_resume=True)
    for i in range(5):
        deferred.start("expense", f"exp-{i}", {"amount": i + 1})
    helped = cli_run("run-due", "--help").out
    assert "--limit N" in helped and "--all" in helped
    first = cli_run("run-due", "--limit", "2", *APP)
    assert first.out.splitlines()[-1] == "2 processed, 0 skipped, 0 failed"
    rest = cli_run("run-due", "--all", *APP)
    assert rest.out.splitlines()[-1] == "3 processed, 0 skipped, 0 failed"
    assert cli_run("run-due", "--limit", "0", *APP).code == 2
    both = cli_run("run-due", "--limit", "2", "--all", *APP)
    assert both.code == 2 and "exclude" in both.error_line()


def test_run_due_exits_1_when_an_instance_failed(cli_run: Any, store_url: str) -> None:
    engine = Engine(store_url, cli_app.WORKFLOWS, defer_resume=True)
    engine.start("expense", "exp-x", {"amount": 5})
    # An app that does not know the instance's workflow (say, a deploy that dropped it).
    run = cli_run("run-due", "--store", store_url, "--app", "cli_app:NONE")
    assert run.code == 1
    assert run.out.splitlines()[-1] == "0 processed, 0 skipped, 1 failed"
    assert "UnknownWorkflow" in run.out
    engine.start("expense", "exp-y", {"amount": 5})  # exp-x waits out its error backoff
    as_json = cli_run("run-due", "--json", "--store", store_url, "--app", "cli_app:NONE")
    assert as_json.code == 1
    report = json.loads(as_json.out)
    assert report["failed"] == 1 and "UnknownWorkflow" in report["results"][0]["error"]


# --------------------------------------------------------------------------- history


def test_history_tells_what_happened(cli_run: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    engine.send("exp-1", "decide", {"approved": True, "by": "ann"})
    body = cli_run("history", "exp-1", "--json", *APP).json()
    assert set(body) == {"id", "entries", "dropped"}
    assert (body["id"], body["dropped"]) == ("exp-1", 0)
    assert body["entries"] == [json.loads(e.model_dump_json()) for e in engine.history("exp-1")]
    kinds = [(e["kind"], e["name"]) for e in body["entries"]]
    assert kinds[0] == ("started", "expense") and kinds[-1] == ("finished", None)
    assert ("event", "decide") in kinds
    human = cli_run("history", "exp-1", *APP).out.splitlines()
    assert len(human) == len(kinds)
    assert all(re.match(STAMP + " ", line) for line in human)
    (decided,) = [line for line in human if " event " in line]
    assert 'input={"approved": true, "by": "ann"}' in decided
    assert 'output={"status": "approved"}' in decided


def test_history_names_who_started_from_the_cli(
    cli_run: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USER", "carol")
    monkeypatch.setenv("LOGNAME", "carol")
    assert cli_run("start", "ticket", '{"title": "a"}', "--id", "t-1", *APP).code == 0
    assert (
        cli_run("start", "ticket", '{"title": "b"}', "--id", "t-2", "--by", "ops-bot", *APP).code
        == 0
    )
    assert engine.history("t-1")[0].by == "cli:carol"
    assert engine.history("t-2")[0].by == "ops-bot"
    assert "by=cli:carol" in cli_run("history", "t-1", *APP).out.splitlines()[0]


def test_who_runs_the_cli_when_the_system_cannot_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    from gorch.cli import base as cli_module

    def nobody() -> str:
        raise OSError("no login name")

    monkeypatch.setattr(cli_module.getpass, "getuser", nobody)
    assert cli_module._actor(None) == "cli:unknown"
    assert cli_module._actor("ann") == "ann"


@pytest.mark.skipif(
    not all(
        "by" in inspect.signature(m).parameters for m in (Engine.send, Engine.cancel, Engine.retry)
    ),
    reason="Engine.send, cancel and retry take no by= yet: their entries name nobody",
)
def test_history_names_who_sent_cancelled_and_retried_from_the_cli(
    cli_run: Any, engine: Engine, broken_charge: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USER", "carol")
    monkeypatch.setenv("LOGNAME", "carol")
    engine.start("ticket", "t-1", {"title": "a"})
    assert cli_run("send", "t-1", "close", '"ann"', *APP).code == 0
    engine.start("ticket", "t-2", {"title": "b"})
    assert cli_run("cancel", "t-2", "--by", "ops-bot", *APP).code == 0
    engine.start("charge", "c-1", {"amount": 5})
    cli_app.Charge.broken = False
    assert cli_run("retry", "c-1", *APP).code == 0
    assert [e.by for e in engine.history("t-1") if e.kind == "event"] == ["cli:carol"]
    assert [e.by for e in engine.history("t-2") if e.kind == "cancelled"] == ["ops-bot"]
    assert [e.by for e in engine.history("c-1") if e.kind == "retried"] == ["cli:carol"]


def test_history_of_an_unknown_id(cli_run: Any, engine: Engine) -> None:
    run = cli_run("history", "nope", *APP)
    assert run.code == 1 and "WorkflowNotFound" in run.error_line()
    assert cli_run("history", "nope", "--json", *APP).json_error()["error"] == "WorkflowNotFound"


# --------------------------------------------------------------------------- purge


def test_purge_deletes_finished_and_cancelled_instances_only(cli_run: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 1})
    engine.send("exp-1", "decide", {"approved": True, "by": "ann"})  # finished
    engine.start("ticket", "t-1", {"title": "a"})
    engine.cancel("t-1")  # cancelled
    engine.start("ticket", "t-2", {"title": "b"})  # waiting: stays
    kept = record(engine.store, "t-2")
    old = cli_run("purge", "--finished-before", "1d", "--json", *APP).json()
    assert old["purged"] == 0  # nothing is a day old yet
    soon = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    body = cli_run("purge", "--finished-before", soon, "--batch", "1", "--json", *APP).json()
    assert set(body) == {"purged", "finished_before", "statuses"}
    assert (body["purged"], body["statuses"]) == (2, ["finished", "cancelled"])
    assert datetime.fromisoformat(body["finished_before"]) == datetime.fromisoformat(soon)
    assert [i.id for i in engine.list().items] == ["t-2"]
    assert record(engine.store, "t-2") == kept
    human = cli_run("purge", "--finished-before", soon, *APP)
    assert human.out.startswith("purged 0 instance(s) (finished, cancelled)")


def test_purge_of_failed_instances_only_when_asked(
    cli_run: Any, engine: Engine, broken_charge: None
) -> None:
    engine.start("charge", "c-1", {"amount": 3})
    soon = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert cli_run("purge", "--finished-before", soon, "--json", *APP).json()["purged"] == 0
    run = cli_run("purge", "--finished-before", soon, "--status", "failed", "--json", *APP)
    assert run.json()["purged"] == 1
    assert engine.list().items == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["purge"], "--finished-before"),
        (["purge", "--finished-before", "yesterday"], "neither an ISO 8601"),
        (["purge", "--finished-before", "1d", "--status", "waiting"], "waiting"),
        (["purge", "--finished-before", "1d", "--batch", "0"], "--batch"),
    ],
    ids=["no-when", "bad-when", "active-status", "batch-0"],
)
def test_purge_usage_errors_delete_nothing(
    cli_run: Any, engine: Engine, argv: list[str], expected: str
) -> None:
    engine.start("ticket", "t-1", {"title": "a"})
    engine.cancel("t-1")
    run = cli_run(*argv, *APP)
    assert run.code == 2
    assert expected in run.err
    assert [i.id for i in engine.list().items] == ["t-1"]


# --------------------------------------------------------------------------- check


def test_check_passes_when_the_code_fits_every_instance(cli_run: Any, engine: Engine) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    engine.start("expense", "exp-1", {"amount": 3})
    human = cli_run("check", *APP)
    assert (human.code, human.out) == (0, "checked 2 instance(s): ok\n")
    assert cli_run("check", "--json", *APP).json() == {"ok": True, "checked": 2, "problems": []}


def test_check_exits_1_and_names_each_instance_that_would_break(
    cli_run: Any, engine: Engine, store_url: str
) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    engine.start("expense", "exp-1", {"amount": 3})
    rec = engine.store.load("exp-1")
    engine.store.save("exp-1", rec.version, rec.status, b"not a blob", rec.wake_at)
    before = record(engine.store, "exp-1"), record(engine.store, "t-1")
    argv = ("check", "--app", "cli_app:NEXT_RELEASE", "--store", store_url)
    run = cli_run(*argv, "--json")
    assert run.code == 1 and run.err == ""
    report = json.loads(run.out)
    assert (report["ok"], report["checked"]) == (False, 2)
    assert {(p["id"], p["kind"]) for p in report["problems"]} >= {
        ("exp-1", "blob_corrupt"),
        ("t-1", "cursor_missing"),
    }
    assert set(report["problems"][0]) >= {"id", "workflow", "kind", "detail", "thread"}
    human = cli_run(*argv)
    assert human.code == 1
    assert human.out.splitlines()[0].startswith("checked 2 instance(s): ")
    assert any("exp-1" in line and "blob_corrupt" in line for line in human.out.splitlines())
    assert (record(engine.store, "exp-1"), record(engine.store, "t-1")) == before


def test_check_needs_the_app(cli_run: Any, store_url: str) -> None:
    run = cli_run("check")
    assert run.code == 2 and "--app" in run.error_line()


# --------------------------------------------------------------------------- migrate


def test_migrate_on_sqlite_has_nothing_to_do(cli_run: Any, store_url: str) -> None:
    run = cli_run("migrate", *APP)
    assert (run.code, run.err) == (0, "")
    assert "no migration" in run.out or "schema ready" in run.out


def test_migrate_json_prints_json(cli_run: Any, store_url: str) -> None:
    report = cli_run("migrate", "--json", *APP).json()
    assert report["store"] == store_url and isinstance(report["migrated"], bool)


@pytest.fixture
def pg_schema_url() -> Iterator[tuple[str, str]]:
    """A PostgreSQL URL whose search_path is a fresh, empty schema (dropped afterwards)."""
    require_server("postgres")
    import psycopg
    from psycopg import sql

    schema = f"gorch_cli_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    sep = "&" if "?" in PG_DSN else "?"
    try:
        yield f"{PG_DSN}{sep}options=-csearch_path%3D{schema}", schema
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_migrate_on_postgres_creates_the_schema(
    cli_run: Any, pg_schema_url: tuple[str, str]
) -> None:
    import psycopg

    url, schema = pg_schema_url
    run = cli_run("migrate", "--store", url, *APP)
    assert (run.code, run.err) == (0, "")
    assert "schema ready" in run.out
    with psycopg.connect(PG_DSN) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (f"{schema}.gorch_workflows",)).fetchone()
    assert row is not None and row[0] is not None
    # the schema works: an instance can be started and listed through the CLI
    engine = Engine(url, cli_app.WORKFLOWS)
    engine.start("ticket", "t-1", {"title": "printer"})
    engine.store.close()
    listed = cli_run("list", "--store", url, "--json", *APP).json()
    assert [i["id"] for i in listed["items"]] == ["t-1"]
    assert cli_run("migrate", "--store", url, "--json", *APP).json()["migrated"] is True


# --------------------------------------------------------------------------- --app, --store, --json


POSITIONS = {
    "after": lambda argv: [*argv, *APP, "--json"],
    "before": lambda argv: [*APP, "--json", *argv],
    "mixed": lambda argv: ["--json", *argv, *APP],
}
COMMANDS = {
    "show": ["show", "t-1"],
    "list": ["list"],
    "send": ["send", "t-1", "close", '"bob"'],
    "cancel": ["cancel", "t-1"],
}


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_app_and_json_before_or_after_the_command(
    cli_run: Any, engine: Engine, command: str, position: str
) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    body = cli_run(*POSITIONS[position](COMMANDS[command])).json()
    snapshot = json.loads(engine.get("t-1").model_dump_json())
    if command == "list":
        assert [i["id"] for i in body["items"]] == ["t-1"]
    elif command == "send":
        assert body == {"output": "closed by bob", "workflow": snapshot}
    else:
        assert body == snapshot
        assert body["status"] == ("cancelled" if command == "cancel" else "waiting")


def test_the_commands_own_app_wins_over_the_groups(
    cli_run: Any, engine: Engine, store_url: str
) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    run = cli_run("--app", "cli_app:NONE", "show", "t-1", "--app", "cli_app:WORKFLOWS")
    assert run.code == 0, run.err
    run = cli_run("--app", "cli_app:WORKFLOWS", "show", "t-1", "--app", "cli_app:NONE")
    assert run.code == 1 and "UnknownWorkflow" in run.error_line()


def test_app_may_be_a_workflows_mapping(cli_run: Any, engine: Engine, store_url: str) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    run = cli_run("show", "t-1", "--json", "--app", "cli_app:WORKFLOWS", "--store", store_url)
    assert run.json()["data"]["title"] == "printer"


def test_app_from_the_gorch_app_variable(
    cli_run: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    monkeypatch.setenv("GORCH_APP", "cli_app:engine")
    assert cli_run("show", "t-1", "--json").json()["workflow"] == "ticket"


def test_the_apps_engine_store_is_used_without_store_or_gorch_store(
    cli_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = Engine(f"sqlite:///{tmp_path / 'own.db'}", cli_app.WORKFLOWS)
    own.start("ticket", "t-own", {"title": "own store"})
    monkeypatch.setattr(cli_app, "engine", own)
    monkeypatch.delenv("GORCH_STORE", raising=False)
    assert cli_run("show", "t-own", "--json", *APP).json()["data"]["title"] == "own store"


def test_store_flag_wins_over_the_apps_engine_store(
    cli_run: Any, engine: Engine, store_url: str, tmp_path: Path
) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    other = f"sqlite:///{tmp_path / 'other.db'}"
    run = cli_run("show", "t-1", "--store", other, *APP)
    assert run.code == 1
    assert "WorkflowNotFound" in run.error_line()


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        ("cli_app", "module:attribute"),
        ("no_such_module_here:engine", "no_such_module_here"),
        ("cli_app:missing", "missing"),
        ("cli_app:not_an_app", "neither"),
    ],
)
def test_a_bad_app_is_a_usage_error(cli_run: Any, store_url: str, app: str, expected: str) -> None:
    run = cli_run("list", "--app", app)
    assert run.code == 2
    assert expected in run.error_line()
    as_json = cli_run("list", "--app", app, "--json")
    assert as_json.code == 2
    assert as_json.json_error()["error"] == "UsageError"


@pytest.mark.parametrize(
    "argv",
    [["bogus"], ["show"], ["send", "exp-1"], ["list", "--limit", "many"], ["list", "--nope"]],
    ids=["unknown-command", "missing-id", "missing-event", "bad-int", "unknown-option"],
)
def test_bad_usage_exits_with_2(cli_run: Any, store_url: str, argv: list[str]) -> None:
    run = cli_run(*argv)
    assert run.code == 2
    assert run.out == ""
    assert run.err.splitlines()[0].startswith("Usage: gorch")
    assert run.err.splitlines()[-1].startswith("Error: ")
    as_json = cli_run(*argv, "--json")
    assert as_json.code == 2
    body = as_json.json_error()
    assert body["error"] == "UsageError" and body["detail"] == run.err.splitlines()[-1][7:]


def test_no_command_prints_the_help_and_exits_2(cli_run: Any) -> None:
    run = cli_run()
    assert run.code == 2 and run.out == ""
    for command in ("start", "send", "show", "list", "run-due", "worker", "serve", "migrate"):
        assert command in run.err


@pytest.mark.parametrize(
    "argv",
    [["show", "nope"], ["send", "nope", "x"], ["cancel", "nope"], ["retry", "nope"]],
    ids=["show", "send", "cancel", "retry"],
)
def test_gorch_errors_as_json(cli_run: Any, store_url: str, argv: list[str]) -> None:
    run = cli_run(*argv, "--json", *APP)
    assert run.code == 1
    body = run.json_error()
    assert body["error"] == "WorkflowNotFound" and "'nope'" in body["detail"]


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:secret@127.0.0.1:1/x", "redis://:secret@127.0.0.1:1/0"],
    ids=["postgres", "redis"],
)
def test_an_unreachable_store_is_a_one_line_error_without_the_password(
    cli_run: Any, url: str
) -> None:
    run = cli_run("show", "exp-1", "--store", url, *APP)
    assert run.code == 1
    line = run.error_line()
    assert line.startswith("gorch: StoreUnavailable:")
    assert "127.0.0.1:1" in line
    assert "secret" not in line


def test_main_returns_the_exit_code(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    assert main(["show", "nope", *APP]) == 1
    assert main(["list", *APP]) == 0
    assert main(["bogus"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", datetime(2024, 4, 1, 12, tzinfo=UTC)),
        ("1w2d12h", datetime(2024, 4, 22, 0, tzinfo=UTC)),
        ("90m", datetime(2024, 5, 1, 10, 30, tzinfo=UTC)),
        ("2024-03-01", datetime(2024, 3, 1, tzinfo=UTC)),
        ("2024-03-01T10:00:00+02:00", datetime(2024, 3, 1, 8, tzinfo=UTC)),
    ],
)
def test_when_is_a_date_or_an_age(text: str, expected: datetime) -> None:
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert _parse_when(text, now) == expected
    assert _parse_when(text, now).tzinfo is not None


@pytest.mark.parametrize("text", ["yesterday", "30x", "", "2024-13-01", "-3d"])
def test_when_that_is_neither_is_refused(text: str) -> None:
    with pytest.raises(Exception, match="neither an ISO 8601"):
        _parse_when(text, datetime(2024, 5, 1, tzinfo=UTC))


# --------------------------------------------------------------------------- a real process


def gorch_env(store_url: str) -> dict[str, str]:
    env = {**os.environ, "GORCH_STORE": store_url, "PYTHONPATH": str(TESTS_DIR)}
    env.pop("GORCH_APP", None)
    return env


def gorch_process(*argv: str, store_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gorch.cli", *argv],
        env=gorch_env(store_url),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_in_a_real_process(engine: Engine, store_url: str, tmp_path: Path) -> None:
    engine.start("expense", "exp-1", {"amount": 120})

    done = gorch_process(
        "send", "exp-1", "decide", APPROVE, "--json", *APP, store_url=store_url, cwd=tmp_path
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["output"] == {"status": "approved"}
    assert engine.get("exp-1").status == "finished"

    failed = gorch_process("show", "nope", *APP, store_url=store_url, cwd=tmp_path)
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and "WorkflowNotFound" in failed.stderr

    as_json = gorch_process("show", "nope", "--json", *APP, store_url=store_url, cwd=tmp_path)
    assert as_json.returncode == 1 and as_json.stdout == ""
    assert json.loads(as_json.stderr)["error"] == "WorkflowNotFound"


@pytest.mark.parametrize(
    "argv",
    [["list"], ["list", "--json"], ["show", "t-0"], ["--version"]],
    ids=["list", "list-json", "show", "version"],
)
def test_a_closed_pipe_is_no_traceback(
    engine: Engine, store_url: str, tmp_path: Path, argv: list[str]
) -> None:
    """``gorch list | head -1`` once ``head`` has gone: the reading end is closed."""
    for i in range(3):
        engine.start("ticket", f"t-{i}", {"title": "x" * 1000})
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before gorch writes a byte
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "gorch.cli", *argv, *APP],
            env=gorch_env(store_url),
            cwd=tmp_path,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 1


def read_tty(fd: int, proc: subprocess.Popen[bytes]) -> str:
    """Everything written to a pseudo-terminal until the process exits and the tty drains."""
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks).decode(errors="replace")


LONG_OPERATIONS: dict[str, tuple[list[str], str, str, str, int]] = {
    # argv, the progress bar's text, the last line, a key of the JSON and its value
    "run-due": (["run-due"], "running due instances", "3 processed", "processed", 3),
    "check": (["check"], "checking instances", "checked 3 instance(s): ok", "checked", 3),
    "purge": (["purge", "--finished-before", "1d"], "purging", "purged 0", "purged", 0),
}


@pytest.mark.parametrize("command", list(LONG_OPERATIONS))
@pytest.mark.parametrize(
    ("tty", "json_flag", "shown"),
    [(True, False, True), (True, True, False), (False, False, False)],
    ids=["tty", "tty-json", "pipe"],
)
def test_progress_only_on_a_terminal_and_never_with_json(
    store_url: str, tmp_path: Path, command: str, tty: bool, json_flag: bool, shown: bool
) -> None:
    command_argv, description, last_line, key, value = LONG_OPERATIONS[command]
    deferred = Engine(store_url, cli_app.WORKFLOWS, defer_resume=True)
    for i in range(3):
        deferred.start("expense", f"exp-{i}", {"amount": i + 1})
    deferred.store.close()
    argv = [*command_argv, *APP, *(["--json"] if json_flag else [])]
    env = {**gorch_env(store_url), "TERM": "xterm", "COLUMNS": "100"}
    for var in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CI"):
        env.pop(var, None)
    master, slave = pty.openpty() if tty else os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gorch.cli", *argv],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    try:
        err = read_tty(master, proc)
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert proc.wait(timeout=60) == 0, err
    finally:
        os.close(master)
        if proc.stdout:
            proc.stdout.close()
    assert (description in err) is shown, err
    if json_flag:
        assert json.loads(out)[key] == value
    else:
        assert out.splitlines()[-1].startswith(last_line)


def test_a_worker_prints_stamped_lines_and_stops_on_sigterm(store_url: str, tmp_path: Path) -> None:
    deferred = Engine(store_url, cli_app.WORKFLOWS, defer_resume=True)
    deferred.start("expense", "exp-w", {"amount": 5})
    out, err = tmp_path / "worker.out", tmp_path / "worker.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gorch.cli", "worker", *APP, "--poll", "0.05", "--json"],
            env=gorch_env(store_url),
            cwd=tmp_path,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 30
        while not out.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, err.read_text()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, err.read_text()
    (line,) = out.read_text().splitlines()
    result = json.loads(line)
    assert (result["id"], result["action"], result["status"]) == ("exp-w", "resume", "waiting")
    assert re.fullmatch(STAMP, result["at"])
    notes = err.read_text().splitlines()
    assert notes and all(re.match(STAMP + " gorch worker: ", n) for n in notes), notes
    assert "SIGTERM" in notes[-2] and "stopped after 1 workflows" in notes[-1]
    assert deferred.get("exp-w").data["history"] == ["manager asked to approve 5.00"]
