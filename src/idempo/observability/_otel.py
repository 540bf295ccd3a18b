"""The OpenTelemetry sink: idempo's spans, public as :mod:`idempo.tracing` (which describes them)."""

from __future__ import annotations

from contextvars import Token
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._core.records import Acquired, Existing
from .._version import __version__
from ._report import RequestReport

# Public names: idempo.tracing re-exports them (its __all__).

#: The name of the span of one idempotent request.
REQUEST_SPAN = "idempo.request"
#: Store operation spans are named this plus the operation (``idempo.store.begin``).
STORE_SPAN_PREFIX = "idempo.store."

# db.system.name values from the semantic conventions, for the stores that have one.
_DB_SYSTEMS = {"postgres": "postgresql", "sqlite": "sqlite", "redis": "redis"}
# Outcomes where idempo itself failed the request.
_ERROR_OUTCOMES = frozenset({"store_error", "abandoned"})


class Tracing:
    """Creates idempo's spans with one tracer.

    Args:
        tracer_provider: the ``TracerProvider`` to use; None uses the global
            one (resolved when spans are made, so an SDK configured later is used).
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        self.tracer = trace.get_tracer("idempo", __version__, tracer_provider=tracer_provider)

    def start_request(self, front: str, method: str, route: str) -> tuple[Any, Token[Context] | None]:
        """Start the request's span and make it current (until :meth:`end_request`); return its handle."""
        span = self.tracer.start_span(
            REQUEST_SPAN,
            kind=SpanKind.INTERNAL,
            attributes={"http.request.method": method, "http.route": route, "idempo.front": front},
        )
        if not span.is_recording():
            # A span that records nothing (no SDK, or sampled out) is not made
            # current: the context switch would be the whole cost of tracing.
            return span, None
        return span, otel_context.attach(trace.set_span_in_context(span))

    def end_request(self, handle: tuple[Any, Token[Context] | None] | None, report: RequestReport) -> None:
        """Set the outcome's attributes, end the span and restore the previous context."""
        if handle is None:
            return
        span, token = handle
        try:
            if span.is_recording():
                fields = report.fields
                attributes: dict[str, Any] = {
                    "idempo.outcome": fields["idempo_outcome"],
                    "idempo.lease_takeover": report.lease_takeover,
                }
                for name, field in (
                    ("http.response.status_code", "idempo_status"),
                    ("idempo.record_key", "idempo_record_key"),
                    ("idempo.key_hash", "idempo_key_hash"),
                    ("idempo.scope_hash", "idempo_scope_hash"),
                    ("idempo.verdict", "idempo_verdict"),
                    ("idempo.settle_error", "idempo_settle_error"),
                    ("idempo.key", "idempo_key"),
                ):
                    if fields.get(field) is not None:
                        attributes[name] = fields[field]
                span.set_attributes(attributes)
                error = report.error
                if fields["idempo_outcome"] in _ERROR_OUTCOMES or report.settle_error == "store_error":
                    span.set_status(Status(StatusCode.ERROR, fields["idempo_error"]))
                    if error is not None:
                        span.set_attribute("error.type", type(error).__qualname__)
                elif error is not None and fields["idempo_outcome"] != "bypassed":
                    # The handler raised: the exception propagates to the server.
                    span.record_exception(error)
                    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
                    span.set_attribute("error.type", type(error).__qualname__)
        finally:
            if token is not None:
                otel_context.detach(token)
            span.end()

    def start_store(self, store: str, operation: str) -> tuple[Any, Token[Context] | None]:
        """Start and make current the span of one store operation; return what :meth:`end_store` needs."""
        attributes = {"db.operation.name": operation, "idempo.store": store}
        system = _DB_SYSTEMS.get(store)
        if system is not None:
            attributes["db.system.name"] = system
        span = self.tracer.start_span(STORE_SPAN_PREFIX + operation, kind=SpanKind.CLIENT, attributes=attributes)
        if not span.is_recording():
            return span, None
        return span, otel_context.attach(trace.set_span_in_context(span))

    def end_store(self, handle: tuple[Any, Token[Context] | None], result: object, error: BaseException | None) -> None:
        """End a store operation's span, with its result or error."""
        span, token = handle
        try:
            if span.is_recording():
                if error is not None:
                    span.set_attribute("error.type", type(error).__qualname__)
                    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
                elif isinstance(result, Acquired):
                    span.set_attribute("idempo.begin.result", "takeover" if result.takeover else "acquired")
                elif isinstance(result, Existing):
                    span.set_attribute("idempo.begin.result", result.record.state.value)
        finally:
            if token is not None:
                otel_context.detach(token)
            span.end()
