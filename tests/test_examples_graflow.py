"""Graflow's examples (examples/graflow_*.py) run as scripts and say what they did."""

from __future__ import annotations

from example_support import run_example


def section(text: str, title: str) -> str:
    """The lines of the section that starts with ``== {title}``, up to the next one."""
    _, sep, rest = text.partition(f"== {title}")
    assert sep, text
    return rest.split("\n== ", 1)[0]


def said(text: str) -> list[str]:
    """What the tasks printed (indented lines), in order."""
    return [line.strip() for line in text.splitlines() if line.startswith("   ")]


def test_simple_pipeline_runs_from_start_from_middle_and_within_a_budget() -> None:
    out = run_example("graflow_simple.py")
    info = section(out, "the pipeline")
    assert "tasks: 3 (start, middle, end)" in info
    assert "dependencies: 2 (start -> middle, middle -> end)" in info
    assert "DAG('simple_pipeline', ['start', 'middle', 'end'])" in info

    full = section(out, "execute from start")
    assert said(full) == ["Starting!", "Middle!", "End!"]
    assert "-> finished after 3 steps" in full

    skipped = section(out, "execute from middle")
    assert said(skipped) == ["Middle!", "End!"]
    assert "-> finished after 2 steps" in skipped

    budget = section(out, "execute with a budget of 2 steps")
    first, sep, later = budget.partition("... later")
    assert sep, budget
    assert said(first)[:2] == ["Starting!", "Middle!"]
    assert "End!" not in first
    assert "-> resuming after 2 steps" in first
    assert said(later)[-1] == "End!"
    assert "-> finished" in later
    assert out.rstrip().endswith("Pipeline completed successfully!")


def test_diamond_passes_return_values_and_a_new_engine_runs_only_what_failed() -> None:
    out = run_example("graflow_diamond.py")
    first = section(out, "process 1")
    assert said(first)[:3] == [
        "source: value=5",
        "double: 5 * 2 = 10",
        "triple: the service is down",
    ]
    assert "-> failed: failed nodes: triple: ConnectionError" in first
    assert "skipped: combine" in first
    assert "nodes source=completed, double=completed, triple=failed, combine=skipped" in first
    assert "results {'input': {'value': 5}, 'source': 5, 'double': 10}" in first

    second = section(out, "process 2")
    ran = [line for line in said(second) if not line.startswith(("stored:", "result:"))]
    assert ran == ["triple: 5 * 3 = 15", "combine: 10 + 15 = 25"]  # source, double not re-run
    assert "-> finished" in second
    assert "result: 25" in second


def test_edges_add_up_refuse_a_cycle_and_resume_after_a_budget() -> None:
    out = run_example("graflow_edges.py")
    edges = said(section(out, "edges, as declared"))
    assert edges == [
        "load_a -> validate",
        "load_b -> validate",
        "validate -> process_a",
        "validate -> process_b",
        "process_a -> store",
        "process_b -> store",
    ]
    cycle = section(out, "a cycle is refused")
    assert "the edge store -> validate makes a cycle: store -> validate -> process_a -> store" in (
        cycle
    )
    assert "edges still: 6" in cycle

    first = section(out, "call 1")
    assert said(first)[:3] == ["load_a: 3 rows", "load_b: 2 rows", "validate: 5 valid rows"]
    assert "process_" not in first
    assert "-> resuming; results so far: ['load_a', 'load_b', 'validate']" in first

    second = section(out, "call 2")
    assert said(second)[:3] == ["process_a: sum 36", "process_b: max 20", "store: sum=36 max=20"]
    assert "-> finished: sum=36 max=20" in second
