"""The proxy's own Prometheus metrics (the admin port's ``/metrics``, beside idempo's).

=============================================  ============  ===================================================
metric                                         labels        what
=============================================  ============  ===================================================
``idempo_proxy_upstream_requests_total``       route         requests sent upstream
``idempo_proxy_upstream_errors_total``         kind          failed exchanges, by failure name
``idempo_proxy_upstream_seconds``              route         from sending a request to its answer's last byte
``idempo_proxy_overhead_seconds``              route         the proxy's own time: total time less upstream time
``idempo_proxy_inflight``                                    exchanges with the upstream now
``idempo_proxy_detached_inflight``                           keyed exchanges running on after their client left
``idempo_proxy_unknown_outcomes_total``        cause         keyed exchanges whose outcome is unknown
``idempo_proxy_not_stored_total``              reason        keyed answers not stored for replay
=============================================  ============  ===================================================

Without prometheus-client the metrics are not recorded (nothing fails).
With several workers, prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``) aggregates them; the gauges are ``livesum``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ProxyMetrics"]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Nothing:
    """Stands for a metric when prometheus-client is missing."""

    def labels(self, *_: str) -> _Nothing:
        return self

    def inc(self, _: float = 1) -> None:
        pass

    def dec(self, _: float = 1) -> None:
        pass

    def observe(self, _: float) -> None:
        pass


class ProxyMetrics:
    """The proxy's metrics, registered once in ``registry``.

    Args:
        registry: a prometheus-client ``CollectorRegistry`` (default the global one);
            ``False`` records nothing.
    """

    def __init__(self, registry: Any = None) -> None:
        try:
            if registry is False:
                raise ImportError
            from prometheus_client import REGISTRY, Counter, Gauge, Histogram
        except ImportError:
            nothing = _Nothing()
            self.upstream_requests: Any = nothing
            self.upstream_errors: Any = nothing
            self.upstream_seconds: Any = nothing
            self.overhead_seconds: Any = nothing
            self.inflight: Any = nothing
            self.detached_inflight: Any = nothing
            self.unknown_outcomes: Any = nothing
            self.not_stored: Any = nothing
            return
        registry = REGISTRY if registry is None else registry
        self.upstream_requests = Counter(
            "idempo_proxy_upstream_requests", "Requests sent upstream.", ["route"], registry=registry
        )
        self.upstream_errors = Counter(
            "idempo_proxy_upstream_errors",
            "Failed exchanges with the upstream, by failure.",
            ["kind"],
            registry=registry,
        )
        self.upstream_seconds = Histogram(
            "idempo_proxy_upstream_seconds",
            "Seconds from sending a request upstream to its answer's last byte.",
            ["route"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.overhead_seconds = Histogram(
            "idempo_proxy_overhead_seconds",
            "Seconds the proxy itself added to a request (total less upstream time).",
            ["route"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.inflight = Gauge(
            "idempo_proxy_inflight", "Exchanges with the upstream now.", registry=registry, multiprocess_mode="livesum"
        )
        self.detached_inflight = Gauge(
            "idempo_proxy_detached_inflight",
            "Keyed exchanges running on after their client left (to the deadline; the record completes).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.unknown_outcomes = Counter(
            "idempo_proxy_unknown_outcomes",
            "Keyed exchanges whose outcome is unknown (the request may have been executed).",
            ["cause"],
            registry=registry,
        )
        self.not_stored = Counter(
            "idempo_proxy_not_stored",
            "Keyed answers not stored for replay, by reason.",
            ["reason"],
            registry=registry,
        )
