"""Start-up checks: a transactional route the store cannot serve, or a sync one, stops the app at start-up
(lifespan.startup.failed with one line), not per request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

import idempo.fastapi
from idempo.asgi import IdempotencyMiddleware
from idempo.stores.memory import AsyncMemoryStore
from idempo.stores.sqlite import AsyncSQLiteStore


async def _startup(app: Any) -> dict[str, Any]:
    """Run the ASGI lifespan start-up of ``app``; return the message it answered with."""
    sent: list[dict[str, Any]] = []
    received = [{"type": "lifespan.startup"}]

    async def receive() -> dict[str, Any]:
        if received:
            return received.pop()
        # Shut down once start-up answered.
        return {"type": "lifespan.shutdown"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent[0]


def _app(store: Any, *, sync: bool = False) -> FastAPI:
    app = FastAPI()
    if sync:

        @app.post("/pay")
        def pay_sync(tx: idempo.fastapi.Transaction) -> None: ...

    else:

        @app.post("/pay")
        async def pay(tx: idempo.fastapi.Transaction) -> None: ...

    app.add_middleware(IdempotencyMiddleware, store=store)
    return app


@pytest.mark.anyio
async def test_session_on_a_store_without_an_engine_fails_startup(tmp_path: Path) -> None:
    """idempo.fastapi.Session on a store not built by from_engine (no SQLAlchemy session to give): start-up
    fails naming the route and the fix, rather than a 500 on every request."""
    app = FastAPI()

    @app.post("/pay")
    async def pay(session: idempo.fastapi.Session) -> None: ...

    app.add_middleware(IdempotencyMiddleware, store=AsyncSQLiteStore(str(tmp_path / "app.db")))
    message = await _startup(app)
    assert message["type"] == "lifespan.startup.failed"
    assert "/pay" in message["message"]
    assert "from_engine" in message["message"]


@pytest.mark.anyio
async def test_memory_store_fails_startup() -> None:
    """A route asking for a transaction on a memory store: start-up fails, naming the route and the fix."""
    message = await _startup(_app(AsyncMemoryStore()))
    assert message["type"] == "lifespan.startup.failed"
    assert "/pay" in message["message"]
    assert "from_pool" in message["message"]


@pytest.mark.anyio
async def test_sync_route_fails_startup(tmp_path: Path) -> None:
    """A sync def route asking for the (async) transaction: start-up fails."""
    store = AsyncSQLiteStore(tmp_path / "app.db")
    message = await _startup(_app(store, sync=True))
    assert message["type"] == "lifespan.startup.failed"
    assert "async def" in message["message"]
    await store.aclose()


@pytest.mark.anyio
async def test_transactional_store_starts(tmp_path: Path) -> None:
    store = AsyncSQLiteStore(tmp_path / "app.db")
    message = await _startup(_app(store))
    assert message["type"] == "lifespan.startup.complete"
    await store.aclose()


@pytest.mark.postgres
def test_from_pool_refuses_the_other_twins_pool() -> None:
    """A blocking pool given to the async store (or the reverse) is a ConfigurationError naming the right
    store, not a TypeError from the first checkout at start-up (a new user's trial, 2026-12-05)."""
    import psycopg_pool

    from idempo import ConfigurationError
    from idempo.stores.postgres import AsyncPostgresStore, PostgresStore

    blocking = psycopg_pool.ConnectionPool("postgresql://postgres@127.0.0.1/test", open=False)
    with pytest.raises(ConfigurationError, match=r"use PostgresStore\.from_pool for that pool"):
        AsyncPostgresStore.from_pool(blocking)
    asynchronous = psycopg_pool.AsyncConnectionPool("postgresql://postgres@127.0.0.1/test", open=False)
    with pytest.raises(ConfigurationError, match=r"use AsyncPostgresStore\.from_pool for that pool"):
        PostgresStore.from_pool(asynchronous)
    assert isinstance(PostgresStore.from_pool(blocking), PostgresStore)
    assert isinstance(AsyncPostgresStore.from_pool(asynchronous), AsyncPostgresStore)


@pytest.mark.postgres
def test_a_pool_store_without_its_tables_names_the_pool_and_a_command_that_works() -> None:
    """A store on the app's pool has no URL of its own: the start-up error names the pool and tells to run
    migrate with the database's URL and the schema, not "cannot use the store at postgresql://" and
    "--store <the same URL>" (a new user's trial)."""
    import psycopg_pool

    from idempo import ConfigurationError
    from idempo.stores.postgres import PostgresStore

    with psycopg_pool.ConnectionPool("postgresql://postgres@127.0.0.1/test", min_size=1, name="payments") as pool:
        store = PostgresStore.from_pool(pool, schema="idempo_never_created")
        with pytest.raises(ConfigurationError) as caught:
            store.open()
    message = str(caught.value)
    assert "postgresql://(pool payments)?schema=idempo_never_created" in message, message
    assert "idempo migrate --store <your database's URL>?schema=idempo_never_created" in message, message
