"""The request fingerprint: a SHA-256 digest of what the request asks for.

The IETF draft (draft-ietf-httpapi-idempotency-key-header, section 2.4) lets a
server combine the key with a fingerprint of the request, and section 2.7 asks
for 422 when a key is reused with a different payload. idempo's fingerprint
covers the method, the path, the query (parameters sorted by name, so their
order does not matter; repeated names keep their order), the media type with
its parameters, and the body.

JSON bodies (``application/json`` or any ``+json`` type) are canonicalised
with RFC 8785 (JSON Canonicalization Scheme) first, so key order, whitespace
and string escapes do not change the fingerprint; numbers compare by value
(``1`` and ``1.0`` are equal, ``1`` and ``"1"`` are not); array order matters.
A body labelled JSON that does not parse, or that RFC 8785 cannot represent
(NaN, integers beyond 2**53), is hashed as raw bytes: never an error.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import parse_qsl, urlencode

import rfc8785

__all__ = ["canonical_body", "canonical_query", "fingerprint", "is_json_media_type"]


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
        canonical_json: canonicalise JSON bodies with RFC 8785 (default True).

    Returns:
        64 lower-case hex characters (SHA-256).
    """
    media = _media_type(content_type)
    digest = hashlib.sha256()
    for part in (
        method.encode("ascii", "replace"),
        path.encode("utf-8", "surrogateescape"),
        canonical_query(query),
        media,
        canonical_body(media, body) if canonical_json else body,
    ):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
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


def canonical_body(media_type: bytes, body: bytes) -> bytes:
    """Return the body in RFC 8785 canonical form when it is JSON, else as is.

    The result is prefixed with ``j:`` (canonical JSON) or ``r:`` (raw bytes),
    so a raw body can never collide with the canonical form of another.
    """
    if body and is_json_media_type(media_type):
        try:
            return b"j:" + rfc8785.dumps(json.loads(body))
        except (ValueError, TypeError, RecursionError, rfc8785.CanonicalizationError):
            pass
    return b"r:" + body


def is_json_media_type(media_type: bytes) -> bool:
    """True for ``application/json`` and structured-syntax ``+json`` types (RFC 6839)."""
    essence = media_type.split(b";", 1)[0]
    return essence == b"application/json" or essence.endswith(b"+json")


def _media_type(content_type: bytes | str | None) -> bytes:
    """Normalise a Content-Type value: lower-case, no spaces around parameters."""
    if not content_type:
        return b""
    raw = content_type.encode("latin-1") if isinstance(content_type, str) else content_type
    return b";".join(part.strip() for part in raw.lower().split(b";"))
