"""Records, the values a store keeps and returns, and the response codec.

All times are integer milliseconds since the Unix epoch, read from the
store's own clock (the database's or the Redis server's), so processes with
skewed clocks agree on lease and TTL expiry.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from .frozen import fast_init

__all__ = [
    "Acquired",
    "BeginResult",
    "Existing",
    "MARKER_STATUS",
    "Marker",
    "LEGACY_RECORD_KEY",
    "RESERVED_PREFIX",
    "SECRET_RECORD_KEY",
    "Record",
    "RecordState",
    "StoreStats",
    "StoredResponse",
    "decode_headers",
    "encode_headers",
    "next_token",
]


#: The record key under which a store keeps the secret idempo generated for it
#: (:mod:`idempo.secrets`). idempo's record keys are 32 hex characters, so none
#: equals it; stores leave it out of their stats.
SECRET_RECORD_KEY = "idempo:secret"

#: The record key of the legacy window ``idempo migrate --legacy-digests``
#: opens: while it lives, the records of versions before keyed digests are
#: looked up too (:mod:`idempo.secrets`).
LEGACY_RECORD_KEY = "idempo:legacy-digests"

#: Every record key idempo reserves for itself starts with this; stores leave
#: them out of their stats, and no record key idempo computes (32 hex) has it.
RESERVED_PREFIX = "idempo:"


class RecordState(enum.Enum):
    """The stored state of a record; "expired" is computed, never stored."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


Headers = tuple[tuple[bytes, bytes], ...]


@fast_init
@dataclass(frozen=True, slots=True)
class StoredResponse:
    """The response kept for replay.

    Attributes:
        status: the HTTP status code.
        headers: (name, value) byte pairs in the order the app sent them, names
            lower-case, repeated names kept as separate pairs; only the headers
            the policy allows to be stored.
        body: the complete body, bytes.
    """

    status: int
    headers: Headers
    body: bytes


#: The status of a marker response: no HTTP response has status 0, so a
#: stored response with it is never an answer to replay (see :class:`Marker`).
MARKER_STATUS = 0


@dataclass(frozen=True, slots=True)
class Marker:
    """What a record completed without a replayable answer keeps in place of one.

    A store keeps it as a response of status :data:`MARKER_STATUS` whose body is
    the marker's JSON, so every store (a third-party one too) represents it with
    no schema of its own; :meth:`of` tells it from a real response.

    Attributes:
        kind: :attr:`HELD` (retries get 409 "outcome unknown" until the record
            expires or an operator resolves it) or :attr:`NOT_REPLAYABLE` (the
            first answer was sent but not kept: retries get 410).
        reason: why, for operators: ``"takeover"`` (a lease expired with no
            result under ``on_takeover="hold"``), ``"status 504"`` or
            ``"exception TimeoutError"`` (a HOLD verdict), ``"too_large"`` (a
            response over ``max_response_body``), ``"save_failed"`` (the
            result could not be saved).
        status: the first answer's HTTP status, when one was sent.
        size: bytes of the first answer's body, when known.
    """

    HELD = "held"
    NOT_REPLAYABLE = "not_replayable"

    kind: str
    reason: str
    status: int | None = None
    size: int | None = None

    def response(self) -> StoredResponse:
        """The marker as a stored response (status 0, no headers, the JSON as body)."""
        fields: dict[str, object] = {"idempo": self.kind, "reason": self.reason}
        if self.status is not None:
            fields["status"] = self.status
        if self.size is not None:
            fields["size"] = self.size
        return StoredResponse(MARKER_STATUS, (), _HEADERS_JSON.encode(fields).encode("utf-8"))

    @classmethod
    def of(cls, response: StoredResponse | None) -> Marker | None:
        """The marker a stored response stands for; None for a real response (or none).

        A marker whose body cannot be read (written by a later idempo, or
        damaged) counts as held: neither replaying nor executing is safe.
        """
        if response is None or response.status != MARKER_STATUS:
            return None
        try:
            fields = json.loads(response.body)
            kind = fields["idempo"]
            if kind not in (cls.HELD, cls.NOT_REPLAYABLE):
                raise ValueError(kind)
            status, size = fields.get("status"), fields.get("size")
            return cls(
                kind,
                str(fields.get("reason", "")),
                status if isinstance(status, int) else None,
                size if isinstance(size, int) else None,
            )
        except (ValueError, TypeError, KeyError):
            return cls(cls.HELD, "unreadable marker")


@fast_init
@dataclass(frozen=True, slots=True)
class Record:
    """What a store keeps for one record key.

    Attributes:
        record_key: the store's primary key, derived from scope and idempotency key.
        state: IN_PROGRESS while a lease holder executes, COMPLETED after.
        fingerprint: hex digest of the request that created the record.
        token: the fencing token of the current lease; it grows on every
            takeover, so a stale holder's late ``complete`` is refused.
        lease_expires_at_ms: when the lease ends (IN_PROGRESS); 0 once completed.
        created_at_ms: when the current lease was taken.
        expires_at_ms: when the record stops counting and may be purged: the
            lease expiry while IN_PROGRESS, completion time + record TTL after.
        response: the stored response once COMPLETED, else None; a response
            of status :data:`MARKER_STATUS` is a :class:`Marker` (held, or
            not replayable), never replayed (see :attr:`marker`).
    """

    record_key: str
    state: RecordState
    fingerprint: str
    token: int
    lease_expires_at_ms: int
    created_at_ms: int
    expires_at_ms: int
    response: StoredResponse | None = None

    @property
    def marker(self) -> Marker | None:
        """The :class:`Marker` of a record completed without a replayable answer (held, not replayable)."""
        return Marker.of(self.response)


@fast_init
@dataclass(frozen=True, slots=True)
class Acquired:
    """``begin`` took the lease: the caller must execute, then complete or release.

    Attributes:
        token: the fencing token to pass to complete/release/extend.
        takeover: True when an expired lease of an earlier holder was taken over
            (crash recovery), False for a fresh record.
    """

    token: int
    takeover: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class Existing:
    """``begin`` found a live record held or completed by another request.

    Attributes:
        record: the record as the store holds it.
        now_ms: the store's clock when it was read, to compute lease time left.
    """

    record: Record
    now_ms: int


BeginResult = Acquired | Existing


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What a store holds, counted by the store's own clock (``idempo stats``).

    Attributes:
        now_ms: the store's clock when counted, milliseconds since the epoch.
        in_progress: live records in progress: a lease is held (or its holder
            crashed and the lease has not expired yet).
        completed: live completed records, replayed to retries.
        expired: records still present but expired; they behave as absent
            and ``purge_expired`` deletes them.
        oldest_lease: the live in-progress record whose lease was taken
            earliest (``created_at_ms``), or None when there is none; a lease
            much older than the slowest handler means a stuck or crashed holder.
    """

    now_ms: int
    in_progress: int
    completed: int
    expired: int
    oldest_lease: Record | None = None


def next_token(previous: int, now_ms: int) -> int:
    """Return the fencing token for a new lease.

    The token grows by at least one over the record's previous token and is
    never below the store's clock in milliseconds. The clock floor keeps tokens
    growing even when a record was purged between two leases, so a holder from
    before the purge can never match a later lease.
    """
    return max(previous + 1, now_ms)


# json.dumps with non-default separators builds a new encoder per call; this one is built once.
_HEADERS_JSON = json.JSONEncoder(separators=(",", ":"))


def encode_headers(headers: Headers) -> str:
    """Encode header pairs as a JSON array of [name, value] latin-1 strings."""
    return _HEADERS_JSON.encode([[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers])


def decode_headers(text: str | bytes) -> Headers:
    """Decode what :func:`encode_headers` produced (a str, or its bytes as Redis returns them)."""
    if isinstance(text, bytes):
        # encode_headers writes ASCII (ensure_ascii): decoded here, json.loads skips detecting
        # the encoding (json.detect_encoding, Python code) on every replay from Redis.
        text = text.decode("utf-8")
    return tuple([(n.encode("latin-1"), v.encode("latin-1")) for n, v in json.loads(text)])
