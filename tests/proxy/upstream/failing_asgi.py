"""A Python test upstream whose failures close the connection, as uvicorn does when a Starlette app raises.

Starlette's ``ServerErrorMiddleware`` sends a whole 500 (with its
``Content-Length``, without ``Connection: close``) and then re-raises; uvicorn
then closes the connection. Between the two the connection looks idle and
reusable. This app makes that moment last: ``POST /v1/raise`` answers a whole
500, then waits until another request arrives on the same connection (or
:data:`PATIENCE` seconds), and only then raises. A request that arrives on such
a connection is cut by the close and never answered; any other request counts
as an execution and is answered 201 with ``{"n": <executions so far>}``.
``GET /_stats`` answers ``{"executions": N, "cut": N}`` (requests cut by a close).

Serve it with ``uvicorn tests.proxy.upstream.failing_asgi:app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

#: The bound on the wait for a next request on a failed connection (a hang guard).
PATIENCE = 15.0

_waiting: dict[tuple[str, int], asyncio.Event] = {}
_stats = {"executions": 0, "cut": 0}


async def _answer(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI app (see the module docstring)."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    peer = tuple(scope["client"])
    if scope["path"] == "/_stats":
        await _answer(send, 200, json.dumps(_stats).encode())
        return
    failed = _waiting.pop(peer, None)
    if failed is not None:
        # The connection's failed request is about to raise: this one is cut by the close.
        _stats["cut"] += 1
        failed.set()
        while (await receive())["type"] != "http.disconnect":
            pass
        return
    _stats["executions"] += 1
    if scope["path"] == "/v1/raise":
        next_request = _waiting[peer] = asyncio.Event()
        await _answer(send, 500, b'{"error": "boom"}')
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(next_request.wait(), PATIENCE)
        _waiting.pop(peer, None)
        raise RuntimeError("the handler failed after its 500 was sent")
    await _answer(send, 201, json.dumps({"n": _stats["executions"]}).encode())
