"""HTTP behaviour: keys are scoped to the principal (DESIGN guarantee 4; shared/cases B10, B11)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx

from tests.adapters.conftest import B_PRIME, JSON, K1, K2, B, ServeFactory, header_of
from tests.support.clock import FakeClock


def test_same_key_from_two_principals_executes_twice_and_never_crosses(serve: ServeFactory) -> None:
    """B11 (1-3): A and B send K1: each runs once, each gets its own answer, B's mismatch stays B's."""
    s = serve()
    a = s.post(headers={"authorization": "Bearer A"})
    b = s.post(headers={"authorization": "Bearer B"})
    assert a.json() == {"order_id": 1, "owner": "A"}
    assert b.json() == {"order_id": 2, "owner": "B"}
    assert s.post(headers={"authorization": "Bearer B"}, body=B_PRIME).status_code == 422
    a_again = s.post(headers={"authorization": "Bearer A"})
    assert a_again.headers["idempotent-replayed"] == "true"
    assert a_again.json() == {"order_id": 1, "owner": "A"}
    b_again = s.post(headers={"authorization": "Bearer B"})
    assert b_again.json() == {"order_id": 2, "owner": "B"}
    assert s.orders.calls == 2


def test_pre_registered_key_does_not_block_another_principal(serve: ServeFactory) -> None:
    """B11 (4): B uses K2 first (even while still running); A's request with K2 executes normally."""
    s = serve()
    s.post(key=K2, headers={"authorization": "Bearer B"}, body=B_PRIME)
    answer = s.post(key=K2, headers={"authorization": "Bearer A"})
    assert answer.status_code == 201
    assert answer.json() == {"order_id": 2, "owner": "A"}
    assert "idempotent-replayed" not in answer.headers


def test_anonymous_callers_are_scoped_by_address(serve: ServeFactory) -> None:
    """B11 (5): two anonymous callers (different addresses) with one key never get each other's answer."""
    s = serve()
    mine = s.post()
    other = httpx.Client(base_url=s.url, transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10)
    with other:
        theirs = other.post("/orders", content=B, headers={**JSON, "Idempotency-Key": K1})
        theirs_with_other_body = other.post("/orders", content=B_PRIME, headers={**JSON, "Idempotency-Key": K1})
    assert mine.json() == {"order_id": 1}
    assert theirs.json() == {"order_id": 2}
    assert "idempotent-replayed" not in theirs.headers
    assert theirs_with_other_body.status_code == 422
    assert s.orders.calls == 2


def test_principal_resolver_returning_none_is_400(serve: ServeFactory) -> None:
    """B11 (5): a resolver that finds no identity gets an explicit 400, never a shared anonymous bucket."""
    s = serve(principal=lambda scope: None)
    answer = s.post()
    assert answer.status_code == 400
    assert answer.json()["type"] == "https://idempo.dev/problems/principal-required"
    assert s.orders.calls == 0


def test_custom_principal_resolver_scopes_keys(serve: ServeFactory) -> None:
    """A resolver reading a tenant header makes the key unique per tenant."""

    def tenant(request: object) -> str | None:
        # An ASGI scope, a WSGI environ or a Django HttpRequest, as each adapter passes it.
        value = header_of(request, "x-tenant")
        return None if value is None else "tenant:" + value

    s = serve(principal=tenant)
    assert s.post(headers={"x-tenant": "t1"}).json() == {"order_id": 1}
    assert s.post(headers={"x-tenant": "t2"}).json() == {"order_id": 2}
    assert s.post(headers={"x-tenant": "t1"}).headers["idempotent-replayed"] == "true"


def test_fresh_app_instance_replays_from_the_store(serve: ServeFactory, tmp_path: Path) -> None:
    """B10: instance B, with its own store object on the same SQLite file, replays A's record; B' is 422."""
    clock = FakeClock()
    path = tmp_path / "idempo.db"
    a = serve(store=serve.sqlite_store(path, clock), clock=clock)
    b = serve(store=serve.sqlite_store(path, clock), clock=clock)
    first = a.post()
    replay = b.post()
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert b.post(body=B_PRIME).status_code == 422
    assert a.orders.calls == 1
    assert b.orders.calls == 0

    # The raw row keeps every field after completion.
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT state, fingerprint, token, created_at, expires_at, status, headers, body FROM idempo_records"
            " WHERE record_key <> 'idempo:secret'"
        ).fetchone()
    state, fingerprint, token, created_at, expires_at, status, headers, body = row
    assert state == "completed"
    assert len(fingerprint) == 64
    assert token >= 1
    assert expires_at == int(clock() * 1000) + 86_400_000
    assert created_at <= expires_at
    assert status == 201
    assert '"location"' in headers
    assert body == first.content
