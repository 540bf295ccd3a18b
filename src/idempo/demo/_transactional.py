"""The payments API of ``idempo demo --kill-workers``, on a transactional route.

The same ``POST /payments`` as :mod:`idempo.demo.payments` (look the order
up, charge, insert the payment; 201, or 200 when the order is paid), but its
charge row and its payment row are written through the request's transaction
(:func:`idempo.starlette.transaction`) on the store's own database, so the
record's completion is the last statement of that transaction (DESIGN
"transactional route"): a worker killed at any instant leaves both rows and
the completed record, or none of them.

Here the provider's charge is a row in the app's database (a ledger entry,
``idempo_demo_charges``), written in that transaction. A charge sent to an
outside provider cannot join it: pass the provider the idempotency key (as
Stripe's API takes one) so that it deduplicates the retry itself. The
provider's latency is waited out before the transaction opens (do the writes
last: an SQLite write transaction holds the file's one write lock).

Where the tables live (:class:`Tables`):

- SQLite: in the store's own file (SQLite commits atomically per file),
  named ``idempo_demo_*`` and dropped after the run;
- PostgreSQL: in a schema of the run's own (``idempo_demo_<nonce>``) of the
  store's database, dropped after the run; idempo's records stay in the
  store's schema: one database, so one transaction.

Each entry into the handler is also counted, outside the transaction, in a
SQLite file of its own (``executions``): the report's "handler executions"
include the executions a kill rolled back.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse

from .._core.policy import Policy
from ..asgi import IdempotencyMiddleware
from ..starlette import transaction
from ..stores import async_store_from_url
from .payments import DEMO_POLICY, MAX_PROVIDER_DELAY, PROVIDER_DELAY_HEADER, Ledger, Payment, PaymentRequest

__all__ = ["Tables", "create_transactional_app", "read_transactional_ledger"]

# PostgreSQL URL options that are idempo's, not libpq's (see idempo.stores.postgres).
_IDEMPO_PG_OPTIONS = frozenset({"schema", "min_size", "max_size", "deadline", "timeout", "prepare_threshold"})

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempo_demo_payments (
    id TEXT NOT NULL PRIMARY KEY, order_id TEXT NOT NULL UNIQUE, amount INTEGER NOT NULL,
    currency TEXT NOT NULL, charge_id TEXT NOT NULL, created_at TEXT NOT NULL, record_key TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempo_demo_charges (
    id TEXT NOT NULL PRIMARY KEY, order_id TEXT NOT NULL, amount INTEGER NOT NULL,
    currency TEXT NOT NULL, charged_at REAL NOT NULL
);
"""
_PG_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.idempo_demo_payments (
    id text NOT NULL PRIMARY KEY, order_id text NOT NULL UNIQUE, amount bigint NOT NULL,
    currency text NOT NULL, charge_id text NOT NULL, created_at text NOT NULL, record_key text NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.idempo_demo_charges (
    id text NOT NULL PRIMARY KEY, order_id text NOT NULL, amount bigint NOT NULL,
    currency text NOT NULL, charged_at double precision NOT NULL
);
"""
_EXECUTIONS_SCHEMA = "CREATE TABLE IF NOT EXISTS handler_executions (id INTEGER PRIMARY KEY, order_id TEXT NOT NULL)"
_COLUMNS = "id, order_id, amount, currency, charge_id, created_at"


@dataclass(frozen=True)
class Tables:
    """Where the transactional app's tables are: the store's database, and the run's own names in it.

    Attributes:
        store_url: idempo's store (``sqlite:///...`` or ``postgresql://...``).
        schema: the PostgreSQL schema of the app's tables; None on SQLite.
    """

    store_url: str
    schema: str | None

    @classmethod
    def for_run(cls, store_url: str) -> Tables:
        """The tables of a new run on ``store_url`` (a fresh PostgreSQL schema name)."""
        if store_url.startswith("sqlite:"):
            return cls(store_url, None)
        return cls(store_url, f"idempo_demo_{uuid.uuid4().hex[:8]}")

    @property
    def sqlite_path(self) -> str:
        """The SQLite file (the store's)."""
        return self.store_url.removeprefix("sqlite:///").partition("?")[0]

    @property
    def conninfo(self) -> str:
        """The PostgreSQL conninfo of the store's database, without idempo's own URL options."""
        parts = urlsplit(self.store_url)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _IDEMPO_PG_OPTIONS]
        return urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))

    def name(self, table: str) -> str:
        """A table's name as the statements write it."""
        return table if self.schema is None else f"{self.schema}.{table}"

    def create(self) -> None:
        """Create the app's tables (SQLite: in the store's file, which must exist; PostgreSQL: in the run's schema)."""
        if self.schema is None:
            with contextlib.closing(sqlite3.connect(self.sqlite_path)) as conn:
                conn.executescript(_SQLITE_SCHEMA)
            return
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(_PG_SCHEMA.format(schema=self.schema))

    def drop(self) -> None:
        """Drop the app's tables (or the run's schema); idempo's records stay until they expire."""
        if self.schema is None:
            with contextlib.closing(sqlite3.connect(self.sqlite_path)) as conn:
                conn.executescript(
                    "DROP TABLE IF EXISTS idempo_demo_payments; DROP TABLE IF EXISTS idempo_demo_charges;"
                )
            return
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        """Run a read on a connection of its own; ``{payments}`` and ``{charges}`` name the tables."""
        sql = query.format(payments=self.name("idempo_demo_payments"), charges=self.name("idempo_demo_charges"))
        if self.schema is None:
            with contextlib.closing(sqlite3.connect(self.sqlite_path)) as conn:
                return conn.execute(sql).fetchall()
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True) as pg:
            return pg.execute(sql).fetchall()


def create_transactional_app(
    tables: Tables,
    executions: Path,
    *,
    policy: Policy = DEMO_POLICY,
    provider_latency: float = 0.03,
    provider_jitter: float = 0.02,
) -> FastAPI:
    """Build the payments API whose charge and payment rows commit with idempo's record.

    Args:
        tables: the store and the app's tables in its database (created by :meth:`Tables.create`).
        executions: the SQLite file counting entries into the handler.
        policy: the idempotency policy (``require_key`` is forced on: a
            transactional route runs only under a record).
        provider_latency: seconds the provider takes, waited before the transaction opens.
        provider_jitter: up to this many seconds added at random.

    Returns:
        The FastAPI app behind :class:`~idempo.asgi.IdempotencyMiddleware`.

    Raises:
        ConfigurationError: the store URL is unknown or malformed.
    """
    counter = sqlite3.connect(executions, isolation_level=None, check_same_thread=False)
    counter.execute("PRAGMA journal_mode = WAL")
    counter.execute("PRAGMA busy_timeout = 5000")
    counter.execute(_EXECUTIONS_SCHEMA)
    pool: Any = None
    if tables.schema is None:
        from ..stores.sqlite import AsyncSQLiteStore

        store: Any = AsyncSQLiteStore(tables.sqlite_path, busy_timeout=5.0)
        mark = "?"
    else:
        import psycopg_pool

        from ..stores.postgres import AsyncPostgresStore

        records_schema = getattr(async_store_from_url(tables.store_url), "schema", "public")
        pool = psycopg_pool.AsyncConnectionPool(tables.conninfo, min_size=2, max_size=40, open=False, timeout=10)
        store = AsyncPostgresStore.from_pool(pool, schema=records_schema)
        mark = "%s"
    payments_table = tables.name("idempo_demo_payments")
    charges_table = tables.name("idempo_demo_charges")
    select_payment = f"SELECT {_COLUMNS} FROM {payments_table} WHERE order_id = {mark}"
    insert_charge = (
        f"INSERT INTO {charges_table} (id, order_id, amount, currency, charged_at) VALUES ({', '.join([mark] * 5)})"
    )
    insert_payment = f"INSERT INTO {payments_table} ({_COLUMNS}, record_key) VALUES ({', '.join([mark] * 7)})"

    async def run(tx: Any, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        # psycopg's AsyncConnection.execute is a coroutine; the sqlite3 proxy's is not.
        cursor = tx.connection.execute(sql, params)
        if not isinstance(cursor, sqlite3.Cursor):
            cursor = await cursor
            return await cursor.fetchone() if cursor.description else None
        return cursor.fetchone() if cursor.description else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if pool is not None:
            await pool.open()
        try:
            yield
        finally:
            if pool is not None:
                await pool.close()
            counter.close()

    app = FastAPI(title="idempo demo: payments (transactional)", lifespan=lifespan)

    @app.post("/payments", status_code=201)
    async def create_payment(
        payment: PaymentRequest,
        request: Request,
        provider_delay: Annotated[
            float | None, Header(alias=PROVIDER_DELAY_HEADER, ge=0, le=MAX_PROVIDER_DELAY)
        ] = None,
    ) -> JSONResponse:
        """Charge the order and record its payment, both in the transaction that completes the record."""
        counter.execute("INSERT INTO handler_executions (order_id) VALUES (?)", (payment.order_id,))
        # The provider's latency first: the transaction, opened below, holds a
        # connection (and on SQLite the file's write lock) until it commits.
        latency = provider_latency + random.uniform(0, provider_jitter) if provider_delay is None else provider_delay
        await anyio.sleep(latency)
        tx = await transaction(request)
        row = await run(tx, select_payment, (payment.order_id,))
        if row is not None:
            return JSONResponse(Payment.body(row), status_code=200, headers={"Location": f"/payments/{row[0]}"})
        charge_id = "ch_" + secrets.token_hex(12)
        await run(tx, insert_charge, (charge_id, payment.order_id, payment.amount, payment.currency, time.time()))
        created = datetime.now(UTC).isoformat(timespec="milliseconds")
        row = ("pay_" + secrets.token_hex(12), payment.order_id, payment.amount, payment.currency, charge_id, created)
        await run(tx, insert_payment, (*row, tx.record_key))
        return JSONResponse(Payment.body(row), status_code=201, headers={"Location": f"/payments/{row[0]}"})

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        """Readiness: the app is up."""
        return {"ok": True}

    app.add_middleware(IdempotencyMiddleware, store=store, policy=policy.replace(require_key=True))
    return app


def read_transactional_ledger(tables: Tables, executions: Path) -> Ledger:
    """The payments and charges from the store's database, the handler executions from their own file."""
    orders = frozenset(order for (order,) in tables.rows("SELECT order_id FROM {payments}"))
    charges = {
        order: int(count) for order, count in tables.rows("SELECT order_id, count(*) FROM {charges} GROUP BY order_id")
    }
    conn = sqlite3.connect(executions)
    try:
        (count,) = conn.execute("SELECT count(*) FROM handler_executions").fetchone()
    finally:
        conn.close()
    return Ledger(orders, charges, count)
