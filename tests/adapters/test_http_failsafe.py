"""Issue 10 items 2 and 9 over HTTP, on every framework: no wedged key, and on_takeover.

- Item 2: any exception in idempo's own code after the handler ran (the capture,
  header encoding, the verdict, the settle, the observation) settles the record
  (released here) and stops the lease renewals: the key is usable again at once.
- Item 9: ``on_takeover="hold"``: a request that finds an expired lease with no
  result runs nothing and holds the key (409 ``outcome-unknown``, reason
  ``takeover``) until the hold expires or an operator resolves it.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from idempo import Marker, Policy, RecordState, make_record_key
from idempo._core.capture import ResponseCapture
from idempo.observability import RequestObservation
from idempo.stores import MemoryStore
from tests.adapters.conftest import K1, LOCAL, ServeFactory
from tests.support.clock import eventually


class _Calls:
    """Counts MemoryStore.extend calls (the renewals) of every memory store, sync or async front."""

    def __init__(self) -> None:
        self.extends = 0
        self.lock = threading.Lock()


@pytest.fixture
def renewals(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Calls]:
    calls = _Calls()
    extend = MemoryStore.extend

    def counted(self: MemoryStore, record_key: str, token: int, lease_ttl_ms: int) -> None:
        with calls.lock:
            calls.extends += 1
        extend(self, record_key, token, lease_ttl_ms)

    monkeypatch.setattr(MemoryStore, "extend", counted)
    return calls


def _raiser(original: Callable[..., Any]) -> Callable[..., Any]:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected failure in idempo's own code")

    broken.__wrapped__ = original  # type: ignore[attr-defined]
    return broken


# Each step after the handler, and what to break in it.
STEPS: dict[str, tuple[Any, str]] = {
    "capture-start": (ResponseCapture, "start"),
    "capture-body": (ResponseCapture, "add"),
    "capture-response": (ResponseCapture, "response"),
    "verdict": (Policy, "verdict_for_status"),
    "settle-command": ("idempo._engine.execution", "finish"),
    "observation": (RequestObservation, "settled"),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_failure_after_the_handler_settles_the_key_and_stops_renewal(
    serve: ServeFactory, renewals: _Calls, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Item 2: idempo failing at a step after the handler leaves no wedged key: the record is settled (the retry
    executes, or replays when the store took the answer first), never 409, and no renewal runs afterwards."""
    s = serve(policy=Policy(lease_ttl=0.3))
    target, name = STEPS[step]
    owner = importlib.import_module(target) if isinstance(target, str) else target
    monkeypatch.setattr(owner, name, _raiser(getattr(owner, name)))
    # A handler slower than a third of the lease: at least one renewal runs while it does.
    s.post(headers={"x-test-sleep": "0.25"})
    assert s.orders.calls == 1
    assert renewals.extends >= 1
    time.sleep(0.05)  # a background task finishing its settle
    after = renewals.extends
    record = s.record()
    assert record is None or record.state is RecordState.COMPLETED
    time.sleep(0.4)  # more than three renewal intervals
    assert renewals.extends == after
    monkeypatch.undo()
    retry = s.post()
    assert retry.status_code == 201
    assert s.orders.calls == (1 if retry.headers.get("idempotent-replayed") == "true" else 2)


def _crash_and_expire(s: Any) -> None:
    """The first request crashes (SystemExit) holding the lease; then the lease expires with no result."""
    crashed = s.post(headers={"x-test-raise": "exit"})
    assert crashed.status_code == 500
    assert s.orders.calls == 1
    s.clock.advance(31)


def test_takeover_executes_by_default(serve: ServeFactory) -> None:
    """Item 9: on_takeover defaults to "execute": the expired lease is taken over and the handler runs again."""
    s = serve()
    _crash_and_expire(s)
    assert s.post().status_code == 201
    assert s.orders.calls == 2


def test_takeover_hold_answers_409_outcome_unknown_until_the_hold_expires(serve: ServeFactory) -> None:
    """Item 9: on_takeover="hold": the request finding the expired lease runs nothing, the record is held
    (reason takeover) and every retry gets 409 outcome-unknown until hold_ttl passes; then the key is new."""
    s = serve(policy=Policy(on_takeover="hold", hold_ttl=600))
    _crash_and_expire(s)
    for _ in range(3):
        answer = s.post()
        assert answer.status_code == 409
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["type"] == "https://idempo.dev/problems/outcome-unknown"
        assert answer.json()["reason"] == "takeover"
    record = s.record()
    assert record is not None
    assert record.marker == Marker(Marker.HELD, "takeover")
    assert s.orders.calls == 1
    s.clock.advance(601)
    assert s.post().status_code == 201
    assert s.orders.calls == 2


def test_racing_requests_on_an_expired_lease_under_hold_execute_nothing(serve: ServeFactory) -> None:
    """Item 9: eight requests race on an expired lease under on_takeover="hold": none executes, all get 409."""
    s = serve(policy=Policy(on_takeover="hold"))
    _crash_and_expire(s)
    barrier = threading.Barrier(8)

    def race() -> int:
        barrier.wait(10)
        return s.post().status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: race(), range(8)))
    assert statuses == [409] * 8
    assert s.orders.calls == 1
    record = s.record()
    assert record is not None
    assert record.marker is not None


def test_an_operator_resolves_a_held_key(serve: ServeFactory) -> None:
    """Item 9: what `idempo resolve` does: completing a held record (same token) replays that status to retries;
    releasing it lets the next request execute."""
    s = serve(policy=Policy(on_takeover="hold"))
    _crash_and_expire(s)
    assert s.post().status_code == 409
    record = s.record()
    assert record is not None
    sync = s.store.sync if hasattr(s.store, "sync") else s.store
    record_key = make_record_key(LOCAL, "POST", "/orders", K1, secret=s.secret())
    from idempo import StoredResponse

    sync.complete(record_key, record.token, StoredResponse(201, (), b""), 60_000)
    replay = s.post()
    assert (replay.status_code, replay.headers["idempotent-replayed"]) == (201, "true")
    assert s.orders.calls == 1
    other = "other-key"
    s.post(key=other, headers={"x-test-raise": "exit"})
    s.clock.advance(31)
    assert s.post(key=other).status_code == 409
    held = s.record(other)
    assert held is not None
    sync.release(make_record_key(LOCAL, "POST", "/orders", other, secret=s.secret()), held.token)
    assert s.post(key=other).status_code == 201
    assert eventually(lambda: s.orders.calls == 3)
