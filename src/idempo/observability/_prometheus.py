"""The Prometheus sink: idempo's metrics, public as :mod:`idempo.metrics` (which describes them)."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import make_asgi_app as _prometheus_asgi_app
from prometheus_client import make_wsgi_app as _prometheus_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._observation import use_metrics
from ._report import RequestReport

# Public names: idempo.metrics re-exports them (its __all__).

#: Histogram buckets of store operations, seconds: a store call takes well under a millisecond to a few.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Histogram buckets of handlers, seconds.
HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

_instances: weakref.WeakKeyDictionary[CollectorRegistry, PrometheusMetrics] = weakref.WeakKeyDictionary()
_instances_lock = threading.Lock()


class _OldestLease(Collector):
    """``idempo_oldest_lease_age_seconds``, computed when scraped."""

    def __init__(self, leases: dict[int, float]) -> None:
        self._leases = leases

    def collect(self) -> Iterable[Metric]:
        oldest = min(self._leases.values(), default=None)
        age = 0.0 if oldest is None else max(0.0, time.monotonic() - oldest)
        yield GaugeMetricFamily(
            "idempo_oldest_lease_age_seconds",
            "Seconds since the oldest lease this process still holds was taken (0 when none).",
            value=age,
        )


class PrometheusMetrics:
    """idempo's metrics in one registry (see the module docstring for names and labels).

    Use :meth:`for_registry` rather than the constructor: a registry refuses
    the same metric names twice.

    Args:
        registry: where to register (default prometheus-client's global ``REGISTRY``).

    Raises:
        ValueError: idempo's metrics are already registered in ``registry``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self.requests = Counter(
            "idempo_requests",
            "Idempotent requests by outcome (executed, replayed, conflict, mismatch, ...).",
            ["outcome", "method", "route"],
            registry=registry,
        )
        self.handler_duration = Histogram(
            "idempo_handler_duration_seconds",
            "Seconds the handler ran under a lease (idempo's own store calls excluded).",
            ["method", "route"],
            buckets=HANDLER_BUCKETS,
            registry=registry,
        )
        self.store_duration = Histogram(
            "idempo_store_operation_duration_seconds",
            "Seconds per store operation (begin, complete, release, extend).",
            ["store", "operation"],
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "idempo_store_operation_errors",
            "Store operations that failed: unavailable, error, or lease_lost (the token no longer held).",
            ["store", "operation", "error"],
            registry=registry,
        )
        self.leases_in_flight = Gauge(
            "idempo_leases_in_flight",
            "Leases this process holds now (handlers running under a lease).",
            ["route"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.lease_takeovers = Counter(
            "idempo_lease_takeovers",
            "Expired leases taken over by a new request (the holder crashed or lost the store), "
            "by decision: execute (ran the handler again) or hold (on_takeover='hold').",
            ["route", "decision"],
            registry=registry,
        )
        self.save_retries = Counter(
            "idempo_save_retries",
            "Background retries of a save (complete, release, hold) that failed after the handler ran.",
            ["store"],
            registry=registry,
        )
        self.saves = Counter(
            "idempo_saves",
            "How saves retried in the background ended: saved, lease_lost (taken over first), "
            "given_up (save_retry_for passed).",
            ["store", "result"],
            registry=registry,
        )
        self._leases: dict[int, float] = {}
        registry.register(_OldestLease(self._leases))
        # Label children, cached: prometheus-client's labels() validates and locks on every call.
        self._children: dict[tuple[Any, ...], Any] = {}

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> PrometheusMetrics:
        """The metrics registered in ``registry`` (default the global one), registering them on first use."""
        registry = REGISTRY if registry is None else registry
        with _instances_lock:
            metrics = _instances.get(registry)
            if metrics is None:
                metrics = _instances[registry] = cls(registry)
            return metrics

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # --- the MetricsSink that idempo.observability sends each request's figures to -------------

    def lease_taken(self, request: int, route: str, started: float | None, takeover: bool) -> None:
        """A request took a lease: count it in flight (and a takeover, if it was one)."""
        self._child(self.leases_in_flight, route).inc()
        if started is not None:
            self._leases[request] = started
        if takeover:
            self._child(self.lease_takeovers, route, "execute").inc()

    def takeover_held(self, route: str) -> None:
        """A request found an expired lease and held the key (``on_takeover="hold"``) instead of executing."""
        self._child(self.lease_takeovers, route, "hold").inc()

    def save_event(self, store: str, event: str) -> None:
        """A background save retry: an attempt (``retry``) or how it ended (``saved``, ``lease_lost``, ``given_up``)."""
        if event == "retry":
            self._child(self.save_retries, store).inc()
        else:
            self._child(self.saves, store, event).inc()

    def request_finished(self, report: RequestReport) -> None:
        """Count the request's outcome; record its handler time; end its lease in flight."""
        route, method = report.route, report.method
        self._child(self.requests, report.outcome, method, route).inc()
        if report.handler_seconds is not None:
            self._child(self.handler_duration, method, route).observe(report.handler_seconds)
        if report.lease_started is not None and self._leases.pop(report.request, None) is not None:
            self._child(self.leases_in_flight, route).dec()

    def store_operation(self, store: str, operation: str, seconds: float, error: str | None) -> None:
        """Record one store call's duration, and its failure's kind (``unavailable``, ``lease_lost``, ``error``)."""
        self._child(self.store_duration, store, operation).observe(seconds)
        if error is not None:
            self._child(self.store_errors, store, operation, error).inc()


def make_asgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """An ASGI app serving the registry (default the global one) in the Prometheus text format."""
    return _prometheus_asgi_app(REGISTRY if registry is None else registry)


def make_wsgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """A WSGI app serving the registry (default the global one) in the Prometheus text format."""
    return _prometheus_wsgi_app(REGISTRY if registry is None else registry)


class _Endpoint:
    """An ASGI app as an instance, so Starlette's ``Route`` serves it as is at an exact path."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def mount(app: Any, path: str = "/metrics", registry: CollectorRegistry | None = None) -> None:
    """Turn idempo's metrics on and serve ``registry`` at ``path`` of a Starlette or FastAPI app.

    Unlike ``app.mount(path, ...)``, ``GET /metrics`` answers directly rather
    than redirecting to ``/metrics/``.

    Args:
        app: a Starlette (or FastAPI) application.
        path: where to serve the metrics.
        registry: the registry to record into and serve (default the global one).
    """
    use_metrics(PrometheusMetrics.for_registry(registry))
    app.add_route(path, _Endpoint(make_asgi_app(registry)), include_in_schema=False)
