"""Per-call cost of each store, blocking and async, in process (no HTTP): a command that prints figures.

For each store and front it times three paths, one call after another on one
connection: ``begin`` on a new key then ``complete`` (a first execution: two
round trips), ``begin`` on a completed key (a replay: one round trip), and
``get``. Each figure is microseconds per path, the median of ``--batches``
batches of ``--calls`` paths: wall time (the round trip included) and the
process's CPU time (what the client side costs; steadier on a busy machine).

    python bench/store_calls.py [--calls 300] [--batches 7] [--stores memory,sqlite,postgres,redis]

PostgreSQL and Redis come from ``IDEMPO_POSTGRES_URL`` / ``IDEMPO_REDIS_URL``
(defaults as the test suite's); the run uses a schema and a key prefix of its
own and removes them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from idempo import Acquired, StoredResponse

_RESPONSE = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"id": 1, "status": "paid"}')
_LONG = 600_000


def _median(samples: list[tuple[float, float]], calls: int) -> tuple[float, float]:
    wall = statistics.median(s[0] for s in samples) / calls * 1e6
    cpu = statistics.median(s[1] for s in samples) / calls * 1e6
    return wall, cpu


def _sync_paths(store: Any) -> dict[str, Callable[[str], None]]:
    done = uuid.uuid4().hex
    first = store.begin(done, "fp", _LONG)
    assert isinstance(first, Acquired)
    store.complete(done, first.token, _RESPONSE, _LONG)

    def execute(key: str) -> None:
        result = store.begin(key, "fp", _LONG)
        store.complete(key, result.token, _RESPONSE, _LONG)

    return {
        "execute": execute,
        "replay": lambda key: store.begin(done, "fp", _LONG),
        "get": lambda key: store.get(done),
    }


def _time_sync(store: Any, calls: int, batches: int) -> dict[str, tuple[float, float]]:
    figures = {}
    for name, path in _sync_paths(store).items():
        for _ in range(calls // 5):  # warm-up: pools filled, statements prepared
            path(uuid.uuid4().hex)
        samples = []
        for _ in range(batches):
            keys = [uuid.uuid4().hex for _ in range(calls)]
            wall, cpu = time.perf_counter(), time.process_time()
            for key in keys:
                path(key)
            samples.append((time.perf_counter() - wall, time.process_time() - cpu))
        figures[name] = _median(samples, calls)
    return figures


async def _time_async(store: Any, calls: int, batches: int) -> dict[str, tuple[float, float]]:
    done = uuid.uuid4().hex
    first = await store.begin(done, "fp", _LONG)
    await store.complete(done, first.token, _RESPONSE, _LONG)

    async def execute(key: str) -> None:
        result = await store.begin(key, "fp", _LONG)
        await store.complete(key, result.token, _RESPONSE, _LONG)

    async def replay(key: str) -> None:
        await store.begin(done, "fp", _LONG)

    async def get(key: str) -> None:
        await store.get(done)

    figures = {}
    for name, path in (("execute", execute), ("replay", replay), ("get", get)):
        for _ in range(calls // 5):
            await path(uuid.uuid4().hex)
        samples = []
        for _ in range(batches):
            keys = [uuid.uuid4().hex for _ in range(calls)]
            wall, cpu = time.perf_counter(), time.process_time()
            for key in keys:
                await path(key)
            samples.append((time.perf_counter() - wall, time.process_time() - cpu))
        figures[name] = _median(samples, calls)
    return figures


def _stores(names: list[str], folder: str) -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    from idempo.stores import AsyncMemoryStore, MemoryStore

    run = uuid.uuid4().hex[:8]
    found: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = []
    if "memory" in names:
        found.append(("memory", MemoryStore, AsyncMemoryStore))
    if "sqlite" in names:
        from idempo.stores.sqlite import AsyncSQLiteStore, SQLiteStore

        path = os.path.join(folder, "bench.db")
        found.append(("sqlite", lambda p=path: SQLiteStore(p), lambda p=path: AsyncSQLiteStore(p)))
    if "postgres" in names:
        from idempo.stores.postgres import AsyncPostgresStore, PostgresStore

        url = os.environ.get("IDEMPO_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
        store_url = f"{url}?schema=bench_calls_{run}"
        PostgresStore(store_url, check_schema=False).create_schema()
        pg = store_url
        found.append(("postgres", lambda: PostgresStore(pg), lambda: AsyncPostgresStore(pg)))
    if "redis" in names:
        from idempo.stores.redis import AsyncRedisStore, RedisStore

        url = os.environ.get("IDEMPO_REDIS_URL", "redis://127.0.0.1:6379/0")
        store_url = f"{url}?prefix=bench-calls-{run}:"
        rd = store_url
        found.append(("redis", lambda: RedisStore(rd), lambda: AsyncRedisStore(rd)))
    return found


def _cleanup(names: list[str]) -> None:
    if "postgres" in names:
        import psycopg

        url = os.environ.get("IDEMPO_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
        with psycopg.connect(url, autocommit=True) as conn:
            for (schema,) in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench_calls_%'"):
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    if "redis" in names:
        import redis

        client = redis.Redis.from_url(os.environ.get("IDEMPO_REDIS_URL", "redis://127.0.0.1:6379/0"))
        for key in client.scan_iter(match="bench-calls-*", count=1000):
            client.delete(key)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--stores", default="memory,sqlite,postgres,redis")
    options = parser.parse_args()
    names = options.stores.split(",")
    print(f"us per path, median of {options.batches} x {options.calls}: wall / CPU")
    print(f"{'store':<16}{'execute':>18}{'replay':>18}{'get':>18}")
    with tempfile.TemporaryDirectory() as folder:
        try:
            for name, sync_factory, async_factory in _stores(names, folder):
                store = sync_factory()
                try:
                    figures = _time_sync(store, options.calls, options.batches)
                finally:
                    store.close()
                print(f"{name + ' sync':<16}" + "".join(f"{w:>10.1f} / {c:<5.1f}" for w, c in figures.values()))

                async def run(factory: Callable[[], Any] = async_factory) -> dict[str, tuple[float, float]]:
                    store = factory()
                    try:
                        return await _time_async(store, options.calls, options.batches)
                    finally:
                        await store.aclose()

                figures = asyncio.run(run())
                print(f"{name + ' async':<16}" + "".join(f"{w:>10.1f} / {c:<5.1f}" for w, c in figures.values()))
        finally:
            _cleanup(names)


if __name__ == "__main__":
    main()
