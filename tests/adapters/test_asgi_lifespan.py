"""The ASGI middleware in the lifespan: the store opens at startup; one built from a URL closes at shutdown."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from idempo import RecordState, StoredResponse
from idempo._engine import lease
from idempo.asgi import IdempotencyMiddleware
from idempo.exceptions import StoreUnavailable
from idempo.secrets import is_reserved
from idempo.stores import AsyncMemoryStore, MemoryStore
from tests.adapters.conftest import JSON, K1, B
from tests.support.clock import eventually
from tests.support.orders import Orders, litestar_app, starlette_app
from tests.support.servers import bound_socket


def serve_with_lifespan(app: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    """uvicorn with lifespan on, in a thread; returns once it started or gave up.

    uvicorn ends a failed startup with ``sys.exit(3)``; the thread keeps the
    code in ``server.exit_code`` instead of raising it.
    """
    sock = bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="critical"))

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:
            server.exit_code = exc.code  # type: ignore[attr-defined]
        finally:
            sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return server, thread, url


def test_store_from_a_url_is_closed_at_shutdown(tmp_path: Path) -> None:
    """A store the middleware built from a URL serves requests, then is closed when the app shuts down."""
    middleware = IdempotencyMiddleware(starlette_app(Orders()), f"sqlite:///{tmp_path / 'idempo.db'}")
    server, thread, url = serve_with_lifespan(middleware)
    assert server.started
    first = httpx.post(url + "/orders", content=B, headers={**JSON, "Idempotency-Key": K1})
    assert httpx.post(url + "/orders", content=B, headers={**JSON, "Idempotency-Key": K1}).content == first.content
    server.should_exit = True
    thread.join(10)
    assert not thread.is_alive()
    assert middleware.store._db._all == []  # type: ignore[attr-defined]  # every connection closed


def test_misconfigured_store_fails_the_startup(postgres_url: str) -> None:
    """A PostgreSQL store whose schema was never migrated fails the app's startup, not its first request."""
    missing = f"idempo_never_migrated_{uuid.uuid4().hex[:8]}"
    middleware = IdempotencyMiddleware(starlette_app(Orders()), f"{postgres_url}?schema={missing}")
    server, thread, _ = serve_with_lifespan(middleware)
    thread.join(15)
    assert not thread.is_alive()
    assert not server.started
    assert server.exit_code == 3  # type: ignore[attr-defined]  # uvicorn's "startup failed"


class CompleteFailingStore(MemoryStore):
    """A memory store whose ``complete`` raises StoreUnavailable while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        if self.down:
            raise StoreUnavailable("the store is down (injected)")
        super().complete(record_key, token, response, record_ttl_ms)


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "idempo_event", None) == event]


def with_idempo(framework: str, orders: Orders, store: AsyncMemoryStore) -> Any:
    """The contract app with idempo: the ASGI middleware around Starlette, or Litestar's plugin."""
    if framework == "litestar":
        from idempo.litestar import IdempotencyPlugin

        return litestar_app(orders, plugins=[IdempotencyPlugin(store)])
    return IdempotencyMiddleware(starlette_app(orders), store)


@pytest.mark.parametrize("framework", ["starlette", "litestar"])
def test_shutdown_waits_for_a_save_being_retried(
    framework: str, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    """The save after the handler fails and is retried in the background; the server is stopped meanwhile. The
    lifespan's shutdown waits for the retry (WARNING ``shutdown_waiting`` naming the record), the store comes
    back during the wait, and the save lands before the process would end: the record is completed, so a
    retry replays instead of a takeover running the handler again."""
    monkeypatch.setattr(lease, "SHUTDOWN_WAIT", 60.0)
    caplog.set_level(logging.INFO, logger="idempo")
    sync = CompleteFailingStore()
    orders = Orders()
    server, thread, url = serve_with_lifespan(with_idempo(framework, orders, AsyncMemoryStore(sync)))
    assert server.started
    answer = httpx.post(url + "/orders", content=B, headers={**JSON, "Idempotency-Key": K1})
    assert answer.status_code == 201
    server.should_exit = True
    assert eventually(lambda: _events(caplog, "shutdown_waiting"))
    (waiting,) = _events(caplog, "shutdown_waiting")
    sync.down = False  # the store is back while the shutdown waits
    thread.join(30)
    assert not thread.is_alive()
    assert orders.calls == 1
    records = [key for key in sync._records if not is_reserved(key)]
    assert len(records) == 1
    assert records[0] in waiting.getMessage()
    record = sync.get(records[0])
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert _events(caplog, "save_abandoned") == []


def test_shutdown_waits_only_up_to_its_bound(caplog: pytest.LogCaptureFixture, monkeypatch: Any) -> None:
    """The store stays down: the shutdown waits ``SHUTDOWN_WAIT`` seconds, then ends, logging an ERROR
    ``save_abandoned`` for the record whose save did not land."""
    monkeypatch.setattr(lease, "SHUTDOWN_WAIT", 0.3)
    caplog.set_level(logging.INFO, logger="idempo")
    sync = CompleteFailingStore()
    server, thread, url = serve_with_lifespan(IdempotencyMiddleware(starlette_app(Orders()), AsyncMemoryStore(sync)))
    assert httpx.post(url + "/orders", content=B, headers={**JSON, "Idempotency-Key": K1}).status_code == 201
    server.should_exit = True
    thread.join(30)
    assert not thread.is_alive()
    (abandoned,) = _events(caplog, "save_abandoned")
    assert abandoned.levelno == logging.ERROR
    (record_key,) = [key for key in sync._records if not is_reserved(key)]
    assert abandoned.idempo_record_key == record_key  # type: ignore[attr-defined]
    assert "takeover decides" in abandoned.getMessage()
