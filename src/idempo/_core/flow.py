"""The idempotency protocol as a sans-I/O generator, and the decisions it ends in.

:func:`begin_flow` yields store commands (:class:`Begin`) and pauses
(:class:`Sleep`); a driver carries each out and sends the result back, in the
manner of httpx's ``auth_flow``. The sync and async drivers in
:mod:`idempo._engine` are the only code that touches a store here, so the
protocol (fingerprint comparison, wait-or-409, lease takeover) is written once
for every front: ASGI, WSGI, the decorator.

After the handler ran, :func:`finish` maps its outcome to the one store command
that settles the record (:class:`Complete`, or :class:`Release`). A hold and a
response too large to keep complete the record with a
:class:`~idempo._core.records.Marker` in place of the response; a request
that finds such a record gets :class:`Held` or :class:`NotReplayable`. A
takeover under ``on_takeover="hold"`` is settled at once by
:func:`takeover_hold`, without running the handler.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

from .frozen import fast_init
from .policy import Policy, Verdict
from .records import MARKER_STATUS, Acquired, BeginResult, Existing, Marker, Record, RecordState, StoredResponse

__all__ = [
    "Begin",
    "Complete",
    "Decision",
    "Extend",
    "Get",
    "Held",
    "InProgress",
    "LegacyIdentity",
    "Mismatch",
    "NotReplayable",
    "Polls",
    "Proceed",
    "Release",
    "Replay",
    "Sleep",
    "begin_flow",
    "completed_decision",
    "decide",
    "exception_verdict",
    "failure_verdict",
    "finish",
    "legacy_decision",
    "retry_after_seconds",
    "takeover_hold",
]


# --- commands a driver carries out -------------------------------------------------


@fast_init
@dataclass(frozen=True, slots=True)
class Begin:
    """Call ``store.begin(record_key, fingerprint, lease_ttl_ms)``."""

    record_key: str
    fingerprint: str
    lease_ttl_ms: int


@fast_init
@dataclass(frozen=True, slots=True)
class Get:
    """Call ``store.get(record_key)``; the result sent back is the :class:`Record` or None."""

    record_key: str


@dataclass(frozen=True, slots=True)
class Sleep:
    """Pause for ``seconds`` (float) before the next command; the result sent back is None."""

    seconds: float


@fast_init
@dataclass(frozen=True, slots=True)
class Complete:
    """Call ``store.complete(record_key, token, response, record_ttl_ms)``."""

    record_key: str
    token: int
    response: StoredResponse
    record_ttl_ms: int


@fast_init
@dataclass(frozen=True, slots=True)
class Release:
    """Call ``store.release(record_key, token)``."""

    record_key: str
    token: int


@fast_init
@dataclass(frozen=True, slots=True)
class Extend:
    """Call ``store.extend(record_key, token, lease_ttl_ms)``: keep the lease (a renewal)."""

    record_key: str
    token: int
    lease_ttl_ms: int


# --- decisions the flow ends in -----------------------------------------------------


@fast_init
@dataclass(frozen=True, slots=True)
class Proceed:
    """This request holds the lease: run the handler, then :func:`finish`.

    Attributes:
        token: the fencing token of the lease.
        takeover: True when an expired lease was taken over (crash recovery).
    """

    token: int
    takeover: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class Replay:
    """The key completed with the same fingerprint: answer with ``response``."""

    response: StoredResponse


@fast_init
@dataclass(frozen=True, slots=True)
class InProgress:
    """The first request with this key still runs: 409 (draft section 2.7).

    Attributes:
        retry_after: whole seconds for the ``Retry-After`` header.
    """

    retry_after: int


@fast_init
@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was used with another fingerprint: 422 (draft section 2.7)."""


@fast_init
@dataclass(frozen=True, slots=True)
class Held:
    """The key is held (its first outcome is unknown): 409 ``outcome-unknown`` until the record expires.

    Attributes:
        reason: why it is held (:attr:`Marker.reason`), e.g. ``"takeover"``.
        takeover: True when this very request found the expired lease and held
            the key (``on_takeover="hold"``) instead of executing.
    """

    reason: str
    takeover: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class NotReplayable:
    """The key completed but its answer was not kept (too large): 410, the handler not run.

    Attributes:
        status: the first answer's status, when known.
        reason: :attr:`Marker.reason`, e.g. ``"too_large"``.
    """

    status: int | None
    reason: str


Decision = Proceed | Replay | InProgress | Mismatch | Held | NotReplayable

# First pause between polls in wait mode, doubled up to the cap (seconds).
_POLL_FIRST = 0.01
_POLL_CAP = 0.25


_MISMATCH = Mismatch()


def decide(result: BeginResult, fingerprint: str) -> Proceed | Replay | Mismatch | Held | NotReplayable | None:
    """Classify what ``begin`` returned; None while another request holds the lease.

    The one place the fingerprint is compared: a fingerprint that differs from
    the record's is a mismatch whatever the record's state (draft section 2.7).
    Drivers call it directly for the first ``begin``, so the common cases
    (proceed, replay, mismatch) cost no generator; :func:`begin_flow` calls it
    for every ``begin`` it yields.
    """
    if isinstance(result, Acquired):
        return Proceed(result.token, result.takeover)
    record = result.record
    if record.fingerprint != fingerprint:
        return _MISMATCH
    if record.state is RecordState.COMPLETED:
        response = record.response
        assert response is not None
        return completed_decision(response)
    return None


def completed_decision(response: StoredResponse) -> Replay | Held | NotReplayable:
    """The decision for a record completed with ``response``: a replay, or what its marker says (410, 409)."""
    if response.status == MARKER_STATUS:
        marker = Marker.of(response)
        assert marker is not None
        if marker.kind == Marker.NOT_REPLAYABLE:
            return NotReplayable(marker.status, marker.reason)
        return Held(marker.reason)
    return Replay(response)


@dataclass(frozen=True, slots=True)
class LegacyIdentity:
    """Where a version before keyed digests kept a request's record, and the fingerprint it stored there.

    Attributes:
        record_key: the unkeyed record key that version computed.
        fingerprint: the unkeyed fingerprint that version stored for this request.
    """

    record_key: str
    fingerprint: str


def legacy_decision(record: Record | None, fingerprint: str, policy: Policy, now_ms: int) -> Decision | None:
    """Classify the record a version before keyed digests left, for a request that took a fresh lease.

    The rules of :func:`decide` (another fingerprint is a mismatch whatever
    the state; a completed record replays), and a record still running (a
    process of the older version, during a rolling deploy) is a 409. None:
    there is no such record, the request proceeds.
    """
    if record is None:
        return None
    decision = decide(Existing(record, now_ms), fingerprint)
    if decision is None:
        return InProgress(retry_after_seconds(policy, record.lease_expires_at_ms - now_ms))
    return decision


class Polls(Protocol):
    """The polls the waiters of one key share (the engine's wait room); see :func:`begin_flow`."""

    def mark(self) -> float:
        """The moment a waiter goes to sleep, to compare polls against (an opaque clock reading)."""

    def fresh(self, since: float) -> Existing | None:
        """A poll answered after ``since`` (a :meth:`mark`), if any: as good as asking the store again."""

    def found(self, result: BeginResult) -> None:
        """A ``begin`` answered ``result``: keep it for the other waiters."""


def begin_flow(
    record_key: str, fingerprint: str, policy: Policy, first: Existing | None = None, polls: Polls | None = None
) -> Generator[Begin | Sleep, BeginResult | None, Decision]:
    """Run the protocol up to the decision of what this request does.

    Yields :class:`Begin` (send back the store's :data:`BeginResult`) and, in
    wait mode, :class:`Sleep` (send back None). Returns the :data:`Decision`.

    A fingerprint that differs from the record's is a mismatch whatever the
    record's state. A duplicate of a running request polls ``begin`` for up to
    ``policy.wait`` seconds: it gets the replay if the first finishes, takes the
    lease over if the first crashed and its lease expired, and 409 otherwise.

    Args:
        first: the result of a ``begin`` the driver already made (an
            in-progress record, see :func:`decide`); the flow starts from it
            instead of yielding its first Begin.
        polls: shared with the other waiters of this key in the process: a
            poll one of them made since this one went to sleep stands in for
            its own ``begin``, and its own answers are shared in turn.
    """
    waited = 0.0
    pause = _POLL_FIRST
    result: BeginResult | None = first
    since = polls.mark() if polls is not None else 0.0
    while True:
        if result is None and polls is not None:
            result = polls.fresh(since)
        if result is None:
            result = yield Begin(record_key, fingerprint, policy.lease_ttl_ms)
            assert result is not None
            if polls is not None:
                polls.found(result)
        decision = decide(result, fingerprint)
        if decision is not None:
            return decision
        assert isinstance(result, Existing)
        if waited >= policy.wait:
            return InProgress(retry_after_seconds(policy, result.record.lease_expires_at_ms - result.now_ms))
        step = min(pause, policy.wait - waited)
        if polls is not None:
            since = polls.mark()
        yield Sleep(step)
        waited += step
        pause = min(pause * 2, _POLL_CAP)
        result = None


def retry_after_seconds(policy: Policy, lease_left_ms: int) -> int:
    """Whole seconds to advertise in ``Retry-After`` for an in-progress key.

    ``policy.retry_after``, but never past the moment the lease expires, and
    at least 1: the draft gives no figure, and 1 s is what clients expect.
    """
    lease_left_s = -(-max(lease_left_ms, 0) // 1000)  # ceiling
    return max(1, min(policy.retry_after, lease_left_s))


def finish(
    policy: Policy,
    record_key: str,
    token: int,
    response: StoredResponse | None,
    *,
    verdict: Verdict | None = None,
    reason: str | None = None,
) -> Complete | Release:
    """Return the command that settles the record after the handler ran.

    A HOLD completes the record with a held :class:`Marker` kept for
    ``policy.hold_ttl``: retries get 409 ``outcome-unknown`` and the record
    says why it is held. A response that is itself a marker (a response too
    large to keep, see :class:`~idempo._core.http.ResponseCapture`) is stored
    for ``record_ttl`` like any response.

    Args:
        policy: the route's policy.
        record_key: the record being settled.
        token: the lease's fencing token from :class:`Proceed`.
        response: the captured response, or None when the handler raised or
            the response could not be captured whole.
        verdict: overrides the verdict drawn from ``response.status``; adapters
            pass the exception's verdict here.
        reason: why a HOLD holds (shown by ``idempo inspect``); default the
            response's status, else ``"verdict"``.
    """
    if verdict is None:
        verdict = Verdict.RELEASE if response is None else policy.verdict_for_status(response.status)
    if verdict is Verdict.STORE and response is not None:
        return Complete(record_key, token, response, policy.record_ttl_ms)
    if verdict is Verdict.HOLD:
        if reason is None:
            reason = f"status {response.status}" if response is not None else "verdict"
        status = response.status if response is not None and response.status != MARKER_STATUS else None
        marker = Marker(Marker.HELD, reason, status)
        return Complete(record_key, token, marker.response(), policy.hold_ttl_ms)
    return Release(record_key, token)


def exception_verdict(policy: Policy, exc: BaseException) -> Verdict:
    """The verdict for a handler's exception (``Policy.exception_verdicts``), RELEASE for one that says STORE.

    STORE makes no sense without a result: an exception is never replayed.
    """
    verdict = policy.verdict_for_exception(exc)
    return Verdict.RELEASE if verdict is Verdict.STORE else verdict


def failure_verdict(policy: Policy, exc: Exception, status: int | None = None) -> Verdict:
    """RELEASE or HOLD after an exception (the handler's, or idempo's own after the handler ran).

    The exception's verdict (:func:`exception_verdict`), or HOLD when
    ``status`` (the answer already started, if any) maps to HOLD. Never
    raises: a policy that fails here gives RELEASE, so a retry executes.
    """
    try:
        verdict = exception_verdict(policy, exc)
        if verdict is not Verdict.HOLD and status is not None and policy.verdict_for_status(status) is Verdict.HOLD:
            verdict = Verdict.HOLD
    except Exception:
        return Verdict.RELEASE
    return verdict


def takeover_hold(policy: Policy, record_key: str, token: int) -> Complete | None:
    """The command that holds a key taken over under ``on_takeover="hold"``; None to execute.

    The store's ``begin`` gave this request the expired lease atomically, so
    no other request can execute meanwhile; holding completes the record with
    a held :class:`Marker` (reason ``"takeover"``) for ``policy.hold_ttl``
    instead of running the handler (DESIGN "takeover").
    """
    if policy.on_takeover != "hold":
        return None
    return Complete(record_key, token, Marker(Marker.HELD, "takeover").response(), policy.hold_ttl_ms)
