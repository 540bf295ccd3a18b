"""OpenTelemetry spans for idempo (extra ``idempo[otel]``: opentelemetry-api only).

Turn them on with ``idempo.observability.instrument(tracing=True)``. idempo
uses the API alone: without an SDK configured, spans are no-ops. Each
idempotent request gets an ``idempo.request`` span (INTERNAL), current while
the handler runs, so the handler's own spans are its children; each store
operation gets an ``idempo.store.<operation>`` span (CLIENT) inside it.

Attributes use the semantic-convention names where one exists
(``http.request.method``, ``http.route``, ``http.response.status_code``,
``db.system.name``, ``db.operation.name``, ``error.type``) and ``idempo.*``
otherwise (``idempo.outcome``, ``idempo.record_key``, ``idempo.key_hash``,
``idempo.scope_hash``, ``idempo.lease_takeover``, ``idempo.verdict``,
``idempo.store``, ``idempo.begin.result``).
"""

from __future__ import annotations

from .observability._otel import REQUEST_SPAN, STORE_SPAN_PREFIX, Tracing

__all__ = ["REQUEST_SPAN", "STORE_SPAN_PREFIX", "Tracing"]
