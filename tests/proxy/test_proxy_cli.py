"""The ``idempo proxy`` command: the sample configuration starts as the README says; checks and overrides."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from tests.proxy.proxy_process import SECRET, ProxyProcess
from tests.proxy.upstream import NodeUpstream

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "proxy" / "idempo-proxy.toml"


def _env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPO_PROXY_")}
    return {**env, "IDEMPO_SECRET": SECRET, **variables}


def test_the_sample_config_starts(node_upstream: NodeUpstream, tmp_path: Path) -> None:
    """`idempo proxy --config examples/proxy/idempo-proxy.toml` starts and forwards (ports and upstream by variable)."""
    config = tmp_path / "idempo-proxy.toml"
    shutil.copy(SAMPLE, config)
    shutil.copy(SAMPLE.with_name("jwks.json"), tmp_path / "jwks.json")
    variables = {
        "IDEMPO_PROXY_UPSTREAM": node_upstream.url,
        "IDEMPO_PROXY_LISTEN": "127.0.0.1:0",
        "IDEMPO_PROXY_ADMIN_LISTEN": "127.0.0.1:0",
        "IDEMPO_PROXY_STORE": f"sqlite:///{tmp_path / 'idempo.db'}",
    }
    proxy = ProxyProcess(config, tmp_path / "proxy.log", env=variables).start()
    try:
        assert httpx.get(proxy.url + "/v1/things", timeout=15).status_code == 201
        refused = httpx.post(proxy.url + "/v1/payments", json={}, headers={"Idempotency-Key": "k"}, timeout=15)
        assert refused.status_code == 401  # the payments route's scope is a verified JWT
        assert proxy.ready().status_code == 200
    finally:
        proxy.kill()


def test_check_and_print_config(tmp_path: Path) -> None:
    """--check-config loads and checks; --print-config shows flags and variables over the file."""
    command = [sys.executable, "-m", "idempo", "proxy", "--config", str(SAMPLE)]
    checked = subprocess.run([*command, "--check-config"], capture_output=True, text=True, timeout=60, env=_env())
    assert checked.returncode == 0, checked.stderr
    assert "is valid" in checked.stdout
    printed = subprocess.run(
        [*command, "--print-config", "--workers", "3", "--upstream", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(IDEMPO_PROXY_UPSTREAM="http://127.0.0.1:2"),
    )
    assert printed.returncode == 0, printed.stderr
    assert "workers = 3" in printed.stdout
    assert 'upstream = "http://127.0.0.1:2"' in printed.stdout  # the variable beats the flag
