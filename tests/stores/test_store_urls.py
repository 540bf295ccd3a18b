"""Store URLs: every scheme builds its store, options reach it, malformed URLs are refused at construction."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from idempo import Acquired, ConfigurationError, async_store_from_url, store_from_url


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgres_urls_build_the_postgres_store(postgres_store_url: str, scheme: str) -> None:
    """postgresql:// and postgres:// build PostgresStore / AsyncPostgresStore with the URL's schema."""
    from idempo.stores.postgres import AsyncPostgresStore, PostgresStore

    url = scheme + postgres_store_url.removeprefix("postgresql")
    store = store_from_url(url)
    try:
        assert isinstance(store, PostgresStore)
        assert store.schema == postgres_store_url.rpartition("schema=")[2]
        acquired = store.begin("url-test-" + scheme, "fp", 1000)
        assert isinstance(acquired, Acquired)
        store.release("url-test-" + scheme, acquired.token)
    finally:
        store.close()

    async def run() -> None:
        async_store = async_store_from_url(url + "&max_size=2&prepare_threshold=none")
        assert isinstance(async_store, AsyncPostgresStore)
        try:
            assert await async_store.get("absent") is None
        finally:
            await async_store.aclose()

    asyncio.run(run())


@pytest.mark.redis
@pytest.mark.parametrize("front", ["sync", "async"])
def test_redis_url_builds_the_redis_store_with_its_prefix(redis_store_url: str, front: str) -> None:
    """redis:// builds RedisStore / AsyncRedisStore; ?prefix= names the keys, other options reach redis-py."""
    import redis

    from idempo.stores.redis import AsyncRedisStore, RedisStore

    url = redis_store_url + "&socket_timeout=3"
    prefix = redis_store_url.rpartition("prefix=")[2]
    key = f"url-{front}"
    if front == "sync":
        store = store_from_url(url)
        assert isinstance(store, RedisStore)
        assert isinstance(store.begin(key, "fp", 60_000), Acquired)
        store.close()
    else:

        async def run() -> None:
            async_store = async_store_from_url(url)
            assert isinstance(async_store, AsyncRedisStore)
            assert isinstance(await async_store.begin(key, "fp", 60_000), Acquired)
            await async_store.aclose()

        asyncio.run(run())
    client = redis.Redis.from_url(redis_store_url.partition("?")[0])
    try:
        assert client.exists(f"{prefix}{{{key}}}") == 1
        assert 0 < client.pttl(f"{prefix}{{{key}}}") <= 60_000 + 86_400_000  # lease + grace (24 h)
    finally:
        client.delete(f"{prefix}{{{key}}}")
        client.close()


def test_rediss_url_uses_tls_without_connecting() -> None:
    """rediss:// configures a TLS connection pool (nothing is connected before first use)."""
    from redis.asyncio.connection import SSLConnection

    store: Any = async_store_from_url("rediss://example.invalid:6380/0?prefix=p:")
    assert store.client.connection_pool.connection_class is SSLConnection
    asyncio.run(store.aclose())


@pytest.mark.redis
@pytest.mark.redis_cluster
def test_redis_cluster_url_lists_the_nodes(redis_cluster_store_url: str) -> None:
    """redis+cluster://host:port,host:port builds a RedisCluster client that knows every master."""
    from redis.cluster import RedisCluster

    store: Any = store_from_url(redis_cluster_store_url)
    try:
        assert isinstance(store.client, RedisCluster)
        assert len(store.client.get_primaries()) == 3  # type: ignore[no-untyped-call,unused-ignore]
    finally:
        store.close()


@pytest.mark.redis
@pytest.mark.redis_cluster
def test_redis_store_takes_a_ready_cluster_client(redis_cluster_urls: list[str]) -> None:
    """RedisStore(client=RedisCluster(...)) works on the caller's client and leaves it open on close()."""
    from redis.cluster import RedisCluster

    from idempo.stores.redis import RedisStore

    client = RedisCluster.from_url(redis_cluster_urls[0])
    store = RedisStore(client=client, prefix="client-test:")
    try:
        keys = [f"k{i}" for i in range(20)]  # spread over the three masters' slots
        for key in keys:
            assert isinstance(store.begin(key, "fp", 60_000), Acquired)
        store.close()
        assert client.ping()
        for key in keys:
            client.delete(f"client-test:{{{key}}}")
    finally:
        client.close()


def test_unreachable_redis_cluster_starts_and_is_store_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    """A redis+cluster:// URL whose nodes all refuse connections: the store starts with one
    warning (issue 10 item 5), and each call is StoreUnavailable until a node answers."""
    from store_helpers import unused_port

    from idempo import StoreUnavailable
    from idempo.wsgi import IdempotencyMiddleware

    url = f"redis+cluster://127.0.0.1:{unused_port()}?socket_connect_timeout=1"
    front = IdempotencyMiddleware(lambda environ, start_response: [], url)  # opens its store at start-up
    store = front.store
    try:
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1
        assert "cannot be reached at start-up" in warnings[0].getMessage()
        with pytest.raises(StoreUnavailable):
            store.get("k")
    finally:
        store.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://no-port-here",
        "redis+cluster://127.0.0.1:7000?bogus=1",
        "redis://127.0.0.1:6379/0?prefix=a{b}",
        "postgresql://postgres@127.0.0.1/test?schema=bad-name",
        "postgresql://postgres@127.0.0.1/test?max_size=many",
        "mysql://127.0.0.1/test",
    ],
)
def test_malformed_urls_are_refused_at_construction(url: str) -> None:
    """A URL the store cannot use raises ConfigurationError before any I/O."""
    with pytest.raises(ConfigurationError):
        async_store_from_url(url)
