"""The policy: defaults, validation and verdicts (DESIGN outcome policy; shared/cases B03, B06)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from idempo import DEFAULT_METHODS, ConfigurationError, Policy, Verdict


def test_defaults_follow_the_design() -> None:
    """24 h record TTL, 30 s lease, POST and PATCH, key optional, 409 at once, fail closed."""
    policy = Policy()
    assert policy.record_ttl == 86400.0
    assert policy.record_ttl_ms == 86_400_000
    assert policy.lease_ttl_ms == 30_000
    assert policy.hold_ttl == policy.record_ttl
    assert policy.methods == DEFAULT_METHODS == frozenset({"POST", "PATCH"})
    assert policy.require_key is False
    assert policy.wait == 0.0
    assert policy.fail_open is False


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.STORE),
        (201, Verdict.STORE),
        (204, Verdict.STORE),
        (302, Verdict.STORE),
        (400, Verdict.STORE),
        (404, Verdict.STORE),
        (422, Verdict.STORE),
        (408, Verdict.RELEASE),
        (409, Verdict.RELEASE),
        (425, Verdict.RELEASE),
        (429, Verdict.RELEASE),
        (500, Verdict.RELEASE),
        (502, Verdict.RELEASE),
        (503, Verdict.RELEASE),
        (504, Verdict.RELEASE),
    ],
)
def test_default_verdicts(status: int, verdict: Verdict) -> None:
    """Store 2xx-4xx except 408, 409, 425, 429; release 5xx (B06)."""
    assert Policy().verdict_for_status(status) is verdict


def test_status_and_exception_overrides() -> None:
    """status_verdicts override per status; exception_verdicts match along the MRO; default RELEASE."""
    policy = Policy(
        status_verdicts={404: Verdict.RELEASE, 504: Verdict.HOLD},
        exception_verdicts={TimeoutError: Verdict.HOLD, LookupError: Verdict.STORE},
    )
    assert policy.verdict_for_status(404) is Verdict.RELEASE
    assert policy.verdict_for_status(504) is Verdict.HOLD
    assert policy.verdict_for_status(201) is Verdict.STORE
    assert policy.verdict_for_exception(TimeoutError()) is Verdict.HOLD
    assert policy.verdict_for_exception(KeyError("x")) is Verdict.STORE  # KeyError -> LookupError
    assert policy.verdict_for_exception(ValueError()) is Verdict.RELEASE


@pytest.mark.parametrize("lease", [0, -1, 0.0, timedelta(0), float("nan")])
def test_lease_of_zero_or_less_is_refused(lease: object) -> None:
    """B03(b): a lease of 0 (or negative, or NaN) is refused at construction: never a record without a lease."""
    with pytest.raises(ConfigurationError, match="lease_ttl"):
        Policy(lease_ttl=lease)  # type: ignore[arg-type]


def test_tiny_lease_still_gives_a_finite_positive_lease() -> None:
    """B03(b): a lease below a millisecond still gives a 1 ms lease, never 0."""
    assert Policy(lease_ttl=0.0001).lease_ttl_ms == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"record_ttl": 0},
        {"hold_ttl": -5},
        {"wait": -1},
        {"retry_after": -1},
        {"max_request_body": -1},
        {"methods": "POST"},
    ],
)
def test_bad_values_are_refused(kwargs: dict[str, object]) -> None:
    """Invalid settings raise ConfigurationError when the Policy is built, never per request."""
    with pytest.raises(ConfigurationError):
        Policy(**kwargs)  # type: ignore[arg-type]


def test_timedeltas_are_accepted() -> None:
    """TTLs and wait accept timedelta as well as seconds."""
    policy = Policy(record_ttl=timedelta(hours=1), lease_ttl=timedelta(seconds=5), wait=timedelta(seconds=2))
    assert policy.record_ttl == 3600.0
    assert policy.lease_ttl_ms == 5000
    assert policy.wait == 2.0


def test_policy_is_immutable_and_replace_derives() -> None:
    """Attributes cannot be set; replace() returns a changed copy and leaves the original."""
    policy = Policy()
    with pytest.raises(AttributeError):
        policy.require_key = True  # type: ignore[misc]
    strict = policy.replace(require_key=True)
    assert strict.require_key is True
    assert policy.require_key is False
    assert strict == Policy(require_key=True)
    assert strict != policy
    assert hash(strict) == hash(Policy(require_key=True))
    assert "require_key=True" in repr(strict)


def test_methods_are_upper_cased() -> None:
    """Method names are compared upper-case."""
    assert Policy(methods=["post", "Put"]).methods == frozenset({"POST", "PUT"})


def test_stored_headers() -> None:
    """Hop-by-hop, Date, Set-Cookie and per-exchange headers are not stored; others are."""
    policy = Policy()
    for name in (
        "connection",
        "transfer-encoding",
        "date",
        "set-cookie",
        "x-request-id",
        "x-ratelimit-limit",
        "ratelimit-policy",
        "www-authenticate",
        "retry-after",
    ):
        assert not policy.stores_header(name), name
    for name in ("location", "etag", "content-type", "link", "cache-control"):
        assert policy.stores_header(name), name
    assert Policy(store_set_cookie=True).stores_header("set-cookie")
    assert not Policy(excluded_headers={"etag"}).stores_header("etag")


def test_stored_name_lowercases_stored_headers_and_drops_the_others() -> None:
    """stored_name: the lower-case name of a stored response header; None for excluded ones, in any case."""
    policy = Policy()
    for _ in range(2):  # the second time from the memo
        assert policy.stored_name(b"Content-Type") == b"content-type"
        assert policy.stored_name(b"content-type") == b"content-type"
        assert policy.stored_name(b"Set-Cookie") is None
        assert policy.stored_name(b"X-RateLimit-Remaining") is None
    assert policy.stored_name(b"content-type") == b"content-type"
    assert policy.stored_name(b"date") is None
    assert Policy(store_set_cookie=True).stored_name(b"Set-Cookie") == b"set-cookie"
