"""HTTP behaviour: the Idempotency-Key header (DESIGN table rows 1-2, shared/cases B09)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest

from idempo import Policy
from tests.adapters.conftest import K1, B, ServeFactory
from tests.support.clock import FakeClock
from tests.support.stores import CountingStore

PROBLEM = "application/problem+json"


def assert_problem(response: object, status: int, slug: str) -> dict[str, object]:
    """The response is an RFC 9457 problem with this status and type."""
    assert response.status_code == status  # type: ignore[attr-defined]
    assert response.headers["content-type"] == PROBLEM  # type: ignore[attr-defined]
    problem = json.loads(response.content)  # type: ignore[attr-defined]
    assert problem["type"] == f"https://idempo.dev/problems/{slug}"
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    return dict(problem)


def raw_request(url: str, header_lines: list[bytes], body: bytes = B) -> tuple[int, bytes, bytes]:
    """Send POST /orders over a plain socket with header lines exactly as given; return (status, headers, body)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        head = b"POST /orders HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        head += b"".join(line + b"\r\n" for line in header_lines)
        head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, head_bytes, rest


def test_quoted_and_bare_forms_are_the_same_key(serve: ServeFactory) -> None:
    """The draft's sf-string "abc" and the bare abc that Stripe's SDKs send name one key."""
    s = serve()
    first = s.post(key=K1)
    second = s.post(key=f'"{K1}"')
    assert first.status_code == 201
    assert second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert s.orders.calls == 1


def test_escaped_quoted_key_equals_its_unescaped_bare_form(serve: ServeFactory) -> None:
    """An sf-string with an escaped backslash names the same key as the bare value."""
    s = serve()
    assert s.post(key="a\\b").status_code == 201
    replay = s.post(key='"a\\\\b"')
    assert replay.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


def test_key_of_255_characters_is_accepted(serve: ServeFactory) -> None:
    """255 characters is the longest key: it executes and replays."""
    s = serve()
    key = "k" * 255
    assert s.post(key=key).status_code == 201
    assert s.post(key=key).headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        ([b"Idempotency-Key:"], "empty"),
        ([b'Idempotency-Key: ""'], "empty sf-string"),
        ([b"Idempotency-Key:    "], "blank (B09d)"),
        ([b'Idempotency-Key: "   "'], "blank sf-string (B09d)"),
        ([b"Idempotency-Key: " + b"k" * 256], "256 characters"),
        ([b'Idempotency-Key: "' + b"k" * 256 + b'"'], "256 characters quoted"),
        ([b"Idempotency-Key: " + b"k" * 10_000], "10,000 characters (B09f)"),
        ([b"Idempotency-Key: caf\xc3\xa9"], "non-ASCII"),
        ([b'Idempotency-Key: "caf\xc3\xa9"'], "non-ASCII quoted"),
        ([b'Idempotency-Key: "a\tb"'], "control character (tab) quoted"),
        ([b"Idempotency-Key: a\tb"], "control character (tab) bare"),
        ([b'Idempotency-Key: "a", "b"'], "a list"),
        ([b"Idempotency-Key: a, b"], "a bare list"),
        ([b'Idempotency-Key: "abc";v=1'], "sf-string with parameters"),
        ([b'Idempotency-Key: "abc'], "unterminated sf-string"),
        ([b"Idempotency-Key: a b"], "bare with a space"),
        ([b"Idempotency-Key: K1", b"Idempotency-Key: K2"], "two lines that differ (B09e)"),
    ],
)
def test_malformed_key_is_400_problem_and_never_reaches_the_store(
    serve: ServeFactory, lines: list[bytes], why: str
) -> None:
    """A malformed key gets 400 problem+json, the handler does not run, the store sees no call."""
    store = CountingStore(serve.memory_store(FakeClock()))
    s = serve(store=store)
    status, head, body = raw_request(s.url, lines)
    assert status == 400, why
    assert b"content-type: application/problem+json" in head.lower()
    problem = json.loads(body)
    assert problem["type"] == "https://idempo.dev/problems/invalid-key"
    assert s.orders.calls == 0
    assert sum(n for call, n in store.calls.items() if call != "open") == 0  # open: the front's start-up check


def test_two_identical_key_lines_are_one_key(serve: ServeFactory) -> None:
    """Identical repeated lines (as some proxies produce) are tolerated: one key."""
    s = serve()
    status, _, _ = raw_request(s.url, [b"Idempotency-Key: K1", b"Idempotency-Key: K1"])
    assert status == 201
    status, head, _ = raw_request(s.url, [b"Idempotency-Key: K1"])
    assert b"idempotent-replayed: true" in head.lower()
    assert s.orders.calls == 1


def test_missing_key_where_required_is_400_problem(serve: ServeFactory) -> None:
    """B09(b): a route that requires a key answers 400 problem+json without one; the handler does not run."""
    s = serve(policy=Policy(require_key=True))
    response = s.post(key=None)
    problem = assert_problem(response, 400, "missing-key")
    assert "Idempotency-Key" in str(problem["detail"])
    assert s.orders.calls == 0


def test_optional_key_missing_executes_every_time_and_stores_nothing(serve: ServeFactory) -> None:
    """B09(a): without a key (optional mode) each request executes and nothing is written to the store."""
    store = CountingStore(serve.memory_store(FakeClock()))
    s = serve(store=store)
    first = s.post(key=None)
    second = s.post(key=None)
    assert first.json() == {"order_id": 1}
    assert second.json() == {"order_id": 2}
    assert "idempotent-replayed" not in second.headers
    assert s.orders.calls == 2
    assert sum(n for call, n in store.calls.items() if call != "open") == 0  # open: the front's start-up check


def test_header_name_is_case_insensitive(serve: ServeFactory) -> None:
    """B09(c): idempotency-key then IDEMPOTENCY-KEY with one value: the second is a replay."""
    s = serve()
    first = s.client.post("/orders", content=B, headers={"content-type": "application/json", "idempotency-key": K1})
    second = s.client.post("/orders", content=B, headers={"content-type": "application/json", "IDEMPOTENCY-KEY": K1})
    assert first.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert s.orders.calls == 1


def test_custom_key_header(serve: ServeFactory) -> None:
    """key_header= reads the key from another header (e.g. a legacy X-Idempotency-Key)."""
    s = serve(key_header="X-Idempotency-Key")
    s.post(key=None, headers={"X-Idempotency-Key": K1})
    replay = s.post(key=None, headers={"X-Idempotency-Key": K1})
    assert replay.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1
