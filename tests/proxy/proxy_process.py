"""``idempo proxy`` as a process a test owns: started with a TOML file, its ports read from stdout.

:func:`write_config` writes a configuration file; :class:`ProxyProcess` runs
``python -m idempo proxy --config FILE`` (listen and admin on port 0), reads
the ``listening on`` / ``admin on`` lines, and stops it with SIGTERM or kills it
with SIGKILL. Nothing here waits for an assumed time: waits poll a condition,
bounded by :data:`~tests.proxy.upstream.PATIENCE`.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.proxy.upstream import PATIENCE

SECRET = "proxy-tests-secret-0123456789abcdef"


def write_config(
    path: Path, upstream: str, store: str, extra: str = "", *, client: str | None = None, **proxy: Any
) -> Path:
    """Write a configuration: ``[proxy]`` with ``upstream``, ``store`` and ``proxy``'s keys, then ``extra``.

    ``client`` sets ``[upstream] client`` (in ``extra``'s ``[upstream]`` table when it has one).
    """
    lines = ["[proxy]", f'upstream = "{upstream}"', f'store = "{store}"', 'listen = "127.0.0.1:0"']
    lines.append('admin_listen = "127.0.0.1:0"')
    for key, value in proxy.items():
        lines.append(f"{key} = {_toml(value)}")
    if client is not None:
        setting = f'client = "{client}"'
        extra, found = re.subn(r"^\[upstream\][ \t]*$", f"[upstream]\n{setting}", extra, count=1, flags=re.M)
        if not found:
            extra = f"{extra}\n[upstream]\n{setting}\n"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


class ProxyProcess:
    """One ``idempo proxy`` process.

    Args:
        config: the configuration file.
        log: where its stderr goes.
        args: more command-line arguments (``--workers 2``).
        env: ``IDEMPO_PROXY_*`` variables to set (no others from the test's environment are passed).
    """

    def __init__(self, config: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env or {}
        self.log = log
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.admin_url = ""

    def start(self) -> ProxyProcess:
        """Start it and wait for its ``listening on`` and ``admin on`` lines.

        Raises:
            RuntimeError: it printed no such line (the message holds its stderr).
        """
        env = {**os.environ, "IDEMPO_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("IDEMPO_PROXY_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(self.env)
        command = [sys.executable, "-m", "idempo", "proxy", "--config", str(self.config), *self.args]
        with self.log.open("ab") as stderr:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=env)
        assert self.process.stdout is not None
        listen, admin = _read_lines(self.process.stdout, 2)
        found = re.search(r"listening on (http://\S+?),", listen)
        found_admin = re.search(r"admin on (http://\S+)", admin)
        if found is None or found_admin is None:
            self.kill()
            raise RuntimeError(f"idempo proxy did not start ({listen!r}, {admin!r}): {self.log.read_text()}")
        self.url = found.group(1)
        self.admin_url = found_admin.group(1)
        return self

    def stop(self) -> int | None:
        """SIGTERM, then wait (SIGKILL if it does not exit); its exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(PATIENCE)
        if process.stdout is not None:
            process.stdout.close()
        self.process = None
        return process.returncode

    def kill(self) -> None:
        """SIGKILL it (a crash) and wait."""
        process = self.process
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait(PATIENCE)
            if process.stdout is not None:
                process.stdout.close()
        self.process = None

    def ready(self) -> httpx.Response:
        """``GET /readyz`` on the admin port."""
        return httpx.get(self.admin_url + "/readyz", timeout=PATIENCE)


def _read_lines(stream: Any, n: int) -> list[str]:
    """The first ``n`` lines of a pipe ("" for those that never came within PATIENCE seconds)."""
    buffer = b""
    deadline = time.monotonic() + PATIENCE
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while buffer.count(b"\n") < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                break
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
    lines = buffer.decode(errors="replace").split("\n")
    return (lines + [""] * n)[:n]


def poll(what: str, predicate: Any) -> Any:
    """Call ``predicate`` until it returns something true; return that. A hang guard, not a timing assertion."""
    deadline = time.monotonic() + PATIENCE
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached: {what}")
        time.sleep(0.02)
