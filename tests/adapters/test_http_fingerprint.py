"""HTTP behaviour: what counts as the same request (shared/cases B07) and record expiry (B16)."""

from __future__ import annotations

import pytest

from idempo import Policy
from tests.adapters.conftest import B_PRIME, ServeFactory


@pytest.mark.parametrize(
    ("first", "retry"),
    [
        (b'{"sku":"A","qty":1}', b'{ "qty": 1,  "sku": "A" }'),
        (b'{"a":{"y":1,"x":2},"l":[1,2]}', b'{"l":[1,2],"a":{"x":2,"y":1}}'),
        (b'{"name":"\\u00e9"}', '{"name":"é"}'.encode()),
        (b'{"qty":1}', b'{"qty":1.0}'),
    ],
    ids=["key-order-and-whitespace", "nested", "unicode-escape", "number-1-vs-1.0"],
)
def test_equivalent_json_is_the_same_request(serve: ServeFactory, first: bytes, retry: bytes) -> None:
    """B07: JSON that differs only in key order, whitespace, escapes or 1 vs 1.0 (RFC 8785) replays."""
    s = serve()
    original = s.post(body=first)
    replay = s.post(body=retry)
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == original.content
    assert s.orders.calls == 1


@pytest.mark.parametrize(
    ("first", "retry"),
    [
        (b'{"sku":"A","qty":1}', b'{"sku":"A","qty":"1"}'),
        (b'{"a":{"y":1,"x":2},"l":[1,2]}', b'{"a":{"y":1,"x":2},"l":[2,1]}'),
        (b'{"sku":"A","qty":1}', B_PRIME),
    ],
    ids=["value-type", "array-order", "value"],
)
def test_different_json_is_a_mismatch(serve: ServeFactory, first: bytes, retry: bytes) -> None:
    """B07: a different value, value type or array order with the same key is 422 problem+json."""
    s = serve()
    s.post(body=first)
    mismatch = s.post(body=retry)
    assert mismatch.status_code == 422
    assert mismatch.headers["content-type"] == "application/problem+json"
    assert mismatch.json()["type"] == "https://idempo.dev/problems/fingerprint-mismatch"
    assert s.orders.calls == 1


def test_invalid_json_labelled_json_is_hashed_raw(serve: ServeFactory) -> None:
    """B07: a body labelled JSON that does not parse is fingerprinted as raw bytes: no 500; same bytes replay."""
    s = serve()
    assert s.post(body=b"{not json").status_code == 201
    assert s.post(body=b"{not json").headers["idempotent-replayed"] == "true"
    assert s.post(body=b"{not  json").status_code == 422
    assert s.orders.calls == 1


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "application/octet-stream"])
def test_non_json_bodies_compare_as_bytes(serve: ServeFactory, content_type: str) -> None:
    """B07: form and binary bodies compare byte for byte: different bytes are a mismatch."""
    s = serve()
    headers = {"content-type": content_type}
    assert s.post(body=b"a=1&b=2", headers=headers).status_code == 201
    assert s.post(body=b"a=1&b=2", headers=headers).headers["idempotent-replayed"] == "true"
    assert s.post(body=b"b=2&a=1", headers=headers).status_code == 422
    assert s.orders.calls == 1


def test_query_parameter_order_does_not_matter_but_values_do(serve: ServeFactory) -> None:
    """The canonical query sorts parameters by name: reordering replays, another value is 422."""
    s = serve()
    s.post(path="/orders?a=1&b=2")
    assert s.post(path="/orders?b=2&a=1").headers["idempotent-replayed"] == "true"
    assert s.post(path="/orders?a=1&b=3").status_code == 422
    assert s.orders.calls == 1


def test_content_type_is_part_of_the_request(serve: ServeFactory) -> None:
    """The same bytes sent as another media type are a different request (422)."""
    s = serve()
    s.post()
    assert s.post(headers={"content-type": "text/plain"}).status_code == 422


def test_canonical_json_can_be_turned_off(serve: ServeFactory) -> None:
    """Policy(canonical_json=False) compares JSON bodies byte for byte."""
    s = serve(policy=Policy(canonical_json=False))
    s.post(body=b'{"sku":"A","qty":1}')
    assert s.post(body=b'{"qty":1,"sku":"A"}').status_code == 422


def test_expired_record_is_treated_as_new(serve: ServeFactory) -> None:
    """B16: replay until the TTL; after it the key is new (it executes, even with another body), then replays anew."""
    s = serve(policy=Policy(record_ttl=60))
    assert s.post().json() == {"order_id": 1}
    s.clock.advance(59)
    assert s.post().headers["idempotent-replayed"] == "true"
    s.clock.advance(2)  # t = 61 s: the record is still in the store, but expired
    fresh = s.post()
    assert fresh.status_code == 201
    assert "idempotent-replayed" not in fresh.headers
    assert fresh.json() == {"order_id": 2}
    assert s.post().json() == {"order_id": 2}
    s.clock.advance(61)
    other_body = s.post(body=B_PRIME)
    assert other_body.status_code == 201
    assert other_body.json() == {"order_id": 3}
    assert s.orders.calls == 3
