"""Problem responses (RFC 9457 ``application/problem+json``) for idempo's own answers.

Each problem has a stable ``type`` URI, so clients can branch on it; the IETF
draft (draft-ietf-httpapi-idempotency-key-header, section 2.7) shows problem
bodies for 400, 409 and 422.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .records import StoredResponse

__all__ = ["PROBLEM_BASE", "Problem", "problem_response"]

#: Prefix of every problem ``type`` URI; the README lists them.
PROBLEM_BASE = "https://idempo.dev/problems/"


@dataclass(frozen=True, slots=True)
class Problem:
    """One kind of problem: its HTTP status, ``type`` slug and ``title``."""

    status: int
    slug: str
    title: str

    @property
    def type(self) -> str:
        """The stable ``type`` URI."""
        return PROBLEM_BASE + self.slug


MISSING_KEY = Problem(400, "missing-key", "Idempotency-Key is missing")
TRANSACTION_NOT_COVERED = Problem(400, "transaction-not-covered", "A transactional route needs a request idempo covers")
INVALID_KEY = Problem(400, "invalid-key", "Idempotency-Key is not valid")
PRINCIPAL_REQUIRED = Problem(400, "principal-required", "Idempotency-Key needs an identified caller")
BODY_TOO_LARGE = Problem(413, "body-too-large", "Request body is too large for an idempotent request")
BODY_INCOMPLETE = Problem(400, "body-incomplete", "Request body is incomplete")
INVALID_CONTENT_LENGTH = Problem(400, "invalid-content-length", "Content-Length is not a valid length")
CONTENT_TYPE_AMBIGUOUS = Problem(400, "content-type-ambiguous", "Content-Type holds more than one media type")
#: A covered method spelled in other letter case (``post``): methods are
#: case-sensitive (RFC 9110 section 9.1), yet Flask and Django run it as POST
#: and Starlette answers 405, so no record could say which request it was.
METHOD_AMBIGUOUS = Problem(400, "method-ambiguous", "The request method differs from a covered method only in case")
KEY_IN_PROGRESS = Problem(409, "key-in-progress", "A request is outstanding for this Idempotency-Key")
FINGERPRINT_MISMATCH = Problem(422, "fingerprint-mismatch", "Idempotency-Key is already used for a different request")
#: 409, not the "in progress" type: waiting does not help, the key is held until
#: its record expires or an operator resolves it.
OUTCOME_UNKNOWN = Problem(409, "outcome-unknown", "The first outcome for this Idempotency-Key is unknown")
#: 410 Gone (RFC 9110 section 15.5.11): the first answer existed and is
#: permanently unavailable for this key, and the request will not run again.
RESPONSE_NOT_REPLAYABLE = Problem(
    410, "response-not-replayable", "The first answer for this Idempotency-Key was not kept"
)
STORE_UNAVAILABLE = Problem(503, "store-unavailable", "Idempotency store is unavailable")
#: A transactional route's transaction was aborted by the database to resolve a
#: conflict (40001, 40P01, 55P03): nothing was written, a retry executes. 503, never
#: 409 (409 means "in progress" in idempo's contract).
TRANSACTION_CONFLICT = Problem(
    503, "transaction-conflict", "The transaction conflicted with another and was rolled back"
)
#: COMMIT was not confirmed (the connection was lost, finalisation outlived its timeout) and the
#: record, read again, did not show it committed: it may still have. A retry with the key is answered
#: by the record: the committed response, or a fresh execution.
COMMIT_UNKNOWN = Problem(503, "commit-unknown", "The transaction's outcome is unknown")
#: COMMIT failed for a definite reason (a deferred constraint): rolled back.
COMMIT_FAILED = Problem(500, "commit-failed", "The transaction could not be committed and was rolled back")
#: The response of a transactional route is larger than ``max_response_body``: it cannot be
#: buffered until COMMIT, so the transaction rolled back.
TRANSACTIONAL_RESPONSE_TOO_LARGE = Problem(
    500, "transactional-response-too-large", "The response is too large to hold until the transaction commits"
)
#: The handler ended idempo's transaction itself (a COMMIT or ROLLBACK of its own): what it
#: wrote may have committed, so the key is held (retries get 409 outcome-unknown).
TRANSACTION_ENDED = Problem(500, "transaction-ended", "The handler ended the transaction idempo controls")
#: The lease was taken over while the handler ran: its transaction rolled back.
LEASE_LOST = Problem(409, "lease-lost", "Another request took this Idempotency-Key over; this attempt rolled back")

# idempo proxy's own answers (idempo.proxy.app): the upstream failed or the caller was refused.
UPSTREAM_UNREACHABLE = Problem(502, "upstream-unreachable", "The upstream could not be reached")
UPSTREAM_BUSY = Problem(503, "upstream-busy", "No connection to the upstream was free in time")
UPSTREAM_OUTCOME_UNKNOWN = Problem(502, "upstream-outcome-unknown", "The upstream's answer was lost")
UPSTREAM_DEADLINE = Problem(504, "upstream-outcome-unknown", "The upstream did not answer in time")
LOOP_DETECTED = Problem(508, "loop-detected", "The request came back to idempo proxy")
TOKEN_REJECTED = Problem(401, "token-rejected", "The bearer token was refused")
KEYS_UNAVAILABLE = Problem(503, "keys-unavailable", "The token's keys could not be fetched")


def problem_response(
    problem: Problem, detail: str, *, retry_after: int | None = None, extra: dict[str, object] | None = None
) -> StoredResponse:
    """Build the HTTP answer for a problem.

    Args:
        problem: which problem.
        detail: a sentence for the client about this occurrence.
        retry_after: whole seconds for a ``Retry-After`` header, or None.
        extra: extension members of the problem (RFC 9457 section 3.2).

    Returns:
        status, headers (``content-type``, ``content-length``, maybe
        ``retry-after``) and the JSON body.
    """
    body = json.dumps(
        {"type": problem.type, "title": problem.title, "status": problem.status, "detail": detail, **(extra or {})},
        separators=(",", ":"),
    ).encode()
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    return StoredResponse(problem.status, tuple(headers), body)
