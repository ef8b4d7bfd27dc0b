"""Real faults on the store's own connections, for the fault-injection tests.

Everything here touches only what a test created (shared servers, see
``store_support``): a PostgreSQL backend is terminated only by the pid read with
``pg_backend_pid()`` on the store's own connection, a Redis connection is killed
only by the id ``CLIENT ID`` returned on the store's own connection, and an
SQLite lock is held by a child process the test started and stops by its pid.

Tools:

* :class:`TrackedPostgresStore` records the backend pid of every connection it opens.
* :class:`PgFaults` holds locks on a test's own table (so that a statement of
  the store blocks), terminates the store's backends, and closes a "commit gate"
  (a deferred trigger that waits on an advisory lock) to block a ``COMMIT``.
* :class:`FaultProxy` is a TCP relay on 127.0.0.1 between one store and its
  server that can hold back a request (it never reaches the server) or a reply
  (the server applied the command, the store never hears of it).
* :func:`sqlite_lock_holder` runs another process that holds SQLite's write lock.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


# -- PostgreSQL ------------------------------------------------------------------------------


def tracked_postgres_store(dsn: str, table: str) -> Any:
    """A :class:`TrackedPostgresStore` (built here so that psycopg is imported lazily)."""
    from gorch.stores.postgres import PostgresStore

    class TrackedPostgresStore(PostgresStore):
        """A PostgresStore that notes the backend pid of each connection it opens."""

        def __init__(self, dsn: str, *, table: str) -> None:
            super().__init__(dsn, table=table)
            self.pids: list[int] = []
            self._pids_lock = threading.Lock()

        def _open(self) -> Any:
            conn = super()._open()
            (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
            with self._pids_lock:
                self.pids.append(pid)
            return conn

    return TrackedPostgresStore(dsn, table=table)


@dataclass
class PgFaults:
    """Locks and kills on one test's table, from connections this helper opened."""

    dsn: str
    table: str
    gate_key: int = field(default_factory=lambda: random.randrange(1, 2**62))
    _conns: list[Any] = field(default_factory=list)

    def connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.dsn, autocommit=True)
        self._conns.append(conn)
        return conn

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._conns.clear()

    @contextlib.contextmanager
    def locked(self, table: str | None = None) -> Iterator[None]:
        """Hold ACCESS EXCLUSIVE on our table: every statement of the store on it waits."""
        from psycopg import sql

        conn = self.connect()
        with conn.transaction():
            conn.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier(table or self.table)
                )
            )
            yield
        conn.close()

    def blocked_pid(self, store: Any, exclude: tuple[int, ...] = ()) -> int:
        """Wait until one of the store's own backends waits on a lock; its pid."""
        conn = self.connect()

        def find() -> int | None:
            pids = [pid for pid in store.pids if pid not in exclude]
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s) AND wait_event_type = 'Lock'",
                (pids,),
            ).fetchone()
            return None if row is None else int(row[0])

        try:
            return int(wait_until(find, "a backend of the store waits on the test's lock"))
        finally:
            conn.close()
            self._conns.remove(conn)

    def terminate(self, store: Any, pid: int) -> None:
        """Terminate one of the store's own backends and wait until it is gone."""
        assert pid in store.pids, "only a backend the store itself opened"
        conn = self.connect()
        try:
            (done,) = conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
            assert done, f"backend {pid} did not end"
        finally:
            conn.close()
            self._conns.remove(conn)

    def install_commit_gate(self, table: str) -> None:
        """A deferred trigger on ``table`` that takes our advisory lock at COMMIT time."""
        from psycopg import sql

        function = sql.Identifier(f"{self.table}_gate")
        trigger = sql.Identifier(f"{table}_gate")
        conn = self.connect()
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN PERFORM pg_advisory_xact_lock({}); RETURN NULL; END $$"
            ).format(function, sql.Literal(self.gate_key))
        )
        conn.execute(
            sql.SQL(
                "CREATE CONSTRAINT TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {}"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {}()"
            ).format(trigger, sql.Identifier(table), function)
        )

    def drop_commit_gate(self) -> None:
        from psycopg import sql

        conn = self.connect()
        conn.execute(
            sql.SQL("DROP FUNCTION IF EXISTS {}() CASCADE").format(
                sql.Identifier(f"{self.table}_gate")
            )
        )

    @contextlib.contextmanager
    def gate_closed(self) -> Iterator[None]:
        """While inside, every COMMIT of a write to a gated table waits."""
        conn = self.connect()
        conn.execute("SELECT pg_advisory_lock(%s)", (self.gate_key,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (self.gate_key,))
            conn.close()
            self._conns.remove(conn)


# -- Redis -------------------------------------------------------------------------------------


def redis_own_client_id(store: Any) -> int:
    """``CLIENT ID`` sent on the store's own (pooled) connection.

    The pool hands out its most recently used connection first, so in a test
    that uses the store from one thread at a time this is the connection its
    next command goes out on.
    """
    return int(store._client.client_id())


def redis_kill(url: str, client_id: int) -> None:
    """``CLIENT KILL ID``, from a connection of our own, of one connection of our store."""
    import redis

    admin = redis.Redis.from_url(url)
    try:
        killed = admin.execute_command("CLIENT", "KILL", "ID", str(client_id))
    finally:
        admin.close()
    assert killed == 1, f"client {client_id} was not found"


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

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
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


@contextlib.contextmanager
def sqlite_lock_holder(path: str, mode: str = "IMMEDIATE") -> Iterator[int]:
    """Another process holding the database's write lock (``BEGIN IMMEDIATE``/``EXCLUSIVE``)
    until the block ends; yields its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, path, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line.strip() == "locked", f"the lock holder failed: {line!r}"
        yield proc.pid
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by its Popen handle
            proc.wait(WAIT)
