"""The proxy's spooled request body: the same fingerprint as the bytes, read back whole and in chunks."""

from __future__ import annotations

import anyio
import pytest

from idempo._core.fingerprint import fingerprint, legacy_fingerprint
from idempo._http.asgi import Receive
from idempo.proxy._body import MEMORY_BYTES, SpooledBody, read_spooled

SECRET = b"a-test-secret-of-32-bytes-------"


def spooled(data: bytes, chunk: int = 4096) -> SpooledBody:
    body = SpooledBody()
    for start in range(0, len(data), chunk):
        body.write(data[start : start + chunk])
    return body


@pytest.mark.parametrize(
    ("content_type", "data"),
    [
        (b"application/json", b'{"b": 1, "a": [1, 2, 3]}'),
        (b"application/octet-stream", bytes(range(256)) * (MEMORY_BYTES // 128)),  # past memory: a file
        (None, b""),
    ],
)
def test_a_spooled_body_fingerprints_as_its_bytes(content_type: bytes | None, data: bytes) -> None:
    """fingerprint() and legacy_fingerprint() give a SpooledBody the digest of its bytes."""
    body = spooled(data)
    try:
        assert len(body) == len(data)
        assert body.read() == data
        assert b"".join(body.chunks()) == data
        args = ("POST", "/v1/x", b"", content_type)
        assert fingerprint(*args, body, secret=SECRET) == fingerprint(*args, data, secret=SECRET)
        assert legacy_fingerprint(*args, body, canonical_json=True) == legacy_fingerprint(
            *args, data, canonical_json=True
        )
    finally:
        body.close()


def test_read_spooled_stops_past_the_limit() -> None:
    """The reader keeps a body up to the limit, and gives None (nothing kept) past it."""
    messages = [
        {"type": "http.request", "body": b"x" * 600, "more_body": True},
        {"type": "http.request", "body": b"y" * 600, "more_body": False},
    ]

    def receiver(items: list[dict[str, object]]) -> Receive:
        queue = list(items)

        async def receive() -> dict[str, object]:
            return queue.pop(0)

        return receive

    whole = anyio.run(read_spooled, receiver(messages), 1200)
    assert whole is not None
    assert whole.read() == b"x" * 600 + b"y" * 600
    whole.close()
    assert anyio.run(read_spooled, receiver(messages), 1000) is None
