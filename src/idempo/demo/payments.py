"""The payments example: a FastAPI app that charges a card and records the payment.

::

    app = create_app(Path("payments.db"), store="sqlite:///idempo.db")   # with idempo
    app = create_app(Path("payments.db"), store=None)                    # "bare": without

``POST /payments`` takes ``{"order_id": str, "amount": int, "currency": str}``
(``amount`` in minor units, e.g. cents), calls the payment provider's charge,
stores a row in the ``payments`` table (UNIQUE on ``order_id``) and answers
201 with the payment and ``Location: /payments/{id}``. ``GET /payments/{id}``
returns a payment or 404.

The handler is deliberately the one a team writes without idempo: look the
order up, charge if it has no payment, insert. Two requests for one order that
overlap both find nothing, so both charge, and the slower one then hits the
UNIQUE index and answers 500 although its charge went through. The same
handler behind :class:`~idempo.asgi.IdempotencyMiddleware` runs once per
``Idempotency-Key``, so the race never reaches it.

The payment provider is simulated (:class:`SimulatedProvider`): each charge
call is written to the ``provider_charges`` table of the same database, so a
report can count the charges per order after a run, and takes
``provider_latency`` seconds (plus jitter) to answer. A request can ask for a
slower charge with the ``X-Demo-Provider-Delay`` header (seconds, at most
:data:`MAX_PROVIDER_DELAY`); the header is not part of idempo's fingerprint,
so it can make a handler outlive its client's timeout. Every entry into the
handler is counted in ``handler_executions``.

The app's database is its own SQLite file, separate from idempo's store. Its
statements run on the event loop's thread: each is one short autocommit
statement taking microseconds, cheaper than a hop to a worker thread, and no
transaction is held across an ``await``.
"""

from __future__ import annotations

import random
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, HTTPException, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .._core.policy import Policy
from ..asgi import IdempotencyMiddleware
from ..stores import async_store_from_url
from ..typing import AsyncStore

__all__ = [
    "DEMO_POLICY",
    "MAX_PROVIDER_DELAY",
    "PROVIDER_DELAY_HEADER",
    "Ledger",
    "Payment",
    "PaymentRequest",
    "SimulatedProvider",
    "create_app",
    "read_ledger",
]

#: The policy of the demo: a key is required on ``POST /payments`` (draft
#: section 2.7), a duplicate of a running payment gets 409 at once with
#: ``Retry-After: 1`` (so a report can count them), completed payments are
#: replayed for an hour. The 30 s lease exceeds the slowest charge the demo
#: allows (:data:`MAX_PROVIDER_DELAY`), so no retry executes while the first
#: request still runs.
DEMO_POLICY = Policy(require_key=True, record_ttl=3600.0, lease_ttl=30.0, retry_after=1)

#: The request header that asks the simulated provider for a slow charge (seconds).
PROVIDER_DELAY_HEADER = "X-Demo-Provider-Delay"

#: The longest charge a request may ask for, in seconds; below DEMO_POLICY's lease.
MAX_PROVIDER_DELAY = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    id         TEXT    NOT NULL PRIMARY KEY,
    order_id   TEXT    NOT NULL,
    amount     INTEGER NOT NULL,
    currency   TEXT    NOT NULL,
    charge_id  TEXT    NOT NULL,
    created_at TEXT    NOT NULL
);
-- One payment per order: the business rule the naive handler relies on.
CREATE UNIQUE INDEX IF NOT EXISTS payments_order_id ON payments (order_id);

-- The simulated provider's side: one row per charge call.
CREATE TABLE IF NOT EXISTS provider_charges (
    id         TEXT    NOT NULL PRIMARY KEY,
    order_id   TEXT    NOT NULL,
    amount     INTEGER NOT NULL,
    currency   TEXT    NOT NULL,
    charged_at REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS provider_charges_order_id ON provider_charges (order_id);

-- One row per entry into the POST /payments handler.
CREATE TABLE IF NOT EXISTS handler_executions (
    id         INTEGER PRIMARY KEY,
    order_id   TEXT    NOT NULL,
    started_at REAL    NOT NULL
);
"""

_PAYMENT_COLUMNS = "id, order_id, amount, currency, charge_id, created_at"


class PaymentRequest(BaseModel):
    """The body of ``POST /payments``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    order_id: Annotated[str, Field(min_length=1, max_length=100, description="the merchant's order id")]
    amount: Annotated[int, Field(gt=0, description="minor units (cents)")]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR")]


class Payment(BaseModel):
    """A payment as the API returns it."""

    id: str
    order_id: str
    amount: int
    currency: str
    status: str
    charge_id: str
    created_at: str

    @staticmethod
    def body(row: tuple[Any, ...]) -> dict[str, Any]:
        """The JSON body of the payment a table row holds: (id, order_id, amount, currency, charge_id, created_at).

        The payments table of both demo apps (the plain and the transactional one) has these columns.
        """
        payment_id, order_id, amount, currency, charge_id, created_at = row
        return {
            "id": payment_id,
            "order_id": order_id,
            "amount": amount,
            "currency": currency,
            "status": "succeeded",
            "charge_id": charge_id,
            "created_at": created_at,
        }


def _connect(database: Path) -> sqlite3.Connection:
    """Open the app's database (WAL mode, autocommit) and create its tables when missing.

    The connection may be used from another thread than the one that opened
    it, by one thread at a time.
    """
    conn = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    # NORMAL: a demo database need not survive power loss, and WAL stays consistent.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.executescript(_SCHEMA)
    return conn


class SimulatedProvider:
    """A stand-in for a payment provider's charge API.

    A charge takes effect when the provider receives the call (it is written
    to ``provider_charges`` at once); the answer comes back after the latency.
    So a caller that gives up while waiting has still been charged, as with a
    real provider.

    Args:
        conn: the app's database connection.
        latency: seconds a charge takes to answer (default 0.03).
        jitter: up to this many seconds are added at random to each charge.
    """

    def __init__(self, conn: sqlite3.Connection, *, latency: float = 0.03, jitter: float = 0.02) -> None:
        self._conn = conn
        self.latency = latency
        self.jitter = jitter

    async def charge(self, order_id: str, amount: int, currency: str, *, delay: float | None = None) -> str:
        """Charge ``amount`` minor units of ``currency`` for an order; return the charge id.

        Args:
            delay: seconds this charge takes instead of the latency and jitter.
        """
        charge_id = "ch_" + secrets.token_hex(12)
        self._conn.execute(
            "INSERT INTO provider_charges (id, order_id, amount, currency, charged_at) VALUES (?, ?, ?, ?, ?)",
            (charge_id, order_id, amount, currency, time.time()),
        )
        await anyio.sleep(self.latency + random.uniform(0, self.jitter) if delay is None else delay)
        return charge_id


def create_app(
    database: Path,
    *,
    store: AsyncStore | str | None,
    policy: Policy = DEMO_POLICY,
    provider_latency: float = 0.03,
    provider_jitter: float = 0.02,
) -> FastAPI:
    """Build the payments API.

    Args:
        database: the app's SQLite file (payments, provider charges, handler
            executions); created with its tables when missing.
        store: idempo's store, as an :class:`~idempo.typing.AsyncStore` (the
            caller closes it) or a URL such as ``"sqlite:////tmp/idempo.db"``
            (the app closes it at shutdown); None builds the same app without
            idempo ("bare").
        policy: the idempotency policy for ``POST /payments`` (default
            :data:`DEMO_POLICY`); unused when ``store`` is None.
        provider_latency: seconds each charge takes at the simulated provider.
        provider_jitter: up to this many seconds added at random to each charge.

    Returns:
        The FastAPI app; with a store, wrapped in
        :class:`~idempo.asgi.IdempotencyMiddleware`.

    Raises:
        ConfigurationError: the store URL is unknown or malformed.
        StoreError: the store cannot be opened.
        sqlite3.Error: the app's database cannot be opened.
    """
    conn = _connect(database)
    provider = SimulatedProvider(conn, latency=provider_latency, jitter=provider_jitter)
    owned_store = async_store_from_url(store) if isinstance(store, str) else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owned_store is not None:
                await owned_store.aclose()
            conn.close()

    app = FastAPI(
        title="idempo demo: payments" + ("" if store is not None else " (without idempo)"),
        lifespan=lifespan,
    )

    @app.post("/payments", status_code=201, response_model=Payment)
    async def create_payment(
        payment: PaymentRequest,
        provider_delay: Annotated[
            float | None, Header(alias=PROVIDER_DELAY_HEADER, ge=0, le=MAX_PROVIDER_DELAY)
        ] = None,
    ) -> JSONResponse:
        """Charge the order and record its payment (the naive way: check, charge, insert)."""
        conn.execute(
            "INSERT INTO handler_executions (order_id, started_at) VALUES (?, ?)", (payment.order_id, time.time())
        )
        row = conn.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE order_id = ?", (payment.order_id,)
        ).fetchone()
        if row is not None:
            # The order is paid already: answer with its payment. This check
            # is what a team writes instead of idempotency keys; it cannot see
            # a payment whose charge is still under way.
            return JSONResponse(Payment.body(row), status_code=200, headers={"Location": f"/payments/{row[0]}"})
        charge_id = await provider.charge(payment.order_id, payment.amount, payment.currency, delay=provider_delay)
        row = (
            "pay_" + secrets.token_hex(12),
            payment.order_id,
            payment.amount,
            payment.currency,
            charge_id,
            datetime.now(UTC).isoformat(timespec="milliseconds"),
        )
        # A concurrent duplicate that charged first makes this raise
        # sqlite3.IntegrityError (UNIQUE order_id): the client gets a 500
        # although its charge went through.
        conn.execute(f"INSERT INTO payments ({_PAYMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", row)
        return JSONResponse(Payment.body(row), status_code=201, headers={"Location": f"/payments/{row[0]}"})

    @app.get("/payments/{payment_id}", response_model=Payment)
    async def get_payment(payment_id: str) -> dict[str, Any]:
        """Return one payment, or 404."""
        row = conn.execute(f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE id = ?", (payment_id,)).fetchone()
        if row is None:
            raise HTTPException(status_code=404, detail="no such payment")
        return Payment.body(row)

    @app.get("/provider/charges")
    async def provider_charges(order_id: str | None = None) -> dict[str, Any]:
        """How often the provider charged: for one order, or in total."""
        if order_id is not None:
            (count,) = conn.execute("SELECT count(*) FROM provider_charges WHERE order_id = ?", (order_id,)).fetchone()
            return {"order_id": order_id, "charges": count}
        total, orders = conn.execute("SELECT count(*), count(DISTINCT order_id) FROM provider_charges").fetchone()
        (twice,) = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM provider_charges GROUP BY order_id HAVING count(*) > 1)"
        ).fetchone()
        return {"charges": total, "orders": orders, "orders_charged_more_than_once": twice}

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        """Readiness: the app is up."""
        return {"ok": True}

    if store is not None:
        app.add_middleware(IdempotencyMiddleware, store=owned_store or store, policy=policy)
    return app


@dataclass(frozen=True)
class Ledger:
    """What the app's database holds after a run.

    Attributes:
        payment_orders: order ids that have a payment row.
        charges_by_order: order id -> number of provider charge calls.
        handler_executions: entries into the ``POST /payments`` handler.
    """

    payment_orders: frozenset[str]
    charges_by_order: dict[str, int] = field(default_factory=dict)
    handler_executions: int = 0

    @property
    def payments(self) -> int:
        """Rows in the ``payments`` table."""
        return len(self.payment_orders)

    @property
    def provider_charges(self) -> int:
        """Charge calls the provider received."""
        return sum(self.charges_by_order.values())

    @property
    def double_charged_orders(self) -> int:
        """Orders the provider charged more than once."""
        return sum(1 for count in self.charges_by_order.values() if count > 1)


def read_ledger(database: Path) -> Ledger:
    """Read the payments, provider charges and handler executions from the app's database."""
    conn = sqlite3.connect(database)
    try:
        orders = frozenset(order for (order,) in conn.execute("SELECT order_id FROM payments"))
        charges = dict(conn.execute("SELECT order_id, count(*) FROM provider_charges GROUP BY order_id").fetchall())
        (executions,) = conn.execute("SELECT count(*) FROM handler_executions").fetchone()
    finally:
        conn.close()
    return Ledger(orders, charges, executions)
