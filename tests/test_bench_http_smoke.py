"""Smoke test of benchmarks/bench_http.py: a real uvicorn server, SQLite and PostgreSQL.

Timings are never asserted: only that every figure is there, is a positive
number, and that no request failed. PostgreSQL follows the skip-or-fail rule of
``tests/stores/store_support.py``.
"""

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from bench_support import leaves, load_bench
from stores.store_support import PG_DSN, require_server

ROW_KEYS = {
    "requests",
    "seconds",
    "requests_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "mean_ms",
    "errors",
}
CALL_KEYS = {"direct_loads", "direct_writes", "http_loads", "http_writes"}


def _bench() -> ModuleType:
    return load_bench("bench_http")


def _check_report(report: dict[str, Any], kind: str) -> None:
    meta, figures = report["meta"], report["figures"]
    assert meta["quick"] is True
    assert meta["stores"] == [kind]
    levels = meta["concurrency"]
    assert levels[0] == 1 and len(levels) == 2 and levels[1] > 1
    assert report["skipped"] == {}
    assert report["errors"] == {}  # every request answered 200, right body, instance finished
    assert set(figures) == {kind, "store_calls"}
    names = {f"{path}_c{level}" for path in ("direct", "http") for level in levels}
    assert set(figures[kind]) == names
    for name, row in figures[kind].items():
        assert set(row) == ROW_KEYS, name
        assert row["errors"] == 0, name
        assert row["requests"] <= meta["requests"], name  # fewer if --max-seconds ran out
    assert set(figures["store_calls"]) == CALL_KEYS

    found = leaves(figures)
    assert len(found) == len(names) * len(ROW_KEYS) + len(CALL_KEYS)
    for path, value in found:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), path
        if not path.endswith("/errors"):
            assert value > 0, path


def test_quick_run_on_sqlite_writes_every_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(bench.tempfile, "tempdir", str(temp))
    out = tmp_path / "http.json"

    assert bench.main(["--quick", "--stores", "sqlite", "--json", out]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    _check_report(report, "sqlite")
    assert list(temp.iterdir()) == []  # the SQLite files and the server's files are gone
    printed = capsys.readouterr().out
    for word in ("sqlite", "direct", "http", "p99 ms", "store calls per event"):
        assert word in printed


def test_quick_run_on_postgres_writes_every_figure_and_drops_its_table(tmp_path: Path) -> None:
    require_server("postgres")
    import psycopg

    bench = _bench()
    out = tmp_path / "http.json"

    assert bench.main(["--quick", "--stores", "postgres", "--json", out]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    _check_report(report, "postgres")
    table = report["meta"]["postgres_table"]
    assert table.startswith("gorch_bench_http_")
    with psycopg.connect(PG_DSN) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
    assert row == (None,)


def test_an_unreachable_postgres_is_skipped_and_said(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    monkeypatch.setattr(bench, "PG_DSN", "postgresql://postgres@127.0.0.1:1/none")

    report = bench.run_all(bench.Config(quick=True, stores=["postgres"]))

    assert "server unreachable" in report["skipped"]["postgres"]
    assert set(report["figures"]) == {"store_calls"}
    assert "postgres SKIPPED" in capsys.readouterr().err
    assert "SKIPPED: server unreachable" in bench.render(report)


@pytest.mark.parametrize(
    "args",
    [["--requests", "0"], ["--concurrency", "-1"], ["--max-seconds", "x"], ["--stores", "redis"]],
)
def test_bad_arguments_are_refused(args: list[str]) -> None:
    with pytest.raises(SystemExit):
        _bench().main(args)
