"""Store helpers for adapter tests: a call-counting wrapper around a real store, a held SQLite write lock."""

from __future__ import annotations

import inspect
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class CountingStore:
    """Wraps a real store, sync or async, and counts each method's calls (a spy, not a fake)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute
        if inspect.iscoroutinefunction(attribute):

            async def counted_async(*args: Any, **kwargs: Any) -> Any:
                self.calls[name] += 1
                return await attribute(*args, **kwargs)

            return counted_async

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attribute(*args, **kwargs)

        return counted


@contextmanager
def write_locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock on the store file from another connection: a real outage for writers."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
