"""The in-memory store: reference semantics for every other store.

For tests and single-process apps. Records live in a dict guarded by a lock,
so each transition is atomic across threads; nothing survives the process.
It passes the same conformance suite as the production stores.
"""

from __future__ import annotations

import threading
import time

from .._core.records import Acquired, BeginResult, Existing, Record, RecordState, StoreStats, StoredResponse, next_token
from ..exceptions import LeaseLost
from ..typing import Clock

__all__ = ["AsyncMemoryStore", "MemoryStore"]


class MemoryStore:
    """A store in a dict. Thread-safe; one process only.

    Args:
        clock: returns seconds since the epoch (default ``time.time``); inject a
            fake clock to test expiry.
    """

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        with self._lock:
            now = self._now_ms()
            old = self._records.get(record_key)
            if old is not None and old.expires_at_ms > now:
                return Existing(old, now)
            token = next_token(old.token if old is not None else 0, now)
            expires = now + lease_ttl_ms
            self._records[record_key] = Record(
                record_key, RecordState.IN_PROGRESS, fingerprint, token, expires, now, expires
            )
            return Acquired(token, takeover=old is not None and old.state is RecordState.IN_PROGRESS)

    def _held(self, record_key: str, token: int) -> Record:
        record = self._records.get(record_key)
        if record is None or record.token != token or record.state is not RecordState.IN_PROGRESS:
            raise LeaseLost()
        return record

    def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        with self._lock:
            old = self._held(record_key, token)
            now = self._now_ms()
            self._records[record_key] = Record(
                record_key,
                RecordState.COMPLETED,
                old.fingerprint,
                token,
                0,
                old.created_at_ms,
                now + record_ttl_ms,
                response,
            )

    def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        with self._lock:
            self._held(record_key, token)
            del self._records[record_key]

    def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        with self._lock:
            old = self._held(record_key, token)
            expires = self._now_ms() + lease_ttl_ms
            self._records[record_key] = Record(
                record_key, old.state, old.fingerprint, token, expires, old.created_at_ms, expires
            )

    def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        with self._lock:
            record = self._records.get(record_key)
            return record if record is not None and record.expires_at_ms > self._now_ms() else None

    def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`idempo.typing.Store.purge_expired`."""
        with self._lock:
            now = self._now_ms()
            expired = [k for k, r in self._records.items() if r.expires_at_ms <= now][:limit]
            for key in expired:
                del self._records[key]
            return len(expired)

    def stats(self) -> StoreStats:
        """See :meth:`idempo.typing.SupportsStats.stats`."""
        with self._lock:
            now = self._now_ms()
            in_progress = completed = expired = 0
            oldest: Record | None = None
            for record in self._records.values():
                if record.expires_at_ms <= now:
                    expired += 1
                elif record.state is RecordState.IN_PROGRESS:
                    in_progress += 1
                    if oldest is None or record.created_at_ms < oldest.created_at_ms:
                        oldest = record
                else:
                    completed += 1
            return StoreStats(now, in_progress, completed, expired, oldest)

    def close(self) -> None:
        """Drop every record."""
        with self._lock:
            self._records.clear()

    def __len__(self) -> int:
        """How many records (live or expired, not yet purged) the store holds."""
        return len(self._records)


class AsyncMemoryStore:
    """The async front of :class:`MemoryStore`; shares its records when given one.

    Every call completes without awaiting: the lock is held for a dict
    operation only, so it never blocks the event loop for long.

    Args:
        store: the :class:`MemoryStore` to front; a new one when omitted.
        clock: the clock of the new store (ignored when ``store`` is given).
    """

    def __init__(self, store: MemoryStore | None = None, *, clock: Clock = time.time) -> None:
        self.sync = store if store is not None else MemoryStore(clock=clock)

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

    async def aclose(self) -> None:
        """See :meth:`MemoryStore.close`."""
        self.sync.close()
