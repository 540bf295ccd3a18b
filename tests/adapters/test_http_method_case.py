"""HTTP behaviour: a covered method in other letter case (``post``) neither bypasses nor splits the key rules.

Methods are case-sensitive (RFC 9110 section 9.1), but Flask and Django run
a ``post`` as the POST view, and Starlette, FastAPI and Litestar answer it
405. The suite's own servers never pass one on (waitress and uvicorn's
httptools parser answer 400 themselves), so these tests serve each app with a
server that does: uvicorn's h11 parser, and Werkzeug's development server.
Litestar routes before any middleware runs, so its own 405 answers a ``post``
there before idempo sees it: the handler never runs either.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from werkzeug.serving import make_server

from idempo import Policy
from tests.adapters.conftest import K1, B
from tests.support.clock import FakeClock
from tests.support.frameworks import FRAMEWORKS, Framework
from tests.support.orders import Orders, litestar_app
from tests.support.servers import running_asgi

AMBIGUOUS = "https://idempo.dev/problems/method-ambiguous"


def refused_as(framework: Framework, problem: str) -> tuple[int, bytes]:
    """The answer to a ``post``: idempo's 400 problem, or Litestar's 405 (its router answers before idempo)."""
    if framework.name == "litestar":
        return 405, b"Method Not Allowed"
    return 400, problem.encode()


@contextmanager
def lenient_server(framework: Framework, app: Any) -> Iterator[tuple[str, int]]:
    """Serve ``app`` with a server that passes a lower-case method through as it came."""
    if framework.interface == "asgi":
        with running_asgi(app, http="h11") as url:
            host, port = url.removeprefix("http://").split(":")
            yield host, int(port)
        return
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def send(address: tuple[str, int], method: str, key: str | None = K1, path: str = "/orders") -> tuple[int, bytes]:
    """Send one request with the method exactly as given (HTTP clients upper-case it); status and body."""
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    if key is not None:
        head += f"Idempotency-Key: {key}\r\n"
    head += f"Content-Length: {len(B)}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(head.encode() + B)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("method", ["post", "Post", "pOST"])
def test_a_covered_method_in_other_case_is_a_400_with_a_key(framework: Framework, method: str) -> None:
    """A key with ``post`` is 400 method-ambiguous on every front: the handler never runs without idempo.

    Before, the ASGI and WSGI fronts passed a ``post`` through (Flask then
    ran the POST view unprotected, once per retry), while Django took it as
    POST. Nothing is stored: the corrected ``POST`` with the same key executes.
    """
    orders = Orders()
    app = framework.build(orders, framework.memory_store(FakeClock()), None, {})
    with lenient_server(framework, app) as address:
        expected, says = refused_as(framework, AMBIGUOUS)
        status, body = send(address, method)
        assert status == expected, body
        assert says in body
        assert send(address, method)[0] == expected
        assert orders.calls == 0
        assert send(address, "POST")[0] == 201
        assert send(address, "POST")[0] == 201
        assert orders.calls == 1


def test_a_covered_method_in_other_case_needs_a_key_where_post_does(framework: Framework) -> None:
    """Without a key, ``post`` gets POST's answer: 400 missing-key where the route requires one."""
    orders = Orders()
    app = framework.build(orders, framework.memory_store(FakeClock()), Policy(require_key=True), {})
    with lenient_server(framework, app) as address:
        expected, says = refused_as(framework, "https://idempo.dev/problems/missing-key")
        status, body = send(address, "post", key=None)
        assert status == expected, body
        assert says in body
        assert orders.calls == 0


@pytest.mark.parametrize("key", [K1, None])
def test_litestar_answers_a_lower_case_method_405_without_idempo(key: str | None) -> None:
    """The 405 Litestar answers a ``post`` is Litestar's own: the same app without idempo answers it, with a key
    or without (its router matches the method as sent, before any middleware), while ``POST`` runs the
    handler. So idempo has nothing to answer there, and the handler never runs unprotected."""
    orders = Orders()
    with lenient_server(FRAMEWORKS["litestar"], litestar_app(orders)) as address:
        status, body = send(address, "post", key=key)
        assert (status, b"Method Not Allowed" in body) == (405, True)
        assert orders.calls == 0
        assert send(address, "POST", key=key)[0] == 201
        assert orders.calls == 1
