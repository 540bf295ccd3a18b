"""Fakes for tests: a clock to move by hand, a skewed process clock, an async store driven from blocking code."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from .._core.records import BeginResult, Record, StoredResponse
from ..typing import AsyncStore

__all__ = ["BlockingStore", "FakeClock", "skewed_clock"]

_T = TypeVar("_T")


class FakeClock:
    """A clock for tests: calling it returns the time; :meth:`advance` moves it.

    Args:
        start: seconds since the epoch to start at (default: the real time now).
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """Seconds since the epoch, as ``time.time``."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        with self._lock:
            self.now += seconds


@contextlib.contextmanager
def skewed_clock(seconds: float) -> Iterator[None]:
    """Shift this process's ``time.time`` / ``time.time_ns`` by ``seconds`` while inside.

    Simulates an application server whose clock is wrong; a store that keeps
    time by its server's clock must not notice.
    """
    real_time, real_time_ns = time.time, time.time_ns
    time.time = lambda: real_time() + seconds
    time.time_ns = lambda: real_time_ns() + int(seconds * 1e9)
    try:
        yield
    finally:
        time.time, time.time_ns = real_time, real_time_ns


class BlockingStore:
    """Run an :class:`~idempo.typing.AsyncStore` from blocking code.

    Its calls run on a private event loop in a thread, so the conformance
    suite (and a thread pool) can drive an async store. Calls from many
    threads at once run as concurrent tasks on that loop.

    Args:
        factory: builds the async store; called on the loop, so the store's
            pools bind to it.
    """

    def __init__(self, factory: Callable[[], AsyncStore]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="idempo-blocking-store", daemon=True)
        self._thread.start()

        async def build() -> AsyncStore:
            return factory()

        self.store: AsyncStore = self.run(build())

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` (a call of the async store) on the store's loop; return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        return self.run(self.store.begin(record_key, fingerprint, lease_ttl_ms))

    def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        self.run(self.store.complete(record_key, token, response, record_ttl_ms))

    def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        self.run(self.store.release(record_key, token))

    def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        self.run(self.store.extend(record_key, token, lease_ttl_ms))

    def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        return self.run(self.store.get(record_key))

    def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`idempo.typing.Store.purge_expired`."""
        return self.run(self.store.purge_expired(limit))

    def close(self) -> None:
        """Close the async store, then stop the loop. Calling it again does nothing."""
        if self._loop.is_closed():
            return
        try:
            self.run(self.store.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()
