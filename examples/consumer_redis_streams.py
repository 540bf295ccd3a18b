"""An idempotent consumer on Redis Streams: each order is handled once, however often it is delivered.

Run (Redis at 127.0.0.1:6379, or set REDIS_URL)::

    pip install 'idempo[redis]'
    python examples/consumer_redis_streams.py            # publish, consume, show what happened
    python examples/consumer_redis_streams.py worker w1  # or run workers: one per process/terminal

The demo publishes three orders, each twice (a producer that retried its
XADD), then consumes them: each order is charged once, the duplicates are
acknowledged and skipped. Run it again and all six are duplicates: the store
(``consumer-example.db``) remembers the orders for 24 hours. Workers started with ``worker NAME`` share the
consumer group and the SQLite store; kill one in the middle of a message and
another takes the message over (XAUTOCLAIM) once the first one's lease ends.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import redis

from idempo.consumer import IdempotentConsumer, Outcome, RedisStreamConsumer, StreamMessage

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
STREAM = os.environ.get("STREAM", "idempo-example:orders")
GROUP = "billing"
STORE = "sqlite:///consumer-example.db"
LEASE = 10.0  # seconds: renewed while a handler runs; a dead worker delays its message this much at most

charged: list[str] = []


def charge(message: StreamMessage) -> None:
    """The side effect that must happen once per order."""
    time.sleep(0.1)  # talk to the payment provider
    charged.append(message.fields["order_id"])
    print(f"  charged {message.fields['order_id']} ({message.fields['cents']} cents)")


def make_reader(client: redis.Redis, name: str) -> RedisStreamConsumer:
    consumer = IdempotentConsumer(
        charge,
        store=STORE,
        message_id=lambda m: m.fields["order_id"],  # the producer's id: survives a re-publish
        scope=STREAM,
        lease_ttl=LEASE,
    )
    return RedisStreamConsumer(client, STREAM, GROUP, name, consumer, claim_idle=LEASE, block=1.0)


def demo(client: redis.Redis) -> None:
    client.delete(STREAM)
    reader = make_reader(client, "demo")
    for order_id, cents in [("order-1", 1999), ("order-2", 500), ("order-3", 4200)]:
        for _ in range(2):  # the producer retried: every order is in the stream twice
            client.xadd(STREAM, {"order_id": order_id, "cents": cents})
    print(f"published 6 entries to {STREAM}")
    outcomes: list[Outcome] = []
    while len(outcomes) < 6:
        outcomes += [outcome for _, outcome in reader.poll()]
    pending = client.xpending(STREAM, GROUP)["pending"]
    print(f"outcomes: {[o.value for o in outcomes]}")
    print(f"charged {len(charged)} orders for 6 deliveries; {pending} entries left unacknowledged")
    client.delete(STREAM)
    reader.consumer.store.close()


def worker(client: redis.Redis, name: str) -> None:
    print(f"worker {name} consuming {STREAM} (Ctrl-C to stop)")
    with contextlib.suppress(KeyboardInterrupt):
        make_reader(client, name).run()


if __name__ == "__main__":
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    if sys.argv[1:2] == ["worker"]:
        worker(client, sys.argv[2] if len(sys.argv) > 2 else f"worker-{os.getpid()}")
    else:
        demo(client)
