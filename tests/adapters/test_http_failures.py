"""HTTP behaviour when things fail: handler errors, crashes, disconnects, store outages.

shared/cases B03, B04, B06, B18; DESIGN guarantees 2 and 5.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from idempo import Marker, Policy, RecordState, Verdict
from tests.adapters.conftest import B_PRIME, K1, ServeFactory, Served
from tests.support.clock import FakeClock, eventually
from tests.support.orders import STREAM_CHUNKS, Orders
from tests.support.stores import write_locked


def record_state(s: Served, key: str = K1) -> RecordState | None:
    """The state of the record for key K1 from 127.0.0.1, read through the store."""
    record = s.record(key)
    return None if record is None else record.state


def test_handler_exception_releases_the_key(serve: ServeFactory) -> None:
    """B04(a): an uncaught handler error answers 500 and releases the key: the retry executes."""
    s = serve()
    failed = s.post(headers={"x-test-raise": "1"})
    assert failed.status_code == 500
    assert record_state(s) is None
    retry = s.post()
    assert retry.status_code == 201
    assert "idempotent-replayed" not in retry.headers
    assert s.post().headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 2


@pytest.mark.parametrize("status", ["500", "503"])
def test_server_error_is_released_then_success_is_stored(serve: ServeFactory, status: str) -> None:
    """B06: a 5xx is not stored; the retry executes and its 201 is what replays."""
    s = serve()
    assert s.post(headers={"x-test-status": status}).status_code == int(status)
    retry = s.post()
    assert retry.status_code == 201
    assert retry.json() == {"order_id": 2}
    replay = s.post()
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == {"order_id": 2}
    assert s.orders.calls == 2


@pytest.mark.parametrize("status", ["408", "409", "425", "429"])
def test_retryable_client_errors_are_not_stored(serve: ServeFactory, status: str) -> None:
    """B06: 408, 409, 425 and 429 may succeed when repeated, so the retry executes."""
    s = serve()
    assert s.post(headers={"x-test-status": status}).status_code == int(status)
    assert s.post().status_code == 201
    assert s.orders.calls == 2


def test_hold_verdict_keeps_answering_409(serve: ServeFactory) -> None:
    """A status mapped to HOLD (unknown outcome) keeps the key in progress: retries get 409, none execute."""
    s = serve(policy=Policy(status_verdicts={504: Verdict.HOLD}, hold_ttl=3600))
    assert s.post(headers={"x-test-status": "504"}).status_code == 504
    s.clock.advance(31)  # past the 30 s lease: the hold outlives it
    held = s.post()
    assert held.status_code == 409
    assert held.json()["type"] == "https://idempo.dev/problems/outcome-unknown"
    assert held.json()["reason"] == "status 504"
    assert "retry-after" not in held.headers
    assert s.orders.calls == 1
    s.clock.advance(3600)
    assert s.post().status_code == 201
    assert s.orders.calls == 2


def test_exception_verdict_can_hold(serve: ServeFactory) -> None:
    """exception_verdicts maps an exception class to HOLD: the retry gets 409 instead of executing."""
    s = serve(policy=Policy(exception_verdicts={RuntimeError: Verdict.HOLD}))
    assert s.post(headers={"x-test-raise": "1"}).status_code == 500
    assert s.post().status_code == 409
    assert s.orders.calls == 1


def test_crash_holds_the_key_only_until_the_lease_expires(serve: ServeFactory) -> None:
    """B03(a): a crash (SystemExit) leaves the lease: 409 at t+10 s, a fresh execution at t+31 s, then replay."""
    s = serve()
    crashed = s.post(headers={"x-test-raise": "exit"})
    assert crashed.status_code == 500
    assert record_state(s) is RecordState.IN_PROGRESS
    s.clock.advance(10)
    assert s.post().status_code == 409
    s.clock.advance(21)
    retry = s.post()
    assert retry.status_code == 201
    assert "idempotent-replayed" not in retry.headers
    assert s.post().headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 2


def test_explicit_long_lease_is_honoured(serve: ServeFactory) -> None:
    """B03(c): with a 3600 s lease, a crashed key answers 409 at t+31 s and executes only after t+3601 s."""
    s = serve(policy=Policy(lease_ttl=3600))
    s.post(headers={"x-test-raise": "exit"})
    s.clock.advance(31)
    assert s.post().status_code == 409
    s.clock.advance(3570)
    assert s.post().status_code == 201
    assert s.orders.calls == 2


def test_client_disconnect_does_not_lose_the_record(serve: ServeFactory) -> None:
    """B04(d): the client gives up mid-handler; the result is still recorded and the retry gets the replay."""
    s = serve()
    with pytest.raises(httpx.ReadTimeout):
        s.post(headers={"x-test-sleep": "0.8"}, timeout=0.2)
    assert eventually(lambda: record_state(s) is RecordState.COMPLETED)
    retry = s.post()
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == {"order_id": 1}
    assert s.orders.calls == 1


def test_client_disconnect_mid_stream_still_records_the_whole_stream(serve: ServeFactory) -> None:
    """B04(c)(d): a streamed answer whose client left is completed anyway; the retry replays it whole."""
    s = serve()
    with pytest.raises(httpx.ReadTimeout):
        s.post(headers={"x-test-sleep": "0.6", "x-test-response": "stream"}, timeout=0.2)
    assert eventually(lambda: record_state(s) is RecordState.COMPLETED)
    replay = s.post(headers={"x-test-response": "stream"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content.endswith(b"binary tail\n")
    assert s.orders.calls == 1


def test_file_response_is_captured_and_replayed(serve: ServeFactory, tmp_path: Path) -> None:
    """B04(c): a FileResponse completes the record like any other answer and replays byte for byte."""
    path = tmp_path / "receipt.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    s = serve(orders=Orders(file_path=path))
    first = s.post(headers={"x-test-response": "file"})
    replay = s.post(headers={"x-test-response": "file"})
    assert first.content == replay.content == path.read_bytes()
    assert replay.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


def test_store_down_at_begin_is_503_and_nothing_runs(serve: ServeFactory, tmp_path: Path) -> None:
    """B18(a): the store cannot take the lease: 503 problem with Retry-After, no execution; after recovery, one."""
    clock = FakeClock()
    path = tmp_path / "idempo.db"
    s = serve(store=serve.sqlite_store(path, clock, busy_timeout=0.1), clock=clock)
    with write_locked(path):
        down = s.post()
        assert down.status_code == 503
        assert down.headers["content-type"] == "application/problem+json"
        assert down.json()["type"] == "https://idempo.dev/problems/store-unavailable"
        assert down.headers["retry-after"] == "1"
        assert s.orders.calls == 0
    assert s.post().status_code == 201
    assert s.post().headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


def test_store_down_at_complete_keeps_the_lease_and_saves_later(serve: ServeFactory, tmp_path: Path) -> None:
    """B18(b), issue 10 item 1: the save fails after the handler ran: the client still gets 201, duplicates get 409
    while the process retries the save, and once the store is back the retry gets the replay: never a second run."""
    clock = FakeClock()
    path = tmp_path / "idempo.db"
    s = serve(store=serve.sqlite_store(path, clock, busy_timeout=0.1), clock=clock)
    locked = threading.Event()
    unlock = threading.Event()

    def hold_lock() -> None:
        with write_locked(path):
            locked.set()
            unlock.wait(30)

    holder = threading.Thread(target=hold_lock)
    # The handler takes long enough for the lock to be taken after begin and before complete.
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(s.post, headers={"x-test-sleep": "0.5"})
        assert eventually(lambda: s.orders.calls == 1)
        holder.start()
        assert locked.wait(10)
        answer = first.result()
    assert answer.status_code == 201
    assert answer.json() == {"order_id": 1}
    assert s.post().status_code == 409  # readers still see the in-progress record
    unlock.set()
    holder.join(10)
    assert eventually(lambda: record_state(s) is RecordState.COMPLETED)
    s.clock.advance(31)  # past the first lease: the record is saved, so nothing is taken over
    replay = s.post()
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == {"order_id": 1}
    assert s.orders.calls == 1


def test_fail_open_runs_the_handler_and_marks_the_answer(serve: ServeFactory, tmp_path: Path) -> None:
    """B18(c): with fail_open the handler runs while the store is down, and the answer says idempotency was bypassed."""
    clock = FakeClock()
    path = tmp_path / "idempo.db"
    s = serve(store=serve.sqlite_store(path, clock, busy_timeout=0.1), clock=clock, policy=Policy(fail_open=True))
    with write_locked(path):
        answer = s.post()
    assert answer.status_code == 201
    assert answer.headers["idempotency-bypassed"] == "store-unavailable"
    assert s.orders.calls == 1


def test_oversized_request_body_is_413_before_anything_is_stored(serve: ServeFactory) -> None:
    """A body over max_request_body is refused with 413 problem+json; nothing runs or is stored."""
    s = serve(policy=Policy(max_request_body=10))
    answer = s.post(body=b'{"sku":"A","qty":1,"note":"more than ten bytes"}')
    assert answer.status_code == 413
    assert answer.json()["type"] == "https://idempo.dev/problems/body-too-large"
    assert s.orders.calls == 0
    assert record_state(s) is None


@pytest.mark.parametrize("kind", ["binary", "stream"])
def test_oversized_response_is_passed_through_and_never_runs_again(serve: ServeFactory, kind: str) -> None:
    """Issue 10 item 3: a response over max_response_body reaches the client whole; the record completes as not
    replayable, every retry gets 410 problem+json (response-not-replayable) and the handler never runs again."""
    s = serve(policy=Policy(max_response_body=10))
    first = s.post(headers={"x-test-response": kind})
    assert first.status_code == 201
    assert len(first.content) == (1024 if kind == "binary" else len(b"".join(STREAM_CHUNKS)))
    record = s.record()
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.marker == Marker(Marker.NOT_REPLAYABLE, "too_large", 201, len(first.content))
    for _ in range(2):
        retry = s.post(headers={"x-test-response": kind})
        assert retry.status_code == 410
        assert retry.headers["content-type"] == "application/problem+json"
        problem = retry.json()
        assert problem["type"] == "https://idempo.dev/problems/response-not-replayable"
        assert problem["first_status"] == 201
    assert s.post(body=B_PRIME).status_code == 422  # another request under the key is still a mismatch
    assert s.orders.calls == 1


def test_client_leaving_mid_upload_runs_nothing_and_stores_nothing(serve: ServeFactory) -> None:
    """A body cut off before its Content-Length never reaches the handler; the complete retry executes (not 422)."""
    import socket
    from urllib.parse import urlsplit

    s = serve()
    parts = urlsplit(s.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        head = (
            b"POST /orders HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: " + K1.encode() + b"\r\nContent-Length: 100\r\n\r\n"
        )
        sock.sendall(head + b'{"sku":"A",')  # then the client goes away
    time.sleep(0.3)  # let the server notice the disconnect
    assert s.orders.calls == 0
    assert record_state(s) is None
    complete = s.post()
    assert complete.status_code == 201
    assert "idempotent-replayed" not in complete.headers
    assert s.orders.calls == 1


def test_unreadable_record_is_a_503_not_a_crash(serve: ServeFactory, tmp_path: Path) -> None:
    """A record the store cannot decode (corrupt headers) answers 503 like any store failure; nothing runs."""
    clock = FakeClock()
    path = tmp_path / "idempo.db"
    s = serve(store=serve.sqlite_store(path, clock), clock=clock)
    assert s.post().status_code == 201
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE idempo_records SET headers = 'not json'")
    answer = s.post()
    assert answer.status_code == 503
    assert answer.json()["type"] == "https://idempo.dev/problems/store-unavailable"
    assert s.orders.calls == 1
