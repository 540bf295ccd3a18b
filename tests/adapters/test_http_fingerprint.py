"""HTTP behaviour: what counts as the same request (shared/cases B07) and record expiry (B16)."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import pytest

from idempo import Policy
from tests.adapters.conftest import B_PRIME, K1, B, ServeFactory, Served


@pytest.mark.parametrize(
    ("first", "retry"),
    [
        (b'{"sku":"A","qty":1}', b'{ "qty": 1,  "sku": "A" }'),
        (b'{"a":{"y":1,"x":2},"l":[1,2]}', b'{"l":[1,2],"a":{"x":2,"y":1}}'),
        (b'{"name":"\\u00e9"}', '{"name":"é"}'.encode()),
        (b'{"qty":1}', b'{"qty":1.0}'),
        (b'{"n":9007199254740992}', b'{"n":9007199254740992.0}'),
        (b'{"n":9007199254740993}', b'{"n":9007199254740993.0}'),
        (b'{"n":1152921504606846976}', b'{"n":1.152921504606846976e18}'),
        (b'{"n":1e400}', b'{"n":10e399}'),
        (b'{"n":0}', b'{"n":-0.0}'),
    ],
    ids=[
        "key-order-and-whitespace",
        "nested",
        "unicode-escape",
        "number-1-vs-1.0",
        "2**53",
        "2**53+1",
        "2**60",
        "1e400",
        "zero",
    ],
)
def test_equivalent_json_is_the_same_request(serve: ServeFactory, first: bytes, retry: bytes) -> None:
    """B07: JSON that differs only in key order, whitespace, escapes or the spelling of a number's value replays."""
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
        (b'{"n":9007199254740993}', b'{"n":9007199254740992}'),
        (b'{"n":1152921504606846976}', b'{"n":1.152921504606847e18}'),
        (b'{"n":0.1}', b'{"n":0.10000000000000001}'),
        (b'{"n":1e-400}', b'{"n":0}'),
    ],
    ids=["value-type", "array-order", "value", "big-integers", "2**60-vs-its-double", "decimal-digits", "underflow"],
)
def test_different_json_is_a_mismatch(serve: ServeFactory, first: bytes, retry: bytes) -> None:
    """B07: a different value (numbers by exact decimal value), value type or array order with the same key is 422."""
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


# --- collisions (issue 11, item 5): requests the app can tell apart never share a fingerprint or record ---


def test_two_different_content_type_lines_are_a_400(serve: ServeFactory) -> None:
    """Two Content-Type lines that differ are 400 content-type-ambiguous on every front (frameworks read either).

    Nothing runs and nothing is stored: idempo could not fingerprint what
    the app reads (Starlette reads the first line; waitress joins both).
    """
    s = serve()
    lines = [("Content-Type", "application/json"), ("Content-Type", "text/plain"), ("Idempotency-Key", K1)]
    answer = s.client.post("/orders", content=B, headers=lines)
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["type"] == "https://idempo.dev/problems/content-type-ambiguous"
    assert s.orders.calls == 0
    assert s.record() is None
    # One line with two media types is what a WSGI server makes of two lines: the same 400 everywhere.
    folded = s.client.post(
        "/orders", content=B, headers={"Content-Type": "application/json, text/plain", "Idempotency-Key": K1}
    )
    assert folded.status_code == 400
    assert s.orders.calls == 0


def test_repeated_identical_content_type_lines_count_as_one(serve: ServeFactory) -> None:
    """Identical repeats (some proxies add them) are one media type: executed once, then replayed to one line."""
    s = serve()
    lines = [("Content-Type", "application/json"), ("Content-Type", "application/json"), ("Idempotency-Key", K1)]
    first = s.client.post("/orders", content=B, headers=lines)
    assert first.status_code == 201
    assert s.post().headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


def multipart(boundary: str) -> bytes:
    return f'--{boundary}\r\nContent-Disposition: form-data; name="sku"\r\n\r\nA\r\n--{boundary}--\r\n'.encode()


def test_multipart_boundary_case_is_part_of_the_request(serve: ServeFactory) -> None:
    """A boundary is case-sensitive (RFC 2046): boundary=AbC after boundary=abc is 422, not abc's stored answer."""
    s = serve()
    body = multipart("AbC")
    assert s.post(body=body, headers={"content-type": "multipart/form-data; boundary=abc"}).status_code == 201
    corrected = s.post(body=body, headers={"content-type": "multipart/form-data; boundary=AbC"})
    assert corrected.status_code == 422
    assert "idempotent-replayed" not in corrected.headers
    assert s.orders.calls == 1


def test_media_type_spelling_does_not_matter(serve: ServeFactory) -> None:
    """Type, subtype and parameter names ignore case, a quoted value equals the token (RFC 9110 8.3.1): a replay."""
    s = serve()
    body = multipart("AbC")
    assert s.post(body=body, headers={"content-type": "multipart/form-data; boundary=AbC"}).status_code == 201
    same = s.post(body=body, headers={"content-type": 'Multipart/Form-Data ; BOUNDARY="AbC"'})
    assert same.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


@pytest.mark.parametrize("escaped", ["%FF", "%C3%A9"], ids=["not-utf8", "utf8"])
def test_path_bytes_that_are_not_utf8_make_their_own_record(serve: ServeFactory, escaped: str) -> None:
    """/orders/x%FF and /orders/x%FE are two records on every front (bytes, not one U+FFFD); UTF-8 paths keep theirs."""
    s = serve()
    first = s.post(path=f"/orders/x{escaped}")
    assert first.status_code == 201
    assert s.record(path=identity_path(s, f"/orders/x{escaped}")) is not None
    other = s.post(path="/orders/x%FE")
    assert other.status_code == 201
    assert "idempotent-replayed" not in other.headers
    assert s.orders.calls == 2
    assert s.record(path=identity_path(s, "/orders/x%FE")) is not None
    assert s.post(path=f"/orders/x{escaped}").headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 2


def identity_path(s: Served, path: str) -> str:
    """The path a record key is made of: bytes that are not UTF-8 kept, the same on every front."""
    return unquote_to_bytes(path).decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("first", "other"),
    [
        ("/orders/a%2Fb", "/orders/a/b"),
        ("/orders/a%2fb", "/orders/a/b"),
        ("/orders/a%252Fb", "/orders/a%2Fb"),
        ("/orders/x%25FF", "/orders/x%FF"),
    ],
    ids=["encoded-slash", "lower-case-escape", "escaped-percent", "escaped-percent-before-a-byte"],
)
def test_an_encoded_slash_is_another_resource(serve: ServeFactory, first: str, other: str) -> None:
    """/a%2Fb and /a/b are two resources (RFC 3986 section 2.2): two records on every front, from the raw path.

    Servers decode both to /a/b (ASGI ``path``, WSGI ``PATH_INFO``); the raw
    path (ASGI ``raw_path``, WSGI ``REQUEST_URI``) tells them apart. Before,
    the second request got the first one's replay. A literal ``%2F`` (sent
    ``%252F``) and a literal ``%FF`` (sent ``%25FF``; Django's ``request.path``
    spells both the same) are their own resources too.
    """
    s = serve()
    assert s.post(path=first).status_code == 201
    second = s.post(path=other)
    assert second.status_code == 201
    assert "idempotent-replayed" not in second.headers
    assert s.orders.calls == 2
    assert s.post(path=first).headers["idempotent-replayed"] == "true"
    assert s.post(path=other).headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 2


def test_query_bytes_that_are_not_utf8_are_part_of_the_request(serve: ServeFactory) -> None:
    """?sig=%FF then ?sig=%FE with the same key is a mismatch (422) on every front, not the first signature's answer."""
    s = serve()
    assert s.post(path="/orders?sig=%FF").status_code == 201
    assert s.post(path="/orders?sig=%FF").headers["idempotent-replayed"] == "true"
    other = s.post(path="/orders?sig=%FE")
    assert other.status_code == 422
    assert s.orders.calls == 1
