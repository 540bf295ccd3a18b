"""HTTP behaviour: a ``Content-Length`` that is not a number of bytes, with a key, is 400 on the WSGI fronts.

uvicorn and waitress refuse such a request themselves (400), so the suite's
servers never pass one on; Werkzeug's development server does. The
frameworks are therefore called in process, as such a server calls them.
Before, the WSGI front read no body for it and fingerprinted an empty one
(Flask then saw an empty body too); Django answered 400 already (issue 10
item 7, whose tests these now are on both WSGI frameworks).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from idempo.observability import instrument, uninstrument
from tests.adapters.conftest import K1, B
from tests.support.clock import FakeClock
from tests.support.frameworks import FRAMEWORKS, Framework
from tests.support.orders import Orders

WSGI = [name for name, framework in FRAMEWORKS.items() if framework.interface == "wsgi"]
MALFORMED = ["abc", "0x10", "1" * 4301, "-5", "+19", " 19", "1_9"]


def call(app: Any, method: str, content_length: str, key: str | None) -> tuple[str, dict[str, str], bytes]:
    """Call a WSGI app as a server that passes Content-Length through unchecked would."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": "/orders",
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": content_length,
        "wsgi.input": io.BytesIO(B),
        "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if key is not None:
        environ["HTTP_IDEMPOTENCY_KEY"] = key
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append((status, headers))
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    status, headers = started[-1]
    return status, {name.lower(): value for name, value in headers}, body


@pytest.fixture(params=WSGI)
def framework(request: pytest.FixtureRequest) -> Framework:
    """A WSGI framework of the suite."""
    return FRAMEWORKS[str(request.param)]


@pytest.mark.parametrize("content_length", MALFORMED)
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_malformed_content_length_with_a_key_is_400(framework: Framework, method: str, content_length: str) -> None:
    """With a key, on any method: 400 problem+json ``invalid-content-length``; nothing runs or is stored."""
    orders = Orders()
    store = framework.memory_store(FakeClock())
    app = framework.build(orders, store, None, {})
    status, headers, body = call(app, method, content_length, K1)
    assert status.startswith("400"), (status, body)
    assert headers["content-type"] == "application/problem+json"
    assert b"https://idempo.dev/problems/invalid-content-length" in body
    assert orders.calls == 0
    # The retry with its true length executes: nothing was kept of the refused request.
    status, _, body = call(app, "POST", str(len(B)), K1)
    assert status.startswith("201"), (status, body)
    assert orders.calls == 1


def test_a_malformed_content_length_without_a_key_is_the_apps_business(framework: Framework) -> None:
    """Without a key idempo does not answer: the request is the framework's and the app's."""
    app = framework.build(Orders(), framework.memory_store(FakeClock()), None, {})
    _, headers, _ = call(app, "GET", "abc", None)
    assert headers.get("content-type") != "application/problem+json"


def test_a_malformed_content_length_is_logged_and_counted(
    framework: Framework, caplog: pytest.LogCaptureFixture
) -> None:
    """The 400 is observed as the other early 400s are: one INFO record (outcome ``invalid_content_length``,
    status 400) and ``idempo_requests_total{outcome="invalid_content_length"}``."""
    caplog.set_level(logging.INFO, logger="idempo")
    registry = CollectorRegistry()
    instrument(metrics=registry)
    try:
        app = framework.build(Orders(), framework.memory_store(FakeClock()), None, {})
        status, _, _ = call(app, "POST", "abc", K1)
    finally:
        uninstrument()
    assert status.startswith("400")
    records = [r for r in caplog.records if r.name == "idempo" and hasattr(r, "idempo_outcome")]
    assert [(r.levelno, r.idempo_outcome, r.idempo_status) for r in records] == [  # type: ignore[attr-defined]
        (logging.INFO, "invalid_content_length", 400)
    ]
    samples = [
        sample
        for metric in registry.collect()
        if metric.name == "idempo_requests"
        for sample in metric.samples
        if sample.name == "idempo_requests_total"
    ]
    assert [(s.labels["outcome"], s.labels["method"], s.value) for s in samples] == [
        ("invalid_content_length", "POST", 1.0)
    ]
