"""The store conformance suite (:class:`StoreContract`), for any store, ours or yours."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, TypeVar

from .._core.keys import make_record_key
from .._core.records import (
    Acquired,
    BeginResult,
    Existing,
    Marker,
    Record,
    RecordState,
    StoredResponse,
    encode_headers,
)
from ..exceptions import LeaseLost, StoreError
from ..stores import async_store_from_url, store_from_url
from ..typing import Store
from ._fakes import BlockingStore, skewed_clock

__all__ = ["LONG_MS", "RawRecord", "StoreContract", "StoreSubject", "record_fields"]

_T = TypeVar("_T")

#: A lease or record TTL long enough never to run out during a test (milliseconds).
LONG_MS = 600_000


#: The raw fields of a record as a store keeps them (see :func:`record_fields`).
RawRecord = dict[str, Any]


def record_fields(record: Record) -> RawRecord:
    """The fields of a record in the form :attr:`StoreSubject.raw` returns them.

    Keys: ``state`` (str), ``fingerprint`` (str), ``token``,
    ``lease_expires_at``, ``created_at``, ``expires_at`` (int ms), ``status``
    (int or None), ``headers`` (the JSON text of
    :func:`~idempo._core.records.encode_headers`, or None), ``body`` (bytes or None).
    """
    response = record.response
    return {
        "state": record.state.value,
        "fingerprint": record.fingerprint,
        "token": record.token,
        "lease_expires_at": record.lease_expires_at_ms,
        "created_at": record.created_at_ms,
        "expires_at": record.expires_at_ms,
        "status": response.status if response else None,
        "headers": encode_headers(response.headers) if response else None,
        "body": response.body if response else None,
    }


@dataclass
class StoreSubject:
    """A store under test, and what the conformance suite needs to know about it.

    Attributes:
        store: the blocking front (wrap an async store in :class:`BlockingStore`).
        wait: lets ``seconds`` of the store's clock pass: advance a fake clock,
            or sleep for a store that reads its server's clock.
        short_ms: a lease/record TTL (ms) the suite waits out with ``wait``.
        server_clock: True when the store reads its server's clock (PostgreSQL,
            Redis); the clock-skew test applies only then.
        raw: reads the record physically present in the store, expired or
            not, as :func:`record_fields` would give it; None when absent.
            Tests that read the store directly skip without it.
        url: a store URL that another process can open (``store_from_url``);
            the multi-process test skips without it.
        async_front: open ``url`` with ``async_store_from_url`` in other processes.
    """

    store: Store | BlockingStore
    wait: Callable[[float], None]
    short_ms: int
    server_clock: bool
    raw: Callable[[str], RawRecord | None] | None = None
    url: str | None = None
    async_front: bool = False

    def pass_short(self) -> None:
        """Wait until a ``short_ms`` lease or TTL taken now has certainly expired."""
        self.wait(self.short_ms / 1000 * 1.5 + (0.05 if self.server_clock else 0.001))


# --- the multi-process begin ---------------------------------------------------------


def _begin_in_process(
    url: str, async_front: bool, record_key: str, fingerprint: str, lease_ttl_ms: int, start_at: float
) -> tuple[str, int]:
    """Open the store in this (child) process, wait for ``start_at``, call begin once.

    Returns ("acquired" | "existing", token).
    """

    def outcome(result: BeginResult) -> tuple[str, int]:
        if isinstance(result, Acquired):
            return "acquired", result.token
        return "existing", result.record.token

    if async_front:

        async def run() -> tuple[str, int]:
            store = async_store_from_url(url)
            try:
                await store.get("warm-up")  # connect before the start line
                await asyncio.sleep(max(0.0, start_at - time.time()))
                return outcome(await store.begin(record_key, fingerprint, lease_ttl_ms))
            finally:
                await store.aclose()

        return asyncio.run(run())
    store = store_from_url(url)
    try:
        store.get("warm-up")
        time.sleep(max(0.0, start_at - time.time()))
        return outcome(store.begin(record_key, fingerprint, lease_ttl_ms))
    finally:
        store.close()


def _warm_worker(seconds: float) -> None:
    """Import the store modules in a worker, then hold it busy so the pool starts the others."""
    for module in ("idempo.stores.postgres", "idempo.stores.redis", "idempo.stores.sqlite"):
        with contextlib.suppress(ImportError):
            __import__(module)
    time.sleep(seconds)


@functools.cache
def _process_pool() -> ProcessPoolExecutor:
    # Spawned (not forked) workers: the test process runs threads, and a fork
    # would copy its connection pools. Created once and reused across stores;
    # concurrent.futures shuts it down at exit.
    return ProcessPoolExecutor(4, mp_context=get_context("spawn"))


# --- the suite -------------------------------------------------------------------------


# The contract suite's own secret: record keys are HMACs, and the store never sees the secret.
_SECRET = b"idempo contract suite secret"


def _key() -> str:
    return make_record_key("contract", "POST", "/orders", str(uuid.uuid4()), secret=_SECRET)


def _response(body: bytes = b'{"order_id":1}') -> StoredResponse:
    headers = ((b"content-type", b"application/json"), (b"location", b"/orders/1"))
    return StoredResponse(201, headers, body)


def _raises_lease_lost(call: Callable[[], object]) -> None:
    try:
        call()
    except LeaseLost:
        return
    raise AssertionError("expected LeaseLost")


def _skip(reason: str) -> None:
    import pytest

    pytest.skip(reason)


def _method(store: Store | BlockingStore, name: str) -> Callable[[], Any] | None:
    """The store's method ``name`` (open, stats) as a blocking call, or None when the store has none.

    For a :class:`BlockingStore`, the async store's method, run on its loop.
    """
    if isinstance(store, BlockingStore):
        method = getattr(store.store, name, None)
        if method is None:
            return None
        return lambda: store.run(method())
    found: Callable[[], Any] | None = getattr(store, name, None)
    return found


def _close_store(store: Store | BlockingStore) -> None:
    """Close the store under test (an async one on its loop, which keeps running for the calls after)."""
    if isinstance(store, BlockingStore):
        store.run(store.store.aclose())
    else:
        store.close()


def _raises_store_error(call: Callable[[], object]) -> None:
    try:
        call()
    except StoreError:
        return
    raise AssertionError("expected StoreError")


class StoreContract:
    """The store conformance suite (DESIGN "Stores"; STYLE section 6).

    Subclass it in a test module (its name must start with ``Test``) and give
    it a ``subject`` fixture returning a :class:`StoreSubject`. Each test uses
    fresh record keys, so the store may be shared across tests.
    """

    # --- every transition ----------------------------------------------------------

    def test_begin_on_absent_key_acquires_the_lease(self, subject: StoreSubject) -> None:
        """begin on an absent key writes an in-progress record and returns Acquired (not a takeover)."""
        key = _key()
        result = subject.store.begin(key, "fp-1", LONG_MS)
        assert isinstance(result, Acquired), result
        assert result.takeover is False
        record = subject.store.get(key)
        assert record is not None
        assert record.state is RecordState.IN_PROGRESS
        assert record.fingerprint == "fp-1"
        assert record.token == result.token
        assert record.response is None
        assert record.lease_expires_at_ms == record.expires_at_ms
        assert record.lease_expires_at_ms - record.created_at_ms == LONG_MS

    def test_begin_on_live_record_returns_it_unchanged(self, subject: StoreSubject) -> None:
        """begin on a live in-progress record returns Existing with that record and writes nothing."""
        key = _key()
        first = subject.store.begin(key, "fp-1", LONG_MS)
        assert isinstance(first, Acquired)
        before = subject.store.get(key)
        second = subject.store.begin(key, "fp-2", 5 * LONG_MS)
        assert isinstance(second, Existing), second
        assert second.record == before
        assert second.record.fingerprint == "fp-1"
        assert before is not None
        assert before.created_at_ms <= second.now_ms < before.lease_expires_at_ms
        assert subject.store.get(key) == before

    def test_complete_stores_the_response_for_replay(self, subject: StoreSubject) -> None:
        """complete turns the record completed with the response; the next begin returns it."""
        key = _key()
        acquired = subject.store.begin(key, "fp-1", LONG_MS)
        assert isinstance(acquired, Acquired)
        subject.store.complete(key, acquired.token, _response(), LONG_MS)
        replay = subject.store.begin(key, "fp-1", LONG_MS)
        assert isinstance(replay, Existing), replay
        record = replay.record
        assert record.state is RecordState.COMPLETED
        assert record.response == _response()
        assert record.token == acquired.token
        assert record.lease_expires_at_ms == 0
        assert 0 < record.expires_at_ms - replay.now_ms <= LONG_MS
        assert subject.store.get(key) == record

    def test_release_removes_the_record(self, subject: StoreSubject) -> None:
        """release deletes the in-progress record, so the next begin acquires afresh."""
        key = _key()
        acquired = subject.store.begin(key, "fp-1", LONG_MS)
        assert isinstance(acquired, Acquired)
        subject.store.release(key, acquired.token)
        assert subject.store.get(key) is None
        again = subject.store.begin(key, "fp-2", LONG_MS)
        assert isinstance(again, Acquired)
        assert again.takeover is False
        assert again.token >= acquired.token

    def test_extend_moves_the_lease_expiry(self, subject: StoreSubject) -> None:
        """extend makes the lease last ``lease_ttl_ms`` from now, so it outlives its first TTL."""
        key = _key()
        acquired = subject.store.begin(key, "fp-1", subject.short_ms)
        assert isinstance(acquired, Acquired)
        subject.store.extend(key, acquired.token, LONG_MS)
        record = subject.store.get(key)
        assert record is not None
        assert record.state is RecordState.IN_PROGRESS
        assert record.lease_expires_at_ms == record.expires_at_ms
        assert record.lease_expires_at_ms - record.created_at_ms >= LONG_MS
        subject.pass_short()
        held = subject.store.begin(key, "fp-1", LONG_MS)
        assert isinstance(held, Existing)
        assert held.record.token == acquired.token

    def test_transitions_check_token_and_state(self, subject: StoreSubject) -> None:
        """complete/release/extend raise LeaseLost for a wrong token, an absent key or a completed record."""
        store = subject.store
        key = _key()
        acquired = store.begin(key, "fp-1", LONG_MS)
        assert isinstance(acquired, Acquired)
        wrong = acquired.token + 1
        _raises_lease_lost(lambda: store.complete(key, wrong, _response(), LONG_MS))
        _raises_lease_lost(lambda: store.release(key, wrong))
        _raises_lease_lost(lambda: store.extend(key, wrong, LONG_MS))
        absent = _key()
        _raises_lease_lost(lambda: store.complete(absent, acquired.token, _response(), LONG_MS))
        _raises_lease_lost(lambda: store.release(absent, acquired.token))
        _raises_lease_lost(lambda: store.extend(absent, acquired.token, LONG_MS))
        store.complete(key, acquired.token, _response(), LONG_MS)
        _raises_lease_lost(lambda: store.complete(key, acquired.token, _response(b"other"), LONG_MS))
        _raises_lease_lost(lambda: store.release(key, acquired.token))
        _raises_lease_lost(lambda: store.extend(key, acquired.token, LONG_MS))
        record = store.get(key)
        assert record is not None
        assert record.response == _response()

    # --- markers: held, not replayable (issue 10) ------------------------------------------

    def test_a_marker_round_trips_and_replays_as_itself(self, subject: StoreSubject) -> None:
        """A record completed with a marker (status 0) comes back as that marker: held, or not replayable."""
        store = subject.store
        for marker in (Marker(Marker.HELD, "takeover"), Marker(Marker.NOT_REPLAYABLE, "too_large", 201, 12_000_000)):
            key = _key()
            acquired = store.begin(key, "fp-1", LONG_MS)
            assert isinstance(acquired, Acquired)
            store.complete(key, acquired.token, marker.response(), LONG_MS)
            found = store.begin(key, "fp-1", LONG_MS)
            assert isinstance(found, Existing), found
            assert found.record.state is RecordState.COMPLETED
            assert found.record.marker == marker

    def test_a_live_marker_is_resolved_under_its_token_only(self, subject: StoreSubject) -> None:
        """complete/release act on a live marker holding the same token (how an operator resolves a held key);
        another token, a stored answer, or extend are refused with LeaseLost."""
        store = subject.store
        held = Marker(Marker.HELD, "takeover").response()
        key = _key()
        acquired = store.begin(key, "fp-1", LONG_MS)
        assert isinstance(acquired, Acquired)
        token = acquired.token
        store.complete(key, token, held, LONG_MS)
        _raises_lease_lost(lambda: store.complete(key, token + 1, _response(), LONG_MS))
        _raises_lease_lost(lambda: store.release(key, token + 1))
        _raises_lease_lost(lambda: store.extend(key, token, LONG_MS))
        store.complete(key, token, _response(), LONG_MS)
        record = store.get(key)
        assert record is not None
        assert record.response == _response()
        # A stored answer is never resolved away.
        _raises_lease_lost(lambda: store.complete(key, token, _response(b"other"), LONG_MS))
        _raises_lease_lost(lambda: store.release(key, token))
        released = _key()
        acquired = store.begin(released, "fp-1", LONG_MS)
        assert isinstance(acquired, Acquired)
        store.complete(released, acquired.token, held, LONG_MS)
        store.release(released, acquired.token)
        assert store.get(released) is None
        again = store.begin(released, "fp-2", LONG_MS)
        assert isinstance(again, Acquired)
        assert again.takeover is False

    def test_an_expired_marker_is_absent_and_not_resolved(self, subject: StoreSubject) -> None:
        """A marker past its TTL (hold_ttl) is absent: begin acquires afresh (no takeover), resolving it is refused."""
        store = subject.store
        key = _key()
        acquired = store.begin(key, "fp-1", LONG_MS)
        assert isinstance(acquired, Acquired)
        token = acquired.token
        store.complete(key, token, Marker(Marker.HELD, "takeover").response(), subject.short_ms)
        subject.pass_short()
        _raises_lease_lost(lambda: store.complete(key, token, _response(), LONG_MS))
        _raises_lease_lost(lambda: store.release(key, token))
        again = store.begin(key, "fp-1", LONG_MS)
        assert isinstance(again, Acquired)
        assert again.takeover is False

    # --- open, close and stats (the same on every store, blocking and async) ---------------

    def test_open_checks_once_and_the_store_serves(self, subject: StoreSubject) -> None:
        """open() (where the store has one) makes the start-up check; again, it does nothing; the store serves."""
        open_ = _method(subject.store, "open")
        if open_ is None:
            _skip("this store has no open()")
            return
        open_()
        open_()
        key = _key()
        acquired = subject.store.begin(key, "fp-1", LONG_MS)
        assert isinstance(acquired, Acquired)
        subject.store.complete(key, acquired.token, _response(), LONG_MS)
        record = subject.store.get(key)
        assert record is not None
        assert record.response == _response()

    def test_close_is_final_and_can_be_repeated(self, subject: StoreSubject) -> None:
        """After close() every call raises StoreError (Store.close: unusable afterwards); close() again does nothing."""
        store = subject.store
        key = _key()
        acquired = store.begin(key, "fp-1", LONG_MS)
        assert isinstance(acquired, Acquired)
        _close_store(store)
        _close_store(store)
        token = acquired.token
        _raises_store_error(lambda: store.begin(_key(), "fp-1", LONG_MS))
        _raises_store_error(lambda: store.get(key))
        _raises_store_error(lambda: store.complete(key, token, _response(), LONG_MS))
        _raises_store_error(lambda: store.release(key, token))
        _raises_store_error(lambda: store.extend(key, token, LONG_MS))
        _raises_store_error(lambda: store.purge_expired())
        for name in ("stats", "open"):
            method = _method(store, name)
            if method is not None:
                _raises_store_error(method)

    def test_stats_counts_live_and_expired_records(self, subject: StoreSubject) -> None:
        """stats() (SupportsStats; both fronts) counts live in-progress, live completed and expired records by
        the store's clock, and names the oldest live lease."""
        stats = _method(subject.store, "stats")
        if stats is None:
            _skip("this store has no stats()")
            return
        store = subject.store
        before = stats()
        held, done, lapsed = _key(), _key(), _key()
        first = store.begin(held, "fp-1", LONG_MS)
        assert isinstance(first, Acquired)
        second = store.begin(done, "fp-1", LONG_MS)
        assert isinstance(second, Acquired)
        store.complete(done, second.token, _response(), LONG_MS)
        third = store.begin(lapsed, "fp-1", subject.short_ms)
        assert isinstance(third, Acquired)
        subject.pass_short()
        after = stats()
        # Records of earlier tests may expire meanwhile: ours are counted, whatever else is there.
        assert after.in_progress >= 1
        assert after.completed >= 1
        assert after.expired >= 1
        ours = store.begin(held, "fp-1", LONG_MS)
        assert isinstance(ours, Existing)
        assert before.now_ms <= after.now_ms <= ours.now_ms
        oldest = after.oldest_lease
        assert oldest is not None
        assert oldest.state is RecordState.IN_PROGRESS
        assert oldest.created_at_ms <= ours.record.created_at_ms
        assert oldest.lease_expires_at_ms > after.now_ms

    # --- expiry, takeover, fencing -------------------------------------------------------

    def test_lease_takeover_after_expiry(self, subject: StoreSubject) -> None:
        """A begin after the lease expired takes the record over with a greater token (takeover=True)."""
        key = _key()
        first = subject.store.begin(key, "fp-1", subject.short_ms)
        assert isinstance(first, Acquired)
        subject.pass_short()
        second = subject.store.begin(key, "fp-2", LONG_MS)
        assert isinstance(second, Acquired), second
        assert second.takeover is True
        assert second.token > first.token
        record = subject.store.get(key)
        assert record is not None
        assert record.fingerprint == "fp-2"
        assert record.token == second.token

    def test_fencing_refuses_a_stale_complete(self, subject: StoreSubject) -> None:
        """After a takeover the old holder's complete/release/extend raise LeaseLost; the newer record stays."""
        store = subject.store
        key = _key()
        stale = store.begin(key, "fp-1", subject.short_ms)
        assert isinstance(stale, Acquired)
        subject.pass_short()
        fresh = store.begin(key, "fp-2", LONG_MS)
        assert isinstance(fresh, Acquired)
        assert fresh.token > stale.token
        _raises_lease_lost(lambda: store.complete(key, stale.token, _response(b"stale"), LONG_MS))
        _raises_lease_lost(lambda: store.release(key, stale.token))
        _raises_lease_lost(lambda: store.extend(key, stale.token, LONG_MS))
        record = store.get(key)
        assert record is not None
        assert (record.state, record.fingerprint, record.token) == (RecordState.IN_PROGRESS, "fp-2", fresh.token)
        store.complete(key, fresh.token, _response(b"fresh"), LONG_MS)
        done = store.get(key)
        assert done is not None
        assert done.response == _response(b"fresh")

    def test_ttl_expiry_and_purge(self, subject: StoreSubject) -> None:
        """Expired records read as absent, begin anew, and purge_expired deletes them in bounded batches."""
        store = subject.store
        completed, held, live = _key(), _key(), _key()
        for key, lease in ((completed, LONG_MS), (held, subject.short_ms), (live, LONG_MS)):
            result = store.begin(key, "fp-1", lease)
            assert isinstance(result, Acquired)
            if key == completed:
                store.complete(key, result.token, _response(), subject.short_ms)
            elif key == live:
                store.complete(key, result.token, _response(), LONG_MS)
        subject.pass_short()
        assert store.get(completed) is None
        assert store.get(held) is None
        assert store.get(live) is not None
        for _ in range(10_000):
            deleted = store.purge_expired(limit=1)
            assert deleted in (0, 1), "purge_expired exceeded its limit"
            if deleted == 0:
                break
        if subject.raw is not None:
            assert subject.raw(completed) is None
            # An in-progress record outlives its lease by the store's grace (24 h):
            # its holder may still save it under its token (the next test).
            assert subject.raw(held) is not None
            assert subject.raw(live) is not None
        again = store.begin(completed, "fp-other", LONG_MS)
        assert isinstance(again, Acquired)
        assert again.takeover is False
        assert store.get(live) is not None

    def test_expired_record_still_present_is_absent(self, subject: StoreSubject) -> None:
        """B16: a record past its TTL or lease, not yet deleted, is treated as absent and replaced."""
        store = subject.store
        completed, held = _key(), _key()
        first = store.begin(completed, "fp-1", LONG_MS)
        assert isinstance(first, Acquired)
        store.complete(completed, first.token, _response(), subject.short_ms)
        crashed = store.begin(held, "fp-1", subject.short_ms)
        assert isinstance(crashed, Acquired)
        subject.pass_short()
        if subject.raw is not None:
            # Redis deletes a completed record itself at expiry (PEXPIREAT); the
            # expired in-progress one is still there in every store.
            assert subject.raw(held) is not None, "the expired in-progress record should still be stored"
        # A different fingerprint is a new request, not a mismatch: the old record is gone.
        for key, old_token in ((completed, first.token), (held, crashed.token)):
            assert store.get(key) is None
            again = store.begin(key, "fp-2", LONG_MS)
            assert isinstance(again, Acquired), again
            assert again.token > old_token
            record = store.get(key)
            assert record is not None
            assert (record.state, record.fingerprint, record.response) == (RecordState.IN_PROGRESS, "fp-2", None)
            assert record.expires_at_ms - record.created_at_ms == LONG_MS

    def test_a_holder_saves_after_its_lease_when_nobody_took_over(self, subject: StoreSubject) -> None:
        """A holder's same-token extend and complete land after its lease expired, while nobody took over.

        So a process that holds its result through a store outage longer than
        its lease saves it once the store is back (DESIGN "HTTP behaviour", a
        failed save): ``purge_expired`` (and Redis key expiry, and the memory
        store's eviction) keeps an in-progress record for the store's grace
        past its lease, 24 h by default, so neither an operator's purge nor
        the key's expiry defeats the holder.
        """
        store = subject.store
        key = _key()
        acquired = store.begin(key, "fp-1", subject.short_ms)
        assert isinstance(acquired, Acquired)
        subject.pass_short()
        while store.purge_expired(limit=1000):
            pass
        if subject.raw is not None:
            assert subject.raw(key) is not None, "purge deleted an in-progress record within its grace"
        store.extend(key, acquired.token, LONG_MS)
        store.complete(key, acquired.token, _response(b"held through the outage"), LONG_MS)
        replay = store.begin(key, "fp-1", LONG_MS)
        assert isinstance(replay, Existing)
        assert replay.record.token == acquired.token
        assert replay.record.response == _response(b"held through the outage")

    def test_sweeper_between_steps(self, subject: StoreSubject) -> None:
        """B16: a sweeper running between two requests' steps leaves a truthful outcome.

        The expired in-progress record it finds is kept for the store's grace;
        a late begin takes it over, and neither older token completes it.
        """
        store = subject.store
        key = _key()
        crashed = store.begin(key, "fp-1", subject.short_ms)
        assert isinstance(crashed, Acquired)
        subject.pass_short()
        expired_seen = store.begin(key, "fp-1", subject.short_ms)  # a retry takes it over...
        assert isinstance(expired_seen, Acquired)
        assert expired_seen.takeover is True
        subject.pass_short()
        while store.purge_expired(limit=1000):  # ...and the sweeper deletes it behind the retry's back
            pass
        assert store.get(key) is None
        late = store.begin(key, "fp-1", LONG_MS)
        assert isinstance(late, Acquired), late
        assert late.token > expired_seen.token > crashed.token
        _raises_lease_lost(lambda: store.complete(key, crashed.token, _response(b"crashed"), LONG_MS))
        _raises_lease_lost(lambda: store.complete(key, expired_seen.token, _response(b"stale"), LONG_MS))
        store.complete(key, late.token, _response(b"late"), LONG_MS)
        replay = store.begin(key, "fp-1", LONG_MS)
        assert isinstance(replay, Existing)
        assert replay.record.response == _response(b"late")

    # --- scopes and payloads --------------------------------------------------------------

    def test_same_key_in_two_scopes_is_two_records(self, subject: StoreSubject) -> None:
        """One idempotency key under two principals is two independent records."""
        store = subject.store
        idempotency_key = str(uuid.uuid4())
        alice = make_record_key("alice", "POST", "/orders", idempotency_key, secret=_SECRET)
        bob = make_record_key("bob", "POST", "/orders", idempotency_key, secret=_SECRET)
        assert alice != bob
        a = store.begin(alice, "fp-a", LONG_MS)
        b = store.begin(bob, "fp-b", LONG_MS)
        assert isinstance(a, Acquired)
        assert isinstance(b, Acquired)
        store.complete(alice, a.token, _response(b"alice"), LONG_MS)
        bob_record = store.get(bob)
        assert bob_record is not None
        assert (bob_record.state, bob_record.fingerprint) == (RecordState.IN_PROGRESS, "fp-b")
        store.release(bob, b.token)
        alice_record = store.get(alice)
        assert alice_record is not None
        assert alice_record.response == _response(b"alice")
        assert store.get(bob) is None

    def test_large_binary_body_and_repeated_headers_round_trip(self, subject: StoreSubject) -> None:
        """A 5 MiB random body, every byte value, and repeated/latin-1 headers come back exactly."""
        store = subject.store
        headers = (
            (b"content-type", b"application/octet-stream"),
            (b"link", b'<a>; rel="x"'),
            (b"x-latin-1", bytes(range(0x80, 0x100))),
            (b"link", b'<b>; rel="y"'),
            (b"x-empty", b""),
        )
        for body in (os.urandom(5 * 1024 * 1024), bytes(range(256)) * 4, b""):
            key = _key()
            acquired = store.begin(key, "fp-1", LONG_MS)
            assert isinstance(acquired, Acquired)
            store.complete(key, acquired.token, StoredResponse(200, headers, body), LONG_MS)
            replay = store.begin(key, "fp-1", LONG_MS)
            assert isinstance(replay, Existing)
            response = replay.record.response
            assert response is not None
            assert response.body == body, "the body did not round-trip byte for byte"
            assert response.headers == headers
            assert response.status == 200

    # --- concurrency ----------------------------------------------------------------------

    def test_eight_threads_one_winner(self, subject: StoreSubject) -> None:
        """8 threads calling begin on one key at once: exactly one Acquired, the rest see its token."""
        key = _key()
        barrier = threading.Barrier(8)
        results: list[BeginResult | BaseException] = []
        lock = threading.Lock()

        def contend() -> None:
            barrier.wait()
            try:
                result: BeginResult | BaseException = subject.store.begin(key, "fp-1", LONG_MS)
            except BaseException as exc:
                result = exc
            with lock:
                results.append(result)

        threads = [threading.Thread(target=contend) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
        winners = [r for r in results if isinstance(r, Acquired)]
        assert len(results) == 8, results
        assert len(winners) == 1, results
        assert all(isinstance(r, Existing) and r.record.token == winners[0].token for r in results if r not in winners)

    def test_four_processes_one_winner(self, subject: StoreSubject) -> None:
        """4 processes calling begin on one key at once: exactly one Acquired."""
        if subject.url is None:
            _skip("this store lives in one process")
            return
        url = subject.url
        key = _key()
        pool = _process_pool()
        # Start all four workers and import the stores before the start line.
        list(pool.map(_warm_worker, [0.2] * 4))
        start_at = time.time() + 1.0
        futures: list[Future[tuple[str, int]]] = [
            pool.submit(_begin_in_process, url, subject.async_front, key, "fp-1", LONG_MS, start_at) for _ in range(4)
        ]
        outcomes = [future.result(timeout=120) for future in futures]
        assert sorted(kind for kind, _ in outcomes) == ["acquired", "existing", "existing", "existing"], outcomes
        assert len({token for _, token in outcomes}) == 1, outcomes

    # --- clocks and fidelity --------------------------------------------------------------

    def test_app_clock_skew_changes_nothing(self, subject: StoreSubject) -> None:
        """An application clock an hour off changes nothing: leases and TTLs use the server's clock."""
        if not subject.server_clock:
            _skip("not applicable: this store's clock is the injected one (the store's own clock), not the app's")
            return
        store = subject.store
        for skew in (-3600.0, 3600.0):
            key = _key()
            with skewed_clock(skew):
                acquired = store.begin(key, "fp-1", LONG_MS)
                assert isinstance(acquired, Acquired)
                held = store.begin(key, "fp-1", LONG_MS)
            assert isinstance(held, Existing)
            # The store's "now" is the server's: nowhere near the skewed clock.
            assert abs(held.now_ms - time.time() * 1000) < 600_000
            assert abs(held.record.created_at_ms - time.time() * 1000) < 600_000
            # A server with the right clock sees the lease as held, and completes it.
            again = store.begin(key, "fp-1", LONG_MS)
            assert isinstance(again, Existing)
            assert again.record.state is RecordState.IN_PROGRESS
            with skewed_clock(skew):
                store.complete(key, acquired.token, _response(), subject.short_ms)
            subject.pass_short()
            assert store.get(key) is None, "the record TTL must run by the server's clock"

    def test_raw_record_after_completion_keeps_every_field(self, subject: StoreSubject) -> None:
        """B10: the raw stored record keeps fingerprint, token, times, status, headers and body after complete."""
        if subject.raw is None:
            _skip("no raw reader for this store")
            return
        store = subject.store
        key = _key()
        acquired = store.begin(key, "fp-b10", LONG_MS)
        assert isinstance(acquired, Acquired)
        before = subject.raw(key)
        assert before is not None
        response = StoredResponse(201, ((b"content-type", b"application/json"), (b"location", b"/o/1")), b'{"a":1}')
        store.complete(key, acquired.token, response, LONG_MS)
        after = subject.raw(key)
        assert after is not None
        assert after["state"] == "completed"
        for field in ("fingerprint", "token", "created_at"):
            assert after[field] == before[field], field
        assert (before["status"], before["headers"], before["body"]) == (None, None, None)
        assert after["status"] == 201
        assert after["headers"] == encode_headers(response.headers)
        assert after["body"] == response.body
        assert after["lease_expires_at"] == 0
        assert after["expires_at"] > before["created_at"]
        assert after["expires_at"] - after["created_at"] >= LONG_MS
        replay = store.begin(key, "fp-b10", LONG_MS)
        assert isinstance(replay, Existing)
        assert replay.record.response == response
