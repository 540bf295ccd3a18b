"""What the sinks (Prometheus metrics, OpenTelemetry spans) receive: frozen reports, and the sinks' protocols.

A sink never sees a request's observation, only what it is handed: a
:class:`RequestReport` when the request ends, and plain values for the
events before (a lease taken, a store call). So the sinks depend on this
module alone, and :mod:`idempo.observability` loads them (when turned on)
without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["MetricsSink", "RequestReport", "TracingSink"]


@dataclass(frozen=True, slots=True)
class RequestReport:
    """What one idempotent request did, as it ended.

    Attributes:
        request: identifies the request among those in flight (the lease
            bookkeeping of :meth:`MetricsSink.lease_taken`).
        front: ``"asgi"``, ``"wsgi"``, ``"django"``, ``"decorator"``...
        method: the request method (for the decorator: ``"CALL"``).
        route: the route label (a pattern, never a raw path).
        outcome: the outcome (:class:`idempo.observability.Outcome` value).
        status: the HTTP status answered, when known.
        lease_started: ``time.monotonic()`` when it took its lease, None when it took none.
        lease_takeover: True when ``begin`` took over an expired lease.
        handler_seconds: seconds in the handler, None when it did not run.
        settle_error: ``"lease_lost"`` or ``"store_error"`` when settling failed.
        error: the exception behind a store error, a bypass or a failed handler.
        fields: the fields of the request's log record (``idempo_outcome``, ...).
    """

    request: int
    front: str
    method: str
    route: str
    outcome: str
    status: int | None
    lease_started: float | None
    lease_takeover: bool
    handler_seconds: float | None
    settle_error: str | None
    error: BaseException | None
    fields: Mapping[str, Any]


class MetricsSink(Protocol):
    """The metrics sink ``instrument(metrics=...)`` turns on (:class:`idempo.metrics.PrometheusMetrics`)."""

    def lease_taken(self, request: int, route: str, started: float | None, takeover: bool) -> None:
        """A request took a lease (``takeover``: an expired one) at ``started`` (monotonic seconds)."""

    def takeover_held(self, route: str) -> None:
        """A request found an expired lease and held the key instead of executing."""

    def request_finished(self, report: RequestReport) -> None:
        """A request ended."""

    def store_operation(self, store: str, operation: str, seconds: float, error: str | None) -> None:
        """A store call took ``seconds``; ``error``: its failure's kind (``unavailable``, ``lease_lost``, ``error``)."""

    def save_event(self, store: str, event: str) -> None:
        """A background save retry: ``retry``, ``saved``, ``lease_lost`` or ``given_up``."""


class TracingSink(Protocol):
    """The tracing sink ``instrument(tracing=...)`` turns on (:class:`idempo.tracing.Tracing`)."""

    def start_request(self, front: str, method: str, route: str) -> Any:
        """Start (and make current) the request's span; return the handle :meth:`end_request` takes."""

    def end_request(self, handle: Any, report: RequestReport) -> None:
        """End the request's span with what the report says."""

    def start_store(self, store: str, operation: str) -> Any:
        """Start (and make current) a store call's span; return the handle :meth:`end_store` takes."""

    def end_store(self, handle: Any, result: object, error: BaseException | None) -> None:
        """End a store call's span, with its result or error."""
