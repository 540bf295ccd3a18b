"""Store helpers for adapter tests: a call-counting wrapper around a real store."""

from __future__ import annotations

from collections import Counter
from typing import Any

from idempo import AsyncStore


class CountingStore:
    """Wraps a real async store and counts each method's calls (a spy, not a fake)."""

    def __init__(self, inner: AsyncStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return await attribute(*args, **kwargs)

        return counted
