"""Loading the benchmark scripts in tests (they are scripts, not a package)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_bench(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` once, as the scripts see their folder."""
    if name in sys.modules:
        return sys.modules[name]
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


def leaves(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (path, value) leaf of nested dicts."""
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in leaves(v, f"{path}/{k}")]
    return [(path, obj)]


def stand_in_go(tmp_path: Path, ns_per_op: int) -> tuple[Path, dict[str, str]]:
    """A ``go`` command on PATH that answers ``go test -bench`` as Go prints it, and logs
    its arguments and working directory (the real toolchain is not on CI machines).

    Its ``k``-th call (from 0) prints two runs, ``ns_per_op + 1000 k + 500`` and
    ``ns_per_op + 1000 k`` ns/op: the best run of each call tells the calls apart.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "go-calls.log"
    script = bin_dir / "go"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$PWD $*" >> {log}\n'
        f"k=$(wc -l < {log})\n"
        f"best=$(( {ns_per_op} + 1000 * (k - 1) ))\n"
        "echo 'goos: linux'\n"
        "echo 'pkg: github.com/gorchestrate/async'\n"
        "printf 'BenchmarkXxx-2   \\t    2000\\t     %d ns/op\\n' $((best + 500))\n"
        "printf 'BenchmarkXxx-2   \\t    2000\\t     %d ns/op\\n' $best\n"
        "echo PASS\n"
    )
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return log, env
