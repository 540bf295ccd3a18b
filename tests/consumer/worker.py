"""A consumer process for the crash test, run as ``python -m tests.consumer.worker``.

It consumes ``STREAM`` in ``GROUP`` as ``NAME`` through an IdempotentConsumer on
``STORE_URL``. The handler appends the message id to ``STREAM:started``, hangs
(until the test kills the process) when the message has ``hang=1``, else
appends the id to ``STREAM:processed``: the side effect counted by the test.
"""

from __future__ import annotations

import argparse
import threading

import redis

from idempo.consumer import IdempotentConsumer, RedisStreamConsumer, StreamMessage


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("broker", "stream", "group", "name", "store", "scope"):
        parser.add_argument(name)
    parser.add_argument("--lease", type=float, default=1.0)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.broker, decode_responses=True)

    def handle(message: StreamMessage) -> None:
        client.rpush(f"{args.stream}:started", message.fields["id"])
        if message.fields.get("hang") == "1":
            threading.Event().wait()
        client.rpush(f"{args.stream}:processed", message.fields["id"])

    consumer = IdempotentConsumer(
        handle, store=args.store, message_id=lambda m: m.fields["id"], scope=args.scope, lease_ttl=args.lease
    )
    RedisStreamConsumer(client, args.stream, args.group, args.name, consumer, claim_idle=None, block=0.2).run()


if __name__ == "__main__":
    main()
