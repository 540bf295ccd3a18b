"""ASGI specifics: raw ASGI apps, non-HTTP scopes, hop-by-hop headers, configuration."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest

from idempo import ConfigurationError, Policy, Verdict
from idempo.asgi import IdempotencyMiddleware
from idempo.stores import AsyncMemoryStore
from tests.adapters.conftest import JSON, K1, B
from tests.support.orders import Orders, raw_asgi_app
from tests.support.servers import running_asgi

HOP_BY_HOP = [
    (b"connection", b"close"),
    (b"keep-alive", b"timeout=5"),
    (b"proxy-authenticate", b"Basic"),
    (b"upgrade", b"h2c"),
    (b"trailer", b"x-checksum"),
    (b"x-custom", b"kept"),
]


@contextmanager
def served(app: Any, **options: Any) -> Iterator[httpx.Client]:
    """The app behind idempo (memory store) under uvicorn, with a client."""
    with (
        running_asgi(IdempotencyMiddleware(app, AsyncMemoryStore(), **options)) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        yield client


def post(client: httpx.Client) -> httpx.Response:
    return client.post("/orders", content=B, headers={**JSON, "Idempotency-Key": K1})


def test_raw_asgi_app_is_completed_and_replayed() -> None:
    """B04(c): a bare ASGI app writing raw start/body messages gets its record completed and replayed."""
    orders = Orders()
    with served(raw_asgi_app(orders)) as client:
        first = post(client)
        replay = post(client)
    assert first.status_code == replay.status_code == 201
    assert replay.content == first.content == b'{"order_id":1}'
    assert replay.headers["idempotent-replayed"] == "true"
    assert orders.calls == 1


def test_hop_by_hop_headers_are_not_replayed() -> None:
    """Hop-by-hop headers (RFC 9110 section 7.6.1) belong to one connection: never stored nor replayed."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": HOP_BY_HOP})
        await send({"type": "http.response.body", "body": b"made"})

    with served(app) as client:
        first = post(client)
        replay = post(client)
    assert first.headers["keep-alive"] == "timeout=5"
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["x-custom"] == "kept"
    for name in ("keep-alive", "proxy-authenticate", "upgrade", "trailer"):
        assert name not in replay.headers
    assert replay.headers.get("connection") != "close"


def test_headers_the_connection_field_names_are_not_replayed() -> None:
    """A header the answer's ``Connection`` field names is hop-by-hop too (RFC 9110 section 7.6.1): not replayed.

    Before, only the fixed hop-by-hop names were left out, so ``Connection: x-hop`` kept ``X-Hop`` (what one
    connection's peer was told) in the record, and every replay sent it.
    """

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"connection", b"keep-alive, X-Hop"), (b"x-hop", b"this-hop-only"), (b"x-custom", b"kept")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": b"made"})

    with served(app) as client:
        first = post(client)
        replay = post(client)
    assert first.headers["x-hop"] == "this-hop-only"
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == b"made"
    assert replay.headers["x-custom"] == "kept"
    assert "x-hop" not in replay.headers


def test_websocket_and_lifespan_scopes_pass_through() -> None:
    """Non-HTTP scopes reach the app untouched."""
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = IdempotencyMiddleware(app, AsyncMemoryStore())
    anyio.run(middleware, {"type": "lifespan"}, None, None)
    anyio.run(middleware, {"type": "websocket", "path": "/ws", "headers": []}, None, None)
    assert seen == ["lifespan", "websocket"]


def test_store_url_builds_the_store(tmp_path: Any) -> None:
    """A store URL string picks the store: sqlite:/// makes an SQLite file."""
    path = tmp_path / "from-url.db"
    middleware = IdempotencyMiddleware(raw_asgi_app(Orders()), f"sqlite:///{path}")
    assert type(middleware.store).__name__ == "AsyncSQLiteStore"
    assert not path.exists()  # building a store does no I/O: open() (at lifespan start-up) makes the file
    anyio.run(middleware.store.open)  # type: ignore[attr-defined]
    assert path.exists()
    anyio.run(middleware.store.aclose)


def test_routes_must_map_to_policies() -> None:
    """A routes value that is neither a Policy nor None is refused at construction."""
    with pytest.raises(ConfigurationError):
        IdempotencyMiddleware(raw_asgi_app(Orders()), AsyncMemoryStore(), routes={"/x": {"require_key": True}})  # type: ignore[dict-item]


def test_route_patterns_first_match_wins() -> None:
    """policy_for returns the first matching pattern's policy, None for exempt paths, the default otherwise."""
    strict = Policy(require_key=True)
    middleware = IdempotencyMiddleware(
        raw_asgi_app(Orders()), AsyncMemoryStore(), routes={"/payments/*": strict, "/payments*": None}
    )
    assert middleware.policy_for("/payments/1") is strict
    assert middleware.policy_for("/payments") is None
    assert middleware.policy_for("/orders") is middleware.policy


def test_app_waiting_for_the_disconnect_after_a_deferred_answer_is_not_stuck() -> None:
    """With exception verdicts a 500 is settled when the app ends; an app then awaiting the disconnect still ends."""
    calls = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await receive()
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"failed"})
        while (await receive())["type"] != "http.disconnect":  # cleanup after the answer, as long-poll apps do
            pass

    with served(app, policy=Policy(exception_verdicts={RuntimeError: Verdict.HOLD})) as client:
        assert post(client).status_code == 500
        assert post(client).status_code == 500  # released, so executed again: not stuck at 409
    assert calls == 2
