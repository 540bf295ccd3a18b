"""A payments app with a transactional route, for uvicorn in a child process (``--factory``, lifespan on).

Environment:
    IDEMPO_TX_FRONT: ``fastapi`` (``tx: idempo.fastapi.Transaction``) or ``starlette``
        (``await idempo.starlette.transaction(request)``).
    IDEMPO_TX_BACKEND: ``postgres`` (``AsyncPostgresStore.from_pool``) or ``sqlite`` (``AsyncSQLiteStore``).
    IDEMPO_TX_DB: the PostgreSQL conninfo (search_path on the test's schema) or the SQLite file.
    IDEMPO_TX_SCHEMA: the PostgreSQL schema of idempo's tables.
    IDEMPO_TX_POOL: the pool's max size (default 5).
    IDEMPO_TX_LEASE: lease seconds (default 30).
    IDEMPO_TX_REQUIRE_KEY: ``0``: the policy does not require a key (the route asks for one itself).
    IDEMPO_TX_DEADLINE: the PostgreSQL store's deadline in seconds (default the store's).
    IDEMPO_TX_GATE: N: each ``/payments`` request waits, before it asks for its transaction, until
        N have arrived (so every claim is made before any transaction takes a connection).
    IDEMPO_TX_FINALIZE_TIMEOUT: seconds finalisation may take (default FINALIZE_TIMEOUT, 10).

``POST /payments`` with ``{"order_id": ..., "cents": ..., "mode": ...}`` inserts one payment row
through the transaction and answers 201; ``mode`` makes it misbehave after the write:
``raise`` (an exception), ``500`` / ``400`` (that status), ``big`` (a body over
max_response_body), ``deferred`` (a second row violating a deferred unique constraint: COMMIT
fails), ``slow`` (sleeps 0.3 s first), ``second`` (also writes through a second connection of
its own, outside the transaction), ``background`` (a background task uses tx afterwards),
``hold`` (holds the transaction 1 s after the write),
``kept`` (a background task writes through a reference to ``tx.connection`` kept past the handler;
PostgreSQL). ``sql``, a list of statements, runs through ``tx.connection`` after the write (through a
cursor of it when ``via`` is ``cursor``; on PostgreSQL through libpq's ``pgconn.exec_`` when it is
``pgconn``; when it is ``method``, each is the name of a connection method called instead, e.g.
``commit``), before ``mode`` acts; with ``"swallow": true`` the handler catches a TransactionControlled
they raise and goes on.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import idempo.fastapi
from idempo import Policy
from idempo.asgi import IdempotencyMiddleware
from idempo.exceptions import TransactionControlled

MAX_RESPONSE_BODY = 2000
BACKGROUND_LOG = os.environ.get("IDEMPO_TX_BACKGROUND_LOG", "")


def _policy() -> Policy:
    return Policy(
        require_key=os.environ.get("IDEMPO_TX_REQUIRE_KEY", "1") == "1",
        lease_ttl=float(os.environ.get("IDEMPO_TX_LEASE", "30")),
        max_response_body=MAX_RESPONSE_BODY,
    )


class Backend:
    """The app's database: its writes (through tx), and a write of its own outside tx."""

    def __init__(self) -> None:
        self.kind = os.environ["IDEMPO_TX_BACKEND"]
        self.db = os.environ["IDEMPO_TX_DB"]
        self.pool: Any = None
        self.store: Any = None
        if self.kind == "postgres":
            import psycopg_pool

            from idempo.stores.postgres import AsyncPostgresStore

            size = int(os.environ.get("IDEMPO_TX_POOL", "5"))
            self.pool = psycopg_pool.AsyncConnectionPool(self.db, min_size=1, max_size=size, open=False, timeout=5)
            deadline = os.environ.get("IDEMPO_TX_DEADLINE")
            extra: dict[str, Any] = {"deadline": float(deadline)} if deadline else {}
            self.store = AsyncPostgresStore.from_pool(self.pool, schema=os.environ["IDEMPO_TX_SCHEMA"], **extra)
        else:
            from idempo.stores.sqlite import AsyncSQLiteStore

            self.store = AsyncSQLiteStore(self.db, busy_timeout=2.0)

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        if self.pool is not None:
            await self.pool.open()
        yield
        if self.pool is not None:
            await self.pool.close()

    async def insert(self, tx: Any, order_id: str, cents: int, ref: str | None = None) -> int:
        if self.kind == "postgres":
            cur = await tx.connection.execute(
                "INSERT INTO payments (order_id, cents, ref) VALUES (%s, %s, %s) RETURNING id", (order_id, cents, ref)
            )
            row = await cur.fetchone()
            return int(row[0])
        cur = tx.connection.execute(
            "INSERT INTO payments (order_id, cents, ref) VALUES (?, ?, ?)", (order_id, cents, ref)
        )
        return int(cur.lastrowid)

    async def execute(self, tx: Any, statement: str, via: str | None) -> None:
        """Run ``statement`` through the handler's connection (or a cursor of it)."""
        if self.kind == "postgres":
            if via == "cursor":
                async with tx.connection.cursor() as cur:
                    await cur.execute(statement)
            elif via == "pgconn":  # libpq itself, past psycopg's cursors
                for one in statement.split(";"):
                    tx.connection.pgconn.exec_(one.encode())
            else:
                await tx.connection.execute(statement)
        else:
            (tx.connection.cursor() if via == "cursor" else tx.connection).execute(statement)

    async def insert_elsewhere(self, order_id: str) -> None:
        """A write through a connection of the app's own: outside idempo's transaction (the trap)."""
        if self.kind == "postgres":
            import psycopg

            async with await psycopg.AsyncConnection.connect(self.db, autocommit=True) as conn:
                await conn.execute("INSERT INTO payments (order_id, cents) VALUES (%s, -1)", (order_id,))
        else:
            raise RuntimeError("the SQLite file's write lock is held by the transaction")


async def _act(backend: Backend, tx: Any, body: dict[str, Any]) -> Response:
    mode = body.get("mode", "")
    if mode == "slow":
        await anyio.sleep(0.3)
    pid = await backend.insert(tx, body["order_id"], int(body.get("cents", 1)), body.get("ref"))
    for statement in body.get("sql", ()):
        try:
            if body.get("via") == "method":
                called = getattr(tx.connection, statement)()  # commit(), rollback()...
                if inspect.isawaitable(called):  # psycopg's AsyncConnection
                    await called
            else:
                await backend.execute(tx, statement, body.get("via"))
        except TransactionControlled:
            if not body.get("swallow"):
                raise
    if mode == "raise":
        raise RuntimeError("provider down")
    if mode == "hold":
        await anyio.sleep(1.0)
    if mode == "500":
        return JSONResponse({"error": "provider down"}, status_code=500)
    if mode == "400":
        return JSONResponse({"error": "card declined", "id": pid}, status_code=400)
    if mode == "big":
        return JSONResponse({"id": pid, "pad": "x" * (MAX_RESPONSE_BODY * 2)}, status_code=201)
    if mode == "deferred":
        await backend.insert(tx, body["order_id"], 0, body.get("ref"))
    if mode == "second":
        await backend.insert_elsewhere(body["order_id"])
        raise RuntimeError("fails after both writes")
    task = None
    if mode == "background":

        async def later() -> None:
            try:
                outcome = type(tx.connection).__name__
            except Exception as exc:
                outcome = type(exc).__name__
            await anyio.Path(BACKGROUND_LOG).write_text(outcome + "\n")

        task = BackgroundTask(later)
    if mode == "kept":
        conn = tx.connection  # kept past the handler: the trap docs/transactional.md warns of

        async def write_later() -> None:
            await conn.execute("INSERT INTO payments (order_id, cents) VALUES ('kept', 1)")
            await anyio.Path(BACKGROUND_LOG).write_text("kept\n")

        task = BackgroundTask(write_later)
    return JSONResponse({"id": pid, "order_id": body["order_id"]}, status_code=201, background=task)


_GATE = int(os.environ.get("IDEMPO_TX_GATE", "0"))
_arrived = 0
_gate_open: anyio.Event | None = None


async def gate() -> None:
    """Wait until IDEMPO_TX_GATE requests have arrived (none when unset); at most 10 s."""
    global _arrived, _gate_open
    if not _GATE:
        return
    if _gate_open is None:
        _gate_open = anyio.Event()
    _arrived += 1
    if _arrived >= _GATE:
        _gate_open.set()
    with anyio.move_on_after(10):
        await _gate_open.wait()


async def health(request: Request) -> Response:
    return Response("ok")


def create_app() -> Any:
    if "IDEMPO_TX_FINALIZE_TIMEOUT" in os.environ:
        from idempo._engine import transaction

        transaction.FINALIZE_TIMEOUT = float(os.environ["IDEMPO_TX_FINALIZE_TIMEOUT"])
    backend = Backend()
    front = os.environ.get("IDEMPO_TX_FRONT", "fastapi")
    if front == "fastapi":
        from fastapi import Depends, FastAPI

        api = FastAPI(lifespan=backend.lifespan)

        # The gate, a route dependency, is solved before the parameters' (tx).
        @api.post("/payments", status_code=201, dependencies=[Depends(gate)])
        async def create_payment(request: Request, tx: idempo.fastapi.Transaction) -> Response:
            return await _act(backend, tx, await request.json())

        @api.get("/payments")
        async def read_payment(tx: idempo.fastapi.Transaction) -> dict[str, str]:
            return {"read": "yes"}

        @api.post("/plain", status_code=201)
        async def plain(request: Request) -> dict[str, str]:
            return {"plain": "yes"}

        api.add_route("/health", health)
        api.add_middleware(IdempotencyMiddleware, store=backend.store, policy=_policy())
        return api

    from idempo.starlette import transaction

    async def create(request: Request) -> Response:
        await gate()
        tx = await transaction(request)
        return await _act(backend, tx, await request.json())

    app = Starlette(
        routes=[Route("/payments", create, methods=["POST", "GET"]), Route("/health", health)],
        lifespan=backend.lifespan,
    )
    app.add_middleware(IdempotencyMiddleware, store=backend.store, policy=_policy())
    return app
