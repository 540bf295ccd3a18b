"""HTTP behaviour: the default principal tells users apart by their credentials (issue 11; DESIGN guarantee 4).

Every test runs on the five frameworks under the default configuration (no
``principal=``): the clients share one address (127.0.0.1), so only the
credentials tell them apart.
"""

from __future__ import annotations

import httpx
import pytest

from tests.adapters.conftest import B_PRIME, JSON, K1, B, ServeFactory, Served


@pytest.mark.parametrize("cookie", ["sessionid", "session"])
def test_two_users_with_session_cookies_behind_one_address_both_execute(serve: ServeFactory, cookie: str) -> None:
    """B11: Alice and Bob log in with a cookie, same key and body, one address: each runs, each gets her own."""
    s = serve()
    alice = s.post(headers={"cookie": f"{cookie}=alice-session"})
    bob = s.post(headers={"cookie": f"{cookie}=bob-session"})
    assert alice.status_code == bob.status_code == 201
    assert alice.json() == {"order_id": 1}
    assert bob.json() == {"order_id": 2}
    assert "idempotent-replayed" not in bob.headers
    assert s.orders.calls == 2
    # Each one's retry replays her own answer; Bob's other body is his own mismatch.
    alice_again = s.post(headers={"cookie": f"{cookie}=alice-session"})
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert alice_again.json() == {"order_id": 1}
    assert s.post(headers={"cookie": f"{cookie}=bob-session"}).json() == {"order_id": 2}
    assert s.post(headers={"cookie": f"{cookie}=bob-session"}, body=B_PRIME).status_code == 422
    assert s.orders.calls == 2


def test_placeholder_authorization_with_different_session_cookies_both_execute(serve: ServeFactory) -> None:
    """Two users who both send ``Authorization: Bearer null`` and their own session cookie are two principals."""
    s = serve()
    first = s.post(headers={"authorization": "Bearer null", "cookie": "sessionid=one"})
    second = s.post(headers={"authorization": "Bearer null", "cookie": "sessionid=two"})
    assert first.json() == {"order_id": 1, "owner": "null"}
    assert second.json() == {"order_id": 2, "owner": "null"}
    assert s.orders.calls == 2


def test_other_cookies_do_not_make_a_retry_a_new_principal(serve: ServeFactory) -> None:
    """A retry whose analytics or CSRF cookie changed is still the same caller: it replays."""
    s = serve()
    s.post(headers={"cookie": "sessionid=s1; _ga=GA1.1; csrftoken=a"})
    retry = s.post(headers={"cookie": "csrftoken=b; sessionid=s1; _ga=GA1.2"})
    assert retry.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


def test_auth_scheme_case_does_not_make_a_new_principal(serve: ServeFactory) -> None:
    """``bearer T`` then ``Bearer T`` (RFC 9110 section 11.1: the scheme is case-insensitive): one execution."""
    s = serve()
    assert s.post(headers={"authorization": "bearer T"}).status_code == 201
    retry = s.post(headers={"authorization": "Bearer T"})
    assert retry.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


@pytest.mark.parametrize("status", [401, 403])
def test_authentication_and_permission_failures_release_the_key(serve: ServeFactory, status: int) -> None:
    """DESIGN outcome defaults: a 401/403 is not stored; the retry after login or a grant executes and is stored."""
    s = serve()
    refused = s.post(headers={"x-test-status": str(status)})
    assert refused.status_code == status
    assert s.record() is None
    granted = s.post()
    assert granted.status_code == 201
    assert "idempotent-replayed" not in granted.headers
    assert s.orders.calls == 2
    assert s.post().headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 2


def test_two_api_clients_behind_one_address_both_execute(serve: ServeFactory) -> None:
    """Review r01: X-API-Key (FastAPI's APIKeyHeader) is a credential: Bob never gets Alice's answer."""
    s = serve()
    alice = s.post(headers={"x-api-key": "key-alice-7f3a"})
    bob = s.post(headers={"x-api-key": "key-bob-19c2"})
    assert alice.json() == {"order_id": 1}
    assert bob.json() == {"order_id": 2}
    assert "idempotent-replayed" not in bob.headers
    again = s.post(headers={"x-api-key": "key-alice-7f3a"})
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == {"order_id": 1}
    assert s.orders.calls == 2


def post_from(s: Served, address: str, headers: dict[str, str]) -> httpx.Response:
    """The contract's request sent from another loopback address (the server sees it as the client's)."""
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, base_url=s.url, timeout=10) as client:
        return client.post("/orders", content=B, headers={**JSON, "Idempotency-Key": K1, **headers})


def test_a_placeholder_bearer_never_joins_callers_across_addresses(serve: ServeFactory) -> None:
    """Review r01: Alice and Bob both send ``Bearer null`` (a logged-out SPA) and their API keys, from two addresses."""
    s = serve()
    alice = post_from(s, "127.0.0.1", {"authorization": "Bearer null", "x-api-key": "key-alice-7f3a"})
    bob = post_from(s, "127.0.0.2", {"authorization": "Bearer null", "x-api-key": "key-bob-19c2"})
    assert alice.json() == {"order_id": 1, "owner": "null"}
    assert bob.json() == {"order_id": 2, "owner": "null"}
    # Without any other credential, a placeholder is no identity: each address is its own principal.
    anonymous = post_from(s, "127.0.0.2", {"authorization": "Bearer null"})
    assert anonymous.json() == {"order_id": 3, "owner": "null"}
    assert s.record(principal="addr:127.0.0.2") is not None
    assert s.orders.calls == 3


@pytest.mark.parametrize("cookie", ["token", "access-token", "koa.sess"])
def test_token_cookies_tell_users_apart(serve: ServeFactory, cookie: str) -> None:
    """Litestar's JWT cookie ``token``, fastapi-login's ``access-token``, Koa's ``koa.sess`` are credentials."""
    s = serve()
    assert s.post(headers={"cookie": f"{cookie}=alice"}).json() == {"order_id": 1}
    bob = s.post(headers={"cookie": f"{cookie}=bob"})
    assert bob.json() == {"order_id": 2}
    assert "idempotent-replayed" not in bob.headers


def test_a_renewed_csrf_token_does_not_make_a_retry_a_new_principal(serve: ServeFactory) -> None:
    """A page that renews its CSRF header and cookie between a request and its retry: still one caller, one run."""
    s = serve()
    s.post(headers={"x-api-key": "k", "x-csrftoken": "one", "cookie": "csrftoken=one"})
    retry = s.post(headers={"x-api-key": "k", "x-csrftoken": "two", "cookie": "csrftoken=two"})
    assert retry.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1
