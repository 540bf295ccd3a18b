"""A call slower than its lease keeps it (renewed while it runs), so a retry meanwhile is refused, not run."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio
import pytest

from idempo import KeyInProgress, Store, idempotent
from idempo.stores import AsyncMemoryStore, MemoryStore
from idempo.stores.sqlite import SQLiteStore

LEASE = 1.0  # seconds; the calls below run for 2.5 leases


@pytest.fixture(params=["memory", "sqlite"])
def real_clock_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A store on the real clock: renewals and expiry both follow wall time here."""
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "idempo.db")


def test_a_slow_call_is_not_run_twice(real_clock_store: Store) -> None:
    """While a call outlives its lease, a retry with its key gets KeyInProgress; afterwards the replay."""
    calls = 0
    started = threading.Event()

    @idempotent(store=real_clock_store, key="key", lease_ttl=LEASE)
    def slow(key: str) -> int:
        nonlocal calls
        calls += 1
        started.set()
        time.sleep(2.5 * LEASE)
        return calls

    first = threading.Thread(target=slow, args=("K1",))
    first.start()
    assert started.wait(30)
    time.sleep(1.5 * LEASE)  # past the first lease's expiry
    with pytest.raises(KeyInProgress):
        slow("K1")
    first.join()
    assert slow("K1") == 1
    assert calls == 1
    real_clock_store.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_slow_async_call_is_not_run_twice(anyio_backend: str) -> None:
    """Async (asyncio): a call outliving its lease keeps its key; a retry meanwhile is refused."""
    calls = 0

    @idempotent(store=AsyncMemoryStore(), key="key", lease_ttl=LEASE)
    async def slow(key: str) -> int:
        nonlocal calls
        calls += 1
        await anyio.sleep(2.5 * LEASE)
        return calls

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(slow, "K1")
        await anyio.sleep(1.5 * LEASE)
        with pytest.raises(KeyInProgress):
            await slow("K1")
    assert await slow("K1") == 1
    assert calls == 1
