"""Key parsing and record keys (IETF draft section 2.1; shared/cases B09, B11)."""

from __future__ import annotations

import pytest

from idempo import MAX_KEY_LENGTH, InvalidKey, make_record_key, parse_key
from idempo._core.keys import parse_key_value

SECRET = b"test secret, 16+ bytes"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b"8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        (b'"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        (b'  "abc"  ', "abc"),
        (b'"a b"', "a b"),
        (b'"a\\"b"', 'a"b'),
        (b'"a\\\\b"', "a\\b"),
        (b"a;b", "a;b"),
        (b"k" * MAX_KEY_LENGTH, "k" * MAX_KEY_LENGTH),
        (b'"' + b"k" * MAX_KEY_LENGTH + b'"', "k" * MAX_KEY_LENGTH),
    ],
)
def test_valid_keys(raw: bytes, key: str) -> None:
    """Bare and sf-string forms parse to the key they carry."""
    assert parse_key([raw]) == key


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b'""',
        b'"   "',
        b"k" * (MAX_KEY_LENGTH + 1),
        b'"' + b"k" * (MAX_KEY_LENGTH + 1) + b'"',
        b'"' + b"\\\\" * 256 + b'"',
        b"k" * 10_000,
        b"caf\xc3\xa9",
        b"a\x00b",
        b"a\x01b",
        b"a\x7fb",
        b'"a\x1fb"',
        b'"a\tb"',
        b'"a", "b"',
        b"a,b",
        b'"abc";p=1',
        b'"abc',
        b'"a\\xb"',
        b'ab"c',
        b"a b",
    ],
)
def test_invalid_keys(raw: bytes) -> None:
    """Empty, blank, too long, non-ASCII, control characters, lists, parameters, bad escapes: InvalidKey (400)."""
    with pytest.raises(InvalidKey) as info:
        parse_key([raw])
    assert info.value.status_code == 400
    assert str(info.value)


def test_no_header_is_no_key() -> None:
    """No header line at all: None (the request passes through unless a key is required)."""
    assert parse_key([]) is None


def test_identical_lines_are_one_key_and_different_lines_are_invalid() -> None:
    """Repeated identical lines are tolerated; lines that differ are refused (draft 2.1: one field)."""
    assert parse_key([b"K1", b"K1"]) == "K1"
    with pytest.raises(InvalidKey, match="different"):
        parse_key([b"K1", b"K2"])


def test_error_messages_say_what_is_wrong() -> None:
    """The 400 detail names the fault."""
    cases = {
        b"": "empty",
        b"k" * 300: "longer than 255",
        b"a\x01": "control character",
        b"caf\xc3\xa9": "not ASCII",
        b"a, b": "list",
        b"a b": "spaces",
    }
    for raw, phrase in cases.items():
        with pytest.raises(InvalidKey, match=phrase):
            parse_key_value(raw)


def test_record_keys_do_not_collide_across_part_boundaries() -> None:
    """B11(6): scope "u1:x" + key "k" and scope "u1" + key "x:k" are distinct records."""
    assert make_record_key("u1:x", "POST", "/orders", "k", secret=SECRET) != make_record_key(
        "u1", "POST", "/orders", "x:k", secret=SECRET
    )
    assert make_record_key("u1", "POST", "/a", "k", secret=SECRET) != make_record_key(
        "u1", "POST", "/a/", "k", secret=SECRET
    )


def test_record_key_depends_on_every_part() -> None:
    """Principal, method, route and key each change the record key; equal parts give equal keys."""
    base = make_record_key("p", "POST", "/orders", "k", secret=SECRET)
    assert base == make_record_key("p", "POST", "/orders", "k", secret=SECRET)
    assert len(base) == 32
    assert int(base, 16) >= 0
    for other in [
        ("q", "POST", "/orders", "k"),
        ("p", "PATCH", "/orders", "k"),
        ("p", "POST", "/order", "k"),
        ("p", "POST", "/orders", "K"),
    ]:
        assert make_record_key(*other, secret=SECRET) != base


def test_record_key_is_keyed_with_the_secret() -> None:
    """One scope and key under two secrets are two record keys; a secret under 16 bytes is refused."""
    base = make_record_key("p", "POST", "/orders", "k", secret=SECRET)
    assert make_record_key("p", "POST", "/orders", "k", secret=SECRET + b"!") != base
    assert make_record_key("p", "POST", "/orders", "k", secret=SECRET.decode()) == base
    with pytest.raises(ValueError, match="16 bytes"):
        make_record_key("p", "POST", "/orders", "k", secret=b"short")


def test_split_folded_separates_lines_but_not_sf_strings() -> None:
    """A value a WSGI server folded from several lines splits on commas outside quoted strings only."""
    from idempo._core.keys import split_folded

    assert split_folded(b"K1") == [b"K1"]
    assert split_folded(b"K1, K2") == [b"K1", b"K2"]
    assert split_folded(b"K1,K1") == [b"K1", b"K1"]
    assert split_folded(b'"a,b"') == [b'"a,b"']
    assert split_folded(b'"a\\",b", c') == [b'"a\\",b"', b"c"]
    assert split_folded(b"K1, ") == [b"K1", b""]


def test_split_folded_leaves_an_over_long_value_whole() -> None:
    """Issue 10 item 6: a value past MAX_FOLDED_BYTES is not scanned; parse_key then rejects it as too long."""
    from idempo._core.keys import MAX_FOLDED_BYTES, split_folded

    longest = b", ".join([b"k"] * ((MAX_FOLDED_BYTES + 1) // 3 + 1))
    assert len(longest) > MAX_FOLDED_BYTES
    assert split_folded(longest) == [longest]
    with pytest.raises(InvalidKey, match="longer than 255"):
        parse_key(split_folded(longest))
