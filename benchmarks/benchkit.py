"""What the benchmark scripts share: timing with the GC paused, tables, number formats."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any


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
