"""The client's retry policy, written once for every HTTP front (httpx, requests).

What is retried, how long to wait and when to give up are pure decisions,
kept here; :mod:`idempo.client` (httpx) and :mod:`idempo.requests_adapter`
(requests) only send attempts and tell this module how each one ended.

The retry loop itself is tenacity's (``Retrying`` / ``AsyncRetrying``): one
:class:`RetryRun` per logical request supplies tenacity's ``retry``, ``wait``,
``stop`` and hook callables, so the sync and async fronts share the same
decisions. The backoff is tenacity's ``wait_random_exponential``, the "full
jitter" of AWS's "Exponential Backoff and Jitter".

Rules (DESIGN "client", IETF draft-ietf-httpapi-idempotency-key-header,
RFC 9110):

* A request is retried only when it carries an idempotency key, or when its
  method is idempotent by definition (RFC 9110 section 9.2.2: GET, HEAD,
  OPTIONS, TRACE, PUT, DELETE). A POST or PATCH without a key is sent once,
  whatever happens: the client cannot know whether it executed.
* Retried outcomes: transport failures (connection refused or reset, the
  connection closed before an answer, timeouts) and the statuses in
  :attr:`RetryPolicy.retry_statuses` (409, 429, 500, 502, 503, 504). 409 is
  retried only under a key, where it means "the first request with this key
  is still running" (draft section 2.6); without a key it is a real conflict.
  500 is retried because a server that honours keys does not store it: idempo
  releases the key on any 5xx (DESIGN "HTTP behaviour"), so the retry under
  the same key executes again, at most once; Stripe's SDKs retry it too. A
  request without a key is retried only when its method is idempotent, so a
  500 never makes an unkeyed POST run twice.
* Never retried: every other status, 400 and 422 above all (draft section
  2.7: a malformed key, or a key reused for another request, will not get
  better by repeating); and, whatever its status, an answer whose
  problem+json ``type`` (RFC 9457) says the key's first outcome is final for
  the record's life (:data:`FINAL_PROBLEMS`): a 409 ``outcome-unknown`` (the
  key is held, no Retry-After: waiting does not help) and a 410
  ``response-not-replayable``.
* The wait before a retry is the server's ``Retry-After`` (seconds or an
  HTTP-date, RFC 9110 section 10.2.3) when the answer has one, else a random
  delay in ``[0, min(wait_max, wait_initial * 2 ** (n - 1))]`` before retry n.
* Retries stop after :attr:`RetryPolicy.attempts` attempts, or when the next
  wait would end past :attr:`RetryPolicy.timeout` seconds from the first
  attempt; the last answer (or exception) is then what the caller gets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

import tenacity

from .._core.keys import format_key, parse_key
from .._core.problems import OUTCOME_UNKNOWN, RESPONSE_NOT_REPLAYABLE
from ..exceptions import ConfigurationError, InvalidKey

__all__ = [
    "DEFAULT_KEY_METHODS",
    "DEFAULT_RETRY_STATUSES",
    "FINAL_PROBLEMS",
    "IDEMPOTENT_METHODS",
    "Attempt",
    "KeyFactory",
    "OnAttempt",
    "RetryPolicy",
    "RetryRun",
    "new_key",
    "parse_retry_after",
    "resolve_key",
    "tag_exception",
]

logger = logging.getLogger("idempo.client")

#: Methods that get an idempotency key by default: not idempotent by method
#: (RFC 9110 section 9.2.2), so only a key makes a retry safe.
DEFAULT_KEY_METHODS: frozenset[str] = frozenset({"POST", "PATCH"})

#: Methods idempotent by definition (RFC 9110 section 9.2.2), retried without a key.
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

#: 409 (in progress, under a key), 429 (too many requests), 500 (the server
#: failed; one that honours keys released the key, so a retry runs again), 502,
#: 503, 504 (a gateway or the server is briefly unable to answer).
DEFAULT_RETRY_STATUSES: frozenset[int] = frozenset({409, 429, 500, 502, 503, 504})

#: Problem ``type`` URIs (RFC 9457) of answers no retry under the same key
#: changes while the record lives, whatever their status: a held key (409
#: ``outcome-unknown``) and a first answer that was not kept (410
#: ``response-not-replayable``). Retrying them would only spend the attempts.
FINAL_PROBLEMS: frozenset[str] = frozenset({OUTCOME_UNKNOWN.type, RESPONSE_NOT_REPLAYABLE.type})
# Bytes of a problem body read for its type at most: problems are small.
_PROBLEM_MAX = 64 * 1024


def is_final_problem(content_type: str | None, body: bytes | None) -> bool:
    """True when an answer is a problem+json whose ``type`` is one of :data:`FINAL_PROBLEMS`.

    Args:
        content_type: the answer's ``Content-Type``.
        body: the answer's body (decoded of any content coding), or None when unread.
    """
    if body is None or len(body) > _PROBLEM_MAX or not content_type or "problem+json" not in content_type.lower():
        return False
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("type") in FINAL_PROBLEMS


#: Returns a fresh idempotency key for a logical request.
KeyFactory = Callable[[], str]

R = TypeVar("R")


def new_key() -> str:
    """Return a fresh idempotency key: a random UUID (version 4), as the draft suggests (section 2.2)."""
    return str(uuid.uuid4())


def _seconds(value: float | timedelta, name: str, *, allow_zero: bool) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not (seconds >= 0 if allow_zero else seconds > 0) or math.isinf(seconds):
        raise ConfigurationError(f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} number")
    return seconds


class RetryPolicy:
    """Which requests get a key, which outcomes are retried, how long to wait. Immutable.

    Times are float seconds; a ``timedelta`` is accepted too.

    Args:
        attempts: the most attempts per logical request, the first included
            (1 disables retries). Default 5.
        timeout: seconds from the first attempt; no wait is started that would
            end past it, so the last answer is returned instead. Each attempt
            is still bounded by the HTTP client's own timeout. Default 30.
        wait_initial: the upper bound of the first backoff, seconds; doubled
            per retry. Default 0.1.
        wait_max: the largest backoff bound, seconds. Default 5. A
            ``Retry-After`` is honoured even when longer (within ``timeout``).
        retry_statuses: statuses retried (409 only for requests with a key).
            Default 409, 429, 500, 502, 503, 504; leave 500 out
            (``DEFAULT_RETRY_STATUSES - {500}``) for a server that does not
            release a key on a 5xx.
        key_methods: methods that get an idempotency key (and so become
            retryable). Default POST and PATCH. Empty disables keys; a key the
            caller sets on a request is still used.
        idempotent_methods: methods retried without a key because they are
            idempotent by method (RFC 9110 section 9.2.2). Empty means only
            requests with a key are retried.
        key_header: the request header carrying the key.

    Raises:
        ConfigurationError: ``attempts`` is below 1, a wait is negative,
            ``timeout`` is not positive, a method set is one string, or
            ``retry_statuses`` holds 400 or 422.
    """

    __slots__ = (
        "_backoff",
        "attempts",
        "idempotent_methods",
        "key_header",
        "key_methods",
        "retry_statuses",
        "timeout",
        "wait_initial",
        "wait_max",
    )

    attempts: int
    timeout: float
    wait_initial: float
    wait_max: float
    retry_statuses: frozenset[int]
    key_methods: frozenset[str]
    idempotent_methods: frozenset[str]
    key_header: str
    _backoff: tenacity.wait_random_exponential

    def __init__(
        self,
        *,
        attempts: int = 5,
        timeout: float | timedelta = 30.0,
        wait_initial: float | timedelta = 0.1,
        wait_max: float | timedelta = 5.0,
        retry_statuses: Iterable[int] = DEFAULT_RETRY_STATUSES,
        key_methods: Iterable[str] = DEFAULT_KEY_METHODS,
        idempotent_methods: Iterable[str] = IDEMPOTENT_METHODS,
        key_header: str = "Idempotency-Key",
    ) -> None:
        set_ = object.__setattr__
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(f"attempts must be an integer of at least 1, got {attempts!r}")
        set_(self, "attempts", attempts)
        set_(self, "timeout", _seconds(timeout, "timeout", allow_zero=False))
        set_(self, "wait_initial", _seconds(wait_initial, "wait_initial", allow_zero=True))
        set_(self, "wait_max", _seconds(wait_max, "wait_max", allow_zero=True))
        statuses = frozenset(int(s) for s in retry_statuses)
        if statuses & {400, 422}:
            raise ConfigurationError("400 and 422 are never retried: repeating the same request cannot change them")
        set_(self, "retry_statuses", statuses)
        for name, methods in (("key_methods", key_methods), ("idempotent_methods", idempotent_methods)):
            if isinstance(methods, str):
                raise ConfigurationError(f"{name} must be a collection of method names, not one string")
            set_(self, name, frozenset(m.upper() for m in methods))
        if not key_header or not key_header.isascii():
            raise ConfigurationError(f"key_header must be a header name, got {key_header!r}")
        set_(self, "key_header", key_header)
        set_(self, "_backoff", tenacity.wait_random_exponential(multiplier=self.wait_initial, max=self.wait_max))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RetryPolicy is immutable; use policy.replace({name}=...)")

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__ if not name.startswith("_")}

    def __repr__(self) -> str:
        return "RetryPolicy(" + ", ".join(f"{k}={v!r}" for k, v in sorted(self._fields().items())) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryPolicy) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._fields().items())))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_policy_from_fields, (self._fields(),))

    def replace(self, **changes: Any) -> RetryPolicy:
        """Return a copy with some arguments changed, e.g. ``policy.replace(attempts=3)``."""
        return RetryPolicy(**{**self._fields(), **changes})

    def retryable(self, method: str, keyed: bool) -> bool:
        """True when a request may be sent more than once: it has a key, or its method is idempotent."""
        return self.attempts > 1 and (keyed or method.upper() in self.idempotent_methods)

    def retry_status(self, status: int, keyed: bool) -> bool:
        """True when an answer with this status is retried (409 only under a key)."""
        return status in self.retry_statuses and (keyed or status != 409)


def _loggable(url: str) -> str:
    """The URL without credentials, query or fragment, which may hold secrets."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path


def _policy_from_fields(fields: dict[str, Any]) -> RetryPolicy:
    """Rebuild a pickled :class:`RetryPolicy`."""
    return RetryPolicy(**fields)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Return the wait a ``Retry-After`` header asks for, in seconds.

    RFC 9110 section 10.2.3: the value is delay-seconds or an HTTP-date.
    Fractional seconds are accepted too; a date in the past means 0.

    Args:
        value: the header value, or None when absent.
        now: the current time for an HTTP-date (default: now, UTC).

    Returns:
        The wait in seconds (>= 0), or None when the header is absent or
        cannot be read (the caller then uses its backoff).
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are always GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(seconds, 0.0)


def resolve_key(
    policy: RetryPolicy,
    method: str,
    header_values: Sequence[str],
    given: str | None,
    key_factory: KeyFactory,
) -> tuple[str | None, str | None]:
    """Decide the idempotency key of a logical request, before its first attempt.

    A key the caller put in the headers (any case) is kept as it is; a key
    given through the front's argument (``given``) is formatted and added; a
    request of a ``key_methods`` method without either gets a fresh key from
    ``key_factory``. Shared/cases B19(b).

    Args:
        policy: the retry policy (``key_methods``).
        method: the request method.
        header_values: the values of every key header line already on the request.
        given: the key passed through the front's own argument, or None.
        key_factory: makes a fresh key.

    Returns:
        ``(key, header_value)``: the key (None when the request carries none)
        and the header value to add (None when nothing is to be added).

    Raises:
        InvalidKey: a header value is malformed, two header lines differ, the
            given or generated key is not 1-255 printable ASCII characters, or
            the key was given both ways with different values.
    """
    in_header = parse_key([v.encode("latin-1") for v in header_values])
    if in_header is not None:
        if given is not None and given != in_header:
            raise InvalidKey(
                f"The request has the idempotency key {in_header!r} in its headers and {given!r} as an "
                "argument; give it one way, or make both the same."
            )
        return in_header, None
    if given is None:
        if method.upper() not in policy.key_methods:
            return None, None
        given = key_factory()
    return given, format_key(given)


def tag_exception(exc: BaseException, key: str) -> None:
    """Make the key visible on an exception the caller gets (shared/cases B19(d)).

    Sets ``exc.idempotency_key`` and adds a note (PEP 678), so a caller can
    retry later with the same key and a traceback shows it.
    """
    if getattr(exc, "idempotency_key", None) == key:
        return
    # An exception class with __slots__ refuses the attribute; the note still shows the key.
    with contextlib.suppress(AttributeError):
        exc.idempotency_key = key  # type: ignore[attr-defined]
    exc.add_note(f"Idempotency-Key: {key} (retry with this key to get the original answer)")


class Answer(Protocol):
    """What the policy needs of a response (httpx's and requests' both fit)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


A = TypeVar("A", bound=Answer)


@dataclass(frozen=True, slots=True)
class Attempt(Generic[R]):
    """One attempt of a logical request, given to the ``on_attempt`` hook as it ends.

    Attributes:
        key: the idempotency key sent (the same on every attempt), or None.
        method: the request method.
        url: the request URL.
        number: 1 for the first attempt, 2 for the first retry, ...
        response: the answer, or None when the attempt raised.
        error: the exception, or None when an answer came.
        delay: seconds the client waits before the next attempt; None when
            this attempt is the last (its answer or exception goes to the caller).
    """

    key: str | None
    method: str
    url: str
    number: int
    response: R | None
    error: BaseException | None
    delay: float | None

    @property
    def status(self) -> int | None:
        """The answer's status, or None when the attempt raised."""
        return getattr(self.response, "status_code", None)


#: Called with every :class:`Attempt` as it ends (tests read the delays; the demo counts attempts).
OnAttempt = Callable[[Attempt[Any]], None]


class RetryRun(Generic[A]):
    """The retry decisions for one logical request, as tenacity callbacks.

    Args:
        policy: the retry policy.
        method: the request method.
        url: the request URL (for the hook and the log).
        key: the request's idempotency key, or None.
        retryable_error: says whether an exception the front raised is a
            transport failure worth a retry (connection, timeout, protocol).
        clock: monotonic seconds, for the ``timeout`` bound.
        on_attempt: the hook, or None.
        body_of: the body of an answer the policy would retry (decoded, read
            by the front), so a final problem (:func:`is_final_problem`) is not
            retried; None when the front cannot give it.
    """

    __slots__ = (
        "_body_of",
        "_clock",
        "_may_retry",
        "_on_attempt",
        "_policy",
        "_retryable_error",
        "_start",
        "key",
        "method",
        "url",
    )

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        method: str,
        url: str,
        key: str | None,
        retryable_error: Callable[[BaseException], bool],
        clock: Callable[[], float],
        on_attempt: OnAttempt | None,
        body_of: Callable[[A], bytes | None] | None = None,
    ) -> None:
        self._policy = policy
        self._body_of = body_of
        self.method = method
        self.url = url
        self.key = key
        self._retryable_error = retryable_error
        self._clock = clock
        self._on_attempt = on_attempt
        self._may_retry = policy.retryable(method, key is not None)
        self._start = clock()

    @property
    def may_retry(self) -> bool:
        """True when this request can be sent more than once (so its body must be replayable)."""
        return self._may_retry

    def retry_status(self, status: int) -> bool:
        """True when an answer with this status would be retried for this request."""
        return self._may_retry and self._policy.retry_status(status, self.key is not None)

    def retrying(self, sleep: Callable[[float], None]) -> tenacity.Retrying:
        """A tenacity ``Retrying`` for this request; call it with the attempt function."""
        # tenacity passes its DoSleep (a float subclass); hand the sleep a plain float.
        return tenacity.Retrying(sleep=lambda seconds: sleep(float(seconds)), **self._callbacks())

    def async_retrying(self, sleep: Callable[[float], Any]) -> tenacity.AsyncRetrying:
        """A tenacity ``AsyncRetrying`` for this request; await it with the attempt function."""
        return tenacity.AsyncRetrying(sleep=lambda seconds: sleep(float(seconds)), **self._callbacks())

    def _callbacks(self) -> dict[str, Any]:
        return {
            "retry": self._retry,
            "wait": self._wait,
            "stop": self._stop,
            "before_sleep": self._before_sleep,
            "retry_error_callback": self._give_up,
        }

    # tenacity's order after an attempt: retry? -> wait -> stop? -> before_sleep -> sleep.

    def _retry(self, state: tenacity.RetryCallState) -> bool:
        outcome = state.outcome
        assert outcome is not None
        if not self._may_retry:
            retry = False
        elif outcome.failed:
            retry = self._retryable_error(outcome.exception())  # type: ignore[arg-type]
        else:
            answer = outcome.result()
            retry = self._policy.retry_status(answer.status_code, self.key is not None) and not self._final(answer)
        if not retry:
            self._report(state, None)
        return retry

    def _final(self, answer: A) -> bool:
        """True when ``answer`` is a final problem (:data:`FINAL_PROBLEMS`): no retry changes it."""
        if self._body_of is None:
            return False
        return is_final_problem(answer.headers.get("content-type"), self._body_of(answer))

    def _wait(self, state: tenacity.RetryCallState) -> float:
        outcome = state.outcome
        assert outcome is not None
        if not outcome.failed:
            retry_after = parse_retry_after(outcome.result().headers.get("retry-after"))
            if retry_after is not None:
                return retry_after
        return float(self._policy._backoff(state))

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self._policy.attempts:
            return True
        return self._clock() - self._start + state.upcoming_sleep > self._policy.timeout

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        self._report(state, state.upcoming_sleep)
        outcome = state.outcome
        assert outcome is not None
        reason = type(outcome.exception()).__name__ if outcome.failed else outcome.result().status_code
        logger.info(
            "idempo: %s %s attempt %d got %s; retrying in %.3fs (Idempotency-Key %s)",
            self.method,
            _loggable(self.url),
            state.attempt_number,
            reason,
            state.upcoming_sleep,
            self.key,
        )

    def _give_up(self, state: tenacity.RetryCallState) -> Any:
        self._report(state, None)
        outcome = state.outcome
        assert outcome is not None
        return outcome.result()  # the last answer, or raises the last exception

    def _report(self, state: tenacity.RetryCallState, delay: float | None) -> None:
        if self._on_attempt is None:
            return
        outcome = state.outcome
        assert outcome is not None
        error = outcome.exception() if outcome.failed else None
        response = None if outcome.failed else outcome.result()
        self._on_attempt(Attempt(self.key, self.method, self.url, state.attempt_number, response, error, delay))
