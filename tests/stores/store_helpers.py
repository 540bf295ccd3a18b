"""Helpers for the store tests: a real uvicorn server, a counting app, a round-trip counting proxy."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from typing import Any


class OrdersApp:
    """The test app of shared/cases: POST /orders counts calls and answers 201 with the order id.

    It closes ``on_shutdown``'s store at ASGI lifespan shutdown, on the server's loop.
    """

    def __init__(self, on_shutdown: Callable[[], Any] | None = None) -> None:
        self.calls = 0
        self.on_shutdown = on_shutdown

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.on_shutdown is not None:
                        await self.on_shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.calls += 1
        body = json.dumps({"order_id": self.calls}).encode()
        headers = [(b"content-type", b"application/json"), (b"location", f"/orders/{self.calls}".encode())]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server on a free loopback port; yield its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False, loop="asyncio")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class RoundTripProxy:
    """A TCP proxy to a store that counts round trips.

    A round trip is a flight of bytes from the client that follows a reply
    from the server (or opens the connection): a pipelined request sent in
    several segments counts once, a request that waits for a reply before the
    next counts twice. Protocol-agnostic, so it counts PostgreSQL and Redis
    alike, whatever the client library does.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.round_trips = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._drop_reply = False
        self.replies_dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        """Start counting from zero."""
        with self._lock:
            self.round_trips = 0

    def drop_next_reply(self) -> None:
        """Cut the connection that carries the server's next reply, instead of forwarding it.

        The server has run the command by then: this is the answer lost on its
        way back, the case a client's retry must not turn into a second run.
        """
        with self._lock:
            self._drop_reply = True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, upstream]
            state = {"last": "server"}
            threading.Thread(target=self._pump, args=(client, upstream, state, "client"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, state, "server"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, state: dict[str, str], side: str) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if side == "client" and state["last"] != "client":
                        self.round_trips += 1
                    state["last"] = side
                    drop = side == "server" and self._drop_reply
                    if drop:
                        self._drop_reply = False
                        self.replies_dropped += 1
                if drop:
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting and cut every proxied connection."""
        self._listener.close()
        for sock in self._sockets:
            sock.close()


def unused_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
