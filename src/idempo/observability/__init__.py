"""What idempo did and why: one structured log record per decision, Prometheus metrics, OpenTelemetry spans.

Logs need no switch: every idempotent request ends in one record on the
``idempo`` logger, at a level chosen by its outcome (see :data:`LEVELS`), with
the fields of the request's observation as ``extra=`` attributes
(``idempo_outcome``, ``idempo_route``, ...: docs/operating.md lists them). Raw
idempotency keys are logged only after ``instrument(log_keys=True)``; request
and response bodies never are.

Metrics and spans cost nothing until turned on, once, at startup::

    from idempo import observability

    observability.instrument(metrics=True)   # prometheus-client, extra idempo[prometheus]
    observability.instrument(tracing=True)   # opentelemetry-api, extra idempo[otel]

Until then no Prometheus metric is registered and no span is created; the
library imports neither prometheus-client nor OpenTelemetry. Once on, they
are sinks that receive a frozen report of each request
(:class:`idempo.metrics.PrometheusMetrics`, :class:`idempo.tracing.Tracing`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._observation import LEVELS, Outcome, log_keys, use_metrics, use_tracing

# The fronts' hooks, importable from here as before; no longer part of the public API.
from ._observation import RequestObservation as RequestObservation
from ._observation import error_kind as error_kind
from ._observation import observe_request as observe_request
from ._observation import save_outcome as save_outcome
from ._observation import store_call_async as store_call_async
from ._observation import store_call_sync as store_call_sync
from ._observation import store_label as store_label

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["LEVELS", "Outcome", "instrument", "uninstrument"]


def instrument(
    *,
    metrics: bool | CollectorRegistry | None = None,
    tracing: bool | Any | None = None,
    log_keys: bool | None = None,
) -> None:
    """Turn metrics, spans or raw keys in logs on or off, for every front in this process.

    Each argument left as None keeps its current setting, so
    ``instrument(metrics=True)`` then ``instrument(tracing=True)`` turns both on.

    Args:
        metrics: True registers idempo's metrics (:class:`idempo.metrics.PrometheusMetrics`)
            in prometheus-client's default registry; a ``CollectorRegistry`` registers
            them there; False stops recording. Needs ``idempo[prometheus]``.
        tracing: True creates spans with the global OpenTelemetry tracer
            provider (a no-op until an SDK is configured); a ``TracerProvider``
            uses that one; False stops creating spans. Needs ``idempo[otel]``.
        log_keys: True adds the raw idempotency key to each log record
            (``idempo_key``) and to spans (``idempo.key``). Off by default: a key
            may be guessable or carry meaning, and logs travel far.

    Raises:
        ImportError: prometheus-client or opentelemetry-api is not installed.
    """
    if metrics is not None:
        if metrics is False:
            use_metrics(None)
        else:
            # Imported only when turned on: the library needs neither extra until then.
            from ._prometheus import PrometheusMetrics

            use_metrics(PrometheusMetrics.for_registry(None if metrics is True else metrics))
    if tracing is not None:
        if tracing is False:
            use_tracing(None)
        else:
            from ._otel import Tracing

            use_tracing(Tracing(None if tracing is True else tracing))
    if log_keys is not None:
        _log_keys(bool(log_keys))


_log_keys = log_keys


def uninstrument() -> None:
    """Turn metrics, spans and raw keys in logs off (the state at import)."""
    instrument(metrics=False, tracing=False, log_keys=False)
