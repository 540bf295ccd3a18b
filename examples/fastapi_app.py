"""FastAPI + idempo: ``uvicorn examples.fastapi_app:app``

    curl -i -X POST localhost:8000/payments -H 'Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324' \
         -H 'Content-Type: application/json' -d '{"amount": 1999}'

Send it twice: the second answer is the first one, replayed (``Idempotent-Replayed: true``).
The schema at /docs shows the Idempotency-Key header and the 400/409/422 answers.
"""

import itertools
import os

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from idempo.fastapi import idempotency, idempotency_exempt, install

app = FastAPI()
install(app, store=os.environ.get("IDEMPO_STORE", "sqlite:///idempo-fastapi.db"))
ids = itertools.count(1)


class Payment(BaseModel):
    amount: int


@app.post("/payments", status_code=201, dependencies=[Depends(idempotency(require_key=True, record_ttl=3600))])
async def pay(payment: Payment) -> dict[str, int]:
    return {"payment_id": next(ids), "amount": payment.amount}


@app.post("/webhooks", dependencies=[Depends(idempotency_exempt)])
async def webhook(event: dict[str, object]) -> dict[str, bool]:
    return {"received": True}
