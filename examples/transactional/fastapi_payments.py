"""FastAPI + PostgreSQL, transactional: ``uvicorn examples.transactional.fastapi_payments:app``

The payment row and the idempotency record commit in one transaction on the app's own pool:
a crash at any instant leaves both or neither. ``DATABASE_URL`` names the database
(default ``postgresql://postgres@127.0.0.1/test``).
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg_pool
from fastapi import FastAPI
from pydantic import BaseModel

import idempo.fastapi
from idempo import Policy
from idempo.asgi import IdempotencyMiddleware
from idempo.stores.postgres import AsyncPostgresStore

pool = psycopg_pool.AsyncConnectionPool(
    os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1/test"), max_size=10, open=False
)
store = AsyncPostgresStore.from_pool(pool)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await pool.open()
    await store.create_schema()  # or `idempo migrate` once, before the app starts
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS payments (id serial PRIMARY KEY, order_id text, cents int)")
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)
app.add_middleware(IdempotencyMiddleware, store=store, policy=Policy(require_key=True))


class PaymentIn(BaseModel):
    order_id: str
    cents: int


@app.post("/payments", status_code=201)
async def create_payment(payment: PaymentIn, tx: idempo.fastapi.Transaction) -> dict[str, int]:
    cur = await tx.connection.execute(
        "INSERT INTO payments (order_id, cents) VALUES (%s, %s) RETURNING id", (payment.order_id, payment.cents)
    )
    row = await cur.fetchone()
    assert row is not None
    return {"id": row[0]}
