"""Starlette + SQLite, transactional: ``uvicorn examples.transactional.starlette_payments:app``

The records live in the app's own SQLite file (``PAYMENTS_DB``, default ``payments.db``), so the
payment row and the record commit together.
"""

import os
import sqlite3

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from idempo import Policy
from idempo.asgi import IdempotencyMiddleware
from idempo.starlette import transaction
from idempo.stores.sqlite import AsyncSQLiteStore

DB = os.environ.get("PAYMENTS_DB", "payments.db")
with sqlite3.connect(DB) as setup:
    setup.execute("CREATE TABLE IF NOT EXISTS payments (id INTEGER PRIMARY KEY, order_id TEXT, cents INTEGER)")


async def create_payment(request: Request) -> JSONResponse:
    payment = await request.json()
    tx = await transaction(request)
    cur = tx.connection.execute(
        "INSERT INTO payments (order_id, cents) VALUES (?, ?)", (payment["order_id"], payment["cents"])
    )
    return JSONResponse({"id": cur.lastrowid}, status_code=201)


app = Starlette(routes=[Route("/payments", create_payment, methods=["POST"])])
app.add_middleware(IdempotencyMiddleware, store=AsyncSQLiteStore(DB), policy=Policy(require_key=True))
