"""The payments example under a real uvicorn server: what it stores, and the race idempo closes."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from idempo.demo.payments import PROVIDER_DELAY_HEADER, create_app, read_ledger

# Seconds the provider takes in the race tests: every duplicate of the burst
# reaches the handler's "is the order paid?" check well within it.
SLOW_CHARGE = 1.5
DUPLICATES = 4


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on an ephemeral port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn exited while starting"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def burst(base_url: str, body: dict[str, object], headers: dict[str, str], count: int) -> list[httpx.Response]:
    """Send ``count`` identical POSTs released at the same instant by a barrier, one thread each."""
    barrier = threading.Barrier(count)
    responses: list[httpx.Response | None] = [None] * count

    def send(index: int) -> None:
        with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
            client.get("/healthz")  # open the connection before the barrier
            barrier.wait()
            responses[index] = client.post("/payments", json=body, headers=headers)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(response is not None for response in responses)
    return [response for response in responses if response is not None]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """A fresh SQLite store for idempo."""
    return f"sqlite:///{tmp_path / 'idempo.db'}"


def test_post_creates_one_payment_and_get_returns_it(tmp_path: Path, store_url: str) -> None:
    """POST /payments charges once, inserts one row and answers 201 + Location; GET returns that payment."""
    database = tmp_path / "payments.db"
    with (
        serve(create_app(database, store=store_url)) as base_url,
        httpx.Client(base_url=base_url, trust_env=False) as client,
    ):
        body = {"order_id": "order-1", "amount": 1999, "currency": "EUR"}
        created = client.post("/payments", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
        assert created.status_code == 201
        payment = created.json()
        assert {k: payment[k] for k in body} == body
        assert created.headers["location"] == f"/payments/{payment['id']}"
        fetched = client.get(created.headers["location"])
        assert fetched.status_code == 200
        assert fetched.json() == payment
        assert client.get("/payments/pay_missing").status_code == 404
    ledger = read_ledger(database)
    assert (ledger.payments, ledger.provider_charges, ledger.handler_executions) == (1, 1, 1)


def test_replay_answers_the_same_payment_without_charging_again(tmp_path: Path, store_url: str) -> None:
    """A retry with the same key gets the first answer byte for byte, marked replayed; the provider is not called."""
    database = tmp_path / "payments.db"
    with (
        serve(create_app(database, store=store_url)) as base_url,
        httpx.Client(base_url=base_url, trust_env=False) as client,
    ):
        body = {"order_id": "order-1", "amount": 500, "currency": "USD"}
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        first = client.post("/payments", json=body, headers=headers)
        again = client.post("/payments", json=body, headers=headers)
        charges = client.get("/provider/charges", params={"order_id": "order-1"}).json()
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert charges == {"order_id": "order-1", "charges": 1}
    assert read_ledger(database).handler_executions == 1


def test_demo_policy_requires_a_key_and_refuses_a_reused_one(tmp_path: Path, store_url: str) -> None:
    """Without a key POST /payments is 400; the same key with another amount is 422; neither runs the handler."""
    database = tmp_path / "payments.db"
    with (
        serve(create_app(database, store=store_url)) as base_url,
        httpx.Client(base_url=base_url, trust_env=False) as client,
    ):
        body = {"order_id": "order-1", "amount": 500, "currency": "USD"}
        missing = client.post("/payments", json=body)
        key = {"Idempotency-Key": str(uuid.uuid4())}
        assert client.post("/payments", json=body, headers=key).status_code == 201
        reused = client.post("/payments", json={**body, "amount": 600}, headers=key)
    assert missing.status_code == 400
    assert missing.headers["content-type"] == "application/problem+json"
    assert reused.status_code == 422
    assert reused.json()["type"].endswith("/fingerprint-mismatch")
    ledger = read_ledger(database)
    assert (ledger.handler_executions, ledger.provider_charges) == (1, 1)


def test_bare_app_charges_concurrent_duplicates_more_than_once(tmp_path: Path) -> None:
    """Without idempo, simultaneous duplicates all pass the 'paid?' check: each charges, the losers get 500."""
    database = tmp_path / "payments.db"
    body = {"order_id": "order-1", "amount": 1999, "currency": "EUR"}
    headers = {"Idempotency-Key": str(uuid.uuid4()), PROVIDER_DELAY_HEADER: str(SLOW_CHARGE)}
    with serve(create_app(database, store=None)) as base_url:
        responses = burst(base_url, body, headers, DUPLICATES)
    statuses = [response.status_code for response in responses]
    ledger = read_ledger(database)
    charges = ledger.charges_by_order["order-1"]
    # Every duplicate that passed the check charged (in practice all of them);
    # one insert won, every other charged duplicate hit the UNIQUE index.
    assert charges >= 2
    assert statuses.count(201) == 1
    assert statuses.count(500) == charges - 1
    assert ledger.payments == 1
    assert ledger.double_charged_orders == 1


def test_idempo_app_charges_concurrent_duplicates_once(tmp_path: Path, store_url: str) -> None:
    """With idempo, simultaneous duplicates run the handler once; the rest get 409, then the replay (cases B01)."""
    database = tmp_path / "payments.db"
    body = {"order_id": "order-1", "amount": 1999, "currency": "EUR"}
    headers = {"Idempotency-Key": str(uuid.uuid4()), PROVIDER_DELAY_HEADER: str(SLOW_CHARGE)}
    with serve(create_app(database, store=store_url)) as base_url:
        responses = burst(base_url, body, headers, DUPLICATES)
        with httpx.Client(base_url=base_url, trust_env=False) as client:
            retry = client.post("/payments", json=body, headers=headers)
    # One executes; each other duplicate gets 409 (in practice all of them)
    # or, if it came after the first finished, the replay.
    firsts = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(firsts) == 1
    winner = firsts[0]
    others = [r for r in responses if r is not winner]
    assert all(
        r.status_code == 409 or (r.headers.get("idempotent-replayed") == "true" and r.content == winner.content)
        for r in others
    )
    assert all("retry-after" in r.headers for r in others if r.status_code == 409)
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == winner.content
    ledger = read_ledger(database)
    assert ledger.charges_by_order == {"order-1": 1}
    assert (ledger.payments, ledger.handler_executions) == (1, 1)
