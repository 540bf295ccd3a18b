"""Real servers for tests: uvicorn (ASGI) and waitress (WSGI) on ephemeral loopback ports, in a thread or a process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import waitress.server
from waitress import wasyncore


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket on an ephemeral port (port 0), ready to hand to a server."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def free_port() -> int:
    """An ephemeral port that was free a moment ago (for servers that must bind themselves)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_asgi(app: Any, **config: Any) -> Iterator[str]:
    """Serve an ASGI app with a real uvicorn server in a thread; yield its base URL."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    options: dict[str, Any] = {"log_level": "critical", "lifespan": "off", "timeout_graceful_shutdown": 1}
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def crash_guard(app: Any) -> Any:
    """Answer 500 when a WSGI app dies of a ``BaseException`` that is not an ``Exception`` (SystemExit).

    uvicorn answers such a crash with 500; waitress only catches ``Exception``
    and would leave the client waiting. This gives the WSGI suite the same
    server behaviour, outside idempo (which has already left the lease in place).
    """

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        try:
            return app(environ, start_response)
        except Exception:
            raise
        except BaseException:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
            return [b"Internal Server Error"]

    return guarded


@contextmanager
def running_wsgi(app: Any, threads: int = 64) -> Iterator[str]:
    """Serve a WSGI app with a real waitress server in a thread, on a pre-bound ephemeral socket; yield its URL.

    ``threads`` bounds the requests served at once (a burst of 50 must not queue
    behind a sleeping handler any more than under uvicorn).
    """
    sock = bound_socket()
    port = sock.getsockname()[1]
    server = waitress.server.create_server(
        crash_guard(app),
        sockets=[sock],
        threads=threads,
        connection_limit=256,
        channel_timeout=30,
        # waitress spills a request body over inbuf_overflow (512 KiB) into a
        # temporary file and never closes it when the client hangs up
        # mid-upload (the channel drops its unfinished request); the leaked
        # file's ResourceWarning then fails whichever later test the garbage
        # collector runs in. The suite's bodies (5 MiB at most) stay in memory.
        outbuf_overflow=64 * 1024 * 1024,
        inbuf_overflow=64 * 1024 * 1024,
    )
    stopping = threading.Event()

    def run() -> None:
        # waitress's own run() cannot be stopped from another thread without
        # closing sockets under its select(); poll here until told to stop.
        while not stopping.is_set():
            wasyncore.loop(timeout=0.05, map=server._map, count=1)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        wasyncore.close_all(server._map)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stopping.set()
        thread.join(10)
        sock.close()


def _server_command(module_app: str, port: int, interface: str) -> list[str]:
    if interface == "wsgi":
        return [
            sys.executable,
            "-m",
            "waitress",
            "--listen",
            f"127.0.0.1:{port}",
            "--threads",
            "32",
            "--call",
            module_app,
        ]
    return [
        sys.executable,
        "-m",
        "uvicorn",
        module_app,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--lifespan",
        "off",
    ]


@contextmanager
def running_processes(
    module_app: str, env: dict[str, str], *, count: int = 1, interface: str = "asgi", cwd: Path | None = None
) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """Serve ``module:factory`` in ``count`` child processes (uvicorn, or waitress for WSGI); yield (URL, process)s.

    The processes start together. Each child gets ``env`` on top of this
    process's environment; each is killed (SIGKILL) on exit if it has not
    stopped on SIGTERM.
    """
    root = Path(__file__).resolve().parents[2]
    child_env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for _ in range(count):
            port = free_port()
            process = subprocess.Popen(_server_command(module_app, port, interface), env=child_env, cwd=cwd)
            started.append((f"http://127.0.0.1:{port}", process))
        for url, process in started:
            wait_until_up(url, process)
        yield started
    finally:
        for _, process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def running_process(
    module_app: str, env: dict[str, str], *, interface: str = "asgi", cwd: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Serve ``module:factory`` in one child process; yield (base URL, process). See :func:`running_processes`."""
    with running_processes(module_app, env, interface=interface, cwd=cwd) as started:
        yield started[0]


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Poll ``url`` until it answers, or fail when the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server process exited with {process.returncode}")
        try:
            httpx.get(url + "/health", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"server at {url} did not start")
