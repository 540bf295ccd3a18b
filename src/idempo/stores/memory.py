"""The in-memory store: reference semantics for every other store.

For tests and single-process apps. Records live in a dict guarded by a lock,
so each transition is atomic across threads; nothing survives the process.
It passes the same conformance suite as the production stores.

Bounded memory: the store evicts expired records itself. Each record's
eviction time sits in a min-heap; every write (``begin``, ``complete``,
``release``, ``extend``) then evicts at most :data:`SWEEP_PER_CALL` records
whose time has come, so the cost per call is bounded (O(log n) each) and,
since a write adds at most one heap entry, eviction keeps up with any load.
A completed record is evicted at its expiry; an in-progress one ``grace``
seconds after its lease (as Redis keeps it; default 24 h,
:data:`~idempo.stores._base.IN_PROGRESS_GRACE`), so a takeover still sees the
crashed holder, and a process still holding a result whose save failed saves
it under its own token once it can. An idle store evicts nothing until its next write, or
:meth:`MemoryStore.purge_expired`.

``max_records`` bounds the count: a ``begin`` of a new key in a full store
first evicts the oldest completed record (by completion), never an
in-progress one nor a marker (a hold, a not-replayable answer), which stay to
their expiry. An evicted record's key executes again on its next request, as
after its TTL: size ``max_records`` above the records a TTL's traffic leaves.
A full store with no completed record gives the new key the place of an
in-progress record whose lease ended (its holder crashed); one full of live
leases and markers refuses it with
:class:`~idempo.exceptions.StoreUnavailable` (the fronts answer 503 with
Retry-After) until one settles or its lease ends.

Open and close: as every store (``idempo.stores._base``): ``open()`` has
nothing to check; ``close()`` drops every record, and any later call raises
:class:`~idempo.exceptions.StoreError`. :class:`AsyncMemoryStore` is the same
store behind ``async def`` calls, each completing without awaiting.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import OrderedDict
from datetime import timedelta

from .._core.records import (
    MARKER_STATUS,
    RESERVED_PREFIX,
    Acquired,
    BeginResult,
    Existing,
    Headers,
    Record,
    RecordState,
    StoreStats,
    StoredResponse,
    next_token,
)
from ..exceptions import ConfigurationError, LeaseLost, StoreUnavailable
from ..typing import Clock
from ._base import IN_PROGRESS_GRACE, closed

__all__ = ["SWEEP_PER_CALL", "AsyncMemoryStore", "MemoryStore"]

#: Most expired records one write evicts. A request makes two writes and
#: adds two heap entries, so eviction outpaces any backlog fourfold, at a few
#: microseconds per eviction (bench/memory_store.py).
SWEEP_PER_CALL = 4


# A record as the store keeps it: (state, fingerprint, token, lease_expires_at_ms,
# created_at_ms, expires_at_ms, status, headers, body), atomic values only, so
# the cyclic garbage collector untracks it. Holding Record objects instead would
# put every record on the collector's list and make each full collection walk
# them all: with many records that cost more than the records themselves.
_Row = tuple[str, str, int, int, int, int, "int | None", "Headers | None", "bytes | None"]
_REPLAYS_MAX = 1024
_IN_PROGRESS = RecordState.IN_PROGRESS.value
_COMPLETED = RecordState.COMPLETED.value


class _Closed:
    """Stands in for a closed store's lock: every call takes the lock, so every call raises."""

    def __enter__(self) -> None:
        raise closed("memory://")

    def __exit__(self, *exc_info: object) -> None:
        return None


# Keys a full store looks at, oldest first, for an in-progress record whose
# lease ended: a bounded cost per begin, however many records are held.
_ROOM_SCAN = 64


def _record(record_key: str, row: _Row) -> Record:
    state, fingerprint, token, lease_expires_at_ms, created_at_ms, expires_at_ms, status, headers, body = row
    response = None
    if state == _COMPLETED:
        assert status is not None
        assert headers is not None
        assert body is not None
        response = StoredResponse(status, headers, body)
    return Record(
        record_key, RecordState(state), fingerprint, token, lease_expires_at_ms, created_at_ms, expires_at_ms, response
    )


class MemoryStore:
    """A store in a dict. Thread-safe; one process only.

    Args:
        clock: returns seconds since the epoch (default ``time.time``); inject a
            fake clock to test expiry.
        max_records: the most records the store holds (None: no bound but
            expiry); see the module docstring for what is evicted when full.
        grace: seconds (or a timedelta) an in-progress record outlives its
            lease before it is evicted or purged (default 86400, 24 h, as
            every store: :data:`~idempo.stores._base.IN_PROGRESS_GRACE`).

    Raises:
        ConfigurationError: ``max_records`` < 1 or ``grace`` < 0.
    """

    def __init__(
        self,
        *,
        clock: Clock = time.time,
        max_records: int | None = None,
        grace: float | timedelta = IN_PROGRESS_GRACE,
    ) -> None:
        if max_records is not None and max_records < 1:
            raise ConfigurationError(f"max_records must be at least 1, got {max_records!r}")
        grace_s = grace.total_seconds() if isinstance(grace, timedelta) else float(grace)
        if not grace_s >= 0:
            raise ConfigurationError(f"grace must be a number of seconds >= 0, got {grace!r}")
        self._clock = clock
        self.max_records = max_records
        self._grace_ms = int(grace_s * 1000)
        self._records: dict[str, _Row] = {}
        # (eviction time ms, record key): a row is evicted when the first entry
        # naming it with its current eviction time comes due; older entries
        # for a row that changed since are skipped.
        self._evictions: list[tuple[int, str]] = []
        # Completed record keys, oldest completion first (for max_records).
        self._completed: OrderedDict[str, None] = OrderedDict()
        # Completed records already built for a replay (immutable until their
        # row is replaced, which drops them here); bounded, so few objects stay
        # on the garbage collector's list.
        self._replays: dict[str, Record] = {}
        self._lock: threading.Lock | _Closed = threading.Lock()

    def open(self) -> None:
        """Nothing to check (see the module docstring); kept for the one open/close rule of every store.

        Raises:
            StoreError: the store was closed.
        """
        with self._lock:
            return

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        with self._lock:
            now = int(self._clock() * 1000)
            old = self._records.get(record_key)
            if old is not None and old[5] > now:
                record = self._replays.get(record_key)
                if record is None:
                    record = _record(record_key, old)
                    if old[0] == _COMPLETED:
                        if len(self._replays) >= _REPLAYS_MAX:
                            self._replays.clear()
                        self._replays[record_key] = record
                return Existing(record, now)
            if old is None:
                if self.max_records is not None and len(self._records) >= self.max_records:
                    self._make_room(now)
                token = next_token(0, now)
                takeover = False
            else:
                token = next_token(old[2], now)
                takeover = old[0] == _IN_PROGRESS
                # Only a key the store holds is in these two (every eviction drops it from all three).
                self._replays.pop(record_key, None)
                self._completed.pop(record_key, None)
            expires = now + lease_ttl_ms
            self._records[record_key] = (_IN_PROGRESS, fingerprint, token, expires, now, expires, None, None, None)
            heap = self._evictions
            heapq.heappush(heap, (expires + self._grace_ms, record_key))
            if heap[0][0] <= now:
                self._sweep(now)
            return Acquired(token, takeover)

    def _eviction_ms(self, row: _Row) -> int:
        return row[5] + (self._grace_ms if row[0] == _IN_PROGRESS else 0)

    def _schedule(self, record_key: str, at_ms: int) -> None:
        heapq.heappush(self._evictions, (at_ms, record_key))

    def _evict(self, record_key: str) -> None:
        del self._records[record_key]
        self._replays.pop(record_key, None)
        self._completed.pop(record_key, None)

    def _sweep(self, now: int) -> None:
        """Evict at most SWEEP_PER_CALL records whose eviction time has come (under the lock)."""
        heap = self._evictions
        for _ in range(SWEEP_PER_CALL):
            if not heap or heap[0][0] > now:
                return
            at_ms, record_key = heapq.heappop(heap)
            row = self._records.get(record_key)
            if row is not None and self._eviction_ms(row) == at_ms:
                self._evict(record_key)

    def _make_room(self, now: int) -> None:
        """Free one place for a new key in a full store (under the lock).

        The oldest completed record; else an in-progress record whose lease
        has ended, among the :data:`_ROOM_SCAN` oldest keys: its holder
        crashed (a memory store never fails a save, so no live process still
        holds its result), and it would otherwise wait for its ``grace``.

        Raises:
            StoreUnavailable: every record is in progress under a live lease, or held.
        """
        if self._completed:
            self._evict(next(iter(self._completed)))
            return
        for record_key, row in itertools.islice(self._records.items(), _ROOM_SCAN):
            if row[0] == _IN_PROGRESS and row[3] <= now:
                self._evict(record_key)
                return
        raise StoreUnavailable(
            f"the memory store is full: its max_records={self.max_records} records are all in progress or held"
        )

    def _held(self, record_key: str, token: int, *, marker: bool = False) -> _Row:
        """The row ``token`` holds: in progress, or (``marker``) a live marker under that token."""
        row = self._records.get(record_key)
        if row is None or row[2] != token:
            raise LeaseLost()
        if row[0] != _IN_PROGRESS and not (marker and row[6] == MARKER_STATUS and row[5] > self._now_ms()):
            raise LeaseLost()
        return row

    def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        with self._lock:
            old = self._held(record_key, token, marker=True)
            now = int(self._clock() * 1000)
            expires = now + record_ttl_ms
            self._replays.pop(record_key, None)
            if response.status == MARKER_STATUS:
                # A hold or a not-replayable answer stands for an outcome
                # that must not run again: kept to its expiry, as a lease is.
                self._completed.pop(record_key, None)
            else:
                self._completed[record_key] = None
            heap = self._evictions
            heapq.heappush(heap, (expires, record_key))
            self._records[record_key] = (
                _COMPLETED,
                old[1],
                token,
                0,
                old[4],
                expires,
                response.status,
                response.headers,
                response.body,
            )
            if heap[0][0] <= now:
                self._sweep(now)

    def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        with self._lock:
            self._held(record_key, token, marker=True)
            self._evict(record_key)
            self._sweep(self._now_ms())

    def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        with self._lock:
            old = self._held(record_key, token)
            now = self._now_ms()
            expires = now + lease_ttl_ms
            self._replays.pop(record_key, None)
            self._records[record_key] = (old[0], old[1], token, expires, old[4], expires, None, None, None)
            self._schedule(record_key, expires + self._grace_ms)
            self._sweep(now)

    def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        with self._lock:
            row = self._records.get(record_key)
            return _record(record_key, row) if row is not None and row[5] > self._now_ms() else None

    def _raw(self, record_key: str) -> Record | None:
        """The record as stored, expired or not (for tests that read the store directly)."""
        with self._lock:
            row = self._records.get(record_key)
            return None if row is None else _record(record_key, row)

    def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`idempo.typing.Store.purge_expired`."""
        with self._lock:
            now = self._now_ms()
            # An in-progress record is kept for its grace, as eviction keeps it.
            expired = [k for k, r in self._records.items() if self._eviction_ms(r) <= now][:limit]
            for key in expired:
                self._evict(key)
            return len(expired)

    def stats(self) -> StoreStats:
        """See :meth:`idempo.typing.SupportsStats.stats`."""
        with self._lock:
            now = self._now_ms()
            in_progress = completed = expired = 0
            oldest: tuple[str, _Row] | None = None
            for record_key, row in self._records.items():
                if record_key.startswith(RESERVED_PREFIX):
                    continue  # idempo's own (its generated secret, the legacy window), not a request's record
                if row[5] <= now:
                    expired += 1
                elif row[0] == _IN_PROGRESS:
                    in_progress += 1
                    if oldest is None or row[4] < oldest[1][4]:
                        oldest = (record_key, row)
                else:
                    completed += 1
            oldest_record = None if oldest is None else _record(*oldest)
            return StoreStats(now, in_progress, completed, expired, oldest_record)

    def close(self) -> None:
        """Drop every record; any later call raises StoreError. Calling it again does nothing."""
        lock = self._lock
        if isinstance(lock, _Closed):
            return
        with lock:
            self._records.clear()
            self._replays.clear()
            self._evictions.clear()
            self._completed.clear()
            self._lock = _Closed()

    def __len__(self) -> int:
        """How many records (live or expired, not yet purged) the store holds."""
        return len(self._records)


class AsyncMemoryStore:
    """The async twin of :class:`MemoryStore`; shares its records when given one.

    Every call completes without awaiting: the lock is held for a dict
    operation only, so it never blocks the event loop for long.

    Args:
        store: the :class:`MemoryStore` to front; a new one when omitted.
        clock: the clock of the new store (ignored when ``store`` is given).
        max_records: the new store's bound (see :class:`MemoryStore`).
        grace: the new store's grace (see :class:`MemoryStore`).
    """

    def __init__(
        self,
        store: MemoryStore | None = None,
        *,
        clock: Clock = time.time,
        max_records: int | None = None,
        grace: float | timedelta = IN_PROGRESS_GRACE,
    ) -> None:
        self.sync = store if store is not None else MemoryStore(clock=clock, max_records=max_records, grace=grace)

    async def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        return self.sync.begin(record_key, fingerprint, lease_ttl_ms)

    async def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        self.sync.complete(record_key, token, response, record_ttl_ms)

    async def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        self.sync.release(record_key, token)

    async def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        self.sync.extend(record_key, token, lease_ttl_ms)

    async def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        return self.sync.get(record_key)

    async def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`idempo.typing.Store.purge_expired`."""
        return self.sync.purge_expired(limit)

    async def stats(self) -> StoreStats:
        """See :meth:`idempo.typing.SupportsStats.stats`."""
        return self.sync.stats()

    async def open(self) -> None:
        """See :meth:`MemoryStore.open`."""
        self.sync.open()

    async def aclose(self) -> None:
        """See :meth:`MemoryStore.close`."""
        self.sync.close()
