"""The request fingerprint: an HMAC-SHA256 digest of what the request asks for, keyed with the server secret.

The IETF draft (draft-ietf-httpapi-idempotency-key-header, section 2.4) lets a
server combine the key with a fingerprint of the request, and section 2.7 asks
for 422 when a key is reused with a different payload. idempo's fingerprint
covers the method, the path, the query (parameters sorted by name, so their
order does not matter; repeated names keep their order), the media type with
its parameters, and the body.

JSON bodies (``application/json`` or any ``+json`` type, RFC 6839) are put in a
canonical form first, so key order, whitespace and string escapes do not
change the fingerprint; numbers compare by value (``1``, ``1.0`` and ``1e0``
are equal, ``1`` and ``"1"`` are not); array order matters. Two bodies get the
same canonical form exactly when RFC 8785 (the JSON Canonicalization Scheme)
gives them the same form, which a property test checks against the
``rfc8785`` package; the form itself is produced by the standard library's C
JSON codec, several times faster than a pure-Python RFC 8785 serialiser on the
request path. Integers are kept exact at any size. A body labelled JSON that
is not UTF-8 JSON, or holds NaN or Infinity, is hashed as raw bytes: never an
error.

The digest is keyed with the server secret (:mod:`idempo.secrets`), so a
stored fingerprint cannot be checked against guessed bodies (DESIGN "digest
at rest"): an unkeyed hash of ``{"pin":"4821"}`` falls in a few thousand
guesses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import json.encoder
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

from .digests import Digests, as_digests

__all__ = ["canonical_json", "canonical_query", "fingerprint", "is_json_media_type", "legacy_fingerprint"]

# Floats that hold an integer within 2**53 become ints, so 1.0 and 1e0 equal 1
# as RFC 8785 (ECMAScript number formatting) has it; other floats print with
# Python's shortest round-trip repr, one spelling per value.
_EXACT = 2**53


def _number(text: str) -> int | float:
    value = float(text)
    if value.is_integer() and -_EXACT < value < _EXACT:
        return int(value)
    return value


def _no_constants(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")  # NaN and Infinity are not JSON (RFC 8259)


_DECODER = json.JSONDecoder(parse_float=_number, parse_constant=_no_constants)
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# The C scanner and encoder behind _DECODER and _ENCODER, called directly: the
# Python wrappers (decode/raw_decode, encode/iterencode, which builds a new C
# encoder on every call) cost more than the work for a small body. Decoded JSON
# holds no cycles, so the encoder skips the circular-reference check. Where
# the C accelerator is missing (other interpreters), the wrappers are used.
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_c_make_encoder: Any = vars(json.encoder).get("c_make_encoder")  # None without the C accelerator
_C_ENCODE: Callable[[Any, int], Any] | None = (
    _c_make_encoder(None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", True, False, False)
    if _c_make_encoder is not None
    else None
)
_JSON_WS = " \t\n\r"  # RFC 8259 section 2: the only whitespace allowed around values


# (method, path, query, content type) -> (the length-prefixed head of the hashed
# input, whether the body is JSON). An API sees few distinct combinations, and
# computing the head costs more than hashing a small body; bounded, and only
# short heads are kept, so paths with ids cannot grow it without limit.
_HEADS: dict[tuple[str, str, bytes | str, bytes | str | None], tuple[bytes, bool]] = {}
_HEADS_MAX = 4096
_HEAD_MAX_BYTES = 1024


def _head(key: tuple[str, str, bytes | str, bytes | str | None]) -> tuple[bytes, bool]:
    method, path, query, content_type = key
    media = _media_type(content_type)
    method_b = method.encode("ascii", "replace")
    path_b = path.encode("utf-8", "surrogateescape")
    query_b = canonical_query(query)
    # Every part but the body is length-prefixed, so no two requests share an input.
    parts = (len(method_b), method_b, len(path_b), path_b, len(query_b), query_b, len(media), media)
    head = b"%d:%b%d:%b%d:%b%d:%b" % parts
    result = (head, is_json_media_type(media))
    if len(head) <= _HEAD_MAX_BYTES:
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        _HEADS[key] = result
    return result


def fingerprint(
    method: str,
    path: str,
    query: bytes | str,
    content_type: bytes | str | None,
    body: bytes,
    *,
    secret: Digests | bytes | str,
    canonical_json: bool = True,
) -> str:
    """Return the fingerprint of a request.

    Args:
        method: the HTTP method, e.g. ``"POST"``.
        path: the request path, without the query.
        query: the raw query string (bytes from ASGI, str from WSGI).
        content_type: the ``Content-Type`` header value, or None.
        body: the complete request body.
        secret: the server secret (or the front's :class:`~idempo._core.digests.Digests`).
        canonical_json: canonicalise JSON bodies (default True).

    Returns:
        64 lower-case hex characters (HMAC-SHA256).

    Raises:
        ValueError: the secret is shorter than 16 bytes.
    """
    digest = (secret if isinstance(secret, Digests) else as_digests(secret)).fingerprint_hash()
    return _hexdigest(digest, method, path, query, content_type, body, canonical_json)


def legacy_fingerprint(
    method: str, path: str, query: bytes | str, content_type: bytes | str | None, body: bytes, *, canonical_json: bool
) -> str:
    """The fingerprint versions before keyed digests stored: the same input under plain SHA-256.

    Only to compare a request with a record of such a version during the
    legacy window (``idempo migrate --legacy-digests``).
    """
    return _hexdigest(hashlib.sha256(), method, path, query, content_type, body, canonical_json)


class _Hasher(Protocol):
    """A hash object: hmac.HMAC (keyed) or hashlib's SHA-256 (the legacy fingerprint)."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def _hexdigest(
    digest: _Hasher,
    method: str,
    path: str,
    query: bytes | str,
    content_type: bytes | str | None,
    body: bytes,
    canonical_json: bool,
) -> str:
    """Feed the request's length-prefixed head and its body (canonical JSON or raw) to ``digest``."""
    key = (method, path, query, content_type)
    head, is_json = _HEADS.get(key) or _head(key)
    digest.update(head)
    if canonical_json and is_json and body:
        try:
            canonical = canonical_json_bytes(body)
        except (ValueError, RecursionError):
            pass
        else:
            digest.update(b"j:")
            digest.update(canonical)
            return digest.hexdigest()
    digest.update(b"r:")
    digest.update(body)
    return digest.hexdigest()


def canonical_query(query: bytes | str) -> bytes:
    """Return the query with parameters stably sorted by name.

    ``b=2&a=1`` and ``a=1&b=2`` give the same bytes; ``a=1&a=2`` and
    ``a=2&a=1`` do not, because the order of repeated values can matter.
    """
    if not query:
        return b""
    text = query.decode("latin-1") if isinstance(query, bytes) else query
    pairs = parse_qsl(text, keep_blank_values=True)
    pairs.sort(key=lambda pair: pair[0])
    return urlencode(pairs).encode("ascii")


def canonical_json(body: bytes) -> bytes:
    """Return the canonical form of a UTF-8 JSON text (see the module docstring).

    Raises:
        ValueError: the body is not UTF-8 JSON, or holds NaN or Infinity.
        RecursionError: the body nests deeper than the parser allows.
    """
    return canonical_json_bytes(body)


def canonical_json_bytes(body: bytes) -> bytes:
    """:func:`canonical_json` on the C scanner and encoder directly (the same output, fewer calls).

    A name of its own because :func:`fingerprint`'s ``canonical_json``
    argument shadows the public function there.
    """
    text = body.decode("utf-8")
    if _C_ENCODE is None:
        return _ENCODER.encode(_DECODER.decode(text)).encode("utf-8", "surrogatepass")
    start = 0
    if text[:1] in _JSON_WS:
        start = len(text) - len(text.lstrip(_JSON_WS))
    try:
        value, end = _SCAN(text, start)
    except StopIteration:
        raise ValueError("Expecting value") from None
    if end != len(text) and text[end:].strip(_JSON_WS):
        raise ValueError("Extra data")
    return "".join(_C_ENCODE(value, 0)).encode("utf-8", "surrogatepass")


def is_json_media_type(media_type: bytes) -> bool:
    """True for ``application/json`` and structured-syntax ``+json`` types (RFC 6839)."""
    essence = media_type.split(b";", 1)[0]
    return essence == b"application/json" or essence.endswith(b"+json")


def _media_type(content_type: bytes | str | None) -> bytes:
    if not content_type:
        return b""
    raw = content_type.encode("latin-1") if isinstance(content_type, str) else content_type
    return _normalise_media_type(raw)


@functools.lru_cache(maxsize=256)
def _normalise_media_type(raw: bytes) -> bytes:
    """Lower-case, no spaces around parameters; a request sends few distinct values."""
    return b";".join(part.strip() for part in raw.lower().split(b";"))
