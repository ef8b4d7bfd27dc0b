"""What the benchmark scripts share: timing with the GC paused, tables, number formats."""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Rows aligned in columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def fmt(x: float) -> str:
    """A figure with as many digits as it deserves."""
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def timed(run: Callable[[], Any]) -> float:
    """Seconds taken by ``run()``, with the garbage collector paused (as ``timeit`` does)."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def emit(report: dict[str, Any], rendered: str, json_path: str | None) -> None:
    """Print the tables; with ``--json PATH``, also write every figure there."""
    import json

    print(rendered)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
            f.write("\n")


class Repeats(Protocol):
    """What :func:`measure` needs of a benchmark's configuration."""

    warmup: int
    repeats: int


def measure(
    prepare: Callable[[], Any],
    op: Callable[[Any], Any],
    count: int,
    cfg: Repeats,
    check: Callable[[Any], bool] | None = None,
) -> dict[str, float]:
    """Time ``op(item)`` over ``count`` items made by ``prepare()`` (untimed).

    Returns the median and the best of ``cfg.repeats`` repeats, in µs per op,
    after ``cfg.warmup`` untimed rounds. ``check(result)`` (if given) is
    applied to every result after the timed region.
    """
    samples: list[float] = []
    for r in range(cfg.warmup + cfg.repeats):
        items = [prepare() for _ in range(count)]
        results: list[Any] = [None] * count

        def run(items: list[Any] = items, results: list[Any] = results) -> int:
            for k, item in enumerate(items):
                results[k] = op(item)
            return len(items)

        elapsed = timed(run)
        if check is not None:
            for res in results:
                if not check(res):
                    raise AssertionError(f"benchmark op gave an unexpected result: {res!r}")
        if r >= cfg.warmup:
            samples.append(elapsed / count)
    return summary(samples)


def summary(per_op_seconds: Sequence[float]) -> dict[str, float]:
    """Median and best of the samples, in µs."""
    import statistics

    us = [s * 1e6 for s in per_op_seconds]
    return {"median_us": statistics.median(us), "best_us": min(us)}


def environment() -> dict[str, Any]:
    """Where the figures were taken: gorch, Python and the machine (each report's meta)."""
    import platform

    import gorch

    return {
        "gorch": gorch.__version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def count_calls(obj: object, names: Sequence[str]) -> dict[str, int]:
    """Wrap methods ``names`` of ``obj`` to count their calls; the counts, updated live."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        method = getattr(obj, name)

        def counted(*args: Any, _m: Callable[..., Any] = method, _n: str = name) -> Any:
            counts[_n] += 1
            return _m(*args)

        setattr(obj, name, counted)
    return counts


#: The Go benchmark of gorchestrate/async with (a)'s workflow (in its ``async_test.go``).
GO_BENCH = "BenchmarkXxx"


def run_go(directory: str, bench: str, ops: int, repeats: int) -> list[float]:
    """Seconds per op of each of ``repeats`` runs of the Go benchmark ``bench`` in ``directory``
    (a checkout of gorchestrate/async; benchmarks/README.md says how to build it).

    Each run does ``ops`` iterations (``-benchtime Nx``), as a batch of gorch's does,
    and at least 10 000 (a quarter of a second): fewer leave Go's figure to chance.
    """
    cmd = ["go", "test", "-run", "^$", "-bench", f"^{bench}$"]
    cmd += ["-benchtime", f"{max(ops, 10_000)}x", "-count", str(repeats)]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=directory)
    except FileNotFoundError:
        raise SystemExit("--go needs the go command on PATH (see benchmarks/README.md)") from None
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"{' '.join(cmd)} failed in {directory}:\n{e.stdout}{e.stderr}") from None
    found = re.findall(rf"^{re.escape(bench)}(?:-\d+)?\s+\d+\s+([\d.]+) ns/op", out.stdout, re.M)
    if not found:
        raise SystemExit(f"no {bench} figure in the output of {' '.join(cmd)}:\n{out.stdout}")
    return [float(ns) / 1e9 for ns in found]


def add_go_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--go DIR`` and ``--go-bench NAME``: ``what`` the script does with Go's benchmark."""
    parser.add_argument("--go", metavar="DIR", help=f"a checkout of gorchestrate/async: {what}")
    parser.add_argument("--go-bench", default=GO_BENCH, help="its benchmark's name")


def go_checkout(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The ``--go`` directory as an absolute path (None without it); a usage error if missing."""
    if args.go is None:
        return None
    if not os.path.isdir(args.go):
        parser.error(f"--go {args.go}: no such directory")
    return os.path.abspath(args.go)
