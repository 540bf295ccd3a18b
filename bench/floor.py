"""The store floor: one round trip to Redis and PostgreSQL, one SQLite write, from Python.

Measured with the client libraries and pool settings idempo's stores use
(redis-py asyncio with hiredis, a pool of 50; psycopg 3 ``AsyncConnectionPool``
of 1-10 connections, autocommit, prepared statements; sqlite3 in WAL mode with
``synchronous=NORMAL``), so idempo's cost can be read against the minimum: an
execution needs two round trips (begin, complete), a replay one (begin).

Two numbers per operation: the latency of one operation at a time
(microseconds, median), and the throughput of 32 concurrent callers on one
event loop (operations per second), the shape the server is in under load.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Op = Callable[[int], Awaitable[Any]]


async def _measure(op: Op, sequential: int, concurrent: int, tasks: int = 32) -> dict[str, float]:
    for i in range(min(200, sequential)):  # warm the pool and the prepared statements
        await op(i)
    samples = []
    for i in range(sequential):
        t0 = time.perf_counter_ns()
        await op(i)
        samples.append(time.perf_counter_ns() - t0)
    counter = iter(range(concurrent))

    async def worker() -> None:
        for i in counter:
            await op(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    elapsed = time.perf_counter() - t0
    return {"latency_us": statistics.median(samples) / 1000, "ops_per_s": concurrent / elapsed}


async def redis_floor(url: str, prefix: str, n: int) -> dict[str, dict[str, float]]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url, max_connections=50)
    try:
        await client.set(prefix + "x", b"v" * 200)
        results = {
            "GET (one round trip)": await _measure(lambda i: client.get(prefix + "x"), n, n * 4),
            "SET (one round trip, a write)": await _measure(
                lambda i: client.set(prefix + f"w{i % 512}", b"v" * 200), n, n * 4
            ),
        }
        script = client.register_script("return redis.call('GET', KEYS[1])")
        results["EVALSHA of a one-line script"] = await _measure(lambda i: script(keys=[prefix + "x"]), n, n * 4)
        return results
    finally:
        await client.delete(prefix + "x", *(prefix + f"w{i}" for i in range(512)))
        await client.aclose()


async def postgres_floor(url: str, schema: str, n: int) -> dict[str, dict[str, float]]:
    import psycopg_pool

    pool = psycopg_pool.AsyncConnectionPool(
        url,
        min_size=1,
        max_size=10,
        kwargs={"autocommit": True, "prepare_threshold": 5, "options": f"-c search_path={schema}"},
        open=False,
    )
    await pool.open()
    try:
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_floor_probe (k int PRIMARY KEY, v bytea)")

        async def select(i: int) -> Any:
            async with pool.connection() as conn:
                return await (await conn.execute("SELECT 1")).fetchone()

        async def upsert(i: int) -> Any:
            async with pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO bench_floor_probe (k, v) VALUES (%s, %s) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                    (i % 512, b"v" * 200),
                )

        return {
            "SELECT 1 (one round trip)": await _measure(select, n, n * 4),
            "upsert one row (one round trip, a commit)": await _measure(upsert, n, n * 4),
        }
    finally:
        await pool.close()


async def sqlite_floor(directory: Path, n: int) -> dict[str, dict[str, float]]:
    conn = sqlite3.connect(directory / "floor-probe.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS probe (k INTEGER PRIMARY KEY, v BLOB)")
    value = b"v" * 200

    async def write(i: int) -> None:
        conn.execute(
            "INSERT INTO probe (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v", (i % 512, value)
        )

    async def read(i: int) -> Any:
        return conn.execute("SELECT v FROM probe WHERE k = ?", (i % 512,)).fetchone()

    try:
        return {
            "write one row (autocommit)": await _measure(write, n, n * 4),
            "read one row": await _measure(read, n, n * 4),
        }
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            path = directory / f"floor-probe.db{suffix}"
            if path.exists():
                os.unlink(path)


async def measure_all(
    redis_url: str | None, pg_url: str | None, pg_schema: str, prefix: str, directory: Path, n: int
) -> dict[str, dict[str, dict[str, float]] | str]:
    """Every floor; a store that cannot be reached gets a string saying why."""
    out: dict[str, dict[str, dict[str, float]] | str] = {}
    out["SQLite"] = await sqlite_floor(directory, n)
    for name, probe in (
        ("Redis", lambda: redis_floor(redis_url, prefix, n) if redis_url else None),
        ("PostgreSQL", lambda: postgres_floor(pg_url, pg_schema, n) if pg_url else None),
    ):
        coro = probe()
        if coro is None:
            out[name] = "not measured: the server is not reachable"
            continue
        try:
            out[name] = await coro
        except Exception as exc:  # report, never abort the run for the floor
            out[name] = f"not measured: {type(exc).__name__}: {exc}"
    return out
