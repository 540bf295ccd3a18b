"""An ``https`` upstream: the proxy verifies its certificate against the configured CA bundle (trustme makes both)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import trustme

from tests.proxy.proxy_process import ProxyProcess

StartProxy = Callable[..., ProxyProcess]


def test_an_https_upstream(start_python_upstream: Callable[..., str], start_proxy: StartProxy, tmp_path: Path) -> None:
    """Keyed requests reach an HTTPS upstream verified by [upstream] verify and replay; unverifiable: 502, released."""
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1", "localhost")
    key_file, cert_file, ca_file = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "ca.pem"
    certificate.private_key_pem.write_to_path(str(key_file))
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    upstream = start_python_upstream(
        "echo_asgi", "--ssl-keyfile", str(key_file), "--ssl-certfile", str(cert_file), scheme="https"
    )
    assert upstream.startswith("https://")
    store = f"sqlite:///{tmp_path / 'i.db'}"
    verified = start_proxy(upstream, store, f'[upstream]\nverify = "{ca_file}"\n')
    k = str(uuid.uuid4())
    with httpx.Client(base_url=verified.url, timeout=15) as client:
        first = client.post("/v1/payments", content=b"{}", headers={"Idempotency-Key": k})
        assert first.status_code == 200
        seen = {name: value for name, value in first.json()["headers"]}
        assert seen["idempotency-key"] == k
        assert seen["x-forwarded-proto"] == "http"  # the client's scheme: the proxy listens on plain HTTP
        replay = client.post("/v1/payments", content=b"{}", headers={"Idempotency-Key": k})
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == first.content

    # Without the CA bundle the certificate cannot be verified: nothing was sent (502, Retry-After), the key is free.
    unverified = start_proxy(upstream, store)
    refused = httpx.post(unverified.url + "/v1/payments", content=b"{}", headers={"Idempotency-Key": key()}, timeout=15)
    assert refused.status_code == 502
    assert refused.json()["type"].endswith("/upstream-unreachable")
    assert "retry-after" in refused.headers


def key() -> str:
    return str(uuid.uuid4())
