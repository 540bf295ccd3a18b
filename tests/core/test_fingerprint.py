"""Request fingerprints (draft section 2.4; RFC 8785; shared/cases B07)."""

from __future__ import annotations

import pytest

from idempo import fingerprint
from idempo._core.fingerprint import canonical_body, canonical_query, is_json_media_type

JSON = "application/json"


def fp(body: bytes, content_type: str | None = JSON, query: bytes = b"", **kwargs: object) -> str:
    return fingerprint("POST", "/orders", query, content_type, body, **kwargs)  # type: ignore[arg-type]


def test_fingerprint_is_sha256_hex() -> None:
    """64 lower-case hex characters."""
    value = fp(b"{}")
    assert len(value) == 64
    assert value == value.lower()
    int(value, 16)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b'{"sku":"A","qty":1}', b'{ "qty": 1,  "sku": "A" }'),
        (b'{"a":{"y":1,"x":2},"l":[1,2]}', b'{"l":[1,2],"a":{"x":2,"y":1}}'),
        (b'{"e":"\\u00e9"}', '{"e":"é"}'.encode()),
        (b'{"n":1}', b'{"n":1.0}'),
        (b'{"n":1e2}', b'{"n":100}'),
    ],
)
def test_equivalent_json_has_one_fingerprint(a: bytes, b: bytes) -> None:
    """B07: RFC 8785 makes key order, whitespace, escapes and number spelling irrelevant."""
    assert fp(a) == fp(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b'{"qty":1}', b'{"qty":"1"}'),
        (b'{"l":[1,2]}', b'{"l":[2,1]}'),
        (b'{"qty":1}', b'{"qty":2}'),
        (b"null", b"0"),
    ],
)
def test_different_json_differs(a: bytes, b: bytes) -> None:
    """B07: value, value type and array order matter."""
    assert fp(a) != fp(b)


def test_structured_json_media_types_are_canonicalised() -> None:
    """application/*+json (RFC 6839) and a charset parameter still count as JSON."""
    assert fp(b'{"a":1,"b":2}', "application/merge-patch+json") == fp(b'{"b":2,"a":1}', "application/merge-patch+json")
    assert is_json_media_type(b"application/json;charset=utf-8")
    assert not is_json_media_type(b"text/json-ish")


def test_unparseable_or_unrepresentable_json_is_hashed_raw() -> None:
    """Invalid JSON, NaN and integers beyond I-JSON are fingerprinted as raw bytes, never an error."""
    for body in (b"{not json", b'{"n": NaN}', b'{"n": 123456789012345678901234567890}', b"\xff\xfe"):
        assert canonical_body(b"application/json", body) == b"r:" + body
        assert fp(body) == fp(body)
    assert fp(b"{not json") != fp(b"{not  json")


def test_raw_bytes_cannot_collide_with_canonical_json() -> None:
    """A raw body equal to another body's canonical form still differs (the j:/r: prefix)."""
    assert fp(b'{"a":1}', "application/octet-stream") != fp(b'{"a":1}', JSON)


def test_method_path_query_and_content_type_are_covered() -> None:
    """Each part of the request changes the fingerprint."""
    base = fingerprint("POST", "/orders", b"", JSON, b"{}")
    assert fingerprint("PATCH", "/orders", b"", JSON, b"{}") != base
    assert fingerprint("POST", "/orderz", b"", JSON, b"{}") != base
    assert fingerprint("POST", "/orders", b"a=1", JSON, b"{}") != base
    assert fingerprint("POST", "/orders", b"", "text/plain", b"{}") != base


def test_canonical_query_sorts_by_name_and_keeps_repeats_in_order() -> None:
    """b=2&a=1 equals a=1&b=2; a=1&a=2 differs from a=2&a=1; str and bytes agree."""
    assert canonical_query(b"b=2&a=1") == canonical_query(b"a=1&b=2")
    assert canonical_query(b"a=1&a=2") != canonical_query(b"a=2&a=1")
    assert canonical_query("b=2&a=1") == canonical_query(b"a=1&b=2")
    assert canonical_query(b"") == b""


def test_content_type_is_normalised() -> None:
    """Case and spaces around parameters do not matter."""
    assert fp(b"x", "Text/Plain; Charset=UTF-8") == fp(b"x", "text/plain;charset=utf-8")


def test_canonical_json_off_compares_bytes() -> None:
    """canonical_json=False hashes JSON bodies as they are."""
    assert fp(b'{"a":1,"b":2}', canonical_json=False) != fp(b'{"b":2,"a":1}', canonical_json=False)
