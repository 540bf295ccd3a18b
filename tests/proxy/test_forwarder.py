"""The forwarder's pooled connections: a request goes on a connection the upstream closed only if none of it was sent.

httpcore drops an idle connection whose socket is readable when the pool picks
it (``has_expired()``); an upstream's FIN that lands just after that look used
to send a keyed request onto a dead connection (a protocol error: an unknown
outcome, a held key). The test makes that moment certain: the pool's look is
told the connection is fine, and the upstream (a loopback server of the test's
own) has closed it before the request is written.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import anyio
import httpcore
import pytest

from idempo.proxy.config import load_config
from idempo.proxy.forwarder import HttpxForwarder

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"


class ClosingServer:
    """Answers one request per connection (keep-alive promised), then closes the connection without reading on."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        n = 0
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                n += 1
                body = b"connection %d" % n
                conn.sendall(ANSWER % (len(body), body))
            self.closed.set()

    def close(self) -> None:
        self.listener.close()


def test_a_request_is_not_sent_on_a_connection_the_upstream_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream closed the idle connection after the pool's look: the request goes, once, on a fresh one."""
    server = ClosingServer()
    config_file = tmp_path / "p.toml"
    config_file.write_text(f'[proxy]\nupstream = "http://127.0.0.1:{server.port}"\nstore = "memory://"\n')
    config = load_config(str(config_file))
    # The race, made certain: the pool's look at an idle connection misses the FIN (it lands just after).
    monkeypatch.setattr(httpcore.AsyncHTTP11Connection, "has_expired", lambda self: False)

    async def exchange(forwarder: HttpxForwarder) -> tuple[int, bytes]:
        response = await forwarder.send("POST", b"/v1/payments", [(b"host", b"x"), (b"content-length", b"2")], b"{}")
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
        return response.status, body

    async def main() -> list[tuple[int, bytes]]:
        forwarder = HttpxForwarder(config.proxy.upstream, config.upstream)
        try:
            first = await exchange(forwarder)
            await anyio.to_thread.run_sync(server.closed.wait, 15)  # the upstream closed that connection
            second = await exchange(forwarder)
        finally:
            await forwarder.aclose()
        return [first, second]

    try:
        answers = anyio.run(main)
    finally:
        server.close()
    assert answers == [(200, b"connection 1"), (200, b"connection 2")]
    assert len(server.requests) == 2
