"""The request fingerprint: a SHA-256 digest of what the request asks for.

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
"""

from __future__ import annotations

import functools
import hashlib
import json
from urllib.parse import parse_qsl, urlencode

__all__ = ["canonical_body", "canonical_json", "canonical_query", "fingerprint", "is_json_media_type"]

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


def fingerprint(
    method: str,
    path: str,
    query: bytes | str,
    content_type: bytes | str | None,
    body: bytes,
    *,
    canonical_json: bool = True,
) -> str:
    """Return the fingerprint of a request.

    Args:
        method: the HTTP method, e.g. ``"POST"``.
        path: the request path, without the query.
        query: the raw query string (bytes from ASGI, str from WSGI).
        content_type: the ``Content-Type`` header value, or None.
        body: the complete request body.
        canonical_json: canonicalise JSON bodies (default True).

    Returns:
        64 lower-case hex characters (SHA-256).
    """
    media = _media_type(content_type)
    method_b = method.encode("ascii", "replace")
    path_b = path.encode("utf-8", "surrogateescape")
    query_b = canonical_query(query)
    # Every part but the last is length-prefixed, so no two requests share an input.
    digest = hashlib.sha256(
        b"%d:%b%d:%b%d:%b%d:%b"
        % (len(method_b), method_b, len(path_b), path_b, len(query_b), query_b, len(media), media)
    )
    digest.update(canonical_body(media, body) if canonical_json else b"r:" + body)
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
    text = _ENCODER.encode(_DECODER.decode(body.decode("utf-8")))
    return text.encode("utf-8", "surrogatepass")


def canonical_body(media_type: bytes, body: bytes) -> bytes:
    """Return the body in canonical form when it is JSON, else as is.

    The result is prefixed with ``j:`` (canonical JSON) or ``r:`` (raw bytes),
    so a raw body can never collide with the canonical form of another.
    """
    if body and is_json_media_type(media_type):
        try:
            return b"j:" + canonical_json(body)
        except (ValueError, RecursionError):
            pass
    return b"r:" + body


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
