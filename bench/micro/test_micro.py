"""Micro-benchmarks of idempo's core (pytest-benchmark); not part of the test suite.

Run: ``bench/.venv/bin/python -m pytest bench/micro --benchmark-only -o addopts=``
(``./bench/run`` runs them too and puts the medians in its report). CI's
``pytest`` collects ``tests/`` only, so these never run there.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from idempo._core.digests import Digests
from idempo._core.fingerprint import fingerprint
from idempo._core.flow import Replay, begin_flow
from idempo._core.keys import make_record_key, parse_key
from idempo._core.policy import Policy
from idempo._core.records import StoredResponse
from idempo._engine.begin import begin_async, begin_sync
from idempo._engine.drivers import drive_async, drive_sync
from idempo.asgi import IdempotencyMiddleware
from idempo.stores.memory import AsyncMemoryStore, MemoryStore


def _json_body(size: int) -> bytes:
    """A JSON payment-like document of about ``size`` bytes: line items with ints, floats and strings."""
    item = {"sku": "sku_0000000", "quantity": 3, "unit_amount": 1999, "description": "a line item", "tax": 0.2}
    per_item = len(json.dumps(item)) + 2
    doc: dict[str, Any] = {"amount": 5997, "currency": "EUR", "customer": "cus_8e03978e40d5", "items": []}
    doc["items"] = [dict(item, sku=f"sku_{i:07d}") for i in range(max(1, (size - 80) // per_item))]
    return json.dumps(doc).encode()


BODY_1K = _json_body(1024)
BODY_4K = _json_body(4 * 1024)
BODY_64K = _json_body(64 * 1024)
BODY_1M = _json_body(1024 * 1024)
BODY_10M = _json_body(10 * 1024 * 1024)
CT = b"application/json"
#: The server secret's digests, as a front holds them (record keys and fingerprints are keyed HMACs).
DIGESTS = Digests(b"micro-benchmark server secret 32")


SIZES = [BODY_1K, BODY_4K, BODY_64K, BODY_1M, BODY_10M]
SIZE_IDS = ["1KiB", "4KiB", "64KiB", "1MiB", "10MiB"]


@pytest.mark.parametrize("body", SIZES, ids=SIZE_IDS)
def test_fingerprint_canonical_json(benchmark: Any, body: bytes) -> None:
    """fingerprint() of a JSON body, canonicalised (the default).

    Against test_thread_hop_x100: the ASGI front moves the fingerprint to a worker
    thread from idempo._core.http.OFF_LOOP_JSON_BYTES (4 KiB), where it costs
    more than the hop.
    """
    benchmark(fingerprint, "POST", "/payments", b"", CT, body, secret=DIGESTS)


def test_thread_hop_x100(benchmark: Any) -> None:
    """100 anyio.to_thread.run_sync calls of a no-op in one event loop (its start included): divide by 100
    for what moving the fingerprint off the loop costs (about 50 us a hop on the 2-core bench machine)."""
    import anyio
    import anyio.to_thread

    def noop() -> None:
        return None

    async def hops() -> None:
        for _ in range(100):
            await anyio.to_thread.run_sync(noop)

    benchmark(lambda: anyio.run(hops))


@pytest.mark.parametrize("body", SIZES, ids=SIZE_IDS)
def test_fingerprint_raw_bytes(benchmark: Any, body: bytes) -> None:
    """fingerprint() of the same body hashed as bytes (canonical_json=False)."""
    benchmark(fingerprint, "POST", "/payments", b"", CT, body, secret=DIGESTS, canonical_json=False)


@pytest.mark.parametrize("body", SIZES, ids=SIZE_IDS)
def test_hashlib_sha256_baseline(benchmark: Any, body: bytes) -> None:
    """Plain hashlib.sha256 of the same bytes: the floor for any fingerprint."""
    benchmark(lambda: hashlib.sha256(body).hexdigest())


@pytest.mark.parametrize(
    "raw",
    [b"8e03978e-40d5-43e8-bc93-6894a57f9324", b'"8e03978e-40d5-43e8-bc93-6894a57f9324"'],
    ids=["bare", "sf-string"],
)
def test_parse_key(benchmark: Any, raw: bytes) -> None:
    """parse_key() of one header line (a UUID, bare and as an RFC 9651 sf-string)."""
    benchmark(parse_key, [raw])


def test_make_record_key(benchmark: Any) -> None:
    """make_record_key(): the scoped record key (HMAC-SHA256 of principal, method, route, key)."""
    key = "8e03978e-40d5-43e8-bc93-6894a57f9324"
    benchmark(make_record_key, "addr:127.0.0.1", "POST", "/payments", key, secret=DIGESTS)


def _completed(store: MemoryStore, policy: Policy) -> tuple[str, str]:
    record_key = make_record_key("p", "POST", "/payments", "k", secret=DIGESTS)
    fp = fingerprint("POST", "/payments", b"", CT, BODY_1K, secret=DIGESTS)
    result = store.begin(record_key, fp, policy.lease_ttl_ms)
    response = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"id":"pay_1"}')
    store.complete(record_key, result.token, response, policy.record_ttl_ms)  # type: ignore[union-attr]
    return record_key, fp


def test_engine_replay_decision_begin_sync(benchmark: Any) -> None:
    """The engine's decision for a replay as the adapters make it: begin_sync against a MemoryStore."""
    policy = Policy()
    store = MemoryStore()
    record_key, fp = _completed(store, policy)
    decision = benchmark(begin_sync, store, record_key, fp, policy)
    assert isinstance(decision, Replay)


def test_engine_replay_decision_begin_async(benchmark: Any) -> None:
    """The same through begin_async and AsyncMemoryStore (the coroutine never suspends, so no loop is needed)."""
    policy = Policy()
    store = AsyncMemoryStore()
    record_key, fp = _completed(store.sync, policy)

    def decide() -> Any:
        coro = begin_async(store, record_key, fp, policy)
        try:
            coro.send(None)
        except StopIteration as stop:
            return stop.value
        raise AssertionError("begin_async suspended")

    assert isinstance(benchmark(decide), Replay)


def test_engine_replay_decision_sync(benchmark: Any) -> None:
    """The engine's decision for a replay: begin_flow driven by drive_sync against a MemoryStore."""
    policy = Policy()
    store = MemoryStore()
    record_key, fp = _completed(store, policy)
    decision = benchmark(lambda: drive_sync(begin_flow(record_key, fp, policy), store))
    assert isinstance(decision, Replay)


def test_engine_replay_decision_async(benchmark: Any) -> None:
    """The same through drive_async and AsyncMemoryStore (the coroutine never suspends, so no loop is needed)."""
    policy = Policy()
    store = AsyncMemoryStore()
    record_key, fp = _completed(store.sync, policy)

    def decide() -> Any:
        coro = drive_async(begin_flow(record_key, fp, policy), store)
        try:
            coro.send(None)
        except StopIteration as stop:
            return stop.value
        raise AssertionError("drive_async suspended")

    assert isinstance(benchmark(decide), Replay)


# --- the whole middleware in process, without HTTP: where a request's time goes --------

_SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/payments",
    "raw_path": b"/payments",
    "query_string": b"",
    "root_path": "",
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
_LOAD_BODY = b'{"amount":1000,"currency":"EUR","customer":"cus_bench","description":"bench payment"}'
_ANSWER = b'{"id":"pay_1","status":"succeeded","amount":1000,"currency":"EUR"}'


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"66")],
        }
    )
    await send({"type": "http.response.body", "body": _ANSWER})


def _request(app: Any, key: bytes, changes: dict[str, Any] | None = None) -> None:
    scope = dict(_SCOPE, headers=[(b"host", b"x"), (b"content-type", b"application/json"), (b"idempotency-key", key)])
    scope.update(changes or {})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": _LOAD_BODY, "more_body": False}

    async def send(message: Any) -> None:
        pass

    coro = app(scope, receive, send)
    try:
        coro.send(None)
    except StopIteration:
        return
    raise AssertionError("the request suspended")


def test_asgi_bare_app(benchmark: Any) -> None:
    """Reference: the trivial ASGI app alone (what the middleware rows add to)."""
    benchmark(_request, _app, b"k")


def test_asgi_middleware_execution(benchmark: Any) -> None:
    """IdempotencyMiddleware + AsyncMemoryStore, a fresh key each time: begin, run the app, complete."""
    app = IdempotencyMiddleware(_app, AsyncMemoryStore())
    keys = (f"k{i}".encode() for i in range(10**9))
    benchmark(lambda: _request(app, next(keys)))


def test_asgi_middleware_replay(benchmark: Any) -> None:
    """IdempotencyMiddleware + AsyncMemoryStore, one completed key: the replay path."""
    app = IdempotencyMiddleware(_app, AsyncMemoryStore())
    _request(app, b"replayed")
    benchmark(_request, app, b"replayed")


def _fastapi_with_route_options() -> Any:
    """A FastAPI app whose POST routes declare idempotency options, with a GET route last."""
    from fastapi import Depends, FastAPI

    from idempo.fastapi import idempotency, idempotency_exempt

    app = FastAPI()

    async def endpoint() -> None: ...

    app.add_api_route("/payments", endpoint, methods=["POST"], dependencies=[Depends(idempotency(require_key=True))])
    app.add_api_route("/webhooks", endpoint, methods=["POST"], dependencies=[Depends(idempotency_exempt)])
    for i in range(10):
        app.add_api_route(f"/things{i}/{{thing_id}}", endpoint, methods=["POST"])
    app.add_api_route("/items/{item_id}", endpoint, methods=["GET"])
    return app


def test_asgi_middleware_get_beside_route_options(benchmark: Any) -> None:
    """IdempotencyMiddleware on a GET, with scope["app"] a FastAPI app whose routes declare options.

    The inner app is the trivial one, so the row is the middleware's own
    cost of a request no policy covers: the route-options check, without
    FastAPI's handling of the request.
    """
    app = IdempotencyMiddleware(_app, AsyncMemoryStore())
    changes = {"method": "GET", "path": "/items/7", "raw_path": b"/items/7", "app": _fastapi_with_route_options()}
    benchmark(_request, app, b"k", changes)
