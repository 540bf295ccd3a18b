"""A large body is fingerprinted off the event loop (issue 10 item 6).

Canonicalising a 10 MiB JSON body costs from a third of a second to more
than a second of CPU; on the event loop, every other request would wait for
it. The ASGI front hands such a body to a worker thread.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

import idempo._http.admission
from idempo import Policy
from idempo._core.http import OFF_LOOP_JSON_BYTES, OFF_LOOP_RAW_BYTES, fingerprint_off_loop
from idempo.asgi import IdempotencyMiddleware
from idempo.stores import AsyncMemoryStore
from tests.support.orders import Orders, starlette_app
from tests.support.servers import running_asgi

JSON = {"content-type": "application/json"}


def test_the_loop_serves_another_request_while_a_10_mib_body_is_fingerprinted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 6: the fingerprint of a 10 MiB JSON body is held until another request has been
    answered; on the event loop that answer could never come, so both completing proves the loop was free."""
    real = idempo._http.admission.request_identity
    big_started = threading.Event()
    small_answered = threading.Event()

    def held_identity(*facts: Any) -> Any:
        if len(facts[-2]) > OFF_LOOP_RAW_BYTES:  # (..., content type, body, key)
            big_started.set()
            if not small_answered.wait(30):
                raise AssertionError("no other request was answered while the large body was fingerprinted")
        return real(*facts)

    monkeypatch.setattr(idempo._http.admission, "request_identity", held_identity)
    orders = Orders()
    big = json.dumps({"items": [{"sku": f"sku_{i:07d}", "qty": i} for i in range(270_000)]}).encode()
    assert 9 * 1024 * 1024 < len(big) <= Policy().max_request_body
    app = IdempotencyMiddleware(starlette_app(orders), AsyncMemoryStore())
    with running_asgi(app) as base, ThreadPoolExecutor(1) as pool:
        headers = {**JSON, "Idempotency-Key": "big"}
        pending = pool.submit(httpx.post, base + "/orders", content=big, headers=headers, timeout=60)
        assert big_started.wait(30)
        small = httpx.post(base + "/orders", content=b'{"sku":"A"}', headers={**JSON, "Idempotency-Key": "small"})
        assert small.status_code == 201
        small_answered.set()
        answer = pending.result()
    assert answer.status_code == 201, answer.text
    assert orders.calls == 2


def test_which_bodies_go_to_a_worker_thread() -> None:
    """Canonical JSON from 4 KiB, any other body from 64 KiB; a small body stays on the loop."""
    canonical, raw = Policy(), Policy(canonical_json=False)
    assert not fingerprint_off_loop(canonical, b"application/json", OFF_LOOP_JSON_BYTES - 1)
    assert fingerprint_off_loop(canonical, b"application/json", OFF_LOOP_JSON_BYTES)
    assert fingerprint_off_loop(canonical, "application/problem+json; charset=utf-8", OFF_LOOP_JSON_BYTES)
    assert not fingerprint_off_loop(raw, b"application/json", OFF_LOOP_JSON_BYTES)
    assert not fingerprint_off_loop(canonical, b"text/plain", OFF_LOOP_JSON_BYTES)
    assert not fingerprint_off_loop(canonical, None, OFF_LOOP_RAW_BYTES - 1)
    assert fingerprint_off_loop(raw, None, OFF_LOOP_RAW_BYTES)
