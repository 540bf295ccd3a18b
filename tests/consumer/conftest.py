"""Fixtures for the consumer tests: a real Redis Streams broker, stores several processes share."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import SHARED_STORES, Backend


@pytest.fixture
def broker(redis_url: str) -> Iterator[Any]:
    """A redis-py client of the shared Redis as the broker (str replies); skips (or fails) when it is down."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=10)
    yield client
    client.close()


@pytest.fixture
def stream(broker: Any) -> Iterator[str]:
    """A stream name of this test's own; it and every key under it are deleted afterwards (never FLUSHDB)."""
    name = f"idempo-test-consumer-{uuid.uuid4().hex}"
    yield name
    for key in list(broker.scan_iter(match=name + "*", count=1000)):
        broker.delete(key)


@pytest.fixture(params=SHARED_STORES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A store several consumer processes share: an SQLite file, Redis, PostgreSQL."""
    backend: Backend = request.param(request, tmp_path)
    yield backend
    backend.close()
