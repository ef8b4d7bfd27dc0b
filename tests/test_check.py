"""The pre-deploy check: ``Engine.check`` and ``gorch.testing.check_samples`` (issue 13, item 5).

Instances are started with one version of the code, then checked by an
Engine on the same store that registers the next version.
"""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import pytest

import gorch
from gorch import DAG, On, Parallel, S, Select, Step
from gorch.check import format_report
from gorch.stores.memory import MemoryStore
from gorch.stores.sqlite import SQLiteStore
from gorch.testing import check_samples, save_samples


def noop() -> None:
    pass


class Order(gorch.Workflow):
    amount: int = 0
    start_input = ("amount",)

    def definition(self) -> gorch.Section:
        return S(
            Step("prepare", noop),
            Select("await payment", On("pay"), On("cancel")),
            Step("ship", noop),
        )


class OrderRenamedSelect(Order):
    def definition(self) -> gorch.Section:
        return S(Step("prepare", noop), Select("wait for payment", On("pay")), Step("ship", noop))


class OrderWithoutPay(Order):
    def definition(self) -> gorch.Section:
        return S(Step("prepare", noop), Select("await payment", On("cancel")), Step("ship", noop))


class OrderStrict(Order):
    currency: str  # a new required field: stored data no longer validates


class OrderBroken(Order):
    def definition(self) -> gorch.Section:
        raise RuntimeError("definition broke")


class Fanout(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "checks",
                Step("credit", noop),
                S(Step("ask", noop), Select("docs", On("uploaded")), Step("file", noop)),
            ),
            Step("done", noop),
        )


class FanoutRenamedInside(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "checks",
                Step("credit", noop),
                S(Step("ask kyc", noop), Select("docs", On("uploaded")), Step("file it", noop)),
            ),
            Step("done", noop),
        )


class FanoutBranchMoved(gorch.Workflow):
    """The branch that waits in "docs" is gone; "docs" is now the main thread's."""

    def definition(self) -> gorch.Section:
        return S(
            Parallel("checks", Step("credit", noop)),
            Select("docs", On("uploaded")),
            Step("done", noop),
        )


class Pipeline(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(
            DAG(
                "etl",
                Step("extract", noop),
                gorch.Node("wait", Select("approve", On("ok")), after=["extract"]),
                Step("load", noop, after=["wait"]),
            )
        )


class PipelineWithoutExtract(gorch.Workflow):
    def definition(self) -> gorch.Section:
        return S(
            DAG(
                "etl",
                gorch.Node("wait", Select("approve", On("ok"))),
                Step("load", noop, after=["wait"]),
            )
        )


V1 = {"order": Order, "fanout": Fanout, "pipeline": Pipeline}


def started(store: Any) -> gorch.Engine:
    """Two orders, a fan-out and a pipeline in flight, and one finished order."""
    engine = gorch.Engine(store, V1)
    engine.start("order", "o1", {"amount": 1})
    engine.start("order", "o2", {"amount": 2})
    engine.start("fanout", "f1", {})
    engine.start("pipeline", "p1", {})
    engine.start("order", "o3", {"amount": 3})
    engine.send("o3", "pay", None)
    assert engine.get("o3").status == "finished"
    return engine


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Any:
    if request.param == "memory":
        yield MemoryStore()
        return
    s = SQLiteStore(str(tmp_path / "check.db"))
    yield s
    s.close()


def kinds(report: gorch.CheckReport) -> set[tuple[str, str]]:
    return {(p.id, p.kind) for p in report.problems}


def test_unchanged_code_strands_nothing(store: Any) -> None:
    report = started(store).check()
    assert report.ok and report.problems == []
    assert report.checked == 4  # the finished order is not looked at


def test_a_renamed_select_is_a_missing_cursor(store: Any) -> None:
    started(store)
    report = gorch.Engine(store, {**V1, "order": OrderRenamedSelect}).check()
    assert not report.ok
    assert kinds(report) == {("o1", "cursor_missing"), ("o2", "cursor_missing")}
    (p, _) = report.problems
    assert (p.workflow, p.thread) == ("order", gorch.MAIN_THREAD)
    assert "await payment" in p.detail


def test_a_removed_case_is_a_missing_event(store: Any) -> None:
    started(store)
    report = gorch.Engine(store, {**V1, "order": OrderWithoutPay}).check()
    assert kinds(report) == {("o1", "event_missing"), ("o2", "event_missing")}
    assert "'pay'" in report.problems[0].detail


def test_data_that_no_longer_validates(store: Any) -> None:
    started(store)
    report = gorch.Engine(store, {**V1, "order": OrderStrict}).check()
    assert kinds(report) == {("o1", "data_invalid"), ("o2", "data_invalid")}
    assert "currency" in report.problems[0].detail


def test_a_definition_that_no_longer_builds(store: Any) -> None:
    started(store)
    report = gorch.Engine(store, {**V1, "order": OrderBroken}).check()
    assert kinds(report) == {("o1", "definition_error"), ("o2", "definition_error")}
    assert "definition broke" in report.problems[0].detail


def test_an_unregistered_workflow(store: Any) -> None:
    started(store)
    report = gorch.Engine(store, {"order": Order, "fanout": Fanout}).check()
    assert kinds(report) == {("p1", "unknown_workflow")}
    assert "'pipeline'" in report.problems[0].detail


def test_a_rename_inside_a_parallel_branch_strands_nothing(store: Any) -> None:
    started(store)
    engine = gorch.Engine(store, {**V1, "fanout": FanoutRenamedInside})
    assert engine.check().ok
    engine.send("f1", "uploaded", None)  # and the check was right: it finishes
    assert engine.get("f1").status == "finished"


def test_a_branch_whose_cursor_left_it_is_a_missing_thread(store: Any) -> None:
    started(store)
    report = gorch.Engine(store, {**V1, "fanout": FanoutBranchMoved}).check()
    assert kinds(report) == {("f1", "thread_missing")}
    assert report.problems[0].thread == "checks.ask>>docs>>file"


def test_a_removed_dag_node(store: Any) -> None:
    started(store)
    report = gorch.Engine(store, {**V1, "pipeline": PipelineWithoutExtract}).check()
    assert kinds(report) == {("p1", "dag_node_missing")}
    assert "'extract'" in report.problems[0].detail


def test_a_corrupt_blob_is_reported_and_left_as_it_is(store: Any) -> None:
    engine = started(store)
    rec = store.load("o2")
    store.save("o2", rec.version, rec.status, b"\x93garbage", rec.wake_at)
    before = store.load("o2")
    report = engine.check()
    assert kinds(report) == {("o2", "blob_corrupt")}
    assert report.checked == 4
    assert store.load("o2") == before  # the check writes nothing


def test_pages_and_progress(store: Any) -> None:
    engine = started(store)
    for i in range(4):
        engine.start("order", f"x{i}", {})
    seen: list[tuple[int, int | None]] = []
    report = engine.check(page_size=3, progress=lambda done, total: seen.append((done, total)))
    assert report.ok and report.checked == 8
    assert seen == [(3, None), (6, None), (8, None)]  # all 8 are waiting


def test_a_bad_page_size_is_refused() -> None:
    with pytest.raises(ValueError, match="page_size"):
        gorch.Engine(MemoryStore(), V1).check(page_size=0)


def test_report_is_json_with_the_cli_names(store: Any) -> None:
    started(store)
    report = gorch.Engine(store, {**V1, "order": OrderWithoutPay}).check()
    data = report.model_dump(mode="json")
    assert set(data) == {"ok", "checked", "problems"}
    assert set(data["problems"][0]) == {"id", "workflow", "kind", "detail", "thread"}
    text = format_report(report)
    assert "o1" in text and "event_missing" in text


def test_async_engine_checks_alike(tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    sync = gorch.Engine(url, V1)
    started(sync.store)

    async def main() -> gorch.CheckReport:
        engine = gorch.AsyncEngine(url, {**V1, "order": OrderRenamedSelect})
        try:
            return await engine.check(page_size=1)
        finally:
            await engine.close()

    report = asyncio.run(main())
    assert report.checked == 4
    assert kinds(report) == {("o1", "cursor_missing"), ("o2", "cursor_missing")}
    assert report == gorch.Engine(sync.store, {**V1, "order": OrderRenamedSelect}).check()


# --------------------------------------------------------------------------- samples


def test_samples_saved_from_a_store_check_against_new_code(
    store: Any, tmp_path: pathlib.Path
) -> None:
    started(store)
    folder = tmp_path / "samples"
    paths = save_samples(store, folder)
    assert sorted(p.relative_to(folder).as_posix() for p in paths) == [
        "fanout/f1.gorch",
        "order/o1.gorch",
        "order/o2.gorch",
        "pipeline/p1.gorch",
    ]
    assert (folder / "order" / "o1.gorch").read_bytes() == store.load("o1").blob
    assert check_samples(folder, V1).checked == 4
    with pytest.raises(AssertionError) as info:
        check_samples(folder, {**V1, "order": OrderRenamedSelect})
    assert "o1" in str(info.value) and "cursor_missing" in str(info.value)


def test_samples_per_workflow_cap(store: Any, tmp_path: pathlib.Path) -> None:
    started(store)
    assert len(save_samples(store, tmp_path, per_workflow=1)) == 3


def test_a_corrupt_sample_is_a_readable_failure(tmp_path: pathlib.Path) -> None:
    (tmp_path / "order").mkdir()
    (tmp_path / "order" / "bad.gorch").write_bytes(b"not msgpack at all")
    with pytest.raises(AssertionError, match=r"bad.*blob_corrupt"):
        check_samples(tmp_path, V1)


def test_an_empty_sample_folder_is_an_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(AssertionError, match="no samples"):
        check_samples(tmp_path / "missing", V1)
