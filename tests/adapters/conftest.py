"""Fixtures for the HTTP behaviour suite: a framework's contract app behind idempo, under a real server.

The suite runs on every framework of ``tests.support.frameworks.FRAMEWORKS``
(Starlette, FastAPI and Litestar under uvicorn; Flask and Django under
waitress). ASGI frameworks get an ``AsyncStore``, WSGI frameworks a blocking
``Store``: tests make stores with ``serve.memory_store`` / ``serve.sqlite_store``
and read records with ``Served.record``, which work for both.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from idempo import Policy, Record, make_record_key
from idempo.secrets import async_store_secret, store_secret
from tests.support.clock import FakeClock
from tests.support.frameworks import FRAMEWORKS, Framework, ServerPool
from tests.support.orders import Orders

K1 = "8e03978e-40d5-43e8-bc93-6894a57f9324"
K2 = "clkyoesmbgybucifusbbtdsbohtyuuwz"
B = b'{"sku":"A","qty":1}'
B_PRIME = b'{"sku":"A","qty":2}'
JSON = {"content-type": "application/json"}
#: The principal of an anonymous test client (idempo's default: the client address).
LOCAL = "addr:127.0.0.1"


@dataclass
class Served:
    """One app under test: its base URL, a client, its side effects, its store and clock."""

    url: str
    client: httpx.Client
    orders: Orders
    store: Any
    clock: FakeClock
    framework: Framework

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

    def record(
        self, key: str = K1, principal: str = LOCAL, method: str = "POST", path: str = "/orders"
    ) -> Record | None:
        """The record the store holds for a key in a scope, read through the store (sync or async)."""
        record_key = make_record_key(principal, method, path, key, secret=self.secret())
        if inspect.iscoroutinefunction(self.store.get):
            result: Record | None = anyio.run(self.store.get, record_key)
            return result
        sync_result: Record | None = self.store.get(record_key)
        return sync_result

    def secret(self) -> bytes:
        """The secret the store keeps (the apps under test configure none), as the middleware reads it."""
        if inspect.iscoroutinefunction(self.store.get):
            secret: bytes = anyio.run(async_store_secret, self.store)
            return secret
        return store_secret(self.store)


class ServeFactory:
    """``serve(policy=..., store=..., **middleware options) -> Served``; apps stop serving after the test."""

    def __init__(self, framework: Framework, pool: ServerPool, stack: ExitStack) -> None:
        self.framework = framework
        self._pool = pool
        self._stack = stack

    def memory_store(self, clock: FakeClock) -> Any:
        """A memory store of the kind this framework's middleware takes."""
        return self.framework.memory_store(clock)

    def sqlite_store(self, path: Path, clock: FakeClock, **options: Any) -> Any:
        """An SQLite store of the kind this framework's middleware takes."""
        return self.framework.sqlite_store(path, clock, **options)

    def __call__(
        self,
        *,
        policy: Policy | None = None,
        store: Any = None,
        clock: FakeClock | None = None,
        orders: Orders | None = None,
        **options: Any,
    ) -> Served:
        clock = clock or FakeClock()
        store = store if store is not None else self.memory_store(clock)
        orders = orders or Orders()
        app = self.framework.build(orders, store, policy, options)
        server = self._pool.acquire(self.framework.interface, app)
        self._stack.callback(self._pool.release, server)
        # A fresh connection per request: a server that closes after an
        # uncaught error must not reset the next test request.
        limits = httpx.Limits(max_keepalive_connections=0)
        client = self._stack.enter_context(httpx.Client(base_url=server.url, timeout=10, limits=limits))
        return Served(server.url, client, orders, store, clock, self.framework)


@pytest.fixture(scope="session")
def server_pool() -> Iterator[ServerPool]:
    """Servers shared by the whole session; each test plugs its own app in."""
    pool = ServerPool()
    yield pool
    pool.close()


@pytest.fixture(params=list(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> Framework:
    """The framework the contract app is written in."""
    return FRAMEWORKS[str(request.param)]


@pytest.fixture
def serve(framework: Framework, server_pool: ServerPool) -> Iterator[ServeFactory]:
    """Factory: serve(policy=..., store=..., **middleware options) -> Served, unplugged after the test."""
    with ExitStack() as stack:
        yield ServeFactory(framework, server_pool, stack)


def header_of(request: Any, name: str) -> str | None:
    """A request header as a principal resolver sees it: ASGI scope, WSGI environ or Django HttpRequest."""
    if isinstance(request, dict) and "headers" in request:
        raw = name.lower().encode("latin-1")
        for header, value in request["headers"]:
            if header == raw:
                return str(value.decode("latin-1"))
        return None
    if isinstance(request, dict):
        value = request.get("HTTP_" + name.upper().replace("-", "_"))
        return None if value is None else str(value)
    value = request.headers.get(name)
    return None if value is None else str(value)
