"""``Engine.start(..., conn=...)``: the instance is written in the caller's transaction.

"Create the order row and its workflow" commits or rolls back as one, on
SQLite (the caller's ``sqlite3.Connection``) and PostgreSQL (the caller's
``psycopg.Connection`` / ``AsyncConnection``). Nothing with effects runs
before the caller commits: an instance whose first resume runs a step is
written ``resuming``, due at once, and a worker runs it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from stores.store_support import StoreSpec, make_spec

import gorch
from gorch import On, S, Select, Step, Timeout
from gorch.async_engine import AsyncEngine
from gorch.engine import DueResult, Engine, InstanceStatus
from gorch.errors import WorkflowExists, WorkflowNotFound
from gorch.stores.base import UnsupportedByStore

RAN: list[str] = []


class Order(gorch.Workflow):
    """Waits for payment: its first resume has no effect, so it is written as it blocks."""

    order: int
    paid: bool = False

    def definition(self) -> gorch.Section:
        return S(Select("await payment", On("pay", self.pay), Timeout("late", timedelta(days=3))))

    def pay(self) -> None:
        self.paid = True


class Confirm(gorch.Workflow):
    """Mails a confirmation first: a step, so it must not run inside the transaction."""

    order: int
    mailed: bool = False

    def definition(self) -> gorch.Section:
        return S(Step("mail", self.mail), Select("await ack", On("ack")))

    def mail(self) -> None:
        RAN.append(f"mail {self.order}")
        self.mailed = True


WORKFLOWS: dict[str, type[gorch.Workflow]] = {"order": Order, "confirm": Confirm}


class Orders:
    """The application's own table, next to gorch's, and a second connection to look."""

    def __init__(self, spec: StoreSpec) -> None:
        self.spec = spec
        if spec.kind == "sqlite":
            self.table = "orders"
            self.conn: Any = sqlite3.connect(spec.target)
            self.conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
            self.conn.commit()
        else:
            self.table = f"{spec.namespace}_orders"
            self.conn = psycopg.connect(spec.target)
            self.conn.execute(
                sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY)").format(
                    sql.Identifier(self.table)
                )
            )
            self.conn.commit()

    def insert(self, conn: Any, order: int) -> None:
        if self.spec.kind == "sqlite":
            conn.execute("INSERT INTO orders (id) VALUES (?)", (order,))
        else:
            query = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(self.table))
            conn.execute(query, (order,))

    def committed(self) -> list[int]:
        """The orders another connection sees."""
        if self.spec.kind == "sqlite":
            with sqlite3.connect(self.spec.target) as other:
                return [r[0] for r in other.execute("SELECT id FROM orders ORDER BY id")]
        with psycopg.connect(self.spec.target, autocommit=True) as other:
            query = sql.SQL("SELECT id FROM {} ORDER BY id").format(sql.Identifier(self.table))
            return [r[0] for r in other.execute(query)]

    def close(self) -> None:
        self.conn.rollback()
        if self.spec.kind == "postgres":
            self.conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(self.table)))
            self.conn.commit()
        self.conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    yield from make_spec(request.param, tmp_path)


@pytest.fixture
def orders(spec: StoreSpec) -> Iterator[Orders]:
    RAN.clear()
    made = Orders(spec)
    try:
        yield made
    finally:
        made.close()


def test_the_order_and_its_workflow_commit_together(spec: StoreSpec, orders: Orders) -> None:
    engine = Engine(spec.open(), WORKFLOWS)
    engine.list()  # the store's table exists before the transaction (see the next test)
    conn = orders.conn
    orders.insert(conn, 1)
    snap = engine.start("order", "order-1", {"order": 1}, conn=conn)
    assert snap.status is InstanceStatus.WAITING
    # Not committed yet: neither the row nor the instance is seen from elsewhere.
    assert orders.committed() == []
    with pytest.raises(WorkflowNotFound):
        engine.get("order-1")
    conn.commit()
    assert orders.committed() == [1]
    got = engine.get("order-1")
    assert got.status is InstanceStatus.WAITING
    assert got.data == {"order": 1, "paid": False}
    assert got.next_wakeup is not None  # the timer is in the wake-up index
    assert [e.kind for e in engine.history("order-1")] == ["started"]
    engine.send("order-1", "pay")
    assert engine.get("order-1").data["paid"] is True


def test_a_store_table_not_yet_created_is_refused_in_a_sqlite_transaction(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fresh.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO orders (id) VALUES (1)")  # holds the write lock from here
    engine = Engine(f"sqlite:///{path}", WORKFLOWS)
    with pytest.raises(ValueError, match="open the store once"):
        engine.start("order", "order-0", {"order": 0}, conn=conn)
    conn.commit()
    with pytest.raises(WorkflowNotFound):
        engine.get("order-0")
    assert [r[0] for r in conn.execute("SELECT id FROM orders")] == [1]
    conn.close()


def test_a_rollback_takes_the_workflow_with_the_order(spec: StoreSpec, orders: Orders) -> None:
    engine = Engine(spec.open(), WORKFLOWS)
    engine.list()
    conn = orders.conn
    orders.insert(conn, 2)
    engine.start("order", "order-2", {"order": 2}, conn=conn)
    conn.rollback()
    assert orders.committed() == []
    with pytest.raises(WorkflowNotFound):
        engine.get("order-2")
    assert engine.list().items == []
    # The id was never taken: it starts again, this time without a transaction.
    assert engine.start("order", "order-2", {"order": 2}).status is InstanceStatus.WAITING


def test_no_step_runs_before_the_commit_and_run_due_runs_it_after(
    spec: StoreSpec, orders: Orders
) -> None:
    engine = Engine(spec.open(), WORKFLOWS)
    engine.list()
    conn = orders.conn
    orders.insert(conn, 3)
    snap = engine.start("confirm", "confirm-3", {"order": 3}, conn=conn)
    assert snap.status is InstanceStatus.RESUMING
    assert RAN == []
    if spec.kind == "postgres":  # (SQLite's workers wait for the caller's write lock)
        assert engine.run_due() == []  # not committed: nothing for a worker yet
    conn.commit()
    assert RAN == []
    [result] = engine.run_due()
    assert (result.id, result.outcome) == ("confirm-3", "processed")
    assert RAN == ["mail 3"]
    got = engine.get("confirm-3")
    assert got.status is InstanceStatus.WAITING
    assert got.data["mailed"] is True


def test_a_taken_id_leaves_the_callers_transaction_usable(spec: StoreSpec, orders: Orders) -> None:
    engine = Engine(spec.open(), WORKFLOWS)
    engine.start("order", "order-4", {"order": 4})
    before = engine.store.load("order-4")
    conn = orders.conn
    orders.insert(conn, 4)
    with pytest.raises(WorkflowExists):
        engine.start("order", "order-4", {"order": 40}, conn=conn)
    orders.insert(conn, 5)  # the transaction goes on
    conn.commit()
    assert orders.committed() == [4, 5]
    assert engine.store.load("order-4") == before


def test_a_keyed_start_in_a_transaction_returns_the_committed_instance(
    spec: StoreSpec, orders: Orders
) -> None:
    engine = Engine(spec.open(), WORKFLOWS)
    first = engine.start("order", data={"order": 6}, key="order-6")
    conn = orders.conn
    again = engine.start("order", data={"order": 6}, key="order-6", conn=conn)
    assert again.id == first.id
    conn.commit()
    assert engine.store.load(first.id).version == 1


def test_a_connection_of_the_wrong_kind_is_refused_and_writes_nothing(
    spec: StoreSpec, orders: Orders, tmp_path: Path
) -> None:
    engine = Engine(spec.open(), WORKFLOWS)
    engine.list()
    if spec.kind == "sqlite":
        other = sqlite3.connect(tmp_path / "another.db")
        with pytest.raises(ValueError, match="not to the store's file"):
            engine.start("order", "order-7", {"order": 7}, conn=other)
        other.close()
        wrong: Any = object()
        with pytest.raises(TypeError, match=r"takes a sqlite3\.Connection"):
            engine.start("order", "order-7", {"order": 7}, conn=wrong)
    else:
        with pytest.raises(TypeError, match=r"takes a psycopg\.Connection"):
            engine.start("order", "order-7", {"order": 7}, conn=sqlite3.connect(":memory:"))
    with pytest.raises(WorkflowNotFound):
        engine.get("order-7")


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_stores_without_the_callers_database_refuse_conn(kind: str, tmp_path: Path) -> None:
    for spec in make_spec(kind, tmp_path):  # cleans up after the loop
        engine = Engine(spec.open(), WORKFLOWS)
        with pytest.raises(UnsupportedByStore, match="connection of the caller's"):
            engine.start("order", "order-8", {"order": 8}, conn=object())
        assert engine.list().items == []
        engine.store.close()


def test_async_engine_starts_in_an_async_transaction(tmp_path: Path) -> None:
    for spec in make_spec("postgres", tmp_path, aio=True):
        timer = asyncio.run(_async_commit_and_rollback(spec))
        # The committed instance is real: its timer fires like any other's.
        assert (timer.id, timer.action, timer.fired) == ("a-1", "timer", ["late"])


async def _async_commit_and_rollback(spec: StoreSpec) -> DueResult:
    engine = AsyncEngine(spec.open_async(), WORKFLOWS)
    try:
        async with await psycopg.AsyncConnection.connect(spec.target) as conn:
            snap = await engine.start("order", "a-1", {"order": 1}, conn=conn)
            assert snap.status is InstanceStatus.WAITING
            with pytest.raises(WorkflowNotFound):
                await engine.get("a-1")
            await conn.commit()
            assert (await engine.get("a-1")).status is InstanceStatus.WAITING
            await engine.start("confirm", "a-2", {"order": 2}, conn=conn)
            await conn.rollback()
            with pytest.raises(WorkflowNotFound):
                await engine.get("a-2")
            assert RAN == []
        later = datetime.now(UTC) + timedelta(days=4)
        [timer] = await engine.run_due(now=later)
        return timer
    finally:
        await engine.store.close()
