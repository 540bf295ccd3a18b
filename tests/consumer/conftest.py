"""Fixtures for the consumer tests: a real Redis Streams broker, stores several processes share."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import SHARED_STORES, Backend

REQUIRE_SERVICES = os.environ.get("IDEMPO_REQUIRE_SERVICES") == "1"


def _missing(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (IDEMPO_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def broker_url() -> str:
    """The shared Redis server, used as the message broker; skips (or fails) when it is down."""
    url = os.environ.get("IDEMPO_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        import redis
    except ImportError:
        _missing("redis-py is not installed (pip install idempo[redis])")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        _missing(f"Redis is not reachable at {url}: {exc}")
    return url


@pytest.fixture
def broker(broker_url: str) -> Iterator[Any]:
    """A redis-py client of the broker (str replies)."""
    import redis

    client = redis.Redis.from_url(broker_url, decode_responses=True, socket_timeout=10)
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
    """A store several consumer processes share (SQLite file; Redis and PostgreSQL once merged)."""
    backend: Backend = request.param(request, tmp_path)
    yield backend
    backend.close()
