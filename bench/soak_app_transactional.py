"""The soak's ``transactional`` app: a Starlette ``POST /payments`` on a transactional route, counted from its table.

Each worker runs ``uvicorn soak_app_transactional:create_app --factory --app-dir bench``,
configured from the environment the soak sets (``SOAK_STORE``, ``SOAK_LEASE``,
``SOAK_WORKER``; see ``soak_app_plain.py``). The handler asks for the
request's transaction (:func:`idempo.starlette.transaction`) and writes one
row into the business table ``soak_payments`` through it: the key, the
execution's id, the worker and the handler's start and end
(``time.monotonic()``). The record's completion is the last statement of the
same transaction, so a row exists if and only if its execution's answer was
stored (DESIGN "transactional route", guarantee 6).

The executions the soak judges are the table's rows (:func:`read_executions`):
what committed, not what ran. A worker killed at any instant leaves its
transaction uncommitted, and so no row; a key with two rows would be an effect
committed twice, which transactional mode must make impossible. The table has
no UNIQUE index on the key, so such a key would show instead of failing.

The store is on the app's own database:

- PostgreSQL: ``AsyncPostgresStore.from_pool`` on the worker's own
  ``psycopg_pool.AsyncConnectionPool`` (through the soak's relay, so the
  outages cut the app's database too); idempo's tables and ``soak_payments``
  live in the run's schema.
- SQLite: ``AsyncSQLiteStore`` on the run's file, ``soak_payments`` in it
  (SQLite commits atomically per file).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from soak_app_plain import Run
from soak_figures import Execution
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from idempo import Policy
from idempo.asgi import IdempotencyMiddleware
from idempo.starlette import transaction

FACTORY = "soak_app_transactional:create_app"

#: What the figures' executions are for this mode (the report says so).
COUNTS = "committed rows of soak_payments"

_TABLE_PG = """
CREATE TABLE IF NOT EXISTS {schema}.soak_payments (
    id         bigserial PRIMARY KEY,
    key        text NOT NULL,
    execution  text NOT NULL,
    worker     text NOT NULL,
    started    double precision NOT NULL,
    ended      double precision NOT NULL,
    order_id   text,
    amount     bigint,
    record_key text NOT NULL
)
"""
_TABLE_SQLITE = """
CREATE TABLE IF NOT EXISTS soak_payments (
    id         INTEGER PRIMARY KEY,
    key        TEXT NOT NULL,
    execution  TEXT NOT NULL,
    worker     TEXT NOT NULL,
    started    REAL NOT NULL,
    ended      REAL NOT NULL,
    order_id   TEXT,
    amount     INTEGER,
    record_key TEXT NOT NULL
)
"""
_INSERT = "INSERT INTO {table} (key, execution, worker, started, ended, order_id, amount, record_key) VALUES ({marks})"


def _split_pg(url: str) -> tuple[str, str]:
    """A store URL's conninfo (without idempo's own query options) and its schema."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", "public")
    for option in ("min_size", "max_size", "timeout", "deadline"):
        query.pop(option, None)
    return urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query))), schema


def _sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///").partition("?")[0]


def create_app() -> Any:
    """The worker's ASGI app, from the ``SOAK_*`` environment (see the module docstring)."""
    url = os.environ["SOAK_STORE"]
    worker = os.environ["SOAK_WORKER"]
    pid = os.getpid()
    serial = itertools.count(1)
    pool: Any = None
    if url.startswith("sqlite:"):
        from idempo.stores.sqlite import AsyncSQLiteStore

        store: Any = AsyncSQLiteStore(_sqlite_path(url), busy_timeout=5.0)
        insert = _INSERT.format(table="soak_payments", marks=", ".join("?" * 8))
    else:
        import psycopg_pool

        from idempo.stores.postgres import AsyncPostgresStore

        conninfo, schema = _split_pg(url)
        pool = psycopg_pool.AsyncConnectionPool(conninfo, min_size=2, max_size=20, open=False, timeout=5)
        store = AsyncPostgresStore.from_pool(pool, schema=schema)
        insert = _INSERT.format(table=f"{schema}.soak_payments", marks=", ".join(["%s"] * 8))

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        if pool is not None:
            await pool.open()
        try:
            yield
        finally:
            if pool is not None:
                await pool.close()

    async def payments(request: Request) -> Response:
        payment = await request.json()
        key = request.headers.get("idempotency-key", "-")
        execution = f"{worker}-{next(serial)}"
        started = time.monotonic()
        work_ms = payment.get("work_ms", 0)
        if work_ms:
            await asyncio.sleep(work_ms / 1000)
        # The writes last: the transaction holds a pooled connection (on SQLite, the file's write lock).
        tx = await transaction(request)
        row = (key, execution, worker, started, time.monotonic(), payment.get("order_id"), payment.get("amount"))
        result = tx.connection.execute(insert, (*row, tx.record_key))
        if not isinstance(result, sqlite3.Cursor):
            await result  # psycopg's AsyncConnection.execute is a coroutine; the sqlite3 proxy's is not
        answer = {"id": execution, "order_id": payment.get("order_id"), "amount": payment.get("amount")}
        return JSONResponse({**answer, "pid": pid, "status": "succeeded"}, status_code=201)

    app = Starlette(routes=[Route("/payments", payments, methods=["POST"])], lifespan=lifespan)
    policy = Policy(lease_ttl=float(os.environ["SOAK_LEASE"]), require_key=True)
    return IdempotencyMiddleware(app, store, policy=policy)


def prepare(run: Run) -> dict[str, str]:
    """Create ``soak_payments`` next to idempo's tables (the soak created those). Returns no extra environment."""
    if run.store_url.startswith("sqlite:"):
        with sqlite3.connect(_sqlite_path(run.store_url)) as conn:
            conn.execute(_TABLE_SQLITE)
        return {}
    import psycopg

    conninfo, schema = _split_pg(run.store_url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(_TABLE_PG.format(schema=schema))
    return {}


def read_executions(run: Run) -> list[Execution]:
    """Every committed row of ``soak_payments`` as an execution (each ended: it committed with its record)."""
    query = "SELECT key, execution, worker, started, ended FROM {table} ORDER BY id"
    if run.store_url.startswith("sqlite:"):
        path = Path(_sqlite_path(run.store_url))
        if not path.exists():
            return []
        conn = sqlite3.connect(path)
        try:
            rows = conn.execute(query.format(table="soak_payments")).fetchall()
        finally:
            conn.close()
    else:
        import psycopg

        conninfo, schema = _split_pg(run.store_url)
        with psycopg.connect(conninfo, autocommit=True) as pg:
            rows = pg.execute(query.format(table=f"{schema}.soak_payments")).fetchall()
    return [Execution(key=k, id=e, worker=w, start=s, end=end) for k, e, w, s, end in rows]


def cleanup(run: Run) -> None:
    """Nothing: the table goes with the run's schema (PostgreSQL) or work directory (SQLite)."""
