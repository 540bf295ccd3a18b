"""The observation of one request, the one ``idempo`` logger, and the sinks turned on.

Every idempotent request ends in one record on the ``idempo`` logger, at a
level chosen by its outcome (see :data:`LEVELS`), with the fields of
:meth:`RequestObservation.fields` as ``extra=`` attributes. Metrics and spans
are sinks (:mod:`idempo.observability._report`): :func:`idempo.observability.instrument`
turns them on here (:func:`use_metrics`, :func:`use_tracing`), and each
receives a frozen report, never an observation.

Fronts (the ASGI and WSGI middleware, the decorator) report through one
object per request, :class:`RequestObservation`::

    observation = observe_request("wsgi", method, route, path)
    ...                                                # reject early:
    observation.finish(Outcome.MISSING_KEY, 400)
    ...
    observation.identify(principal, key, record_key, digests)
    decision = drive_sync(flow, store, observation)    # the engine reports begin and the decision
    observation.handler_started()
    ...                                                # run the handler
    observation.handler_finished(status)
    settle_sync(store, command, observation)           # the engine reports the verdict
    observation.finish()                               # in a finally, same thread/task as observe_request

The store drivers in :mod:`idempo._engine._async.drivers` time every store
operation, so store latency is measured in one place for every front.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .._core.digests import Digests
from .._core.flow import Complete, Decision, Extend, Held, InProgress, Mismatch, NotReplayable, Proceed, Release, Replay
from .._core.records import MARKER_STATUS, Marker
from ..exceptions import LeaseLost, StoreUnavailable
from ._report import MetricsSink, RequestReport, TracingSink

__all__ = [
    "LEVELS",
    "Outcome",
    "RequestObservation",
    "error_kind",
    "log_keys",
    "logger",
    "observe_request",
    "save_outcome",
    "store_call_async",
    "store_call_sync",
    "store_label",
    "use_metrics",
    "use_tracing",
]

_T = TypeVar("_T")
_DEBUG = logging.DEBUG

#: The logger of every idempo record: the one ``idempo`` logger, which every module logs to.
logger = logging.getLogger("idempo")


class Outcome(enum.StrEnum):
    """How idempo answered one request: the ``idempo_outcome`` log field and the ``outcome`` metric label."""

    #: The handler ran and its response was stored for replay.
    EXECUTED = "executed"
    #: Answered from the record, handler not run (Idempotent-Replayed: true).
    REPLAYED = "replayed"
    #: The same key is still in progress: 409 (draft section 2.7).
    CONFLICT = "conflict"
    #: The same key with another fingerprint: 422 (draft section 2.7).
    MISMATCH = "mismatch"
    #: No key where the policy requires one: 400.
    MISSING_KEY = "missing_key"
    #: A malformed key: 400.
    INVALID_KEY = "invalid_key"
    #: The principal resolver found no identity: 400.
    NO_PRINCIPAL = "no_principal"
    #: The request body exceeds ``Policy.max_request_body``: 413.
    BODY_TOO_LARGE = "body_too_large"
    #: The body ended before its declared length (the client left mid-upload): nothing ran.
    BODY_INCOMPLETE = "body_incomplete"
    #: Two different ``Content-Type`` values: 400, nothing ran.
    CONTENT_TYPE_AMBIGUOUS = "content_type_ambiguous"
    #: A key sent with a covered method in other letter case (``post``): 400, nothing ran.
    METHOD_AMBIGUOUS = "method_ambiguous"
    #: A key sent with a ``Content-Length`` that is not a number of bytes (WSGI, Django): 400, nothing ran.
    INVALID_CONTENT_LENGTH = "invalid_content_length"
    #: The request took over the expired lease of a crashed holder, then ran the handler
    #: (how it was settled is in ``idempo_verdict``).
    LEASE_TAKEOVER = "lease_takeover"
    #: The handler ran; its outcome is not stored (5xx, exception, 401/403/408/409/425/429,
    #: response too large): the record was released so a retry executes again.
    RELEASED = "released"
    #: The handler ran; the policy holds the key (Verdict.HOLD): retries get 409 until it expires.
    HELD = "held"
    #: The handler ran and answered in full, but the answer exceeds ``max_response_body``:
    #: the record completes as not replayable (retries get 410; the handler never runs again).
    TOO_LARGE = "too_large"
    #: A retry of a key whose first answer was not kept: 410, handler not run.
    NOT_REPLAYABLE = "not_replayable"
    #: A retry of a held key (its first outcome is unknown): 409 ``outcome-unknown``, handler not run.
    OUTCOME_UNKNOWN = "outcome_unknown"
    #: The request found an expired lease with no result under ``on_takeover="hold"``:
    #: it held the key instead of executing (409 ``outcome-unknown``).
    TAKEOVER_HELD = "takeover_held"
    #: The handler ran; its response has a header line no server may send (RFC 9110
    #: section 5.5): the record was released, nothing stored (``idempo_detail`` says why).
    INVALID_RESPONSE = "invalid_response"
    #: The store failed before the handler ran: 503, handler not run (fail closed).
    STORE_ERROR = "store_error"
    #: The store failed and ``Policy.fail_open`` ran the handler without idempotency.
    BYPASSED = "bypassed"
    #: The request held the lease but ended (cancelled) before settling it: the
    #: record stays in progress until its lease expires.
    ABANDONED = "abandoned"


#: The level of each outcome's record. Routine outcomes are DEBUG, client
#: errors INFO, what an operator should look at WARNING (a crashed holder, a
#: held key, running unprotected, a lease left behind), a store failure ERROR.
#: A record whose settle failed is raised to WARNING (lease lost) or ERROR
#: (store failed).
LEVELS: dict[Outcome, int] = {
    Outcome.EXECUTED: logging.DEBUG,
    Outcome.REPLAYED: logging.DEBUG,
    Outcome.RELEASED: logging.DEBUG,
    Outcome.CONFLICT: logging.INFO,
    Outcome.MISMATCH: logging.INFO,
    Outcome.MISSING_KEY: logging.INFO,
    Outcome.INVALID_KEY: logging.INFO,
    Outcome.NO_PRINCIPAL: logging.INFO,
    Outcome.BODY_TOO_LARGE: logging.INFO,
    Outcome.BODY_INCOMPLETE: logging.INFO,
    Outcome.CONTENT_TYPE_AMBIGUOUS: logging.INFO,
    Outcome.METHOD_AMBIGUOUS: logging.INFO,
    Outcome.INVALID_CONTENT_LENGTH: logging.INFO,
    Outcome.LEASE_TAKEOVER: logging.WARNING,
    Outcome.HELD: logging.WARNING,
    Outcome.TOO_LARGE: logging.WARNING,
    Outcome.NOT_REPLAYABLE: logging.INFO,
    Outcome.OUTCOME_UNKNOWN: logging.INFO,
    Outcome.TAKEOVER_HELD: logging.WARNING,
    Outcome.INVALID_RESPONSE: logging.WARNING,
    Outcome.BYPASSED: logging.WARNING,
    Outcome.ABANDONED: logging.WARNING,
    Outcome.STORE_ERROR: logging.ERROR,
}

_VERDICT_OUTCOMES = {
    "store": Outcome.EXECUTED,
    "release": Outcome.RELEASED,
    "hold": Outcome.HELD,
    "not_replayable": Outcome.TOO_LARGE,
}
_DECISION_OUTCOMES: dict[type, Outcome] = {
    Replay: Outcome.REPLAYED,
    InProgress: Outcome.CONFLICT,
    Mismatch: Outcome.MISMATCH,
    Held: Outcome.OUTCOME_UNKNOWN,
    NotReplayable: Outcome.NOT_REPLAYABLE,
}


class _Sinks:
    """What is turned on besides logs; None of it exists until :func:`instrument`."""

    __slots__ = ("log_keys", "metrics", "tracing")

    def __init__(self) -> None:
        self.metrics: MetricsSink | None = None
        self.tracing: TracingSink | None = None
        self.log_keys = False

    def active(self) -> bool:
        return self.metrics is not None or self.tracing is not None


# None while neither metrics nor tracing is on: the hot paths test this one global.
_sinks: _Sinks | None = None
_config = _Sinks()


def use_metrics(sink: MetricsSink | None) -> None:
    """Send every request's metrics to ``sink`` from now on (None: stop)."""
    global _sinks
    _config.metrics = sink
    _sinks = _config if _config.active() else None


def use_tracing(sink: TracingSink | None) -> None:
    """Make every request's spans with ``sink`` from now on (None: stop)."""
    global _sinks
    _config.tracing = sink
    _sinks = _config if _config.active() else None


def log_keys(on: bool) -> None:
    """Add the raw idempotency key to log records and spans (on), or stop."""
    _config.log_keys = on


class RequestObservation:
    """What one idempotent request did; reported when it ends (:meth:`finish`).

    Made by :func:`observe_request`. A front tells it what only the front
    knows (early rejections, the identity, the handler's time and status);
    the drivers in :mod:`idempo._engine` tell it the store's answers (the
    decision, the verdict, the time spent in the store).

    Attributes:
        front: which front served the request: ``"asgi"``, ``"wsgi"``, ``"decorator"``...
        method: the request method (for the decorator: what it scopes keys by).
        route: the route label: the ``routes`` pattern that chose the policy,
            ``"*"`` for the default policy. Never a raw path, so metric
            labels stay few.
        path: the request path (logs and spans only, never a metric label).
        outcome: the :class:`Outcome`, once known.
        status: the HTTP status answered, when known.
        error: the exception behind a store error, a bypass or a failed handler.
        detail: why the handler's response was not stored (``invalid_response``), else None.
        lease_takeover: True when ``begin`` took over an expired lease.
        verdict: how the record was settled after the handler: ``"store"``,
            ``"release"``, ``"hold"``, ``"not_replayable"`` (an answer too
            large to keep); None when the handler did not run under a lease.
        settle_error: ``"lease_lost"`` or ``"store_error"`` when settling failed.
        record_key: the record key (a hash of scope and key), once identified.
        timed: True when the handler and each store call are timed: metrics
            or tracing are on, or DEBUG is enabled on the ``idempo`` logger.
            Otherwise (the default) only the request's duration is measured
            and routine outcomes return at once, which costs next to nothing.
        store_seconds: seconds spent in store calls for this request (when ``timed``).
        handler_seconds: seconds in the handler (excluding idempo's store
            calls made while it ran), None when it did not run.
    """

    # Class-level defaults, so a request that ends early (or in the common
    # case) sets only the attributes it changes: cheaper than __slots__ here.
    outcome: Outcome | None = None
    status: int | None = None
    error: BaseException | None = None
    detail: str | None = None
    lease_takeover = False
    lease_started: float | None = None
    verdict: str | None = None
    settle_error: str | None = None
    record_key: str | None = None
    store_seconds = 0.0
    handler_seconds: float | None = None
    timed = False
    # The handle of the request's span (tracing on), for TracingSink.end_request.
    span: Any = None
    _principal: str | None = None
    _key: str | None = None
    _digests: Digests | None = None
    _handler_started = 0.0
    _handler_store = 0.0
    _answered_instead = False
    _done = False
    _sinks: _Sinks | None = None

    def __init__(self, front: str, method: str, route: str, path: str, sinks: _Sinks | None = None) -> None:
        self.front = front
        self.method = method
        self.route = route
        self.path = path
        self.timed = True
        self._started = time.perf_counter()
        if sinks is not None:
            self._sinks = sinks
            if sinks.tracing is not None:
                self.span = sinks.tracing.start_request(front, method, route)

    # --- what the front reports ---------------------------------------------------------

    def identify(self, principal: str, key: str, record_key: str, digests: Digests) -> None:
        """Record who sent the request and under which key (reported as HMACs under the server secret)."""
        self._principal = principal
        self._key = key
        self.record_key = record_key
        self._digests = digests

    def response_refused(self, reason: str) -> None:
        """The handler's response is not stored because no server may send it: outcome ``invalid_response``."""
        self.outcome = Outcome.INVALID_RESPONSE
        self.detail = reason

    def handler_started(self) -> None:
        """The handler is about to run."""
        self._handler_started = time.perf_counter()
        self._handler_store = self.store_seconds

    def handler_finished(self, status: int | None) -> None:
        """The handler returned or raised; ``status`` is what it answered (None: nothing)."""
        elapsed = time.perf_counter() - self._handler_started
        if self.timed:
            elapsed = max(0.0, elapsed - (self.store_seconds - self._handler_store))
        self.handler_seconds = elapsed
        if status is not None and not self._answered_instead:
            self.status = status

    def answered_instead(self, status: int) -> None:
        """idempo sent ``status`` instead of the handler's answer (a transactional route's problem: 500
        ``transaction-ended``, 503 ``commit-unknown``...): the status reported is the one the client got."""
        self.status = status
        self._answered_instead = True

    def finish(
        self, outcome: Outcome | None = None, status: int | None = None, error: BaseException | None = None
    ) -> None:
        """The request is answered: emit its log record, metrics and span. Later calls do nothing.

        Args:
            outcome: the outcome, when the front decided it (a rejection, a
                store error, a bypass); otherwise drawn from what the engine reported.
            status: the status answered, if not reported before.
            error: the exception behind the outcome, if any.
        """
        if self._done:
            return
        self._done = True
        if outcome is not None:
            self.outcome = outcome
        if status is not None:
            self.status = status
        if error is not None:
            self.error = error
        if self.outcome is None:
            if self.lease_started is None:
                self.outcome = Outcome.EXECUTED  # a front that reports no decision at all
            elif self.lease_takeover:
                self.outcome = Outcome.LEASE_TAKEOVER
            else:
                self.outcome = _VERDICT_OUTCOMES.get(self.verdict or "", Outcome.ABANDONED)
        level = self.level()
        if logger.isEnabledFor(level):
            self._log(level, time.perf_counter() - self._started)
        sinks = self._sinks
        if sinks is not None:
            report = self.report(with_fields=sinks.tracing is not None)
            if sinks.metrics is not None:
                sinks.metrics.request_finished(report)
            if sinks.tracing is not None:
                span, self.span = self.span, None
                sinks.tracing.end_request(span, report)

    # --- what the engine reports --------------------------------------------------------

    def decided(self, decision: Decision) -> None:
        """The flow ended in ``decision`` (called by the drivers)."""
        if type(decision) is Proceed:
            self.lease_started = time.monotonic()
            self.lease_takeover = decision.takeover
            sinks = self._sinks
            if sinks is not None and sinks.metrics is not None:
                sinks.metrics.lease_taken(id(self), self.route, self.lease_started, self.lease_takeover)
        elif type(decision) is Held and decision.takeover:
            self.lease_takeover = True
            self.outcome = Outcome.TAKEOVER_HELD
            sinks = self._sinks
            if sinks is not None and sinks.metrics is not None:
                sinks.metrics.takeover_held(self.route)
        else:
            self.outcome = _DECISION_OUTCOMES[type(decision)]

    def settled(self, command: Complete | Release | Extend, error: BaseException | None) -> None:
        """The record was settled by ``command``; ``error`` when the store refused or failed."""
        if isinstance(command, Complete):
            marker = Marker.of(command.response) if command.response.status == MARKER_STATUS else None
            if marker is None:
                self.verdict = "store"
            else:
                self.verdict = "hold" if marker.kind == Marker.HELD else "not_replayable"
        elif isinstance(command, Extend):
            self.verdict = "hold"
        else:
            self.verdict = "release"
        if error is not None:
            self.settle_error = "lease_lost" if isinstance(error, LeaseLost) else "store_error"
            if self.error is None:
                self.error = error

    # --- reporting ----------------------------------------------------------------------

    def report(self, *, with_fields: bool = True) -> RequestReport:
        """What the request did, frozen, as the sinks receive it (``fields`` empty unless ``with_fields``)."""
        return RequestReport(
            request=id(self),
            front=self.front,
            method=self.method,
            route=self.route,
            outcome=str(self.outcome),
            status=self.status,
            lease_started=self.lease_started,
            lease_takeover=self.lease_takeover,
            handler_seconds=self.handler_seconds,
            settle_error=self.settle_error,
            error=self.error,
            fields=self.fields() if with_fields else {},
        )

    def level(self) -> int:
        """The level of this request's log record (see :data:`LEVELS`)."""
        level = LEVELS[self.outcome] if self.outcome is not None else logging.DEBUG
        if self.settle_error is not None:
            return max(level, logging.ERROR if self.settle_error == "store_error" else logging.WARNING)
        return level

    def fields(self, duration: float | None = None) -> dict[str, Any]:
        """The structured fields of the log record (also the ``extra=`` attributes).

        ``idempo_outcome``, ``idempo_front``, ``idempo_method``, ``idempo_route``,
        ``idempo_path``, ``idempo_status``, ``idempo_record_key``,
        ``idempo_scope_hash`` and ``idempo_key_hash`` (16 hex characters of
        HMAC-SHA256 under the server secret, so a log line cannot be checked
        against guessed keys or credentials), ``idempo_lease_takeover``, ``idempo_verdict``,
        ``idempo_settle_error``, ``idempo_error``, ``idempo_detail``, ``idempo_store_ms``,
        ``idempo_handler_ms``, ``idempo_duration_ms``; plus ``idempo_key``
        after ``instrument(log_keys=True)``.
        """
        principal, key, digests = self._principal, self._key, self._digests
        scope_hash = key_hash = None
        if digests is not None:
            if principal is not None:
                method, path = self.method, self.path
                scope_hash = digests.log_hash(f"{len(principal)}:{principal}{len(method)}:{method}{len(path)}:{path}")
            if key is not None:
                key_hash = digests.log_hash(key)
        error = self.error
        fields: dict[str, Any] = {
            "idempo_outcome": str(self.outcome) if self.outcome is not None else None,
            "idempo_front": self.front,
            "idempo_method": self.method,
            "idempo_route": self.route,
            "idempo_path": self.path,
            "idempo_status": self.status,
            "idempo_record_key": self.record_key,
            "idempo_scope_hash": scope_hash,
            "idempo_key_hash": key_hash,
            "idempo_lease_takeover": self.lease_takeover,
            "idempo_verdict": self.verdict,
            "idempo_settle_error": self.settle_error,
            "idempo_error": f"{type(error).__name__}: {error}" if error is not None else None,
            "idempo_detail": self.detail,
            "idempo_store_ms": round(self.store_seconds * 1000, 3) if self.timed else None,
            "idempo_handler_ms": round(self.handler_seconds * 1000, 3) if self.handler_seconds is not None else None,
            "idempo_duration_ms": round(duration * 1000, 3) if duration is not None else None,
        }
        if _config.log_keys and key is not None:
            fields["idempo_key"] = key
        return fields

    def _log(self, level: int, duration: float) -> None:
        fields = self.fields(duration)
        message = "idempo: %s %s %s -> %s"
        args: tuple[Any, ...] = (self.outcome, self.method, self.path, self.status if self.status is not None else "-")
        if self.record_key is not None:
            message += " (record %s)"
            args += (self.record_key,)
        if self.settle_error is not None:
            message += "; settling the record failed: %s"
            args += (self.settle_error,)
        if self.error is not None and (self.outcome in (Outcome.STORE_ERROR, Outcome.BYPASSED) or self.settle_error):
            message += ": %s"
            args += (fields["idempo_error"],)
        if self.detail is not None:
            message += "; not stored: %s"
            args += (self.detail,)
        logger.log(level, message, *args, extra=fields)


class _QuietObservation(RequestObservation):
    """The observation while nothing listens to routine outcomes (no metrics, no spans, DEBUG off).

    It skips every clock but the request's own and returns at once from
    :meth:`finish` for the routine (DEBUG) outcomes, so a request pays a few
    attribute writes for it; any other outcome is logged in full, without the
    handler's and the store's durations.
    """

    def __init__(self, front: str, method: str, route: str, path: str) -> None:
        self.front = front
        self.method = method
        self.route = route
        self.path = path
        self._started = time.perf_counter()

    def handler_started(self) -> None:
        """See :meth:`RequestObservation.handler_started` (not timed here)."""

    def handler_finished(self, status: int | None) -> None:
        """See :meth:`RequestObservation.handler_finished` (not timed here)."""
        if status is not None and not self._answered_instead:
            self.status = status

    def decided(self, decision: Decision) -> None:
        """See :meth:`RequestObservation.decided`."""
        if type(decision) is Proceed:
            self.lease_started = 0.0  # under a lease; no lease clock kept here
            self.lease_takeover = decision.takeover
        elif type(decision) is Held and decision.takeover:
            self.lease_takeover = True
            self.outcome = Outcome.TAKEOVER_HELD
        else:
            self.outcome = _DECISION_OUTCOMES[type(decision)]

    def finish(
        self, outcome: Outcome | None = None, status: int | None = None, error: BaseException | None = None
    ) -> None:
        """See :meth:`RequestObservation.finish`."""
        if outcome is None and error is None and self.settle_error is None and not self.lease_takeover:
            current = self.outcome
            if current is _REPLAYED or (current is None and self.verdict in _ROUTINE_VERDICTS):
                return  # a DEBUG record, and DEBUG is off
        super().finish(outcome, status, error)


_ROUTINE_VERDICTS = frozenset({"store", "release"})
_REPLAYED = Outcome.REPLAYED  # enum member lookups cost a call in Python 3.11


def observe_request(front: str, method: str, route: str, path: str) -> RequestObservation:
    """Start observing one idempotent request; the hook every front calls first.

    Call it once the request is known to take part (its method and route are
    under a policy and it carries a key, or the policy requires one). Then
    call :meth:`RequestObservation.finish` exactly once when it is answered,
    in the same thread or task (the request's span is made current here and
    detached there).

    Args:
        front: ``"asgi"``, ``"wsgi"``, ``"django"``, ``"decorator"``...
        method: the request method, upper-case.
        route: a label with few values (a route pattern, ``"*"``), never a raw path.
        path: the request path.
    """
    sinks = _sinks
    if sinks is None and not logger.isEnabledFor(_DEBUG):
        return _QuietObservation(front, method, route, path)
    return RequestObservation(front, method, route, path, sinks)


# --- store operations, timed by the drivers ---------------------------------------------------

_STORE_LABELS: dict[type, str] = {}


def store_label(store: object) -> str:
    """A short, stable name for a store's backend: ``memory``, ``sqlite``, ``postgres``, ``redis``...

    Taken from ``store.store_name`` when the store has one, else from its class name
    (``AsyncPostgresStore`` -> ``postgres``).
    """
    cls = type(store)
    label = _STORE_LABELS.get(cls)
    if label is None:
        label = getattr(store, "store_name", None)
        if not isinstance(label, str):
            name = cls.__name__.lower().removeprefix("async")
            label = name.removesuffix("store") or name
        _STORE_LABELS[cls] = label
    return label


def store_call_async(
    observation: RequestObservation | None,
    store: object,
    operation: str,
    fn: Callable[..., Awaitable[_T]],
    *args: Any,
) -> Awaitable[_T]:
    """Call ``fn(*args)`` (a store coroutine function): its coroutine, timed and traced when anything observes it.

    The async twin of :func:`store_call_sync`, with the same arguments (the
    blocking drivers are generated from the async ones).
    """
    sinks = _sinks
    if sinks is None and (observation is None or not observation.timed):
        return fn(*args)
    return _timed_async(observation, sinks, store, operation, fn(*args))


async def _timed_async(
    observation: RequestObservation | None, sinks: _Sinks | None, store: object, operation: str, call: Awaitable[_T]
) -> _T:
    timer = _StoreTimer(observation, sinks, store, operation)
    try:
        result = await call
    except BaseException as exc:
        timer.done(None, exc)
        raise
    timer.done(result, None)
    return result


def store_call_sync(
    observation: RequestObservation | None, store: object, operation: str, fn: Callable[..., _T], *args: Any
) -> _T:
    """Call ``fn(*args)`` (a store method), timed and traced when anything observes it."""
    sinks = _sinks
    if sinks is None and (observation is None or not observation.timed):
        return fn(*args)
    timer = _StoreTimer(observation, sinks, store, operation)
    try:
        result = fn(*args)
    except BaseException as exc:
        timer.done(None, exc)
        raise
    timer.done(result, None)
    return result


class _StoreTimer:
    """One store call being timed (and traced): what the blocking and async wrappers share."""

    __slots__ = ("label", "observation", "operation", "sinks", "span", "started")

    def __init__(self, observation: RequestObservation | None, sinks: _Sinks | None, store: object, operation: str):
        self.observation = observation
        self.sinks = sinks
        self.label = store_label(store)
        self.operation = operation
        tracing = sinks.tracing if sinks is not None else None
        self.span = tracing.start_store(self.label, operation) if tracing is not None else None
        self.started = time.perf_counter()

    def done(self, result: Any, error: BaseException | None) -> None:
        """The call returned ``result`` (or raised ``error``): add its time to the request, record it, end its span."""
        seconds = time.perf_counter() - self.started
        observation, sinks = self.observation, self.sinks
        if observation is not None:
            observation.store_seconds += seconds
        if sinks is not None:
            if sinks.metrics is not None:
                kind = error_kind(error) if error is not None else None
                sinks.metrics.store_operation(self.label, self.operation, seconds, kind)
            if self.span is not None and sinks.tracing is not None:
                sinks.tracing.end_store(self.span, result, error)


def save_outcome(store: str, event: str) -> None:
    """Count one event of a failed save's background retries, by store (metrics on only).

    Args:
        store: the store's label (:func:`store_label`).
        event: ``"retry"`` (an attempt), ``"saved"`` (it landed), ``"lease_lost"``
            (taken over first) or ``"given_up"`` (``Policy.save_retry_for`` passed).
    """
    sinks = _sinks
    if sinks is not None and sinks.metrics is not None:
        sinks.metrics.save_event(store, event)


def error_kind(error: BaseException) -> str:
    """The ``error`` label of a failed store operation: ``unavailable``, ``lease_lost`` or ``error``."""
    if isinstance(error, StoreUnavailable):
        return "unavailable"
    if isinstance(error, LeaseLost):
        return "lease_lost"
    return "error"
