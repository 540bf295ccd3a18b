"""IdempotentConsumer and AsyncIdempotentConsumer without a broker: what each delivery's outcome is."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from idempo import FingerprintMismatch, InvalidKey, MissingKey, Verdict
from idempo.consumer import AsyncIdempotentConsumer, IdempotentConsumer, Outcome
from idempo.stores import AsyncMemoryStore, MemoryStore
from tests.support.clock import FakeClock

Message = dict[str, Any]


def message_id(message: Message) -> Any:
    return message.get("id")


def test_outcomes_say_whether_to_ack() -> None:
    """PROCESSED and DUPLICATE are acked; IN_PROGRESS and FAILED are left for redelivery."""
    assert [o for o in Outcome if o.ack] == [Outcome.PROCESSED, Outcome.DUPLICATE]


def test_each_message_id_is_processed_once() -> None:
    """The first delivery runs the handler; a redelivery of the id is a DUPLICATE and does not."""
    handled: list[Message] = []
    consumer = IdempotentConsumer(handled.append, store=MemoryStore(), message_id=message_id)
    assert consumer.process({"id": "m1", "qty": 1}) is Outcome.PROCESSED
    assert consumer.process({"id": "m1", "qty": 1}) is Outcome.DUPLICATE
    assert consumer.process({"id": "m2", "qty": 1}) is Outcome.PROCESSED
    assert [m["id"] for m in handled] == ["m1", "m2"]


def test_a_message_in_progress_elsewhere_is_not_acked() -> None:
    """While one consumer runs the handler, another delivery of the id is IN_PROGRESS (handler not run)."""
    store = MemoryStore()
    inside, finish = threading.Event(), threading.Event()
    calls = 0

    def slow(message: Message) -> None:
        nonlocal calls
        calls += 1
        inside.set()
        assert finish.wait(30)

    first = IdempotentConsumer(slow, store=store, message_id=message_id, scope="q")
    second = IdempotentConsumer(slow, store=store, message_id=message_id, scope="q")
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(first.process({"id": "m1"})))
    thread.start()
    assert inside.wait(30)
    assert second.process({"id": "m1"}) is Outcome.IN_PROGRESS
    finish.set()
    thread.join()
    assert outcomes == [Outcome.PROCESSED]
    assert second.process({"id": "m1"}) is Outcome.DUPLICATE
    assert calls == 1


def test_a_handler_error_propagates_and_releases_the_id() -> None:
    """The handler's exception propagates unchanged; the redelivery runs the handler again."""
    attempts = 0

    def flaky(message: Message) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise KeyError("not yet")

    consumer = IdempotentConsumer(flaky, store=MemoryStore(), message_id=message_id)
    with pytest.raises(KeyError, match="not yet"):
        consumer.process({"id": "m1"})
    assert consumer.process({"id": "m1"}) is Outcome.PROCESSED
    assert attempts == 2


def test_a_held_error_keeps_the_id_until_hold_ttl() -> None:
    """With a HOLD verdict, redeliveries are HELD (not acked, not run) until hold_ttl passes."""
    clock = FakeClock()
    attempts = 0

    def charge(message: Message) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise TimeoutError("the payment provider did not answer")

    consumer = IdempotentConsumer(
        charge,
        store=MemoryStore(clock=clock),
        message_id=message_id,
        exception_verdicts={TimeoutError: Verdict.HOLD},
        hold_ttl=600,
    )
    with pytest.raises(TimeoutError):
        consumer.process({"id": "m1"})
    assert consumer.process({"id": "m1"}) is Outcome.HELD
    clock.advance(601)
    assert consumer.process({"id": "m1"}) is Outcome.PROCESSED
    assert attempts == 2


def test_a_message_without_id_is_refused() -> None:
    """A message whose id is None raises MissingKey, a blank id InvalidKey; the handler does not run."""
    handled: list[Message] = []
    consumer = IdempotentConsumer(handled.append, store=MemoryStore(), message_id=message_id)
    with pytest.raises(MissingKey):
        consumer.process({"qty": 1})
    with pytest.raises(InvalidKey):
        consumer.process({"id": " "})
    assert handled == []


def test_fingerprint_catches_a_reused_id() -> None:
    """With fingerprint=, the same id carrying another payload raises FingerprintMismatch."""
    handled: list[Message] = []
    consumer = IdempotentConsumer(
        handled.append, store=MemoryStore(), message_id=message_id, fingerprint=lambda m: m["body"]
    )
    assert consumer.process({"id": "m1", "body": {"qty": 1}}) is Outcome.PROCESSED
    assert consumer.process({"id": "m1", "body": {"qty": 1}, "delivery": 2}) is Outcome.DUPLICATE
    with pytest.raises(FingerprintMismatch):
        consumer.process({"id": "m1", "body": {"qty": 2}})
    assert len(handled) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_async_consumer(anyio_backend: str) -> None:
    """AsyncIdempotentConsumer: processed once, duplicates skipped, an error releases the id."""
    handled: list[str] = []

    async def handle(message: Message) -> None:
        await anyio.lowlevel.checkpoint()
        if message.get("fail"):
            raise RuntimeError("boom")
        handled.append(message["id"])

    consumer = AsyncIdempotentConsumer(handle, store=AsyncMemoryStore(), message_id=message_id)
    assert await consumer.process({"id": "m1"}) is Outcome.PROCESSED
    assert await consumer.process({"id": "m1"}) is Outcome.DUPLICATE
    with pytest.raises(RuntimeError):
        await consumer.process({"id": "m2", "fail": True})
    assert await consumer.process({"id": "m2"}) is Outcome.PROCESSED
    assert handled == ["m1", "m2"]
