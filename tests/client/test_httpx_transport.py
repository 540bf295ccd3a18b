"""The httpx transports against a real uvicorn server behind a real fault proxy."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from idempo import InvalidKey
from idempo.client import DEFAULT_RETRY_STATUSES, AsyncIdempotentTransport, Attempt, IdempotentTransport, RetryPolicy
from idempo.faults import DROP_ANSWER, PASS, RESET_BEFORE_BODY, Fault, FaultPlan, FaultProxy, scripted

from .conftest import Delays, Server

MakeProxy = Callable[[FaultPlan], FaultProxy]

# shared/cases B19: attempt 1 executes and its answer is lost; attempt 2 gets a
# 503; attempt 3 gets the server's stored 201.
B19_SCRIPT = (DROP_ANSWER, Fault.respond(503, retry_after=1), PASS)


def payment(ref: str = "p1", amount: int = 100) -> dict[str, object]:
    return {"ref": ref, "amount": amount}


def keys_seen(proxy: FaultProxy) -> list[list[str]]:
    """The Idempotency-Key header lines of every request the proxy saw."""
    return [seen.header_values("Idempotency-Key") for seen in proxy.log]


def client(proxy: FaultProxy, delays: Delays, **kwargs: object) -> httpx.Client:
    transport = IdempotentTransport(sleep=delays, **kwargs)  # type: ignore[arg-type]
    return httpx.Client(transport=transport, base_url=proxy.url, timeout=5)


def test_b19a_one_generated_key_for_all_attempts(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(a): a POST without a key gets one key, sent unchanged on all three attempts; one execution, final 201."""
    proxy = make_proxy(scripted(*B19_SCRIPT))
    with client(proxy, delays) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 201
    assert response.json() == {"payment_id": "pay_p1", "amount": 100, "status": "captured"}
    assert response.headers["Idempotent-Replayed"] == "true"
    seen = keys_seen(proxy)
    assert len(seen) == 3
    assert all(len(lines) == 1 for lines in seen)
    assert len({lines[0] for lines in seen}) == 1
    uuid.UUID(seen[0][0], version=4)
    assert server.app.executions["p1"] == 1
    assert delays[1] == 1.0  # the 503's Retry-After; delays[0] is the backoff after the lost answer


@pytest.mark.anyio
async def test_b19a_async_one_generated_key_for_all_attempts(
    server: Server, make_proxy: MakeProxy, delays: Delays
) -> None:
    """B19(a), async transport: one key on every attempt, one execution, final 201 (asyncio and trio)."""
    proxy = make_proxy(scripted(*B19_SCRIPT))
    transport = AsyncIdempotentTransport(sleep=delays.asleep)
    async with httpx.AsyncClient(transport=transport, base_url=proxy.url, timeout=5) as http:
        response = await http.post("/payments", json=payment())
    assert response.status_code == 201
    seen = keys_seen(proxy)
    assert len(seen) == 3
    assert len({lines[0] for lines in seen}) == 1
    assert all(len(lines) == 1 for lines in seen)
    assert server.app.executions["p1"] == 1
    assert delays[1] == 1.0


def test_b19b_key_given_as_extension_is_sent_unchanged(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(b): a key given through the request extension is carried unchanged by every attempt."""
    proxy = make_proxy(scripted(*B19_SCRIPT))
    with client(proxy, delays) as http:
        response = http.post("/payments", json=payment(), extensions={"idempotency_key": "order-42"})
    assert response.status_code == 201
    assert keys_seen(proxy) == [["order-42"]] * 3
    assert server.app.executions["p1"] == 1


def test_b19b_key_in_lowercase_header_is_kept_without_a_second_header(
    server: Server, make_proxy: MakeProxy, delays: Delays
) -> None:
    """B19(b): a key in a lower-case header is kept as is; no second Idempotency-Key line is added."""
    proxy = make_proxy(scripted(*B19_SCRIPT))
    with client(proxy, delays) as http:
        response = http.post("/payments", json=payment(), headers={"idempotency-key": "K1"})
    assert response.status_code == 201
    for seen in proxy.log:
        lines = [(name, value) for name, value in seen.head.headers if name.lower() == "idempotency-key"]
        assert lines == [("idempotency-key", "K1")]
    assert server.app.executions["p1"] == 1


def test_b19b_key_given_both_ways_differently_fails_before_sending(
    server: Server, make_proxy: MakeProxy, delays: Delays
) -> None:
    """B19(b): a key in the header and another as the extension is an InvalidKey error; nothing is sent."""
    proxy = make_proxy(scripted())
    with client(proxy, delays) as http, pytest.raises(InvalidKey, match="K2"):
        http.post("/payments", json=payment(), headers={"Idempotency-Key": "K1"}, extensions={"idempotency_key": "K2"})
    assert proxy.log == []
    assert server.app.executions["p1"] == 0


def test_b19b_same_key_given_both_ways_is_sent_once(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(b): the same key as header and extension is accepted and sent as one header line."""
    proxy = make_proxy(scripted())
    with client(proxy, delays) as http:
        response = http.post(
            "/payments", json=payment(), headers={"Idempotency-Key": "K1"}, extensions={"idempotency_key": "K1"}
        )
    assert response.status_code == 201
    assert keys_seen(proxy) == [["K1"]]


def test_b19c_separate_calls_get_different_keys(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(c): two logical calls (not retries) carry two different keys and both execute."""
    proxy = make_proxy(scripted())
    with client(proxy, delays) as http:
        first = http.post("/payments", json=payment())
        second = http.post("/payments", json=payment())
    seen = keys_seen(proxy)
    assert len(seen) == 2
    assert seen[0] != seen[1]
    assert first.request.headers["Idempotency-Key"] != second.request.headers["Idempotency-Key"]
    assert server.app.executions["p1"] == 2


def test_b19d_key_visible_on_response(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(d): the generated key is on response.request.headers and in response.extensions."""
    proxy = make_proxy(scripted(*B19_SCRIPT))
    with client(proxy, delays) as http:
        response = http.post("/payments", json=payment())
    key = keys_seen(proxy)[0][0]
    assert response.request.headers["Idempotency-Key"] == key
    assert response.extensions["idempotency_key"] == key


def test_b19d_key_visible_on_exception_and_reusable(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(d): when every answer is lost the exception carries the key; a later call with it gets the replay."""
    proxy = make_proxy(scripted(DROP_ANSWER, DROP_ANSWER, DROP_ANSWER))
    with client(proxy, delays, retry=RetryPolicy(attempts=3, wait_initial=0)) as http:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            http.post("/payments", json=payment())
        key = keys_seen(proxy)[0][0]
        assert caught.value.idempotency_key == key  # type: ignore[attr-defined]
        assert caught.value.request.headers["Idempotency-Key"] == key
        assert any(key in note for note in caught.value.__notes__)
        later = http.post("/payments", json=payment(), extensions={"idempotency_key": key})
    assert later.status_code == 201
    assert later.headers["Idempotent-Replayed"] == "true"
    assert len(proxy.log) == 4
    assert server.app.executions["p1"] == 1


def test_b19e_get_is_retried_without_a_key(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(e): a GET is retried (idempotent by method) and no attempt carries an Idempotency-Key."""
    proxy = make_proxy(scripted(Fault.respond(503, retry_after=2), RESET_BEFORE_BODY))
    with client(proxy, delays) as http:
        response = http.get("/payments/pay_p1")
    assert response.status_code == 200
    assert keys_seen(proxy) == [[], [], []]
    assert delays[0] == 2.0
    assert "idempotency_key" not in response.extensions


def test_b19e_get_carries_a_key_when_configured(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(e): with GET among key_methods, every GET attempt carries the same key."""
    proxy = make_proxy(scripted(Fault.respond(503, retry_after=0)))
    policy = RetryPolicy(key_methods={"POST", "PATCH", "GET"})
    with client(proxy, delays, retry=policy) as http:
        response = http.get("/payments/pay_p1")
    assert response.status_code == 200
    seen = keys_seen(proxy)
    assert len(seen) == 2
    assert seen[0] == seen[1]
    assert len(seen[0]) == 1


def test_post_without_key_is_not_retried(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A POST sent with keys disabled is sent once: a lost answer is raised, not retried."""
    proxy = make_proxy(scripted(DROP_ANSWER))
    with client(proxy, delays, retry=RetryPolicy(key_methods=())) as http, pytest.raises(httpx.RemoteProtocolError):
        http.post("/payments", json=payment())
    assert keys_seen(proxy) == [[]]
    assert delays == []


def test_post_without_key_gets_its_503(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A POST without a key gets a 503 back after one attempt, even with a Retry-After."""
    proxy = make_proxy(scripted(Fault.respond(503, retry_after=1)))
    with client(proxy, delays, retry=RetryPolicy(key_methods=())) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 503
    assert len(proxy.log) == 1
    assert delays == []


def test_422_is_not_retried(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A 422 (the key was used for another request) is final: one attempt, no wait."""
    proxy = make_proxy(scripted())
    attempts: list[Attempt[httpx.Response]] = []
    with client(proxy, delays, on_attempt=attempts.append) as http:
        http.post("/payments", json=payment(amount=100), extensions={"idempotency_key": "K1"})
        response = http.post("/payments", json=payment(amount=200), extensions={"idempotency_key": "K1"})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert len(proxy.log) == 2
    assert [(a.number, a.status, a.delay) for a in attempts] == [(1, 201, None), (1, 422, None)]
    assert delays == []
    assert server.app.executions["p1"] == 1


def test_400_is_not_retried_even_with_retry_after(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A 400 is final, from the app or with a Retry-After from a gateway: one attempt each, no wait."""
    proxy = make_proxy(scripted(Fault.respond(400, retry_after=1)))
    with client(proxy, delays) as http:
        from_gateway = http.post("/payments", json=payment())
        from_app = http.post("/payments", json=payment(amount=0))
    assert (from_gateway.status_code, from_app.status_code) == (400, 400)
    assert from_app.json() == {"error": "amount must be positive"}
    assert len(proxy.log) == 2
    assert delays == []


def test_503_retry_after_seconds_and_http_date(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """Retry-After is honoured as seconds and as an HTTP-date: the transport asks for those delays."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    proxy = make_proxy(scripted(Fault.respond(503, retry_after=3), Fault.respond(429, retry_after=when)))
    with client(proxy, delays, retry=RetryPolicy(timeout=120)) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 201
    assert delays[0] == 3.0
    assert 50 < delays[1] <= 60
    assert len(proxy.log) == 3


def test_409_in_progress_is_retried_after_its_retry_after(server: Server, make_proxy: MakeProxy) -> None:
    """A read timeout while the handler runs, then the server's real 409 with Retry-After: 1, then the replay."""
    proxy = make_proxy(scripted())
    asked: list[float] = []

    def sleep(seconds: float) -> None:
        asked.append(seconds)
        if seconds == 1.0:  # the 409's Retry-After: let the held execution finish, then retry
            server.app.gate.set()
            while not server.app.executions["p1"]:
                time.sleep(0.01)

    attempts: list[Attempt[httpx.Response]] = []
    transport = IdempotentTransport(
        sleep=sleep, retry=RetryPolicy(wait_initial=0, attempts=10), on_attempt=attempts.append
    )
    with httpx.Client(transport=transport, base_url=proxy.url, timeout=httpx.Timeout(5, read=0.3)) as http:
        response = http.post("/payments", json={**payment(), "block": True})
    assert response.status_code == 201
    assert response.headers["Idempotent-Replayed"] == "true"
    assert isinstance(attempts[0].error, httpx.ReadTimeout)
    in_progress = [a for a in attempts if a.status == 409]
    assert in_progress
    assert all(a.delay == 1.0 for a in in_progress)
    assert len({tuple(lines) for lines in keys_seen(proxy)}) == 1
    assert server.app.executions["p1"] == 1


def test_read_timeout_is_retried_under_the_key(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """An answer stalled beyond the client's read timeout is retried with the same key and replayed."""
    proxy = make_proxy(scripted(Fault.stall(2.0)))
    transport = IdempotentTransport(sleep=delays, retry=RetryPolicy(wait_initial=0))
    with httpx.Client(transport=transport, base_url=proxy.url, timeout=httpx.Timeout(5, read=0.3)) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 201
    assert response.headers["Idempotent-Replayed"] == "true"
    assert len(set(map(tuple, keys_seen(proxy)))) == 1
    assert server.app.executions["p1"] == 1


def test_reset_before_body_is_retried(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A connection reset before the body was read is retried; the server executes the second attempt only."""
    proxy = make_proxy(scripted(RESET_BEFORE_BODY))
    with client(proxy, delays) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    assert proxy.log[0].body == b""
    assert server.app.executions["p1"] == 1


def test_streamed_body_is_replayed_byte_for_byte(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A generator request body is read once, so the retry after a lost answer sends the same bytes."""
    proxy = make_proxy(scripted(DROP_ANSWER))

    def chunks() -> Iterator[bytes]:
        yield b'{"ref": "p1", '
        yield b'"amount": 100}'

    with client(proxy, delays) as http:
        response = http.post("/payments", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 201
    assert [seen.body for seen in proxy.log] == [b'{"ref": "p1", "amount": 100}'] * 2
    assert json.loads(proxy.log[1].body) == payment()
    assert server.app.executions["p1"] == 1


def test_attempts_bound(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """After `attempts` attempts the last retryable answer is returned as it is."""
    proxy = make_proxy(scripted(*[Fault.respond(502)] * 10))
    attempts: list[Attempt[httpx.Response]] = []
    with client(proxy, delays, retry=RetryPolicy(attempts=3), on_attempt=attempts.append) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 502
    assert len(proxy.log) == 3
    assert len(delays) == 2
    assert [a.delay is None for a in attempts] == [False, False, True]
    assert server.app.executions["p1"] == 0


def test_total_time_bound(server: Server, make_proxy: MakeProxy) -> None:
    """No wait starts that would end past `timeout`: 503s with Retry-After 0.4 under a 1 s budget give 3 attempts."""
    proxy = make_proxy(scripted(*[Fault.respond(503, retry_after="0.4")] * 10))
    now = [100.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    transport = IdempotentTransport(sleep=sleep, clock=lambda: now[0], retry=RetryPolicy(attempts=10, timeout=1.0))
    with httpx.Client(transport=transport, base_url=proxy.url, timeout=5) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 503
    assert len(proxy.log) == 3
    assert now[0] == pytest.approx(100.8)


def test_retry_after_beyond_the_budget_returns_at_once(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A Retry-After longer than the time left is not slept: the 503 is returned with its key."""
    proxy = make_proxy(scripted(Fault.respond(503, retry_after=3600)))
    with client(proxy, delays, retry=RetryPolicy(timeout=10)) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3600"
    assert response.extensions["idempotency_key"] == keys_seen(proxy)[0][0]
    assert delays == []


def test_backoff_is_full_jitter_within_its_bounds(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """Without Retry-After, retry n waits between 0 and min(wait_max, wait_initial * 2**(n-1))."""
    proxy = make_proxy(scripted(*[Fault.respond(502)] * 5))
    policy = RetryPolicy(attempts=6, wait_initial=0.1, wait_max=0.25)
    with client(proxy, delays, retry=policy) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 201
    bounds = [0.1, 0.2, 0.25, 0.25, 0.25]
    assert len(delays) == 5
    assert all(0 <= delay <= bound for delay, bound in zip(delays, bounds, strict=True))


# --- 500: retried under the key (issue 17, item 4) -------------------------------------------


def test_500_from_the_server_is_retried_under_the_same_key(
    server: Server, make_proxy: MakeProxy, delays: Delays
) -> None:
    """The handler answers 500 (the middleware releases the key), the retry under the same key executes: 201."""
    proxy = make_proxy(scripted())
    attempts: list[Attempt[httpx.Response]] = []
    policy = RetryPolicy(wait_initial=0.1, wait_max=0.1)
    with client(proxy, delays, retry=policy, on_attempt=attempts.append) as http:
        response = http.post("/payments", json={**payment(), "fail_first": 1})
        again = http.post(
            "/payments",
            json={**payment(), "fail_first": 1},
            extensions={"idempotency_key": response.extensions["idempotency_key"]},
        )
    assert response.status_code == 201
    assert [a.status for a in attempts[:2]] == [500, 201]
    assert attempts[0].delay is not None
    assert 0 <= attempts[0].delay <= 0.1
    seen = keys_seen(proxy)
    assert len(seen) == 3  # the third is the replayed call
    assert seen[0] == seen[1] == [response.request.headers["Idempotency-Key"]]
    assert (server.app.failures["p1"], server.app.executions["p1"]) == (1, 1)
    assert again.headers["Idempotent-Replayed"] == "true"  # the 201 was stored, the 500 was not
    assert server.app.executions["p1"] == 1


@pytest.mark.anyio
async def test_500_is_retried_by_the_async_transport(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """The async transport retries a 500 under the same key too (asyncio and trio)."""
    proxy = make_proxy(scripted(Fault.respond(500)))
    transport = AsyncIdempotentTransport(sleep=delays.asleep)
    async with httpx.AsyncClient(transport=transport, base_url=proxy.url, timeout=5) as http:
        response = await http.post("/payments", json=payment())
    assert response.status_code == 201
    seen = keys_seen(proxy)
    assert len(seen) == 2
    assert seen[0] == seen[1]
    assert server.app.executions["p1"] == 1
    assert len(delays) == 1


def test_500_without_a_key_is_final(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A POST without a key gets its 500 after one attempt: the client cannot know what the server did."""
    proxy = make_proxy(scripted(Fault.respond(500)))
    with client(proxy, delays, retry=RetryPolicy(key_methods=())) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 500
    assert len(proxy.log) == 1
    assert delays == []


def test_500_can_be_made_final(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """retry_statuses without 500 returns the 500 after one attempt, with its key."""
    proxy = make_proxy(scripted(Fault.respond(500)))
    policy = RetryPolicy(retry_statuses=DEFAULT_RETRY_STATUSES - {500})
    with client(proxy, delays, retry=policy) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 500
    assert len(proxy.log) == 1
    assert response.request.headers["Idempotency-Key"] == keys_seen(proxy)[0][0]


# --- giving up: the last response, its key, raise_for_status (issue 17, item 5) --------------


def test_giving_up_returns_the_last_response_with_its_key(
    server: Server, make_proxy: MakeProxy, delays: Delays
) -> None:
    """After the last attempt the last 500 comes back, body read; its request header holds the key all attempts sent."""
    body = b'{"error":"still down"}'
    proxy = make_proxy(scripted(*[Fault.respond(500, body=body)] * 3))
    with client(proxy, delays, retry=RetryPolicy(attempts=3)) as http:
        response = http.post("/payments", json=payment())
    assert response.status_code == 500
    assert response.content == body
    assert keys_seen(proxy) == [[response.request.headers["Idempotency-Key"]]] * 3
    with pytest.raises(httpx.HTTPStatusError) as caught:
        response.raise_for_status()
    assert caught.value.request.headers["Idempotency-Key"] == keys_seen(proxy)[0][0]
    assert server.app.executions["p1"] == 0


def test_the_last_409_after_the_deadline_and_a_422_raise_with_their_key(
    server: Server, make_proxy: MakeProxy, delays: Delays
) -> None:
    """A 409 whose Retry-After passes the deadline and a 422 come back as responses; raise_for_status names the key."""
    proxy = make_proxy(scripted(Fault.respond(409, retry_after=60)))
    hooked: list[int] = []

    def raise_for_status(response: httpx.Response) -> None:
        hooked.append(response.status_code)
        response.raise_for_status()

    transport = IdempotentTransport(sleep=delays, retry=RetryPolicy(timeout=10))
    with httpx.Client(
        transport=transport, base_url=proxy.url, timeout=5, event_hooks={"response": [raise_for_status]}
    ) as http:
        with pytest.raises(httpx.HTTPStatusError) as conflict:
            http.post("/payments", json=payment(), extensions={"idempotency_key": "K1"})
        http.post("/payments", json=payment(), extensions={"idempotency_key": "K1"})
        with pytest.raises(httpx.HTTPStatusError) as mismatch:
            http.post("/payments", json=payment(amount=5), extensions={"idempotency_key": "K1"})
    assert conflict.value.response.status_code == 409
    assert mismatch.value.response.status_code == 422
    assert conflict.value.request.headers["Idempotency-Key"] == "K1"
    assert mismatch.value.request.headers["Idempotency-Key"] == "K1"
    assert hooked == [409, 201, 422]  # once per logical request, after its retries
    assert delays == []
    assert server.app.executions["p1"] == 1
