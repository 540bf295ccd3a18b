"""What the observability hooks cost per request, in-process: IdempotencyMiddleware over a trivial ASGI app.

    python bench/observability_overhead.py [--requests 10000] [--rounds 7]

Each mode runs in a fresh interpreter and sends ``--requests`` first
executions (begin + complete on a memory store) and as many replays, ``--rounds``
times; the fastest round is reported (CPU time, so a busy machine inflates
every mode alike). Modes:

- ``null``: every hook replaced by a no-op object: the cost of the call sites alone.
- ``off``: the default: no metrics, no spans, the ``idempo`` logger above DEBUG.
- ``debuglog``: DEBUG enabled on ``idempo`` (one record per request, to a NullHandler).
- ``metrics``: ``instrument(metrics=CollectorRegistry())``.
- ``tracing-noop``: ``instrument(tracing=True)`` with no SDK configured.
- ``tracing-sdk``: an SDK TracerProvider with a SimpleSpanProcessor and an in-memory exporter.

Compare ``off`` with the same script run against a checkout without the hooks
for the cost of disabled instrumentation.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from typing import Any

MODES = ("null", "off", "debuglog", "metrics", "tracing-noop", "tracing-sdk")


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


async def _drive(middleware: Any, count: int, prefix: str) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"a":1}', "more_body": False}

    async def send(message: Any) -> None:
        pass

    started = time.process_time()
    for i in range(count):
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/orders",
            "query_string": b"",
            "headers": [(b"idempotency-key", f"{prefix}-{i}".encode()), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1234),
        }
        await middleware(scope, receive, send)
    return time.process_time() - started


def _configure(mode: str) -> None:
    import logging

    if mode == "off":
        return  # also runs against a checkout without the hooks, for comparison
    from idempo import observability

    if mode == "null":
        import idempo._engine._async.drivers

        class Null:
            timed = False

            def identify(self, *args: Any) -> None:
                pass

            def decided(self, *args: Any) -> None:
                pass

            def settled(self, *args: Any) -> None:
                pass

            def handler_started(self) -> None:
                pass

            def handler_finished(self, *args: Any) -> None:
                pass

            def finish(self, *args: Any, **kwargs: Any) -> None:
                pass

        null = Null()
        idempo._engine._async.drivers.observe_request = lambda *args: null  # type: ignore[assignment]
    elif mode == "debuglog":
        log = logging.getLogger("idempo")
        log.setLevel(logging.DEBUG)
        log.addHandler(logging.NullHandler())
        log.propagate = False
    elif mode == "metrics":
        from prometheus_client import CollectorRegistry

        observability.instrument(metrics=CollectorRegistry())
    elif mode == "tracing-noop":
        observability.instrument(tracing=True)
    elif mode == "tracing-sdk":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        observability.instrument(tracing=provider)


def _run_mode(mode: str, requests: int, rounds: int) -> tuple[float, float]:
    from idempo.asgi import IdempotencyMiddleware
    from idempo.stores import AsyncMemoryStore

    _configure(mode)
    middleware = IdempotencyMiddleware(_app, AsyncMemoryStore())
    loop = asyncio.new_event_loop()
    loop.run_until_complete(_drive(middleware, 2000, "warm"))
    results = []
    for round_ in range(rounds):
        executed = loop.run_until_complete(_drive(middleware, requests, f"r{round_}"))
        replayed = loop.run_until_complete(_drive(middleware, requests, f"r{round_}"))
        results.append((executed / requests * 1e6, replayed / requests * 1e6))
    return min(r[0] for r in results), min(r[1] for r in results)


def main() -> None:
    """Run every mode (or one, with --mode) and print microseconds per request."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mode", choices=MODES)
    args = parser.parse_args()
    if args.mode:
        executed, replayed = _run_mode(args.mode, args.requests, args.rounds)
        print(f"{args.mode:>13}: executed {executed:7.2f} us/request, replayed {replayed:7.2f} us/request")
        return
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--requests", str(args.requests)]
        subprocess.run([*command, "--rounds", str(args.rounds)], check=True)


if __name__ == "__main__":
    main()
