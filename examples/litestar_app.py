"""Litestar + idempo: ``uvicorn examples.litestar_app:app``

    curl -i -X POST localhost:8000/payments -H 'Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324' \
         -H 'Content-Type: application/json' -d '{"amount": 1999}'

Send it twice: the second answer is the first one, replayed (``Idempotent-Replayed: true``).
"""

import itertools
import os
from typing import Any

from litestar import Litestar, post

from idempo.litestar import IdempotencyPlugin, idempotency, idempotency_exempt

ids = itertools.count(1)


@post("/payments", idempotency=idempotency(require_key=True, record_ttl=3600))
async def pay(data: dict[str, int]) -> dict[str, int]:
    return {"payment_id": next(ids), "amount": data["amount"]}


@post("/webhooks", idempotency=idempotency_exempt)
async def webhook(data: dict[str, Any]) -> dict[str, bool]:
    return {"received": True}


app = Litestar(
    [pay, webhook],
    plugins=[IdempotencyPlugin(store=os.environ.get("IDEMPO_STORE", "sqlite:///idempo-litestar.db"))],
)
