"""The test app of shared/cases (``POST /orders``), for every framework under test.

Contract (each framework's version must keep it, so one behaviour suite runs
against all of them):

``POST /orders`` (also ``PATCH /orders``) increments ``Orders.calls`` (n) and
answers ``201`` with body ``{"order_id": n}`` (plus ``"owner": X`` when the
request has ``Authorization: Bearer X``), ``Location: /orders/<n>`` and
``Content-Type: application/json``. Request headers steer it; they are not
part of the fingerprint, so a retry may change them:

- ``X-Test-Sleep: <seconds>``: sleep before answering.
- ``X-Test-Status: <code>``: answer with this status instead of 201.
- ``X-Test-Raise: 1``: raise RuntimeError (an uncaught handler error).
- ``X-Test-Raise: exit``: raise SystemExit (a crash: not an ``Exception``).
- ``X-Test-Response: <kind>``: ``json`` (default), ``empty`` (204, no body),
  ``text`` (202 ``queued`` as text/plain), ``stream`` (a streamed body in
  chunks), ``binary`` (every byte value, application/octet-stream),
  ``raw:<json>`` (that JSON literal as the body, e.g. ``raw:[1,2]``),
  ``headers`` (the header set of case B13), ``background`` (a background task
  that increments ``Orders.background``), ``file`` (a file response).

``GET /orders`` and ``PUT``/``DELETE /orders`` also count and answer 200, to
show methods that are idempotent by definition pass through. ``GET /health``
answers 200 without counting.

When ``IDEMPO_TEST_CALLS_FILE`` names a file, each execution also appends a
line to it, so tests can count executions across processes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

#: Every byte value once: a body no text codec survives.
BINARY_BODY = bytes(range(256)) * 4
#: The chunks of the streamed body.
STREAM_CHUNKS = [b'{"part":1}\n', b'{"part":2}\n', b"\x00\xff binary tail\n"]


@dataclass
class Orders:
    """The handler's side effects, as the tests read them."""

    calls: int = 0
    background: int = 0
    calls_file: Path | None = None
    file_path: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self) -> int:
        """Count one handler execution; return its number."""
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.calls_file is not None:
            with self.calls_file.open("a") as f:
                f.write(f"{os.getpid()} {n}\n")
        return n


def owner_of(authorization: str | None) -> str | None:
    """``Bearer X`` -> ``X``."""
    if authorization and authorization.startswith("Bearer "):
        return authorization[len("Bearer ") :]
    return None


def build_response(orders: Orders, n: int, headers: Any) -> Response:
    """The response the contract describes for execution ``n`` (Starlette objects)."""
    status = int(headers.get("x-test-status", "201"))
    kind = headers.get("x-test-response", "json")
    payload: dict[str, Any] = {"order_id": n}
    owner = owner_of(headers.get("authorization"))
    if owner is not None:
        payload["owner"] = owner
    location = {"Location": f"/orders/{n}"}
    if kind == "empty":
        return Response(status_code=204)
    if kind == "text":
        return Response(b"queued", status_code=202, media_type="text/plain")
    if kind == "binary":
        return Response(BINARY_BODY, status_code=status, media_type="application/octet-stream", headers=location)

    if kind == "stream":

        async def chunks() -> Any:
            for chunk in STREAM_CHUNKS:
                await anyio.sleep(0.01)
                yield chunk

        return StreamingResponse(chunks(), status_code=status, media_type="application/x-ndjson", headers=location)
    if kind.startswith("raw:"):
        return Response(kind[4:].encode(), status_code=status, media_type="application/json", headers=location)
    if kind == "headers":
        response = JSONResponse(payload, status_code=status)
        for name, value in [
            ("Location", f"/orders/{n}"),
            ("ETag", '"v1"'),
            ("Set-Cookie", "sid=abc; HttpOnly"),
            ("Set-Cookie", "csrf=xyz"),
            ("X-Request-ID", f"r{n}"),
            ("X-RateLimit-Remaining", "9"),
            ("Link", '<a>; rel="x"'),
            ("Link", '<b>; rel="y"'),
        ]:
            response.raw_headers.append((name.lower().encode(), value.encode()))
        return response
    if kind == "background":

        def bump() -> None:
            with orders.lock:
                orders.background += 1

        return JSONResponse(payload, status_code=status, headers=location, background=BackgroundTask(bump))
    if kind == "file":
        assert orders.file_path is not None
        return FileResponse(orders.file_path, status_code=status, media_type="application/octet-stream")
    return JSONResponse(payload, status_code=status, headers=location)


async def handle_order(orders: Orders, request: Request) -> Response:
    """The ``POST /orders`` handler of the contract."""
    await request.body()
    n = orders.enter()
    headers = request.headers
    sleep = float(headers.get("x-test-sleep", "0"))
    if sleep:
        await anyio.sleep(sleep)
    raise_kind = headers.get("x-test-raise")
    if raise_kind == "exit":
        raise SystemExit("simulated crash")
    if raise_kind:
        raise RuntimeError("simulated handler failure")
    return build_response(orders, n, headers)


def starlette_app(orders: Orders) -> Starlette:
    """The contract app on plain Starlette."""

    async def orders_endpoint(request: Request) -> Response:
        if request.method in ("POST", "PATCH"):
            return await handle_order(orders, request)
        orders.enter()
        return JSONResponse({"method": request.method})

    async def health(request: Request) -> Response:
        return Response("ok")

    return Starlette(
        routes=[
            Route("/orders", orders_endpoint, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
            Route("/health", health),
        ]
    )


def fastapi_app(orders: Orders) -> Any:
    """The contract app on FastAPI."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/orders", status_code=201)
    async def create_order(request: Request) -> Response:
        return await handle_order(orders, request)

    @app.patch("/orders")
    async def patch_order(request: Request) -> Response:
        return await handle_order(orders, request)

    @app.api_route("/orders", methods=["GET", "PUT", "DELETE"])
    async def other(request: Request) -> dict[str, str]:
        orders.enter()
        return {"method": request.method}

    @app.get("/health")
    async def health() -> str:
        return "ok"

    return app


def raw_asgi_app(orders: Orders) -> Any:
    """The contract's ``POST /orders`` written as a bare ASGI callable (case B04c).

    It writes ``http.response.start`` and the body in two raw messages, with
    no framework in between.
    """

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        n = orders.enter()
        body = b'{"order_id":%d}' % n
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-type", b"application/json"), (b"location", b"/orders/%d" % n)],
            }
        )
        await send({"type": "http.response.body", "body": body[:5], "more_body": True})
        await send({"type": "http.response.body", "body": body[5:], "more_body": False})

    return app


#: Framework name -> app factory, for the parametrised behaviour suite.
ASGI_FRAMEWORKS = {"starlette": starlette_app, "fastapi": fastapi_app}
