"""Parsing the Idempotency-Key header, and building record keys from a scope.

The IETF draft (draft-ietf-httpapi-idempotency-key-header, section 2.1) makes
the header an RFC 8941 / RFC 9651 Item whose value is an sf-string
(``Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"``). Most clients in
the field, Stripe's SDKs among them, send the bare value instead
(``Idempotency-Key: 8e03978e-...``). Both forms are accepted and name the same
key. The draft's security section (section 5) asks servers to validate keys
against a published format and to build a composite lookup key from the
client's key and what the server knows of the client: that is the record key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..exceptions import InvalidKey
from .digests import Digests, as_digests

__all__ = [
    "MAX_FOLDED_BYTES",
    "MAX_KEY_LENGTH",
    "format_key",
    "make_record_key",
    "parse_key",
    "parse_key_value",
    "split_folded",
]

#: The longest key accepted, in characters (DESIGN: 1-255 printable ASCII).
MAX_KEY_LENGTH = 255

# Bare form: visible ASCII without '"' or ',' (a comma would make it a list).
_BARE = re.compile(rb"[\x21\x23-\x2b\x2d-\x7e]+")
# sf-string (RFC 9651 section 3.3.3): printable ASCII, with \" and \\ escaped.
_QUOTED = re.compile(rb'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_ESCAPE = re.compile(rb'\\(["\\])')
# Longest raw value worth parsing: every character escaped, plus quotes and padding.
_MAX_RAW = 2 * MAX_KEY_LENGTH + 64
#: Longest folded header value (bytes) :func:`split_folded` splits: four
#: repeats of the longest valid line. A longer one cannot be a key, so it is
#: left whole (and rejected as too long) rather than scanned byte by byte.
MAX_FOLDED_BYTES = 4 * (_MAX_RAW + 2)


def parse_key(values: Sequence[bytes]) -> str | None:
    """Return the idempotency key carried by the request's header lines.

    Args:
        values: the raw value of every ``Idempotency-Key`` header line, in the
            order received (ASGI gives latin-1 bytes; encode WSGI's str with
            latin-1).

    Returns:
        The key, or None when the request has no such header.

    Raises:
        InvalidKey: the value is empty, blank, longer than 255 characters, not
            printable ASCII, a list or an sf-string with parameters, or two
            header lines carry different values. The draft (section 2.1) says
            clients MUST NOT send more than one line; identical repeats, as some
            proxies produce, are tolerated.
    """
    if not values:
        return None
    first = values[0]
    for other in values[1:]:
        if other != first:
            raise InvalidKey("The request has two Idempotency-Key header lines with different values.")
    return parse_key_value(first)


def split_folded(value: bytes) -> list[bytes]:
    """Split a header value that a server folded from several lines back into lines.

    WSGI servers (PEP 3333 ``HTTP_*`` variables) and Django join repeated
    header lines with commas (RFC 9110 section 5.3). Commas inside an
    sf-string (``"a,b"``) belong to the value, so they do not split it.

    Args:
        value: the folded value, latin-1 bytes.

    Returns:
        The values, each stripped of optional whitespace; ``[value]`` when
        there is no comma outside a quoted string, or when the value is longer
        than :data:`MAX_FOLDED_BYTES` (no split, so no cost to a client that
        sends a huge header: the one value is too long to be a key).
    """
    if b"," not in value or len(value) > MAX_FOLDED_BYTES:
        return [value]
    parts: list[bytes] = []
    start = 0
    quoted = False
    escaped = False
    for index, byte in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and byte == 0x5C:  # backslash escapes inside an sf-string
            escaped = True
        elif byte == 0x22:
            quoted = not quoted
        elif byte == 0x2C and not quoted:
            parts.append(value[start:index].strip(b" \t"))
            start = index + 1
    parts.append(value[start:].strip(b" \t"))
    return parts


def parse_key_value(raw: bytes) -> str:
    """Parse one header value into a key (see :func:`parse_key` for the rules).

    Raises:
        InvalidKey: the value is not one valid key.
    """
    if len(raw) > _MAX_RAW:
        raise InvalidKey(f"The Idempotency-Key is longer than {MAX_KEY_LENGTH} characters.")
    value = raw.strip(b" \t")
    if not value:
        raise InvalidKey("The Idempotency-Key header is empty.")
    if value[0] == 0x22:  # '"': the draft's sf-string form
        match = _QUOTED.fullmatch(value)
        if match is None:
            raise InvalidKey(_explain(value, quoted=True))
        body = match.group(1)
        key_bytes = _ESCAPE.sub(rb"\1", body) if b"\\" in body else body
    else:
        if _BARE.fullmatch(value) is None:
            raise InvalidKey(_explain(value, quoted=False))
        key_bytes = value
    if len(key_bytes) > MAX_KEY_LENGTH:
        raise InvalidKey(f"The Idempotency-Key is longer than {MAX_KEY_LENGTH} characters.")
    if not key_bytes.strip(b" "):
        raise InvalidKey("The Idempotency-Key is blank.")
    return key_bytes.decode("ascii")


def format_key(key: str) -> str:
    """Return the header value that carries ``key``; the inverse of :func:`parse_key_value`.

    A key that is a valid bare value (visible ASCII without spaces, quotes or
    commas, e.g. a UUID) is sent bare, as Stripe's SDKs do, because servers
    that do not parse RFC 9651 strings would take the quotes for part of the
    key. Any other printable key is sent as the draft's sf-string (section 2.1),
    with ``"`` and ``\\`` escaped.

    Args:
        key: the idempotency key, 1-255 printable ASCII characters.

    Returns:
        The value to put in the ``Idempotency-Key`` header.

    Raises:
        InvalidKey: the key is empty, blank, longer than 255 characters, or
            holds a character that is not printable ASCII.
    """
    try:
        raw = key.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidKey("The Idempotency-Key contains a character that is not ASCII.") from None
    if not raw:
        raise InvalidKey("The Idempotency-Key is empty.")
    if len(raw) > MAX_KEY_LENGTH:
        raise InvalidKey(f"The Idempotency-Key is longer than {MAX_KEY_LENGTH} characters.")
    if _BARE.fullmatch(raw) is not None:
        return key
    if any(b < 0x20 or b == 0x7F for b in raw):
        raise InvalidKey("The Idempotency-Key contains a control character.")
    if not raw.strip(b" "):
        raise InvalidKey("The Idempotency-Key is blank.")
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _explain(value: bytes, *, quoted: bool) -> str:
    """Say why a header value is not a key, for the 400 problem detail."""
    if any(b < 0x20 or b == 0x7F for b in value):
        return "The Idempotency-Key contains a control character."
    if any(b > 0x7F for b in value):
        return "The Idempotency-Key contains a character that is not ASCII."
    if b"," in value:
        return "The Idempotency-Key header holds a list; send exactly one key."
    if quoted:
        return 'The Idempotency-Key is not one string: expected "..." with no parameters or other items after it.'
    if b" " in value or b"\t" in value:
        return "An unquoted Idempotency-Key cannot contain spaces; quote it as an sf-string."
    return "An unquoted Idempotency-Key cannot contain a double quote."


def make_record_key(principal: str, method: str, route: str, key: str, *, secret: Digests | bytes | str) -> str:
    """Return the store's record key for a key within its scope: an HMAC-SHA256 under the server secret.

    The parts are length-prefixed before hashing, so no two different scopes
    can produce the same input (scope ``"u1:x"`` with key ``"k"`` never equals
    scope ``"u1"`` with key ``"x:k"``). Keyed, so a leaked store cannot be
    checked against guessed keys (DESIGN "digest at rest").

    Args:
        principal: who sent the request (see :mod:`idempo.principals`).
        method: the HTTP method, upper-case (or ``"@idempotent"`` for functions).
        route: the path or route the key is unique within.
        key: the idempotency key.
        secret: the server secret (at least 16 bytes; see :mod:`idempo.secrets`).

    Returns:
        32 lower-case hex characters (128 bits of HMAC-SHA256).

    Raises:
        ValueError: the secret is shorter than 16 bytes.
    """
    return as_digests(secret).record_key(principal, method, route, key)
