"""``idempo demo --proxy``: ``idempo proxy`` in a subprocess, in front of the payments API without idempo.

The proxy is started as a user starts it (``python -m idempo proxy --config
FILE``), listening on 127.0.0.1 on an ephemeral port; the port is read from
the first line it prints (``idempo proxy: listening on http://127.0.0.1:PORT,
...``, docs/proxy.md). The store URL reaches it in ``IDEMPO_PROXY_STORE``,
never on its command line, which any user can read with ``ps``.

:data:`PROXY_CONFIG` is the demo's policy (:data:`~idempo.demo.payments.DEMO_POLICY`)
written as the proxy's TOML: a key is required on ``POST /payments``, records
are replayed for an hour, a duplicate of a running payment gets 409 with
``Retry-After: 1``. The upstream deadline (15 s) exceeds the slowest charge the
demo allows (:data:`~idempo.demo.payments.MAX_PROVIDER_DELAY`, 10 s), and the
lease (30 s) exceeds the deadline, as the proxy requires.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import httpx

from ._workers import stop_process

__all__: list[str] = []

#: The proxy's configuration for the demo (``upstream`` and ``store`` come from the flag and the environment).
PROXY_CONFIG = """\
# idempo demo --proxy: the demo's policy (idempo.demo.payments.DEMO_POLICY) as idempo proxy's configuration.
[proxy]
listen = "127.0.0.1:0"

[upstream]
# Above the slowest charge the demo allows (10 s); the lease must exceed it.
deadline = "15s"
# The storm keeps up to 3 requests per payment in flight; duplicates never reach the upstream.
max_connections = 256
max_keepalive_connections = 256

[[route]]
name = "payments"
path = "/payments"
methods = ["POST"]
require_key = true
record_ttl = "1h"
lease_ttl = "30s"
retry_after = 1
"""

# Seconds the proxy may take to print where it listens and to answer through to the API.
_STARTUP_TIMEOUT = 60.0
_LISTENING = re.compile(r"idempo proxy: listening on (http://\S+?),")


@contextlib.contextmanager
def proxy_server(
    upstream: str, store_url: str, workdir: Path, log_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``idempo proxy`` in front of ``upstream``; yield its base URL and process; stop it with SIGTERM.

    Args:
        upstream: the payments API without idempo, e.g. ``"http://127.0.0.1:41234"``.
        store_url: idempo's store (ready: its schema created).
        workdir: where the configuration file is written.
        log_path: the proxy's stdout and stderr.

    Raises:
        click.ClickException: the proxy exited, or did not answer within 60 s (the message holds its log).
    """
    config = workdir / "idempo-proxy.toml"
    config.write_text(PROXY_CONFIG, encoding="utf-8")
    # Only the variables set here: one left in the user's environment would
    # override the demo's configuration (and an unknown one is an error).
    env = {name: value for name, value in os.environ.items() if not name.startswith("IDEMPO_PROXY_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["IDEMPO_PROXY_STORE"] = store_url
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "idempo", "proxy", "--config", str(config), "--upstream", upstream]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        base_url = _wait_ready(process, log_path)
        yield base_url, process
    finally:
        stop_process(process)


def _wait_ready(process: subprocess.Popen[bytes], log_path: Path) -> str:
    """Read the proxy's URL from its log, then wait until ``GET /healthz`` reaches the API through it."""
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    base_url: str | None = None
    with httpx.Client(timeout=1.0, trust_env=False) as client:
        while True:
            log = log_path.read_text(encoding="utf-8", errors="replace")
            if process.poll() is not None:
                raise click.ClickException(f"idempo proxy exited with {process.returncode}:\n{log}")
            if base_url is None and (found := _LISTENING.search(log)) is not None:
                base_url = found.group(1)
            if base_url is not None:
                try:
                    if client.get(base_url + "/healthz").status_code == 200:
                        return base_url
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                raise click.ClickException(f"idempo proxy did not answer within {_STARTUP_TIMEOUT:.0f} s:\n{log}")
            time.sleep(0.05)
