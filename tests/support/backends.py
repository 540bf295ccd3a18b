"""The stores the decorator and consumer tests run against: one factory per store, one line each.

Each factory returns a :class:`Backend`: how to build sync and async stores
over the same records, and the clock they read. Add a store by adding a line
to :data:`STORES`. The server stores are guarded with ``pytest.importorskip``
(their extras) and take their URL, with a key prefix or schema of the
session's own, from the fixtures of ``tests/conftest.py``, which skip (or,
with ``IDEMPO_REQUIRE_SERVICES=1``, fail) when the server is down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from idempo import AsyncStore, Store
from idempo.stores import AsyncMemoryStore, MemoryStore
from idempo.stores.sqlite import AsyncSQLiteStore, SQLiteStore
from tests.support.clock import FakeClock


@dataclass
class Backend:
    """A store under test.

    Attributes:
        name: the store's name.
        clock: the injected clock, or None when the store reads its server's clock.
        make_sync: returns a new sync store over the same records.
        make_async: returns a new async store over the same records.
        trio: whether the async store runs on trio.
        url: a URL naming the same records, for other processes (None: one process only).
    """

    name: str
    clock: FakeClock | None
    make_sync: Callable[[], Store]
    make_async: Callable[[], AsyncStore]
    trio: bool = True
    url: str | None = None
    _opened: list[Store] = field(default_factory=list)

    def sync(self) -> Store:
        """A new sync store, closed after the test."""
        store = self.make_sync()
        self._opened.append(store)
        return store

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the store: move the fake clock, or sleep past a real one."""
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            time.sleep(seconds)

    def close(self) -> None:
        for store in self._opened:
            store.close()


def memory(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    clock = FakeClock()
    shared = MemoryStore(clock=clock)
    return Backend("memory", clock, lambda: shared, lambda: AsyncMemoryStore(shared))


def sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    clock = FakeClock()
    path = tmp_path / "idempo.db"
    return Backend(
        "sqlite",
        clock,
        lambda: SQLiteStore(path, clock=clock),
        lambda: AsyncSQLiteStore(path, clock=clock),
        url=f"sqlite:///{path}",
    )


def redis(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    module: Any = pytest.importorskip("idempo.stores.redis", reason="needs idempo[redis]")
    url = str(request.getfixturevalue("redis_store_url"))
    return Backend("redis", None, lambda: module.RedisStore(url), lambda: module.AsyncRedisStore(url), False, url)


def postgres(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    module: Any = pytest.importorskip("idempo.stores.postgres", reason="needs idempo[postgres]")
    url = str(request.getfixturevalue("postgres_store_url"))
    return Backend(
        "postgres", None, lambda: module.PostgresStore(url), lambda: module.AsyncPostgresStore(url), False, url
    )


#: Every store, as pytest params of a factory(request, tmp_path) -> Backend.
STORES = [
    pytest.param(memory, id="memory"),
    pytest.param(sqlite, id="sqlite", marks=pytest.mark.sqlite),
    pytest.param(redis, id="redis", marks=pytest.mark.redis),
    pytest.param(postgres, id="postgres", marks=pytest.mark.postgres),
]

#: The stores several processes can share.
SHARED_STORES = [p for p in STORES if p.id != "memory"]
