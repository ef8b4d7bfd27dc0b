"""Fixtures for the store contract suite: every store, sync and async, against real servers.

See ``store_support`` for the server settings, the skip-or-fail rule, and how
an async store is driven through the sync API.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from store_support import ALL_KINDS, SHARED_KINDS, StoreSpec, make_spec, variants

from gorch.stores import Store


@pytest.fixture(params=variants(ALL_KINDS))
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    kind, aio = request.param
    yield from make_spec(kind, tmp_path, aio=aio)


@pytest.fixture(params=variants(SHARED_KINDS))
def shared_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    """A store that several processes can open at once (not the in-process MemoryStore)."""
    kind, aio = request.param
    yield from make_spec(kind, tmp_path, aio=aio)


@pytest.fixture
def store(store_spec: StoreSpec) -> Iterator[Store]:
    opened = store_spec.open()
    try:
        yield opened
    finally:
        opened.close()
