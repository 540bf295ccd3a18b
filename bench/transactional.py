"""Transactional mode against the plain PostgreSQL store: round trips per request and requests per second.

    .venv/bin/python bench/transactional.py [--requests N] [--concurrency C] [--pg-url URL]

Two FastAPI apps, driven in process through httpx's ASGITransport (no HTTP server, so the figures are
idempo's and the database's, not uvicorn's), each writing one payment row per request on PostgreSQL:

- ``plain``: ``AsyncPostgresStore(url)`` (the store's own pool); the handler inserts through a
  connection of the app's pool, autocommit (one statement).
- ``transactional``: ``AsyncPostgresStore.from_pool(app_pool)``; the handler inserts through
  ``tx: idempo.fastapi.Transaction``; the record completes in that transaction.

Round trips are counted on the client side: every ``AsyncConnection.execute`` and every transaction
command psycopg sends on its own (BEGIN, COMMIT, ROLLBACK) is one, except a command sent in a pipeline
with the statement before it (the record's completion and COMMIT), for the first execution of a key
and for its replay. Throughput: ``--requests`` first executions (fresh keys), ``--concurrency`` at a time,
after a warm-up; one run. Everything lives in a schema of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import psycopg
import psycopg_pool
from fastapi import FastAPI, Request

import idempo.fastapi
from idempo import Policy
from idempo.asgi import IdempotencyMiddleware
from idempo.stores.postgres import AsyncPostgresStore

COUNTS: Counter[str] = Counter()


def _count_round_trips() -> None:
    execute = psycopg.AsyncConnection.execute
    command = psycopg.AsyncConnection._exec_command

    async def counted_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        COUNTS["execute"] += 1
        return await execute(self, *args, **kwargs)

    def counted_command(self: Any, cmd: Any, *args: Any, **kwargs: Any) -> Any:
        # In a pipeline the command rides with the statements before it: no round trip of its own.
        if self._pipeline is None:
            COUNTS[bytes(cmd).split()[0].decode()] += 1
        return command(self, cmd, *args, **kwargs)

    psycopg.AsyncConnection.execute = counted_execute  # type: ignore[method-assign]
    psycopg.AsyncConnection._exec_command = counted_command  # type: ignore[method-assign]


def _apps(url: str, schema: str, app_pool: psycopg_pool.AsyncConnectionPool) -> dict[str, FastAPI]:
    policy = Policy(require_key=True)
    plain = FastAPI()

    @plain.post("/payments", status_code=201)
    async def pay_plain(request: Request) -> dict[str, int]:
        body = await request.json()
        async with app_pool.connection() as conn:
            await conn.set_autocommit(True)
            cur = await conn.execute(
                "INSERT INTO payments (order_id, cents) VALUES (%s, %s) RETURNING id", (body["order_id"], 1)
            )
            row = await cur.fetchone()
            await conn.set_autocommit(False)
        assert row is not None
        return {"id": row[0]}

    plain.add_middleware(IdempotencyMiddleware, store=AsyncPostgresStore(f"{url}?schema={schema}"), policy=policy)

    tx_app = FastAPI()

    @tx_app.post("/payments", status_code=201)
    async def pay_tx(request: Request, tx: idempo.fastapi.Transaction) -> dict[str, int]:
        body = await request.json()
        cur = await tx.connection.execute(
            "INSERT INTO payments (order_id, cents) VALUES (%s, %s) RETURNING id", (body["order_id"], 1)
        )
        row = await cur.fetchone()
        assert row is not None
        return {"id": row[0]}

    tx_app.add_middleware(IdempotencyMiddleware, store=AsyncPostgresStore.from_pool(app_pool), policy=policy)
    return {"plain": plain, "transactional": tx_app}


async def _run(app: FastAPI, requests: int, concurrency: int) -> dict[str, float]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:

        async def pay(key: str) -> httpx.Response:
            return await client.post("/payments", json={"order_id": key}, headers={"Idempotency-Key": key})

        for _ in range(20):  # warm-up: pools, prepared statements
            assert (await pay(uuid.uuid4().hex)).status_code == 201
        COUNTS.clear()
        key = uuid.uuid4().hex
        assert (await pay(key)).status_code == 201
        first = sum(COUNTS.values())
        first_detail = dict(COUNTS)
        COUNTS.clear()
        replay = await pay(key)
        assert replay.headers.get("idempotent-replayed") == "true"
        replayed = sum(COUNTS.values())
        keys = [uuid.uuid4().hex for _ in range(requests)]
        started = time.perf_counter()
        for i in range(0, requests, concurrency):
            answers = await asyncio.gather(*(pay(k) for k in keys[i : i + concurrency]))
            assert all(a.status_code == 201 for a in answers)
        elapsed = time.perf_counter() - started
    print(f"    round trips of a first execution: {first_detail}")
    return {"first": first, "replay": replayed, "rps": requests / elapsed}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    schema = f"idempo_bench_tx_{uuid.uuid4().hex[:8]}"
    setup = AsyncPostgresStore(f"{args.pg_url}?schema={schema}", check_schema=False)
    await setup.create_schema()
    await setup.aclose()
    async with await psycopg.AsyncConnection.connect(args.pg_url, autocommit=True) as conn:
        await conn.execute(f"CREATE TABLE {schema}.payments (id serial PRIMARY KEY, order_id text, cents int)")
    conninfo = f"{args.pg_url}?options=-csearch_path%3D{schema}"
    app_pool = psycopg_pool.AsyncConnectionPool(conninfo, min_size=4, max_size=20, open=False)
    await app_pool.open()
    _count_round_trips()
    try:
        results = {}
        for name, app in _apps(args.pg_url, schema, app_pool).items():
            print(f"{name}:")
            results[name] = await _run(app, args.requests, args.concurrency)
            print(f"    {results[name]}")
        print()
        print("| variant | round trips, first execution | round trips, replay | req/s |")
        print("|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['first']:.0f} | {r['replay']:.0f} | {r['rps']:.0f} |")
    finally:
        await app_pool.close()
        async with await psycopg.AsyncConnection.connect(args.pg_url, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    asyncio.run(main())
