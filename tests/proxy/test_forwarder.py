"""The forwarders' pooled connections, against a loopback server of the test's own that answers as scripted.

A request goes on a connection the upstream closed only if none of it was sent;
a connection that carried a 5xx is not reused; a request whose connection broke
after it was written is never resent. Each holds for both forwarders
(``[upstream] client = "httpx"`` and ``"aiohttp"``).

httpx: httpcore drops an idle connection whose socket is readable when the pool
picks it (``has_expired()``); an upstream's FIN that lands just after that look
used to send a keyed request onto a dead connection (a protocol error: an
unknown outcome, a held key). The test makes that moment certain: the pool's
look is told the connection is fine, and the upstream has closed it before the
request is written.

aiohttp: the connector sees a close when the event loop has read the FIN. The
test makes the upstream close an idle pooled connection while the loop cannot
run (it waits, blocking, until the FIN is in the kernel), so the pool still
takes the connection for open when the next request asks for one.
"""

from __future__ import annotations

import select
import socket
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpcore
import pytest

from idempo.proxy.app import create_forwarder
from idempo.proxy.config import load_config
from idempo.proxy.forwarder import Forwarder, HttpxForwarder, UpstreamFailure
from tests.conftest import free_port

from .upstream import PATIENCE

ANSWER = b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%b"

#: One scripted turn per request received, in order: answer (status, body), then maybe close.
Action = tuple[str, int, bytes]


class ScriptedServer:
    """A loopback HTTP/1.1 server: each request it reads gets the next scripted action.

    Actions: ``("answer", status, body)``; ``("answer-close", status, body)``
    answers, then closes once :attr:`go` is set; ``("drop", 0, b"")`` closes
    without an answer; ``("hang", 0, b"")`` answers nothing until :attr:`go` is
    set. Past the script: ``answer 200`` naming the connection.

    Attributes:
        requests: ``(connection number, request head)`` of each request read.
        received: set once a request was read.
        closed: set once a connection was closed by an action.
    """

    def __init__(self, script: list[Action]) -> None:
        self.script = deque(script)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[tuple[int, bytes]] = []
        self.go = threading.Event()
        self.received = threading.Event()
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._connections += 1
            threading.Thread(target=self._serve, args=(conn, self._connections), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                with self._lock:
                    self.requests.append((number, head))
                    action = self.script.popleft() if self.script else ("answer", 200, b"connection %d" % number)
                self.received.set()
                kind, status, body = action
                if kind == "drop":
                    break
                if kind == "hang":
                    self.go.wait(PATIENCE)
                    break
                conn.sendall(ANSWER % (status, len(body), body))
                if kind == "answer-close":
                    self.go.wait(PATIENCE)
                    break
        self.closed.set()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def server_for(tmp_path: Path) -> Any:
    """``server_for(script, client, upstream="")``: a started :class:`ScriptedServer` and a forwarder to it.

    ``upstream`` is more of the ``[upstream]`` table (TOML lines).
    """
    servers: list[ScriptedServer] = []

    def make(script: list[Action], client: str, upstream: str = "") -> tuple[ScriptedServer, Forwarder]:
        server = ScriptedServer(script)
        servers.append(server)
        return server, forwarder_to(tmp_path / f"p{len(servers)}.toml", server.port, client, upstream)

    yield make
    for server in servers:
        server.close()


def forwarder_to(config_file: Path, port: int, client: str, upstream: str = "") -> Forwarder:
    """A forwarder to ``127.0.0.1:port`` with ``client`` and more of the ``[upstream]`` table."""
    proxy = f'[proxy]\nupstream = "http://127.0.0.1:{port}"\nstore = "memory://"\n'
    config_file.write_text(f'{proxy}[upstream]\nclient = "{client}"\n{upstream}')
    config = load_config(str(config_file), environ={})
    return create_forwarder(config.proxy.upstream, config.upstream)


async def exchange(forwarder: Forwarder, method: str = "POST") -> tuple[int, bytes]:
    response = await forwarder.send(method, b"/v1/payments", [(b"host", b"x"), (b"content-length", b"2")], b"{}")
    try:
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()
    return response.status, body


def test_httpx_does_not_send_on_a_connection_the_upstream_closed(
    server_for: Callable[..., tuple[ScriptedServer, Forwarder]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream closed the idle connection after httpcore's look: the request goes, once, on a fresh one."""
    server, forwarder = server_for([("answer-close", 200, b"connection 1")], "httpx")
    assert isinstance(forwarder, HttpxForwarder)
    server.go.set()
    # The race, made certain: the pool's look at an idle connection misses the FIN (it lands just after).
    monkeypatch.setattr(httpcore.AsyncHTTP11Connection, "has_expired", lambda self: False)

    async def main() -> list[tuple[int, bytes]]:
        try:
            first = await exchange(forwarder)
            await anyio.to_thread.run_sync(server.closed.wait, PATIENCE)  # the upstream closed that connection
            second = await exchange(forwarder)
        finally:
            await forwarder.aclose()
        return [first, second]

    assert anyio.run(main) == [(200, b"connection 1"), (200, b"connection 2")]
    assert [number for number, _ in server.requests] == [1, 2]


def test_aiohttp_does_not_send_on_a_connection_the_upstream_closed(
    server_for: Callable[..., tuple[ScriptedServer, Forwarder]],
) -> None:
    """The upstream closed the idle connection, its FIN not yet read by the loop: the request goes on a fresh one."""
    server, forwarder = server_for([("answer-close", 200, b"connection 1")], "aiohttp")

    async def main() -> list[tuple[int, bytes]]:
        try:
            first = await exchange(forwarder)
            session: Any = forwarder._session  # type: ignore[attr-defined]
            [(protocol, _)] = [entry for entries in session.connector._conns.values() for entry in entries]
            # Blocking, so the event loop does not run: the FIN reaches the kernel, unseen by aiohttp.
            server.go.set()
            assert server.closed.wait(PATIENCE)
            sock = protocol.transport.get_extra_info("socket")
            assert select.select([sock], [], [], PATIENCE)[0]
            assert protocol.is_connected()  # the pool still takes it for open: the race is set
            second = await exchange(forwarder)
        finally:
            await forwarder.aclose()
        return [first, second]

    assert anyio.run(main) == [(200, b"connection 1"), (200, b"connection 2")]
    assert [number for number, _ in server.requests] == [1, 2]


@pytest.mark.parametrize("client", ["httpx", "aiohttp"])
@pytest.mark.parametrize("body", [b"", b"boom"])
def test_a_connection_that_carried_a_5xx_is_not_reused(
    server_for: Callable[..., tuple[ScriptedServer, Forwarder]], client: str, body: bytes
) -> None:
    """The upstream keeps the connection open after its 5xx, yet the next request goes on a new one."""
    server, forwarder = server_for([("answer", 503, body)], client)

    async def main() -> list[tuple[int, bytes]]:
        try:
            return [await exchange(forwarder), await exchange(forwarder), await exchange(forwarder)]
        finally:
            await forwarder.aclose()

    assert anyio.run(main) == [(503, body), (200, b"connection 2"), (200, b"connection 2")]
    assert [number for number, _ in server.requests] == [1, 2, 2]


@pytest.mark.parametrize("client", ["httpx", "aiohttp"])
@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_a_request_whose_connection_broke_after_it_was_sent_is_not_resent(
    server_for: Callable[..., tuple[ScriptedServer, Forwarder]], client: str, method: str
) -> None:
    """The upstream reads a request on a reused connection and closes without answering: protocol-error, sent once.

    aiohttp resends a PUT (an idempotent method) on its own after a
    disconnection on a reused connection; the proxy's forwarder must not.
    """
    server, forwarder = server_for([("answer", 200, b"first"), ("drop", 0, b"")], client)

    async def main() -> UpstreamFailure:
        try:
            assert await exchange(forwarder) == (200, b"first")
            with pytest.raises(UpstreamFailure) as failed:
                await exchange(forwarder, method)
            return failed.value
        finally:
            await forwarder.aclose()

    failure = anyio.run(main)
    assert failure.kind == "protocol-error"
    assert failure.sent
    assert [(number, head.split(b" ")[0]) for number, head in server.requests] == [(1, b"POST"), (1, method.encode())]


@pytest.mark.parametrize("client", ["httpx", "aiohttp"])
def test_failures_before_sending_are_told_apart(
    server_for: Callable[..., tuple[ScriptedServer, Forwarder]], client: str, tmp_path: Path
) -> None:
    """Nothing listening: connect-error; the one connection busy past pool_timeout: pool-timeout. Neither was sent."""
    dead = forwarder_to(tmp_path / "dead.toml", free_port(), client)
    server, busy = server_for(
        [("hang", 0, b"")], client, "max_connections = 1\nmax_keepalive_connections = 1\npool_timeout = 0.2\n"
    )

    async def main() -> tuple[UpstreamFailure, UpstreamFailure]:
        try:
            with pytest.raises(UpstreamFailure) as refused:
                await exchange(dead)
            async with anyio.create_task_group() as group:
                group.start_soon(exchange, busy)  # takes the one connection; its answer never comes
                await anyio.to_thread.run_sync(server.received.wait, PATIENCE)
                with pytest.raises(UpstreamFailure) as waited:
                    await exchange(busy)
                group.cancel_scope.cancel()
            return refused.value, waited.value
        finally:
            server.go.set()
            await dead.aclose()
            await busy.aclose()

    refused, waited = anyio.run(main)
    assert (refused.kind, refused.sent) == ("connect-error", False)
    assert (waited.kind, waited.sent) == ("pool-timeout", False)
    assert len(server.requests) == 1
