"""Prometheus metrics for idempo (extra ``idempo[prometheus]``: prometheus-client).

Turn them on with ``idempo.observability.instrument(metrics=True)`` (or
``metrics=<a CollectorRegistry>``), then serve them::

    app.mount("/metrics", idempo.metrics.make_asgi_app())      # Starlette, FastAPI
    # or: idempo.metrics.mount(app), which also turns them on and serves /metrics without a redirect
    wsgi_app = DispatcherMiddleware(app, {"/metrics": idempo.metrics.make_wsgi_app()})  # Flask

=================================================  ========================  ==========================================
metric                                             labels                    what
=================================================  ========================  ==========================================
``idempo_requests_total``                          outcome, method, route    idempotent requests by outcome
``idempo_handler_duration_seconds``                method, route             handler time under a lease (histogram)
``idempo_store_operation_duration_seconds``        store, operation          each store call (histogram)
``idempo_store_operation_errors_total``            store, operation, error   failed store calls (unavailable, error,
                                                                             lease_lost)
``idempo_leases_in_flight``                        route                     leases this process holds now (gauge)
``idempo_lease_takeovers_total``                   route, decision           expired leases taken over (a holder crashed
                                                                             or lost the store), by what ``on_takeover``
                                                                             decided: ``execute`` or ``hold``
``idempo_save_retries_total``                      store                     background retries of a save that failed
                                                                             after the handler ran
``idempo_saves_total``                             store, result             how those saves ended: ``saved``,
                                                                             ``lease_lost``, ``given_up``
``idempo_oldest_lease_age_seconds``                                          age of the oldest lease this process holds
=================================================  ========================  ==========================================

``route`` is the route pattern that chose the policy (the middleware's
``routes`` keys) or ``"*"`` for the default policy, never a raw path, so the
number of series stays bounded. ``store`` is ``memory``, ``sqlite``,
``postgres`` or ``redis``; ``operation`` is ``begin``, ``complete``,
``release`` or ``extend``.

Multi-process servers (gunicorn with ``PROMETHEUS_MULTIPROC_DIR``):
counters, histograms and the in-flight gauge (``livesum``) aggregate across
workers; ``idempo_oldest_lease_age_seconds`` is computed at scrape time in
the process scraped, so it is absent from multi-process exposition.
"""

from __future__ import annotations

from .observability._prometheus import (
    HANDLER_BUCKETS,
    STORE_BUCKETS,
    PrometheusMetrics,
    make_asgi_app,
    make_wsgi_app,
    mount,
)

__all__ = [
    "HANDLER_BUCKETS",
    "STORE_BUCKETS",
    "PrometheusMetrics",
    "make_asgi_app",
    "make_wsgi_app",
    "mount",
]
