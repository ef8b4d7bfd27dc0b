"""Real faults on a store's own connections, for the fault-injection tests.

The servers are shared, so everything here touches only what a test created: a
PostgreSQL backend is terminated only by a pid read with ``pg_backend_pid()``
on the store's own connection, a Redis connection is killed only by the id
``CLIENT ID`` returned on the store's own connection, and an SQLite lock is
held by a child process the test started and ends by its handle.

Tools:

* :func:`hooked` makes a store class whose calls can be paused at: ``at(method,
  n, fn)`` runs ``fn`` in the caller's thread right before the ``n``-th next
  call of ``method``. It only arranges *when* a fault lands; the fault itself is
  real (a lock, a terminated backend, a killed connection) and the store's code
  runs unchanged.
* :class:`PgFault` blocks the store's next statement (a table lock) or its next
  ``COMMIT`` (a deferred trigger waiting on an advisory lock), then terminates
  the store's backend while it waits: once, or every time (an outage).
* :class:`FaultProxy` is a TCP relay on 127.0.0.1 between one store and its
  server that can hold back a request (it never reaches the server), drop the
  replies (the server applied the command, the store never hears of it), or
  refuse service altogether (an outage).
* :func:`sqlite_lock_holder` runs another process that holds SQLite's write lock.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

WAIT = 10.0  # seconds: the most any helper waits for a state it expects


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``condition`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        time.sleep(0.005)


# -- pause points ----------------------------------------------------------------------------

HOOKED_METHODS = ("create", "load", "save", "delete", "claim_due", "remember")


class _Hooks:
    """The call counts and pending pause points of one hooked store."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.pending: dict[tuple[str, int], Callable[[], None]] = {}
        self.fired: list[tuple[str, int]] = []

    def before(self, method: str) -> None:
        self.calls[method] += 1
        fn = self.pending.pop((method, self.calls[method]), None)
        if fn is not None:
            self.fired.append((method, self.calls[method]))
            fn()


def _hooked_method(base: type[Any], method: str) -> Callable[..., Any]:
    original = getattr(base, method)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.hooks.before(method)
        return original(self, *args, **kwargs)

    call.__name__ = method
    return call


def hooked(cls: type[Any]) -> type[Any]:
    """A subclass of store class ``cls`` with pause points before its protocol calls."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        self.hooks = _Hooks()

    def at(self: Any, method: str, n: int, fn: Callable[[], None]) -> None:
        """Run ``fn`` right before the ``n``-th call of ``method`` from now on."""
        assert method in HOOKED_METHODS
        self.hooks.pending[(method, self.hooks.calls[method] + n)] = fn

    namespace: dict[str, Any] = {"__init__": __init__, "at": at}
    namespace.update({m: _hooked_method(cls, m) for m in HOOKED_METHODS})
    return type(f"Hooked{cls.__name__}", (cls,), namespace)


# -- PostgreSQL ------------------------------------------------------------------------------


def pg_store(dsn: str, table: str) -> Any:
    """A hooked PostgresStore with one pooled connection, noting the backend pid of every
    connection its pool opens."""
    from gorch.stores.postgres import PostgresStore

    base = hooked(PostgresStore)

    class TrackedPostgresStore(base):  # type: ignore[misc, valid-type]
        def __init__(self, dsn: str, *, table: str) -> None:
            self.pids: list[int] = []
            # Statements not prepared: each request carries its whole statement, so the
            # proxy's "the next request" is the write itself, never a Parse before it.
            super().__init__(dsn, table=table, pool_min=1, pool_max=1, prepare_threshold=None)

        def _configure(self, conn: Any) -> None:
            (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
            self.pids.append(int(pid))

        def current_pid(self) -> int:
            """The backend of the pool's one connection (opened if needed)."""
            with self._connection() as conn:
                return int(conn.info.backend_pid)

    return TrackedPostgresStore(dsn, table=table)


def pg_terminate(dsn: str, store: Any, pid: int) -> bool:
    """Terminate one of the store's own backends (from a connection of ours); wait until gone."""
    import psycopg

    assert pid in store.pids, "only a backend the store itself opened"
    with psycopg.connect(dsn, autocommit=True) as admin:
        (done,) = admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
    return bool(done)


class PgFault:
    """A fault on one store's PostgreSQL backends, from connections of our own.

    ``lock()`` takes ACCESS EXCLUSIVE on the store's tables (records and
    remembered keys): its next statement there blocks. ``gate()`` holds the
    advisory lock the commit gate (see :meth:`install_gate`) waits on: its next
    write blocks at its commit, after the statement ran. Either way a watcher
    thread terminates the store's backend once it waits; with ``outage=True``
    it goes on terminating every backend of the store that waits, until
    :meth:`end`. ``reply_lost(proxy)`` lets the next COMMIT through (it
    commits) and terminates the backend once the reply
    is on its way, which the proxy drops.
    """

    def __init__(self, dsn: str, store: Any, table: str) -> None:
        import psycopg

        self.dsn = dsn
        self.store = store
        self.table = table
        self.gate_key = random.randrange(1, 2**62)
        self._admin = psycopg.connect(dsn, autocommit=True)  # watches and terminates
        self._holder = psycopg.connect(dsn, autocommit=True)  # holds the lock
        self._holding = False
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._error: BaseException | None = None
        self.terminated: list[int] = []

    # -- arming (from a pause point, in the store's thread) ----------------------------

    def lock(self, *, outage: bool = False) -> None:
        from psycopg import sql

        self._holder.execute("BEGIN")
        self._holder.execute(
            sql.SQL("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE").format(
                sql.Identifier(self.table), sql.Identifier(f"{self.table}_seen")
            )
        )
        self._holding = True
        self._watch(outage)

    def gate(self, *, outage: bool = False) -> None:
        self._holder.execute("BEGIN")
        self._holder.execute("SELECT pg_advisory_xact_lock(%s)", (self.gate_key,))
        self._holding = True
        self._watch(outage)

    def reply_lost(self, proxy: FaultProxy) -> None:
        pid = self.store.current_pid()
        proxy.withhold_next_reply()  # the next request on it is the write (it commits)

        def watch() -> None:
            assert proxy.withheld.wait(WAIT), "the COMMIT's reply never came"
            self._terminate(pid)

        self._run(watch)

    def install_gate(self) -> None:
        """A deferred trigger on the table that takes our advisory lock at COMMIT time."""
        from psycopg import sql

        function = sql.Identifier(f"{self.table}_gate")
        self._admin.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN PERFORM pg_advisory_xact_lock_shared({}); RETURN NULL; END $$"
            ).format(function, sql.Literal(self.gate_key))
        )
        for table in (self.table, f"{self.table}_seen"):
            self._admin.execute(
                sql.SQL(
                    "CREATE CONSTRAINT TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {}"
                    " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {}()"
                ).format(sql.Identifier(f"{table}_gate"), sql.Identifier(table), function)
            )

    # -- the watcher ---------------------------------------------------------------------

    def _watch(self, outage: bool) -> None:
        def watch() -> None:
            while not self._stop.is_set():
                pid = self._waiting_pid()
                if pid is None:
                    time.sleep(0.002)
                    continue
                self._terminate(pid)
                if not outage:
                    self._release()
                    return

        self._run(watch)

    def _run(self, body: Callable[[], None]) -> None:
        assert self._watcher is None, "one fault at a time"

        def guarded() -> None:
            try:
                body()
            except BaseException as exc:  # reported by end()
                self._error = exc

        self._watcher = threading.Thread(target=guarded, daemon=True)
        self._watcher.start()

    def _waiting_pid(self) -> int | None:
        row = self._admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s) AND wait_event_type = 'Lock'",
            (list(self.store.pids),),
        ).fetchone()
        return None if row is None else int(row[0])

    def _terminate(self, pid: int) -> None:
        assert pid in self.store.pids, "only a backend the store itself opened"
        (done,) = self._admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
        assert done, f"backend {pid} did not end"
        self.terminated.append(pid)

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self._holder.execute("ROLLBACK")

    def end(self) -> None:
        """Stop the fault (the lock is released, the watcher stops); re-raise its failure."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(WAIT)
            assert not self._watcher.is_alive(), "the fault's watcher did not stop"
            self._watcher = None
        self._release()
        self._stop.clear()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """End the fault and remove the gate (its triggers go with it)."""
        from psycopg import sql

        with contextlib.suppress(Exception):
            self.end()
        with contextlib.suppress(Exception):
            self._admin.execute(
                sql.SQL("DROP FUNCTION IF EXISTS {}() CASCADE").format(
                    sql.Identifier(f"{self.table}_gate")
                )
            )
        for conn in (self._admin, self._holder):
            with contextlib.suppress(Exception):
                conn.close()


def proxied_dsn(dsn: str, port: int) -> str:
    """``dsn`` pointed at a :class:`FaultProxy` on 127.0.0.1:``port``."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params.update(host="127.0.0.1", port=str(port), sslmode="disable", gssencmode="disable")
    return make_conninfo(**params)


def pg_address(dsn: str) -> tuple[str, int]:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    return str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)


# -- Redis -------------------------------------------------------------------------------------


def redis_own_client_id(store: Any) -> int:
    """``CLIENT ID`` sent on the store's own (pooled) connection.

    The pool hands out its most recently used connection first, so in a test
    that uses the store from one thread at a time this is the connection its
    next command goes out on.
    """
    return int(store._client.client_id())


def redis_store_sees_close(store: Any) -> None:
    """Wait until the store's idle connections have seen the server's close.

    Between the store and Redis there may be a relay, which passes the close
    on a little later: until it has, the store cannot know its connection is
    gone, and a command sent then would be lost in flight.
    """
    import redis

    def closed(conn: Any) -> bool:
        try:
            return bool(conn.can_read(timeout=0))
        except (redis.ConnectionError, OSError):
            return True

    pool = store._client.connection_pool

    def idle() -> list[Any]:  # a BlockingConnectionPool keeps them in a queue (None: a slot)
        return [c for c in list(pool.pool.queue) if c is not None]

    wait_until(
        lambda: all(closed(c) for c in idle()),
        "the store's connection to see the server's close",
    )


def redis_kill(url: str, client_id: int) -> None:
    """``CLIENT KILL ID``, from a connection of our own, of one connection of our store."""
    import redis

    admin = redis.Redis.from_url(url)
    try:
        killed = admin.execute_command("CLIENT", "KILL", "ID", str(client_id))
        # The server may close the socket after it answered: wait until it has, so
        # the store's next call finds the connection closed (not a race with it).
        wait_until(
            lambda: not admin.execute_command("CLIENT", "LIST", "ID", str(client_id)).strip(),
            f"Redis client {client_id} to be gone",
        )
    finally:
        admin.close()
    assert killed == 1, f"client {client_id} was not found"


def redis_address(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def proxied_redis_url(url: str, port: int) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{port}"))


class RedisFault:
    """A fault on one RedisStore's connection through a :class:`FaultProxy`.

    ``killed_before_sent()``: the store's next command is held back by the
    proxy, then its connection is killed (``CLIENT KILL ID``): it never ran.
    ``killed_after_applied()``: the next command runs, its reply is dropped,
    then the connection is killed: it ran, the store cannot know. With
    ``outage=True`` the proxy then refuses service until :meth:`end`.
    """

    def __init__(self, url: str, store: Any, proxy: FaultProxy) -> None:
        self.url = url
        self.store = store
        self.proxy = proxy
        self._watcher: threading.Thread | None = None
        self._error: BaseException | None = None
        self.killed: list[int] = []

    def killed_before_sent(self, *, outage: bool = False) -> None:
        self._arm(self.proxy.hold_next_request, self.proxy.held, outage)

    def killed_after_applied(self, *, outage: bool = False) -> None:
        self._arm(self.proxy.withhold_next_reply, self.proxy.withheld, outage)

    def _arm(self, arm: Callable[[], None], seen: threading.Event, outage: bool) -> None:
        assert self._watcher is None, "one fault at a time"
        client_id = redis_own_client_id(self.store)
        arm()

        def watch() -> None:
            try:
                assert seen.wait(WAIT), "the store's command never came"
                if outage:  # no reconnecting, and the kill still finds its connection
                    self.proxy.down(close_open=False)
                redis_kill(self.url, client_id)
                self.killed.append(client_id)
            except BaseException as exc:
                self._error = exc

        self._watcher = threading.Thread(target=watch, daemon=True)
        self._watcher.start()

    def end(self) -> None:
        if self._watcher is not None:
            self._watcher.join(WAIT)
            assert not self._watcher.is_alive(), "the fault's watcher did not stop"
            self._watcher = None
        self.proxy.up()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# -- a TCP relay that drops a request or a reply -----------------------------------------------


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket
    mode: str = "pass"  # "pass", "hold" (requests kept back), "withhold" (replies dropped)

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """A relay on 127.0.0.1 between a store and its server.

    ``hold_next_request()``: the next bytes a client sends are kept back, never
    reaching the server (``held`` is set); the connection then stays silent
    until the server side is killed, when the proxy closes the client side too.

    ``withhold_next_reply(marker)``: the next request containing ``marker``
    (any, if None) is forwarded, and from then on the server's replies on that
    connection are dropped (``withheld`` is set when the first one arrives): the
    server applied the command, the client never hears of it.

    ``down()``: every relayed connection is closed and new ones are closed as
    soon as they are accepted, until ``up()``: the server is unreachable.

    Once armed, a mode sticks to the one connection that triggered it; newer
    connections (the store reconnecting) pass through.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed: tuple[str, bytes | None] | None = None
        self._pairs: list[_Pair] = []
        self.held = threading.Event()
        self.withheld = threading.Event()
        self._down = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_next_request(self) -> None:
        with self._lock:
            self.held.clear()
            self._armed = ("hold", None)

    def withhold_next_reply(self, marker: bytes | None = None) -> None:
        with self._lock:
            self.withheld.clear()
            self._armed = ("withhold", marker)

    def down(self, *, close_open: bool = True) -> None:
        """Refuse new connections; close the relayed ones too unless ``close_open`` is False."""
        with self._lock:
            self._down = True
            pairs, self._pairs = (self._pairs, []) if close_open else ([], self._pairs)
        for pair in pairs:
            pair.close()

    def up(self) -> None:
        with self._lock:
            self._down = False

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.down()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = self._down
            if down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=WAIT)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
            threading.Thread(target=self._requests, args=(pair,), daemon=True).start()
            threading.Thread(target=self._replies, args=(pair,), daemon=True).start()

    def _requests(self, pair: _Pair) -> None:
        while True:
            try:
                data = pair.client.recv(65536)
            except OSError:
                data = b""
            if not data:
                pair.close()
                return
            with self._lock:
                if pair.mode == "pass" and self._armed is not None:
                    mode, marker = self._armed
                    if mode == "hold" or marker is None or marker in data:
                        pair.mode = mode
                        self._armed = None
                if pair.mode == "hold":
                    self.held.set()
                    continue
            try:
                pair.upstream.sendall(data)
            except OSError:
                pair.close()
                return

    def _replies(self, pair: _Pair) -> None:
        while True:
            try:
                data = pair.upstream.recv(65536)
            except OSError:
                data = b""
            if not data:  # the server closed it (killed): so does the client's side
                pair.close()
                return
            if pair.mode == "withhold":
                self.withheld.set()
                continue
            try:
                pair.client.sendall(data)
            except OSError:
                pair.close()
                return


# -- SQLite ----------------------------------------------------------------------------------

_HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
conn.execute("BEGIN " + sys.argv[2])
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


class SQLiteLock:
    """Another process holding the database's write lock (``BEGIN IMMEDIATE``) until released."""

    def __init__(self, path: str, mode: str = "IMMEDIATE") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, path, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "locked":
            self.release()
            raise AssertionError(f"the lock holder failed: {line!r}")

    def release(self) -> None:
        """Let go of the lock and wait until the holder has exited (idempotent)."""
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.write("\n")
                proc.stdin.flush()
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()  # our own child, by its Popen handle
                proc.wait(WAIT)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def sqlite_lock_holder(path: str, mode: str = "IMMEDIATE") -> Iterator[int]:
    """:class:`SQLiteLock` for the duration of a block; yields the holder's pid."""
    lock = SQLiteLock(path, mode)
    try:
        yield lock.proc.pid
    finally:
        lock.release()
