"""The test app of shared/cases (``POST /orders``), for every framework under test.

Contract (each framework's version must keep it, so one behaviour suite runs
against all of them):

``POST /orders`` (also ``PATCH /orders``, and both on ``/orders/<anything>``) increments ``Orders.calls`` (n) and
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
- ``X-Test-Header: <name>=<value>``: add this header line to the ``json``
  answer, name and value percent-decoded to latin-1 text, so a test can make
  the app reflect CR, LF or NUL into a header (Flask and Django refuse CR and
  LF themselves: their view raises).

``GET /orders`` and ``PUT``/``DELETE /orders`` also count and answer 200, to
show methods that are idempotent by definition pass through. ``GET /health``
answers 200 without counting.

When ``IDEMPO_TEST_CALLS_FILE`` names a file, each execution also appends a
line to it, so tests can count executions across processes.

Every framework renders JSON compactly (``{"order_id":1}``, no trailing
newline) so bodies compare byte for byte across frameworks. On WSGI
frameworks, ``stream`` is a generator the server iterates, ``background`` runs
when the server closes the response (Werkzeug's ``call_on_close``, Django's
``close()``), and ``file`` is Flask's ``send_file`` / Django's ``FileResponse``.
Django's header mapping holds one value per name, so its ``headers`` answer
lists the two ``Link`` lines through ``items()``, which is what Django's WSGI
handler sends.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio
from litestar import Litestar, get, patch, post, route
from litestar import Request as LitestarRequest
from litestar import Response as LitestarResponse
from litestar.background_tasks import BackgroundTask as LitestarBackgroundTask
from litestar.response import File, Stream
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

#: Every byte value once: a body no text codec survives.
BINARY_BODY = bytes(range(256)) * 4
#: The chunks of the streamed body.
STREAM_CHUNKS = [b'{"part":1}\n', b'{"part":2}\n', b"\x00\xff binary tail\n"]


def header_set(n: int) -> list[tuple[str, str]]:
    """The header lines of case B13 (besides Content-Type), for execution ``n``."""
    return [
        ("Location", f"/orders/{n}"),
        ("ETag", '"v1"'),
        ("Set-Cookie", "sid=abc; HttpOnly"),
        ("Set-Cookie", "csrf=xyz"),
        ("X-Request-ID", f"r{n}"),
        ("X-RateLimit-Remaining", "9"),
        ("Link", '<a>; rel="x"'),
        ("Link", '<b>; rel="y"'),
    ]


def extra_header(headers: Any) -> tuple[str, str] | None:
    """The header line ``X-Test-Header: <name>=<value>`` asks for (percent-decoded, latin-1), or None."""
    spec = headers.get("x-test-header")
    if not spec:
        return None
    name, _, value = spec.partition("=")
    return unquote_to_bytes(name).decode("latin-1"), unquote_to_bytes(value).decode("latin-1")


def compact_json(payload: Any) -> bytes:
    """JSON as Starlette renders it: no spaces, no trailing newline."""
    return json.dumps(payload, separators=(",", ":")).encode()


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
    payload = order_payload(n, headers)
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
        for name, value in header_set(n):
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
    response = JSONResponse(payload, status_code=status, headers=location)
    extra = extra_header(headers)
    if extra is not None:
        response.raw_headers.append((extra[0].encode("latin-1"), extra[1].encode("latin-1")))
    return response


async def handle_order(orders: Orders, request: Request) -> Response:
    """The ``POST /orders`` handler of the contract."""
    await request.body()
    n = orders.enter()
    headers = request.headers
    sleep = float(headers.get("x-test-sleep", "0"))
    if sleep:
        await anyio.sleep(sleep)
    raise_for(headers)
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
            Route("/orders/{rest:path}", orders_endpoint, methods=["POST", "PATCH"]),
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

    @app.api_route("/orders/{rest:path}", methods=["POST", "PATCH"], status_code=201)
    async def order_below(request: Request) -> Response:
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


def litestar_app(orders: Orders, plugins: list[Any] | None = None) -> Any:
    """The contract app on Litestar."""

    def respond(n: int, headers: Any) -> Any:
        status = int(headers.get("x-test-status", "201"))
        kind = headers.get("x-test-response", "json")
        payload = order_payload(n, headers)
        location = {"Location": f"/orders/{n}"}
        if kind == "empty":
            return ASGIResponse(status_code=204)
        if kind == "text":
            return LitestarResponse(b"queued", status_code=202, media_type="text/plain")
        if kind == "binary":
            return LitestarResponse(
                BINARY_BODY, status_code=status, media_type="application/octet-stream", headers=location
            )
        if kind == "stream":

            async def chunks() -> Any:
                for chunk in STREAM_CHUNKS:
                    await anyio.sleep(0.01)
                    yield chunk

            return Stream(chunks(), status_code=status, media_type="application/x-ndjson", headers=location)
        if kind.startswith("raw:"):
            return LitestarResponse(
                kind[4:].encode(), status_code=status, media_type="application/json", headers=location
            )
        if kind == "headers":
            # An iterable of pairs keeps repeated lines (Set-Cookie, Link) apart.
            lines = [("content-type", "application/json"), *header_set(n)]
            return ASGIResponse(body=compact_json(payload), status_code=status, headers=lines)
        if kind == "background":

            def bump() -> None:
                with orders.lock:
                    orders.background += 1

            return LitestarResponse(
                compact_json(payload),
                status_code=status,
                media_type="application/json",
                headers=location,
                background=LitestarBackgroundTask(bump),
            )
        if kind == "file":
            assert orders.file_path is not None
            return File(orders.file_path, status_code=status, media_type="application/octet-stream")
        extra = extra_header(headers)
        if extra is not None:
            lines = [("content-type", "application/json"), *location.items(), extra]
            return ASGIResponse(body=compact_json(payload), status_code=status, headers=lines)
        return LitestarResponse(
            compact_json(payload), status_code=status, media_type="application/json", headers=location
        )

    async def handle(request: LitestarRequest[Any, Any, Any]) -> ASGIApp:
        await request.body()
        n = orders.enter()
        headers = request.headers
        sleep = float(headers.get("x-test-sleep", "0"))
        if sleep:
            await anyio.sleep(sleep)
        raise_for(headers)
        return respond(n, headers)

    # Annotated ASGIApp: Litestar sends what the handler returns as it is, be
    # it a Response or a raw ASGIResponse (which keeps repeated header lines).
    @post("/orders", status_code=201)
    async def create_order(request: LitestarRequest[Any, Any, Any]) -> ASGIApp:
        return await handle(request)

    @patch("/orders")
    async def patch_order(request: LitestarRequest[Any, Any, Any]) -> ASGIApp:
        return await handle(request)

    @route("/orders/{rest:path}", http_method=["POST", "PATCH"], status_code=201)
    async def order_below(request: LitestarRequest[Any, Any, Any]) -> ASGIApp:
        return await handle(request)

    @route("/orders", http_method=["GET", "PUT", "DELETE"], status_code=200)
    async def other(request: LitestarRequest[Any, Any, Any]) -> dict[str, str]:
        orders.enter()
        return {"method": request.method}

    @get("/health", media_type="text/plain")
    async def health() -> str:
        return "ok"

    return Litestar([create_order, patch_order, order_below, other, health], plugins=plugins or [], logging_config=None)


def order_payload(n: int, headers: Any) -> dict[str, Any]:
    """The JSON body of execution ``n``: its number, and the owner named by ``Authorization: Bearer X``."""
    payload: dict[str, Any] = {"order_id": n}
    owner = owner_of(headers.get("authorization"))
    if owner is not None:
        payload["owner"] = owner
    return payload


def raise_for(headers: Any) -> None:
    """Raise what ``X-Test-Raise`` asks for: SystemExit for ``exit``, RuntimeError for anything else."""
    raise_kind = headers.get("x-test-raise")
    if raise_kind == "exit":
        raise SystemExit("simulated crash")
    if raise_kind:
        raise RuntimeError("simulated handler failure")


def enter_sync(orders: Orders, headers: Any) -> int:
    """A WSGI handler's start: count the execution, sleep and raise as the headers ask; return its number."""
    n = orders.enter()
    sleep = float(headers.get("x-test-sleep", "0"))
    if sleep:
        time.sleep(sleep)
    raise_for(headers)
    return n


def stream_chunks() -> Iterator[bytes]:
    """The streamed body, chunk by chunk, as a generator the WSGI server iterates (B04c)."""
    for chunk in STREAM_CHUNKS:
        time.sleep(0.01)
        yield chunk


def flask_app(orders: Orders) -> Any:
    """The contract app on Flask (add idempo with ``idempo.flask.Idempotency``)."""
    from flask import Flask, Response, request, send_file

    app = Flask("orders")

    def respond(n: int) -> Response:
        headers = request.headers
        status = int(headers.get("x-test-status", "201"))
        kind = headers.get("x-test-response", "json")
        payload = order_payload(n, headers)
        location = {"Location": f"/orders/{n}"}
        if kind == "empty":
            response = Response(status=204)
            del response.headers["Content-Type"]
            return response
        if kind == "text":
            return Response(b"queued", status=202, mimetype="text/plain")
        if kind == "binary":
            return Response(BINARY_BODY, status=status, mimetype="application/octet-stream", headers=location)
        if kind == "stream":
            return Response(stream_chunks(), status=status, mimetype="application/x-ndjson", headers=location)
        if kind.startswith("raw:"):
            return Response(kind[4:].encode(), status=status, mimetype="application/json", headers=location)
        response = Response(compact_json(payload), status=status, mimetype="application/json", headers=location)
        extra = extra_header(headers)
        if extra is not None:
            response.headers.add(*extra)  # werkzeug raises for CR and LF
        if kind == "headers":
            del response.headers["Location"]
            for name, value in header_set(n):
                response.headers.add(name, value)
        elif kind == "background":

            def bump() -> None:
                with orders.lock:
                    orders.background += 1

            response.call_on_close(bump)
        elif kind == "file":
            assert orders.file_path is not None
            response = send_file(orders.file_path, mimetype="application/octet-stream")
            response.status_code = status
        return response

    @app.route("/orders/<path:rest>", methods=["POST", "PATCH"])
    def order_below(rest: str) -> Any:
        request.get_data()
        return respond(enter_sync(orders, request.headers))

    @app.route("/orders", methods=["GET", "POST", "PATCH", "PUT", "DELETE"])
    def orders_endpoint() -> Any:
        if request.method in ("POST", "PATCH"):
            request.get_data()
            return respond(enter_sync(orders, request.headers))
        orders.enter()
        return Response(compact_json({"method": request.method}), mimetype="application/json")

    @app.route("/health")
    def health() -> str:
        return "ok"

    return app


def configure_django() -> None:
    """Configure Django once for this process: no database, no apps, idempo's middleware alone."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        SECRET_KEY="idempo-tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["idempo.django.IdempotencyMiddleware"],
        INSTALLED_APPS=[],
        DATABASES={},
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    django.setup()


#: Django's ROOT_URLCONF must name a module with urlpatterns; each contract
#: app sets its own urlconf on the request (see django_app).
urlpatterns: list[Any] = []


def django_app(orders: Orders, idempo: dict[str, Any]) -> Any:
    """The contract app on Django: a WSGI handler whose middleware reads ``settings.IDEMPO = idempo``."""
    from django.http import FileResponse, HttpResponse, StreamingHttpResponse
    from django.urls import path

    configure_django()

    class LinkLinesResponse(HttpResponse):  # type: ignore[misc]
        """Two Link lines: Django's header mapping holds one, so items() adds the second."""

        def items(self) -> Any:
            return [*super().items(), ("Link", '<b>; rel="y"')]

    class BackgroundResponse(HttpResponse):  # type: ignore[misc]
        """Runs a task once the server has sent the response (Django's close())."""

        def close(self) -> None:
            super().close()
            with orders.lock:
                orders.background += 1

    def respond(request: Any, n: int) -> Any:
        headers = request.headers
        status = int(headers.get("x-test-status", "201"))
        kind = headers.get("x-test-response", "json")
        payload = order_payload(n, headers)
        location = {"Location": f"/orders/{n}"}
        if kind == "empty":
            response = HttpResponse(status=204)
            del response.headers["Content-Type"]
            return response
        if kind == "text":
            return HttpResponse(b"queued", status=202, content_type="text/plain")
        if kind == "binary":
            return HttpResponse(BINARY_BODY, status=status, content_type="application/octet-stream", headers=location)
        if kind == "stream":
            return StreamingHttpResponse(
                stream_chunks(), status=status, content_type="application/x-ndjson", headers=location
            )
        if kind.startswith("raw:"):
            return HttpResponse(kind[4:].encode(), status=status, content_type="application/json", headers=location)
        if kind == "headers":
            response = LinkLinesResponse(compact_json(payload), status=status, content_type="application/json")
            for name, value in header_set(n):
                if name == "Set-Cookie":
                    cookie, _, flags = value.partition(";")
                    cookie_name, _, cookie_value = cookie.partition("=")
                    response.set_cookie(cookie_name, cookie_value, path=None, httponly="HttpOnly" in flags)
                elif name == "Link" and "Link" in response.headers:
                    continue  # the second line comes from items()
                else:
                    response.headers[name] = value
            return response
        if kind == "background":
            return BackgroundResponse(
                compact_json(payload), status=status, content_type="application/json", headers=location
            )
        if kind == "file":
            assert orders.file_path is not None
            return FileResponse(orders.file_path.open("rb"), status=status, content_type="application/octet-stream")
        response = HttpResponse(compact_json(payload), status=status, content_type="application/json", headers=location)
        extra = extra_header(headers)
        if extra is not None:
            response.headers[extra[0]] = extra[1]  # Django raises BadHeaderError for CR and LF
        return response

    def orders_view(request: Any, rest: str | None = None) -> Any:
        if request.method in ("POST", "PATCH"):
            request.body  # noqa: B018
            return respond(request, enter_sync(orders, request.headers))
        orders.enter()
        return HttpResponse(compact_json({"method": request.method}), content_type="application/json")

    def health(request: Any) -> Any:
        return HttpResponse(b"ok", content_type="text/plain")

    patterns = [path("orders", orders_view), path("orders/<path:rest>", orders_view), path("health", health)]
    return django_handler(patterns, idempo)


def django_handler(patterns: list[Any], idempo: dict[str, Any], middleware: list[str] | None = None) -> Any:
    """A Django WSGI handler serving ``patterns``, whose idempo middleware reads ``settings.IDEMPO = idempo``.

    ``middleware`` replaces ``settings.MIDDLEWARE`` for this handler.
    """
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler

    configure_django()
    # A class, not a module: Django caches resolvers by urlconf, so it must be hashable.
    urlconf = type("ContractURLConf", (), {"urlpatterns": patterns})

    class ContractHandler(WSGIHandler):  # type: ignore[misc]
        def get_response(self, request: Any) -> Any:
            request.urlconf = urlconf
            return super().get_response(request)

    previous = getattr(settings, "IDEMPO", None), settings.MIDDLEWARE
    # Both are read once, as the handler builds its middleware.
    settings.IDEMPO = idempo
    if middleware is not None:
        settings.MIDDLEWARE = middleware
    try:
        return ContractHandler()
    finally:
        settings.IDEMPO, settings.MIDDLEWARE = previous


#: Framework name -> app factory, for the parametrised behaviour suite.
ASGI_FRAMEWORKS = {"starlette": starlette_app, "fastapi": fastapi_app}
