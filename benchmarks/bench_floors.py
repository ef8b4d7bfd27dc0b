"""The hand-written floors ``bench_engine.py`` measures gorch against (no gorch Engine in them).

Each floor runs the approval workflow's three stages (start: it waits for
``decide`` or a 3-day timer; the event; the last step, finished) the way a
careful programmer would by hand:

* :class:`SQLiteFloor` and :class:`PostgresFloor`: a dict state machine kept as
  msgpack in one row per workflow (``id`` primary key, ``blob``, ``version``),
  one commit per stage: insert the row; load it, check and apply the event,
  compare-and-swap it (``UPDATE ... WHERE id = ? AND version = ?``); run the
  last step, compare-and-swap again. Single statements in autocommit (one
  round trip each on PostgreSQL, statements prepared on first use), at the
  durability gorch's store is set to (SQLite: WAL and the same ``synchronous``;
  PostgreSQL: the same server and session settings).

  Two of each: the *minimal* floor (only that), and the *equivalent* floor,
  which also keeps what gorch must keep to be the same system: a ``wake_at``
  column with a partial index, so that the 3-day timer can be found and fired
  (stage 1 writes its due time), and a lease while the last step runs (stage
  2 writes ``now + 60 s``, so that a crash before stage 3 is retried; stage 3
  clears it). The minimal floor cannot fire its timer nor recover from a
  crash mid-workflow; it shows what durability alone costs.
* :class:`CoreFloor`: gorch's own core (``resume``, ``handle_event``,
  ``dumps``, ``loads``) on the real workflow, with a dict for a store: what the
  Engine on its memory store adds to the core is the Engine's own cost.
* :class:`CoreRowFloor`: gorch's bare core in place of the dict state machine,
  on an equivalent SQL floor's table and statements (its blob, its wake-up
  and lease writes): what the core alone costs at that floor. gorch against
  it is what the Engine and the store add; it against the floor, the core's
  own share of gorch's gap.

Every PostgreSQL floor works in a table of its own (``gorch_bench_floor_<random>``)
and drops only that table.
"""

from __future__ import annotations

import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack

import gorch
from gorch.timers import wakeup

DECIDE = "decide"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def new_state(amount: float) -> dict[str, Any]:
    """A new workflow waiting for its decision (or the timer)."""
    due = datetime.now(UTC) + timedelta(days=3)
    return {
        "stage": "waiting",
        "awaits": {"decide": None, "expired": due.isoformat()},
        "amount": amount,
        "status": "pending",
        "approver": "",
        "closed": False,
    }


def apply_decision(state: dict[str, Any], id: str, decision: dict[str, Any]) -> None:
    """Check the event is awaited, validate it, apply it: the handler's work."""
    if state["stage"] != "waiting" or DECIDE not in state["awaits"]:
        raise RuntimeError(f"{id} does not await {DECIDE!r}")
    approved, by = decision["approved"], decision["by"]
    if type(approved) is not bool or type(by) is not str:
        raise ValueError(f"invalid decision {decision!r}")
    state["status"] = "approved" if approved else "rejected"
    state["approver"] = by
    state["stage"] = "resuming"
    state["awaits"] = {}


def finish(state: dict[str, Any]) -> None:
    """The last step."""
    state["closed"] = True
    state["stage"] = "finished"


def _pack(state: dict[str, Any]) -> bytes:
    return msgpack.packb(state, use_bin_type=True)  # type: ignore[no-any-return]


LEASE = timedelta(seconds=60)


class _RowFloor:
    """What the SQL floors share: the three stages on ``_execute``; ``timers``: the
    equivalent floor (a wake-up column and index, a lease)."""

    insert = select = update = ""
    timers = False

    def _execute(self, query: Any, params: tuple[Any, ...]) -> Any:
        raise NotImplementedError

    def _when(self, when: datetime) -> Any:
        return when

    def create(self, id: str, amount: float) -> None:
        """Stage 1: a new workflow, waiting for its decision (or its timer)."""
        state = new_state(amount)
        if self.timers:
            due = datetime.fromisoformat(state["awaits"]["expired"])
            self._execute(self.insert, (id, _pack(state), self._when(due)))
        else:
            self._execute(self.insert, (id, _pack(state)))

    def apply(self, id: str, decision: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Stage 2: load the row, validate and apply the event, compare-and-swap it."""
        row = self._execute(self.select, (id,)).fetchone()
        if row is None:
            raise KeyError(id)
        state = msgpack.unpackb(row[0], raw=False)
        apply_decision(state, id, decision)
        lease = datetime.now(UTC) + LEASE  # the last step runs now: retried if we crash
        return state, self.swap(id, row[1], _pack(state), lease)

    def finish(self, id: str, state: dict[str, Any], version: int) -> None:
        """Stage 3: run the last step and compare-and-swap the finished workflow."""
        finish(state)
        self.swap(id, version, _pack(state), None)

    def swap(self, id: str, version: int, blob: bytes, wake: datetime | None) -> int:
        """Compare-and-swap row ``id`` from ``version`` to ``blob`` (and ``wake``, on the
        equivalent floor); its new version."""
        if self.timers:
            when = None if wake is None else self._when(wake)
            params: tuple[Any, ...] = (blob, version + 1, when, id, version)
        else:
            params = (blob, version + 1, id, version)
        if self._execute(self.update, params).rowcount != 1:
            raise RuntimeError(f"conflict on {id}")
        return version + 1

    def stage(self, id: str) -> str:
        row = self._execute(self.select, (id,)).fetchone()
        return str(msgpack.unpackb(row[0], raw=False)["stage"])


class SQLiteFloor(_RowFloor):
    """The floor in a table of the store's SQLite file, WAL, ``synchronous`` as given."""

    def __init__(self, path: str, synchronous: str = "FULL", *, timers: bool = False) -> None:
        self.timers = timers
        self.table = t = f"bench_floor_{uuid.uuid4().hex[:8]}"
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        self.conn.execute("PRAGMA busy_timeout = 30000")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {synchronous}")
        self.select = f"SELECT blob, version FROM {t} WHERE id = ?"
        if timers:
            self.conn.execute(
                f"CREATE TABLE {t} (id TEXT PRIMARY KEY, blob BLOB NOT NULL,"
                " version INTEGER NOT NULL, wake_at INTEGER)"
            )
            self.conn.execute(
                f"CREATE INDEX {t}_wake ON {t} (wake_at, id) WHERE wake_at IS NOT NULL"
            )
            self.insert = f"INSERT INTO {t} (id, blob, version, wake_at) VALUES (?, ?, 1, ?)"
            self.update = (
                f"UPDATE {t} SET blob = ?, version = ?, wake_at = ? WHERE id = ? AND version = ?"
            )
        else:
            self.conn.execute(
                f"CREATE TABLE {t}"
                " (id TEXT PRIMARY KEY, blob BLOB NOT NULL, version INTEGER NOT NULL)"
            )
            self.insert = f"INSERT INTO {t} (id, blob, version) VALUES (?, ?, 1)"
            self.update = f"UPDATE {t} SET blob = ?, version = ? WHERE id = ? AND version = ?"

    def _when(self, when: datetime) -> Any:
        return (when - EPOCH) // timedelta(microseconds=1)

    def _execute(self, query: str, params: tuple[Any, ...]) -> Any:
        return self.conn.execute(query, params)

    def close(self) -> None:
        self.conn.execute(f"DROP TABLE IF EXISTS {self.table}")
        self.conn.close()


class PostgresFloor(_RowFloor):
    """The floor in a PostgreSQL table of its own: psycopg 3, autocommit, prepared."""

    def __init__(self, dsn: str, *, timers: bool = False) -> None:
        import psycopg
        from psycopg import sql

        self.timers = timers
        self.table = f"gorch_bench_floor_{uuid.uuid4().hex[:12]}"
        self.conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=0)
        t = sql.Identifier(self.table)
        self._drop = sql.SQL("DROP TABLE IF EXISTS {}").format(t)
        self.select = sql.SQL("SELECT blob, version FROM {} WHERE id = %s").format(t)
        if timers:
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (id text PRIMARY KEY, blob bytea NOT NULL,"
                    " version bigint NOT NULL, wake_at timestamptz)"
                ).format(t)
            )
            self.conn.execute(
                sql.SQL("CREATE INDEX {} ON {} (wake_at, id) WHERE wake_at IS NOT NULL").format(
                    sql.Identifier(f"{self.table}_wake"), t
                )
            )
            self.insert = sql.SQL(
                "INSERT INTO {} (id, blob, version, wake_at) VALUES (%s, %s, 1, %s)"
            ).format(t)
            self.update = sql.SQL(
                "UPDATE {} SET blob = %s, version = %s, wake_at = %s WHERE id = %s AND version = %s"
            ).format(t)
        else:
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE {}"
                    " (id text PRIMARY KEY, blob bytea NOT NULL, version bigint NOT NULL)"
                ).format(t)
            )
            self.insert = sql.SQL("INSERT INTO {} (id, blob, version) VALUES (%s, %s, 1)").format(t)
            self.update = sql.SQL(
                "UPDATE {} SET blob = %s, version = %s WHERE id = %s AND version = %s"
            ).format(t)

    def _execute(self, query: Any, params: tuple[Any, ...]) -> Any:
        return self.conn.execute(query, params)

    def close(self) -> None:
        self.conn.execute(self._drop)
        self.conn.close()


class CoreFloor:
    """gorch's core on the real workflow, a dict for a store (the memory store's floor)."""

    def __init__(self, workflow: str, cls: type[gorch.Workflow]) -> None:
        self.workflow = workflow
        self.cls = cls
        self.blobs: dict[str, bytes] = {}

    def create(self, id: str, amount: float) -> None:
        wf = self.cls.model_validate({"amount": amount})
        state = gorch.new_state(id, self.workflow)
        gorch.resume(wf, state)
        self.blobs[id] = gorch.dumps(wf, state)

    def apply(self, id: str, decision: dict[str, Any]) -> tuple[Any, int]:
        wf, state = gorch.loads(self.blobs[id], self.cls)
        gorch.handle_event(wf, state, DECIDE, decision)
        self.blobs[id] = gorch.dumps(wf, state)
        return (wf, state), 0

    def finish(self, id: str, loaded: Any, version: int) -> None:
        wf, state = loaded
        gorch.resume(wf, state)
        self.blobs[id] = gorch.dumps(wf, state)

    def stage(self, id: str) -> str:
        _, state = gorch.loads(self.blobs[id], self.cls)
        return "finished" if state.status is gorch.WorkflowStatus.FINISHED else str(state.status)

    def close(self) -> None:
        self.blobs.clear()


class CoreRowFloor:
    """gorch's bare core on an equivalent SQL floor (``timers=True``): the floor's row,
    statements and commits, with ``gorch.dumps`` of the real workflow for a blob.

    What a careful programmer who keeps gorch's core but no Engine would write: the
    wake-up is the state's first due timer (``gorch.timers.wakeup``), the lease the
    floor's own. No history, no idempotency, no retries: none of the Engine's work.
    (The core's calls are :class:`CoreFloor`'s, written again: a floor pays for no
    indirection shared with another.)
    """

    def __init__(self, rows: SQLiteFloor | PostgresFloor, workflow: str, cls: type[gorch.Workflow]):
        if not rows.timers:
            raise ValueError("CoreRowFloor needs an equivalent floor (timers=True)")
        self.rows = rows
        self.workflow = workflow
        self.cls = cls

    def create(self, id: str, amount: float) -> None:
        wf = self.cls.model_validate({"amount": amount})
        state = gorch.new_state(id, self.workflow)
        gorch.resume(wf, state)
        wake, _ = wakeup(state)
        if wake is None:
            raise RuntimeError(f"{id} waits for no timer")
        rows = self.rows
        rows._execute(rows.insert, (id, gorch.dumps(wf, state), rows._when(wake)))

    def apply(self, id: str, decision: dict[str, Any]) -> tuple[Any, int]:
        rows = self.rows
        row = rows._execute(rows.select, (id,)).fetchone()
        if row is None:
            raise KeyError(id)
        wf, state = gorch.loads(row[0], self.cls)
        gorch.handle_event(wf, state, DECIDE, decision)
        lease = datetime.now(UTC) + LEASE  # the last step runs now
        return (wf, state), rows.swap(id, row[1], gorch.dumps(wf, state), lease)

    def finish(self, id: str, loaded: Any, version: int) -> None:
        wf, state = loaded
        gorch.resume(wf, state)
        self.rows.swap(id, version, gorch.dumps(wf, state), None)

    def stage(self, id: str) -> str:
        row = self.rows._execute(self.rows.select, (id,)).fetchone()
        _, state = gorch.loads(row[0], self.cls)
        return "finished" if state.status is gorch.WorkflowStatus.FINISHED else str(state.status)

    def close(self) -> None:
        self.rows.close()
