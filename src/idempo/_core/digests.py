"""Every digest idempo stores or logs: HMAC-SHA256 under the server secret (DESIGN "digest at rest").

A record key, a fingerprint or a log hash made with a plain hash can be
checked against guesses: a leaked store gives back a short body (a PIN) in a
few thousand guesses, a log line a Basic-auth password. Keyed with a secret
the attacker does not have (RFC 2104 HMAC with SHA-256), none of them can be.

One :class:`Digests` per secret; it derives one key per use from the secret
(record keys, fingerprints, log hashes, argument digests), so a digest of one
kind never equals a digest of another kind over the same input.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

__all__ = ["MIN_SECRET_BYTES", "Digests", "KeyedHash", "as_digests", "legacy_record_key", "legacy_value"]

#: The shortest secret accepted, in bytes: 128 bits.
MIN_SECRET_BYTES = 16


class Digests:
    """HMAC-SHA256 digests under one server secret.

    Args:
        secret: the server secret, at least :data:`MIN_SECRET_BYTES` bytes.

    Raises:
        ValueError: the secret is shorter than :data:`MIN_SECRET_BYTES`.
    """

    __slots__ = ("_fingerprint", "_log", "_record", "_value")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the idempo secret must be at least {MIN_SECRET_BYTES} bytes")
        self._record = _KeyedState(hmac.new(secret, b"idempo record key", hashlib.sha256).digest())
        self._fingerprint = _KeyedState(hmac.new(secret, b"idempo fingerprint", hashlib.sha256).digest())
        self._log = _KeyedState(hmac.new(secret, b"idempo log hash", hashlib.sha256).digest())
        self._value = _KeyedState(hmac.new(secret, b"idempo value digest", hashlib.sha256).digest())

    def record_key(self, principal: str, method: str, route: str, key: str) -> str:
        """Return the store's record key for a key within its scope.

        The parts are length-prefixed before hashing, so no two different
        scopes share an input (scope ``"u1:x"`` with key ``"k"`` never equals
        scope ``"u1"`` with key ``"x:k"``).

        Args:
            principal: who sent the request (see :mod:`idempo.principals`).
            method: the HTTP method, upper-case (or ``"@idempotent"`` for functions).
            route: the path or scope the key is unique within.
            key: the idempotency key.

        Returns:
            32 lower-case hex characters (128 bits of HMAC-SHA256).
        """
        data = f"{len(principal)}:{principal}{len(method)}:{method}{len(route)}:{route}{len(key)}:{key}"
        return self._record.hexdigest(data.encode("utf-8", "surrogatepass"))[:32]

    def fingerprint_of(self, data: bytes) -> str:
        """64 hex characters: the fingerprint of a request whose whole input is ``data``.

        The same digest as :meth:`fingerprint_hash` fed ``data`` (in any number of parts).
        """
        return self._fingerprint.hexdigest(data)

    def fingerprint_hash(self) -> KeyedHash:
        """A fresh keyed hash for one request fingerprint (:func:`idempo._core.fingerprint.fingerprint`)."""
        return KeyedHash(self._fingerprint)

    def log_hash(self, text: str) -> str:
        """16 hex characters (64 bits) naming ``text`` in logs and spans: tells values apart, reveals none."""
        return self._log.hexdigest(text.encode("utf-8", "surrogatepass"))[:16]

    def value(self, data: bytes) -> str:
        """64 hex characters: the fingerprint of a function call or message (the decorator, the consumers)."""
        return self._value.hexdigest(data)


class _KeyedState:
    """HMAC-SHA256 under one key (RFC 2104), with the two padded-key blocks hashed once.

    HMAC(K, m) = H((K ^ opad) || H((K ^ ipad) || m)); the SHA-256 states after
    the ``K ^ ipad`` and ``K ^ opad`` blocks are kept and copied per digest.
    The same digest as ``hmac.new(key, m, "sha256")``; computed this way it
    costs about half as much per digest (``hmac.HMAC.copy`` and OpenSSL's
    HMAC finalisation, twice per request).
    """

    __slots__ = ("inner", "outer")

    def __init__(self, key: bytes) -> None:
        # A 32-byte key is shorter than SHA-256's 64-byte block: padded with zeros.
        block = key.ljust(64, b"\0")
        self.inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self.outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def hexdigest(self, data: bytes) -> str:
        """The hex HMAC of ``data``."""
        inner = self.inner.copy()
        inner.update(data)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


class KeyedHash:
    """An HMAC-SHA256 being fed (``update``, then ``hexdigest`` once), as :class:`hmac.HMAC` is used."""

    __slots__ = ("_inner", "_outer", "update")

    def __init__(self, state: _KeyedState) -> None:
        inner = state.inner.copy()
        self._inner = inner
        self._outer = state.outer
        #: Feed bytes (the inner hash's own ``update``: no Python call in between).
        self.update: Callable[[bytes], None] = inner.update

    def hexdigest(self) -> str:
        """The hex HMAC of everything fed."""
        outer = self._outer.copy()
        outer.update(self._inner.digest())
        return outer.hexdigest()


def legacy_record_key(principal: str, method: str, route: str, key: str) -> str:
    """The record key versions before keyed digests computed: plain SHA-256, for finding their records.

    Only read during the legacy window (``idempo migrate --legacy-digests``);
    nothing is ever written under it.
    """
    data = f"{len(principal)}:{principal}{len(method)}:{method}{len(route)}:{route}{len(key)}:{key}"
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def legacy_value(data: bytes) -> str:
    """The fingerprint of a call or message as versions before keyed digests computed it (plain SHA-256)."""
    return hashlib.sha256(data).hexdigest()


def as_digests(secret: Digests | bytes | str) -> Digests:
    """``secret`` as :class:`Digests` (a str is encoded as UTF-8).

    Raises:
        ValueError: the secret is shorter than :data:`MIN_SECRET_BYTES`.
    """
    if isinstance(secret, Digests):
        return secret
    return Digests(secret.encode("utf-8") if isinstance(secret, str) else secret)
