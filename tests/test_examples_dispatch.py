"""The queue dispatch examples, each run as a script: the story it prints, and nothing left.

``examples/celery_dispatch.py`` runs on RabbitMQ and on Redis (``BROKER_URL``),
``examples/procrastinate_dispatch.py`` on PostgreSQL. Each starts its own
worker subprocess, so a worker's pid in the output must not be the script's.
A missing server skips locally and fails under ``CI`` / ``GORCH_REQUIRE_SERVICES``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from stores.store_support import PG_DSN, require_server
from test_dispatch_celery import BROKERS, require_broker

celery = pytest.importorskip("celery")
pytest.importorskip("procrastinate")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_script(name: str, cwd: Path, **env: str) -> str:
    """Run ``examples/<name>`` in an empty directory; its stdout (it must succeed and leave
    the directory empty)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert list(cwd.iterdir()) == [], "the example wrote into its working directory"
    return done.stdout


@pytest.mark.parametrize("broker", sorted(BROKERS))
def test_celery_example_has_a_worker_resume_and_finish_an_expense(
    broker: str, tmp_path: Path
) -> None:
    url = BROKERS[broker]
    require_broker(url)
    out = run_script("celery_dispatch.py", tmp_path, BROKER_URL=url)
    queue = re.search(r"queue (gorch-example-\w+), store (\S+)", out)
    assert queue, out
    worker = re.search(r"worker started \(pid (\d+)\)", out)
    assert worker, out
    lines = out.splitlines()
    assert "start exp-1 returned at once: resuming (a message asks to resume it)" in lines
    assert "the worker resumed exp-1: waiting for approve" in lines
    assert "send approve returned at once: resuming" in lines
    paid = re.search(r"exp-1 finished: 120\.0 paid by pid (\d+) .*this script is pid (\d+)", out)
    assert paid, out
    assert paid[1] == worker[1] != paid[2], "the worker, not the script, ran the step"
    assert lines[-1] == "cleaned up: worker stopped, queue deleted, store removed"
    assert not Path(queue[2]).exists(), "the store was left behind"
    with pytest.raises(ProcessLookupError):
        os.kill(int(worker[1]), 0)  # the worker is gone
    assert not _broker_keeps(url, queue[1]), "the queue was left on the broker"


def _broker_keeps(url: str, queue: str) -> bool:
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        try:
            return any(True for _ in client.scan_iter(match=f"{queue}*"))
        finally:
            client.close()
    with celery.Celery(broker=url).connection() as conn:
        try:
            conn.default_channel.queue_declare(queue, passive=True)
        except Exception:  # NOT_FOUND: gone (the channel is closed by the broker)
            return False
        conn.default_channel.queue_delete(queue)  # not the example's job to leave it
        return True


def test_procrastinate_example_commits_the_job_with_the_order_and_a_worker_runs_it(
    tmp_path: Path,
) -> None:
    require_server("postgres")
    out = run_script("procrastinate_dispatch.py", tmp_path, DATABASE_URL=PG_DSN)
    schema = re.search(r"schema (gorch_example_\w+) in", out)
    assert schema, out
    lines = out.splitlines()
    assert "order 41 rolled back -> orders 0, instances 0, jobs []" in lines
    assert "order 42 placed, not committed -> orders 0, instances 0, jobs []" in lines
    committed = re.search(
        r"order 42 committed -> orders 1, instances 1, jobs \[gorch:(\w+) todo\]", out
    )
    assert committed, out
    wid = committed[1]
    assert f"instance {wid}: resuming" in lines
    worker = re.search(r"worker started \(pid (\d+)\)", out)
    ran = re.search(
        r"confirmed by pid (\d+) \(this script is pid (\d+)\), waiting for payment", out
    )
    assert worker and ran, out
    assert ran[1] == worker[1] != ran[2], "the worker, not the script, ran the step"
    both = f"gorch:{wid} succeeded, gorch:{wid} succeeded"
    assert f"paid: instance finished -> orders 1, instances 1, jobs [{both}]" in lines
    assert lines[-1] == f"cleaned up: worker stopped, schema {schema[1]} dropped"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema[1],)
        ).fetchone()
    assert left == (0,), "the schema was left behind"
    with pytest.raises(ProcessLookupError):
        os.kill(int(worker[1]), 0)
