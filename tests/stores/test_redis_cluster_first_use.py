"""A fresh async Redis Cluster store used by many tasks at once (a redis-py race, serialised by open())."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from idempo import Acquired, Existing

pytest.importorskip("redis")
from idempo.stores.redis import AsyncRedisStore

pytestmark = pytest.mark.redis_cluster


def test_concurrent_first_use_of_a_fresh_cluster_store(redis_cluster_store_url: str) -> None:
    """8 tasks making a new store's first call at once: one Acquired, seven Existing, no error; 20 times over."""

    async def round_() -> list[object]:
        store = AsyncRedisStore(redis_cluster_store_url)
        try:
            key = uuid.uuid4().hex
            return list(
                await asyncio.gather(*(store.begin(key, "fp", 60_000) for _ in range(8)), return_exceptions=True)
            )
        finally:
            await store.aclose()

    for _ in range(20):
        results = asyncio.run(round_())
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert sum(isinstance(r, Acquired) for r in results) == 1
        assert sum(isinstance(r, Existing) for r in results) == 7
