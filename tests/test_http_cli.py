"""``gorch serve`` and ``gorch graph``: ``main([...])`` in-process.

``serve`` is checked with ``uvicorn.run`` replaced, driving the app it was
given; ``test_http.py`` runs it once as a real server. Errors follow the CLI's
rules: one line on stderr, exit code 1 for a GorchError and 2 for bad usage.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from http_app import WORKFLOWS, Order, Survey

import gorch.graph
from gorch.cli import main
from gorch.codec import loads
from gorch.engine import Engine
from gorch.http import sign

with warnings.catch_warnings():  # newer Starlette warns that its TestClient moves to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

MAP = ["--app", "http_app:WORKFLOWS"]


@dataclass
class Run:
    code: int
    out: str
    err: str

    def error_line(self) -> str:
        assert self.out == ""
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        return lines[0]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Any:
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


# --------------------------------------------------------------------------- graph


def test_graph_of_a_class_prints_its_mermaid(cli: Any, store_url: str) -> None:
    run = cli("graph", "http_app:Order")
    assert (run.code, run.err) == (0, "")
    assert run.out == gorch.graph.mermaid(Order).rstrip("\n") + "\n"


def test_graph_of_a_registered_name(cli: Any, store_url: str) -> None:
    run = cli("graph", "survey", *MAP)
    assert run.code == 0
    assert run.out == gorch.graph.mermaid(Survey).rstrip("\n") + "\n"


def test_graph_of_an_instance_marks_its_cursors(cli: Any, store_url: str) -> None:
    engine = Engine(store_url, WORKFLOWS)
    engine.start("order", "o-1", {"item": "book"})
    wf, state = loads(engine.store.load("o-1").blob, Order)
    run = cli("graph", "--id", "o-1", *MAP)
    assert (run.code, run.err) == (0, "")
    assert run.out == gorch.graph.mermaid(wf, state).rstrip("\n") + "\n"
    assert run.out != cli("graph", "http_app:Order").out
    as_json = json.loads(cli("graph", "--id", "o-1", "--json", *MAP).out)
    assert as_json == {"workflow": "order", "id": "o-1", "mermaid": gorch.graph.mermaid(wf, state)}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["graph"], "graph needs"),
        (["graph", "http_app:Order", "--id", "o-1", *MAP], "graph needs"),
        (["graph", "http_app:Payment"], "not a gorch.Workflow"),
        (["graph", "http_app:Nothing"], "no attribute"),
        (["graph", "order"], "pass --app"),
    ],
    ids=["nothing", "both", "not-a-workflow", "missing-attr", "name-without-app"],
)
def test_graph_usage_errors_exit_2(
    cli: Any, store_url: str, argv: list[str], expected: str
) -> None:
    run = cli(*argv)
    assert run.code == 2
    assert expected in run.error_line()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["graph", "nope", *MAP], "gorch: UnknownWorkflow:"),
        (["graph", "--id", "o-404", *MAP], "gorch: WorkflowNotFound:"),
        (["graph", "--id", "..%2F..", *MAP], "gorch: InvalidWorkflowId:"),
    ],
    ids=["unknown-name", "unknown-id", "bad-id"],
)
def test_graph_errors_exit_1(cli: Any, store_url: str, argv: list[str], expected: str) -> None:
    run = cli(*argv)
    assert run.code == 1
    assert run.error_line().startswith(expected)


# --------------------------------------------------------------------------- serve


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What ``gorch serve`` handed to ``uvicorn.run`` (which is not really called)."""
    calls: dict[str, Any] = {}

    def fake_run(app: Any, **kw: Any) -> None:
        calls["app"] = app
        calls.update(kw)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    return calls


def test_serve_runs_the_app_with_the_secrets_from_the_environment(
    cli: Any, store_url: str, served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_SECRET", "s3")
    monkeypatch.setenv("MY_TOKEN", "t0")
    run = cli(
        "serve",
        *MAP,
        "--host",
        "0.0.0.0",
        "--port",
        "9123",
        "--secret-env",
        "MY_SECRET",
        "--token-env",
        "MY_TOKEN",
        "--max-body",
        "64",
    )
    assert run.code == 0, run.err
    assert (served["host"], served["port"], served["log_level"]) == ("0.0.0.0", 9123, "info")
    assert "order, survey, pinger, inbox on http://0.0.0.0:9123" in run.err
    assert "s3" not in run.err and "t0" not in run.err
    body = b'{"item": "x"}'
    auth = {"Authorization": "Bearer t0", "content-type": "application/json"}
    with TestClient(served["app"]) as c:
        assert c.put("/workflows/order/o-1", content=body, headers=auth).status_code == 401
        r = c.put(
            "/workflows/order/o-1",
            content=body,
            headers={**auth, **sign("s3", "PUT", "/workflows/order/o-1", body)},
        )
        assert r.status_code == 201, r.text
        assert c.get("/workflows/o-1").status_code == 401  # the token guards reads
        big = b'{"item": "' + b"x" * 100 + b'"}'
        r = c.put(
            "/workflows/order/o-2",
            content=big,
            headers={**auth, **sign("s3", "PUT", "/workflows/order/o-2", big)},
        )
        assert r.status_code == 413
    assert Engine(store_url, WORKFLOWS).get("o-1").data["item"] == "x"  # the --store/env store


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", *MAP, "--secret-env", "NOT_SET_ANYWHERE"], "NOT_SET_ANYWHERE"),
        (["serve", *MAP, "--token-env", "NOT_SET_ANYWHERE"], "NOT_SET_ANYWHERE"),
        (["serve"], "needs --app"),
        (["serve", *MAP, "--max-body", "0"], "--max-body"),
    ],
    ids=["secret-unset", "token-unset", "no-app", "max-body"],
)
def test_serve_usage_errors_exit_2_without_serving(
    cli: Any, store_url: str, served: dict[str, Any], argv: list[str], expected: str
) -> None:
    run = cli(*argv)
    assert run.code == 2
    assert expected in run.error_line()
    assert served == {}


def test_serve_refuses_to_start_open_unless_insecure(
    cli: Any, store_url: str, served: dict[str, Any]
) -> None:
    run = cli("serve", *MAP)
    assert run.code == 2
    assert "--insecure" in run.error_line() and "--secret-env" in run.error_line()
    assert served == {}

    run = cli("serve", *MAP, "--insecure")
    assert run.code == 0, run.err
    startup = [line for line in run.err.splitlines() if line.startswith("gorch serve:")]
    assert startup and all("INSECURE" in line for line in startup)
    with TestClient(served["app"]) as c:  # open indeed: what --insecure means
        r = c.put("/workflows/order/o-1", json={"item": "x"})
        assert r.status_code == 201, r.text


def test_gorch_send_refuses_a_timer(cli: Any, store_url: str) -> None:
    engine = Engine(store_url, WORKFLOWS)
    engine.start("order", "o-1", {"item": "x"})
    before = engine.store.load("o-1")
    run = cli("send", *MAP, "o-1", "expire")
    assert run.code == 1
    assert "TimerNotSendable" in run.error_line() and "fires when due" in run.error_line()
    assert engine.store.load("o-1") == before
    engine.store.close()
