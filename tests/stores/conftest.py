"""Fixtures for the store contract suite: every store, against real servers.

See ``store_support`` for the server settings and the skip-or-fail rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from store_support import ALL_KINDS, SHARED_KINDS, StoreSpec, make_spec

from gorch.stores import Store


@pytest.fixture(params=ALL_KINDS)
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    yield from make_spec(request.param, tmp_path)


@pytest.fixture(params=SHARED_KINDS)
def shared_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    """A store that several processes can open at once (not the in-process MemoryStore)."""
    yield from make_spec(request.param, tmp_path)


@pytest.fixture
def store(store_spec: StoreSpec) -> Iterator[Store]:
    opened = store_spec.open()
    try:
        yield opened
    finally:
        opened.close()
