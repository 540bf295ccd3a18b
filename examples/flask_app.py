"""Flask + idempo: ``flask --app examples/flask_app run``

    curl -i -X POST localhost:5000/payments -H 'Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324' \
         -H 'Content-Type: application/json' -d '{"amount": 1999}'

Send it twice: the second answer is the first one, replayed (``Idempotent-Replayed: true``).
"""

import itertools
import os
from typing import Any

from flask import Flask, request

from idempo.flask import Idempotency, idempotency, idempotency_exempt

app = Flask(__name__)
Idempotency(app, store=os.environ.get("IDEMPO_STORE", "sqlite:///idempo-flask.db"))
ids = itertools.count(1)


@app.post("/payments")
@idempotency(require_key=True, record_ttl=3600)
def pay() -> Any:
    payment = request.get_json()
    return {"payment_id": next(ids), "amount": payment["amount"]}, 201


@app.post("/webhooks")
@idempotency_exempt
def webhook() -> Any:
    return {"received": True}
