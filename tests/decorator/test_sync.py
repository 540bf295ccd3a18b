"""@idempotent on sync functions, against every store."""

from __future__ import annotations

import dataclasses
import datetime
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pydantic
import pytest

from idempo import FingerprintMismatch, KeyHeld, KeyInProgress, RecordState, Verdict, idempotent
from idempo.decorator import record_key
from idempo.secrets import store_secret
from tests.support.backends import Backend


@dataclasses.dataclass(frozen=True)
class Line:
    sku: str
    qty: int


@dataclasses.dataclass
class Receipt:
    order_id: int
    lines: list[Line]
    total: Decimal
    at: datetime.datetime


class Charge(pydantic.BaseModel):
    charge_id: str
    cents: int
    captured_at: datetime.date


class Crash(BaseException):
    """Stands for the process dying mid-call: not an Exception, so the record is left in progress."""


def test_runs_once_per_key(backend: Backend, scope: str) -> None:
    """A second call with the same key replays; another key executes."""
    calls = Counter[str]()

    @idempotent(store=backend.sync(), key="key", scope=scope)
    def order(key: str, sku: str) -> dict[str, object]:
        calls[key] += 1
        return {"order": calls.total(), "sku": sku}

    first = order("K1", "A")
    assert order("K1", "A") == first == {"order": 1, "sku": "A"}
    assert order("K2", "A") == {"order": 2, "sku": "A"}
    assert calls == {"K1": 1, "K2": 1}


def test_replay_returns_an_equal_dataclass(backend: Backend, scope: str) -> None:
    """The replay of a dataclass result is an equal instance of the annotated type, not a dict."""
    calls = 0

    @idempotent(store=backend.sync(), key="key", scope=scope)
    def checkout(key: str, lines: list[Line]) -> Receipt:
        nonlocal calls
        calls += 1
        at = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
        return Receipt(calls, lines, Decimal("19.99"), at)

    first = checkout("K1", [Line("A", 1), Line("B", 2)])
    replay = checkout("K1", [Line("A", 1), Line("B", 2)])
    assert calls == 1
    assert type(replay) is Receipt
    assert replay == first
    assert type(replay.lines[0]) is Line
    assert type(replay.total) is Decimal


def test_replay_returns_an_equal_pydantic_model(backend: Backend, scope: str) -> None:
    """The replay of a pydantic model result is an equal model of the annotated type."""
    calls = 0

    @idempotent(store=backend.sync(), key="charge_id", scope=scope)
    def capture(charge_id: str, cents: int) -> Charge:
        nonlocal calls
        calls += 1
        return Charge(charge_id=charge_id, cents=cents, captured_at=datetime.date(2026, 5, 1))

    first = capture("ch_1", 1999)
    replay = capture("ch_1", 1999)
    assert calls == 1
    assert type(replay) is Charge
    assert replay == first


def test_other_arguments_raise_fingerprint_mismatch(backend: Backend, scope: str) -> None:
    """The same key with different arguments raises FingerprintMismatch and does not execute."""
    calls = 0

    @idempotent(store=backend.sync(), key="key", scope=scope)
    def order(key: str, body: dict[str, object]) -> int:
        nonlocal calls
        calls += 1
        return calls

    assert order("K1", {"sku": "A", "qty": 1}) == 1
    # Key order does not matter: the fingerprint is RFC 8785 canonical JSON (shared/cases B07).
    assert order("K1", {"qty": 1, "sku": "A"}) == 1
    with pytest.raises(FingerprintMismatch):
        order("K1", {"sku": "A", "qty": 2})
    with pytest.raises(FingerprintMismatch):
        order("K1", {"sku": "A", "qty": "1"})
    assert calls == 1


def test_concurrent_calls_execute_once_and_the_rest_get_key_in_progress(backend: Backend, scope: str) -> None:
    """8 threads with one key: one executes, the 7 others raise KeyInProgress (shared/cases B01)."""
    calls = 0
    others_done = threading.Event()
    refused: list[KeyInProgress] = []
    lock = threading.Lock()
    store = backend.sync()
    barrier = threading.Barrier(8)

    @idempotent(store=store, key="key", scope=scope)
    def pay(key: str) -> str:
        nonlocal calls
        calls += 1
        # Hold the lease until every other caller has been refused.
        assert others_done.wait(30)
        return "paid"

    def call() -> str:
        barrier.wait()
        try:
            return pay("K1")
        except KeyInProgress as exc:
            with lock:
                refused.append(exc)
                if len(refused) == 7:
                    others_done.set()
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: call(), range(8)))
    assert calls == 1
    assert sorted(results) == ["paid"] + ["refused"] * 7
    assert all(exc.retry_after >= 1 for exc in refused)
    assert pay("K1") == "paid"
    assert calls == 1


def test_concurrent_calls_with_wait_all_get_the_result(backend: Backend, scope: str) -> None:
    """With wait, 8 threads with one key all return the one execution's result."""
    calls = 0
    started = threading.Event()
    barrier = threading.Barrier(8)

    @idempotent(store=backend.sync(), key="key", scope=scope, wait=60)
    def pay(key: str) -> dict[str, int]:
        nonlocal calls
        calls += 1
        started.set()
        threading.Event().wait(0.3)  # long enough for the others to poll
        return {"payment": calls}

    def call() -> dict[str, int]:
        barrier.wait()
        return pay("K1")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: call(), range(8)))
    assert calls == 1
    assert results == [{"payment": 1}] * 8


def test_exception_releases_the_key(backend: Backend, scope: str) -> None:
    """An exception propagates unchanged and releases the key: the retry executes (shared/cases B04a, B06)."""
    calls = 0
    failure = ValueError("card declined by a flaky upstream")

    @idempotent(store=backend.sync(), key="key", scope=scope)
    def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise failure
        return calls

    with pytest.raises(ValueError, match="flaky") as raised:
        pay("K1")
    assert raised.value is failure
    assert pay("K1") == 2
    assert pay("K1") == 2
    assert calls == 2


def test_hold_verdict_keeps_the_key_in_progress(backend: Backend, scope: str) -> None:
    """An exception with a HOLD verdict holds the key: retries raise KeyHeld (reason: the exception) until hold_ttl."""
    calls = 0

    @idempotent(
        store=backend.sync(),
        key="key",
        scope=scope,
        exception_verdicts={TimeoutError: Verdict.HOLD},
        hold_ttl=1.0,
    )
    def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError("the payment provider did not answer")
        return calls

    with pytest.raises(TimeoutError):
        pay("K1")
    with pytest.raises(KeyHeld, match="exception TimeoutError"):
        pay("K1")
    assert calls == 1
    backend.advance(1.2)
    assert pay("K1") == 2


def test_crashed_call_runs_again_once_its_lease_expires(backend: Backend, scope: str) -> None:
    """A call that died holding the key blocks retries for the lease only, then one retry runs (B03a, B04b)."""
    calls = 0

    @idempotent(store=backend.sync(), key="key", scope=scope, lease_ttl=1.0)
    def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Crash()
        return calls

    with pytest.raises(Crash):
        pay("K1")
    with pytest.raises(KeyInProgress):
        pay("K1")
    backend.advance(1.2)
    assert pay("K1") == 2
    assert pay("K1") == 2
    assert calls == 2


def test_explicit_long_lease_is_honoured(backend: Backend, scope: str) -> None:
    """B03(c): with a lease longer than the default, a crashed call's key stays in progress past 30 s."""
    if backend.clock is None:
        pytest.skip("needs an injected clock")
    calls = 0

    @idempotent(store=backend.sync(), key="key", scope=scope, lease_ttl=3600)
    def pay(key: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Crash()
        return calls

    with pytest.raises(Crash):
        pay("K1")
    backend.advance(31)
    with pytest.raises(KeyInProgress):
        pay("K1")
    backend.advance(3600)
    assert pay("K1") == 2


def test_the_record_is_a_stored_response(backend: Backend, scope: str) -> None:
    """The store keeps the result as status 200, a content-type naming JSON, and the JSON bytes (B10)."""
    store = backend.sync()

    @idempotent(store=store, key="key", scope=scope)
    def order(key: str, qty: int) -> dict[str, int]:
        return {"qty": qty}

    order("K1", 3)
    record = store.get(record_key(scope, "K1", secret=store_secret(store)))
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.response is not None
    assert record.response.status == 200
    assert record.response.headers == ((b"content-type", b"application/vnd.idempo+json"),)
    assert record.response.body == b'{"qty":3}'
    assert len(record.fingerprint) == 64


def test_a_fresh_store_and_decorator_replay_the_record(backend: Backend, scope: str) -> None:
    """A new store instance and a new decorated function (a new process) replay; other arguments mismatch (B10)."""
    calls = 0

    def order(key: str, qty: int) -> list[int]:
        nonlocal calls
        calls += 1
        return [qty, calls]

    assert idempotent(store=backend.sync(), key="key", scope=scope)(order)("K1", 1) == [1, 1]
    again = idempotent(store=backend.sync(), key="key", scope=scope)(order)
    assert again("K1", 1) == [1, 1]
    with pytest.raises(FingerprintMismatch):
        again("K1", 2)
    assert calls == 1


def test_missing_key_runs_without_idempotency(backend: Backend, scope: str) -> None:
    """A None key runs the function every time and stores nothing (shared/cases B09a)."""
    calls = 0

    @idempotent(store=backend.sync(), key="key", scope=scope)
    def order(key: str | None = None) -> int:
        nonlocal calls
        calls += 1
        return calls

    assert order() == 1
    assert order(None) == 2
    assert calls == 2
