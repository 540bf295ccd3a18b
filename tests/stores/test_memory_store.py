"""MemoryStore internals the conformance suite cannot see: the replay cache and GC-untracked rows."""

from __future__ import annotations

import gc

from tests.support.clock import FakeClock

from idempo import Acquired, Existing, StoredResponse
from idempo.stores import MemoryStore

FIRST = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"n":1}')
SECOND = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"n":2}')


def test_a_replayed_record_is_never_served_after_its_row_changed() -> None:
    """The cached replay of a completed record is dropped when the key expires, is taken again and completes anew."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    first = store.begin("rk", "fp", 1000)
    assert isinstance(first, Acquired)
    store.complete("rk", first.token, FIRST, 1000)
    for _ in range(2):  # the second replay comes from the cache
        replay = store.begin("rk", "fp", 1000)
        assert isinstance(replay, Existing)
        assert replay.record.response == FIRST
    clock.advance(2)
    second = store.begin("rk", "fp", 1000)
    assert isinstance(second, Acquired)
    store.complete("rk", second.token, SECOND, 1000)
    replay = store.begin("rk", "fp", 1000)
    assert isinstance(replay, Existing)
    assert replay.record.response == SECOND
    clock.advance(2)
    assert store.purge_expired() == 1
    assert isinstance(store.begin("rk", "fp", 1000), Acquired)


def test_completed_rows_are_left_alone_by_the_garbage_collector() -> None:
    """Rows hold atomic values only, so a collection untracks them: many records cost full collections nothing."""
    store = MemoryStore()
    for i in range(100):
        taken = store.begin(f"rk{i}", "fp", 1000)
        assert isinstance(taken, Acquired)
        store.complete(f"rk{i}", taken.token, FIRST, 60_000)
    gc.collect()
    assert not any(gc.is_tracked(row) for row in store._records.values())
