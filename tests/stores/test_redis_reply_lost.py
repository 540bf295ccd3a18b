"""A Redis reply lost after its script ran: redis-py sends the script again on a new connection.

The store retries a command once on a broken connection (so a pool survives a
Redis restart without a 503). When the connection breaks after the script
ran, the retry runs it a second time; ``begin`` and ``complete`` carry an
attempt id so that second run recognises the first: the caller gets its own
lease (not a 409 from itself until the lease expires) and its completion is
confirmed (not reported as a lost lease). The reply is cut on the wire by a
TCP proxy in front of the real Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from store_helpers import OrdersApp, RoundTripProxy

from idempo import Acquired, Existing, LeaseLost, RecordState, StoredResponse
from idempo.asgi import IdempotencyMiddleware
from idempo.stores.redis import AsyncRedisStore, RedisStore

RESPONSE = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"order_id": 1}')

pytestmark = pytest.mark.redis


def _proxied(redis_store_url: str, start: Callable[[str, int], RoundTripProxy]) -> tuple[str, RoundTripProxy]:
    parts = urlsplit(redis_store_url)
    proxy = start(parts.hostname or "127.0.0.1", parts.port or 6379)
    url = urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}"))
    return url + "&max_connections=1", proxy


def _lease(store: RedisStore) -> tuple[str, Acquired]:
    """A fresh key and the lease just taken on it."""
    key = uuid.uuid4().hex
    taken = store.begin(key, "fp", 30_000)
    assert isinstance(taken, Acquired)
    return key, taken


# The default deadline, and a short one: the retry of a lost reply fits within either (issue 10 item 4).
DEADLINES = pytest.mark.parametrize("deadline", ["", "&deadline=0.3"], ids=["default-deadline", "deadline-0.3"])


@contextmanager
def _warm_store(
    redis_store_url: str, start: Callable[[str, int], RoundTripProxy], deadline: str = ""
) -> Iterator[tuple[RedisStore, RoundTripProxy]]:
    """A store through a proxy, its scripts loaded and its one connection open: the next reply is the next call's."""
    url, proxy = _proxied(redis_store_url, start)
    store = RedisStore(url + deadline)
    try:
        # A first EVALSHA answers NOSCRIPT and loads the script: done here, so
        # a dropped reply is always the call's own.
        key, taken = _lease(store)
        store.complete(key, taken.token, RESPONSE, 60_000)
        yield store, proxy
    finally:
        store.close()


@DEADLINES
def test_begin_whose_reply_was_lost_keeps_its_lease(
    redis_store_url: str, round_trip_proxy: Callable[[str, int], RoundTripProxy], deadline: str
) -> None:
    """The retried begin returns the lease its first run took (same token); another caller still finds it held."""
    with _warm_store(redis_store_url, round_trip_proxy, deadline) as (store, proxy):
        key = uuid.uuid4().hex
        proxy.drop_next_reply()
        taken = store.begin(key, "fp", 30_000)
        assert proxy.replies_dropped == 1
        assert isinstance(taken, Acquired), taken
        assert taken.takeover is False
        record = store.get(key)
        assert record is not None
        assert record.state is RecordState.IN_PROGRESS
        assert record.token == taken.token
        # The attempt id is this call's alone: a duplicate request is not let in.
        duplicate = store.begin(key, "fp", 30_000)
        assert isinstance(duplicate, Existing)
        assert duplicate.record.token == taken.token


def test_complete_whose_reply_was_lost_is_confirmed(
    redis_store_url: str, round_trip_proxy: Callable[[str, int], RoundTripProxy]
) -> None:
    """The retried complete succeeds (no LeaseLost) and the record holds the response once stored."""
    with _warm_store(redis_store_url, round_trip_proxy) as (store, proxy):
        key, taken = _lease(store)
        proxy.drop_next_reply()
        store.complete(key, taken.token, RESPONSE, 60_000)
        assert proxy.replies_dropped == 1
        record = store.get(key)
        assert record is not None
        assert record.state is RecordState.COMPLETED
        assert record.response == RESPONSE
        # A second complete with the same token is a different call: refused as before.
        with pytest.raises(LeaseLost):
            store.complete(key, taken.token, StoredResponse(200, (), b"other"), 60_000)


@DEADLINES
def test_request_whose_begin_reply_was_lost_executes_once(
    redis_store_url: str, round_trip_proxy: Callable[[str, int], RoundTripProxy], deadline: str
) -> None:
    """Through the ASGI middleware: 201 (not a 409 from itself), the handler ran once, the replay is stored."""
    url, proxy = _proxied(redis_store_url, round_trip_proxy)
    app = OrdersApp()

    async def main() -> tuple[httpx.Response, httpx.Response]:
        store = AsyncRedisStore(url + deadline)
        transport = httpx.ASGITransport(app=IdempotencyMiddleware(app, store))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

                async def post(key: str) -> httpx.Response:
                    return await client.post("/orders", json={"sku": "A"}, headers={"Idempotency-Key": key})

                warm = uuid.uuid4().hex
                assert (await post(warm)).status_code == 201
                assert (await post(warm)).headers.get("idempotent-replayed") == "true"
                key = uuid.uuid4().hex
                proxy.drop_next_reply()
                first = await post(key)
                return first, await post(key)
        finally:
            await store.aclose()

    first, replay = asyncio.run(main())
    assert proxy.replies_dropped == 1
    assert first.status_code == 201, first.text
    assert replay.status_code == 201
    assert replay.headers.get("idempotent-replayed") == "true"
    assert replay.content == first.content == b'{"order_id": 2}'
    assert app.calls == 2  # the warm-up request and this one, each once


def test_release_whose_reply_was_lost_is_confirmed(
    redis_store_url: str, round_trip_proxy: Callable[[str, int], RoundTripProxy]
) -> None:
    """The retried release succeeds (no LeaseLost); the key is free, and the next lease's token is greater."""
    with _warm_store(redis_store_url, round_trip_proxy) as (store, proxy):
        key, taken = _lease(store)
        proxy.drop_next_reply()
        store.release(key, taken.token)
        assert proxy.replies_dropped == 1
        assert store.get(key) is None
        again = store.begin(key, "fp", 30_000)
        assert isinstance(again, Acquired)
        assert again.takeover is False
        assert again.token > taken.token
        # The first lease's release, sent once more, cannot remove the second lease.
        with pytest.raises(LeaseLost):
            store.release(key, taken.token)
        assert isinstance(store.begin(key, "fp", 30_000), Existing)


def test_a_lease_taken_right_after_a_release_has_a_greater_token(redis_store_url: str) -> None:
    """Release then begin, 300 times as fast as possible: the new token is always greater (never the same ms's)."""
    store = RedisStore(redis_store_url)
    try:
        key = uuid.uuid4().hex
        same = 0
        for _ in range(300):
            first = store.begin(key, "fp", 30_000)
            assert isinstance(first, Acquired)
            store.release(key, first.token)
            second = store.begin(key, "fp", 30_000)
            assert isinstance(second, Acquired)
            same += second.token <= first.token
            store.release(key, second.token)
    finally:
        store.close()
    assert same == 0


def test_released_records_are_no_records_for_stats_and_purge(redis_store_url: str) -> None:
    """A released record's tombstone is not counted by stats nor deleted by purge_expired; get sees nothing."""
    import redis

    prefix = f"tomb-{uuid.uuid4().hex[:8]}:"
    url = redis_store_url.replace("prefix=", f"prefix={prefix}")
    store = RedisStore(url)
    client = redis.Redis.from_url(redis_store_url.split("?")[0])
    try:
        keys = [uuid.uuid4().hex for _ in range(5)]
        for key in keys:
            taken = store.begin(key, "fp", 30_000)
            assert isinstance(taken, Acquired)
            store.release(key, taken.token)
        stats = store.stats()
        assert (stats.in_progress, stats.completed, stats.expired) == (0, 0, 0)
        assert store.purge_expired() == 0
        assert all(store.get(key) is None for key in keys)
        tombstone = client.hgetall(f"{store._codec.prefix}{{{keys[0]}}}")
        assert tombstone[b"state"] == b"released"
        assert tombstone[b"expires_at"] == b"0"
        assert 0 < client.pttl(f"{store._codec.prefix}{{{keys[0]}}}") <= 5000
    finally:
        for key in client.scan_iter(match=f"{store._codec.prefix}*"):
            client.delete(key)
        client.close()
        store.close()
