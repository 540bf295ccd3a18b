"""The ASGI middleware on trio: a real Hypercorn server running its trio worker.

uvicorn runs asyncio only; Hypercorn serves the same app on trio, so the
middleware's waits, body replay and SQLite offload are shown to work there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from idempo import AsyncStore, Policy
from idempo.asgi import IdempotencyMiddleware
from idempo.stores import AsyncMemoryStore
from idempo.stores.sqlite import AsyncSQLiteStore
from tests.adapters.conftest import JSON, K1, B
from tests.support.clock import eventually
from tests.support.orders import Orders, starlette_app
from tests.support.servers import free_port

trio = pytest.importorskip("trio")
hypercorn_trio = pytest.importorskip("hypercorn.trio")
hypercorn_config = pytest.importorskip("hypercorn.config")


@contextmanager
def running_on_trio(app: Any) -> Iterator[str]:
    """Serve an ASGI app with Hypercorn's trio worker in a thread; yield its base URL."""
    port = free_port()
    config = hypercorn_config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.loglevel = "WARNING"
    stop = threading.Event()
    started = threading.Event()

    async def shutdown_trigger() -> None:
        while not stop.is_set():
            await trio.sleep(0.02)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: hypercorn_trio.serve(
                    app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
                )
            )
            started.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(10), "hypercorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_trio_server_executes_once_and_replays(tmp_path: Path, store_kind: str) -> None:
    """On trio: a duplicate in flight gets 409 (or, waiting, the replay); the handler runs once."""
    orders = Orders()
    store: AsyncStore = AsyncMemoryStore() if store_kind == "memory" else AsyncSQLiteStore(tmp_path / "i.db")
    app = IdempotencyMiddleware(starlette_app(orders), store, policy=Policy(wait=10))
    headers = {**JSON, "Idempotency-Key": K1}
    with running_on_trio(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/orders", content=B, headers={**headers, "x-test-sleep": "0.5"})
            assert eventually(lambda: orders.calls == 1)
            waited = client.post("/orders", content=B, headers=headers)
            original = first.result()
        replay = client.post("/orders", content=B, headers=headers)
        mismatch = client.post("/orders", content=b'{"sku":"B"}', headers=headers)
    assert original.status_code == 201
    assert waited.headers["idempotent-replayed"] == "true"
    assert waited.content == replay.content == original.content
    assert mismatch.status_code == 422
    assert orders.calls == 1


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_trio_renews_the_lease_of_a_slow_handler(tmp_path: Path, store_kind: str) -> None:
    """On trio the lease is renewed too: at twice the lease TTL a duplicate still gets 409; the handler runs once."""
    orders = Orders()
    store: AsyncStore = AsyncMemoryStore() if store_kind == "memory" else AsyncSQLiteStore(tmp_path / "i.db")
    app = IdempotencyMiddleware(starlette_app(orders), store, policy=Policy(lease_ttl=0.6))
    headers = {**JSON, "Idempotency-Key": K1}
    with running_on_trio(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/orders", content=B, headers={**headers, "x-test-sleep": "2.0"})
            assert eventually(lambda: orders.calls == 1)
            time.sleep(1.2)  # twice the lease TTL: without renewal a duplicate would take the record over
            duplicate = client.post("/orders", content=B, headers=headers)
            original = first.result()
        replay = client.post("/orders", content=B, headers=headers)
    assert duplicate.status_code == 409
    assert original.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == original.content
    assert orders.calls == 1
