"""Every store call has one deadline (issue 10 item 4; DESIGN "Stores"; shared/cases B18).

Each network store talks to the shared PostgreSQL or Redis through a relay of
the test's own (tests/support/relay.py), which is cut in two ways: a
blackhole (connections accepted and held, nothing passes: a silent network
partition) and a refusal (the port refuses, open connections are reset: the
server is down). Either way a request gets its 503 with Retry-After within a
generous multiple of the store's deadline, the handler never runs, and once
the relay heals the same app, never restarted, executes and replays again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from store_helpers import OrdersApp, serve
from tests.support.relay import Relay

from idempo import Policy, StoreUnavailable
from idempo._core.records import Acquired
from idempo.asgi import IdempotencyMiddleware

# Short, so the suite stays fast; the bound every wait is held to is a
# generous multiple of it (the machine is shared), never a tight timing.
DEADLINE = 0.5
BOUND = DEADLINE * 3 + 0.5  # plus the HTTP hop through uvicorn
RECOVERY = 30.0  # seconds a healed store has to serve again (a pool reconnects with backoff)
BODY = {"sku": "A", "qty": 1}

pytestmark = pytest.mark.slow


@pytest.fixture
def relay() -> Iterator[Callable[[str], tuple[Relay, str]]]:
    """Start relays to a store URL's host:port; yields ``(relay, URL through the relay)``."""
    relays: list[Relay] = []

    def start(url: str) -> tuple[Relay, str]:
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        started = Relay(parts.hostname, parts.port)
        relays.append(started)
        return started, started.url_for(url)

    yield start
    for started in relays:
        started.close()


def _cut(relay: Relay, how: str) -> None:
    if how == "blackhole":
        relay.blackhole()
    else:
        relay.refuse()


def _async_store(backend: str, url: str) -> Any:
    if backend == "postgres":
        from idempo.stores.postgres import AsyncPostgresStore

        return AsyncPostgresStore(url, deadline=DEADLINE, min_size=2, max_size=4)
    from idempo.stores.redis import AsyncRedisStore

    return AsyncRedisStore(url, deadline=DEADLINE)


def _blocking_store(backend: str, url: str) -> Any:
    if backend == "postgres":
        from idempo.stores.postgres import PostgresStore

        return PostgresStore(url, deadline=DEADLINE, min_size=2, max_size=4)
    from idempo.stores.redis import RedisStore

    return RedisStore(url, deadline=DEADLINE)


@pytest.fixture(params=["postgres", "redis"])
def store_url(request: pytest.FixtureRequest) -> tuple[str, str]:
    """``(backend, the session's store URL)`` for each network store."""
    backend: str = request.param
    request.applymarker(getattr(pytest.mark, backend))
    return backend, request.getfixturevalue(f"{backend}_store_url")


def _post(client: httpx.Client, key: str) -> httpx.Response:
    return client.post("/orders", json=BODY, headers={"Idempotency-Key": key})


@pytest.mark.parametrize("how", ["blackhole", "refuse"])
def test_asgi_outage_is_503_within_the_deadline_then_recovers(
    store_url: tuple[str, str], relay: Callable[[str], tuple[Relay, str]], how: str
) -> None:
    """B18: a store cut (blackholed or refusing) -> 503 + Retry-After within a few deadlines, the
    handler not run; the relay healed, the same app executes once and replays (after 409s while a
    claim that landed with its reply lost holds its lease)."""
    backend, url = store_url
    cut, through = relay(url)
    store = _async_store(backend, through)
    app = OrdersApp(on_shutdown=store.aclose)
    # The client's timeout is the bound: a request that waits past it fails the test.
    # A short lease: a begin sent into the cut may still land when the relay heals (its reply lost),
    # and its in-progress record answers this key 409 until its lease ends (DESIGN), not for 30 s.
    middleware = IdempotencyMiddleware(app, store, policy=Policy(lease_ttl=2.0))
    with serve(middleware) as base, httpx.Client(base_url=base, timeout=BOUND) as client:
        assert _post(client, uuid.uuid4().hex).status_code == 201
        assert app.calls == 1
        _cut(cut, how)
        key = uuid.uuid4().hex
        for _ in range(3):
            during = _post(client, key)
            assert during.status_code == 503, during.text
            assert during.headers["content-type"] == "application/problem+json"
            assert during.headers["retry-after"].isdigit()
        assert app.calls == 1, "the handler must not run while the store is down"

        cut.heal()
        ends = time.monotonic() + RECOVERY
        while (after := _post(client, key)).status_code in (503, 409):
            assert time.monotonic() < ends, "the store did not recover after the relay healed"
            time.sleep(0.1)
        assert after.status_code == 201, after.text
        assert app.calls == 2
        replay = _post(client, key)
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == after.content
        assert app.calls == 2


@pytest.mark.parametrize("how", ["blackhole", "refuse"])
def test_blocking_store_outage_is_store_unavailable_within_the_deadline(
    store_url: tuple[str, str], relay: Callable[[str], tuple[Relay, str]], how: str
) -> None:
    """The blocking stores (WSGI, Django): each call during a cut raises StoreUnavailable within a few
    deadlines; after the heal the same store object serves again."""
    backend, url = store_url
    cut, through = relay(url)
    store = _blocking_store(backend, through)
    try:
        assert store.get(uuid.uuid4().hex) is None
        _cut(cut, how)
        key = uuid.uuid4().hex
        for call in (lambda: store.begin(key, "fp", 30_000), lambda: store.get(key)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - started < BOUND
        cut.heal()
        ends = time.monotonic() + RECOVERY
        while True:
            # A fresh key each time: a begin that timed out on our side may still have landed on the
            # server (its reply lost), and would then answer this key with its own record.
            try:
                result = store.begin(uuid.uuid4().hex, "fp", 30_000)
                break
            except StoreUnavailable:
                assert time.monotonic() < ends, "the store did not recover after the relay healed"
                time.sleep(0.1)
        assert isinstance(result, Acquired)
    finally:
        store.close()


@pytest.mark.redis
def test_async_redis_maintenance_calls_end_within_the_deadline(
    redis_store_url: str, relay: Callable[[str], tuple[Relay, str]]
) -> None:
    """The async Redis store sets no socket timeout of its own (its deadline cancels a whole call): stats()
    and purge_expired(), which scan and read in several round trips, end each one at the deadline too, so
    against a blackholed server they raise StoreUnavailable within a few deadlines instead of waiting."""
    from idempo.stores.redis import AsyncRedisStore

    cut, through = relay(redis_store_url)

    async def main() -> None:
        store = AsyncRedisStore(through, deadline=DEADLINE)
        try:
            assert isinstance(await store.begin(uuid.uuid4().hex, "fp", 30_000), Acquired)
            assert (await store.stats()).in_progress >= 1  # the record just begun, among the session's
            cut.blackhole()
            for call in (store.stats, store.purge_expired):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    async with asyncio.timeout(BOUND * 4):  # a call that waits on is this test's failure
                        await call()
                assert time.monotonic() - started < BOUND
        finally:
            cut.heal()
            await store.aclose()

    asyncio.run(main())


def test_deadline_is_a_url_option_and_constructor_argument(store_url: tuple[str, str]) -> None:
    """``?deadline=`` in the URL and ``deadline=`` on the constructor set the store's deadline (default 2 s)."""
    from idempo import async_store_from_url

    backend, url = store_url
    joined = "&" if "?" in url else "?"
    assert async_store_from_url(url).deadline == 2.0  # type: ignore[attr-defined]
    assert async_store_from_url(f"{url}{joined}deadline=0.75").deadline == 0.75  # type: ignore[attr-defined]
    assert _async_store(backend, url).deadline == DEADLINE


@pytest.mark.parametrize("value", ["0", "-1", "abc", "inf"])
def test_a_bad_deadline_is_a_configuration_error(value: str) -> None:
    """A deadline that is not a finite number of seconds > 0 is refused when the store is built."""
    from idempo import ConfigurationError, async_store_from_url

    pytest.importorskip("redis")
    pytest.importorskip("psycopg")
    for url in ("redis://127.0.0.1:6379/0", "postgresql://postgres@127.0.0.1:5432/test"):
        with pytest.raises(ConfigurationError, match="deadline"):
            async_store_from_url(f"{url}?deadline={value}")


@pytest.mark.postgres
def test_postgres_pool_serves_again_soon_after_a_long_outage(
    postgres_store_url: str, relay: Callable[[str], tuple[Relay, str]]
) -> None:
    """After 8 s of refused connections, the pool serves within a few deadlines of the heal: psycopg_pool's
    doubling reconnect delay (1, 2, 4, 8 s ...) is cut short, the next request starting a fresh attempt."""
    from idempo.stores.postgres import PostgresStore

    cut, through = relay(postgres_store_url)
    store = PostgresStore(through, deadline=DEADLINE, min_size=1, max_size=2)
    try:
        assert store.get(uuid.uuid4().hex) is None
        cut.refuse()
        ends = time.monotonic() + 8
        while time.monotonic() < ends:  # requests keep coming during the outage, as in production
            with pytest.raises(StoreUnavailable):
                store.get(uuid.uuid4().hex)
        cut.heal()
        healed = time.monotonic()
        while True:
            try:
                store.get(uuid.uuid4().hex)
                break
            except StoreUnavailable:
                # Without the cut, the next attempt is up to 8 s away.
                assert time.monotonic() - healed < DEADLINE * 10, "the pool did not reconnect soon after the heal"
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_refusing_connections_is_named_and_not_waited_for(
    postgres_store_url: str, relay: Callable[[str], tuple[Relay, str]]
) -> None:
    """Once the pool's attempt to reconnect was refused, a call says so (not a bare PoolTimeout) and waits
    only a moment for a connection, not its whole deadline."""
    from idempo.stores.postgres import PostgresStore

    cut, through = relay(postgres_store_url)
    store = PostgresStore(through, deadline=DEADLINE)
    try:
        assert store.get(uuid.uuid4().hex) is None
        cut.refuse()
        errors = []
        for _ in range(4):
            with pytest.raises(StoreUnavailable) as caught:
                store.get(uuid.uuid4().hex)
            errors.append(str(caught.value))
        assert "the server refuses connections" in errors[-1], errors
        assert "Connection refused" in errors[-1]
        assert store._settings.pool_wait(DEADLINE) < DEADLINE
    finally:
        store.close()
