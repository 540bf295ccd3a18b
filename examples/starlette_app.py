"""Starlette + idempo: ``uvicorn examples.starlette_app:app``

    curl -i -X POST localhost:8000/payments -H 'Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324' \
         -H 'Content-Type: application/json' -d '{"amount": 1999}'

Send it twice: the second answer is the first one, replayed (``Idempotent-Replayed: true``).
"""

import itertools
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from idempo import Policy
from idempo.asgi import IdempotencyMiddleware

ids = itertools.count(1)


async def pay(request: Request) -> JSONResponse:
    payment = await request.json()
    return JSONResponse({"payment_id": next(ids), "amount": payment["amount"]}, status_code=201)


app = IdempotencyMiddleware(
    Starlette(routes=[Route("/payments", pay, methods=["POST"])]),
    store=os.environ.get("IDEMPO_STORE", "sqlite:///idempo-starlette.db"),
    policy=Policy(require_key=True),
)
