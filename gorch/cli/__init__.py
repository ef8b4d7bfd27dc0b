"""The ``gorch`` command line: start, drive, inspect and purge stored workflows; run workers.

Where the workflow classes come from: ``--app module:attr`` (or ``GORCH_APP``)
names an :class:`gorch.Engine`, or a mapping of workflow names to classes. The
store is the engine's, unless ``--store URL`` (or ``GORCH_STORE``) says
otherwise; with neither, a command that needs a store says so rather than
creating one in the working directory. ``--app``, ``--store`` and ``--json``
may come before or after the command name.

Output is for humans by default; with ``--json`` stdout carries JSON only and
an error is one JSON line on stderr (``{"error": name, "detail": message}``,
the HTTP API's shape). Exit codes: 0 done, 1 a gorch error (one line, no
traceback) or something that would break (``check``, ``run-due``), 2 bad usage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from gorch.cli import instances, maintenance, serving, workers  # noqa: F401 - they add the commands
from gorch.cli.base import CLIError, Settings, _parse_when, cli

__all__ = ["CLIError", "Settings", "_parse_when", "cli", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    return cast(int, cli.main(argv, "gorch", standalone_mode=False))
