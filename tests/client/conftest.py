"""Fixtures for the client tests: a real uvicorn server behind a real fault proxy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from idempo.faults import FaultPlan, FaultProxy, serve_app

from .payments_app import PaymentsApp, protected


@dataclass
class Server:
    """A running payments server: its handler and its base URL."""

    app: PaymentsApp
    url: str


@pytest.fixture
def server() -> Iterator[Server]:
    """The payments app behind IdempotencyMiddleware, served by uvicorn on a free port."""
    app = PaymentsApp()
    with serve_app(protected(app)) as url:
        try:
            yield Server(app, url)
        finally:
            app.gate.set()  # a handler still held must end before the server can stop


@pytest.fixture
def make_proxy(server: Server) -> Iterator[Callable[[FaultPlan], FaultProxy]]:
    """Start a FaultProxy in front of the server with the given plan."""
    proxies: list[FaultProxy] = []

    def make(plan: FaultPlan) -> FaultProxy:
        proxy = FaultProxy(server.url, plan).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Async client tests run on asyncio and on trio."""
    return str(request.param)


class Delays(list[float]):
    """An injected sleep: records each delay the transport asked for, and returns at once."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)

    async def asleep(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def delays() -> Delays:
    """The delays the transport asked for (no real waiting)."""
    return Delays()
