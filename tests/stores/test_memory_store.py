"""MemoryStore internals the conformance suite cannot see: the replay cache, GC-untracked rows, and its bounds."""

from __future__ import annotations

import gc

import pytest
from tests.support.clock import FakeClock

from idempo import Acquired, ConfigurationError, Existing, StoreUnavailable, StoredResponse
from idempo.stores import MemoryStore, store_from_url
from idempo.stores.memory import SWEEP_PER_CALL

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


def _complete(store: MemoryStore, record_key: str, ttl_ms: int = 10_000) -> None:
    taken = store.begin(record_key, "fp", 1000)
    assert isinstance(taken, Acquired)
    store.complete(record_key, taken.token, FIRST, ttl_ms)


def test_expired_records_are_evicted_by_later_calls_without_purge() -> None:
    """Issue 10 item 6: the memory store evicts expired records itself, a bounded number per call,
    until none is left; purge_expired() is never called."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for i in range(100):
        _complete(store, f"old{i}")
    assert len(store) == 100
    clock.advance(11)
    calls = 0
    while len(store) > 1:
        before = len(store)
        _complete(store, f"new{calls}", ttl_ms=1)  # each new record expires too, so only old ones count
        clock.advance(0.01)
        calls += 1
        # two writes (begin, complete), each evicting at most its share
        assert before + 1 - len(store) <= 2 * SWEEP_PER_CALL, "one call evicted more than its share"
        assert calls < 100, "eviction does not keep up"
    assert not any(key.startswith("old") for key in store._records)


def test_an_in_progress_record_is_kept_for_grace_after_its_lease() -> None:
    """An expired lease is evicted only after grace, so the next begin still reports a takeover."""
    clock = FakeClock()
    store = MemoryStore(clock=clock, grace=60)
    assert isinstance(store.begin("crashed", "fp", 1000), Acquired)
    clock.advance(30)
    _complete(store, "other")  # a write that sweeps
    taken = store.begin("crashed", "fp", 1000)
    assert isinstance(taken, Acquired)
    assert taken.takeover
    clock.advance(62)
    _complete(store, "another")
    assert "crashed" not in store._records


def test_max_records_evicts_the_oldest_completed_never_an_in_progress_one() -> None:
    """Issue 10 item 6: a full store makes room by evicting the oldest completed record; leases stay."""
    store = MemoryStore(max_records=3)
    held = store.begin("running", "fp", 60_000)
    assert isinstance(held, Acquired)
    _complete(store, "first")
    _complete(store, "second")
    _complete(store, "third")  # full: "first" goes
    assert set(store._records) == {"running", "second", "third"}
    _complete(store, "fourth")
    assert set(store._records) == {"running", "third", "fourth"}
    store.complete("running", held.token, FIRST, 60_000)  # still its own lease, completed in place
    assert isinstance(store.begin("running", "fp", 1000), Existing)


def test_a_full_store_makes_room_from_a_lease_that_ended() -> None:
    """A crashed holder's in-progress record, its lease over, gives way to a new key in a full store rather
    than refusing new keys for its whole grace (the eviction keeps it that long for a takeover's report)."""
    clock = FakeClock()
    store = MemoryStore(clock=clock, max_records=2)
    assert isinstance(store.begin("a", "fp", 1_000), Acquired)
    assert isinstance(store.begin("b", "fp", 60_000), Acquired)
    clock.advance(2)
    assert isinstance(store.begin("c", "fp", 60_000), Acquired)
    assert set(store._records) == {"b", "c"}


def test_a_store_full_of_in_progress_records_refuses_a_new_key() -> None:
    """When every record is in progress, a new key is StoreUnavailable (503 at the fronts); the leases
    are untouched, and a settled one makes room again."""
    store = MemoryStore(max_records=2)
    first = store.begin("a", "fp", 60_000)
    assert isinstance(first, Acquired)
    assert isinstance(store.begin("b", "fp", 60_000), Acquired)
    with pytest.raises(StoreUnavailable, match="full"):
        store.begin("c", "fp", 60_000)
    assert set(store._records) == {"a", "b"}
    assert isinstance(store.begin("a", "fp", 60_000), Existing)  # a known key is answered as ever
    store.complete("a", first.token, FIRST, 60_000)
    assert isinstance(store.begin("c", "fp", 60_000), Acquired)
    assert set(store._records) == {"b", "c"}


def test_memory_url_options() -> None:
    """memory://?max_records=N&grace=S builds a bounded store; an unknown option is refused."""
    store = store_from_url("memory://?max_records=5&grace=1.5")
    assert isinstance(store, MemoryStore)
    assert store.max_records == 5
    assert store._grace_ms == 1500
    with pytest.raises(ConfigurationError):
        store_from_url("memory://?max=5")


def test_max_records_never_evicts_a_held_or_not_replayable_marker() -> None:
    """A marker (a hold: outcome unknown; a too-large answer) stands for an outcome that must not run
    again: max_records evicts ordinary completed records only, and refuses a new key when none is left."""
    from idempo._core.records import Marker

    store = MemoryStore(max_records=2)
    held = store.begin("held", "fp", 60_000)
    assert isinstance(held, Acquired)
    store.complete("held", held.token, Marker(Marker.HELD, "takeover").response(), 60_000)
    _complete(store, "done")
    _complete(store, "next")  # full: "done" goes, the held marker stays
    assert set(store._records) == {"held", "next"}
    _complete(store, "again")
    assert set(store._records) == {"held", "again"}
