"""A clock tests can move by hand, shared by a store and the test."""

from __future__ import annotations

import threading
import time


class FakeClock:
    """Returns seconds since the epoch; starts at the real time and only moves by :meth:`advance`."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        with self._lock:
            self._now += seconds


def eventually(condition: object, timeout: float = 10.0) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` seconds pass; return its last value.

    For effects that follow an answer (background tasks, a server noticing a
    disconnect); the timeout is a bound on waiting, not an assertion on speed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = bool(condition())  # type: ignore[operator]
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)
