"""The client's retry policy on its own: no I/O."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta

import pytest

from idempo import ConfigurationError, InvalidKey
from idempo._core.keys import format_key, parse_key_value
from idempo.client._retry import RetryPolicy, parse_retry_after, resolve_key

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        (" 0 ", 0.0),
        ("1.5", 1.5),
        ("-4", 0.0),
        ("Thu, 01 Jan 2026 12:00:30 GMT", 30.0),
        ("Thu, 01 Jan 2026 11:00:00 GMT", 0.0),
        ("soon", None),
        ("nan", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Retry-After is read as delay-seconds or an HTTP-date (RFC 9110 section 10.2.3); junk gives None."""
    assert parse_retry_after(value, now=NOW) == expected


def test_policy_defaults_follow_the_rules() -> None:
    """Defaults: keys for POST/PATCH; 409 only under a key; 500 retried; 400/422 never; GET retried by method."""
    policy = RetryPolicy()
    assert policy.key_methods == {"POST", "PATCH"}
    assert policy.retry_status(409, keyed=True)
    assert not policy.retry_status(409, keyed=False)
    assert policy.retry_status(503, keyed=False)
    assert not policy.retry_status(400, keyed=True)
    assert not policy.retry_status(422, keyed=True)
    assert policy.retry_status(500, keyed=True)  # issue 17: the server released the key
    assert policy.retry_status(
        500, keyed=False
    )  # only ever asked for a retryable request (a key or an idempotent method)
    assert not policy.retry_status(501, keyed=True)
    assert policy.retry_statuses == {409, 429, 500, 502, 503, 504}
    assert not RetryPolicy(retry_statuses=policy.retry_statuses - {500}).retry_status(500, keyed=True)
    assert policy.retryable("GET", keyed=False)
    assert not policy.retryable("POST", keyed=False)
    assert policy.retryable("POST", keyed=True)
    assert not RetryPolicy(attempts=1).retryable("POST", keyed=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"attempts": True},
        {"timeout": 0},
        {"wait_initial": -1},
        {"retry_statuses": {503, 422}},
        {"retry_statuses": {400}},
        {"key_methods": "POST"},
        {"key_header": ""},
    ],
)
def test_policy_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    """A policy that cannot work is refused at construction with ConfigurationError."""
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_immutable_comparable_and_picklable() -> None:
    """RetryPolicy takes timedeltas, refuses assignment, compares by value and survives pickling."""
    policy = RetryPolicy(timeout=timedelta(seconds=5), key_methods=["post"])
    assert policy.timeout == 5.0
    assert policy.key_methods == {"POST"}
    with pytest.raises(AttributeError):
        policy.attempts = 3
    assert policy.replace(attempts=3).attempts == 3
    assert pickle.loads(pickle.dumps(policy)) == policy
    assert "timeout=5.0" in repr(policy)


def test_resolve_key_generates_for_post_only() -> None:
    """A POST without a key gets the factory's key and a header to add; a GET gets none."""
    policy = RetryPolicy()
    assert resolve_key(policy, "POST", [], None, lambda: "gen") == ("gen", "gen")
    assert resolve_key(policy, "get", [], None, lambda: "gen") == (None, None)


def test_resolve_key_keeps_the_callers_header() -> None:
    """B19(b): a key already in the headers is used and nothing is added; a matching argument is fine."""
    policy = RetryPolicy()
    assert resolve_key(policy, "POST", ["K1"], None, lambda: "gen") == ("K1", None)
    assert resolve_key(policy, "POST", ['"K1"'], "K1", lambda: "gen") == ("K1", None)
    assert resolve_key(policy, "GET", ["K1"], None, lambda: "gen") == ("K1", None)


def test_resolve_key_refuses_two_different_keys() -> None:
    """B19(b): a key given both ways with different values is an InvalidKey before sending."""
    with pytest.raises(InvalidKey, match="K2"):
        resolve_key(RetryPolicy(), "POST", ["K1"], "K2", lambda: "gen")
    with pytest.raises(InvalidKey):
        resolve_key(RetryPolicy(), "POST", ["K1", "K2"], None, lambda: "gen")


def test_resolve_key_validates_generated_keys() -> None:
    """A key factory returning something that is not a key fails before sending; odd keys are quoted."""
    with pytest.raises(InvalidKey):
        resolve_key(RetryPolicy(), "POST", [], None, lambda: "")
    with pytest.raises(InvalidKey):
        resolve_key(RetryPolicy(), "POST", [], None, lambda: "é")
    assert resolve_key(RetryPolicy(), "POST", [], None, lambda: "order 42") == ("order 42", '"order 42"')


@pytest.mark.parametrize("key", ["abc", "8e03978e-40d5-43e8-bc93-6894a57f9324", "order 42", 'say "hi"', "a\\b", " x"])
def test_format_key_round_trips(key: str) -> None:
    """format_key gives a header value that parse_key_value reads back as the same key."""
    assert parse_key_value(format_key(key).encode("ascii")) == key
