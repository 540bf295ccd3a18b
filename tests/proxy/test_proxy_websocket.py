"""A ``unix:`` upstream, and WebSockets tunnelled through the proxy (never keyed)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.proxy.proxy_process import ProxyProcess, poll

StartProxy = Callable[..., ProxyProcess]


@pytest.fixture
def unix_upstream(tmp_path: Path) -> Iterator[str]:
    """The Python echo upstream (tests/proxy/upstream/echo_asgi.py) under uvicorn on a Unix socket; its path."""
    path = tmp_path / "upstream.sock"
    log = (tmp_path / "echo.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.proxy.upstream.echo_asgi:app",
            "--uds",
            str(path),
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        poll("the upstream's socket", path.exists)
        yield str(path)
    finally:
        process.terminate()
        process.wait(15)
        log.close()


def test_a_unix_socket_upstream_and_a_tunnelled_websocket(
    unix_upstream: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """HTTP reaches a unix: upstream; a WebSocket's text, bytes, subprotocol and close pass both ways."""
    from websockets.sync.client import connect

    proxy = start_proxy(f"unix:{unix_upstream}", f"sqlite:///{tmp_path / 'i.db'}")
    echoed = httpx.get(proxy.url + "/hello", timeout=15).json()
    assert echoed["path"] == "/hello"
    assert ["via", "1.1 idempo"] in echoed["headers"]

    ws_url = proxy.url.replace("http", "ws", 1) + "/socket"
    with connect(ws_url, subprotocols=["chat"], open_timeout=15, proxy=None) as ws:
        assert ws.subprotocol == "chat"
        ws.send("hi")
        assert ws.recv(15) == "echo:hi"
        ws.send(b"\x00\x01")
        assert ws.recv(15) == b"echo:\x00\x01"
        ws.send("close")
        with pytest.raises(Exception, match="4000"):
            ws.recv(15)
