"""Prometheus metrics after real requests over HTTP, read from a fresh CollectorRegistry; /metrics by ASGI, WSGI."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import wsgiref.simple_server
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from prometheus_client import CollectorRegistry

from idempo import metrics
from idempo.observability import instrument

from .conftest import Site, eventually, record_key


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry with idempo's metrics turned on in it."""
    registry = CollectorRegistry()
    instrument(metrics=registry)
    return registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0 when absent."""
    return registry.get_sample_value(name, labels) or 0.0


def requests(registry: CollectorRegistry, outcome: str, route: str = "/orders/*") -> float:
    return value(registry, "idempo_requests_total", outcome=outcome, method="POST", route=route)


def test_requests_by_outcome_and_route(serve: Callable[..., Site], registry: CollectorRegistry) -> None:
    """Executed, replayed, mismatch and released requests are counted by outcome, method and route pattern."""
    site = serve()
    site.post()
    site.post()
    site.post()
    site.post(body=b'{"other":1}')
    site.post("/orders/2", key="k2")
    site.post("/failing")
    eventually(lambda: requests(registry, "released", route="*") == 1)
    assert requests(registry, "executed") == 2
    assert requests(registry, "replayed") == 2
    assert requests(registry, "mismatch") == 1
    # Two paths, one series: the label is the pattern.
    labels = {"outcome": "executed", "method": "POST", "route": "/orders/1"}
    assert registry.get_sample_value("idempo_requests_total", labels) is None


def test_store_and_handler_histograms(serve: Callable[..., Site], registry: CollectorRegistry) -> None:
    """Each store call is observed by store and operation; each handler run by route."""
    site = serve()
    site.post()
    site.post()
    site.post("/failing")
    eventually(lambda: value(registry, "idempo_handler_duration_seconds_count", method="POST", route="*") == 1)
    count = "idempo_store_operation_duration_seconds_count"
    assert value(registry, count, store="memory", operation="begin") == 3
    assert value(registry, count, store="memory", operation="complete") == 1
    assert value(registry, count, store="memory", operation="release") == 1
    assert value(registry, "idempo_store_operation_duration_seconds_sum", store="memory", operation="begin") > 0
    assert value(registry, "idempo_handler_duration_seconds_count", method="POST", route="/orders/*") == 1


def test_leases_in_flight_and_oldest_age(serve: Callable[..., Site], registry: CollectorRegistry) -> None:
    """While a handler runs under its lease the gauge is 1 and the oldest lease has an age; both fall back after."""
    site = serve()
    runner = threading.Thread(target=site.post, args=("/slow",))
    runner.start()
    try:
        assert site.handlers.entered.wait(10)
        assert value(registry, "idempo_leases_in_flight", route="*") == 1
        first_age = value(registry, "idempo_oldest_lease_age_seconds")
        eventually(lambda: value(registry, "idempo_oldest_lease_age_seconds") > first_age)
    finally:
        site.handlers.gate.set()
        runner.join(10)
    eventually(lambda: requests(registry, "executed", route="*") == 1)
    assert value(registry, "idempo_leases_in_flight", route="*") == 0
    assert value(registry, "idempo_oldest_lease_age_seconds") == 0


def test_lease_takeovers_and_store_errors(serve: Callable[..., Site], registry: CollectorRegistry) -> None:
    """A takeover counts in idempo_lease_takeovers_total; a refused complete counts as a lease_lost store error."""
    site = serve()
    site.store.sync.begin(record_key(), "crashed", 1000)  # type: ignore[attr-defined]
    site.clock.advance(2)
    site.post()
    eventually(lambda: requests(registry, "lease_takeover") == 1)
    assert value(registry, "idempo_lease_takeovers_total", route="/orders/*", decision="execute") == 1

    # A slow holder outlives its lease; a retry takes the record over; the holder's complete is refused.
    runner = threading.Thread(target=site.post, args=("/slow",), kwargs={"key": "slow-key"})
    runner.start()
    assert site.handlers.entered.wait(10)
    site.clock.advance(60)
    site.handlers.entered.clear()
    retry = threading.Thread(target=site.post, args=("/slow",), kwargs={"key": "slow-key"})
    retry.start()
    assert site.handlers.entered.wait(10)
    site.handlers.gate.set()
    runner.join(10)
    retry.join(10)
    errors = "idempo_store_operation_errors_total"
    eventually(lambda: value(registry, errors, store="memory", operation="complete", error="lease_lost") == 1)
    assert value(registry, "idempo_lease_takeovers_total", route="*", decision="execute") == 1


def test_metrics_served_over_asgi_and_wsgi(serve: Callable[..., Site]) -> None:
    """idempo.metrics.mount serves GET /metrics on the app; make_wsgi_app serves the same registry over WSGI."""
    registry = CollectorRegistry()
    site = serve(mount=lambda app: metrics.mount(app, registry=registry))
    site.post()
    line = 'idempo_requests_total{method="POST",outcome="executed",route="/orders/*"} 1.0'
    text = eventually(lambda: line in (body := site.client.get("/metrics").text) and body)
    assert site.client.get("/metrics").status_code == 200  # no redirect to /metrics/
    assert "idempo_store_operation_duration_seconds_bucket" in text

    with wsgi_server(metrics.make_wsgi_app(registry)) as url:
        assert line in httpx.get(url + "/metrics", timeout=10).text


@contextmanager
def wsgi_server(app: object) -> Iterator[str]:
    """Serve a WSGI app with wsgiref on an ephemeral loopback port, in a thread."""

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=Quiet)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_instrument_twice_reuses_the_registry_metrics() -> None:
    """Turning metrics on again for the same registry does not register them twice."""
    registry = CollectorRegistry()
    instrument(metrics=registry)
    instrument(metrics=registry)
    assert metrics.PrometheusMetrics.for_registry(registry) is metrics.PrometheusMetrics.for_registry(registry)


def test_nothing_imported_until_instrumented() -> None:
    """The middleware and the hooks import neither prometheus-client nor OpenTelemetry (clean interpreter)."""
    code = (
        "import sys, idempo.asgi, idempo.observability, idempo._engine\n"
        "bad = [m for m in ('prometheus_client', 'opentelemetry') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _answers(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_demo_serve_exposes_metrics() -> None:
    """`idempo demo --serve` serves GET /metrics with the requests it answered."""
    process = subprocess.Popen(
        [sys.executable, "-m", "idempo", "demo", "--serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or ()], daemon=True)
    reader.start()
    try:
        banner = ""
        while (match := re.search(r"up at (http://127\.0\.0\.1:\d+)", banner)) is None:
            banner = lines.get(timeout=60)
        base_url = match.group(1)
        payment = {"order_id": "order-1", "amount": 1999, "currency": "EUR"}
        with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
            # The banner comes before uvicorn listens on the socket: wait until it answers.
            eventually(lambda: _answers(client, "/healthz"), timeout=60)
            for _ in range(2):
                client.post("/payments", json=payment, headers={"Idempotency-Key": "demo-key"})
            text = client.get("/metrics").text
    finally:
        process.terminate()
        process.wait(timeout=30)
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    assert 'idempo_requests_total{method="POST",outcome="replayed",route="*"} 1.0' in text
    assert 'idempo_store_operation_duration_seconds_count{operation="begin",store="sqlite"} 2.0' in text
