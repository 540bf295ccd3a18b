"""Fixtures for the @idempotent tests: every store, a scope of each test's own, both event loops."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from idempo import AsyncStore
from tests.support.backends import STORES, Backend


@pytest.fixture(params=STORES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A store under test: memory, SQLite, Redis, PostgreSQL."""
    backend: Backend = request.param(request, tmp_path)
    yield backend
    backend.close()


@pytest.fixture
def scope() -> str:
    """A scope of this test's own, so tests never share records on a shared server."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The event loop an async test runs on."""
    return str(request.param)


@pytest.fixture
async def astore(backend: Backend, anyio_backend: str) -> AsyncIterator[AsyncStore]:
    """An async store of ``backend``, closed on the test's own event loop."""
    if anyio_backend == "trio" and not backend.trio:
        pytest.skip(f"the {backend.name} async store runs on asyncio only")
    store = backend.make_async()
    yield store
    await store.aclose()
