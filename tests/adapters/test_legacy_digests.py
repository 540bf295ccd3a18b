"""Records of versions before keyed digests, during the legacy window (issue 11 item 3; docs/operating.md).

``idempo migrate --legacy-digests`` opens the window; while it is open, a
request that finds no record of its own also looks where the older version
kept its record (plain SHA-256 record key and fingerprint): a retry of a
request answered before the upgrade replays, or gets the 422 or 409 it got
then. Without the window such records are treated as absent: never a 422.
Every test runs on the five frameworks.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from idempo import Acquired, StoredResponse
from idempo._core.digests import legacy_record_key
from idempo._core.fingerprint import legacy_fingerprint
from idempo.secrets import LEGACY_RECORD_KEY, open_legacy_window
from tests.adapters.conftest import B_PRIME, K1, LOCAL, B, ServeFactory
from tests.support.clock import FakeClock

OLD_ANSWER = StoredResponse(
    201, ((b"content-type", b"application/json"), (b"location", b"/orders/41")), b'{"order_id":41}'
)
DAY_MS = 86_400_000


def blocking(store: Any) -> Any:
    """The blocking store behind a framework's store (the async memory store wraps one)."""
    return getattr(store, "sync", store)


def legacy_record(store: Any, body: bytes = B, *, completed: bool = True, principal: str = LOCAL) -> str:
    """Write the record the older version kept for POST /orders K1 with ``body``; return its record key."""
    record_key = legacy_record_key(principal, "POST", "/orders", K1)
    fingerprint = legacy_fingerprint("POST", "/orders", b"", b"application/json", body, canonical_json=True)
    began = blocking(store).begin(record_key, fingerprint, 600_000)
    assert isinstance(began, Acquired)
    if completed:
        blocking(store).complete(record_key, began.token, OLD_ANSWER, DAY_MS)
    return record_key


@pytest.fixture
def window_store(serve: ServeFactory) -> Any:
    """A store whose legacy window is open (as ``idempo migrate --legacy-digests`` leaves it)."""
    store = serve.memory_store(FakeClock())
    open_legacy_window(blocking(store), 3600)
    return store


def test_a_retry_of_a_request_answered_before_the_upgrade_replays(serve: ServeFactory, window_store: Any) -> None:
    """The old record replays byte for byte, the handler does not run, and the answer moves to the new record."""
    legacy_record(window_store)
    s = serve(store=window_store)
    replay = s.post()
    assert replay.status_code == 201
    assert replay.content == OLD_ANSWER.body
    assert replay.headers["idempotent-replayed"] == "true"
    # Carried over to the new record key, so later retries find it there.
    record = s.record()
    assert record is not None
    assert record.response == OLD_ANSWER
    again = s.post()
    assert again.content == OLD_ANSWER.body
    assert again.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 0


def test_another_body_under_an_old_record_is_still_a_mismatch(serve: ServeFactory, window_store: Any) -> None:
    """The key was used with another request before the upgrade: 422, as then; the new key is released."""
    legacy_record(window_store, body=B_PRIME)
    s = serve(store=window_store)
    assert s.post().status_code == 422
    assert s.orders.calls == 0
    assert s.record() is None


def test_an_old_record_still_in_progress_is_a_conflict(serve: ServeFactory, window_store: Any) -> None:
    """A process of the older version still runs it (a rolling deploy): 409, never a second execution."""
    legacy_record(window_store, completed=False)
    s = serve(store=window_store)
    answer = s.post()
    assert answer.status_code == 409
    assert "retry-after" in answer.headers
    assert s.orders.calls == 0
    assert s.record() is None


def test_without_the_window_old_records_are_absent(serve: ServeFactory) -> None:
    """No legacy window: an old record is never found, so never a 422; the request executes."""
    s = serve()
    legacy_record(s.store, body=B_PRIME)
    answer = s.post()
    assert answer.status_code == 201
    assert "idempotent-replayed" not in answer.headers
    assert s.orders.calls == 1


def test_a_caller_with_a_session_cookie_never_gets_an_old_address_scoped_record(
    serve: ServeFactory, window_store: Any
) -> None:
    """The older version scoped cookie users by address: their old records may be another user's, so not looked up."""
    legacy_record(window_store)
    s = serve(store=window_store)
    answer = s.post(headers={"cookie": "sessionid=someone-else"})
    assert answer.status_code == 201
    assert answer.json() == {"order_id": 1}
    assert s.orders.calls == 1


def test_the_window_closes(serve: ServeFactory) -> None:
    """Opening the window again moves its end; the marker is idempo's own record, absent from stats."""
    store = serve.memory_store(FakeClock())
    first = open_legacy_window(blocking(store), 60)
    later = open_legacy_window(blocking(store), 3600)
    assert later > first
    assert blocking(store).get(LEGACY_RECORD_KEY) is not None
    assert blocking(store).stats().in_progress == 0


@pytest.mark.parametrize(
    "headers",
    [{"x-api-key": "key-bob"}, {"authorization": "Bearer null", "x-api-key": "key-bob"}, {"cookie": "token=bob"}],
    ids=["api key", "placeholder bearer and api key", "token cookie"],
)
def test_a_caller_with_a_credential_the_old_rule_ignored_never_gets_an_old_record(
    serve: ServeFactory, window_store: Any, headers: dict[str, str]
) -> None:
    """Review r19: the older version scoped API-key and token-cookie callers by address (or a shared placeholder)."""
    legacy_record(window_store)
    legacy_record(window_store, principal="cred:" + hashlib.sha256(b"Bearer null").hexdigest()[:32])
    s = serve(store=window_store)
    answer = s.post(headers=headers)
    assert answer.status_code == 201
    assert "idempotent-replayed" not in answer.headers
    assert s.orders.calls == 1


def test_a_bearer_token_finds_its_own_old_record(serve: ServeFactory, window_store: Any) -> None:
    """One bearer token and nothing else: the older version's digest of it is the same caller: its record replays."""
    legacy_record(window_store, principal="cred:" + hashlib.sha256(b"Bearer alice").hexdigest()[:32])
    s = serve(store=window_store)
    replay = s.post(headers={"authorization": "Bearer alice"})
    assert replay.content == OLD_ANSWER.body
    assert replay.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 0
