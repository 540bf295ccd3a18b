"""Store failures against real servers: 503 while the store is down, recovery without a restart (B18).

Redis: a redis-server of the test's own is stopped mid-run and started again
on the same port (the shared server is never touched). PostgreSQL: the
store's own backends, found by their application_name, are killed with
pg_terminate_backend.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from store_helpers import OrdersApp, serve

from idempo import StoreError, StoreUnavailable
from idempo.asgi import IdempotencyMiddleware
from idempo.exceptions import ConfigurationError

BODY = {"sku": "A", "qty": 1}


def _post(client: httpx.Client, key: str) -> httpx.Response:
    return client.post("/orders", json=BODY, headers={"Idempotency-Key": key})


def _check_outage_and_recovery(client: httpx.Client, app: OrdersApp, down: Any, up: Any) -> None:
    first = _post(client, "k1")
    assert first.status_code == 201
    assert app.calls == 1

    down()
    during = _post(client, "k2")
    assert during.status_code == 503
    assert during.headers["retry-after"].isdigit()
    assert during.headers["content-type"] == "application/problem+json"
    assert app.calls == 1, "the handler must not run while the store is down"

    up()
    after = _post(client, "k2")
    assert after.status_code == 201, after.text
    assert app.calls == 2
    replay = _post(client, "k2")
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == after.content
    assert app.calls == 2, "the recovered store must replay, not execute again"


@pytest.mark.redis
def test_redis_stopped_mid_run_answers_503_then_recovers(redis_server: Any) -> None:
    """B18: Redis stopped mid-run -> 503 + Retry-After, handler not run; restarted -> recovers, executes once."""
    from idempo.stores.redis import AsyncRedisStore

    server = redis_server()
    store = AsyncRedisStore(server.url, prefix="outage:", socket_timeout=2.0)
    app = OrdersApp(on_shutdown=store.aclose)
    with serve(IdempotencyMiddleware(app, store)) as base, httpx.Client(base_url=base, timeout=30) as client:
        # Restarted, the server has lost its scripts too: EVALSHA falls back to loading them.
        _check_outage_and_recovery(client, app, server.stop, server.start)


@pytest.mark.redis
def test_redis_blocking_store_maps_outage_to_store_unavailable(redis_server: Any) -> None:
    """The blocking Redis store raises StoreUnavailable while the server is down and works again after."""
    from idempo.stores.redis import RedisStore

    server = redis_server()
    store = RedisStore(server.url, prefix="outage:")
    try:
        assert store.get("k") is None
        server.stop()
        with pytest.raises(StoreUnavailable):
            store.begin("k", "fp", 30_000)
        server.start()
        assert store.begin("k", "fp", 30_000).__class__.__name__ == "Acquired"
    finally:
        store.close()


def _terminate_backends(postgres_url: str, application_name: str) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchall()
        assert killed, "the store had no connection to kill"
        deadline = time.monotonic() + 10
        while admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, "the killed backends did not exit"
            time.sleep(0.02)


@pytest.mark.postgres
def test_postgres_connections_killed_answers_503_then_recovers(postgres_url: str, postgres_store_url: str) -> None:
    """B18: the store's PostgreSQL backends killed -> 503 + Retry-After; the pool recovers, executes once."""
    from idempo.stores.postgres import AsyncPostgresStore

    name = f"idempo-outage-{uuid.uuid4().hex[:8]}"
    store = AsyncPostgresStore(postgres_store_url, application_name=name, min_size=2, max_size=4)
    app = OrdersApp(on_shutdown=store.aclose)
    with serve(IdempotencyMiddleware(app, store)) as base, httpx.Client(base_url=base, timeout=30) as client:
        _check_outage_and_recovery(client, app, lambda: _terminate_backends(postgres_url, name), lambda: None)


@pytest.mark.postgres
def test_postgres_blocking_store_recovers_after_killed_connections(postgres_url: str, postgres_store_url: str) -> None:
    """The blocking PostgreSQL store raises StoreUnavailable on a killed connection, then serves again."""
    from idempo.stores.postgres import PostgresStore

    name = f"idempo-outage-{uuid.uuid4().hex[:8]}"
    store = PostgresStore(postgres_store_url, application_name=name, min_size=2, max_size=4)
    try:
        key = uuid.uuid4().hex
        assert store.get(key) is None
        # The pool opens its min_size connections in the background: one opened after the kill
        # (late under load) would never exit, and would serve the next call as if nothing happened.
        store._get_pool().wait(timeout=10)
        _terminate_backends(postgres_url, name)
        with pytest.raises(StoreUnavailable):
            store.begin(key, "fp", 30_000)
        assert store.begin(key, "fp", 30_000).__class__.__name__ == "Acquired"
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_schema_dropped_under_the_store_is_store_error(postgres_url: str) -> None:
    """A failure that is not about reaching the server (the table is gone) is StoreError, not StoreUnavailable."""
    import psycopg

    from idempo.stores.postgres import PostgresStore

    schema = f"idempo_gone_{uuid.uuid4().hex[:8]}"
    store = PostgresStore(f"{postgres_url}?schema={schema}", check_schema=False)
    try:
        with pytest.raises(ConfigurationError, match="idempo migrate"):
            store.check_schema()
        store.create_schema()
        store.check_schema()
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
        with pytest.raises(StoreError) as caught:
            store.begin("k", "fp", 30_000)
        assert not isinstance(caught.value, StoreUnavailable)
    finally:
        store.close()
