"""The keyed digests are RFC 2104 HMAC-SHA256 under one key per purpose, whatever computes them."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from idempo._core.digests import Digests

SECRET = b"a server secret of 32 bytes long"


def _key(purpose: bytes, secret: bytes = SECRET) -> bytes:
    return hmac.new(secret, purpose, hashlib.sha256).digest()


@given(
    principal=st.text(),
    method=st.sampled_from(["POST", "PATCH", "@idempotent"]),
    route=st.text(),
    key=st.text(),
)
def test_the_record_key_is_the_hmac_of_the_length_prefixed_scope(
    principal: str, method: str, route: str, key: str
) -> None:
    data = f"{len(principal)}:{principal}{len(method)}:{method}{len(route)}:{route}{len(key)}:{key}"
    expected = hmac.new(_key(b"idempo record key"), data.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    assert Digests(SECRET).record_key(principal, method, route, key) == expected[:32]


@given(chunks=st.lists(st.binary(max_size=200), max_size=5), secret=st.binary(min_size=16, max_size=100))
def test_the_fingerprint_hash_is_the_hmac_of_everything_fed(chunks: list[bytes], secret: bytes) -> None:
    # Secrets longer than SHA-256's 64-byte block are hashed first (RFC 2104): the derived keys never are.
    digest = Digests(secret).fingerprint_hash()
    for chunk in chunks:
        digest.update(chunk)
    expected = hmac.new(_key(b"idempo fingerprint", secret), b"".join(chunks), hashlib.sha256).hexdigest()
    assert digest.hexdigest() == expected


@given(chunks=st.lists(st.binary(max_size=200), max_size=5), secret=st.binary(min_size=16, max_size=100))
def test_the_fingerprint_of_an_input_in_one_piece_is_the_hash_fed_it_in_parts(
    chunks: list[bytes], secret: bytes
) -> None:
    digests = Digests(secret)
    fed = digests.fingerprint_hash()
    for chunk in chunks:
        fed.update(chunk)
    assert digests.fingerprint_of(b"".join(chunks)) == fed.hexdigest()


def test_a_body_past_the_one_piece_bound_has_the_fingerprint_of_the_same_body_read_in_chunks() -> None:
    """Both ways of hashing the input meet: a body in memory and the same body as a source give one fingerprint."""
    from idempo._core import fingerprint as fp

    class Source:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def __len__(self) -> int:
            return len(self.data)

        def chunks(self):  # type: ignore[no-untyped-def]
            for i in range(0, len(self.data), 1000):
                yield self.data[i : i + 1000]

        def read(self) -> bytes:
            return self.data

    for body, content_type in (
        (b"x" * 10, b"text/plain"),
        (b"x" * (fp._ONE_SHOT_BYTES + 1), b"text/plain"),
        (b'{"a": 1, "b": [2]}', b"application/json"),
    ):
        in_memory = fp.fingerprint("POST", "/p", b"", content_type, body, secret=SECRET)
        streamed = fp.fingerprint("POST", "/p", b"", content_type, Source(body), secret=SECRET)
        assert in_memory == streamed


def test_log_hashes_and_value_digests_are_hmacs_under_keys_of_their_own() -> None:
    digests = Digests(SECRET)
    assert (
        digests.log_hash("Basic dXNlcjpwYXNz")
        == hmac.new(_key(b"idempo log hash"), b"Basic dXNlcjpwYXNz", hashlib.sha256).hexdigest()[:16]
    )
    assert digests.value(b"call") == hmac.new(_key(b"idempo value digest"), b"call", hashlib.sha256).hexdigest()
    # Each purpose has its own key: the same input digests differently.
    assert digests.value(b"x")[:16] != digests.log_hash("x")


def test_two_hashes_from_one_digests_do_not_share_state() -> None:
    digests = Digests(SECRET)
    first, second = digests.fingerprint_hash(), digests.fingerprint_hash()
    first.update(b"a")
    second.update(b"b")
    assert first.hexdigest() == hmac.new(_key(b"idempo fingerprint"), b"a", hashlib.sha256).hexdigest()
    assert second.hexdigest() == hmac.new(_key(b"idempo fingerprint"), b"b", hashlib.sha256).hexdigest()
