"""In-process cost of a variant's request path, without HTTP: a quick, steadier A/B tool.

    bench/.venv/bin/python bench/inprocess.py [VARIANT ...] [--n 20000] [--repeat 7]

Calls each variant's ASGI app directly with a ``POST /payments`` (fake
``receive``/``send``, one request after another on a uvloop event loop, as
the server runs them) and prints microseconds per request, the best of
``--repeat`` batches of CPU time (``time.process_time``), so other processes
on the machine disturb it less than wall time. Unique keys (every request
executes) and replays (one completed key). The variants that need no
server of their own: ``bare``, ``raw-asgi``, ``idempo-memory``,
``idempo-sqlite``, ``floor-memory``, ``aih-memory``, ``fik-memory`` (the
network stores work too, given their ``BENCH_*`` environment).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from app import create_app

BODY = b'{"amount":1000,"currency":"EUR","customer":"cus_bench","description":"bench payment"}'
SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/payments",
    "raw_path": b"/payments",
    "query_string": b"",
    "root_path": "",
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
    "state": {},
}


async def request(app: Any, key: bytes) -> None:
    scope = dict(SCOPE)
    scope["headers"] = [
        (b"host", b"127.0.0.1:8000"),
        (b"content-type", b"application/json"),
        (b"idempotency-key", key),
        (b"content-length", b"86"),
    ]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: Any) -> None:
        pass

    await app(scope, receive, send)


async def per_request_us(app: Any, n: int, repeat: int, unique: bool) -> float:
    counter = iter(range(10**12))
    if not unique:
        await request(app, b"replayed-key")
    best = float("inf")
    for _ in range(repeat):
        keys = [b"u%d" % next(counter) for _ in range(n)] if unique else [b"replayed-key"] * n
        t0 = time.process_time()
        for key in keys:
            await request(app, key)
        best = min(best, time.process_time() - t0)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*", default=["bare", "idempo-memory"])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("BENCH_DIR", tempfile.mkdtemp(prefix="idempo-inprocess-"))
    os.environ.setdefault("BENCH_NONCE", "inprocess")
    import uvloop

    for variant in args.variants:
        for unique in (True, False):
            app = create_app(variant)
            us = uvloop.run(per_request_us(app, args.n, args.repeat, unique))
            print(f"{variant:16} {'unique' if unique else 'replay':7} {us:7.2f} us/request", flush=True)


if __name__ == "__main__":
    main()
