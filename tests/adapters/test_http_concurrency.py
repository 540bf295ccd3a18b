"""HTTP behaviour: concurrent duplicates execute once (DESIGN guarantee 1; shared/cases B01)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from idempo import Policy
from tests.adapters.conftest import JSON, K1, B, ServeFactory, Served
from tests.support.clock import FakeClock, eventually


def make_store(serve: ServeFactory, kind: str, tmp_path: Path, clock: FakeClock) -> Any:
    """A fresh store of the given kind, of the framework's flavour (async or blocking), on the test's clock."""
    if kind == "memory":
        return serve.memory_store(clock)
    return serve.sqlite_store(tmp_path / "idempo.db", clock)


def burst(s: Served, n: int, headers: dict[str, str]) -> list[httpx.Response]:
    """Release n identical requests at the same instant from n threads (barrier-timed)."""
    barrier = threading.Barrier(n)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    with httpx.Client(base_url=s.url, timeout=30, limits=limits) as client:

        def one(_: int) -> httpx.Response:
            barrier.wait()
            return client.post("/orders", content=B, headers={**JSON, "Idempotency-Key": K1, **headers})

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))


def test_in_flight_duplicate_gets_409_with_retry_after(serve: ServeFactory) -> None:
    """B01(a): a duplicate while the first runs gets 409 problem+json with Retry-After; the handler runs once."""
    s = serve()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(s.post, headers={"x-test-sleep": "1.0"})
        assert eventually(lambda: s.orders.calls == 1)
        duplicate = s.post()
        assert duplicate.status_code == 409
        assert duplicate.headers["content-type"] == "application/problem+json"
        assert duplicate.json()["type"] == "https://idempo.dev/problems/key-in-progress"
        assert int(duplicate.headers["retry-after"]) >= 1
        original = first.result()
    assert original.status_code == 201
    after = s.post()
    assert after.headers["idempotent-replayed"] == "true"
    assert after.content == original.content
    assert s.orders.calls == 1


def test_wait_mode_duplicate_gets_the_replay(serve: ServeFactory) -> None:
    """B01(a), wait mode: the duplicate blocks until the first finishes and gets its replay."""
    s = serve(policy=Policy(wait=10))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(s.post, headers={"x-test-sleep": "0.5"})
        assert eventually(lambda: s.orders.calls == 1)
        duplicate = s.post()
        original = first.result()
    assert duplicate.status_code == 201
    assert duplicate.headers["idempotent-replayed"] == "true"
    assert duplicate.content == original.content
    assert s.orders.calls == 1


def test_wait_mode_gives_409_when_the_wait_bound_passes(serve: ServeFactory) -> None:
    """Wait mode is bounded: past `wait` seconds the duplicate gets 409, not a hang."""
    s = serve(policy=Policy(wait=0.2))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(s.post, headers={"x-test-sleep": "1.5"})
        assert eventually(lambda: s.orders.calls == 1)
        duplicate = s.post()
        assert first.result().status_code == 201
    assert duplicate.status_code == 409
    assert s.orders.calls == 1


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_burst_of_50_identical_requests_executes_once(serve: ServeFactory, tmp_path: Path, store_kind: str) -> None:
    """B01(b): 50 identical requests at once: one execution, one fresh 201, the rest 409 or its exact replay."""
    clock = FakeClock()
    s = serve(store=make_store(serve, store_kind, tmp_path, clock), clock=clock)
    responses = burst(s, 50, {"x-test-sleep": "0.3"})
    assert s.orders.calls == 1
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {201, 409}, statuses
    fresh = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(fresh) == 1
    for r in responses:
        if r.status_code == 201 and r is not fresh[0]:
            assert r.headers["idempotent-replayed"] == "true"
            assert r.content == fresh[0].content
    assert s.post().content == fresh[0].content


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_burst_in_wait_mode_replays_to_all_49(serve: ServeFactory, tmp_path: Path, store_kind: str) -> None:
    """B01(b), wait mode: 50 at once give one execution and 49 replays of it; zero 409s."""
    clock = FakeClock()
    s = serve(store=make_store(serve, store_kind, tmp_path, clock), clock=clock, policy=Policy(wait=20))
    responses = burst(s, 50, {"x-test-sleep": "0.3"})
    assert s.orders.calls == 1
    assert all(r.status_code == 201 for r in responses)
    replays = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    assert len(replays) == 49
    assert {r.content for r in responses} == {b'{"order_id":1}'}


def test_a_handler_slower_than_its_lease_is_never_run_twice(serve: ServeFactory) -> None:
    """The lease is renewed while the handler runs: past the lease TTL a duplicate still gets 409, not a rerun."""
    s = serve(store=serve.memory_store(time.time), policy=Policy(lease_ttl=0.6))  # type: ignore[arg-type]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(s.post, headers={"x-test-sleep": "2.0"})
        assert eventually(lambda: s.orders.calls == 1)
        time.sleep(1.2)  # twice the lease TTL: without renewal the record could be taken over now
        duplicate = s.post()
        assert duplicate.status_code == 409
        original = first.result()
    assert original.status_code == 201
    replay = s.post()
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == original.content
    assert s.orders.calls == 1
