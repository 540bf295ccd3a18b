"""The keys a ``jwt`` scope verifies tokens with (idempo proxy), read from a JWK Set file or a key file.

Public in :mod:`idempo.proxy.principal`; kept apart so that
:mod:`idempo.proxy.config` can check a scope's keys as it loads the
configuration without importing the resolver. PyJWT and ``cryptography`` are
imported when keys are read, not when this module is imported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

__all__ = ["HMAC_MIN_BYTES", "KeySource", "VerificationKey", "load_keys"]


class KeySource(Protocol):
    """Where a scope's keys are (a :class:`~idempo.proxy.config.JWTScope`)."""

    @property
    def key_file(self) -> Path | None:
        """One key's file, or None."""

    @property
    def jwks_file(self) -> Path | None:
        """A JWK Set file, or None."""

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms tokens may be signed with."""


# RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key a token may be signed with.

    Attributes:
        key: the key as PyJWT takes it (a ``cryptography`` public key, or the
            HMAC secret's bytes).
        algorithms: the algorithms this key verifies: those configured that
            fit the key, narrowed to the JWK's own ``alg`` when it has one.
    """

    key: Any
    algorithms: tuple[str, ...]


def _fitting(key: Any, algorithms: tuple[str, ...]) -> tuple[str, ...]:
    """The algorithms of ``algorithms`` that can verify with ``key``."""
    import jwt

    known = jwt.algorithms.get_default_algorithms()
    fitting = []
    for name in algorithms:
        try:
            known[name].prepare_key(key)
        except (jwt.InvalidKeyError, TypeError, ValueError):
            continue
        fitting.append(name)
    return tuple(fitting)


def load_keys(scope: KeySource) -> Mapping[str | None, VerificationKey]:
    """Read the keys of a ``jwks_file`` or ``key_file`` scope, by key id.

    A ``key_file`` gives one key under ``None``. A JWK Set gives its signing
    keys (``use`` absent or ``"sig"``) by ``kid``; a key without a ``kid`` is
    filed under ``None``, and keys no configured algorithm fits are left out.
    A ``jwks_url`` scope gives no keys here (they are fetched when needed).

    Raises:
        ValueError: the file is not a key (or JWK Set) any configured algorithm
            can use; a private key where a public one belongs; an HMAC secret
            shorter than its algorithm needs.
        ImportError: PyJWT (or ``cryptography``) is not installed.
    """
    import jwt

    if scope.key_file is not None:
        data = scope.key_file.read_bytes()
        if all(name in HMAC_MIN_BYTES for name in scope.algorithms):
            secret = data[:-1] if data.endswith(b"\n") else data
            needed = max(HMAC_MIN_BYTES[name] for name in scope.algorithms)
            if len(secret) < needed:
                raise ValueError(
                    f"the HMAC secret is {len(secret)} bytes; {'/'.join(scope.algorithms)} needs {needed} or more "
                    "(RFC 7518 section 3.2)"
                )
            return MappingProxyType({None: VerificationKey(secret, scope.algorithms)})
        key = _public_key(data)
        algorithms = _fitting(key, scope.algorithms)
        if not algorithms:
            raise ValueError(f"no configured algorithm ({', '.join(scope.algorithms)}) can use this key")
        return MappingProxyType({None: VerificationKey(key, algorithms)})
    if scope.jwks_file is None:
        return MappingProxyType({})
    try:
        document = json.loads(scope.jwks_file.read_bytes())
    except ValueError as exc:
        raise ValueError(f"expected a JWK Set (JSON): {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('expected a JWK Set: a JSON object with a "keys" list (RFC 7517 section 5)')
    keys: dict[str | None, VerificationKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
            continue  # encryption keys, and shared secrets, which never belong in a JWK Set file
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
        wanted = tuple(a for a in scope.algorithms if a == entry["alg"]) if "alg" in entry else scope.algorithms
        algorithms = _fitting(jwk.key, wanted)
        if algorithms:
            kid = entry.get("kid")
            keys[kid if isinstance(kid, str) else None] = VerificationKey(jwk.key, algorithms)
    if not keys:
        raise ValueError(f"the JWK Set holds no signing key that {', '.join(scope.algorithms)} can use")
    return MappingProxyType(keys)


def _public_key(data: bytes) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from cryptography.x509 import load_pem_x509_certificate

    if b"PRIVATE KEY" in data:
        raise ValueError("this file holds a private key: give the proxy the public key only")
    try:
        if b"BEGIN CERTIFICATE" in data:
            return load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"expected a PEM public key or certificate: {exc}") from None
