"""Benchmark of the HTTP event endpoint: a real uvicorn server on loopback, SQLite and Postgres.

Run from the project root::

    .venv/bin/python benchmarks/bench_http.py            # full run, about a minute
    .venv/bin/python benchmarks/bench_http.py --quick    # under ten seconds, rough figures
    .venv/bin/python benchmarks/bench_http.py --stores sqlite --requests 500 --concurrency 4
    .venv/bin/python benchmarks/bench_http.py --json http.json

For each store, ``gorch.http.create_app(engine)`` is served by uvicorn in a
child process (its own CPU and GIL) on 127.0.0.1, on a free port. Instances of
a small workflow are created beforehand, each waiting in
``Select("wait", On("ping", typed handler))`` before ``Step("record")``. Every
request is ``POST /workflows/{id}/events/ping`` with ``{"seq": n}`` on an
instance of its own: the server loads the record, validates the input, runs
the handler, saves it (compare-and-swap), resumes (the step) and saves the
finished instance. The response (the handler's ``{"pong": n}``) and the
finished record are checked.

The load generator runs ``C`` worker threads, each with its own keep-alive
``httpx.Client``; every row is bounded by ``--requests`` and by
``--max-seconds`` (workers take no new request after it). Per row: requests/s,
latency p50, p90, p99 and max (each request timed by its client), and errors
(a non-2xx answer, a transport error, a wrong body or an instance left
unfinished), which must be 0. Rows are measured at concurrency 1 and ``C``,
through HTTP and, as a baseline, ``engine.send`` called in this process on
the same store ("direct"): the difference is what HTTP costs.

PostgreSQL is found at ``GORCH_PG_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``); if it does not answer, it is
skipped with a note. Every run uses its own Postgres table
(``gorch_bench_http_*``) and a temporary SQLite directory, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pydantic
from benchkit import count_calls, emit, environment, fmt, table

import gorch
from gorch import On, S, Select, Step
from gorch.engine import Engine
from gorch.errors import StoreUnavailable
from gorch.stores import MemoryStore, Store
from gorch.stores._common import redact_url

PG_DSN = os.environ.get("GORCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")

ALL_STORES = ("sqlite", "postgres")
WORKFLOW = "ping"
EVENT = "ping"
FINISHED = "finished"

SERVER_START_S = 60.0  # how long the server may take to answer /healthz
REQUEST_TIMEOUT_S = 30.0  # one request; a hung server ends as errors, not as a hung run


# --------------------------------------------------------------------------- the workflow


class PingIn(pydantic.BaseModel):
    seq: int


class Ping(gorch.Workflow):
    """Wait for one ``ping`` (typed handler), then run one step and finish."""

    pongs: int = 0
    done: bool = False

    def definition(self) -> gorch.Section:
        return S(Select("wait", On(EVENT, self.on_ping)), Step("record", self.record))

    def on_ping(self, p: PingIn) -> dict[str, int]:
        self.pongs += 1
        return {"pong": p.seq}

    def record(self) -> None:
        self.done = True


WORKFLOWS: dict[str, type[gorch.Workflow]] = {WORKFLOW: Ping}


# --------------------------------------------------------------------------- stores


@dataclass(frozen=True)
class Target:
    """Where one store lives; JSON-able, so the server process opens the same one."""

    kind: str
    path: str = ""  # SQLite file
    table: str = ""  # Postgres table

    def open(self) -> Store:
        if self.kind == "sqlite":
            from gorch.stores.sqlite import SQLiteStore

            return SQLiteStore(self.path)
        if self.kind == "postgres":
            from gorch.stores.postgres import PostgresStore

            return PostgresStore(PG_DSN, table=self.table)
        raise ValueError(f"unknown store {self.kind!r}")

    def drop(self) -> None:
        """Remove everything the run wrote (the SQLite files go with the temporary directory)."""
        if self.kind == "postgres":
            import psycopg
            from psycopg import sql

            with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=10) as conn:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(self.table)))


def new_target(kind: str, workdir: str, token: str) -> Target:
    if kind == "sqlite":
        return Target(kind, path=os.path.join(workdir, f"http-{token}.db"))
    return Target(kind, table=f"gorch_bench_http_{token}")


def server_problem(kind: str) -> str | None:
    """Why the database server for ``kind`` cannot be used, or None when it answers."""
    if kind != "postgres":
        return None
    try:
        import psycopg

        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    return None


# --------------------------------------------------------------------------- the server


def serve(target: Target, port_file: str) -> None:
    """The server process: bind a free loopback port, write it to ``port_file``, serve.

    Stops on SIGTERM (uvicorn's graceful shutdown) or when the parent process
    is gone.
    """
    import uvicorn

    from gorch.http import create_app

    engine = Engine(target.open(), WORKFLOWS)
    app = create_app(engine, docs=False)
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on the accepted connections only
    # then, and without it Nagle's algorithm holds back the response body (the headers go
    # first) until the client's delayed ACK: about 40 ms per keep-alive request.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    parent = os.getppid()

    def orphaned() -> None:
        while not server.should_exit:
            if os.getppid() != parent:
                server.should_exit = True
            time.sleep(0.5)

    threading.Thread(target=orphaned, daemon=True).start()
    with open(port_file + ".tmp", "w", encoding="ascii") as f:
        f.write(str(sock.getsockname()[1]))
    os.replace(port_file + ".tmp", port_file)
    server.run(sockets=[sock])


class Server:
    """``serve(target)`` in a child process; ``url`` once ``/healthz`` answers 200."""

    def __init__(self, target: Target, workdir: str) -> None:
        self.target = target
        tag = uuid.uuid4().hex[:8]
        self.port_file = os.path.join(workdir, f"port-{target.kind}-{tag}")
        self.log_path = os.path.join(workdir, f"server-{target.kind}-{tag}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--serve",
            json.dumps(asdict(self.target)),
            "--port-file",
            self.port_file,
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        import httpx

        deadline = time.monotonic() + SERVER_START_S
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer /healthz:\n{self.log()}")
                if not self.url and os.path.exists(self.port_file):
                    with open(self.port_file, encoding="ascii") as f:
                        self.url = f"http://127.0.0.1:{int(f.read())}"
                if self.url:
                    with contextlib.suppress(httpx.TransportError):
                        if client.get(self.url + "/healthz").status_code == 200:
                            return self.url
                time.sleep(0.05)

    def log(self, tail: int = 4000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-tail:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def running(target: Target, workdir: str) -> Iterator[Server]:
    server = Server(target, workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- load generator


Item = tuple[str, int]  # workflow id, the seq sent to it
Call = Callable[[str, int], str | None]  # one event; None if it went right, else what went wrong


@dataclass
class Outcome:
    """What one row measured."""

    latencies: list[float] = field(default_factory=list)  # seconds, every request made
    errors: list[str] = field(default_factory=list)
    sent: list[Item] = field(default_factory=list)  # answered without error
    seconds: float = 0.0
    stopped_early: bool = False


def drive(
    items: Sequence[Item],
    warm: Sequence[Sequence[Item]],
    connect: Callable[[], tuple[Call, Callable[[], None]]],
    max_seconds: float,
) -> Outcome:
    """Send ``items`` from ``len(warm)`` worker threads, at most for ``max_seconds``.

    Each worker opens its own client (``connect()`` -> (call, close)), sends its
    warm-up events (not timed), then all start together and take the next item
    until none is left or the time is up.
    """
    workers = len(warm)
    out = Outcome()
    lock = threading.Lock()
    queue = iter(items)
    clock = time.perf_counter
    window = [0.0, 0.0]  # start, deadline
    ends: list[float] = []

    def started() -> None:
        window[0] = clock()
        window[1] = window[0] + max_seconds

    barrier = threading.Barrier(workers, action=started)
    crashed: list[BaseException] = []

    def work(k: int) -> None:
        latencies: list[float] = []
        errors: list[str] = []
        sent: list[Item] = []
        try:
            call, close = connect()
        except BaseException as exc:
            crashed.append(exc)
            barrier.abort()
            return
        try:
            for wid, seq in warm[k]:
                problem = call(wid, seq)
                if problem is not None:
                    errors.append(f"warm-up {wid}: {problem}")
            barrier.wait()
            while True:
                if clock() >= window[1]:
                    with lock:
                        if next(queue, None) is not None:
                            out.stopped_early = True
                    break
                with lock:
                    item = next(queue, None)
                if item is None:
                    break
                t0 = clock()
                problem = call(*item)
                latencies.append(clock() - t0)
                if problem is None:
                    sent.append(item)
                else:
                    errors.append(f"{item[0]}: {problem}")
        except threading.BrokenBarrierError:
            return
        except BaseException as exc:
            crashed.append(exc)
            barrier.abort()
        finally:
            end = clock()
            close()
            with lock:
                ends.append(end)
                out.latencies.extend(latencies)
                out.errors.extend(errors)
                out.sent.extend(sent)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if crashed:
        raise crashed[0]
    out.seconds = max(ends) - window[0]
    return out


def http_client(url: str) -> Callable[[], tuple[Call, Callable[[], None]]]:
    import httpx

    headers = {"Content-Type": "application/json"}

    def connect() -> tuple[Call, Callable[[], None]]:
        client = httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, headers=headers)
        post = client.post

        def call(wid: str, seq: int) -> str | None:
            body = b'{"seq": %d}' % seq
            try:
                r = post(f"/workflows/{wid}/events/{EVENT}", content=body)
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"
            if r.status_code != 200:
                return f"HTTP {r.status_code} {r.text[:300]}"
            if r.content != b'{"pong":%d}' % seq:
                with contextlib.suppress(ValueError):
                    if r.json() == {"pong": seq}:
                        return None
                return f"unexpected body {r.text[:300]}"
            return None

        return call, client.close

    return connect


def direct_client(engine: Engine) -> Callable[[], tuple[Call, Callable[[], None]]]:
    send = engine.send

    def connect() -> tuple[Call, Callable[[], None]]:
        def call(wid: str, seq: int) -> str | None:
            try:
                out = send(wid, EVENT, {"seq": seq})
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            return None if out == {"pong": seq} else f"unexpected output {out!r}"

        return call, lambda: None

    return connect


# --------------------------------------------------------------------------- rows


class Config:
    """How much to measure; ``quick`` trades precision for speed."""

    def __init__(
        self,
        quick: bool,
        stores: Sequence[str],
        requests: int | None = None,
        concurrency: int | None = None,
        max_seconds: float | None = None,
    ) -> None:
        self.quick = quick
        self.stores = tuple(stores)
        self.requests = requests or (40 if quick else 2000)
        self.concurrency = concurrency or (4 if quick else 8)
        self.max_seconds = max_seconds or (10.0 if quick else 30.0)
        self.warmup = 1 if quick else 5  # per worker, not counted

    @property
    def levels(self) -> list[int]:
        return sorted({1, self.concurrency})


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(out: Outcome) -> dict[str, float]:
    lat = sorted(out.latencies)
    if not lat:
        raise RuntimeError("no request was made (is --max-seconds too small?)")
    ms = 1e3
    return {
        "requests": float(len(lat)),
        "seconds": out.seconds,
        "requests_per_s": len(lat) / out.seconds,
        "p50_ms": percentile(lat, 50) * ms,
        "p90_ms": percentile(lat, 90) * ms,
        "p99_ms": percentile(lat, 99) * ms,
        "max_ms": lat[-1] * ms,
        "mean_ms": sum(lat) / len(lat) * ms,
        "errors": float(len(out.errors)),
    }


def create_instances(
    engine: Engine, prefix: str, count: int, max_seconds: float = math.inf
) -> list[Item]:
    """``count`` waiting instances, or as many as ``max_seconds`` allowed (at least one)."""
    deadline = time.perf_counter() + max_seconds
    items: list[Item] = []
    for i in range(count):
        if items and time.perf_counter() >= deadline:
            break
        wid = f"{prefix}-{i:06d}"
        snap = engine.start(WORKFLOW, wid)
        if snap.status != "waiting":
            raise AssertionError(f"{wid} should wait for {EVENT!r}, not be {snap.status}")
        items.append((wid, i))
    return items


def unfinished(store: Store, sent: Sequence[Item]) -> list[str]:
    """The instances that answered well but were not saved finished (checked after timing)."""
    problems = []
    for wid, _ in sent:
        status = store.load(wid).status
        if status != FINISHED:
            problems.append(f"{wid}: answered, but stored {status!r}, not {FINISHED!r}")
    return problems


def bench_store(kind: str, cfg: Config, workdir: str, token: str) -> dict[str, Any]:
    """Every row on one store: direct and HTTP, at each concurrency level."""
    target = new_target(kind, workdir, token)
    store = target.open()
    rows: dict[str, dict[str, float]] = {}
    errors: dict[str, list[str]] = {}
    notes: dict[str, str] = {}
    server_log = ""
    try:
        engine = Engine(store, WORKFLOWS)
        store.list(limit=1)  # the schema exists before the server opens the store
        with running(target, workdir) as server:
            paths = {"direct": direct_client(engine), "http": http_client(server.url)}
            for level in cfg.levels:
                for path, connect in paths.items():
                    name = f"{path}_c{level}"
                    prefix = f"{name}-{uuid.uuid4().hex[:6]}"
                    spare = create_instances(engine, f"{prefix}-warm", level * cfg.warmup)
                    warm = [spare[k * cfg.warmup : (k + 1) * cfg.warmup] for k in range(level)]
                    # creating them is bounded by --max-seconds too
                    items = create_instances(engine, prefix, cfg.requests, cfg.max_seconds)
                    out = drive(items, warm, connect, cfg.max_seconds)
                    out.errors.extend(unfinished(store, out.sent))
                    rows[name] = summary(out)
                    if out.stopped_early:
                        notes[name] = f"stopped by --max-seconds {cfg.max_seconds:g}"
                    elif len(items) < cfg.requests:
                        notes[name] = (
                            f"only {len(items):,} instances created in --max-seconds "
                            f"{cfg.max_seconds:g}"
                        )
                    if out.errors:
                        errors[name] = out.errors[:5]
                        print(
                            f"bench_http: {kind} {name}: {len(out.errors)} error(s), first: "
                            f"{out.errors[0]}",
                            file=sys.stderr,
                        )
            if errors:
                server_log = server.log()
    finally:
        with contextlib.suppress(Exception):
            store.close()
        target.drop()
    if server_log.strip():
        print(f"bench_http: {kind} server log (tail):\n{server_log}", file=sys.stderr)
    return {"rows": rows, "errors": errors, "notes": notes, "table": target.table}


def store_calls() -> dict[str, float]:
    """Store calls one ping costs through ``engine.send`` and through the app, on a MemoryStore."""
    import asyncio

    import httpx

    from gorch.http import create_app

    store = MemoryStore()
    counts = count_calls(store, ("create", "save", "load"))
    engine = Engine(store, WORKFLOWS)
    engine.start(WORKFLOW, "calls-direct")
    engine.start(WORKFLOW, "calls-http")

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(engine, docs=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            return await client.post(f"/workflows/calls-http/events/{EVENT}", json={"seq": 1})

    out: dict[str, float] = {}
    for path in ("direct", "http"):
        for name in counts:
            counts[name] = 0
        if path == "direct":
            engine.send("calls-direct", EVENT, {"seq": 1})
        else:
            r = asyncio.run(post())
            if r.status_code != 200:
                raise AssertionError(f"the app answered {r.status_code}: {r.text}")
        out[f"{path}_loads"] = float(counts["load"])
        out[f"{path}_writes"] = float(counts["create"] + counts["save"])
        if store.load(f"calls-{path}").status != FINISHED:
            raise AssertionError(f"calls-{path} did not finish")
    return out


# --------------------------------------------------------------------------- report


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("uvicorn", "fastapi", "starlette", "httpx", "h11", "httptools", "uvloop"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def run_all(cfg: Config) -> dict[str, Any]:
    t0 = time.perf_counter()
    skipped: dict[str, str] = {}
    for kind in cfg.stores:
        problem = server_problem(kind)
        if problem is not None:
            skipped[kind] = f"server unreachable ({problem[:100]})"
            print(f"bench_http: {kind} SKIPPED: {skipped[kind]}", file=sys.stderr)
    figures: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    notes: dict[str, str] = {}
    tables: dict[str, str] = {}
    token = uuid.uuid4().hex[:10]
    workdir = tempfile.mkdtemp(prefix="gorch-bench-http-")
    try:
        for kind in cfg.stores:
            if kind in skipped:
                continue
            try:
                result = bench_store(kind, cfg, workdir, token)
            except StoreUnavailable as exc:
                if kind == "sqlite":
                    raise
                why = " ".join(f"{type(exc).__name__}: {exc}".split())[:100]
                skipped[kind] = f"connection lost ({why})"
                print(f"bench_http: {kind} SKIPPED: {skipped[kind]}", file=sys.stderr)
                traceback.print_exc()
                continue
            figures[kind] = result["rows"]
            errors.update({f"{kind}/{k}": v for k, v in result["errors"].items()})
            notes.update({f"{kind}/{k}": v for k, v in result["notes"].items()})
            if result["table"]:
                tables[kind] = result["table"]
        figures["store_calls"] = store_calls()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    versions = _versions()
    return {
        "meta": {
            **environment(),
            "cpus": os.cpu_count(),
            "quick": cfg.quick,
            "stores": list(cfg.stores),
            "requests": cfg.requests,
            "concurrency": cfg.levels,
            "max_seconds": cfg.max_seconds,
            "warmup_per_worker": cfg.warmup,
            "server": (
                f"uvicorn {versions.get('uvicorn', '?')} in a child process, 1 worker, "
                f"{'httptools' if 'httptools' in versions else 'h11'}, "
                f"{'uvloop' if 'uvloop' in versions else 'asyncio'}, access log off"
            ),
            "client": (
                f"httpx {versions.get('httpx', '?')}, one keep-alive Client per worker thread"
            ),
            "versions": versions,
            "postgres": redact_url(PG_DSN) if "postgres" in cfg.stores else "",
            "postgres_table": tables.get("postgres", ""),
            "sqlite_dir": os.path.dirname(workdir),
            "wall_seconds": time.perf_counter() - t0,
            "units": "ms for latencies, s for seconds, requests_per_s; counts otherwise",
        },
        "skipped": skipped,
        "errors": errors,
        "notes": notes,
        "figures": figures,
    }


def render(report: dict[str, Any]) -> str:
    meta, fig = report["meta"], report["figures"]
    skipped, notes, errors = report["skipped"], report["notes"], report["errors"]
    out = [
        f"gorch {meta['gorch']} HTTP event endpoint benchmark — Python {meta['python']} "
        f"({meta['implementation']}), {meta['cpus']} CPUs, "
        f"{'quick' if meta['quick'] else 'full'} run",
        f"server: {meta['server']}",
        f"client: {meta['client']}, on 127.0.0.1",
        f"event: POST /workflows/{{id}}/events/{EVENT} {{'seq': n}} on a waiting instance:",
        "       load, typed handler, CAS save, resume Step 'record', save finished",
        "       ('direct': engine.send in this process on the same store, no HTTP)",
        f"each row: up to {meta['requests']:,} requests, stopped after {meta['max_seconds']:g} s; "
        f"{meta['warmup_per_worker']} warm-up request(s) per worker not counted",
        "",
    ]
    header = ["store", "path", "conc", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms"]
    header += ["max ms", "errors", "note"]
    rows: list[list[str]] = []
    for kind in meta["stores"]:
        if kind in skipped:
            rows.append([kind, *["-"] * (len(header) - 2), f"SKIPPED: {skipped[kind]}"])
            continue
        first = True
        for level in meta["concurrency"]:
            for path in ("direct", "http"):
                name = f"{path}_c{level}"
                v = fig[kind][name]
                note = notes.get(f"{kind}/{name}", "")
                if v["errors"]:
                    note = "ERRORS " + note
                rows.append(
                    [
                        kind if first else "",
                        path,
                        str(level),
                        f"{v['requests']:,.0f}",
                        fmt(v["requests_per_s"]),
                        fmt(v["p50_ms"]),
                        fmt(v["p90_ms"]),
                        fmt(v["p99_ms"]),
                        fmt(v["max_ms"]),
                        f"{v['errors']:.0f}",
                        note.strip(),
                    ]
                )
                first = False
    out.append(table(rows, header))
    overheads = []
    for kind in meta["stores"]:
        if kind in skipped:
            continue
        r = fig[kind]
        p50 = r["http_c1"]["p50_ms"] - r["direct_c1"]["p50_ms"]
        ratio = r["direct_c1"]["requests_per_s"] / r["http_c1"]["requests_per_s"]
        overheads.append(f"{kind} +{p50:.2f} ms at p50, {ratio:.2f}x the time per request")
    if overheads:
        out.append(f"HTTP cost at concurrency 1: {'; '.join(overheads)}")
    calls = fig["store_calls"]
    out.append(
        f"store calls per event: direct {calls['direct_loads']:.0f} load(s), "
        f"{calls['direct_writes']:.0f} write(s); HTTP {calls['http_loads']:.0f} load(s), "
        f"{calls['http_writes']:.0f} write(s)"
    )
    total = sum(len(v) for v in errors.values())
    if total:
        out.append("")
        out.append("ERRORS (must be 0 in a healthy run; first ones per row):")
        for row, items in errors.items():
            out.extend(f"  {row}: {e}" for e in items)
    return "\n".join(out)


# --------------------------------------------------------------------------- command line


def _stores(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ALL_STORES]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown store(s) {', '.join(unknown) or '(none)'}; choose from {','.join(ALL_STORES)}"
        )
    return list(dict.fromkeys(kinds))


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    parser.add_argument(
        "--stores",
        type=_stores,
        default=list(ALL_STORES),
        metavar="LIST",
        help=f"comma-separated stores (default: {','.join(ALL_STORES)})",
    )
    parser.add_argument(
        "--requests",
        type=_positive(int),
        metavar="N",
        help="requests per row (default 2000; 40 with --quick)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive(int),
        metavar="C",
        help="workers of the concurrent rows, besides 1 (default 8; 4 with --quick)",
    )
    parser.add_argument(
        "--max-seconds",
        type=_positive(float),
        metavar="S",
        help="time limit of each row (default 30; 10 with --quick)",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the server process (internal)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    if args.serve:
        serve(Target(**json.loads(args.serve)), args.port_file)
        return 0
    cfg = Config(args.quick, args.stores, args.requests, args.concurrency, args.max_seconds)
    report = run_all(cfg)
    emit(report, render(report), args.json)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
