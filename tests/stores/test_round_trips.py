"""Round trips to the store per request, counted on the wire (DESIGN: two to execute, one to replay).

A TCP proxy between the store and its server counts the request flights
that follow a server reply; the requests go through the ASGI middleware, with
the store opened from its URL as an application (or ``idempo demo``) would.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from store_helpers import OrdersApp, RoundTripProxy

from idempo import async_store_from_url
from idempo.asgi import IdempotencyMiddleware

WARM_UP = 8  # > psycopg's prepare_threshold (5): statements are prepared by then


def _via(url: str, proxy: RoundTripProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")
    userinfo = netloc[0] + "@" if netloc[1] else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{proxy.port}"))


async def _count(store_url: str, proxy: RoundTripProxy) -> tuple[int, int]:
    """Warm up, then return the round trips of one first execution and of its replay."""
    store = async_store_from_url(store_url)
    app = OrdersApp()
    transport = httpx.ASGITransport(app=IdempotencyMiddleware(app, store))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def post(key: str) -> httpx.Response:
                return await client.post("/orders", json={"sku": "A"}, headers={"Idempotency-Key": key})

            for _ in range(WARM_UP):
                key = uuid.uuid4().hex
                assert (await post(key)).status_code == 201
                assert (await post(key)).headers.get("idempotent-replayed") == "true"
            key = uuid.uuid4().hex
            proxy.reset()
            first = await post(key)
            executed = proxy.round_trips
            proxy.reset()
            replay = await post(key)
            replayed = proxy.round_trips
    finally:
        await store.aclose()
    assert first.status_code == 201
    assert replay.headers.get("idempotent-replayed") == "true"
    assert app.calls == WARM_UP + 1
    return executed, replayed


@pytest.mark.postgres
def test_postgres_round_trips(postgres_store_url: str, round_trip_proxy: Callable[[str, int], RoundTripProxy]) -> None:
    """PostgreSQL: a first execution costs 2 round trips (begin, complete), a replay 1."""
    parts = urlsplit(postgres_store_url)
    proxy = round_trip_proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    url = _via(postgres_store_url, proxy) + "&max_size=1"
    assert asyncio.run(_count(url, proxy)) == (2, 1)


@pytest.mark.redis
def test_redis_round_trips(redis_store_url: str, round_trip_proxy: Callable[[str, int], RoundTripProxy]) -> None:
    """Redis: a first execution costs 2 round trips (EVALSHA begin, EVALSHA complete), a replay 1."""
    parts = urlsplit(redis_store_url)
    proxy = round_trip_proxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    url = _via(redis_store_url, proxy) + "&max_connections=1"
    assert asyncio.run(_count(url, proxy)) == (2, 1)


@pytest.mark.postgres
def test_postgres_replay_neither_locks_nor_writes(postgres_store_url: str, postgres_url: str) -> None:
    """A replay's begin leaves the row untouched (same xmax): no row lock, so no write and no WAL flush to wait for."""
    import psycopg

    from idempo import Acquired, Existing, StoredResponse
    from idempo.stores.postgres import PostgresStore

    schema = dict(part.split("=", 1) for part in urlsplit(postgres_store_url).query.split("&"))["schema"]
    store = PostgresStore(postgres_store_url)
    key = "replay-" + uuid.uuid4().hex
    try:
        taken = store.begin(key, "fp", 30_000)
        assert isinstance(taken, Acquired)
        store.complete(key, taken.token, StoredResponse(201, (), b"{}"), 60_000)
        with psycopg.connect(postgres_url, autocommit=True) as conn:

            def xmax() -> str:
                row = conn.execute(f"SELECT xmax::text FROM {schema}.idempo_records WHERE record_key = %s", (key,))
                return str(row.fetchone())

            before = xmax()
            for _ in range(3):
                assert isinstance(store.begin(key, "fp", 30_000), Existing)
            assert xmax() == before
    finally:
        store.close()


async def _count_transactional(pool_url: str, schema: str, proxy: RoundTripProxy) -> tuple[int, int]:
    """Warm up, then the round trips of one transactional first execution (a statement through tx) and its replay."""
    import psycopg_pool
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from idempo.starlette import transaction
    from idempo.stores.postgres import AsyncPostgresStore

    calls = 0

    async def orders(request: Request) -> JSONResponse:
        nonlocal calls
        calls += 1
        tx = await transaction(request)
        await tx.connection.execute("SELECT %s::bigint", (calls,))  # the handler's one statement
        return JSONResponse({"order_id": calls}, status_code=201)

    pool = psycopg_pool.AsyncConnectionPool(pool_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False)
    await pool.open()
    store = AsyncPostgresStore.from_pool(pool, schema=schema)
    app = IdempotencyMiddleware(Starlette(routes=[Route("/orders", orders, methods=["POST"])]), store)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:

            async def post(key: str) -> httpx.Response:
                return await client.post("/orders", json={"sku": "A"}, headers={"Idempotency-Key": key})

            for _ in range(WARM_UP):
                assert (await post(uuid.uuid4().hex)).status_code == 201
            key = uuid.uuid4().hex
            proxy.reset()
            first = await post(key)
            executed = proxy.round_trips
            proxy.reset()
            replay = await post(key)
            replayed = proxy.round_trips
    finally:
        await store.aclose()
        await pool.close()
    assert first.status_code == 201, first.text
    assert replay.headers.get("idempotent-replayed") == "true"
    assert calls == WARM_UP + 1
    return executed, replayed


@pytest.mark.postgres
def test_postgres_transactional_round_trips(
    postgres_store_url: str, round_trip_proxy: Callable[[str, int], RoundTripProxy]
) -> None:
    """PostgreSQL, a transactional route (from_pool) whose handler runs one statement through tx: 4 round
    trips (the claim; BEGIN and idempo's savepoint; the handler's statement; the savepoint's RELEASE, the
    record's completion and COMMIT in one pipeline), a replay 1. The RELEASE used to be a round trip of its own."""
    parts = urlsplit(postgres_store_url)
    proxy = round_trip_proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    schema = dict(part.split("=", 1) for part in parts.query.split("&"))["schema"]
    pool_url = urlunsplit(urlsplit(_via(postgres_store_url, proxy))._replace(query=""))  # the app's own pool
    assert asyncio.run(_count_transactional(pool_url, schema, proxy)) == (4, 1)
