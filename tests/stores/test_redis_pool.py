"""The Redis store under more concurrent commands than its pool has connections."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from idempo._core.records import Acquired
from idempo.stores.redis import AsyncRedisStore, RedisStore

POOL = 4
CALLERS = 32


@pytest.mark.redis
def test_async_store_waits_for_a_free_connection_instead_of_failing(redis_store_url: str) -> None:
    """32 concurrent begins on a pool of 4 connections all take their lease; none is StoreUnavailable (a 503)."""

    async def main() -> list[object]:
        store = AsyncRedisStore(redis_store_url, max_connections=POOL)
        try:
            calls = (store.begin(f"pool-{uuid.uuid4()}", "fp", 30_000) for _ in range(CALLERS))
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await store.aclose()

    results = asyncio.run(main())
    assert all(isinstance(result, Acquired) for result in results), results


@pytest.mark.redis
def test_sync_store_waits_for_a_free_connection_instead_of_failing(redis_store_url: str) -> None:
    """32 threads calling begin on a pool of 4 connections all take their lease."""
    store = RedisStore(redis_store_url, max_connections=POOL)
    try:
        with ThreadPoolExecutor(CALLERS) as pool:
            futures = [pool.submit(store.begin, f"pool-{uuid.uuid4()}", "fp", 30_000) for _ in range(CALLERS)]
            results = [future.exception() or future.result() for future in futures]
    finally:
        store.close()
    assert all(isinstance(result, Acquired) for result in results), results
