"""Lease renewal: a handler that outlives its lease keeps it; a stopped keeper lets it lapse."""

from __future__ import annotations

import asyncio
import time

import pytest

from idempo import Acquired, Existing, RecordState
from idempo._engine.lease import AsyncLeaseKeeper, LeaseKeeper
from idempo.stores import AsyncMemoryStore, MemoryStore
from tests.support.clock import FakeClock

LEASE_MS = 300


def test_blocking_keeper_extends_the_lease_past_its_ttl() -> None:
    """While the keeper runs, a duplicate finds the record held long after the first lease would have lapsed."""
    store = MemoryStore()
    first = store.begin("rk", "fp", LEASE_MS)
    assert isinstance(first, Acquired)
    keeper = LeaseKeeper(store, "rk", first.token, LEASE_MS)
    try:
        time.sleep(1.0)  # more than three lease TTLs
        duplicate = store.begin("rk", "fp", LEASE_MS)
        assert isinstance(duplicate, Existing)
        assert duplicate.record.state is RecordState.IN_PROGRESS
        assert duplicate.record.token == first.token
    finally:
        keeper.stop()
    time.sleep(0.5)  # no renewal after stop: the lease lapses
    takeover = store.begin("rk", "fp", LEASE_MS)
    assert isinstance(takeover, Acquired)
    assert takeover.takeover is True


def test_blocking_keeper_stops_when_the_lease_was_taken_over() -> None:
    """A keeper whose token lost the record stops renewing instead of fighting the new holder."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    first = store.begin("rk", "fp", LEASE_MS)
    assert isinstance(first, Acquired)
    clock.advance(1)  # the first lease lapsed: another request takes the record over
    second = store.begin("rk", "fp", 60_000)
    assert isinstance(second, Acquired)
    assert second.takeover is True
    keeper = LeaseKeeper(store, "rk", first.token, LEASE_MS)
    assert keeper.renew() is False
    record = store.get("rk")
    assert record is not None
    assert record.token == second.token


def test_async_keeper_extends_the_lease_and_stops_cleanly() -> None:
    """On asyncio the keeper renews from a timer; stop() waits for a renewal in flight."""

    async def scenario() -> None:
        store = AsyncMemoryStore()
        first = await store.begin("rk", "fp", LEASE_MS)
        assert isinstance(first, Acquired)
        keeper = AsyncLeaseKeeper(store, "rk", first.token, LEASE_MS)
        await asyncio.sleep(1.0)
        duplicate = await store.begin("rk", "fp", LEASE_MS)
        assert isinstance(duplicate, Existing)
        assert duplicate.record.token == first.token
        await keeper.stop()
        await asyncio.sleep(0.5)
        takeover = await store.begin("rk", "fp", LEASE_MS)
        assert isinstance(takeover, Acquired)
        assert takeover.takeover is True

    asyncio.run(scenario())


def test_async_keeper_for_a_fast_handler_never_touches_the_store() -> None:
    """A handler done before a third of the lease costs a timer handle and no store call."""

    class Counting(AsyncMemoryStore):
        extends = 0

        async def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
            Counting.extends += 1
            await super().extend(record_key, token, lease_ttl_ms)

    async def scenario() -> None:
        store = Counting()
        first = await store.begin("rk", "fp", 30_000)
        assert isinstance(first, Acquired)
        keeper = AsyncLeaseKeeper(store, "rk", first.token, 30_000)
        await keeper.stop()
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert Counting.extends == 0


def test_async_keeper_is_inert_without_a_running_loop() -> None:
    """Outside asyncio (e.g. trio) the keeper schedules nothing and stop() is harmless."""
    pytest.importorskip("trio")
    import trio

    async def scenario() -> None:
        store = AsyncMemoryStore()
        keeper = AsyncLeaseKeeper(store, "rk", 1, LEASE_MS)
        await keeper.stop()

    trio.run(scenario)


def test_a_store_error_of_an_unknown_kind_does_not_stop_other_renewals() -> None:
    """A third-party store raising its own exception from extend: logged, and the shared thread renews on."""

    class Broken(MemoryStore):
        def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
            raise RuntimeError("not a StoreError")

    broken = Broken()
    store = MemoryStore()
    bad = broken.begin("bad", "fp", LEASE_MS)
    good = store.begin("rk", "fp", LEASE_MS)
    assert isinstance(bad, Acquired)
    assert isinstance(good, Acquired)
    keepers = [LeaseKeeper(broken, "bad", bad.token, LEASE_MS), LeaseKeeper(store, "rk", good.token, LEASE_MS)]
    try:
        time.sleep(1.0)
        duplicate = store.begin("rk", "fp", LEASE_MS)
        assert isinstance(duplicate, Existing)  # still held: the good lease kept being renewed
    finally:
        for keeper in keepers:
            keeper.stop()


def test_finished_event_loops_are_not_kept_alive() -> None:
    """asyncio.run per job: once its keepers are gone, a loop is released (the renewer holds no reference)."""
    import gc
    import weakref

    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def job() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        store = AsyncMemoryStore()
        first = await store.begin("rk", "fp", LEASE_MS)
        assert isinstance(first, Acquired)
        keeper = AsyncLeaseKeeper(store, "rk", first.token, LEASE_MS)
        await asyncio.sleep(0.25)  # one renewal
        await keeper.stop()
        await asyncio.sleep(0.15)  # the renewer notices it has nothing left to do

    for _ in range(5):
        asyncio.run(job())
    gc.collect()
    assert [ref() for ref in loops] == [None] * 5


def test_trio_keeper_renews_stops_and_survives_a_store_of_its_own_errors() -> None:
    """On trio: renewed past the TTL; after stop() the lease lapses; a store raising its own error ends no trio run."""
    trio = pytest.importorskip("trio")

    class Broken(AsyncMemoryStore):
        async def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
            raise RuntimeError("not a StoreError")

    async def scenario() -> None:
        store, broken = AsyncMemoryStore(), Broken()
        first = await store.begin("rk", "fp", LEASE_MS)
        bad = await broken.begin("bad", "fp", LEASE_MS)
        assert isinstance(first, Acquired)
        assert isinstance(bad, Acquired)
        keeper = AsyncLeaseKeeper(store, "rk", first.token, LEASE_MS)
        failing = AsyncLeaseKeeper(broken, "bad", bad.token, LEASE_MS)
        await trio.sleep(1.0)
        duplicate = await store.begin("rk", "fp", LEASE_MS)
        assert isinstance(duplicate, Existing)
        assert duplicate.record.token == first.token
        await keeper.stop()
        await failing.stop()
        await trio.sleep(0.5)
        takeover = await store.begin("rk", "fp", LEASE_MS)
        assert isinstance(takeover, Acquired)
        assert takeover.takeover is True

    trio.run(scenario)
