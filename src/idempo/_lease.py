"""Lease renewal: keep a running request's lease alive, so a slow handler is never run twice.

A lease expires ``lease_ttl`` after it was taken. A handler that outlives it
would let a retry take the record over and execute a second time. While the
handler runs, the lease is therefore extended every third of its TTL; when the
process dies, the renewals stop with it and the lease expires at most
``lease_ttl`` later (DESIGN guarantee 2).

Renewal costs next to nothing for requests faster than a third of the lease:
an async keeper is an entry in the registry of one renewal task per event
loop, a blocking keeper an entry in the heap of one shared thread; neither
touches the store unless the handler is still running when its renewal is due.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import os
import sys
import threading
import time
import weakref
from typing import Any

from ._engine import logger
from .exceptions import LeaseLost, StoreError
from .typing import AsyncStore, Store

__all__ = ["AsyncLeaseKeeper", "LeaseKeeper"]


# Seconds: how late a blocking renewal may run at most beyond its due time.
_GRANULARITY = 0.05


def _interval(lease_ttl_ms: int) -> float:
    """Seconds between renewals: a third of the lease, so two renewals may fail before it lapses."""
    return max(lease_ttl_ms / 3000, 0.001)


def _log_failure(record_key: str, exc: BaseException) -> None:
    if isinstance(exc, LeaseLost):
        logger.warning("idempo: lease renewal refused, the lease was taken over (record %s)", record_key)
    else:
        logger.error("idempo: lease renewal failed (record %s): %s; retrying", record_key, exc)


class _LoopRenewer:
    """One task per event loop that renews the leases of every async keeper on it.

    A timer per request would cost each request a timer start and cancel (a
    libuv timer under uvloop); here a request costs a dict insert and delete,
    and the task wakes every half interval of the shortest lease it serves.
    """

    # It holds no reference to its loop: the registry is keyed weakly by the
    # loop, and the task (which does hold it) ends once no keeper is left, so
    # a finished loop (asyncio.run per job) is not kept alive by idempo.

    def __init__(self) -> None:
        self.keepers: dict[AsyncLeaseKeeper, None] = {}
        self.tick = 1.0
        self.task: asyncio.Task[None] | None = None

    def add(self, keeper: AsyncLeaseKeeper, loop: asyncio.AbstractEventLoop) -> None:
        self.keepers[keeper] = None
        if keeper.interval / 2 < self.tick:
            self.tick = keeper.interval / 2
        if self.task is None:
            self.task = loop.create_task(self._run(), name="idempo-lease-renewer")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.keepers:
                await asyncio.sleep(self.tick)
                now = loop.time()
                due = [keeper for keeper in self.keepers if keeper.due <= now]
                if due:
                    # Concurrently: one slow store call must not delay every other lease.
                    await asyncio.gather(*(keeper.renew() for keeper in due))
        finally:
            self.task = None


_RENEWERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopRenewer] = weakref.WeakKeyDictionary()


class AsyncLeaseKeeper:
    """Extends a lease on an async store while the handler runs (asyncio; a no-op elsewhere).

    Args:
        store: the store holding the record.
        record_key: the record whose lease to keep.
        token: the lease's fencing token.
        lease_ttl_ms: the lease TTL in milliseconds; each renewal sets the
            expiry this far from the store's clock.

    Call :meth:`stop` when the handler has finished (in a ``finally``), or
    :meth:`cancel` on a crash path. On trio (Hypercorn's trio worker) each
    keeper renews from a trio system task of its own; outside any event loop
    nothing is renewed.
    """

    __slots__ = ("_args", "_renewer", "_renewing", "_stopped", "_trio", "due", "interval")

    def __init__(self, store: AsyncStore, record_key: str, token: int, lease_ttl_ms: int) -> None:
        self._args = (store, record_key, token, lease_ttl_ms)
        self._stopped = False
        self._renewing: asyncio.Future[None] | None = None
        self._trio: _TrioRenewal | None = None
        self.interval = _interval(lease_ttl_ms)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._renewer: _LoopRenewer | None = None
            self.due = 0.0
            self._trio = _TrioRenewal.start(self)
            return
        renewer = _RENEWERS.get(loop)
        if renewer is None:
            renewer = _RENEWERS[loop] = _LoopRenewer()
        self._renewer = renewer
        self.due = loop.time() + self.interval
        renewer.add(self, loop)

    async def renew(self) -> None:
        """Extend the lease once (called by the loop's renewer when due)."""
        if self._stopped:
            return
        store, record_key, token, lease_ttl_ms = self._args
        loop = asyncio.get_running_loop()
        self._renewing = loop.create_future()
        try:
            await store.extend(record_key, token, lease_ttl_ms)
        except LeaseLost as exc:
            if not self._stopped:  # a renewal racing the final complete is expected
                _log_failure(record_key, exc)
            self.cancel()
            return
        except Exception as exc:  # a store failure, or a third-party store's own error: retry next time
            _log_failure(record_key, exc)
        finally:
            self._renewing.set_result(None)
            self._renewing = None
        self.due = loop.time() + self.interval

    async def stop(self) -> None:
        """Stop renewing; waits for a renewal in flight, so it never lands after the record settles."""
        self.cancel()
        renewing = self._renewing
        if renewing is not None:
            await asyncio.shield(renewing)
        if self._trio is not None:
            await self._trio.stopped()

    def cancel(self) -> None:
        """Stop renewing without waiting (a crash path: the lease is left to expire)."""
        self._stopped = True
        renewer = self._renewer
        if renewer is not None:
            renewer.keepers.pop(self, None)
        if self._trio is not None:
            self._trio.cancel()


class _TrioRenewal:
    """One keeper's renewals on trio: a system task that sleeps an interval and extends, until stopped.

    A system task, because the keeper outlives no nursery of the request's
    (the handler runs inside the middleware's own call). A task per request
    is dearer than asyncio's shared renewer, and trio servers are few.
    """

    __slots__ = ("_done", "_keeper", "_renewing", "_scope", "_trio")

    def __init__(self, trio: Any, keeper: AsyncLeaseKeeper) -> None:
        self._trio = trio
        self._keeper = keeper
        self._scope = trio.CancelScope()
        self._renewing = False
        self._done = trio.Event()

    @classmethod
    def start(cls, keeper: AsyncLeaseKeeper) -> _TrioRenewal | None:
        """Start renewing ``keeper``'s lease when the caller runs under trio; else None."""
        trio = sys.modules.get("trio")  # imported by whoever runs trio; never imported here
        if trio is None:
            return None
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:  # trio is imported but this is not its thread
            return None
        renewal = cls(trio, keeper)
        # A system task starts from an empty context; the request's own keeps
        # its log records' context.
        trio.lowlevel.spawn_system_task(renewal._run, name="idempo-lease-renewer", context=contextvars.copy_context())
        return renewal

    async def _run(self) -> None:
        keeper = self._keeper
        store, record_key, token, lease_ttl_ms = keeper._args
        try:
            with self._scope:
                while not keeper._stopped:
                    await self._trio.sleep(keeper.interval)
                    if keeper._stopped:
                        break
                    self._renewing = True
                    try:
                        # Shielded: a stop() waits for this call rather than
                        # cancel it halfway through the store's transition;
                        # bounded by the lease, which is lost by then anyway,
                        # so a hung store cannot hold up the trio run's end.
                        deadline = self._trio.current_time() + lease_ttl_ms / 1000
                        with self._trio.CancelScope(shield=True, deadline=deadline):
                            await store.extend(record_key, token, lease_ttl_ms)
                    except LeaseLost as exc:
                        if not keeper._stopped:  # a renewal racing the final complete is expected
                            _log_failure(record_key, exc)
                        return
                    except Exception as exc:  # an exception in a system task would end the whole trio run
                        _log_failure(record_key, exc)
                    finally:
                        self._renewing = False
        finally:
            self._done.set()

    def cancel(self) -> None:
        """Stop the task: at once while it sleeps; after the store call while it renews."""
        if not self._renewing:
            self._scope.cancel()

    async def stopped(self) -> None:
        """Wait until the task has ended (a renewal in flight has landed)."""
        await self._done.wait()


class _Scheduler:
    """One daemon thread that renews the leases of every blocking keeper, earliest first."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, LeaseKeeper]] = []
        self._counter = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, keeper: LeaseKeeper, due: float) -> None:
        with self._wake:
            heapq.heappush(self._heap, (due, next(self._counter), keeper))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="idempo-lease-keeper", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is keeper:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    # Renewals need no precision finer than this; waking for
                    # every finished request's entry would cost CPU under load.
                    self._wake.wait(None if timeout is None else max(timeout, _GRANULARITY))
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
            for keeper in due:
                try:
                    again = keeper.renew()
                except Exception as exc:  # a third-party store's own error must not kill the thread
                    _log_failure(keeper._args[1], exc)
                    again = True
                if again:
                    self.add(keeper, time.monotonic() + keeper.interval)


_SCHEDULER = _Scheduler()
# A forked child (gunicorn --preload) inherits the scheduler but not its thread.
os.register_at_fork(after_in_child=lambda: _Scheduler.__init__(_SCHEDULER))


class LeaseKeeper:
    """Extends a lease on a blocking store while the handler runs.

    Args: as :class:`AsyncLeaseKeeper`. Renewals run on one shared daemon
    thread, so the store must be usable from another thread (idempo's are).
    Call :meth:`stop` when the handler has finished.
    """

    __slots__ = ("_args", "_lock", "_stopped", "interval")

    def __init__(self, store: Store, record_key: str, token: int, lease_ttl_ms: int) -> None:
        self._args: tuple[Any, ...] = (store, record_key, token, lease_ttl_ms)
        self._lock = threading.Lock()
        self._stopped = False
        self.interval = _interval(lease_ttl_ms)
        _SCHEDULER.add(self, time.monotonic() + self.interval)

    def renew(self) -> bool:
        """Extend the lease once; return whether to keep renewing."""
        store, record_key, token, lease_ttl_ms = self._args
        with self._lock:
            if self._stopped:
                return False
            try:
                store.extend(record_key, token, lease_ttl_ms)
            except LeaseLost as exc:
                _log_failure(record_key, exc)
                return False
            except StoreError as exc:
                _log_failure(record_key, exc)
            return True

    def stop(self) -> None:
        """Stop renewing; waits for a renewal in flight, so it never lands after the record settles."""
        with self._lock:
            self._stopped = True
