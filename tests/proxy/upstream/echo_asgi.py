"""A second test upstream, in Python: an ASGI app that echoes HTTP requests and WebSocket messages.

For what the Node upstream cannot do without npm packages: a WebSocket server,
and listening on a Unix socket (``uvicorn tests.proxy.upstream.echo_asgi:app
--uds PATH``). HTTP requests are answered 200 with JSON ``{"path", "headers"}``;
a WebSocket is accepted with the first subprotocol offered, and every message
is sent back as it came, prefixed with ``echo:`` (text) or ``b"echo:"`` (bytes).
"""

from __future__ import annotations

import json
from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI app (see the module docstring)."""
    if scope["type"] == "http":
        while (await receive()).get("more_body"):
            pass
        headers = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]]
        body = json.dumps({"path": scope["path"], "headers": headers}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        await receive()
        offered = scope.get("subprotocols") or []
        await send({"type": "websocket.accept", "subprotocol": offered[0] if offered else None})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                if message["text"] == "close":
                    await send({"type": "websocket.close", "code": 4000})
                    return
                await send({"type": "websocket.send", "text": "echo:" + message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": b"echo:" + message["bytes"]})
