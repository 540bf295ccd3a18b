"""The HTTP side of the protocol, without I/O: what every server adapter shares.

An adapter (ASGI, WSGI, Django) reads the request, then asks this module:

1. :func:`takes_part` and :func:`check_key`: does the request take part, under
   which key, or is it a 400?
2. :func:`content_type_of`: the one media type the fingerprint covers, or a 400.
3. :func:`request_identity`: the record key and fingerprint of the request
   (over the path :func:`identity_path` gives back the raw bytes of).
4. :func:`decision_answer`: the answer for a replay, a 409 or a 422.

and, once the handler ran, :class:`~idempo._core.capture.ResponseCapture`
says what of its response is stored. Which policy applies comes first, from
:mod:`idempo._core.routes`. So the rules of the DESIGN "HTTP behaviour" table
are written once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from ..exceptions import InvalidKey
from .digests import Digests, legacy_record_key
from .fingerprint import BodySource, fingerprint, is_json_media_type, legacy_fingerprint, media_type
from .flow import Held, InProgress, LegacyIdentity, Mismatch, NotReplayable, Replay
from .frozen import fast_init
from .keys import parse_key, split_folded
from .policy import Policy
from .problems import (
    BODY_INCOMPLETE,
    BODY_TOO_LARGE,
    CONTENT_TYPE_AMBIGUOUS,
    FINGERPRINT_MISMATCH,
    INVALID_CONTENT_LENGTH,
    INVALID_KEY,
    KEY_IN_PROGRESS,
    METHOD_AMBIGUOUS,
    MISSING_KEY,
    OUTCOME_UNKNOWN,
    PRINCIPAL_REQUIRED,
    RESPONSE_NOT_REPLAYABLE,
    STORE_UNAVAILABLE,
    problem_response,
)
from .records import StoredResponse

__all__ = [
    "BYPASSED_HEADER",
    "REPLAYED_HEADER",
    "RequestIdentity",
    "body_incomplete_answer",
    "body_too_large_answer",
    "check_key",
    "content_type_of",
    "decision_answer",
    "declared_length",
    "escaped_slash_path",
    "fingerprint_off_loop",
    "identity_path",
    "invalid_content_length_answer",
    "method_ambiguous_answer",
    "legacy_identity",
    "principal_required_answer",
    "request_identity",
    "store_unavailable_answer",
    "takes_part",
]

#: Added to every replay (Stripe's header), never to a first answer.
REPLAYED_HEADER = (b"idempotent-replayed", b"true")
#: Added when the store was down and ``Policy.fail_open`` let the handler run unprotected.
BYPASSED_HEADER = (b"idempotency-bypassed", b"store-unavailable")


def takes_part(policy: Policy, method: str) -> bool:
    """Whether a request with ``method`` goes through the admission under ``policy`` (else: passed through).

    Methods are case-sensitive tokens (RFC 9110 section 9.1), so ``post`` is
    not ``POST``; but Flask (Werkzeug) and Django upper-case the method before
    routing and run a ``post`` as the POST view, while Starlette, FastAPI and
    Litestar answer it 405. A method that is a covered method in other letter
    case therefore takes part too, on every front, never passing through
    unprotected: :func:`check_key` applies the route's key rules to it and
    answers it with a key 400 ``method-ambiguous`` (:func:`method_ambiguous_answer`).

    Args:
        policy: the route's policy (``policy.methods`` are upper case).
        method: the request method exactly as the server passed it.
    """
    return method in policy.methods or method.upper() in policy.methods


def method_ambiguous_answer(method: str) -> StoredResponse:
    """The 400 for a key sent with a covered method in other letter case (:func:`takes_part`)."""
    detail = f"The method {method!r} is not {method.upper()!r}: methods are case-sensitive; send {method.upper()}."
    return problem_response(METHOD_AMBIGUOUS, detail)


def check_key(policy: Policy, method: str, path: str, key_values: Sequence[bytes]) -> str | StoredResponse | None:
    """Decide whether a request takes part in idempotency, from its key header lines.

    Args:
        policy: the route's policy (the caller has checked :func:`takes_part`).
        method: the request method, for the 400 detail.
        path: the request path, for the 400 detail.
        key_values: the raw values of every ``Idempotency-Key`` line.

    Returns:
        The key; None to pass the request through untouched (no key and
        ``require_key`` off); or the 400 problem to answer with (missing key
        where required, malformed key; draft section 2.7). A request whose
        method only differs in case from a covered one gets the same answers;
        with a valid key, the caller answers :func:`method_ambiguous_answer`.
    """
    try:
        key = parse_key(key_values)
    except InvalidKey as exc:
        return problem_response(INVALID_KEY, str(exc))
    if key is None and policy.require_key:
        detail = f"{method} {path} requires an Idempotency-Key header (a unique value such as a UUID)."
        return problem_response(MISSING_KEY, detail)
    return key


def content_type_of(values: Sequence[bytes]) -> bytes | StoredResponse | None:
    """The request's media type, from its ``Content-Type`` header lines; a 400 when they name two.

    ``Content-Type`` is a singleton field (RFC 9110 sections 5.3 and 8.3):
    two lines that differ are an error, and frameworks would each read their
    own (Starlette the first line, a WSGI server one of them or, as waitress
    does, both joined with a comma), so no fingerprint could cover what the
    app reads. The lines, and the comma-separated parts of each (what a WSGI
    server makes of two lines; a comma inside a quoted parameter value is no
    separator), must therefore be one media type. Identical repeats count as
    one, as for ``Idempotency-Key``. The rule is the same on every front.

    Args:
        values: the raw value of every ``Content-Type`` line (latin-1 bytes).

    Returns:
        None without the header; the one value; or the 400 problem to answer
        with (nothing run, nothing stored).
    """
    if not values:
        return None
    first = values[0]
    if len(values) == 1 and b"," not in first:
        return first
    parts = [part for value in values for part in split_folded(value)]
    first = parts[0]
    for other in parts[1:]:
        if other != first:
            detail = "The request has two different Content-Type values; send exactly one media type."
            return problem_response(CONTENT_TYPE_AMBIGUOUS, detail)
    return first


def identity_path(path: str, raw_path: bytes | None) -> str:
    """The path a record key and fingerprint are made of (ASGI): ``path``, with what decoding lost given back.

    ASGI servers percent-decode the path (uvicorn and hypercorn use
    ``unquote``), and two things are lost on the way, both kept by the raw
    path (``raw_path``, ASGI 3, the request target's path with its escapes):

    - bytes that are not UTF-8, replaced with U+FFFD, so ``/files/%FF`` and
      ``/files/%FE`` arrive as one ``path``: they are decoded with
      ``surrogateescape``, as the WSGI front decodes PEP 3333's latin-1 text;
    - an encoded slash: ``/a%2Fb`` arrives as ``/a/b``, yet it is another
      resource (RFC 3986 section 2.2: a reserved character and its escape are
      not equivalent), with one path segment where ``/a/b`` has two. Such a
      path is kept in the form :func:`escaped_slash_path` gives.

    So one request has one record key and fingerprint under either front. A
    path that has neither is returned as it is, so its record key never changes.

    Args:
        path: the scope's ``path``.
        raw_path: the scope's ``raw_path`` (the bytes of the request target's
            path, escapes not decoded), or None when the server gives none.
    """
    if not isinstance(raw_path, bytes):
        return escaped_slash_path(path, b"") if _has_percent(path) else path
    slashes = b"%2" in raw_path and _ENCODED_SLASH.search(raw_path) is not None
    if not slashes and "\ufffd" not in path and "%" not in path:  # _has_percent, inlined: every request
        return path
    faithful = unquote_to_bytes(raw_path).decode("utf-8", "surrogateescape")
    lossy = faithful.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    # ASGI's path lost the bytes (lossy); the WSGI front's kept them (faithful).
    # Either may have a root_path (SCRIPT_NAME) before it that the raw path lacks.
    for decoded in (lossy, faithful):
        if path.endswith(decoded):
            prefix = path[: len(path) - len(decoded)]
            break
    else:
        return escaped_slash_path(path, b"") if _has_percent(path) else path
    if slashes or _has_percent(prefix + faithful):
        return escaped_slash_path(prefix, raw_path)
    return prefix + faithful


# An encoded slash in a raw path: "%2F" in either case.
_ENCODED_SLASH = re.compile(rb"%2[fF]")


def _has_percent(decoded: str) -> bool:
    """True when a decoded path holds a "%" (its raw path had "%25"): it takes the escaped form too.

    So every escaped form holds a "%" (``%25`` or ``%2F``) and no path left
    as it is does: the two kinds never meet.
    """
    return "%" in decoded


def escaped_slash_path(prefix: str, raw_path: bytes) -> str:
    """The identity of a path whose raw form has an encoded slash, or whose decoded form holds a ``%``.

    Each part between encoded slashes is decoded (``surrogateescape``) with
    ``%`` written ``%25``, and the parts are joined by ``%2F``: so the result
    always holds a ``%``, and no path left as it is (which holds none) is
    ever equal to it. ``/a%2Fb`` gives ``/a%2Fb``, ``/a/b`` stays ``/a/b``,
    ``/a%252Fb`` gives ``/a%252Fb`` and ``/a%25b`` gives ``/a%25b``.

    Args:
        prefix: decoded text before the raw path (an ASGI ``root_path``).
        raw_path: the path's bytes as sent, escapes not decoded.
    """
    parts = _ENCODED_SLASH.split(raw_path)
    decoded = (unquote_to_bytes(part).decode("utf-8", "surrogateescape").replace("%", "%25") for part in parts)
    return prefix.replace("%", "%25") + "%2F".join(decoded)


def principal_required_answer() -> StoredResponse:
    """The 400 for a request whose principal resolver found no identity."""
    return problem_response(PRINCIPAL_REQUIRED, "This request carries no identity to scope its Idempotency-Key to.")


def declared_length(value: str | None) -> int | None:
    """Read a ``Content-Length`` value: bytes declared, 0 when absent, None when it is not a length.

    RFC 9110 section 8.6: ``1*DIGIT``. Signs, spaces, hexadecimal and numbers
    of more than 18 digits (past any body a server accepts, and past what
    ``int()`` parses from more than 4,300 digits) are not lengths.
    """
    if not value:
        return 0
    if len(value) > 18 or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def invalid_content_length_answer() -> StoredResponse:
    """The 400 for a request with a key whose ``Content-Length`` is not a length (:func:`declared_length`)."""
    return problem_response(INVALID_CONTENT_LENGTH, "The Content-Length header is not a number of bytes.")


def body_incomplete_answer() -> StoredResponse:
    """The 400 for a body shorter than its declared length (the client left mid-upload).

    Nothing runs and nothing is stored: a fingerprint of a partial body would
    answer the client's complete retry with 422 for the whole record TTL.
    """
    return problem_response(BODY_INCOMPLETE, "The request body ended before its declared length.")


def body_too_large_answer(policy: Policy) -> StoredResponse:
    """The 413 for a request body over ``policy.max_request_body``."""
    return problem_response(BODY_TOO_LARGE, f"The body exceeds {policy.max_request_body} bytes.")


def store_unavailable_answer(policy: Policy) -> StoredResponse:
    """The 503 for a store that failed before the handler ran (fail closed)."""
    detail = "The idempotency store cannot be reached; the request was not executed. Retry later."
    return problem_response(STORE_UNAVAILABLE, detail, retry_after=policy.retry_after)


@fast_init
@dataclass(frozen=True, slots=True)
class RequestIdentity:
    """The record key and fingerprint of one request."""

    record_key: str
    fingerprint: str


def request_identity(
    policy: Policy,
    digests: Digests,
    principal: str,
    method: str,
    path: str,
    query: bytes | str,
    content_type: bytes | str | None,
    body: bytes | BodySource,
    key: str,
) -> RequestIdentity:
    """Return the record key (scope: principal, method, path) and the fingerprint, both keyed with ``digests``.

    ``path`` is the identity path (:func:`identity_path`, or the WSGI
    front's latin-1 text decoded with ``surrogateescape``): two paths that
    differ in their bytes never share a record key or a fingerprint.
    """
    return RequestIdentity(
        digests.record_key(principal, method, path, key),
        fingerprint(method, path, query, content_type, body, secret=digests, canonical_json=policy.canonical_json),
    )


#: Body sizes (bytes) from which an async front fingerprints in a worker
#: thread, so a large body never stalls the event loop. Measured on the
#: 2-core bench machine (bench/micro/test_micro.py): a hop to a worker thread
#: and back costs about 50 us; canonical JSON about 19 us per KiB (4 KiB: 78
#: us, 10 MiB: 0.3-1.4 s by the document's shape); SHA-256 of raw bytes about
#: 0.6 us per KiB (64 KiB: 37 us), and hashlib releases the GIL as it hashes.
OFF_LOOP_JSON_BYTES = 4 * 1024
OFF_LOOP_RAW_BYTES = 64 * 1024


def legacy_identity(
    policy: Policy,
    principal: str,
    method: str,
    path: str,
    query: bytes | str,
    content_type: bytes | str | None,
    body: bytes | BodySource,
    key: str,
) -> LegacyIdentity:
    """Where a version before keyed digests kept this request's record, and the fingerprint it stored there.

    ``principal`` is the principal that version gave the request
    (:func:`idempo.principals.legacy_principal`).
    """
    return LegacyIdentity(
        legacy_record_key(principal, method, path, key),
        legacy_fingerprint(method, path, query, content_type, body, canonical_json=policy.canonical_json),
    )


def fingerprint_off_loop(policy: Policy, content_type: bytes | str | None, size: int) -> bool:
    """Whether fingerprinting a body of ``size`` bytes costs more than a hop to a worker thread.

    True from :data:`OFF_LOOP_JSON_BYTES` for a body fingerprinted as
    canonical JSON, from :data:`OFF_LOOP_RAW_BYTES` for any other.
    """
    if size >= OFF_LOOP_RAW_BYTES:
        return True
    return size >= OFF_LOOP_JSON_BYTES and policy.canonical_json and is_json_media_type(media_type(content_type))


def decision_answer(decision: Replay | InProgress | Mismatch | Held | NotReplayable) -> StoredResponse:
    """The answer for a decision that does not run the handler.

    Replay: the stored status, headers and body plus ``Idempotent-Replayed:
    true``. InProgress: 409 with ``Retry-After``. Held: 409
    ``outcome-unknown``, without ``Retry-After`` (waiting does not help).
    NotReplayable: 410 ``response-not-replayable``, with the first answer's
    status as the problem's ``first_status`` member. Mismatch: 422.
    """
    if isinstance(decision, Replay):
        stored = decision.response
        return StoredResponse(stored.status, (*stored.headers, REPLAYED_HEADER), stored.body)
    if isinstance(decision, InProgress):
        detail = "A request with this Idempotency-Key is still being processed; retry later."
        return problem_response(KEY_IN_PROGRESS, detail, retry_after=decision.retry_after)
    if isinstance(decision, Held):
        detail = (
            "The first request with this Idempotency-Key may or may not have taken effect, so it is neither "
            "replayed nor executed again until the key expires or an operator resolves it; "
            "check the outcome before retrying with a new key."
        )
        return problem_response(OUTCOME_UNKNOWN, detail, extra={"reason": decision.reason})
    if isinstance(decision, NotReplayable):
        why = "was too large to keep" if decision.reason == "too_large" else "could not be saved"
        detail = (
            f"The first request with this Idempotency-Key was executed and answered, but its answer {why}; "
            "it will not run again for this key."
        )
        extra: dict[str, object] = {"reason": decision.reason}
        if decision.status is not None:
            extra["first_status"] = decision.status
        return problem_response(RESPONSE_NOT_REPLAYABLE, detail, extra=extra)
    detail = "This Idempotency-Key was already used with a different request; use a new key."
    return problem_response(FINGERPRINT_MISMATCH, detail)
