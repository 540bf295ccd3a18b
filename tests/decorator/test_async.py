"""@idempotent on async functions, against every async store, on asyncio and trio."""

from __future__ import annotations

import dataclasses
import inspect

import anyio
import anyio.lowlevel
import pydantic
import pytest

from idempo import AsyncStore, FingerprintMismatch, KeyHeld, KeyInProgress, Verdict, idempotent
from tests.support.backends import Backend

pytestmark = pytest.mark.anyio


@dataclasses.dataclass(frozen=True)
class Shipment:
    shipment_id: int
    parcels: tuple[str, ...]


class Refund(pydantic.BaseModel):
    refund_id: str
    cents: int


async def test_runs_once_per_key(astore: AsyncStore, scope: str) -> None:
    """A second awaited call with the same key replays; another key executes."""
    calls = 0

    @idempotent(store=astore, key="key", scope=scope)
    async def order(key: str, sku: str) -> dict[str, object]:
        nonlocal calls
        calls += 1
        await anyio.lowlevel.checkpoint()
        return {"order": calls, "sku": sku}

    assert inspect.iscoroutinefunction(order)
    assert await order("K1", "A") == {"order": 1, "sku": "A"}
    assert await order("K1", "A") == {"order": 1, "sku": "A"}
    assert await order("K2", "A") == {"order": 2, "sku": "A"}
    assert calls == 2


async def test_replay_returns_the_same_types(astore: AsyncStore, scope: str) -> None:
    """Replays of a dataclass and of a pydantic model are equal values of the annotated types."""
    calls = 0

    @idempotent(store=astore, key="key", scope=f"{scope}-ship")
    async def ship(key: str, parcels: list[str]) -> Shipment:
        nonlocal calls
        calls += 1
        return Shipment(calls, tuple(parcels))

    @idempotent(store=astore, key="refund_id", scope=f"{scope}-refund")
    async def refund(refund_id: str, cents: int) -> Refund:
        nonlocal calls
        calls += 1
        return Refund(refund_id=refund_id, cents=cents)

    first_shipment, first_refund = await ship("K1", ["p1", "p2"]), await refund("r1", 500)
    shipment, refunded = await ship("K1", ["p1", "p2"]), await refund("r1", 500)
    assert calls == 2
    assert type(shipment) is Shipment
    assert shipment == first_shipment
    assert type(refunded) is Refund
    assert refunded == first_refund


async def test_other_arguments_raise_fingerprint_mismatch(astore: AsyncStore, scope: str) -> None:
    """The same key with different arguments raises FingerprintMismatch."""

    @idempotent(store=astore, key="key", scope=scope)
    async def order(key: str, qty: int) -> int:
        return qty

    assert await order("K1", 1) == 1
    with pytest.raises(FingerprintMismatch):
        await order("K1", 2)


async def test_concurrent_tasks_execute_once_and_the_rest_get_key_in_progress(astore: AsyncStore, scope: str) -> None:
    """8 tasks with one key: one executes, the 7 others raise KeyInProgress (shared/cases B01)."""
    calls = 0
    refused = 0
    results: list[str] = []
    others_done = anyio.Event()

    @idempotent(store=astore, key="key", scope=scope)
    async def pay(key: str) -> str:
        nonlocal calls
        calls += 1
        with anyio.fail_after(30):
            await others_done.wait()
        return "paid"

    async def call() -> None:
        nonlocal refused
        try:
            results.append(await pay("K1"))
        except KeyInProgress:
            refused += 1
            if refused == 7:
                others_done.set()

    async with anyio.create_task_group() as tasks:
        for _ in range(8):
            tasks.start_soon(call)
    assert calls == 1
    assert results == ["paid"]
    assert refused == 7


async def test_concurrent_tasks_with_wait_all_get_the_result(astore: AsyncStore, scope: str) -> None:
    """With wait, 8 tasks with one key all get the one execution's result."""
    calls = 0
    results: list[int] = []

    @idempotent(store=astore, key="key", scope=scope, wait=60)
    async def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.3)
        return 42

    async def call() -> None:
        results.append(await pay("K1"))

    async with anyio.create_task_group() as tasks:
        for _ in range(8):
            tasks.start_soon(call)
    assert calls == 1
    assert results == [42] * 8


async def test_exception_releases_the_key(astore: AsyncStore, scope: str) -> None:
    """An exception propagates unchanged and releases the key: the retry executes."""
    calls = 0

    @idempotent(store=astore, key="key", scope=scope)
    async def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("upstream reset")
        return calls

    with pytest.raises(ConnectionResetError, match="upstream reset"):
        await pay("K1")
    assert await pay("K1") == 2
    assert await pay("K1") == 2


async def test_hold_verdict_keeps_the_key_in_progress(astore: AsyncStore, backend: Backend, scope: str) -> None:
    """A HOLD verdict keeps the key in progress for hold_ttl, then a retry executes."""
    calls = 0

    @idempotent(store=astore, key="key", scope=scope, exception_verdicts={TimeoutError: Verdict.HOLD}, hold_ttl=1)
    async def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError()
        return calls

    with pytest.raises(TimeoutError):
        await pay("K1")
    with pytest.raises(KeyHeld, match="exception TimeoutError"):
        await pay("K1")
    backend.advance(1.2)
    assert await pay("K1") == 2


async def test_cancelled_call_runs_again_once_its_lease_expires(
    astore: AsyncStore, backend: Backend, scope: str
) -> None:
    """A cancelled call leaves its lease to expire (its side effect may be half done), then a retry runs (B03a)."""
    calls = 0
    entered = anyio.Event()

    @idempotent(store=astore, key="key", scope=scope, lease_ttl=1)
    async def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            await anyio.sleep_forever()
        return calls

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(pay, "K1")
        await entered.wait()
        tasks.cancel_scope.cancel()
    with pytest.raises(KeyInProgress):
        await pay("K1")
    backend.advance(1.2)
    assert await pay("K1") == 2
    assert await pay("K1") == 2
    assert calls == 2
