"""Litestar specifics (idempo.litestar): options per route handler (opt), the plugin and the bare middleware."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from litestar import Controller, Litestar, post
from litestar.params import FromPath

from idempo import Policy, Verdict
from idempo.litestar import IdempotencyMiddleware, IdempotencyPlugin, idempotency, idempotency_exempt
from idempo.stores import AsyncMemoryStore
from tests.adapters.conftest import JSON, B
from tests.support.clock import FakeClock
from tests.support.servers import running_asgi

CALLS: dict[str, int] = {}


def counted(name: str) -> dict[str, int]:
    CALLS[name] = CALLS.get(name, 0) + 1
    return {"n": CALLS[name]}


@post("/payments/{number:int}", idempotency=idempotency(require_key=True, record_ttl=60))
async def pay(number: FromPath[int]) -> dict[str, int]:
    return counted("pay")


@post("/webhooks", idempotency=idempotency_exempt)
async def webhook() -> dict[str, int]:
    return counted("webhook")


@post("/orders")
async def order() -> dict[str, int]:
    return counted("order")


@post("/failing")
async def failing() -> dict[str, int]:
    counted("failing")
    raise RuntimeError("unknown outcome")


class Internal(Controller):
    path = "/internal"
    opt = {"idempotency": idempotency_exempt}  # noqa: RUF012 - Litestar's own class attribute

    @post("/jobs")
    async def job(self) -> dict[str, int]:
        return counted("job")

    @post("/charges", idempotency=idempotency(require_key=True))
    async def charge(self) -> dict[str, int]:
        return counted("charge")


HANDLERS = [pay, webhook, order, failing, Internal]


class Client:
    def __init__(self, http: httpx.Client, clock: FakeClock) -> None:
        self.http, self.clock = http, clock

    def post(self, where: str, key: str | None) -> httpx.Response:
        headers = dict(JSON)
        if key is not None:
            headers["Idempotency-Key"] = key
        return self.http.post(where, content=B, headers=headers)


def serve_app(app: Any, clock: FakeClock) -> Iterator[Client]:
    with running_asgi(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        yield Client(http, clock)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """The handlers behind IdempotencyPlugin under uvicorn; a HOLD verdict for RuntimeError."""
    clock = FakeClock()
    policy = Policy(exception_verdicts={RuntimeError: Verdict.HOLD})
    plugin = IdempotencyPlugin(
        AsyncMemoryStore(clock=clock), policy=policy, routes={"/webhooks": Policy(require_key=True)}
    )
    yield from serve_app(Litestar(HANDLERS, plugins=[plugin], logging_config=None), clock)


def fresh() -> str:
    return str(uuid.uuid4())


def test_handler_option_requires_a_key(client: Client) -> None:
    """idempotency=idempotency(require_key=True) on the handler: 400 without a key, even with a path parameter."""
    missing = client.post("/payments/1", None)
    assert missing.status_code == 400
    assert missing.headers["content-type"] == "application/problem+json"
    assert client.post("/orders", None).status_code == 201


def test_exempt_handler_wins_over_routes(client: Client) -> None:
    """idempotency=idempotency_exempt beats a routes pattern requiring a key: the same key runs twice."""
    key = fresh()
    before = CALLS.get("webhook", 0)
    client.post("/webhooks", key)
    assert "idempotent-replayed" not in client.post("/webhooks", key).headers
    assert CALLS["webhook"] == before + 2


def test_handler_ttl_overrides_the_default(client: Client) -> None:
    """record_ttl=60 on the handler: new after 61 s, while the default handler still replays."""
    pay_key, order_key = fresh(), fresh()
    client.post("/payments/2", pay_key)
    client.post("/orders", order_key)
    client.clock.advance(61)
    assert "idempotent-replayed" not in client.post("/payments/2", pay_key).headers
    assert client.post("/orders", order_key).headers["idempotent-replayed"] == "true"


def test_controller_option_and_handler_override(client: Client) -> None:
    """A controller's opt exempts its handlers; a handler's own option wins over it (Litestar merges opt)."""
    key = fresh()
    client.post("/internal/jobs", key)
    assert "idempotent-replayed" not in client.post("/internal/jobs", key).headers
    assert client.post("/internal/charges", None).status_code == 400


def test_plugin_reports_handler_exceptions(client: Client) -> None:
    """Litestar answers the exception with 500 inside the stack; the plugin's hook lets its HOLD verdict apply."""
    key = fresh()
    assert client.post("/failing", key).status_code == 500
    assert client.post("/failing", key).status_code == 409


def test_bare_middleware_works_without_the_plugin() -> None:
    """Litestar(middleware=[IdempotencyMiddleware(...)]): replays work; an exception releases the key (500)."""
    clock = FakeClock()
    middleware = IdempotencyMiddleware(AsyncMemoryStore(clock=clock), policy=Policy())
    for client in serve_app(Litestar(HANDLERS, middleware=[middleware], logging_config=None), clock):
        key = fresh()
        first = client.post("/orders", key)
        replay = client.post("/orders", key)
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == first.content
        assert client.post("/failing", key + "f").status_code == 500
        assert client.post("/failing", key + "f").status_code == 500


def test_option_must_come_from_idempotency() -> None:
    """A handler option that is not from idempotency() (or a Policy) raises ConfigurationError: a 500, nothing runs."""

    @post("/bad", idempotency={"require_key": True})
    async def bad() -> None:
        return None

    app = Litestar([bad], plugins=[IdempotencyPlugin(AsyncMemoryStore())], logging_config=None)
    for client in serve_app(app, FakeClock()):
        assert client.post("/bad", fresh()).status_code == 500
