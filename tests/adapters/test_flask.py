"""Flask specifics (idempo.flask): the extension, per-view decorators resolved with Flask's URL map."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from flask import Flask

from idempo import ConfigurationError, Policy
from idempo.flask import Idempotency, idempotency, idempotency_exempt
from idempo.stores import MemoryStore
from idempo.wsgi import IdempotencyMiddleware
from tests.adapters.conftest import JSON, B
from tests.support.clock import FakeClock
from tests.support.servers import running_wsgi


def build(calls: dict[str, int]) -> Flask:
    app = Flask("views")

    def counted(name: str) -> tuple[bytes, int]:
        calls[name] = calls.get(name, 0) + 1
        return b'{"n":%d}' % calls[name], 201

    @app.post("/payments/<int:number>")
    @idempotency(require_key=True, record_ttl=60)
    def pay(number: int) -> Any:
        return counted("pay")

    @app.post("/webhooks")
    @idempotency_exempt
    def webhook() -> Any:
        return counted("webhook")

    @app.post("/orders")
    def order() -> Any:
        return counted("order")

    return app


class Client:
    def __init__(self, http: httpx.Client, calls: dict[str, int], clock: FakeClock) -> None:
        self.http, self.calls, self.clock = http, calls, clock

    def post(self, where: str, key: str | None) -> httpx.Response:
        headers = dict(JSON)
        if key is not None:
            headers["Idempotency-Key"] = key
        return self.http.post(where, content=B, headers=headers)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """The decorated views behind the Idempotency extension, under waitress."""
    calls: dict[str, int] = {}
    clock = FakeClock()
    app = build(calls)
    app.config["IDEMPO_STORE"] = MemoryStore(clock=clock)
    Idempotency(app, routes={"/webhooks": Policy(require_key=True)})
    with running_wsgi(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        yield Client(http, calls, clock)


def fresh() -> str:
    return str(uuid.uuid4())


def test_view_can_require_a_key(client: Client) -> None:
    """@idempotency(require_key=True) under @app.post: found through Flask's URL map, even with a converter."""
    assert client.post("/payments/1", None).status_code == 400
    assert client.post("/orders", None).status_code == 201


def test_exempt_view_wins_over_routes(client: Client) -> None:
    """@idempotency_exempt beats a routes pattern requiring a key: the same key executes twice."""
    key = fresh()
    before = client.calls.get("webhook", 0)
    client.post("/webhooks", key)
    assert "idempotent-replayed" not in client.post("/webhooks", key).headers
    assert client.calls["webhook"] == before + 2


def test_view_ttl_overrides_the_default(client: Client) -> None:
    """record_ttl=60 on the view: new after 61 s, while the default view still replays."""
    pay_key, order_key = fresh(), fresh()
    client.post("/payments/2", pay_key)
    client.post("/orders", order_key)
    assert client.post("/payments/2", pay_key).headers["idempotent-replayed"] == "true"
    client.clock.advance(61)
    assert "idempotent-replayed" not in client.post("/payments/2", pay_key).headers
    assert client.post("/orders", order_key).headers["idempotent-replayed"] == "true"


def test_plain_wsgi_middleware_works_on_flask() -> None:
    """app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, ...): the behaviour, without per-view options."""
    calls: dict[str, int] = {}
    app = build(calls)
    app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, MemoryStore())  # type: ignore[method-assign]
    with running_wsgi(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        headers = {**JSON, "Idempotency-Key": fresh()}
        first = http.post("/orders", content=B, headers=headers)
        replay = http.post("/orders", content=B, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert calls["order"] == 1


def test_extension_needs_a_store() -> None:
    """Without store= or IDEMPO_STORE the extension refuses to start."""
    with pytest.raises(ConfigurationError):
        Idempotency(Flask("no-store"))
