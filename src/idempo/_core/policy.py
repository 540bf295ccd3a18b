"""The policy: which requests are idempotent, how long records live, and what
each outcome of the handler does to the record.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from ..exceptions import ConfigurationError

__all__ = [
    "DEFAULT_EXCLUDED_HEADERS",
    "DEFAULT_METHODS",
    "ON_TAKEOVER",
    "Policy",
    "Verdict",
    "default_verdict",
]


class Verdict(enum.Enum):
    """What happens to the record after the handler finished.

    STORE: the response is stored and replayed to every retry.
    RELEASE: the record is removed, so a retry executes again.
    HOLD: the record is held (retries get 409 ``outcome-unknown``) for
        ``Policy.hold_ttl`` seconds, or until an operator resolves it
        (``idempo resolve``); for outcomes that are unknown, e.g. a timeout
        talking to a payment provider, where neither replaying nor
        re-executing is safe. The record keeps a held
        :class:`~idempo.Marker` saying why.
    """

    STORE = "store"
    RELEASE = "release"
    HOLD = "hold"


#: Methods that are idempotent only with a key (RFC 9110 section 9.2.2: POST
#: and PATCH are not idempotent by method).
DEFAULT_METHODS: frozenset[str] = frozenset({"POST", "PATCH"})

#: Response headers never stored, hence never replayed: hop-by-hop headers
#: (RFC 9110 section 7.6.1), ``Date``, credentials (``Set-Cookie`` unless
#: ``Policy.store_set_cookie``) and per-exchange headers that would be a lie
#: when replayed (request ids, rate-limit counters, auth challenges).
DEFAULT_EXCLUDED_HEADERS: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "date",
        "server",
        "authorization",
        "www-authenticate",
        "set-cookie",
        "x-request-id",
        "x-correlation-id",
        "request-id",
        "retry-after",
        "idempotent-replayed",
    }
)

#: The values of ``Policy.on_takeover``.
ON_TAKEOVER: frozenset[str] = frozenset({"execute", "hold"})

# Prefixes of per-exchange headers (rate-limit counters, draft-ietf-httpapi-ratelimit-headers).
_EXCLUDED_PREFIXES: tuple[str, ...] = ("x-ratelimit-", "ratelimit")

# 401 Unauthorized, 403 Forbidden: an authentication or permission failure is
# not the request's outcome; the same retry may succeed once the caller has the
# right (a permission granted, MFA completed), and a replayed 401 would lack
# the WWW-Authenticate challenge RFC 9110 section 15.5.2 requires (it is never
# stored). 408 Request Timeout, 409 Conflict, 425 Too Early, 429 Too Many
# Requests: the request may succeed if repeated, so storing them would wedge
# the key.
_RETRYABLE_4XX = frozenset({401, 403, 408, 409, 425, 429})


def default_verdict(status: int) -> Verdict:
    """The default outcome for a status: store 1xx-4xx except 401, 403, 408, 409, 425 and 429; release 5xx.

    Deterministic client errors (400, 404, 422, ...) are stored and replayed,
    as Stripe does; authentication and permission failures, transient errors
    and server errors are released so a retry executes again (DESIGN outcome
    defaults; shared/cases B06).
    """
    if status >= 500 or status in _RETRYABLE_4XX:
        return Verdict.RELEASE
    return Verdict.STORE


def _seconds(value: float | timedelta, name: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds > 0:  # also rejects NaN
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


class Policy:
    """How requests are made idempotent. Immutable; :meth:`replace` derives a variant.

    Args:
        record_ttl: seconds (or a timedelta) a completed record is kept and
            replayed; the draft's "expiry" (section 2.3). Default 24 h, as Stripe.
        lease_ttl: seconds (or a timedelta) a request holds the right to execute.
            A crashed holder delays retries by at most this long. Must exceed
            the slowest handler, or a retry may execute while it still runs.
            Default 30 s. Zero or negative is refused (shared/cases B03).
        methods: methods that are made idempotent; others pass through.
        require_key: answer 400 when such a request has no key (draft section
            2.7); when False, keyless requests pass through untouched.
        wait: seconds a duplicate of a running request waits for its result
            before getting 409; 0 answers 409 at once (draft section 2.6).
        max_waiters: duplicates of one key that wait at once in one process
            (wait mode); one more gets 409 at once. The waiters share their
            polls of the store (default 64: a waiter costs a coroutine or a
            thread and no store calls of its own, and a burst of 50 duplicates,
            shared/cases B01, all wait for the replay).
        retry_after: whole seconds sent in ``Retry-After`` with 409 and 503.
        fail_open: when the store is unreachable, run the handler without
            idempotency (marked with an ``Idempotency-Bypassed`` header) instead
            of answering 503. Off by default: an outage must not cause a second
            execution (shared/cases B18).
        canonical_json: canonicalise JSON bodies in the fingerprint (key order,
            whitespace, escapes and number spelling do not matter; see
            :mod:`idempo._core.fingerprint`).
        max_request_body: bytes of request body read for the fingerprint; a
            larger body is answered with 413 before anything is stored.
        max_response_body: bytes of response body captured; a larger response
            is passed through to the client whole, and the record completes as
            *not replayable*: every retry gets 410 problem+json
            (``response-not-replayable``) and the handler never runs again for
            the key while the record lives (record_ttl).
        store_set_cookie: store and replay ``Set-Cookie`` (off: credentials do
            not belong at rest in the store).
        excluded_headers: lower-case header names never stored nor replayed;
            default :data:`DEFAULT_EXCLUDED_HEADERS`.
        status_verdicts: per-status overrides of :func:`default_verdict`,
            e.g. ``{404: Verdict.RELEASE, 504: Verdict.HOLD}``.
        exception_verdicts: verdicts for exception classes raised by the
            handler, matched along the exception's MRO; default RELEASE. The
            exception always propagates unchanged after the record is handled.
            When any are configured, a record whose answer is not stored is
            settled once the app has finished rather than when the answer is
            sent, because frameworks send their 500 before re-raising.
        hold_ttl: seconds (or a timedelta) a held key answers 409
            (``outcome-unknown``), after a HOLD verdict or a held takeover;
            default record_ttl: the window in which a client may still retry
            with the key, so no retry in it executes a second time. An
            operator ends a hold early with ``idempo resolve``.
        on_takeover: what a request does when it finds an expired lease whose
            holder left no result (it crashed, or lost the store): ``"execute"``
            (default) runs the handler again, which is safe on a transactional
            route or where the app's own unique constraint dedupes;
            ``"hold"`` runs nothing and holds the key (409 ``outcome-unknown``
            for ``hold_ttl``), because the first execution's outcome is unknown.
        save_retry_for: seconds (or a timedelta) a process keeps retrying a
            save (complete, release or hold) that failed after the handler ran,
            keeping and renewing the lease meanwhile, so the handler never
            runs a second time while the process lives (duplicates get 409).
            The client's answer is not held up: the first attempt is made
            before the answer's end is sent, the retries after. Default 300 s:
            more than a managed PostgreSQL or Redis failover takes (tens of
            seconds to two minutes); a save still failing after that is
            likely refused for good (a record the store will not take), and
            holding the key longer would only prolong the 409s. At the bound
            the record is completed as *not replayable* if the store takes
            that, else the lease is left to expire (a takeover, decided by
            ``on_takeover``).

    Raises:
        ConfigurationError: a TTL or ``save_retry_for`` is not positive,
            ``wait`` is negative, a size or ``retry_after`` is negative,
            ``max_waiters`` is below 1, or ``on_takeover`` is neither
            ``"execute"`` nor ``"hold"``.
    """

    __slots__ = (
        "_args",
        "_names",
        "canonical_json",
        "exception_verdicts",
        "excluded_headers",
        "fail_open",
        "hold_ttl",
        "hold_ttl_ms",
        "lease_ttl",
        "lease_ttl_ms",
        "max_request_body",
        "max_response_body",
        "max_waiters",
        "methods",
        "on_takeover",
        "record_ttl",
        "record_ttl_ms",
        "require_key",
        "retry_after",
        "save_retry_for",
        "status_verdicts",
        "store_set_cookie",
        "wait",
    )

    record_ttl: float
    record_ttl_ms: int
    lease_ttl: float
    lease_ttl_ms: int
    hold_ttl: float
    hold_ttl_ms: int
    methods: frozenset[str]
    require_key: bool
    wait: float
    max_waiters: int
    retry_after: int
    fail_open: bool
    canonical_json: bool
    max_request_body: int
    max_response_body: int
    store_set_cookie: bool
    excluded_headers: frozenset[str]
    status_verdicts: Mapping[int, Verdict]
    exception_verdicts: Mapping[type[BaseException], Verdict]
    on_takeover: str
    save_retry_for: float
    _args: dict[str, Any]
    _names: dict[bytes, bytes | None]

    def __init__(
        self,
        *,
        record_ttl: float | timedelta = 86400.0,
        lease_ttl: float | timedelta = 30.0,
        methods: Iterable[str] = DEFAULT_METHODS,
        require_key: bool = False,
        wait: float | timedelta = 0.0,
        max_waiters: int = 64,
        retry_after: int = 1,
        fail_open: bool = False,
        canonical_json: bool = True,
        max_request_body: int = 10 * 1024 * 1024,
        max_response_body: int = 10 * 1024 * 1024,
        store_set_cookie: bool = False,
        excluded_headers: Iterable[str] = DEFAULT_EXCLUDED_HEADERS,
        status_verdicts: Mapping[int, Verdict] | None = None,
        exception_verdicts: Mapping[type[BaseException], Verdict] | None = None,
        hold_ttl: float | timedelta | None = None,
        on_takeover: str = "execute",
        save_retry_for: float | timedelta = 300.0,
    ) -> None:
        args = dict(locals())
        del args["self"]
        set_ = object.__setattr__
        set_(self, "_args", args)
        set_(self, "_names", {})
        set_(self, "record_ttl", _seconds(record_ttl, "record_ttl"))
        set_(self, "lease_ttl", _seconds(lease_ttl, "lease_ttl"))
        set_(self, "hold_ttl", self.record_ttl if hold_ttl is None else _seconds(hold_ttl, "hold_ttl"))
        set_(self, "record_ttl_ms", int(self.record_ttl * 1000))
        set_(self, "lease_ttl_ms", max(1, int(self.lease_ttl * 1000)))
        set_(self, "hold_ttl_ms", max(1, int(self.hold_ttl * 1000)))
        wait_s = wait.total_seconds() if isinstance(wait, timedelta) else float(wait)
        if not wait_s >= 0:
            raise ConfigurationError(f"wait must be zero or more seconds, got {wait!r}")
        set_(self, "wait", wait_s)
        if max_waiters < 1:
            raise ConfigurationError(f"max_waiters must be at least 1, got {max_waiters!r}")
        set_(self, "max_waiters", int(max_waiters))
        if isinstance(methods, str):
            raise ConfigurationError("methods must be a collection of method names, not one string")
        set_(self, "methods", frozenset(m.upper() for m in methods))
        if retry_after < 0 or max_request_body < 0 or max_response_body < 0:
            raise ConfigurationError("retry_after, max_request_body and max_response_body cannot be negative")
        set_(self, "retry_after", int(retry_after))
        set_(self, "require_key", bool(require_key))
        set_(self, "fail_open", bool(fail_open))
        set_(self, "canonical_json", bool(canonical_json))
        set_(self, "max_request_body", int(max_request_body))
        set_(self, "max_response_body", int(max_response_body))
        set_(self, "store_set_cookie", bool(store_set_cookie))
        excluded = {h.lower() for h in excluded_headers}
        if store_set_cookie:
            excluded.discard("set-cookie")
        set_(self, "excluded_headers", frozenset(excluded))
        set_(self, "status_verdicts", MappingProxyType(dict(status_verdicts or {})))
        set_(self, "exception_verdicts", MappingProxyType(dict(exception_verdicts or {})))
        if on_takeover not in ON_TAKEOVER:
            raise ConfigurationError(f"on_takeover must be 'execute' or 'hold', got {on_takeover!r}")
        set_(self, "on_takeover", on_takeover)
        set_(self, "save_retry_for", _seconds(save_retry_for, "save_retry_for"))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Policy is immutable; use policy.replace({name}=...)")

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._args.items() if v != _DEFAULTS.get(k, v) or k not in _DEFAULTS}
        return "Policy(" + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self._args == other._args

    def __hash__(self) -> int:
        return hash((self.record_ttl, self.lease_ttl, self.methods, self.require_key, self.wait))

    def replace(self, **changes: Any) -> Policy:
        """Return a copy with some arguments changed, e.g. ``policy.replace(require_key=True)``."""
        return Policy(**{**self._args, **changes})

    def verdict_for_status(self, status: int) -> Verdict:
        """Return what to do with a response of this status."""
        verdict = self.status_verdicts.get(status)
        if verdict is not None:
            return verdict
        # default_verdict(status), inlined: a call less for every response.
        return Verdict.RELEASE if status >= 500 or status in _RETRYABLE_4XX else Verdict.STORE

    def verdict_for_exception(self, exc: BaseException) -> Verdict:
        """Return what to do when the handler raised ``exc`` (default RELEASE).

        Adapters call this for ``Exception`` subclasses only; cancellation and
        interpreter exits leave the lease to expire, because the side effect
        may be half done.
        """
        for cls in type(exc).__mro__:
            verdict = self.exception_verdicts.get(cls)
            if verdict is not None:
                return verdict
        return Verdict.RELEASE

    def stores_header(self, name: str) -> bool:
        """True when a response header of this lower-case name is stored for replay."""
        return name not in self.excluded_headers and not name.startswith(_EXCLUDED_PREFIXES)

    def stored_name(self, name: bytes) -> bytes | None:
        """The lower-case name under which a response header is stored, or None when it is not stored.

        ``name`` is a header name as an app passes it (latin-1 bytes, any
        case). Memoised per policy: apps send few distinct names, so the cache
        is bounded at 1024 names and never grows past it.
        """
        cache = self._names
        if name in cache:
            return cache[name]
        lower = name.lower()
        stored = lower if self.stores_header(lower.decode("latin-1")) else None
        if len(cache) < 1024:
            cache[name] = stored
        return stored


_DEFAULTS: dict[str, Any] = Policy()._args
