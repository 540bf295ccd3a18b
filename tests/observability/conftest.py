"""Fixtures for the observability tests: a small Starlette app behind idempo, under a real uvicorn server.

Every test starts with metrics and tracing off and ends with them off again
(``uninstrument``), so tests never share a registry or a tracer provider.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import httpx
import pytest
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from idempo import AsyncStore, Policy, Verdict, make_record_key
from idempo.asgi import IdempotencyMiddleware
from idempo.observability import uninstrument
from idempo.stores import AsyncMemoryStore
from tests.support.clock import FakeClock
from tests.support.servers import running_asgi

KEY = "8e03978e-40d5-43e8-bc93-6894a57f9324"
BODY = b'{"sku":"A","qty":1}'
PRINCIPAL = "addr:127.0.0.1"  # the default principal of a loopback client without credentials
#: The server secret of the app under test (every digest it stores or logs is keyed with it).
SECRET = "observability tests secret"
#: ``routes`` of the app under test: each pattern becomes the ``route`` label of its requests.
ROUTES: dict[str, Policy | None] = {
    "/orders/*": Policy(),
    "/held": Policy(status_verdicts={504: Verdict.HOLD}, hold_ttl=60),
}


class Handlers:
    """The app's handlers and what they record: executions, the span current in a handler, a gate."""

    def __init__(self) -> None:
        self.executions: Counter[str] = Counter()
        self.span_ids: list[int] = []
        self.gate = threading.Event()  # /slow waits for it
        self.entered = threading.Event()  # set when /slow is running

    def app(self) -> Starlette:
        """The Starlette app (without idempo)."""

        async def orders(request: Request) -> Response:
            await request.body()
            self.executions["orders"] += 1
            self.span_ids.append(trace.get_current_span().get_span_context().span_id)
            return JSONResponse({"order": self.executions["orders"]}, status_code=201)

        async def slow(request: Request) -> Response:
            self.executions["slow"] += 1
            self.entered.set()
            await anyio.to_thread.run_sync(self.gate.wait, 30)
            return JSONResponse({"slow": True}, status_code=201)

        async def failing(request: Request) -> Response:
            self.executions["failing"] += 1
            return JSONResponse({"error": "upstream"}, status_code=500)

        async def held(request: Request) -> Response:
            self.executions["held"] += 1
            return JSONResponse({"error": "provider timeout"}, status_code=504)

        async def boom(request: Request) -> Response:
            self.executions["boom"] += 1
            raise RuntimeError("boom")

        return Starlette(
            routes=[
                Route("/orders/{order_id}", orders, methods=["POST"]),
                Route("/slow", slow, methods=["POST"]),
                Route("/failing", failing, methods=["POST"]),
                Route("/held", held, methods=["POST"]),
                Route("/boom", boom, methods=["POST"]),
            ]
        )


@dataclass
class Site:
    """The served app: its URL, a client, its handlers, store and clock."""

    url: str
    client: httpx.Client
    handlers: Handlers
    store: AsyncStore
    clock: FakeClock
    extra: dict[str, Any] = field(default_factory=dict)

    def post(self, path: str = "/orders/1", key: str | None = KEY, body: bytes = BODY, **kwargs: Any) -> httpx.Response:
        """POST a JSON body with an Idempotency-Key (unless key is None)."""
        headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
        if key is not None:
            headers["Idempotency-Key"] = key
        return self.client.post(path, content=body, headers=headers, **kwargs)


def record_key(path: str = "/orders/1", key: str = KEY) -> str:
    """The record key the middleware uses for a loopback client's POST."""
    return make_record_key(PRINCIPAL, "POST", path, key, secret=SECRET)


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns a truthy value; the request's record is emitted after its last byte."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def _no_instrumentation() -> Iterator[None]:
    uninstrument()
    yield
    uninstrument()


@pytest.fixture
def serve() -> Iterator[Callable[..., Site]]:
    """Factory: serve(store=..., policy=..., mount=callable(app)) -> Site; stopped after the test."""
    with ExitStack() as stack:

        def factory(
            *,
            store: AsyncStore | None = None,
            policy: Policy | None = None,
            mount: Callable[[Starlette], None] | None = None,
        ) -> Site:
            clock = FakeClock()
            store = store if store is not None else AsyncMemoryStore(clock=clock)
            handlers = Handlers()
            app = handlers.app()
            if mount is not None:
                mount(app)
            stack.callback(handlers.gate.set)  # never leave a handler waiting
            wrapped = IdempotencyMiddleware(app, store, policy=policy, routes=ROUTES, secret=SECRET)
            url = stack.enter_context(running_asgi(wrapped))
            client = stack.enter_context(httpx.Client(base_url=url, timeout=30, trust_env=False))
            return Site(url, client, handlers, store, clock)

        yield factory
