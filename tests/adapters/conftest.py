"""Fixtures for the HTTP behaviour suite: a framework's contract app behind idempo, under a real server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from idempo import AsyncStore, Policy
from idempo.asgi import IdempotencyMiddleware
from idempo.stores import AsyncMemoryStore
from tests.support.clock import FakeClock
from tests.support.orders import ASGI_FRAMEWORKS, Orders
from tests.support.servers import running_asgi

K1 = "8e03978e-40d5-43e8-bc93-6894a57f9324"
K2 = "clkyoesmbgybucifusbbtdsbohtyuuwz"
B = b'{"sku":"A","qty":1}'
B_PRIME = b'{"sku":"A","qty":2}'
JSON = {"content-type": "application/json"}


@dataclass
class Served:
    """One app under test: its base URL, a client, its side effects, its store and clock."""

    url: str
    client: httpx.Client
    orders: Orders
    store: AsyncStore
    clock: FakeClock

    def post(
        self,
        key: str | None = K1,
        body: bytes = B,
        headers: dict[str, str] | None = None,
        path: str = "/orders",
        method: str = "POST",
        **kwargs: Any,
    ) -> httpx.Response:
        """Send the contract's request (JSON body B with key K1 unless told otherwise)."""
        all_headers = {**JSON, **(headers or {})}
        if key is not None:
            all_headers["Idempotency-Key"] = key
        return self.client.request(method, path, content=body, headers=all_headers, **kwargs)


ServeFactory = Callable[..., Served]


@pytest.fixture(params=sorted(ASGI_FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> str:
    """The framework the contract app is written in."""
    return str(request.param)


@pytest.fixture
def serve(framework: str) -> Iterator[ServeFactory]:
    """Factory: serve(policy=..., store=..., **middleware options) -> Served, stopped after the test."""
    with ExitStack() as stack:

        def factory(
            *,
            policy: Policy | None = None,
            store: AsyncStore | None = None,
            clock: FakeClock | None = None,
            orders: Orders | None = None,
            **options: Any,
        ) -> Served:
            clock = clock or FakeClock()
            store = store if store is not None else AsyncMemoryStore(clock=clock)
            orders = orders or Orders()
            app = IdempotencyMiddleware(ASGI_FRAMEWORKS[framework](orders), store, policy=policy, **options)
            url = stack.enter_context(running_asgi(app))
            # A fresh connection per request: a server that closes after an
            # uncaught error must not reset the next test request.
            limits = httpx.Limits(max_keepalive_connections=0)
            client = stack.enter_context(httpx.Client(base_url=url, timeout=10, limits=limits))
            return Served(url, client, orders, store, clock)

        yield factory
