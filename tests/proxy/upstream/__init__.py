"""The Node test upstream (``server.mjs`` beside this file) as a process a test owns.

``server.mjs`` documents the protocol: the ledger's fields, ``/_stats``,
``/_echo-headers``, ``/_release`` and the ``X-Fault`` faults. This module starts
it as ``node server.mjs --port 0 --ledger PATH``, reads the port from the one
line it prints, and gives the tests what they ask of it: the ledger, the stats,
releases, and polling (never sleeping for an assumed time).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

SERVER = Path(__file__).with_name("server.mjs")

#: The oldest Node that has everything server.mjs uses (util.parseArgs, socket.resetAndDestroy).
MIN_NODE = (18, 3)

#: The bound on waits for the server itself (its start, its exit, a polled condition): a guard
#: against a hang, never an assertion about how long anything takes.
PATIENCE = 15.0


def find_node(path: str | None = None) -> tuple[str | None, str]:
    """Where ``node`` is and why it cannot be used: ``(executable, "")`` or ``(None, reason)``.

    Args:
        path: the ``PATH`` to search (default: the environment's).
    """
    node = shutil.which("node", path=path)
    if node is None:
        return None, "node is not installed (apt-get install nodejs): the proxy tests run their upstream on Node"
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=PATIENCE, check=True)
        version = tuple(int(part) for part in out.stdout.strip().lstrip("v").split(".")[:2])
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return None, f"{node} --version failed: {exc}"
    if version < MIN_NODE:
        wanted = ".".join(map(str, MIN_NODE))
        return None, f"node {out.stdout.strip()} is too old for the proxy tests' upstream (needs {wanted} or newer)"
    return node, ""


class NodeUpstream:
    """``server.mjs`` in a process of the test's own; restartable on the same port.

    Args:
        node: the ``node`` executable.
        directory: where the ledger (``ledger.jsonl``) and the server's stderr
            (``node-<n>.log``) go; the ledger is kept across restarts.
        port: the port to listen on; 0 picks a free one at the first start,
            which later starts reuse (so a proxy in front keeps its upstream URL).
    """

    def __init__(self, node: str, directory: Path, port: int = 0) -> None:
        self.node = node
        self.directory = directory
        self.ledger_path = directory / "ledger.jsonl"
        self.port = port
        self.pid: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process lives."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server and wait for the line that gives its port.

        Raises:
            RuntimeError: it exited, or printed no port line, within :data:`PATIENCE` seconds
                (the message holds its stderr).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        log = self.directory / f"node-{self._starts}.log"
        command = [self.node, str(SERVER), "--port", str(self.port), "--ledger", str(self.ledger_path)]
        with log.open("wb") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)
        assert process.stdout is not None
        try:
            line = _read_line(process.stdout, PATIENCE)
        finally:
            process.stdout.close()
        try:
            started = json.loads(line)
        except ValueError:
            process.kill()
            process.wait(PATIENCE)
            raise RuntimeError(
                f"server.mjs printed no port line (got {line!r}); stderr: {log.read_text(errors='replace')}"
            ) from None
        self.process = process
        self.port = int(started["port"])
        self.pid = int(started["pid"])

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait; nothing happens if it is not running."""
        self._close_client()
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(PATIENCE)
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server (a crash from outside) and wait for it."""
        self._close_client()
        if self.process is not None:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(PATIENCE)

    def wait_exit(self) -> int:
        """Wait for the process to end by itself (``crash-after-commit``); its return code."""
        self._close_client()
        assert self.process is not None, "the server was not started"
        return self.process.wait(PATIENCE)

    # --- what the server did ---------------------------------------------------------------

    def ledger(self) -> list[dict[str, Any]]:
        """Every execution recorded so far, across restarts, oldest first.

        A line still being appended (no newline yet) is left for the next read.
        """
        try:
            text = self.ledger_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def executions(self, key: str | None = None) -> int:
        """How many executions the ledger holds: all of them, or those with this ``Idempotency-Key``."""
        return sum(1 for entry in self.ledger() if key is None or entry["key"] == key)

    def stats(self) -> dict[str, Any]:
        """``GET /_stats`` (this process's counters since it started; see server.mjs)."""
        return self._get("/_stats")

    def release(self, n: int = 1, key: str | None = None) -> dict[str, Any]:
        """``GET /_release``: let ``n`` waiting answers or stream chunks go (only ``key``'s, if given)."""
        params: dict[str, str | int] = {"n": n}
        if key is not None:
            params["key"] = key
        return self._get("/_release", params)

    def wait_for(self, what: str, predicate: Callable[[], bool]) -> None:
        """Poll ``predicate`` until it holds.

        Raises:
            AssertionError: it still does not hold after :data:`PATIENCE` seconds
                (a hang guard), or the server died meanwhile.
        """
        deadline = time.monotonic() + PATIENCE
        while not predicate():
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the upstream exited ({self.process.returncode}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the upstream never reached: {what}")
            time.sleep(0.005)

    def wait_waiting(self, n: int = 1) -> None:
        """Wait until ``n`` answers or chunks wait for ``/_release`` (``stats()["waiting"]``)."""
        self.wait_for(f"{n} waiting for /_release", lambda: self.stats()["waiting"] >= n)

    def wait_executions(self, n: int, key: str | None = None) -> None:
        """Wait until the ledger holds ``n`` executions (of ``key``, if given)."""
        self.wait_for(f"{n} executions in the ledger", lambda: self.executions(key) >= n)

    # --- internals ---------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, str | int] | None = None) -> dict[str, Any]:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=PATIENCE)
        response = self._client.get(path, params=params)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _read_line(stream: Any, timeout: float) -> str:
    """Read one line from a pipe, giving up after ``timeout`` seconds or at its end."""
    buffer = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                break
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
    return buffer.decode(errors="replace").partition("\n")[0]
