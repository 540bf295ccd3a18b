"""OpenTelemetry spans after real requests over HTTP, collected with the SDK's InMemorySpanExporter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from idempo.observability import instrument

from .conftest import Site, eventually, record_key
from .test_logs import dead_redis_store


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Spans of a tracer provider of the test's own (the global one is left alone)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(tracing=provider)
    yield exporter
    provider.shutdown()


def request_spans(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """Wait for ``count`` idempo.request spans; return them in the order they ended."""

    def found() -> list[ReadableSpan]:
        spans = [s for s in exporter.get_finished_spans() if s.name == "idempo.request"]
        return spans if len(spans) >= count else []

    return eventually(found)  # type: ignore[no-any-return]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[str]:
    """Names of the spans whose parent is ``parent``, in the order they ended."""
    return [
        s.name
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def test_request_span_with_store_children(serve: Callable[..., Site], exporter: InMemorySpanExporter) -> None:
    """An executed request is an idempo.request span holding store begin and complete spans; a replay holds a begin."""
    site = serve()
    site.post()
    site.post()
    executed, replayed = request_spans(exporter, 2)

    assert executed.kind is SpanKind.INTERNAL
    attributes = dict(executed.attributes or {})
    assert attributes["idempo.outcome"] == "executed"
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == "/orders/*"
    assert attributes["http.response.status_code"] == 201
    assert attributes["idempo.record_key"] == record_key()
    assert attributes["idempo.verdict"] == "store"
    assert attributes["idempo.lease_takeover"] is False
    assert len(str(attributes["idempo.key_hash"])) == 16
    assert "idempo.key" not in attributes
    assert children(exporter, executed) == ["idempo.store.begin", "idempo.store.complete"]
    assert dict(replayed.attributes or {})["idempo.outcome"] == "replayed"
    assert children(exporter, replayed) == ["idempo.store.begin"]

    (begin,) = [s for s in exporter.get_finished_spans() if s.name == "idempo.store.begin"][:1]
    assert begin.kind is SpanKind.CLIENT
    assert dict(begin.attributes or {}) == {
        "db.operation.name": "begin",
        "idempo.store": "memory",
        "idempo.begin.result": "acquired",
    }


def test_handler_runs_inside_the_request_span(serve: Callable[..., Site], exporter: InMemorySpanExporter) -> None:
    """The span current in the handler is idempo's request span, so the app's own spans nest under it."""
    site = serve()
    site.post()
    (span,) = request_spans(exporter, 1)
    assert site.handlers.span_ids == [span.context.span_id]


def test_store_error_span(serve: Callable[..., Site], exporter: InMemorySpanExporter) -> None:
    """An unreachable store: the begin span and the request span are errors; the outcome is store_error."""
    site = serve(store=dead_redis_store())
    assert site.post().status_code == 503
    (span,) = request_spans(exporter, 1)
    assert span.status.status_code is StatusCode.ERROR
    attributes = dict(span.attributes or {})
    assert attributes["idempo.outcome"] == "store_error"
    assert attributes["error.type"] == "StoreUnavailable"
    (begin,) = [s for s in exporter.get_finished_spans() if s.name == "idempo.store.begin"]
    assert begin.status.status_code is StatusCode.ERROR
    assert dict(begin.attributes or {})["db.system.name"] == "redis"


def test_handler_exception_recorded(serve: Callable[..., Site], exporter: InMemorySpanExporter) -> None:
    """A handler that raises: the request span records the exception; the record was released."""
    site = serve()
    assert site.post("/boom").status_code == 500
    (span,) = request_spans(exporter, 1)
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["idempo.outcome"] == "released"
    assert [event.name for event in span.events] == ["exception"]
    assert children(exporter, span) == ["idempo.store.begin", "idempo.store.release"]


def test_no_spans_until_instrumented(serve: Callable[..., Site]) -> None:
    """Without instrument(tracing=...), no span is created, even with an SDK provider configured."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    site = serve()
    site.post()
    instrument(tracing=provider)
    instrument(tracing=False)
    site.post(key="second")
    provider.shutdown()
    assert exporter.get_finished_spans() == ()


def test_api_alone_is_a_no_op() -> None:
    """With opentelemetry-api and no SDK configured, tracing on changes no answer (checked in a clean interpreter)."""
    code = """
import asyncio
from idempo.asgi import IdempotencyMiddleware
from idempo.observability import instrument
from idempo.stores import AsyncMemoryStore
instrument(tracing=True)
sent = []
async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
async def main():
    mw = IdempotencyMiddleware(app, AsyncMemoryStore())
    scope = {"type": "http", "method": "POST", "path": "/x", "query_string": b"", "client": ("1.2.3.4", 1),
             "headers": [(b"idempotency-key", b"k")]}
    async def receive(): return {"type": "http.request", "body": b"", "more_body": False}
    async def send(message): sent.append(message)
    await mw(scope, receive, send)
    await mw(scope, receive, send)
asyncio.run(main())
assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [201, 201], sent
import sys
assert "opentelemetry.sdk" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True)
