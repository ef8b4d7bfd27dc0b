"""The app the multi-process worker tests run with ``gorch worker --app tests.worker_app:engine``.

``engine``'s store: a Redis URL can name no key prefix, so the tests isolate a
Redis worker with ``WORKER_APP_REDIS_URL`` and ``WORKER_APP_REDIS_PREFIX``;
otherwise ``engine`` is in memory and the worker is given ``--store URL``
(the CLI then keeps only ``engine.workflows``).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import gorch
from gorch import S, Select, Step, Timeout
from gorch.engine import Engine
from gorch.stores import Store, open_store


def append_line(path: str, line: str) -> None:
    """Append one line with a single O_APPEND write, so concurrent writers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class Alarm(gorch.Workflow):
    """Rings once, ``after_s`` seconds after it starts waiting, then finishes.

    Ringing counts in ``rings`` and appends ``NAME PID`` to the file ``markers``.
    """

    name: str
    markers: str
    after_s: float = 0.0
    rings: int = 0

    def definition(self) -> gorch.Section:
        return S(
            Select(
                "wait",
                Timeout("ring", timedelta(seconds=self.after_s), Step("ring bell", self.ring)),
            )
        )

    def ring(self) -> None:
        self.rings += 1
        append_line(self.markers, f"{self.name} {os.getpid()}")


class SlowJob(gorch.Workflow):
    """One step that takes ``seconds``, run by a worker as soon as its timer of 0 s fires.

    The step appends ``start PID`` and then ``done PID`` to the file ``log``.
    """

    log: str
    seconds: float
    finished_step: bool = False

    def definition(self) -> gorch.Section:
        return S(Select("wait", Timeout("go", 0, Step("slow step", self.work))))

    def work(self) -> None:
        append_line(self.log, f"start {os.getpid()}")
        time.sleep(self.seconds)
        self.finished_step = True
        append_line(self.log, f"done {os.getpid()}")


WORKFLOWS: dict[str, type[gorch.Workflow]] = {"alarm": Alarm, "slow job": SlowJob}


def _store() -> Store:
    url = os.environ.get("WORKER_APP_REDIS_URL")
    if not url:
        return open_store("memory://")
    from gorch.stores.redis import RedisStore

    return RedisStore(url, prefix=os.environ["WORKER_APP_REDIS_PREFIX"])


engine = Engine(_store(), WORKFLOWS)
