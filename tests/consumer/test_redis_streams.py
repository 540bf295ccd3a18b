"""The idempotent consumer on a real Redis Streams broker (consumer groups, XREADGROUP, XACK, XAUTOCLAIM).

Each test has a stream of its own on the shared Redis, deleted afterwards;
the consumers' store is shared by every process (an SQLite file, or the
Redis/PostgreSQL stores once merged).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idempo.consumer import IdempotentConsumer, Outcome, RedisStreamConsumer, StreamMessage
from tests.support.backends import Backend

pytestmark = pytest.mark.redis

GROUP = "workers"
ROOT = Path(__file__).resolve().parents[2]


def poll_until(
    reader: RedisStreamConsumer, done: Callable[[], bool], timeout: float = 20.0
) -> list[tuple[str, Outcome]]:
    """Poll until ``done()``; return every (message id field, outcome). The timeout bounds a hang, it times nothing."""
    seen: list[tuple[str, Outcome]] = []
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not done after {timeout} s: {seen}"
        seen += [(message.fields["id"], outcome) for message, outcome in reader.poll()]
    return seen


def pending(broker: Any, stream: str) -> int:
    return int(broker.xpending(stream, GROUP)["pending"])


@pytest.fixture
def scope() -> str:
    return f"orders-{uuid.uuid4().hex}"


@pytest.fixture
def consumer_for(
    broker: Any, stream: str, backend: Backend, scope: str
) -> Iterator[Callable[..., RedisStreamConsumer]]:
    """Factory: consumer_for(name, handler=records the side effect, **options) -> RedisStreamConsumer."""
    assert backend.url is not None
    made: list[IdempotentConsumer[StreamMessage]] = []

    def record(message: StreamMessage) -> None:
        broker.rpush(f"{stream}:processed", message.fields["id"])

    def factory(
        name: str, handler: Callable[[StreamMessage], None] = record, lease_ttl: float = 1.0, **options: Any
    ) -> RedisStreamConsumer:
        consumer = IdempotentConsumer(
            handler, store=backend.url, message_id=lambda m: m.fields["id"], scope=scope, lease_ttl=lease_ttl
        )
        made.append(consumer)
        options.setdefault("block", 0.05)
        return RedisStreamConsumer(broker, stream, GROUP, name, consumer, **options)

    yield factory
    for consumer in made:
        consumer.store.close()


def test_a_redelivered_message_is_processed_once_and_acked_each_time(
    broker: Any, stream: str, consumer_for: Callable[..., RedisStreamConsumer]
) -> None:
    """The same message id delivered twice (a producer's retried publish) runs the handler once; both are acked."""
    reader = consumer_for("c1", claim_idle=None)
    broker.xadd(stream, {"id": "order-1", "sku": "A"})
    assert poll_until(reader, lambda: pending(broker, stream) == 0 and broker.llen(f"{stream}:processed") == 1) == [
        ("order-1", Outcome.PROCESSED)
    ]
    broker.xadd(stream, {"id": "order-1", "sku": "A"})
    assert poll_until(reader, lambda: broker.xinfo_groups(stream)[0]["lag"] == 0 and pending(broker, stream) == 0) == [
        ("order-1", Outcome.DUPLICATE)
    ]
    assert broker.lrange(f"{stream}:processed", 0, -1) == ["order-1"]


def test_a_message_whose_ack_was_lost_is_skipped_on_redelivery(
    broker: Any, stream: str, consumer_for: Callable[..., RedisStreamConsumer]
) -> None:
    """A consumer that processed an entry but died before XACK: the entry is claimed by another, skipped, acked."""
    first = consumer_for("c1", claim_idle=None)
    # c1 reads and processes the entry, then "dies" before acknowledging it.
    broker.xadd(stream, {"id": "order-2"})
    ((_, entries),) = broker.xreadgroup(GROUP, "c1", {stream: ">"}, count=1)
    entry_id, fields = entries[0]
    assert first.consumer.process(StreamMessage(stream, entry_id, fields)) is Outcome.PROCESSED
    assert pending(broker, stream) == 1

    second = consumer_for("c2", claim_idle=0.05)
    assert poll_until(second, lambda: pending(broker, stream) == 0) == [("order-2", Outcome.DUPLICATE)]
    assert broker.lrange(f"{stream}:processed", 0, -1) == ["order-2"]


def test_a_consumer_killed_mid_message_has_it_processed_once_by_another(
    broker: Any,
    redis_url: str,
    stream: str,
    backend: Backend,
    scope: str,
    consumer_for: Callable[..., RedisStreamConsumer],
) -> None:
    """SIGKILL a consumer process inside the handler: after its lease another consumer claims and processes it once."""
    assert backend.url is not None
    broker.xgroup_create(stream, GROUP, id="0", mkstream=True)
    broker.xadd(stream, {"id": "order-3", "hang": "1"})
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.consumer.worker", redis_url, stream, GROUP, "doomed", backend.url, scope],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 30
        while broker.llen(f"{stream}:started") == 0:
            assert worker.poll() is None, "the worker exited early"
            assert time.monotonic() < deadline, "the worker never started the message"
            time.sleep(0.02)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    assert worker.returncode == -signal.SIGKILL
    assert broker.xpending_range(stream, GROUP, "-", "+", 10)[0]["consumer"] == "doomed"

    survivor = consumer_for("survivor", claim_idle=0.1, lease_ttl=1.0)
    seen = poll_until(survivor, lambda: pending(broker, stream) == 0)
    # Claimed while the dead consumer's lease still ran: left pending, never run twice.
    assert seen[-1] == ("order-3", Outcome.PROCESSED)
    assert all(outcome is Outcome.IN_PROGRESS for _, outcome in seen[:-1])
    assert broker.lrange(f"{stream}:processed", 0, -1) == ["order-3"]

    broker.xadd(stream, {"id": "order-3"})  # and any later redelivery is skipped
    assert poll_until(survivor, lambda: broker.xinfo_groups(stream)[0]["lag"] == 0 and pending(broker, stream) == 0)[
        -1
    ] == ("order-3", Outcome.DUPLICATE)
    assert broker.lrange(f"{stream}:processed", 0, -1) == ["order-3"]


def test_a_handler_error_leaves_the_message_for_redelivery(
    broker: Any, stream: str, consumer_for: Callable[..., RedisStreamConsumer]
) -> None:
    """A failing handler releases the id and leaves the entry pending; the redelivery runs the handler again."""
    attempts = 0

    def flaky(message: StreamMessage) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("the warehouse API is down")
        broker.rpush(f"{stream}:processed", message.fields["id"])

    reader = consumer_for("c1", handler=flaky, claim_idle=0.1)
    broker.xadd(stream, {"id": "order-4"})
    first = poll_until(reader, lambda: attempts == 1)
    assert first == [("order-4", Outcome.FAILED)]
    assert pending(broker, stream) == 1
    assert poll_until(reader, lambda: pending(broker, stream) == 0) == [("order-4", Outcome.PROCESSED)]
    assert attempts == 2
    assert broker.lrange(f"{stream}:processed", 0, -1) == ["order-4"]


def test_the_example_runs_as_documented(redis_url: str, stream: str, tmp_path: Path) -> None:
    """`python examples/consumer_redis_streams.py` charges 3 orders for 6 deliveries and leaves nothing pending."""
    env = {**os.environ, "REDIS_URL": redis_url, "STREAM": stream, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "consumer_redis_streams.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "charged 3 orders for 6 deliveries; 0 entries left unacknowledged" in run.stdout
