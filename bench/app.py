"""The benchmarked app: a tiny Starlette ``POST /payments``, in one variant per idempotency layer.

Every variant serves the same handler: JSON in, 201 JSON out, no other work.
Only the idempotency layer around it differs (see ``VARIANTS``). The handler
also understands three fields of the request body, used by the correctness
scenarios only (the load scenarios never send them):

- ``work_ms``: sleep this long before answering (handler work);
- ``fail``: ``"raise"`` or ``"status"``: the first execution for a key fails,
  by raising (the framework answers 500) or by answering 500 itself.

Scenario (e) posts to ``POST /orders`` instead: the same handler, plus one
committed ``INSERT`` into PostgreSQL (``bench_orders`` in ``$BENCH_PG_SCHEMA``,
through a psycopg pool of 1-4 connections opened on the first order), so
idempo's two store round trips can be read against a handler that does one
of its own.

Each execution is counted per ``Idempotency-Key``; ``GET /_stats`` returns the
total and, with ``?prefix=...``, the count per key, so the runner can check
that a key executed exactly once. GET passes through every layer untouched.
With ``BENCH_COUNTER`` (a file) and ``BENCH_WORKER`` (this worker's index),
the total is also kept in that file's slot for this worker and ``/_stats``
sums every slot: scenario (f) serves a variant from two processes.

Configuration comes from the environment (set by ``bench/runner.py``):
``BENCH_VARIANT``, ``BENCH_NONCE`` (a per-run prefix for store keys),
``BENCH_REDIS_URL``, ``BENCH_PG_URL``, ``BENCH_PG_SCHEMA``, ``BENCH_DIR``.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# --- the handler every variant shares -------------------------------------------------

_executions: dict[str, int] = {}
_total = 0
_lock = threading.Lock()  # the powertools variant runs the handler in worker threads


class PaymentFailed(Exception):
    """The first execution of a key asked to fail (correctness scenario d)."""


class _SharedTotal:
    """The execution total of every worker of a server: one 8-byte slot per worker in a file."""

    SLOTS = 8

    def __init__(self, path: str, worker: int) -> None:
        with open(path, "a+b") as f:
            if os.fstat(f.fileno()).st_size < 8 * self.SLOTS:
                f.truncate(8 * self.SLOTS)
            self.map = mmap.mmap(f.fileno(), 8 * self.SLOTS)
        self.offset = 8 * worker

    def set(self, total: int) -> None:
        struct.pack_into("<q", self.map, self.offset, total)

    def total(self) -> int:
        return sum(struct.unpack_from(f"<{self.SLOTS}q", self.map))


_shared = (
    _SharedTotal(os.environ["BENCH_COUNTER"], int(os.environ.get("BENCH_WORKER", "0")))
    if os.environ.get("BENCH_COUNTER")
    else None
)


def _count(key: str | None) -> tuple[int, int]:
    """Count one execution; return (the total so far, this key's count)."""
    global _total
    with _lock:
        _total += 1
        if _shared is not None:
            _shared.set(_total)
        if key is None:
            return _total, 1
        n = _executions.get(key, 0) + 1
        _executions[key] = n
        return _total, n


def _result(payment: dict[str, Any], serial: int) -> dict[str, Any]:
    return {
        "id": f"pay_{serial}",
        "status": "succeeded",
        "amount": payment.get("amount"),
        "currency": payment.get("currency"),
    }


async def payments(request: Request) -> Response:
    """POST /payments: count the execution, do the requested work, answer 201."""
    payment = await request.json()
    serial, n = _count(request.headers.get("idempotency-key"))
    if payment.get("work_ms"):
        await asyncio.sleep(payment["work_ms"] / 1000)
    fail = payment.get("fail")
    if fail and n == 1:
        if fail == "raise":
            raise PaymentFailed("first attempt fails")
        return JSONResponse({"error": "payment provider unavailable"}, status_code=500)
    return JSONResponse(_result(payment, serial), status_code=201)


_orders_pool: Any = None
_orders_lock = asyncio.Lock()


async def _orders() -> Any:
    """The handler's own PostgreSQL pool (scenario e), opened on the first order."""
    global _orders_pool
    async with _orders_lock:
        if _orders_pool is None:
            import psycopg_pool

            pool = psycopg_pool.AsyncConnectionPool(
                os.environ["BENCH_PG_URL"],
                min_size=1,
                max_size=4,  # the PostgreSQL server is shared: every variant's handler holds a pool
                kwargs={"autocommit": True, "options": f"-c search_path={os.environ['BENCH_PG_SCHEMA']}"},
                open=False,
            )
            await pool.open()
            _orders_pool = pool
    return _orders_pool


_ORDER_INSERT = "INSERT INTO bench_orders (serial, amount, currency) VALUES (%s, %s, %s)"
#: True in ``idempo-postgres-tx``: /orders inserts through the request's transaction (transactional mode).
_orders_in_transaction = False


async def orders(request: Request) -> Response:
    """POST /orders: the payment handler plus one committed INSERT into PostgreSQL (scenario e)."""
    payment = await request.json()
    serial, _ = _count(request.headers.get("idempotency-key"))
    row = (serial, payment.get("amount"), payment.get("currency"))
    if _orders_in_transaction:
        from idempo.starlette import transaction

        # BEGIN on a connection of the app's pool; the record's completion and COMMIT follow in one pipeline.
        tx = await transaction(request)
        await tx.connection.execute(_ORDER_INSERT, row)
    else:
        pool = _orders_pool or await _orders()
        async with pool.connection() as conn:
            await conn.execute(_ORDER_INSERT, row)
    return JSONResponse(_result(payment, serial), status_code=201)


async def stats(request: Request) -> Response:
    """GET /_stats: executions in total, and per key for keys starting with ``prefix``."""
    prefix = request.query_params.get("prefix")
    body: dict[str, Any] = {"executions": _shared.total() if _shared is not None else _total}
    if prefix:
        body["keys"] = {k: n for k, n in _executions.items() if k.startswith(prefix)}
    return JSONResponse(body)


# --- AWS Lambda Powertools: a function decorator, not a middleware ------------------


def _powertools_app(validate: bool) -> Starlette:
    """``idempotent_function`` with the Redis (cache) persistence layer around the payment function.

    Powertools is synchronous (blocking redis-py), so the decorated function
    runs in Starlette's thread pool, as a blocking library must in an async
    server. The key is the Idempotency-Key header, passed in the payload; with
    ``validate`` the body is the payload validated on replays (422 on mismatch).
    """
    import redis
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
    from aws_lambda_powertools.utilities.idempotency.exceptions import (
        IdempotencyAlreadyInProgressError,
        IdempotencyValidationError,
    )
    from aws_lambda_powertools.utilities.idempotency.persistence.cache import CachePersistenceLayer

    client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"], decode_responses=True)
    layer = CachePersistenceLayer(client=client)
    config = IdempotencyConfig(
        event_key_jmespath="idempotency_key",
        payload_validation_jmespath="body" if validate else "",
        expires_after_seconds=24 * 3600,
    )
    prefix = f"{os.environ['BENCH_NONCE']}:pt{'v' if validate else ''}"

    @idempotent_function(data_keyword_argument="payment", persistence_store=layer, config=config, key_prefix=prefix)
    def process_payment(payment: dict[str, Any]) -> dict[str, Any]:
        body = payment["body"]
        serial, n = _count(payment["idempotency_key"])
        if body.get("work_ms"):
            time.sleep(body["work_ms"] / 1000)
        if body.get("fail") and n == 1:
            raise PaymentFailed("first attempt fails")
        return _result(body, serial)

    async def pt_payments(request: Request) -> Response:
        body = await request.json()
        key = request.headers.get("idempotency-key")
        if key is None:
            serial, _ = _count(None)
            return JSONResponse(_result(body, serial), status_code=201)
        try:
            result = await run_in_threadpool(process_payment, payment={"idempotency_key": key, "body": body})
        except IdempotencyAlreadyInProgressError:
            return JSONResponse({"error": "in progress"}, status_code=409)
        except IdempotencyValidationError:
            return JSONResponse({"error": "payload mismatch"}, status_code=422)
        except PaymentFailed:
            if body.get("fail") == "raise":
                raise
            return JSONResponse({"error": "payment provider unavailable"}, status_code=500)
        return JSONResponse(result, status_code=201)

    return Starlette(routes=[Route("/payments", pt_payments, methods=["POST"]), Route("/_stats", stats)])


# --- the floor: the fewest store round trips an idempotency layer can make -----------


class _FloorMiddleware:
    """Not a product: the store floor, to read every layer's cost against.

    One round trip to claim-or-read the key (an execution's first, a replay's
    only), one to store the answer; no fingerprint, lease, token or scope.
    """

    def __init__(self, app: ASGIApp, kv: Any) -> None:
        self.app = app
        self.kv = kv

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        key = None
        for name, value in scope["headers"]:
            if name == b"idempotency-key":
                key = value.decode("latin-1")
        if key is None:
            await self.app(scope, receive, send)
            return
        stored = await self.kv.claim(key)
        if stored is not None:
            status, body = (409, b"{}") if stored == b"" else (int(stored[:3]), stored[4:])
            await send(
                {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": body})
            return
        status = 500
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await self.kv.store(key, b"%d:%b" % (status, b"".join(chunks)))
            await send(message)

        await self.app(scope, receive, capture)


class _PassThrough:
    """Diagnostic: a middleware that only wraps ``send`` (what any response-capturing layer must do)."""

    def __init__(self, app: ASGIApp, wrap: bool) -> None:
        self.app = app
        self.wrap = wrap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.wrap:
            await self.app(scope, receive, send)
            return

        async def wrapped(message: Message) -> None:
            await send(message)

        await self.app(scope, receive, wrapped)


class _MemoryFloor:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def claim(self, key: str) -> bytes | None:
        stored = self.data.get(key)
        if stored is None:
            self.data[key] = b""
        return stored

    async def store(self, key: str, value: bytes) -> None:
        self.data[key] = value


class _RedisFloor:
    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(url, max_connections=50)  # idempo's pool size
        self.prefix = prefix

    async def claim(self, key: str) -> bytes | None:
        # SET NX GET (Redis 7): claims an absent key, or returns what is there, in one round trip.
        return await self.client.set(self.prefix + key, b"", nx=True, get=True, ex=86400)  # type: ignore[no-any-return]

    async def store(self, key: str, value: bytes) -> None:
        await self.client.set(self.prefix + key, value, ex=86400)


class _PostgresFloor:
    CLAIM = (
        "WITH ins AS (INSERT INTO bench_floor (k) VALUES (%(k)s) ON CONFLICT (k) DO NOTHING RETURNING 1) "
        "SELECT (SELECT count(*) FROM ins), (SELECT coalesce(v, '') FROM bench_floor WHERE k = %(k)s)"
    )
    STORE = "UPDATE bench_floor SET v = %(v)s WHERE k = %(k)s"

    def __init__(self, url: str, schema: str) -> None:
        import psycopg_pool

        # idempo's pool: 1-10 connections, autocommit, prepared after 5 executions.
        self.pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=1,
            max_size=10,
            kwargs={"autocommit": True, "prepare_threshold": 5, "options": f"-c search_path={schema}"},
            open=False,
        )
        self._opened = False

    async def claim(self, key: str) -> bytes | None:
        if not self._opened:
            await self.pool.open()
            self._opened = True
        async with self.pool.connection() as conn:
            row = await (await conn.execute(self.CLAIM, {"k": key})).fetchone()
        assert row is not None
        return None if row[0] else bytes(row[1])

    async def store(self, key: str, value: bytes) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(self.STORE, {"k": key, "v": value})


class _SQLiteFloor:
    def __init__(self, path: Path) -> None:
        import sqlite3

        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")  # idempo's default
        self.conn.execute("CREATE TABLE IF NOT EXISTS bench_floor (k TEXT PRIMARY KEY, v BLOB)")

    async def claim(self, key: str) -> bytes | None:
        row = self.conn.execute("SELECT coalesce(v, x'') FROM bench_floor WHERE k = ?", (key,)).fetchone()
        if row is not None:
            return bytes(row[0])
        if self.conn.execute("INSERT INTO bench_floor (k) VALUES (?) ON CONFLICT DO NOTHING", (key,)).rowcount:
            return None
        return b""

    async def store(self, key: str, value: bytes) -> None:
        self.conn.execute("UPDATE bench_floor SET v = ? WHERE k = ?", (value, key))


# --- uvicorn's floor: no framework at all -------------------------------------------

_RAW_ANSWER = b'{"id":"pay_0","status":"succeeded","amount":1000,"currency":"EUR"}'
_RAW_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_RAW_ANSWER)).encode())]


async def _raw_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """A raw ASGI app: read the body, answer fixed bytes. What uvicorn costs per request, alone."""
    if scope["type"] != "http":
        return
    if scope["method"] == "GET" or scope["path"] == "/orders":
        await Starlette(routes=_routes())(scope, receive, send)
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    _count(None)
    await send({"type": "http.response.start", "status": 201, "headers": _RAW_HEADERS})
    await send({"type": "http.response.body", "body": _RAW_ANSWER})


# --- the variants ------------------------------------------------------------------


def _env(name: str) -> str:
    return os.environ[name]


def _idempo(store_factory: Callable[[], Any]) -> list[Middleware]:
    from idempo.asgi import IdempotencyMiddleware

    return [Middleware(IdempotencyMiddleware, store=store_factory())]


def _idempo_memory() -> Any:
    from idempo.stores.memory import AsyncMemoryStore

    return AsyncMemoryStore()


def _idempo_sqlite() -> Any:
    from idempo.stores.sqlite import AsyncSQLiteStore

    return AsyncSQLiteStore(Path(_env("BENCH_DIR")) / "idempo.db")


def _idempo_redis() -> Any:
    from idempo.stores.redis import AsyncRedisStore

    return AsyncRedisStore(_env("BENCH_REDIS_URL"), prefix=f"{_env('BENCH_NONCE')}:idempo:")


def _idempo_postgres(async_commit: bool = False) -> Any:
    from idempo.stores.postgres import AsyncPostgresStore

    url = _env("BENCH_PG_URL")
    if async_commit:  # the documented opt-in (docs/stores.md): commits do not wait for the WAL flush
        url += ("&" if "?" in url else "?") + "options=-c%20synchronous_commit%3Doff"
    # a schema of its own: the two PostgreSQL variants must not share records
    return AsyncPostgresStore(url, schema=_env("BENCH_PG_SCHEMA") + ("_ac" if async_commit else ""))


def _idempo_postgres_tx() -> Any:
    """Transactional mode (docs/transactional.md): the store on the handler's own pool, /orders in its transaction.

    One pool for the handler and the store (4 connections for the handler, as
    the other variants' handler pool, plus the store's default 10); records in
    ``<schema>_tx``. Opened by the app's lifespan, before idempo opens the store.
    """
    global _orders_pool, _orders_in_transaction
    import psycopg_pool

    from idempo.stores.postgres import AsyncPostgresStore

    _orders_pool = psycopg_pool.AsyncConnectionPool(
        _env("BENCH_PG_URL"),
        min_size=1,
        max_size=14,
        kwargs={"autocommit": True, "options": f"-c search_path={_env('BENCH_PG_SCHEMA')}"},
        open=False,
    )
    _orders_in_transaction = True
    return AsyncPostgresStore.from_pool(_orders_pool, schema=_env("BENCH_PG_SCHEMA") + "_tx")


@asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    """Open a pool built with the app (idempo-postgres-tx's) before the middleware opens its store; close it after."""
    pool = _orders_pool
    if pool is not None:
        await pool.open()
    try:
        yield
    finally:
        if pool is not None:
            await pool.close()


def _aih(backend: str) -> list[Middleware]:
    from idempotency_header_middleware import IdempotencyHeaderMiddleware
    from idempotency_header_middleware.backends import MemoryBackend, RedisBackend

    if backend == "memory":
        return [Middleware(IdempotencyHeaderMiddleware, backend=MemoryBackend())]
    import redis.asyncio

    nonce = _env("BENCH_NONCE")
    client = redis.asyncio.Redis.from_url(_env("BENCH_REDIS_URL"))
    redis_backend = RedisBackend(client, keys_key=f"{nonce}:aih:keys", response_key=f"{nonce}:aih:resp:")
    return [Middleware(IdempotencyHeaderMiddleware, backend=redis_backend)]


def _fik(backend: str) -> list[Middleware]:
    from fastapi_idempotency_key import IdempotencyMiddleware, MemoryBackend, RedisBackend, SQLiteBackend

    if backend == "memory":
        store: Any = MemoryBackend()
    elif backend == "redis":
        store = RedisBackend(redis_url=_env("BENCH_REDIS_URL"), prefix=f"{_env('BENCH_NONCE')}:fik:")
    else:
        store = SQLiteBackend(Path(_env("BENCH_DIR")) / "fik.db")
    return [Middleware(IdempotencyMiddleware, backend=store)]


def _floor(kind: str) -> list[Middleware]:
    if kind == "memory":
        kv: Any = _MemoryFloor()
    elif kind == "redis":
        kv = _RedisFloor(_env("BENCH_REDIS_URL"), f"{_env('BENCH_NONCE')}:floor:")
    elif kind == "postgres":
        kv = _PostgresFloor(_env("BENCH_PG_URL"), _env("BENCH_PG_SCHEMA"))
    else:
        kv = _SQLiteFloor(Path(_env("BENCH_DIR")) / "floor.db")
    return [Middleware(_FloorMiddleware, kv=kv)]


#: variant id -> middleware list (None: the app is built otherwise)
VARIANTS: dict[str, Callable[[], list[Middleware]] | None] = {
    "bare": list,
    "raw-asgi": None,
    "idempo-memory": lambda: _idempo(_idempo_memory),
    "idempo-sqlite": lambda: _idempo(_idempo_sqlite),
    "idempo-redis": lambda: _idempo(_idempo_redis),
    "idempo-postgres": lambda: _idempo(_idempo_postgres),
    "idempo-postgres-async-commit": lambda: _idempo(lambda: _idempo_postgres(async_commit=True)),
    "idempo-postgres-tx": lambda: _idempo(_idempo_postgres_tx),
    "aih-memory": lambda: _aih("memory"),
    "aih-redis": lambda: _aih("redis"),
    "powertools-redis": None,
    "powertools-redis-validate": None,
    "fik-memory": lambda: _fik("memory"),
    "fik-sqlite": lambda: _fik("sqlite"),
    "fik-redis": lambda: _fik("redis"),
    "floor-memory": lambda: _floor("memory"),
    "pass-plain": lambda: [Middleware(_PassThrough, wrap=False)],
    "pass-wrap": lambda: [Middleware(_PassThrough, wrap=True)],
    "floor-sqlite": lambda: _floor("sqlite"),
    "floor-redis": lambda: _floor("redis"),
    "floor-postgres": lambda: _floor("postgres"),
}


def create_app(variant: str | None = None) -> Starlette:
    """Build the app for ``variant`` (default: ``$BENCH_VARIANT``)."""
    variant = variant or os.environ.get("BENCH_VARIANT", "bare")
    if variant == "raw-asgi":
        return _raw_asgi  # type: ignore[return-value]
    if variant.startswith("powertools-redis"):
        return _powertools_app(validate=variant.endswith("validate"))
    middleware = VARIANTS[variant]
    assert middleware is not None
    return Starlette(routes=_routes(), middleware=middleware(), lifespan=_lifespan)


def _routes() -> list[Route]:
    return [
        Route("/payments", payments, methods=["POST"]),
        Route("/orders", orders, methods=["POST"]),
        Route("/_stats", stats),
    ]
