"""Request fingerprints (draft section 2.4; RFC 8785; shared/cases B07)."""

from __future__ import annotations

import json
import random
from decimal import Decimal

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from idempo import fingerprint
from idempo._core.fingerprint import canonical_json, canonical_query, is_json_media_type, legacy_fingerprint

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


def test_multipart_boundary_keeps_its_case() -> None:
    """A boundary is case-sensitive (RFC 2046 section 5.1.1): boundary=abc and boundary=AbC are two requests."""
    body = b"--AbC\r\n\r\nx\r\n--AbC--\r\n"
    assert fp(body, "multipart/form-data; boundary=abc") != fp(body, "multipart/form-data; boundary=AbC")
    assert fp(body, "multipart/form-data; boundary=AbC") == fp(body, 'Multipart/Form-Data;BOUNDARY="AbC"')


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("text/plain; a=B", "text/plain; a=b"),  # a value keeps its case (only charset's is folded)
        ('text/plain; a="x;b=y"', 'text/plain; a="x; b=y"'),  # inside quotes, every byte counts
        ('text/plain; a="x;b=y"', "text/plain; a=x; b=y"),  # one quoted parameter is not two
        ("text/plain; a=1; b=2", "text/plain; b=2; a=1"),  # parameter order is kept
        ("text/plain; charset", "text/plain; Charset"),  # not a media type: compared as sent
    ],
)
def test_media_types_that_can_differ_differ(a: str, b: str) -> None:
    """Parameter values other than charset, quoted bytes and parameter order are part of the request."""
    assert fp(b"x", a) != fp(b"x", b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ('text/plain; charset="UTF-8"', "text/plain;charset=utf-8"),
        ("text/plain;", "text/plain"),
        ("text/plain ;; a=1 ", "text/plain;a=1"),
        ('text/plain; a="x\\"y"', 'text/plain; a="x\\"y"'),
        ('text/plain; a="b"', "text/plain; a=b"),
    ],
)
def test_media_types_that_mean_the_same_are_equal(a: str, b: str) -> None:
    """Quoting a token, empty parameters, spaces and the charset's case do not matter (RFC 9110 8.3.1, 5.6.6)."""
    assert fp(b"x", a) == fp(b"x", b)


def test_query_bytes_that_are_not_utf8_differ() -> None:
    """?sig=%FF and ?sig=%FE are two requests (not one U+FFFD), on ASGI bytes and WSGI latin-1 text alike."""
    assert canonical_query(b"sig=%FF") != canonical_query(b"sig=%FE")
    assert canonical_query("sig=%FF") == canonical_query(b"sig=%FF")
    assert fp(b"{}", query=b"sig=%FF") != fp(b"{}", query=b"sig=%FE")
    assert canonical_query(b"a=%C3%A9") == canonical_query(b"a=%c3%a9") == b"a=%C3%A9"
    assert canonical_query("x=\ud800") != canonical_query("x=\ud801")  # never an error, even for a stray surrogate


def test_path_bytes_that_are_not_utf8_differ() -> None:
    """The identity path keeps bytes that are not UTF-8 as surrogates: /f/%FF and /f/%FE differ."""
    assert fingerprint("POST", "/f/\udcff", b"", None, b"", secret=SECRET) != fingerprint(
        "POST", "/f/\udcfe", b"", None, b"", secret=SECRET
    )
    assert fingerprint("POST", "/f/\ud800", b"", None, b"", secret=SECRET)  # a lone surrogate no server sends: no error


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b"9007199254740992", b"9007199254740992.0"),
        (b"9007199254740992", b"9.007199254740992e15"),
        (b"123456789012345678", b"123456789012345678.0"),
        (b"1e400", b"10e399"),
        (b"0", b"-0"),
        (b"0", b"-0.0"),
        (b"0", b"0e-400"),
        (b"1e16", b"10000000000000000"),
        (b"5.5", b"5.50"),
        (b"1e-400", b"0.1e-399"),
        (b"[1e2, 0.1]", b"[100, 1e-1]"),
    ],
)
def test_numbers_with_one_decimal_value_are_equal(a: bytes, b: bytes) -> None:
    """Numbers compare by exact decimal value: 2**53 with or without .0, 1e400 (no double holds it), -0 and 0."""
    assert canonical_json(a) == canonical_json(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b"9007199254740993", b"9007199254740992"),  # one double; RFC 8785 makes them equal
        (b"123456789012345678.0", b"123456789012345680"),  # one double
        (b"0.1", b"0.10000000000000001"),  # one double
        (b"1.0000000000000001", b"1"),  # one double
        (b"1e-400", b"0"),  # 1e-400 is 0.0 as a double
        (b"1e400", b"1e401"),  # both infinite as doubles
        (b"1e21", b"1000000000000000000000"),  # the one equality not made (module docstring)
    ],
)
def test_numbers_with_different_decimal_values_differ(a: bytes, b: bytes) -> None:
    """Values a Python or Decimal app reads apart stay apart, though IEEE doubles (RFC 8785) merge them."""
    assert canonical_json(a) != canonical_json(b)


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


# --- numbers: exact decimal values, never an equality RFC 8785 does not make ---

# Numbers as the literal a client sends, m * 10**e in several spellings, from a
# small domain so that equal values (and values one double holds) come up often.
_MANTISSAS = st.sampled_from([0, 1, -1, 5, 25, 100, 2**53, 2**53 + 1, 10**17 + 1, 123456789012345678, 10**21])
_EXPONENTS = st.integers(min_value=-3, max_value=3) | st.sampled_from([-400, -22, -17, 15, 21, 399, 400])


@st.composite
def _number_literals(draw: st.DrawFn) -> str:
    mantissa, exponent = draw(_MANTISSAS), draw(_EXPONENTS)
    shift = draw(st.integers(min_value=0, max_value=2))
    style = draw(st.sampled_from(["e", "E+", "digits", "point", "zero"]))
    if draw(st.booleans()):
        mantissa, exponent = mantissa * 10**shift, exponent - shift  # the same value, respelled
    if style == "digits" and 0 <= exponent <= 30:
        return str(mantissa * 10**exponent)
    if style == "point" and exponent < 0:
        digits = str(abs(mantissa)).rjust(-exponent + 1, "0")
        return ("-" if mantissa < 0 else "") + digits[:exponent] + "." + digits[exponent:]
    if style == "zero" and exponent == 0:
        return f"{mantissa}.0"
    if style == "E+" and exponent >= 0:
        return f"{mantissa}E+{exponent}"
    return f"{mantissa}e{exponent}"


_number_documents = st.recursive(
    _number_literals() | st.sampled_from(["-0", "-0.0", "1.0000000000000001", "0.10000000000000001", "0.1"]),
    lambda inner: (
        st.lists(inner, max_size=3).map(lambda items: "[" + ",".join(items) + "]")
        | st.dictionaries(st.sampled_from(['"a"', '"b"']), inner, max_size=2).map(
            lambda items: "{" + ",".join(f"{k}:{v}" for k, v in items.items()) + "}"
        )
    ),
    max_leaves=4,
)


class _Number:
    """A number literal in a parsed document: compared by the rule the module docstring states."""

    def __init__(self, text: str) -> None:
        self.value = Decimal(text)
        # The one equality not made: an integer of 10**21 or more written with digits only.
        self.digits_only = text.lstrip("-").isdigit() and abs(self.value) >= 10**21

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Number) and (self.value, self.digits_only) == (other.value, other.digits_only)

    __hash__ = None  # type: ignore[assignment]


def _exact(text: str) -> object:
    return json.loads(text, parse_float=_Number, parse_int=_Number)


def _as_doubles(text: str) -> bytes | None:
    """RFC 8785's form: every number read as an IEEE double (ECMAScript JSON.parse); None where it has none."""
    try:
        return rfc8785.dumps(json.loads(text, parse_int=float))
    except rfc8785.FloatDomainError:
        return None  # a number no double holds (1e400): RFC 8785 has no form for it


@settings(max_examples=500, deadline=None)
@given(_number_documents, _number_documents)
def test_numbers_are_equal_exactly_when_their_decimal_values_are(a: str, b: str) -> None:
    """Equal canonical forms exactly for equal decimal values (one stated exception), and RFC 8785 agrees on each."""
    ours = canonical_json(a.encode()) == canonical_json(b.encode())
    assert ours == (_exact(a) == _exact(b))
    if ours:
        assert _as_doubles(a) == _as_doubles(b)  # never an equality RFC 8785 does not make


# --- media types, queries: spellings that mean the same, and bytes that do not ---


@st.composite
def _media_types(draw: st.DrawFn) -> tuple[tuple[object, ...], str]:
    """A media type (what it means, as a comparable value) and one spelling of it."""
    kind = draw(st.sampled_from(["text/plain", "multipart/form-data", "application/json"]))
    names = draw(st.lists(st.sampled_from(["charset", "boundary", "q"]), max_size=2))
    values = [draw(st.sampled_from(["abc", "AbC", "utf-8", "UTF-8", "a b", 'x"y', "a;b", "a\\b"])) for _ in names]
    meaning = (kind, tuple((n, v.lower() if n == "charset" else v) for n, v in zip(names, values, strict=True)))
    text = "".join(c.upper() if draw(st.booleans()) else c for c in kind)
    for name, value in zip(names, values, strict=True):
        name = "".join(c.upper() if draw(st.booleans()) else c for c in name)
        is_token = all(c.isalnum() or c == "-" for c in value)
        if not is_token or draw(st.booleans()):
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        text += draw(st.sampled_from([";", "; ", " ; ", ";;"])) + name + "=" + value
    return meaning, text + draw(st.sampled_from(["", " ", ";"]))


@settings(max_examples=300, deadline=None)
@given(_media_types(), _media_types())
def test_media_types_are_equal_exactly_when_they_mean_the_same(
    a: tuple[tuple[object, ...], str], b: tuple[tuple[object, ...], str]
) -> None:
    """Case of type, subtype and names, quoting, spaces and charset's case do not matter; any other value byte does."""
    assert (fp(b"x", a[1]) == fp(b"x", b[1])) == (a[0] == b[0])


_QUERY_BYTES = st.lists(
    st.sampled_from([b"a", b"B", b"\xff", b"\xfe", b"\xc3\xa9", b" ", b"+", b"=", b"&", b"%"]), max_size=3
).map(b"".join)
_NEAR = {b"\xff": b"\xfe", b"\xfe": b"\xff", b"a": b"A", b"B": b"b", b" ": b"+", b"+": b" "}


def _escape(draw: st.DrawFn, data: bytes) -> bytes:
    """One spelling of a query component: every byte escaped (upper or lower hex) or, where it may be, sent as is."""
    out = b""
    for byte in data:
        char = bytes([byte])
        if char == b" " and draw(st.booleans()):
            out += b"+"
        elif char.isalnum() and char.isascii() and draw(st.booleans()):
            out += char
        else:
            out += b"%" + (b"%02X" if draw(st.booleans()) else b"%02x") % byte
    return out


@st.composite
def _query_pairs(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]], bytes]:
    """Two queries, each as its parameters (bytes) and one spelling: the second the same, reordered or one byte off."""
    pairs = draw(st.lists(st.tuples(_QUERY_BYTES, _QUERY_BYTES), max_size=3))
    other = list(pairs)
    change = draw(st.sampled_from(["same", "reorder", "near"]))
    if change == "reorder":
        other = draw(st.permutations(pairs))
    elif change == "near" and other:
        index = draw(st.integers(min_value=0, max_value=len(other) - 1))
        name, value = other[index]
        for old, new in _NEAR.items():
            if old in value:
                other[index] = (name, value.replace(old, new, 1))
                break

    def spell(params: list[tuple[bytes, bytes]]) -> bytes:
        return b"&".join(_escape(draw, name) + b"=" + _escape(draw, value) for name, value in params)

    return pairs, spell(pairs), other, spell(other)


@settings(max_examples=300, deadline=None)
@given(_query_pairs())
def test_queries_are_equal_exactly_when_their_parameters_are(
    drawn: tuple[list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]], bytes],
) -> None:
    """Same parameter bytes, names in any order (repeats keep theirs): equal; bytes and latin-1 text alike."""
    pairs_a, query_a, pairs_b, query_b = drawn

    def meaning(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return sorted(pairs, key=lambda pair: pair[0])  # stable: repeated names keep their order

    assert canonical_query(query_a) == canonical_query(query_a.decode("latin-1"))
    assert (canonical_query(query_a) == canonical_query(query_b)) == (meaning(pairs_a) == meaning(pairs_b))


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


@pytest.mark.parametrize(
    ("method", "path", "query", "content_type", "body", "expected"),
    [
        (
            "POST",
            "/orders",
            b"",
            b"multipart/form-data; boundary=----WebKitFormBoundaryAbC",
            b"--x--",
            "e8d510c07826f1ae2287652ec0eefc607f561893c45b121137c3983a05455a5b",
        ),
        (
            "POST",
            "/orders",
            b"sig=%FF&a=1",
            b'Application/JSON; Charset="UTF-8"',
            b'{"n":9007199254740992.0,"m":0.10000000000000001,"k":1e2}',
            "91e1172213ab1e6266bb626dd5d800e29d3d1ada0cac5649304aee0328707fcc",
        ),
        (
            "POST",
            "/f/\ufffd",
            "b=2&a=%C3%A9",
            b"application/json;",
            b'{"z":[1,2.5,-0.0],"big":1e400}',
            "575fa531f8c189f1a0f0534e9b0cef8674e12e596c0665e3d7e35a33a44c5504",
        ),
    ],
    ids=["boundary-case", "query-and-numbers", "path-and-raw-json"],
)
def test_legacy_fingerprints_are_those_versions_before_keyed_digests_stored(
    method: str, path: str, query: bytes | str, content_type: bytes, body: bytes, expected: str
) -> None:
    """In the legacy window a retry across the upgrade matches its old record: the old, looser input, unkeyed.

    These requests canonicalise differently now (boundary case, bytes that
    are not UTF-8, numbers by exact value); the digests are those the
    version before keyed digests (9a826f7's legacy_fingerprint) computed.
    """
    assert legacy_fingerprint(method, path, query, content_type, body, canonical_json=True) == expected
