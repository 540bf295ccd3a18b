"""The proxy's admin port: ``/healthz``, ``/readyz`` and ``/metrics`` (``proxy.admin_listen``).

- ``GET /healthz``: 200 while the process serves (liveness).
- ``GET /readyz``: 200 when every worker serves (its start-up done), the
  store answers a read and a TCP connection to the upstream opens; 503 with
  the reason otherwise, and 503 from the moment the proxy starts draining
  (SIGTERM), so a load balancer stops sending. The JSON body says
  ``{"ready", "problems", "workers": {"serving", "total"}}``.
- ``GET /metrics``: idempo's metrics (:mod:`idempo.metrics`) and the proxy's
  (:mod:`idempo.proxy._metrics`) in the Prometheus text format; with several
  workers, aggregated from ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's
  multiprocess mode).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import anyio

from .._http.asgi import Receive, Scope, Send
from ..typing import AsyncStore
from .config import UpstreamTarget

__all__ = ["AdminApp"]

#: The record key /readyz reads: a read of a key that is never written costs one round trip.
READY_PROBE_KEY = "idempo-proxy-readyz"


class AdminApp:
    """The admin port's ASGI app.

    Args:
        store: the store /readyz reads from.
        upstream: the upstream /readyz opens a TCP (or Unix socket) connection to.
        draining: returns True once the proxy is shutting down.
        registry: the prometheus-client registry /metrics serves; None for the
            global one, or a multiprocess collector when ``PROMETHEUS_MULTIPROC_DIR`` is set.
        timeout: seconds each /readyz check may take.
        workers: returns how many workers serve, and how many there are
            (default: one, serving).
    """

    def __init__(
        self,
        store: AsyncStore,
        upstream: UpstreamTarget,
        draining: Callable[[], bool],
        registry: Any = None,
        timeout: float = 2.0,
        workers: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.workers = workers or (lambda: (1, 1))
        self.store = store
        self.upstream = upstream
        self.draining = draining
        self.registry = registry
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/healthz":
            await _answer(send, 200, b"ok\n", b"text/plain; charset=utf-8")
        elif path == "/readyz":
            problems = await self.problems()
            serving, total = self.workers()
            workers = {"serving": serving, "total": total}
            body = json.dumps({"ready": not problems, "problems": problems, "workers": workers}).encode() + b"\n"
            await _answer(send, 503 if problems else 200, body, b"application/json")
        elif path == "/metrics":
            body, content_type = self.metrics()
            await _answer(send, 200, body, content_type.encode("latin-1"))
        else:
            await _answer(send, 404, b"not found\n", b"text/plain; charset=utf-8")

    async def problems(self) -> list[str]:
        """Why the proxy is not ready (empty: ready)."""
        if self.draining():
            return ["draining"]
        problems = []
        serving, total = self.workers()
        if serving < total:
            problems.append(f"workers: {serving} of {total} serving")
        try:
            with anyio.fail_after(self.timeout):
                await self.store.get(READY_PROBE_KEY)
        except Exception as exc:
            problems.append(f"store: {type(exc).__name__}: {exc}")
        try:
            with anyio.fail_after(self.timeout):
                if self.upstream.uds is not None:
                    stream: Any = await anyio.connect_unix(self.upstream.uds)
                else:
                    import httpx

                    url = httpx.URL(self.upstream.base_url)
                    port = url.port or (443 if url.scheme == "https" else 80)
                    stream = await anyio.connect_tcp(url.host, port)
                await stream.aclose()
        except Exception as exc:
            problems.append(f"upstream: {type(exc).__name__}: {exc}")
        return problems

    def metrics(self) -> tuple[bytes, str]:
        """The metrics text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

        registry = self.registry
        if registry is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(REGISTRY if registry is None else registry), CONTENT_TYPE_LATEST


async def _answer(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
