"""Request fingerprints (draft section 2.4; RFC 8785; shared/cases B07)."""

from __future__ import annotations

import json
import random

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from idempo import fingerprint
from idempo._core.fingerprint import canonical_json, canonical_query, is_json_media_type

JSON = "application/json"
SECRET = b"fingerprint test secret"


def fp(body: bytes, content_type: str | None = JSON, query: bytes = b"", **kwargs: object) -> str:
    return fingerprint("POST", "/orders", query, content_type, body, secret=SECRET, **kwargs)  # type: ignore[arg-type]


def test_fingerprint_is_sha256_hex() -> None:
    """64 lower-case hex characters (HMAC-SHA256)."""
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


def test_unparseable_json_is_hashed_raw() -> None:
    """Invalid JSON, NaN, Infinity and non-UTF-8 bytes are fingerprinted as raw bytes, never an error."""
    for body in (b"{not json", b'{"n": NaN}', b'{"n": -Infinity}', b"\xff\xfe", b"[" * 100_000):
        assert fp(body) == fp(body, canonical_json=False)  # the raw-bytes digest
        assert fp(body) == fp(body)
    assert fp(b"{not json") != fp(b"{not  json")


def test_large_integers_stay_exact() -> None:
    """Integers beyond 2**53 are kept exact, not rounded through a float."""
    assert fp(b'{"n": 123456789012345678901234567890}') == fp(b'{"n":123456789012345678901234567890}')
    assert fp(b'{"n": 123456789012345678901234567890}') != fp(b'{"n": 123456789012345678901234567891}')


def test_raw_bytes_cannot_collide_with_canonical_json() -> None:
    """A raw body equal to another body's canonical form still differs (the j:/r: prefix)."""
    assert fp(b'{"a":1}', "application/octet-stream") != fp(b'{"a":1}', JSON)


def test_method_path_query_and_content_type_are_covered() -> None:
    """Each part of the request changes the fingerprint."""
    base = fingerprint("POST", "/orders", b"", JSON, b"{}", secret=SECRET)
    assert fingerprint("PATCH", "/orders", b"", JSON, b"{}", secret=SECRET) != base
    assert fingerprint("POST", "/orderz", b"", JSON, b"{}", secret=SECRET) != base
    assert fingerprint("POST", "/orders", b"a=1", JSON, b"{}", secret=SECRET) != base
    assert fingerprint("POST", "/orders", b"", "text/plain", b"{}", secret=SECRET) != base


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


# --- the canonical form against RFC 8785 (the rfc8785 package as the reference) ---

# A small domain, so that equal values come up often: tiny alphabets, numbers
# that are integral floats, negative zero, halves.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=3)
    | st.sampled_from([0.0, -0.0, 1.0, 0.5, -2.5, 1e-7, 3.0, 1e15])
    | st.text(alphabet='ab\u00e9\u2028\U0001f600\n"\\', max_size=3)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet="abé", max_size=2), inner, max_size=3),
    max_leaves=8,
)


def _respell(value: object, rng: random.Random) -> object:
    """The same JSON value spelled differently: keys shuffled, integers as floats."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _respell(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_respell(v, rng) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.5:
        return float(value)
    return value


@settings(max_examples=300, deadline=None)
@given(_values, _values)
def test_canonical_form_has_the_equalities_of_rfc8785(a: object, b: object) -> None:
    """Two JSON values get one canonical form exactly when RFC 8785 gives them one form."""
    ours = canonical_json(json.dumps(a).encode()) == canonical_json(json.dumps(b).encode())
    reference = rfc8785.dumps(a) == rfc8785.dumps(b)
    assert ours == reference


@settings(max_examples=300, deadline=None)
@given(_values, st.randoms(use_true_random=False), st.booleans(), st.sampled_from([None, 2]))
def test_respelled_json_keeps_its_canonical_form(
    value: object, rng: random.Random, ascii_: bool, indent: int | None
) -> None:
    """Key order, whitespace, escapes and 1 vs 1.0 never change the canonical form."""
    original = json.dumps(value).encode()
    respelled = json.dumps(_respell(value, rng), ensure_ascii=ascii_, indent=indent).encode()
    assert canonical_json(respelled) == canonical_json(original)


@pytest.mark.parametrize(
    ("method", "path", "query", "content_type", "body", "canonical", "expected"),
    [
        (
            "POST",
            "/payments",
            b"",
            b"application/json",
            b'{"amount":1000,"currency":"EUR","customer":"cus_bench"}',
            True,
            "fdf93da41b8f109d97c3a8da1fe0764b2061951f28425b8ef8037ede5ba94063",
        ),
        (
            "POST",
            "/orders",
            b"b=2&a=1&a=0",
            b"Application/JSON; charset=UTF-8",
            b' {"z":[1,2.5,1e2,-0.0,1.0e-7],"a":{"y":null,"x":true}, "s":"\\u00e9\\ud800\\n"} ',
            True,
            "7aa98d00c61fe5f411a736b0020906370d6396bb3e4f64b580fb703a73c5b01f",
        ),
        (
            "PATCH",
            "/r\u00e9sum\u00e9",
            "q=%20x",
            "application/vnd.api+json",
            b'[{"b":1,"a":12345678901234567890123},false]',
            True,
            "3fa7b9b50244d0e9df94ca1fe8c71ea372809c5894ada302350211db57fe1f6b",
        ),
        (
            "POST",
            "/orders",
            b"",
            b"application/json",
            b'{"a":1',
            True,
            "61dd965d606bfdbab23ed4a7479865f3b9cc0430c523e0efaee39256c7fe97d6",
        ),
        (
            "POST",
            "/orders",
            b"",
            b"application/json",
            b'{"a":NaN}',
            True,
            "48965e90424863b4f525f866baa9b059cd59e4f84405e50f0daccb160823e96b",
        ),
        (
            "POST",
            "/orders",
            b"",
            b"text/plain",
            b'{"a":1}',
            True,
            "e5599964441b0667ab68331d00032c7546bc1f5ff576636efe08e0c9f2894354",
        ),
        ("POST", "/orders", b"", None, b"", True, "cf6e938c113792a9c19f399dcff149cff326a86c04546a77578e6d7d3f28899b"),
        (
            "POST",
            "/orders",
            b"",
            b"application/json",
            b'{"b":1, "a":2}',
            False,
            "977d38487db0f1799a8bb27b8ca284a94537cf0212f30be9952b7d688fbf0b35",
        ),
    ],
)
def test_fingerprints_are_stable_across_versions(
    method: str, path: str, query: bytes, content_type: bytes | None, body: bytes, canonical: bool, expected: str
) -> None:
    """Under one secret these digests never change, so stored records keep matching (a faster path must agree)."""
    for _ in range(2):  # the second call goes through the cached request head
        assert fingerprint(method, path, query, content_type, body, secret=SECRET, canonical_json=canonical) == expected


def test_canonical_form_ignores_surrounding_json_whitespace_only() -> None:
    """Whitespace RFC 8259 allows around the value is ignored; trailing data makes the body raw."""
    assert canonical_json(b' \t\r\n{"a":1} \n') == b'{"a":1}'
    for bad in (b'{"a":1} x', b"", b"   ", b'{"a":1}{}', b"\xff"):
        with pytest.raises(ValueError, match=r".+"):
            canonical_json(bad)
