"""The ``gorch`` command line: ``main([...])`` in-process, and once as a real subprocess.

Workflow classes come from ``tests/cli_app.py`` (``--app cli_app:engine``); the
store is a SQLite file per test, named by ``GORCH_STORE`` or ``--store``.
Errors must be one line on stderr, exit code 1 for a GorchError and 2 for bad usage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import cli_app
import pytest
from stores.store_support import PG_DSN, require_server

from gorch.cli import main
from gorch.demo import DemoExpense
from gorch.engine import Engine
from gorch.stores import Store

TESTS_DIR = Path(__file__).resolve().parent
APP = ["--app", "cli_app:engine"]
APPROVE = '{"approved": true, "by": "ann"}'


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def error_line(self) -> str:
        """The one line of an error on stderr (and nothing on stdout)."""
        assert self.out == ""
        lines = self.err.splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{self.err}"
        return lines[0]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Any:
    """Run ``main(argv)`` and capture its exit code and output (argparse exits via SystemExit)."""

    def run(*argv: str) -> Run:
        capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

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


def record(store: Store, id: str) -> tuple[bytes, int, str, datetime | None]:
    rec = store.load(id)
    return rec.blob, rec.version, rec.status, rec.wake_at


# --------------------------------------------------------------------------- demo


def test_demo_runs_an_expense_approval_end_to_end(
    cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GORCH_STORE", raising=False)
    run = cli("demo")
    assert (run.code, run.err) == (0, "")
    assert "store: memory://" in run.out
    assert "paid, approved by ann" in run.out
    assert "fired ['expired']" in run.out
    assert "no answer within 3 days: escalated" in run.out


def test_demo_keeps_its_instances_in_the_given_store(cli: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    run = cli("demo", "--store", url)
    assert run.code == 0
    engine = Engine(url, {"expense": DemoExpense})
    items = engine.list().items
    assert sorted(i.status for i in items) == ["finished", "finished"]
    assert sorted(engine.get(i.id).data["status"] for i in items) == ["escalated", "paid"]


def test_demo_json_prints_json(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GORCH_STORE", raising=False)
    run = cli("demo", "--json")
    assert run.code == 0
    run.json()  # --json promises machine-readable output


# --------------------------------------------------------------------------- show


def test_show_prints_status_awaited_events_and_data(cli: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    run = cli("show", "exp-1", *APP)
    assert (run.code, run.err) == (0, "")
    assert run.out.splitlines()[0].startswith("exp-1  (expense)  waiting")
    assert "awaits 'decide'" in run.out and "awaits 'expired'" in run.out
    assert '"amount": 120.0' in run.out


def test_show_json_is_the_snapshot(cli: Any, engine: Engine) -> None:
    snap = engine.start("expense", "exp-1", {"amount": 120})
    shown = cli("show", "exp-1", "--json", *APP).json()
    assert shown["id"] == "exp-1" and shown["workflow"] == "expense"
    assert shown["status"] == "waiting"
    assert shown["data"]["amount"] == 120.0
    assert sorted(e["name"] for e in shown["awaited"]) == ["decide", "expired"]
    assert datetime.fromisoformat(shown["next_wakeup"]) == snap.next_wakeup
    assert shown == json.loads(engine.get("exp-1").model_dump_json())


def test_show_of_an_unknown_id_is_a_one_line_error(cli: Any, engine: Engine) -> None:
    run = cli("show", "nope", *APP)
    assert run.code == 1
    line = run.error_line()
    assert line.startswith("gorch: WorkflowNotFound:") and "'nope'" in line


def test_show_of_an_invalid_id_is_a_one_line_error(cli: Any, engine: Engine) -> None:
    run = cli("show", "not an id", *APP)
    assert run.code == 1
    assert "InvalidWorkflowId" in run.error_line()


# --------------------------------------------------------------------------- send


def test_send_json_returns_the_output_and_the_instance(cli: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    run = cli("send", "exp-1", "decide", APPROVE, "--json", *APP)
    assert (run.code, run.err) == (0, "")
    sent = run.json()
    assert sent["output"] == {"status": "approved"}
    assert sent["workflow"]["status"] == "finished"
    assert sent["workflow"]["data"]["status"] == "paid"
    assert engine.get("exp-1").data["history"][-1] == "paid, approved by ann"


def test_send_prints_the_output_for_humans(cli: Any, engine: Engine) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    run = cli("send", "t-1", "close", '"bob"', *APP)
    assert run.code == 0
    assert run.out.splitlines()[0] == 'output: "closed by bob"'
    assert "t-1  (ticket)  finished" in run.out
    assert engine.get("t-1").data["closed_by"] == "bob"


def test_send_with_thread_and_pc(cli: Any, engine: Engine) -> None:
    snap = engine.start("ticket", "t-1", {"title": "printer"})
    pc = snap.awaited[0].pc
    args = ("send", "t-1", "close", '"bob"', "--thread", "_main_", "--pc", str(pc), *APP)
    assert cli(*args).code == 0
    assert engine.get("t-1").status == "finished"


def test_send_of_a_stale_pc_is_refused(cli: Any, engine: Engine) -> None:
    snap = engine.start("ticket", "t-1", {"title": "printer"})
    before = record(engine.store, "t-1")
    run = cli("send", "t-1", "close", '"bob"', "--pc", str(snap.awaited[0].pc + 1), *APP)
    assert run.code == 1
    assert "StaleEvent" in run.error_line()
    assert record(engine.store, "t-1") == before


def test_send_of_input_that_is_not_json_is_a_usage_error(cli: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    before = record(engine.store, "exp-1")
    run = cli("send", "exp-1", "decide", "{approved: yes}", *APP)
    assert run.code == 2
    assert "JSON" in run.error_line()
    assert record(engine.store, "exp-1") == before


def test_send_of_invalid_input_is_a_one_line_error(cli: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    before = record(engine.store, "exp-1")
    run = cli("send", "exp-1", "decide", '{"approved": "maybe"}', *APP)
    assert run.code == 1
    assert record(engine.store, "exp-1") == before
    line = run.error_line()  # pydantic's message spans lines; the CLI must keep it to one
    assert line.startswith("gorch: InvalidEventInput:") and "decide" in line


def test_send_to_a_cancelled_instance_is_refused(cli: Any, engine: Engine) -> None:
    engine.start("expense", "exp-1", {"amount": 120})
    engine.cancel("exp-1")
    before = record(engine.store, "exp-1")
    run = cli("send", "exp-1", "decide", APPROVE, *APP)
    assert run.code == 1
    assert "WorkflowNotActive" in run.error_line()
    assert record(engine.store, "exp-1") == before


# --------------------------------------------------------------------------- list


def test_list_filters_by_status_and_workflow(cli: Any, engine: Engine) -> None:
    for i in (1, 2, 3):
        engine.start("expense", f"exp-{i}", {"amount": i})
    engine.send("exp-2", "decide", {"approved": True, "by": "ann"})
    engine.start("ticket", "t-1", {"title": "printer"})

    run = cli("list", "--status", "waiting", "--workflow", "expense", "--json", *APP)
    assert run.code == 0
    page = run.json()
    assert [i["id"] for i in page["items"]] == ["exp-1", "exp-3"]
    assert {(i["workflow"], i["status"]) for i in page["items"]} == {("expense", "waiting")}
    assert page["next_cursor"] is None

    human = cli("list", "--status", "waiting", *APP)
    assert [line.split()[:3] for line in human.out.splitlines()] == [
        ["exp-1", "expense", "waiting"],
        ["exp-3", "expense", "waiting"],
        ["t-1", "ticket", "waiting"],
    ]
    finished = cli("list", "--status", "finished", "--json", *APP).json()
    assert [i["id"] for i in finished["items"]] == ["exp-2"]


def test_list_pages_with_limit_and_after(cli: Any, engine: Engine) -> None:
    for i in (1, 2, 3):
        engine.start("expense", f"exp-{i}", {"amount": i})
    first = cli("list", "--limit", "2", "--json", *APP).json()
    assert [i["id"] for i in first["items"]] == ["exp-1", "exp-2"]
    assert first["next_cursor"]
    second = cli("list", "--limit", "2", "--after", first["next_cursor"], "--json", *APP).json()
    assert [i["id"] for i in second["items"]] == ["exp-3"]
    assert second["next_cursor"] is None
    human = cli("list", "--limit", "2", *APP)
    assert f"--after {first['next_cursor']}" in human.out.splitlines()[-1]


# --------------------------------------------------------------------------- run-due / migrate


def test_run_due_finishes_deferred_resumes(cli: Any, store_url: str) -> None:
    deferred = Engine(store_url, cli_app.WORKFLOWS, defer_resume=True)
    deferred.start("expense", "exp-d", {"amount": 5})
    assert deferred.get("exp-d").data["history"] == []

    run = cli("run-due", "--json", *APP)
    assert run.code == 0
    report = run.json()
    assert [(r["id"], r["action"], r["status"], r["error"]) for r in report["results"]] == [
        ("exp-d", "resume", "waiting", "")
    ]
    assert (report["processed"], report["skipped"], report["failed"]) == (1, 0, 0)
    assert deferred.get("exp-d").data["history"] == ["manager asked to approve 5.00"]
    assert cli("run-due", "--json", *APP).json() == {
        "results": [],
        "processed": 0,
        "skipped": 0,
        "failed": 0,
    }
    human = cli("run-due", *APP)
    assert human.out.splitlines() == ["0 processed, 0 skipped, 0 failed"]


def test_run_due_limit_and_all(cli: Any, store_url: str) -> None:
    deferred = Engine(store_url, cli_app.WORKFLOWS, defer_resume=True)
    for i in range(5):
        deferred.start("expense", f"exp-{i}", {"amount": i + 1})
    assert "--limit N" in cli("run-due", "--help").out and "--all" in cli("run-due", "--help").out
    first = cli("run-due", "--limit", "2", *APP)
    assert first.out.splitlines()[-1] == "2 processed, 0 skipped, 0 failed"
    rest = cli("run-due", "--all", *APP)
    assert rest.out.splitlines()[-1] == "3 processed, 0 skipped, 0 failed"
    assert cli("run-due", "--limit", "0", *APP).code == 2


def test_run_due_exits_1_when_an_instance_failed(cli: Any, store_url: str) -> None:
    engine = Engine(store_url, cli_app.WORKFLOWS, defer_resume=True)
    engine.start("expense", "exp-x", {"amount": 5})
    # An app that does not know the instance's workflow (say, a deploy that dropped it).
    run = cli("run-due", "--store", store_url, "--app", "cli_app:NONE")
    assert run.code == 1
    assert run.out.splitlines()[-1] == "0 processed, 0 skipped, 1 failed"
    assert "UnknownWorkflow" in run.out


def test_migrate_on_sqlite_has_nothing_to_do(cli: Any, store_url: str) -> None:
    run = cli("migrate", *APP)
    assert (run.code, run.err) == (0, "")
    assert "no migration" in run.out


def test_migrate_json_prints_json(cli: Any, store_url: str) -> None:
    run = cli("migrate", "--json", *APP)
    assert run.code == 0
    run.json()  # --json promises machine-readable output


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


def test_migrate_on_postgres_creates_the_schema(cli: Any, pg_schema_url: tuple[str, str]) -> None:
    import psycopg

    url, schema = pg_schema_url
    run = cli("migrate", "--store", url, *APP)
    assert (run.code, run.err) == (0, "")
    assert "schema ready" in run.out
    with psycopg.connect(PG_DSN) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (f"{schema}.gorch_workflows",)).fetchone()
    assert row is not None and row[0] is not None
    # the schema works: an instance can be started and listed through the CLI
    Engine(url, cli_app.WORKFLOWS).start("ticket", "t-1", {"title": "printer"})
    listed = cli("list", "--store", url, "--json", *APP).json()
    assert [i["id"] for i in listed["items"]] == ["t-1"]


# --------------------------------------------------------------------------- --app and --store


def test_app_may_be_a_workflows_mapping(cli: Any, engine: Engine, store_url: str) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    run = cli("show", "t-1", "--json", "--app", "cli_app:WORKFLOWS", "--store", store_url)
    assert run.json()["data"]["title"] == "printer"


def test_app_from_the_gorch_app_variable(
    cli: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    monkeypatch.setenv("GORCH_APP", "cli_app:engine")
    assert cli("show", "t-1", "--json").json()["workflow"] == "ticket"


def test_the_apps_engine_store_is_used_without_store_or_gorch_store(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = Engine(f"sqlite:///{tmp_path / 'own.db'}", cli_app.WORKFLOWS)
    own.start("ticket", "t-own", {"title": "own store"})
    monkeypatch.setattr(cli_app, "engine", own)
    monkeypatch.delenv("GORCH_STORE", raising=False)
    assert cli("show", "t-own", "--json", *APP).json()["data"]["title"] == "own store"


def test_store_flag_wins_over_the_apps_engine_store(
    cli: Any, engine: Engine, store_url: str, tmp_path: Path
) -> None:
    engine.start("ticket", "t-1", {"title": "printer"})
    other = f"sqlite:///{tmp_path / 'other.db'}"
    run = cli("show", "t-1", "--store", other, *APP)
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
def test_a_bad_app_is_a_usage_error(cli: Any, store_url: str, app: str, expected: str) -> None:
    run = cli("list", "--app", app)
    assert run.code == 2
    assert expected in run.error_line()


@pytest.mark.parametrize(
    "argv",
    [["bogus"], ["show"], ["send", "exp-1"], ["list", "--limit", "many"], []],
    ids=["unknown-command", "missing-id", "missing-event", "bad-int", "no-command"],
)
def test_bad_usage_exits_with_2(cli: Any, store_url: str, argv: list[str]) -> None:
    run = cli(*argv)
    assert run.code == 2
    assert run.out == ""
    last = run.err.splitlines()[-1]  # argparse: "usage: ..." then "gorch [COMMAND]: error: ..."
    assert last.startswith("gorch") and ": error: " in last


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:secret@127.0.0.1:1/x", "redis://:secret@127.0.0.1:1/0"],
    ids=["postgres", "redis"],
)
def test_an_unreachable_store_is_a_one_line_error_without_the_password(cli: Any, url: str) -> None:
    run = cli("show", "exp-1", "--store", url, *APP)
    assert run.code == 1
    line = run.error_line()
    assert line.startswith("gorch: StoreUnavailable:")
    assert "127.0.0.1:1" in line
    assert "secret" not in line


# --------------------------------------------------------------------------- a real process


def gorch_process(*argv: str, store_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GORCH_STORE": store_url, "PYTHONPATH": str(TESTS_DIR)}
    env.pop("GORCH_APP", None)
    return subprocess.run(
        [sys.executable, "-m", "gorch.cli", *argv],
        env=env,
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
