"""The correctness scenarios (c) and (d), and the seeding of completed keys for (b).

Each check returns ``(ok, detail)``: ``detail`` says what failed, in numbers.
The server counts executions per key (``GET /_stats?prefix=...``), so a
second execution is seen even when its answer looks right.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from httpclient import Answer, Connection, encode_request, get_json, payment

#: The body of every load request and every seeded key (the Lua scripts send the same bytes).
LOAD_BODY = b'{"amount":1000,"currency":"EUR","customer":"cus_bench","description":"bench payment"}'


async def seed(port: int, prefix: str, count: int, concurrency: int = 16) -> tuple[bool, str]:
    """Complete ``count`` keys ``<prefix>-0 .. <prefix>-<count-1>`` with the load body (scenario b's keys)."""
    statuses: Counter[int] = Counter()
    queue = list(range(count))

    async def worker() -> None:
        conn = Connection(port)
        try:
            while queue:
                i = queue.pop()
                headers = {"Content-Type": "application/json", "Idempotency-Key": f"{prefix}-{i}"}
                statuses[(await conn.request("POST", "/payments", headers, LOAD_BODY)).status] += 1
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    ok = statuses == Counter({201: count})
    return ok, "" if ok else f"seeding answered {dict(statuses)}"


async def concurrent_duplicates(port: int, prefix: str, keys: int, work_ms: int, clients: int = 16) -> tuple[bool, str]:
    """Scenario (c): ``clients`` requests with one key at once, for ``keys`` keys; then one follow-up each.

    OK when every key executed exactly once, every answer is the execution's
    201 (same body) or a 409, and each follow-up gets the execution's 201 body.
    """
    conns = [Connection(port) for _ in range(clients)]
    await asyncio.gather(*(c.open() for c in conns))
    problems: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    winners: dict[str, bytes] = {}
    try:
        for i in range(keys):
            key = f"{prefix}-{i}"
            headers, body = payment(key, {"amount": 1000 + i, "currency": "EUR", "work_ms": work_ms})
            raw = encode_request("POST", "/payments", headers, body)
            for conn in conns:  # all written before any answer is awaited
                conn.write(raw)
            answers: list[Answer] = await asyncio.gather(*(c.read() for c in conns))
            bodies = [a.body for a in answers if a.status == 201]
            others = Counter(a.status for a in answers if a.status not in (201, 409))
            for status in others:
                problems[f"duplicates answered {status}"] += 1
            if not bodies:
                problems["no 201 among the duplicates"] += 1
            else:
                winners[key] = bodies[0]
                if not all(same(bodies[0], b, Counter()) for b in bodies[1:]):
                    problems["different 201 answers for one key (two executions answered)"] += 1
            # the connections the server closed (after an error) are reopened
            for conn in conns:
                if conn.writer is None or conn.writer.is_closing():
                    await conn.close()
                    await conn.open()
        follow = Connection(port)
        for i in range(keys):
            key = f"{prefix}-{i}"
            headers, body = payment(key, {"amount": 1000 + i, "currency": "EUR", "work_ms": work_ms})
            answer = await follow.request("POST", "/payments", headers, body)
            if answer.status != 201:
                problems[f"follow-up answered {answer.status}"] += 1
            elif key in winners and not same(winners[key], answer.body, notes):
                problems["follow-up answer differs from the execution's"] += 1
        await follow.close()
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    counts = (await get_json(port, f"/_stats?prefix={prefix}-"))["keys"]
    per_key = Counter(counts.get(f"{prefix}-{i}", 0) for i in range(keys))
    for executions, n in sorted(per_key.items()):
        if executions != 1:
            problems[f"executed {executions}x"] += n
    return _verdict(problems, keys, notes)


async def failed_then_retried(port: int, prefix: str, keys: int) -> tuple[bool, str]:
    """Scenario (d): a first attempt fails with 500; the retry executes once, the next one replays.

    Run for both ways a handler fails: it raises (the framework answers 500)
    and it answers 500 itself. Per key: attempt 1 must be a 500, attempt 2 a
    201 from a second execution, attempt 3 the same 201 without executing.
    """
    problems: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    for mode in ("raise", "status"):
        conn = Connection(port)
        for i in range(keys):
            key = f"{prefix}-{mode}-{i}"
            headers, body = payment(key, {"amount": 2000 + i, "currency": "EUR", "fail": mode})
            first, second, third = [await conn.request("POST", "/payments", headers, body) for _ in range(3)]
            if first.status != 500:
                problems[f"{mode}: failed attempt answered {first.status}"] += 1
            if second.status != 201:
                problems[f"{mode}: retry answered {second.status}"] += 1
            if third.status != 201:
                problems[f"{mode}: second retry answered {third.status}"] += 1
            elif second.status == 201 and not same(second.body, third.body, notes):
                problems[f"{mode}: second retry not a replay of the retry"] += 1
        await conn.close()
        counts = (await get_json(port, f"/_stats?prefix={prefix}-{mode}-"))["keys"]
        per_key = Counter(counts.get(f"{prefix}-{mode}-{i}", 0) for i in range(keys))
        for executions, n in sorted(per_key.items()):
            if executions != 2:
                problems[f"{mode}: executed {executions}x (want 2: the failure, the retry)"] += n
    return _verdict(problems, keys, notes, noted=keys * 2)


def same(a: bytes, b: bytes, notes: Counter[str]) -> bool:
    """True when two answers carry the same JSON; a byte difference in the same JSON is noted, not failed."""
    if a == b:
        return True
    try:
        equal = json.loads(a) == json.loads(b)
    except ValueError:
        return False
    if equal:
        notes["replayed bytes differ from the first answer (same JSON, reordered)"] += 1
    return equal


def _verdict(problems: Counter[str], keys: int, notes: Counter[str] | None = None, noted: int = 0) -> tuple[bool, str]:
    if not problems:
        notes = notes or Counter()
        return True, "; ".join(f"note: {what} ({n}/{noted or keys} answers)" for what, n in notes.most_common())
    return False, "; ".join(f"{what} ({n}/{keys} keys)" for what, n in problems.most_common())


async def executions(port: int) -> int:
    stats: dict[str, Any] = await get_json(port, "/_stats")
    return int(stats["executions"])


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
