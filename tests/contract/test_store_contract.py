"""The store conformance suite (idempo.testing.StoreContract) over every store idempo ships.

Memory, SQLite, PostgreSQL, Redis and a three-master Redis Cluster, each
through its blocking and its async front (the async one driven through
``BlockingStore``). Memory and SQLite run on an injected fake clock, which is
the store's own clock, so waiting is instant there; PostgreSQL and Redis keep
time by the server's clock, so they get short real TTLs (200 ms) and the
suite sleeps past them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idempo.stores import AsyncMemoryStore, MemoryStore
from idempo.testing import BlockingStore, FakeClock, RawRecord, StoreContract, StoreSubject, record_fields

_FIELDS = ("state", "fingerprint", "token", "lease_expires_at", "created_at", "expires_at", "status", "headers", "body")
# Real stores: long enough for a slow machine to finish the calls that set a
# record up, short enough that waiting it out keeps the suite fast.
_SHORT_REAL_MS = 200


def _sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def _front(factory_sync: Callable[[], Any], factory_async: Callable[[], Any], async_front: bool) -> Any:
    return BlockingStore(factory_async) if async_front else factory_sync()


def _memory(request: pytest.FixtureRequest, tmp_path: Path, async_front: bool) -> Iterator[StoreSubject]:
    clock = FakeClock()
    sync = MemoryStore(clock=clock)
    store = _front(lambda: sync, lambda: AsyncMemoryStore(sync), async_front)

    def raw(record_key: str) -> RawRecord | None:
        record = sync._raw(record_key)
        return None if record is None else record_fields(record)

    yield StoreSubject(store=store, wait=clock.advance, short_ms=1000, server_clock=False, raw=raw)
    store.close()


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path, async_front: bool) -> Iterator[StoreSubject]:
    from idempo.stores.sqlite import AsyncSQLiteStore, SQLiteStore

    clock = FakeClock()
    path = tmp_path / "idempo.db"
    store = _front(lambda: SQLiteStore(path, clock=clock), lambda: AsyncSQLiteStore(path, clock=clock), async_front)
    reader = sqlite3.connect(path, check_same_thread=False)

    def raw(record_key: str) -> RawRecord | None:
        row = reader.execute(
            f"SELECT {', '.join(_FIELDS)} FROM idempo_records WHERE record_key = ?", (record_key,)
        ).fetchone()
        return None if row is None else dict(zip(_FIELDS, row, strict=True))

    yield StoreSubject(
        store=store,
        wait=clock.advance,
        short_ms=1000,
        server_clock=False,
        raw=raw,
        url=f"sqlite:///{path}",
        async_front=async_front,
    )
    store.close()
    reader.close()


def _postgres(request: pytest.FixtureRequest, tmp_path: Path, async_front: bool) -> Iterator[StoreSubject]:
    import psycopg

    from idempo.stores.postgres import AsyncPostgresStore, PostgresStore

    url: str = request.getfixturevalue("postgres_store_url")
    base: str = request.getfixturevalue("postgres_url")
    schema = url.rpartition("schema=")[2]
    store = _front(lambda: PostgresStore(url), lambda: AsyncPostgresStore(url), async_front)
    reader = psycopg.connect(base, autocommit=True)

    def raw(record_key: str) -> RawRecord | None:
        query = f"SELECT {', '.join(_FIELDS)} FROM {schema}.idempo_records WHERE record_key = %s"
        row = reader.execute(query, (record_key,)).fetchone()  # type: ignore[call-overload,unused-ignore]
        return None if row is None else dict(zip(_FIELDS, row, strict=True))

    yield StoreSubject(
        store=store,
        wait=_sleep,
        short_ms=_SHORT_REAL_MS,
        server_clock=True,
        raw=raw,
        url=url,
        async_front=async_front,
    )
    store.close()
    reader.close()


def _redis_raw(client: Any, prefix: str) -> Callable[[str], RawRecord | None]:
    def raw(record_key: str) -> RawRecord | None:
        fields = client.hgetall(f"{prefix}{{{record_key}}}")
        if not fields:
            return None
        decoded: RawRecord = {name.decode(): value for name, value in fields.items()}
        for name in ("token", "lease_expires_at", "created_at", "expires_at", "status"):
            if name in decoded:
                decoded[name] = int(decoded[name])
        for name in ("state", "fingerprint", "headers"):
            if name in decoded:
                decoded[name] = decoded[name].decode("latin-1")
        return {name: decoded.get(name) for name in _FIELDS}

    return raw


def _redis(request: pytest.FixtureRequest, tmp_path: Path, async_front: bool) -> Iterator[StoreSubject]:
    import redis

    from idempo.stores.redis import AsyncRedisStore, RedisStore

    url: str = request.getfixturevalue("redis_store_url")
    prefix = url.rpartition("prefix=")[2]
    store = _front(lambda: RedisStore(url), lambda: AsyncRedisStore(url), async_front)
    client = redis.Redis.from_url(url.partition("?")[0])
    yield StoreSubject(
        store=store,
        wait=_sleep,
        short_ms=_SHORT_REAL_MS,
        server_clock=True,
        raw=_redis_raw(client, prefix),
        url=url,
        async_front=async_front,
    )
    store.close()
    client.close()


def _redis_cluster(request: pytest.FixtureRequest, tmp_path: Path, async_front: bool) -> Iterator[StoreSubject]:
    import redis.cluster

    from idempo.stores.redis import AsyncRedisStore, RedisStore

    url: str = request.getfixturevalue("redis_cluster_store_url")
    prefix = url.rpartition("prefix=")[2]
    store = _front(lambda: RedisStore(url), lambda: AsyncRedisStore(url), async_front)
    client = redis.cluster.RedisCluster.from_url(request.getfixturevalue("redis_cluster_urls")[0])
    yield StoreSubject(
        store=store,
        wait=_sleep,
        short_ms=_SHORT_REAL_MS,
        server_clock=True,
        raw=_redis_raw(client, prefix),
        url=url,
        async_front=async_front,
    )
    store.close()
    client.close()


_BACKENDS = {
    "memory": (_memory, ()),
    "sqlite": (_sqlite, (pytest.mark.sqlite,)),
    "postgres": (_postgres, (pytest.mark.postgres,)),
    "redis": (_redis, (pytest.mark.redis,)),
    "redis-cluster": (_redis_cluster, (pytest.mark.redis, pytest.mark.redis_cluster)),
}

ALL_STORES = [
    pytest.param((backend, async_front), marks=marks, id=f"{backend}-{'async' if async_front else 'sync'}")
    for backend, (_, marks) in _BACKENDS.items()
    for async_front in (False, True)
]


class TestStoreContract(StoreContract):
    """Every store idempo ships, sync and async, against the one contract."""

    @pytest.fixture(params=ALL_STORES)
    def subject(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSubject]:
        backend, async_front = request.param
        yield from _BACKENDS[backend][0](request, tmp_path, async_front)
