"""``idempo demo --proxy``: the storm against the API without idempo, with ``idempo proxy`` in front of it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
from tests.demo.test_demo_command import command_line, idempo

from idempo.demo._proxy import proxy_server
from idempo.demo.command import _api_server

PAYMENTS = 30


@pytest.mark.slow
def test_demo_proxy_exits_zero_with_no_double_charges_and_the_side_by_side_report(tmp_path: Path) -> None:
    """A small `idempo demo --proxy`: exit 0, `double charges: 0`, both columns; the proxied run is exact."""
    report = tmp_path / "report.json"
    store = f"sqlite:///{tmp_path / 'idempo.db'}"
    done = idempo(
        "demo", "--proxy", "--payments", str(PAYMENTS), "--concurrency", "8", "--seed", "3",
        "--store", store, "--json", str(report),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "double charges: 0" in done.stdout.splitlines()
    assert "with idempo proxy" in done.stdout
    assert "without idempo" in done.stdout
    document = json.loads(report.read_text())
    assert document["proxy"] is True
    assert document["failures"] == []
    run = document["runs"]["idempo"]
    assert run["payments"] == run["payment_rows"] == run["provider_charges"] == run["handler_executions"] == PAYMENTS
    assert run["double_charges"] == run["lost"] == run["told_failed_but_charged"] == 0
    assert run["mismatches"] == run["key_reuses"] == run["key_reuses_refused"] > 0
    assert run["replays"] > 0
    bare = document["runs"]["bare"]
    assert bare["replays"] == bare["mismatches"] == 0
    assert bare["handler_executions"] > PAYMENTS
    # The proxy's store is the one given: it holds the run's records.
    assert (tmp_path / "idempo.db").exists()


def test_demo_refuses_serve_with_proxy() -> None:
    """`--serve --proxy` is a usage error (exit 2): --serve runs idempo inside the app."""
    done = idempo("demo", "--serve", "--proxy")
    assert done.returncode == 2
    assert "--proxy" in done.stderr


def test_proxy_subprocess_fronts_the_bare_api_with_the_store_from_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy gets the store URL in its environment (not on its command line, not a stray IDEMPO_PROXY_*).

    Behind it, the API without idempo charges a repeated key once and refuses a keyless payment.
    """
    store_url = f"sqlite:///{tmp_path / 'idempo-secret.db'}"
    monkeypatch.setenv("IDEMPO_PROXY_STORE", "memory://")  # the user's own: the demo's store wins
    body = {"order_id": "order-1", "amount": 1999, "currency": "EUR"}
    key = {"Idempotency-Key": str(uuid.uuid4())}
    with (
        _api_server(tmp_path / "payments.db", None, tmp_path / "api.log") as (upstream, _),
        proxy_server(upstream, store_url, tmp_path, tmp_path / "proxy.log") as (base_url, process),
        httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client,
    ):
        seen = command_line(process)
        keyless = client.post("/payments", json=body)
        first = client.post("/payments", json=body, headers=key)
        again = client.post("/payments", json=body, headers=key)
        charges = client.get("/provider/charges", params={"order_id": "order-1"}).json()
    assert store_url not in seen
    assert "idempo-secret" not in seen
    assert keyless.status_code == 400
    assert first.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert charges["charges"] == 1
    assert (tmp_path / "idempo-secret.db").exists()
