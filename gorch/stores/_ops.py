"""Store operations as data, so that a backend's protocol is written once for sync and async.

A server backend describes each operation of the store contract as an
:class:`Op`: a generator of driver requests (each request's answer is sent
back in) that also maps the answers to records and raises the contract's
errors. It does no I/O. A connector (a :class:`ConnectorStore` or an
:class:`AsyncConnectorStore`) only carries the requests out on its driver,
blocking or awaited, and applies the backend's retry rule; everything else
is shared by the two.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from gorch.stores.base import (
    DEFAULT_HISTORY_LIMIT,
    AsyncStore,
    HistoryLog,
    NewRecord,
    Page,
    Record,
    Store,
)

R = TypeVar("R")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Op(Generic[T]):
    """One store operation, as a connector runs it.

    ``steps`` makes a fresh generator for each attempt. ``write``: it changes
    the store (a server-side backend runs it in one transaction or one script)
    and a fault part-way leaves the outcome to be told; a read may simply be
    repeated. ``idempotent``: running the write again after it was applied
    gives the same answer, so it may be repeated too. ``batch``: several
    statements that must commit together (a SQL backend runs them in one
    transaction; a unique violation means a concurrent insert won a race: the
    transaction rolled back, and the operation may run again).
    """

    steps: Callable[[], Generator[Any, Any, T]]
    write: bool = True
    idempotent: bool = False
    batch: bool = False


def run_steps(steps: Generator[R, Any, T], send: Callable[[R], Any]) -> T:
    """Drive ``steps``: ``send`` carries out each request it yields, and the answer goes
    back in; its return value is the operation's result."""
    answer: Any = None
    while True:
        try:
            request = steps.send(answer)
        except StopIteration as done:
            result: T = done.value
            return result
        answer = send(request)


async def arun_steps(steps: Generator[R, Any, T], send: Callable[[R], Awaitable[Any]]) -> T:
    """:func:`run_steps` for a connector whose ``send`` is awaited."""
    answer: Any = None
    while True:
        try:
            request = steps.send(answer)
        except StopIteration as done:
            result: T = done.value
            return result
        answer = await send(request)


class Operations(Protocol):
    """What a backend's protocol module provides: the :class:`Op` of each store call."""

    def create(
        self,
        id: str,
        workflow: str,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        history: Sequence[str],
        history_limit: int,
        cursors: Sequence[str],
    ) -> Op[Record]: ...

    def create_many(self, records: Sequence[NewRecord], history_limit: int) -> Op[list[str]]: ...

    def load(self, id: str) -> Op[Record]: ...

    def save(
        self,
        id: str,
        expected_version: int,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        history: Sequence[str],
        history_limit: int,
        cursors: Sequence[str],
    ) -> Op[Record]: ...

    def history(self, id: str) -> Op[HistoryLog]: ...

    def purge(
        self, before: datetime, statuses: Sequence[str], limit: int
    ) -> Op[builtins.list[str]]: ...

    def delete(self, id: str) -> Op[None]: ...

    def list(
        self, workflow: str | None, status: str | None, limit: int, after: str | None
    ) -> Op[Page]: ...

    def claim_due(
        self, now: datetime, limit: int, lease: timedelta
    ) -> Op[builtins.list[Record]]: ...

    def remember(self, key: str, until: datetime) -> Op[bool]: ...


class ConnectorStore(Store):
    """A :class:`Store` whose calls are ``_ops``' operations, carried out by ``_run``."""

    _ops: Operations

    @abc.abstractmethod
    def _run(self, op: Op[T]) -> T:
        """Carry ``op`` out on the driver, blocking; faults as the backend's rule says."""

    def create(
        self,
        id: str,
        workflow: str,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        *,
        history: Sequence[str] = (),
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        cursors: Sequence[str] = (),
    ) -> Record:
        op = self._ops.create(id, workflow, status, blob, wake_at, history, history_limit, cursors)
        return self._run(op)

    def create_many(
        self, records: Sequence[NewRecord], *, history_limit: int = DEFAULT_HISTORY_LIMIT
    ) -> builtins.list[str]:
        if not records:
            return []
        return self._run(self._ops.create_many(records, history_limit))

    def load(self, id: str) -> Record:
        return self._run(self._ops.load(id))

    def save(
        self,
        id: str,
        expected_version: int,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        *,
        history: Sequence[str] = (),
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        cursors: Sequence[str] = (),
    ) -> Record:
        return self._run(
            self._ops.save(
                id, expected_version, status, blob, wake_at, history, history_limit, cursors
            )
        )

    def history(self, id: str) -> HistoryLog:
        return self._run(self._ops.history(id))

    def purge(self, before: datetime, statuses: Sequence[str], limit: int) -> builtins.list[str]:
        return self._run(self._ops.purge(before, statuses, limit))

    def delete(self, id: str) -> None:
        self._run(self._ops.delete(id))

    def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        return self._run(self._ops.list(workflow, status, limit, after))

    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        if limit < 1:
            return []  # nothing to claim: the server is not even asked
        return self._run(self._ops.claim_due(now, limit, lease))

    def remember(self, key: str, until: datetime) -> bool:
        return self._run(self._ops.remember(key, until))


class AsyncConnectorStore(AsyncStore):
    """:class:`ConnectorStore` for asyncio: ``_run`` awaits the driver."""

    _ops: Operations

    @abc.abstractmethod
    async def _run(self, op: Op[T]) -> T:
        """Carry ``op`` out on the driver, awaited; faults as the backend's rule says."""

    async def create(
        self,
        id: str,
        workflow: str,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        *,
        history: Sequence[str] = (),
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        cursors: Sequence[str] = (),
    ) -> Record:
        op = self._ops.create(id, workflow, status, blob, wake_at, history, history_limit, cursors)
        return await self._run(op)

    async def create_many(
        self, records: Sequence[NewRecord], *, history_limit: int = DEFAULT_HISTORY_LIMIT
    ) -> builtins.list[str]:
        if not records:
            return []
        return await self._run(self._ops.create_many(records, history_limit))

    async def load(self, id: str) -> Record:
        return await self._run(self._ops.load(id))

    async def save(
        self,
        id: str,
        expected_version: int,
        status: str,
        blob: bytes,
        wake_at: datetime | None,
        *,
        history: Sequence[str] = (),
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        cursors: Sequence[str] = (),
    ) -> Record:
        return await self._run(
            self._ops.save(
                id, expected_version, status, blob, wake_at, history, history_limit, cursors
            )
        )

    async def history(self, id: str) -> HistoryLog:
        return await self._run(self._ops.history(id))

    async def purge(
        self, before: datetime, statuses: Sequence[str], limit: int
    ) -> builtins.list[str]:
        return await self._run(self._ops.purge(before, statuses, limit))

    async def delete(self, id: str) -> None:
        await self._run(self._ops.delete(id))

    async def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        return await self._run(self._ops.list(workflow, status, limit, after))

    async def claim_due(self, now: datetime, limit: int, lease: timedelta) -> builtins.list[Record]:
        if limit < 1:
            return []  # nothing to claim: the server is not even asked
        return await self._run(self._ops.claim_due(now, limit, lease))

    async def remember(self, key: str, until: datetime) -> bool:
        return await self._run(self._ops.remember(key, until))
