"""Type-checked by mypy (strict), never executed: @idempotent keeps signatures and return types.

Each ``# type: ignore[...]`` marks a call mypy must reject; with
``warn_unused_ignores`` (part of strict) an ignore that is not needed is an
error, so these lines prove the decorated functions are still checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine
from typing import Any, assert_type

from idempo import idempotent
from idempo.consumer import AsyncIdempotentConsumer, IdempotentConsumer, Outcome, StreamMessage
from idempo.serializers import JSONSerializer
from idempo.stores import AsyncMemoryStore, MemoryStore


@dataclasses.dataclass
class Receipt:
    payment_id: str
    cents: int


@idempotent(store=MemoryStore(), key="payment_id")
def pay(payment_id: str, cents: int, *, note: str = "") -> Receipt:
    return Receipt(payment_id, cents)


@idempotent(store=AsyncMemoryStore(), key=lambda arguments: arguments["payment_id"], wait=5.0)
async def apay(payment_id: str, cents: int) -> Receipt:
    return Receipt(payment_id, cents)


@idempotent(store="sqlite:///idempo.db", key="key", serializer=JSONSerializer(), exclude=["client"])
def with_options(key: str, client: object) -> list[int]:
    return [1]


class Payments:
    @idempotent(store=MemoryStore(), key="payment_id", record_ttl=60, lease_ttl=5, serializer="pickle")
    def pay(self, payment_id: str) -> Receipt:
        return Receipt(payment_id, 0)


def sync_calls() -> None:
    assert_type(pay("p1", 100), Receipt)
    assert_type(pay("p1", 100, note="x"), Receipt)
    assert_type(with_options("k", object()), list[int])
    assert_type(Payments().pay("p1"), Receipt)
    pay("p1", "100")  # type: ignore[arg-type]
    pay("p1")  # type: ignore[call-arg]
    pay("p1", 100, memo="x")  # type: ignore[call-arg]
    text: str = pay("p1", 100)  # type: ignore[assignment]
    print(text)


async def async_calls() -> None:
    call = apay("p1", 100)
    # assert_type hands the coroutine back; it is awaited on the next line.
    assert_type(call, Coroutine[Any, Any, Receipt])  # type: ignore[unused-coroutine]
    assert_type(await call, Receipt)
    await apay(1, 100)  # type: ignore[arg-type]


def consumers() -> None:
    def handle(message: StreamMessage) -> None: ...

    async def ahandle(message: dict[str, str]) -> None: ...

    consumer = IdempotentConsumer(handle, store=MemoryStore(), message_id=lambda m: m.fields["id"])
    assert_type(consumer, IdempotentConsumer[StreamMessage])
    assert_type(consumer.process(StreamMessage("s", "1-0", {})), Outcome)
    consumer.process({"id": "1"})  # type: ignore[arg-type]
    aconsumer = AsyncIdempotentConsumer(ahandle, store=AsyncMemoryStore(), message_id=lambda m: m["id"])
    assert_type(aconsumer, AsyncIdempotentConsumer[dict[str, str]])
