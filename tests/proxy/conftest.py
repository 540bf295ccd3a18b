"""Fixtures for the proxy tests: the Node upstream (``tests/proxy/upstream/server.mjs``).

Tests that need Node skip with the reason when ``node`` is missing or too old,
unless ``IDEMPO_REQUIRE_SERVICES=1`` (CI, where ``.ci/run`` installs it), where
they fail instead.

Fixtures:
    node_binary: the ``node`` executable (session).
    start_node_upstream: a function starting a :class:`NodeUpstream` of the
        test's own (each in its own directory, with its own ledger); every one is
        stopped afterwards.
    node_upstream: one started upstream; ``.url``, ``.ledger()``,
        ``.executions(key)``, ``.stats()``, ``.release(n, key)``, ``.wait_waiting()``,
        ``.stop()`` / ``.start()`` (same port), ``.kill()``.
    proxy_client: the forwarder under test, ``httpx`` or ``aiohttp`` (the
        tests that start a proxy run with each; ``IDEMPO_TEST_PROXY_CLIENTS``
        narrows the list).
    start_python_upstream: a function serving an ASGI app of tests/proxy/upstream/
        with uvicorn (a process of the test's own, SIGKILLed afterwards) on a
        free loopback port; returns ``http://127.0.0.1:<port>``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, service_missing
from tests.proxy.proxy_process import ProxyProcess, poll, write_config
from tests.proxy.upstream import PATIENCE, NodeUpstream, find_node


@pytest.fixture(scope="session")
def node_binary() -> str:
    """The ``node`` executable; skips (or fails, with IDEMPO_REQUIRE_SERVICES=1) when there is none."""
    node, reason = find_node()
    if node is None:
        service_missing(reason)
    assert node is not None
    return node


@pytest.fixture
def start_node_upstream(node_binary: str, tmp_path: Path) -> Iterator[Callable[[], NodeUpstream]]:
    """Start Node upstreams of the test's own; each is stopped afterwards."""
    upstreams: list[NodeUpstream] = []

    def start() -> NodeUpstream:
        upstream = NodeUpstream(node_binary, tmp_path / f"upstream-{len(upstreams)}")
        upstreams.append(upstream)
        upstream.start()
        return upstream

    yield start
    for upstream in upstreams:
        upstream.stop()


@pytest.fixture
def node_upstream(start_node_upstream: Callable[[], NodeUpstream]) -> NodeUpstream:
    """One running Node upstream, stopped after the test."""
    return start_node_upstream()


#: The forwarders the proxy tests run against (``[upstream] client``); IDEMPO_TEST_PROXY_CLIENTS=httpx narrows them.
PROXY_CLIENTS = tuple(c for c in os.environ.get("IDEMPO_TEST_PROXY_CLIENTS", "httpx,aiohttp").split(",") if c)


@pytest.fixture(params=PROXY_CLIENTS)
def proxy_client(request: pytest.FixtureRequest) -> str:
    """The proxy's HTTP client to the upstream (``[upstream] client``): each test runs with each."""
    client: str = request.param
    return client


@pytest.fixture
def start_proxy(tmp_path: Path, proxy_client: str) -> Iterator[Callable[..., ProxyProcess]]:
    """Start ``idempo proxy`` processes of the test's own, forwarding with ``proxy_client``.

    ``start_proxy(upstream_url, store_url, extra, *args, **proxy)`` returns a started :class:`ProxyProcess`.

    ``extra`` is TOML appended after ``[proxy]`` (``[upstream]``, ``[defaults]``,
    ``[[route]]``); ``proxy`` holds more ``[proxy]`` keys. Every one is killed afterwards.
    """
    proxies: list[ProxyProcess] = []

    def start(upstream: str, store: str, extra: str = "", *args: str, **proxy: object) -> ProxyProcess:
        n = len(proxies)
        config = write_config(tmp_path / f"proxy-{n}.toml", upstream, store, extra, client=proxy_client, **proxy)
        process = ProxyProcess(config, tmp_path / f"proxy-{n}.log", *args)
        proxies.append(process)
        return process.start()

    yield start
    for process in proxies:
        process.kill()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store shared by the test's proxies: a SQLite file, or the shared Redis under this session's prefix."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'idempo.db'}"
    url: str = request.getfixturevalue("redis_store_url")
    return url


@pytest.fixture
def start_python_upstream(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Serve ``tests.proxy.upstream.<module>:app`` with uvicorn; ``start(module, *uvicorn_args)`` returns its URL.

    uvicorn listens on a free loopback port (not a socket passed with
    ``--fd``: uvicorn takes that for a Unix socket, and its clients lose their
    address); the URL is returned once a TCP connection to it opens.
    """
    processes: list[subprocess.Popen[bytes]] = []

    def start(module: str, *args: str, scheme: str = "http") -> str:
        port = free_port()
        log = (tmp_path / f"{module}-{len(processes)}.log").open("wb")
        command = [sys.executable, "-m", "uvicorn", f"tests.proxy.upstream.{module}:app", "--port", str(port)]
        # --no-proxy-headers: the client address is the connection's, not the X-Forwarded-For the proxy sends.
        command += ["--host", "127.0.0.1", "--no-proxy-headers", "--log-level", "warning", *args]
        with log:
            process = subprocess.Popen(command, stdout=log, stderr=log)
        processes.append(process)

        def listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"uvicorn exited: {(tmp_path / log.name).read_text(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=PATIENCE).close()
            except OSError:
                return False
            return True

        poll(f"uvicorn serving {module} on port {port}", listening)
        return f"{scheme}://127.0.0.1:{port}"

    yield start
    for process in processes:
        process.kill()  # an app may still wait on a connection: no graceful shutdown to sit through
        process.wait(15)
