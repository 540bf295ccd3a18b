"""Public protocols for idempo's pluggable parts: stores, clocks, principal resolvers.

A store implements the transitions of the record state machine, each one
atomic in the store (DESIGN "The state machine")::

    absent      --begin-------------------> in_progress(token)
    in_progress --complete(token)---------> completed(response)
    in_progress --release(token)----------> absent
    in_progress --extend(token)-----------> in_progress (later lease expiry)
    in_progress --lease expired, begin----> in_progress(newer token)
    completed   --record TTL passed-------> absent (purged later)

Times inside a store are integer milliseconds from the store's own clock.
``idempo.testing`` ships the conformance suite a third-party store can run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ._core.records import BeginResult, Record, StoreStats, StoredResponse

__all__ = ["AsyncStore", "Clock", "Store", "SupportsStats"]

#: A clock: returns seconds since the Unix epoch as a float (``time.time``).
Clock = Callable[[], float]


@runtime_checkable
class Store(Protocol):
    """A blocking store (WSGI, Django, sync functions)."""

    def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """Take the lease on ``record_key``, or return the live record there.

        Atomically: when no live record exists (absent, completed past its TTL,
        or in progress past its lease), write an in-progress record with a new
        fencing token and return :class:`~idempo.Acquired`; otherwise
        return :class:`~idempo.Existing` with the record unchanged.

        Args:
            record_key: the record key (from the scope and idempotency key).
            fingerprint: the request's fingerprint, stored with the record.
            lease_ttl_ms: milliseconds until the lease expires.

        Raises:
            StoreUnavailable: the store could not be reached.
            StoreError: any other failure of the store.
        """
        ...

    def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """Store the response and mark the record completed, if ``token`` still holds the lease.

        Also replaces a live :class:`~idempo.Marker` record (completed with
        status 0: held, or not replayable) under the same token: how an
        operator resolves a held key (``idempo resolve``). A real stored
        answer is never replaced.

        Raises:
            LeaseLost: the record holds another token (taken over) or is gone.
            StoreError: the store failed.
        """
        ...

    def release(self, record_key: str, token: int) -> None:
        """Remove the in-progress record, if ``token`` still holds the lease.

        Also removes a live :class:`~idempo.Marker` record under the same
        token, as :meth:`complete` replaces one.

        Raises:
            LeaseLost: the record holds another token or is gone.
            StoreError: the store failed.
        """
        ...

    def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """Set the lease to expire ``lease_ttl_ms`` from now, if ``token`` holds it.

        Used to renew the lease of a running request (and while a failed save is retried).

        Raises:
            LeaseLost: the record holds another token or is gone.
            StoreError: the store failed.
        """
        ...

    def get(self, record_key: str) -> Record | None:
        """Return the live record, or None when it is absent or expired."""
        ...

    def purge_expired(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records; return how many were deleted."""
        ...

    def close(self) -> None:
        """Release connections. The store is unusable afterwards."""
        ...


@runtime_checkable
class SupportsStats(Protocol):
    """A blocking store that can count its records (optional; used by ``idempo stats`` and ``idempo purge``).

    The memory, SQLite, PostgreSQL and Redis stores implement it. It reads
    every record (SQL: one scan; Redis: ``SCAN`` over the store's prefix on
    every master), so it is for maintenance, never for the request path.
    """

    def stats(self) -> StoreStats:
        """Count live in-progress, live completed and expired records; find the oldest lease.

        Raises:
            StoreUnavailable: the store could not be reached.
            StoreError: any other failure of the store.
        """
        ...


@runtime_checkable
class AsyncStore(Protocol):
    """An asyncio store (ASGI, async functions); the same contract as :class:`Store`."""

    async def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`Store.begin`."""
        ...

    async def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`Store.complete`."""
        ...

    async def release(self, record_key: str, token: int) -> None:
        """See :meth:`Store.release`."""
        ...

    async def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`Store.extend`."""
        ...

    async def get(self, record_key: str) -> Record | None:
        """See :meth:`Store.get`."""
        ...

    async def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`Store.purge_expired`."""
        ...

    async def aclose(self) -> None:
        """See :meth:`Store.close`."""
        ...
