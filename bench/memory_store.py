"""Resident memory of the memory store per 100k records, and its own eviction (issue 10 item 6).

Run: ``.venv/bin/python bench/memory_store.py [RECORDS] [--json]`` (default 100000). Prints:

- the resident set size (RSS, from /proc/self/statm) added by RECORDS completed
  records, each a payment-like 201 with a JSON body of about 60 bytes, as
  ``./bench/run`` stores them;
- how many calls after the records' TTL it takes the store, by itself, to
  evict them all (no ``purge_expired()``), and the records left;
- the same with ``max_records``: the count never passes the bound.

A command that prints figures, not a test: the numbers depend on the machine.
With ``--json`` it prints only the first figure, as one JSON line (``./bench/run``
reports it).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from idempo._core.records import StoredResponse
from idempo.stores.memory import SWEEP_PER_CALL, MemoryStore


class Clock:
    """A clock the script moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(store: MemoryStore, count: int, prefix: str, ttl_ms: int) -> None:
    for i in range(count):
        record_key = f"{prefix}{i:032x}"
        taken = store.begin(record_key, "f" * 64, 30_000)
        body = b'{"id":"pay_%08d","status":"succeeded","amount":1999}' % i
        headers = ((b"content-type", b"application/json"), (b"location", b"/payments/pay_%08d" % i))
        store.complete(record_key, taken.token, StoredResponse(201, headers, body), ttl_ms)  # type: ignore[union-attr]


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--json"]
    records = int(args[0]) if args else 100_000
    clock = Clock()
    store = MemoryStore(clock=clock)
    gc.collect()
    before = rss_bytes()
    fill(store, records, "old", 60_000)
    gc.collect()
    added = rss_bytes() - before
    if "--json" in sys.argv:
        print(json.dumps({"records": records, "rss_bytes": added, "mib_per_100k": added / 2**20 * 100_000 / records}))
        return
    print(
        f"{records} completed records: RSS +{added / 2**20:.1f} MiB ({added / records:.0f} bytes a record, "
        f"{added / 2**20 * 100_000 / records:.1f} MiB per 100k)"
    )

    clock.now += 61  # past every record's TTL
    calls = 0
    spent = 0.0
    while len(store) > calls and calls < 10 * records:
        started = time.perf_counter()
        fill(store, 1, f"new{calls}:", 3_600_000)  # one begin and one complete: two writes
        spent += time.perf_counter() - started
        clock.now += 0.002
        calls += 1
    left = sum(key.startswith("old") for key in store._records)
    print(
        f"after the TTL: {calls} requests (2 writes each, at most {SWEEP_PER_CALL} evictions a write) "
        f"evicted them without purge_expired(); {left} old records left; {spent * 1e6 / max(calls, 1):.1f} us "
        "a request (begin + complete + eviction)"
    )

    bounded = MemoryStore(clock=clock, max_records=records // 10)
    fill(bounded, records, "b", 86_400_000)
    print(f"max_records={records // 10}: after {records} records, {len(bounded)} held")


if __name__ == "__main__":
    main()
