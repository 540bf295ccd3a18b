"""The request fingerprint: an HMAC-SHA256 digest of what the request asks for, keyed with the server secret.

The IETF draft (draft-ietf-httpapi-idempotency-key-header, section 2.4) lets a
server combine the key with a fingerprint of the request, and section 2.7 asks
for 422 when a key is reused with a different payload. idempo's fingerprint
covers the method, the path, the query, the media type with its parameters,
and the body. The rule (DESIGN, "fingerprint"): two requests that can mean
different things to the app never share one; spellings the app cannot tell
apart may.

- **Path and query** are taken byte for byte where the bytes are not UTF-8
  (``/files/%FF`` and ``/files/%FE`` differ, as do ``?sig=%FF`` and
  ``?sig=%FE``). Query parameters are sorted by name, so their order does not
  matter; repeated names keep their order.
- **Media type** (RFC 9110 section 8.3.1): the type, subtype and parameter
  names are case-insensitive and compared in lower case, as is the value of
  ``charset`` (section 8.3.2); every other parameter value keeps its case
  (a multipart ``boundary`` is case-sensitive, RFC 2046 section 5.1.1), and a
  quoted value equals the same value unquoted. A value that does not parse as
  a media type is taken as it is.
- **JSON bodies** (``application/json`` or any ``+json`` type, RFC 6839) are
  put in a canonical form first, so key order, whitespace and string escapes
  do not change the fingerprint; array order matters, and ``1`` and ``"1"``
  differ. Numbers are equal exactly when their decimal values are equal:
  ``1``, ``1.0``, ``1e0`` and ``10e-1`` are one number, as are
  ``9007199254740992`` and ``9007199254740992.0``. Every equality this gives
  RFC 8785 (the JSON Canonicalization Scheme) gives too, which a property
  test checks against the ``rfc8785`` package; RFC 8785 makes more, because it
  reads numbers as IEEE doubles: ``9007199254740993`` equals
  ``9007199254740992`` there, and ``0.1`` equals ``0.10000000000000001``.
  idempo keeps those apart, because the app need not read doubles (Python's
  ``json`` keeps integers exact; ``parse_float=Decimal`` keeps decimals
  exact). One equality of values is not made: an integer of 10**21 or more
  written with digits only differs from the same value written with a
  fraction or an exponent (``1e21``). The form is produced by the standard
  library's C JSON codec, several times faster than a pure-Python RFC 8785
  serialiser on the request path. A body labelled JSON that is not UTF-8
  JSON, or holds NaN or Infinity, is hashed as raw bytes: never an error.

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
import math
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

from .digests import Digests, as_digests

__all__ = [
    "BodySource",
    "canonical_json",
    "canonical_query",
    "fingerprint",
    "is_json_media_type",
    "legacy_fingerprint",
    "media_type",
]


class BodySource(Protocol):
    """A request body kept outside memory (``idempo proxy`` spools a keyed request's body to a file).

    Anything that takes a body as ``bytes`` in this module also takes one of
    these: a raw body is hashed chunk by chunk; a JSON body is read whole,
    because its canonical form needs the whole document.
    """

    def __len__(self) -> int:
        """The body's size in bytes."""

    def chunks(self) -> Iterator[bytes]:
        """The body from its start, a chunk at a time."""

    def read(self) -> bytes:
        """The whole body."""


# Numbers. The C scanner hands every literal with a fraction or an exponent to
# _number, which returns what the C encoder then prints: an int for an
# integral value below 10**21 (1.0, 1e2 and 9007199254740992.0 print as
# integers, as integer literals do), else the float whose shortest repr has
# the literal's value ("2.5", "1e-07"). A literal whose value is no float's
# shortest repr (0.10000000000000001, 1e400, 1e-400) raises _Inexact, and the
# body is encoded again by _slow_canonical, which prints such a number in a
# normalised exponent form of its exact value. Integer literals are the C
# scanner's exact ints, printed in full.
_EXACT = 2**53
_PLAIN = 10**21  # ECMAScript (RFC 8785) prints integers below this without an exponent
_PLAIN_FLOAT = 1e21  # exactly 10**21
_PLAIN_DECIMAL = Decimal(_PLAIN)
_float_repr = float.__repr__


class _Inexact(Exception):
    """A number literal whose exact value no float's shortest repr spells (see :func:`_number`)."""


def _number(text: str) -> int | float:
    """The value of a JSON number literal with a fraction or an exponent, as the C encoder is to print it.

    Raises:
        _Inexact: no float's repr spells the value; the body takes the slow path.
        ValueError: the exponent is beyond what :class:`~decimal.Decimal` holds.
    """
    value = float(text)
    if _float_repr(value) == text or (math.isfinite(value) and _same_value(text, _float_repr(value))):
        if not value.is_integer():
            return value
        if -_EXACT < value < _EXACT:
            return int(value)
        if -_PLAIN_FLOAT < value < _PLAIN_FLOAT:
            return int(Decimal(text))  # the literal's value, which the double only approximates
        return value
    exact = _decimal(text)
    if -_PLAIN_DECIMAL < exact < _PLAIN_DECIMAL and exact == exact.to_integral_value():
        return int(exact)
    raise _Inexact(text)


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except ArithmeticError:  # an exponent past Decimal's range: not a number we can compare
        raise ValueError(f"{text[:40]} is out of range") from None


def _same_value(text: str, spelling: str) -> bool:
    """True when two number literals have the same decimal value."""
    if "e" not in text and "E" not in text:
        # Trailing zeros of a fraction, the usual difference ("5.50", "2.000"), without a Decimal.
        trimmed = text.rstrip("0")
        if (trimmed + "0" if trimmed[-1] == "." else trimmed) == spelling:
            return True
    return _decimal(text) == Decimal(spelling)


class _Literal:
    """A number printed as the normalised exponent form of its exact value (``1.5e+400``)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        mantissa, _, exponent = format(_decimal(text), "e").partition("e")
        if "." in mantissa:
            mantissa = mantissa.rstrip("0").rstrip(".")
        self.text = f"{mantissa}e{exponent}"


def _slow_number(text: str) -> int | float | _Literal:
    try:
        return _number(text)
    except _Inexact:
        return _Literal(text)


def _no_constants(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")  # NaN and Infinity are not JSON (RFC 8259)


_DECODER = json.JSONDecoder(parse_float=_number, parse_constant=_no_constants)
_SLOW_DECODER = json.JSONDecoder(parse_float=_slow_number, parse_constant=_no_constants)
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
    media = media_type(content_type)
    method_b = method.encode("utf-8", "surrogatepass")
    path_b = _path_bytes(path)
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
    body: bytes | BodySource,
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
        body: the complete request body (bytes, or a :class:`BodySource`).
        secret: the server secret (or the front's :class:`~idempo._core.digests.Digests`).
        canonical_json: canonicalise JSON bodies (default True).

    Returns:
        64 lower-case hex characters (HMAC-SHA256).

    Raises:
        ValueError: the secret is shorter than 16 bytes.
    """
    digests = secret if isinstance(secret, Digests) else as_digests(secret)
    prefix, payload = _input(method, path, query, content_type, body, canonical_json)
    if type(payload) is bytes and len(payload) <= _ONE_SHOT_BYTES:
        # One HMAC over the whole input: the same digest as feeding it in parts, without the hash object.
        return digests.fingerprint_of(prefix + payload)
    digest = digests.fingerprint_hash()
    digest.update(prefix)
    _update(digest, payload)
    return digest.hexdigest()


def legacy_fingerprint(
    method: str,
    path: str,
    query: bytes | str,
    content_type: bytes | str | None,
    body: bytes | BodySource,
    *,
    canonical_json: bool,
) -> str:
    """The fingerprint versions before keyed digests stored: their input under plain SHA-256.

    Only to compare a request with a record of such a version during the
    legacy window (``idempo migrate --legacy-digests``). Those versions also
    canonicalised some inputs more loosely (the whole media type lower-cased,
    query escapes that are not UTF-8 read as U+FFFD, numbers read as doubles
    up to 2**53); that input is rebuilt here, so a retry across the upgrade
    still matches its record (a multipart upload's ``boundary=AbC`` included).
    """
    digest = hashlib.sha256()
    head = _legacy_head(method, path, query, content_type)
    digest.update(head)
    if canonical_json and len(body) and is_json_media_type(_legacy_media_type(content_type)):
        try:
            canonical = _legacy_canonical_json(body if isinstance(body, bytes) else body.read())
        except (ValueError, RecursionError):
            pass
        else:
            digest.update(b"j:")
            digest.update(canonical)
            return digest.hexdigest()
    digest.update(b"r:")
    _update(digest, body)
    return digest.hexdigest()


def _update(digest: _Hasher, body: bytes | BodySource) -> None:
    """Feed a raw body to ``digest``: at once, or a :class:`BodySource` chunk by chunk."""
    if isinstance(body, bytes):
        digest.update(body)
    else:
        for chunk in body.chunks():
            digest.update(chunk)


def _legacy_head(method: str, path: str, query: bytes | str, content_type: bytes | str | None) -> bytes:
    """The length-prefixed head as versions before keyed digests built it."""
    media = _legacy_media_type(content_type)
    method_b = method.encode("ascii", "replace")
    path_b = path.encode("utf-8", "surrogateescape")
    if query:
        text = query.decode("latin-1") if isinstance(query, bytes) else query
        pairs = parse_qsl(text, keep_blank_values=True)
        pairs.sort(key=lambda pair: pair[0])
        query_b = urlencode(pairs).encode("ascii")
    else:
        query_b = b""
    parts = (len(method_b), method_b, len(path_b), path_b, len(query_b), query_b, len(media), media)
    return b"%d:%b%d:%b%d:%b%d:%b" % parts


def _legacy_media_type(content_type: bytes | str | None) -> bytes:
    if not content_type:
        return b""
    raw = content_type if isinstance(content_type, bytes) else content_type.encode("latin-1", "replace")
    return b";".join(part.strip() for part in raw.lower().split(b";"))


def _legacy_number(text: str) -> int | float:
    value = float(text)
    if value.is_integer() and -_EXACT < value < _EXACT:
        return int(value)
    return value


_LEGACY_DECODER = json.JSONDecoder(parse_float=_legacy_number, parse_constant=_no_constants)


def _legacy_canonical_json(body: bytes) -> bytes:
    """The canonical JSON of versions before keyed digests (numbers read as doubles)."""
    return _ENCODER.encode(_LEGACY_DECODER.decode(body.decode("utf-8"))).encode("utf-8", "surrogatepass")


class _Hasher(Protocol):
    """A hash object: a KeyedHash (HMAC-SHA256) or hashlib's SHA-256 (the legacy fingerprint)."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


#: Bytes of body up to which the fingerprint's input is hashed in one piece (joined to its head);
#: a larger body is fed to the hash as it is, not copied.
_ONE_SHOT_BYTES = 64 * 1024


def _input(
    method: str,
    path: str,
    query: bytes | str,
    content_type: bytes | str | None,
    body: bytes | BodySource,
    canonical_json: bool,
) -> tuple[bytes, bytes | BodySource]:
    """The fingerprint's input: the request's length-prefixed head with the body's tag, then the body
    (its canonical JSON, ``j:``, or the raw bytes, ``r:``)."""
    key = (method, path, query, content_type)
    head, is_json = _HEADS.get(key) or _head(key)
    if canonical_json and is_json and len(body):
        try:
            canonical = canonical_json_bytes(body if isinstance(body, bytes) else body.read())
        except (ValueError, RecursionError):
            pass
        else:
            return head + b"j:", canonical
    return head + b"r:", body


def canonical_query(query: bytes | str) -> bytes:
    """Return the query with parameters stably sorted by name.

    ``b=2&a=1`` and ``a=1&b=2`` give the same bytes; ``a=1&a=2`` and
    ``a=2&a=1`` do not, because the order of repeated values can matter.
    Escapes that are not UTF-8 keep their bytes (``sig=%FF`` and ``sig=%FE``
    differ); str (WSGI's latin-1 text, PEP 3333) and bytes (ASGI) agree.
    """
    if not query:
        return b""
    text = query.decode("latin-1") if isinstance(query, bytes) else query
    pairs = parse_qsl(text, keep_blank_values=True, errors="surrogateescape")
    pairs.sort(key=lambda pair: pair[0])
    try:
        return urlencode(pairs, errors="surrogateescape").encode("ascii")
    except UnicodeEncodeError:
        # A str holding a lone surrogate no server sends (not latin-1 text):
        # marked by a byte urlencode never writes, so it meets no real query.
        return b"\x00" + text.encode("utf-8", "surrogatepass")


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
        try:
            return _ENCODER.encode(_DECODER.decode(text)).encode("utf-8", "surrogatepass")
        except _Inexact:
            return _slow_canonical(text)
    start = 0
    if text[:1] in _JSON_WS:
        start = len(text) - len(text.lstrip(_JSON_WS))
    try:
        value, end = _SCAN(text, start)
    except StopIteration:
        raise ValueError("Expecting value") from None
    except _Inexact:
        return _slow_canonical(text)
    if end != len(text) and text[end:].strip(_JSON_WS):
        raise ValueError("Extra data")
    return "".join(_C_ENCODE(value, 0)).encode("utf-8", "surrogatepass")


def _slow_canonical(text: str) -> bytes:
    """The canonical form of a body holding a number no float spells (see :class:`_Literal`).

    The same output as the C encoder for every other value; only such rare
    bodies pay for the pure-Python encoder.
    """
    chunks: list[str] = []
    _encode(_SLOW_DECODER.decode(text), chunks)
    return "".join(chunks).encode("utf-8", "surrogatepass")


_encode_string: Callable[[str], str] = json.encoder.encode_basestring


def _encode(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(_encode_string(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(_float_repr(value))
    elif isinstance(value, _Literal):
        out.append(value.text)
    elif isinstance(value, dict):
        out.append("{")
        for index, (name, item) in enumerate(sorted(value.items(), key=lambda pair: pair[0])):
            if index:
                out.append(",")
            out.append(_encode_string(name))
            out.append(":")
            _encode(item, out)
        out.append("}")
    else:
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, out)
        out.append("]")


def is_json_media_type(media_type: bytes) -> bool:
    """True for ``application/json`` and structured-syntax ``+json`` types (RFC 6839)."""
    essence = media_type.split(b";", 1)[0]
    return essence == b"application/json" or essence.endswith(b"+json")


def _path_bytes(path: str) -> bytes:
    """The path's bytes: UTF-8, with the bytes a server could not decode given back (surrogateescape)."""
    try:
        return path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no server decodes to: kept, never an error
        return path.encode("utf-8", "surrogatepass")


def media_type(content_type: bytes | str | None) -> bytes:
    """A ``Content-Type`` value in one spelling per meaning (as the fingerprint covers it); b"" when absent.

    Text is taken as PEP 3333's latin-1 (UTF-8 where it is not); the
    spelling rules are those of the module docstring (RFC 9110 section 8.3).
    """
    if not content_type:
        return b""
    if isinstance(content_type, str):
        try:
            raw = content_type.encode("latin-1")
        except UnicodeEncodeError:  # not the latin-1 text PEP 3333 promises
            raw = content_type.encode("utf-8", "surrogatepass")
    else:
        raw = content_type
    return _normalise_media_type(raw)


# RFC 9110 section 8.3.1: media-type = type "/" subtype parameters, with
# parameters = *( OWS ";" OWS [ parameter ] ), parameter = name "=" ( token / quoted-string ).
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_TYPE = re.compile(rb"[ \t]*(" + _TOKEN + rb")/(" + _TOKEN + rb")[ \t]*")
_PARAMETER = re.compile(
    rb";[ \t]*(?:(" + _TOKEN + rb")=(?:(" + _TOKEN + rb')|"((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]'
    rb'|\\[\t \x21-\x7e\x80-\xff])*)"))?[ \t]*'
)
_IS_TOKEN = re.compile(_TOKEN)
_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)


@functools.lru_cache(maxsize=256)
def _normalise_media_type(raw: bytes) -> bytes:
    """The media type in one spelling per meaning (see the module docstring); a request sends few distinct values.

    Lower-cased: the type, subtype and parameter names (RFC 9110 section
    8.3.1) and the ``charset`` value (section 8.3.2). Kept: every other value
    (a ``boundary`` is case-sensitive, RFC 2046 section 5.1.1) and the order
    of the parameters. A quoted value is unquoted, and quoted again only when
    it is not a token, so the result parses back to the same parameters. A
    value that is not a media type is returned as it is: no canonical form
    equals it, since each one parses.
    """
    match = _TYPE.match(raw)
    if match is None:
        return raw
    parts = [match.group(1).lower(), b"/", match.group(2).lower()]
    position, end = match.end(), len(raw)
    while position < end:
        parameter = _PARAMETER.match(raw, position)
        if parameter is None:
            return raw
        position = parameter.end()
        name, token, quoted = parameter.groups()
        if name is None:
            continue  # an empty parameter (";;"), which the grammar allows
        value = token if token is not None else _QUOTED_PAIR.sub(rb"\1", quoted)
        name = name.lower()
        if name == b"charset":
            value = value.lower()
        if not _IS_TOKEN.fullmatch(value):
            value = b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        parts += (b";", name, b"=", value)
    return b"".join(parts)
