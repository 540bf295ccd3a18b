"""The ASGI middleware in the lifespan: the store opens at startup; one built from a URL closes at shutdown."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from idempo.asgi import IdempotencyMiddleware
from tests.adapters.conftest import JSON, K1, B
from tests.support.orders import Orders, starlette_app
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
