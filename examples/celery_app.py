"""Idempotent Celery tasks: each order is charged once, however often its task is sent or delivered.

Run (Redis at 127.0.0.1:6379, or set REDIS_URL)::

    pip install 'idempo[celery]'
    celery -A examples.celery_app worker --pool=solo --loglevel=INFO   # a worker (or several)
    python examples/celery_app.py                                       # send each order twice

The script sends three orders, each twice (a client that timed out and
called ``apply_async`` again: two task ids, one idempotency key), waits for
all six results, and prints them: each order is charged once, and its
duplicate's ``AsyncResult.get()`` returns the same receipt. Run it again and
all six are replays: the store remembers the orders for 24 hours. Kill a
worker with SIGKILL in the middle of a charge and start another: the task
comes back after the broker's visibility timeout and is charged once, after
its lease (``LEASE``) lapsed.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from idempo.celery import IdempotentTask

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
#: Every key of the example (broker, results, idempo records) starts with this.
PREFIX = os.environ.get("PREFIX", "idempo-example-celery:")
LEASE = 10.0  # seconds: renewed while the task runs; a dead worker delays its task this much at most

app = Celery("shop", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    # The broker redelivers a task no worker acknowledged within this (a dead worker's).
    broker_transport_options={"visibility_timeout": 60, "global_keyprefix": PREFIX},
    result_backend_transport_options={"global_keyprefix": PREFIX},
    task_default_queue=f"{PREFIX}tasks",
    broker_connection_retry_on_startup=True,
    idempo_store=f"{REDIS_URL}?prefix={PREFIX}idempo:",
)


# The name is explicit: the worker imports this module as examples.celery_app, the script runs it as __main__.
@app.task(name="shop.charge", base=IdempotentTask, idempotency_key="order_id", idempotency_lease_ttl=LEASE)
def charge(order_id: str, cents: int) -> dict[str, object]:
    """The side effect that must happen once per order: counted in Redis, as a payment provider would."""
    time.sleep(0.2)  # talk to the payment provider
    client = redis.Redis.from_url(REDIS_URL)
    client.rpush(f"{PREFIX}charged", order_id)
    client.close()
    return {"order_id": order_id, "cents": cents, "charged_at": time.time()}


def main() -> None:
    orders = [("order-1", 1999), ("order-2", 500), ("order-3", 4200)]
    results = []
    for order_id, cents in orders:
        for _ in range(2):  # the client timed out and sent the task again
            results.append(charge.delay(order_id, cents))
    receipts = [result.get(timeout=60) for result in results]
    for result, receipt in zip(results, receipts, strict=True):
        print(f"  task {result.id}: {receipt['order_id']} charged at {receipt['charged_at']:.3f}")
    same = all(receipts[i] == receipts[i + 1] for i in range(0, len(receipts), 2))
    client = redis.Redis.from_url(REDIS_URL)
    charged = client.llen(f"{PREFIX}charged")
    client.close()
    print(f"{len(results)} tasks, {charged} charges in all; each duplicate got its order's receipt: {same}")


if __name__ == "__main__":
    main()
