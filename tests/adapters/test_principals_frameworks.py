"""The user each framework authenticated is the default principal; a unix-socket server still tells users apart.

Issue 11, items 1 and 2: Starlette's and FastAPI's ``AuthenticationMiddleware``
(``scope["user"]``), Litestar's authentication middleware, Flask-Login and
uvicorn on a unix socket (``client`` is None), each under a real server. A
user who retries with a refreshed token or from another session is one
principal; two users are two. (Django's ``request.user``: test_django.py.)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import uvicorn
from litestar import Litestar
from litestar import Request as LitestarRequest
from litestar import post as litestar_post
from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from idempo import Acquired, StoredResponse
from idempo._core.digests import legacy_record_key
from idempo._core.fingerprint import legacy_fingerprint
from idempo.asgi import IdempotencyMiddleware
from idempo.secrets import open_legacy_window
from idempo.stores import AsyncMemoryStore, MemoryStore
from idempo.stores.sqlite import SQLiteStore
from tests.adapters.conftest import JSON, K1, B
from tests.support.servers import running_asgi, running_wsgi

KEYED = {**JSON, "Idempotency-Key": K1}


class Counter:
    """Executions of the handler, numbered."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def enter(self) -> int:
        with self._lock:
            self.calls += 1
            return self.calls


class TokenBackend(AuthenticationBackend):
    """``Authorization: Bearer <user>-<version>``: the user, whatever version of the token (a refresh)."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        authorization = conn.headers.get("authorization")
        if authorization is None:
            return None
        token = authorization.split(" ", 1)[1]
        return AuthCredentials(["authenticated"]), SimpleUser(token.split("-")[0])


def orders_route(counter: Counter) -> Route:
    async def orders(request: Request) -> Response:
        await request.body()
        return JSONResponse({"order_id": counter.enter()}, status_code=201)

    return Route("/orders", orders, methods=["POST"])


def post(url: str, token: str) -> httpx.Response:
    return httpx.post(url + "/orders", content=B, headers={**KEYED, "authorization": f"Bearer {token}"}, timeout=10)


def assert_refresh_replays_and_users_are_apart(url: str, counter: Counter) -> None:
    """alice-v1 runs; alice-v2 (a refreshed token) replays; bob-v1 runs: one execution per user."""
    first = post(url, "alice-v1")
    assert first.status_code == 201
    refreshed = post(url, "alice-v2")
    assert refreshed.headers["idempotent-replayed"] == "true"
    assert refreshed.content == first.content
    bob = post(url, "bob-v1")
    assert bob.json() == {"order_id": 2}
    assert "idempotent-replayed" not in bob.headers
    assert counter.calls == 2


def test_starlette_authentication_middleware_user_is_the_principal() -> None:
    """Starlette: AuthenticationMiddleware listed before idempo sets scope["user"]; a refreshed token replays."""
    counter = Counter()
    app = Starlette(
        routes=[orders_route(counter)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=TokenBackend()),
            Middleware(IdempotencyMiddleware, store=AsyncMemoryStore()),
        ],
    )
    with running_asgi(app) as url:
        assert_refresh_replays_and_users_are_apart(url, counter)


def test_fastapi_authentication_middleware_added_after_install_is_seen() -> None:
    """FastAPI: install() then add_middleware(AuthenticationMiddleware): authentication runs first."""
    from fastapi import FastAPI

    from idempo.fastapi import install

    counter = Counter()
    app = FastAPI()

    @app.post("/orders", status_code=201)
    async def create(request: Request) -> dict[str, int]:
        return {"order_id": counter.enter()}

    install(app, AsyncMemoryStore())
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    with running_asgi(app) as url:
        assert_refresh_replays_and_users_are_apart(url, counter)


def test_litestar_authenticated_user_is_the_principal() -> None:
    """Litestar: the user its authentication middleware put in the scope is the principal."""
    from idempo.litestar import IdempotencyPlugin

    @dataclass
    class User:
        id: str

    class Auth(AbstractAuthenticationMiddleware):
        async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
            token = connection.headers["authorization"].split(" ", 1)[1]
            return AuthenticationResult(user=User(token.split("-")[0]), auth=token)

    counter = Counter()

    @litestar_post("/orders", status_code=201)
    async def create(request: LitestarRequest[Any, Any, Any]) -> dict[str, int]:
        await request.body()
        return {"order_id": counter.enter()}

    app = Litestar([create], middleware=[DefineMiddleware(Auth)], plugins=[IdempotencyPlugin(AsyncMemoryStore())])
    with running_asgi(app) as url:
        assert_refresh_replays_and_users_are_apart(url, counter)


def test_flask_login_user_is_the_principal_across_sessions() -> None:
    """Flask-Login: Alice logged in on two devices (two session cookies) is one principal; Bob is another."""
    flask_login = pytest.importorskip("flask_login")
    from flask import Flask, session

    from idempo.flask import Idempotency

    app = Flask("flask-login-test")
    app.secret_key = "flask login test secret"
    manager = flask_login.LoginManager(app)

    class User(flask_login.UserMixin):  # type: ignore[misc]
        def __init__(self, user_id: str) -> None:
            self.id = user_id

    manager.user_loader(User)
    counter = Counter()

    @app.post("/login/<name>/<device>")
    def login(name: str, device: str) -> str:
        flask_login.login_user(User(name))
        session["device"] = device  # each device's session cookie is its own
        return "ok"

    @app.post("/orders")
    def orders() -> tuple[dict[str, int], int]:
        return {"order_id": counter.enter()}, 201

    Idempotency(app, MemoryStore())
    with running_wsgi(app) as url:
        devices = [httpx.Client(base_url=url, timeout=10) for _ in range(3)]
        try:
            phone, laptop, bobs = devices
            for client, name, device in [(phone, "alice", "phone"), (laptop, "alice", "laptop"), (bobs, "bob", "pc")]:
                assert client.post(f"/login/{name}/{device}").status_code == 200
            assert phone.cookies["session"] != laptop.cookies["session"]
            first = phone.post("/orders", content=B, headers=KEYED)
            assert first.json() == {"order_id": 1}
            other_device = laptop.post("/orders", content=B, headers=KEYED)
            assert other_device.headers["idempotent-replayed"] == "true"
            bob = bobs.post("/orders", content=B, headers=KEYED)
            assert bob.json() == {"order_id": 2}
            # A request without a login is scoped by its credentials (none here: the address).
            anonymous = httpx.post(url + "/orders", content=B, headers=KEYED, timeout=10)
            assert anonymous.json() == {"order_id": 3}
            assert counter.calls == 3
        finally:
            for client in devices:
                client.close()


@contextmanager
def running_on_unix_socket(app: Any, path: Path) -> Iterator[httpx.Client]:
    """Serve an ASGI app with uvicorn on a unix socket (the scope's ``client`` is None); yield a client for it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.005)
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://idempo", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_unix_socket_clients_with_different_session_cookies_both_execute(tmp_path: Path) -> None:
    """uvicorn on a unix socket reports no client address: session cookies still tell two users apart."""
    counter = Counter()
    clients: list[Any] = []

    async def orders(request: Request) -> Response:
        await request.body()
        clients.append(request.scope.get("client"))
        return JSONResponse({"order_id": counter.enter()}, status_code=201)

    app = IdempotencyMiddleware(Starlette(routes=[Route("/orders", orders, methods=["POST"])]), AsyncMemoryStore())
    with running_on_unix_socket(app, tmp_path / "app.sock") as client:
        alice = client.post("/orders", content=B, headers={**KEYED, "cookie": "session=alice"})
        bob = client.post("/orders", content=B, headers={**KEYED, "cookie": "session=bob"})
        alice_again = client.post("/orders", content=B, headers={**KEYED, "cookie": "session=alice"})
    assert clients[0] is None
    assert alice.json() == {"order_id": 1}
    assert bob.json() == {"order_id": 2}
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert counter.calls == 2


class NamedUser(BaseUser):
    """A user class that keeps its id under a name idempo does not read, and shows a name two users share."""

    def __init__(self, user_id: int, name: str) -> None:
        self.user_id, self.name = user_id, name

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.name


class SessionBackend(AuthenticationBackend):
    """``sessionid`` cookie -> a NamedUser; both users are called "Alex Smith"."""

    USERS: ClassVar[dict[str, NamedUser]] = {"tok-1": NamedUser(1, "Alex Smith"), "tok-2": NamedUser(2, "Alex Smith")}

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        user = self.USERS.get(conn.cookies.get("sessionid", ""))
        return (AuthCredentials(["authenticated"]), user) if user else None


def test_two_users_with_one_display_name_are_two_principals() -> None:
    """Review r23: a user without an identifying attribute never wins by its display_name; the session decides."""
    counter = Counter()
    app = Starlette(
        routes=[orders_route(counter)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=SessionBackend()),
            Middleware(IdempotencyMiddleware, store=AsyncMemoryStore()),
        ],
    )
    with running_asgi(app) as url:
        one = httpx.post(url + "/orders", content=B, headers={**KEYED, "cookie": "sessionid=tok-1"}, timeout=10)
        two = httpx.post(url + "/orders", content=B, headers={**KEYED, "cookie": "sessionid=tok-2"}, timeout=10)
    assert one.json() == {"order_id": 1}
    assert two.json() == {"order_id": 2}
    assert "idempotent-replayed" not in two.headers
    assert counter.calls == 2


class KeyBackend(AuthenticationBackend):
    """``X-API-Key`` -> a SimpleUser (Starlette's identity is its username)."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        user = {"key-alice": "alice", "key-bob": "bob"}.get(conn.headers.get("x-api-key", ""))
        return (AuthCredentials(["authenticated"]), SimpleUser(user)) if user else None


def test_legacy_window_never_looks_a_framework_user_up_by_address(tmp_path: Path) -> None:
    """Review r19: the older version scoped Bob (a Starlette user) by address; Alice's old record there stays hers."""
    store = SQLiteStore(tmp_path / "idempo.db")
    try:
        record_key = legacy_record_key("addr:127.0.0.1", "POST", "/orders", K1)
        fingerprint = legacy_fingerprint("POST", "/orders", b"", b"application/json", B, canonical_json=True)
        began = store.begin(record_key, fingerprint, 30_000)
        assert isinstance(began, Acquired)
        alices = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"owner":"alice"}')
        store.complete(record_key, began.token, alices, 86_400_000)
        open_legacy_window(store, 3600)
    finally:
        store.close()
    counter = Counter()
    app = Starlette(
        routes=[orders_route(counter)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=KeyBackend()),
            Middleware(IdempotencyMiddleware, store=f"sqlite:///{tmp_path / 'idempo.db'}"),
        ],
    )
    with running_asgi(app) as url:
        bob = httpx.post(url + "/orders", content=B, headers={**KEYED, "x-api-key": "key-bob"}, timeout=10)
    assert bob.json() == {"order_id": 1}
    assert "idempotent-replayed" not in bob.headers
    assert counter.calls == 1
