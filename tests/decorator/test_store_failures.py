"""B18: the store failing around a call, with a real fault (another connection holding SQLite's write lock)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from idempo import KeyInProgress, StoreUnavailable, idempotent
from idempo.stores.sqlite import AsyncSQLiteStore, SQLiteStore
from tests.support.clock import FakeClock


@contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Hold the database's write lock from another connection, as a long writer in another process would."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "idempo.db", clock=clock, busy_timeout=0.05)
    yield store
    store.close()


def test_store_down_at_begin_fails_closed(store: SQLiteStore) -> None:
    """B18(a): the store failing before the call raises StoreUnavailable and the function does not run."""
    calls = 0

    @idempotent(store=store, key="key")
    def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        return calls

    with write_locked(Path(store.path)), pytest.raises(StoreUnavailable):
        pay("K1")
    assert calls == 0
    assert pay("K1") == 1
    assert pay("K1") == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_store_down_at_begin_fails_closed_async(tmp_path: Path, anyio_backend: str) -> None:
    """B18(a), async: StoreUnavailable and no call; after recovery the call runs once."""
    store = AsyncSQLiteStore(tmp_path / "idempo.db", busy_timeout=0.05)
    calls = 0

    @idempotent(store=store, key="key")
    async def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        return calls

    with write_locked(Path(store.path)), pytest.raises(StoreUnavailable):
        await pay("K1")
    assert calls == 0
    assert await pay("K1") == 1
    assert await pay("K1") == 1
    await store.aclose()


def test_store_down_at_complete_returns_the_result_and_keeps_the_key(
    store: SQLiteStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """B18(b): a failed complete still returns the result; the key stays in progress, and a retry after the lease
    (a takeover, B03) in this process gets the result it holds, never a second run (DESIGN: a failed save)."""
    calls = 0
    lock = write_locked(Path(store.path))

    @idempotent(store=store, key="key", lease_ttl=30)
    def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            lock.__enter__()  # the store goes down while the call runs
        return calls

    with caplog.at_level(logging.ERROR, "idempo"):
        assert pay("K1") == 1
    lock.__exit__(None, None, None)
    assert "complete failed" in caplog.text
    with pytest.raises(KeyInProgress):
        pay("K1")
    assert calls == 1
    # After the lease, a retry takes the record over (B03); this process still holds the result whose save
    # is being retried, so the retry saves and returns it rather than running again. (Another process
    # taking it over would run it again: the one outcome this outage can cost.)
    clock.advance(31)
    assert pay("K1") == 1
    assert calls == 1


def test_fail_open_runs_the_function_and_says_so(store: SQLiteStore, caplog: pytest.LogCaptureFixture) -> None:
    """B18(c): with fail_open, the function runs while the store is down, and a warning says idempotency was off."""
    calls = 0

    @idempotent(store=store, key="key", fail_open=True)
    def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        return calls

    with write_locked(Path(store.path)), caplog.at_level(logging.WARNING, "idempo"):
        assert pay("K1") == 1
    assert calls == 1
    bypassed = [r for r in caplog.records if getattr(r, "idempo_outcome", None) == "bypassed"]
    assert len(bypassed) == 1
    assert bypassed[0].levelno == logging.WARNING
    assert bypassed[0].idempo_front == "decorator"  # type: ignore[attr-defined]
