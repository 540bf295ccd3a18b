"""The frameworks the HTTP behaviour suite runs on, each with idempo added the way its users add it.

========== ========= =====================================================================
framework  server    idempo
========== ========= =====================================================================
starlette  uvicorn   ``idempo.asgi.IdempotencyMiddleware`` wrapped around the app
fastapi    uvicorn   ``idempo.fastapi.install(app, ...)`` (``app.add_middleware``)
litestar   uvicorn   ``idempo.litestar.IdempotencyPlugin`` in ``Litestar(plugins=...)``
flask      waitress  ``idempo.flask.Idempotency(app, ...)`` (wraps ``app.wsgi_app``)
django     waitress  ``"idempo.django.IdempotencyMiddleware"`` configured by ``settings.IDEMPO``
========== ========= =====================================================================

Servers are pooled: a server runs a :class:`Switch`, whose app each test sets
and clears, so a test does not pay for starting and stopping a server.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idempo import Policy
from idempo.stores import AsyncMemoryStore, MemoryStore
from idempo.stores.sqlite import AsyncSQLiteStore, SQLiteStore
from tests.support.clock import FakeClock
from tests.support.orders import Orders, django_app, fastapi_app, flask_app, litestar_app, starlette_app
from tests.support.servers import running_asgi, running_wsgi


def _starlette(orders: Orders, store: Any, policy: Policy | None, options: dict[str, Any]) -> Any:
    from idempo.asgi import IdempotencyMiddleware

    return IdempotencyMiddleware(starlette_app(orders), store, policy=policy, **options)


def _fastapi(orders: Orders, store: Any, policy: Policy | None, options: dict[str, Any]) -> Any:
    from idempo.fastapi import install

    app = fastapi_app(orders)
    install(app, store, policy=policy, **options)
    return app


def _litestar(orders: Orders, store: Any, policy: Policy | None, options: dict[str, Any]) -> Any:
    from idempo.litestar import IdempotencyPlugin

    return litestar_app(orders, plugins=[IdempotencyPlugin(store, policy=policy, **options)])


def _flask(orders: Orders, store: Any, policy: Policy | None, options: dict[str, Any]) -> Any:
    from idempo.flask import Idempotency

    app = flask_app(orders)
    Idempotency(app, store, policy=policy, **options)
    return app


_DJANGO_SETTINGS = {"routes": "ROUTES", "principal": "PRINCIPAL", "key_header": "KEY_HEADER"}


def _django(orders: Orders, store: Any, policy: Policy | None, options: dict[str, Any]) -> Any:
    idempo: dict[str, Any] = {"STORE": store, "POLICY": policy}
    idempo.update({_DJANGO_SETTINGS[name]: value for name, value in options.items()})
    return django_app(orders, idempo)


@dataclass(frozen=True)
class Framework:
    """One framework of the suite: how to build the contract app behind idempo, and its interface."""

    name: str
    interface: str  # "asgi" or "wsgi"
    build: Callable[[Orders, Any, Policy | None, dict[str, Any]], Any]

    @property
    def is_async(self) -> bool:
        """True when idempo runs on an AsyncStore here (ASGI), False for a blocking Store (WSGI)."""
        return self.interface == "asgi"

    def memory_store(self, clock: FakeClock) -> Any:
        """A fresh memory store of this interface's kind, on ``clock``."""
        return AsyncMemoryStore(clock=clock) if self.is_async else MemoryStore(clock=clock)

    def sqlite_store(self, path: Path, clock: FakeClock | None, **options: Any) -> Any:
        """An SQLite store of this interface's kind on the file ``path`` (the real clock when ``clock`` is None)."""
        cls = AsyncSQLiteStore if self.is_async else SQLiteStore
        if clock is not None:
            options["clock"] = clock
        return cls(path, **options)


FRAMEWORKS = {
    f.name: f
    for f in [
        Framework("starlette", "asgi", _starlette),
        Framework("fastapi", "asgi", _fastapi),
        Framework("litestar", "asgi", _litestar),
        Framework("flask", "wsgi", _flask),
        Framework("django", "wsgi", _django),
    ]
}


class AsgiSwitch:
    """An ASGI app that forwards to whichever app a test set (503 when none)."""

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = self.app
        if app is None:
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"no app"})
            return
        await app(scope, receive, send)


class WsgiSwitch:
    """A WSGI app that forwards to whichever app a test set (503 when none)."""

    def __init__(self) -> None:
        self.app: Any = None

    def __call__(self, environ: Any, start_response: Any) -> Any:
        app = self.app
        if app is None:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"no app"]
        return app(environ, start_response)


@dataclass
class PooledServer:
    """A running server and the switch it serves."""

    interface: str
    url: str
    switch: AsgiSwitch | WsgiSwitch


class ServerPool:
    """Servers kept running across tests (one pool per test session)."""

    def __init__(self) -> None:
        self._idle: dict[str, list[PooledServer]] = {"asgi": [], "wsgi": []}
        self._stack = ExitStack()

    def acquire(self, interface: str, app: Any) -> PooledServer:
        """A server now serving ``app``: an idle one, or a new one."""
        idle = self._idle[interface]
        if idle:
            server = idle.pop()
        else:
            switch: AsgiSwitch | WsgiSwitch = AsgiSwitch() if interface == "asgi" else WsgiSwitch()
            runner = running_asgi if interface == "asgi" else running_wsgi
            server = PooledServer(interface, self._stack.enter_context(runner(switch)), switch)
        server.switch.app = app
        return server

    def release(self, server: PooledServer) -> None:
        """Stop serving the test's app; keep the server for the next test."""
        server.switch.app = None
        self._idle[server.interface].append(server)

    def close(self) -> None:
        """Stop every server."""
        self._stack.close()
