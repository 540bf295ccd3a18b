"""The requests adapter: the same rules as the httpx transport, against the same real server and proxy."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import requests

from idempo import InvalidKey
from idempo.faults import DROP_ANSWER, PASS, Fault, FaultPlan, FaultProxy, scripted
from idempo.requests_adapter import Attempt, IdempotentAdapter, RetryPolicy

from .conftest import Delays, Server

MakeProxy = Callable[[FaultPlan], FaultProxy]
B19_SCRIPT = (DROP_ANSWER, Fault.respond(503, retry_after=1), PASS)


def session(delays: Delays, **kwargs: object) -> requests.Session:
    http = requests.Session()
    adapter = IdempotentAdapter(sleep=delays, **kwargs)  # type: ignore[arg-type]
    http.mount("http://", adapter)
    return http


def keys_seen(proxy: FaultProxy) -> list[list[str]]:
    return [seen.header_values("Idempotency-Key") for seen in proxy.log]


def test_b19a_one_generated_key_for_all_attempts(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(a) with requests: one key on all three attempts, one execution, final 201 (the replay)."""
    proxy = make_proxy(scripted(*B19_SCRIPT))
    with session(delays) as http:
        response = http.post(proxy.url + "/payments", json={"ref": "p1", "amount": 100}, timeout=5)
    assert response.status_code == 201
    assert response.json() == {"payment_id": "pay_p1", "amount": 100, "status": "captured"}
    assert response.headers["Idempotent-Replayed"] == "true"
    seen = keys_seen(proxy)
    assert len(seen) == 3
    assert all(len(lines) == 1 for lines in seen)
    assert len({lines[0] for lines in seen}) == 1
    assert response.request.headers["Idempotency-Key"] == seen[0][0]
    assert server.app.executions["p1"] == 1
    assert delays[1] == 1.0  # the 503's Retry-After


def test_b19b_key_in_lowercase_header_is_kept(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(b) with requests: a lower-case key header is kept as is; no second header line is added."""
    proxy = make_proxy(scripted(DROP_ANSWER))
    with session(delays) as http:
        response = http.post(
            proxy.url + "/payments", json={"ref": "p1", "amount": 1}, headers={"idempotency-key": "K1"}
        )
    assert response.status_code == 201
    for seen in proxy.log:
        assert [(n, v) for n, v in seen.head.headers if n.lower() == "idempotency-key"] == [("idempotency-key", "K1")]
    assert server.app.executions["p1"] == 1


def test_malformed_key_header_fails_before_sending(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A key header that is not one valid key is an InvalidKey error; nothing is sent."""
    proxy = make_proxy(scripted())
    with session(delays) as http, pytest.raises(InvalidKey):
        http.post(proxy.url + "/payments", json={"ref": "p1", "amount": 1}, headers={"Idempotency-Key": "a, b"})
    assert proxy.log == []


def test_422_is_not_retried(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A 422 (key reused for another body) is final with requests too: one attempt, no wait."""
    proxy = make_proxy(scripted())
    attempts: list[Attempt[requests.Response]] = []
    with session(delays, on_attempt=attempts.append) as http:
        url = proxy.url + "/payments"
        http.post(url, json={"ref": "p1", "amount": 100}, headers={"Idempotency-Key": "K1"})
        response = http.post(url, json={"ref": "p1", "amount": 200}, headers={"Idempotency-Key": "K1"})
    assert response.status_code == 422
    assert len(proxy.log) == 2
    assert [(a.status, a.delay) for a in attempts] == [(201, None), (422, None)]
    assert delays == []


def test_retry_after_is_honoured(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A 503 with Retry-After: 2 and a 409 with Retry-After: 0 are retried after exactly those delays."""
    proxy = make_proxy(scripted(Fault.respond(503, retry_after=2), Fault.respond(409, retry_after=0)))
    with session(delays) as http:
        response = http.post(proxy.url + "/payments", json={"ref": "p1", "amount": 1})
    assert response.status_code == 201
    assert delays == [2.0, 0.0]
    assert len(proxy.log) == 3


def test_post_without_key_is_not_retried(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """With keys disabled, a POST whose answer is lost raises after one attempt."""
    proxy = make_proxy(scripted(DROP_ANSWER))
    with session(delays, retry=RetryPolicy(key_methods=())) as http, pytest.raises(requests.ConnectionError):
        http.post(proxy.url + "/payments", json={"ref": "p1", "amount": 1})
    assert keys_seen(proxy) == [[]]
    assert delays == []


def test_key_visible_on_exception(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(d) with requests: when every answer is lost the raised exception carries the key."""
    proxy = make_proxy(scripted(DROP_ANSWER, DROP_ANSWER))
    with session(delays, retry=RetryPolicy(attempts=2)) as http, pytest.raises(requests.ConnectionError) as caught:
        http.post(proxy.url + "/payments", json={"ref": "p1", "amount": 1})
    assert caught.value.idempotency_key == keys_seen(proxy)[0][0]  # type: ignore[attr-defined]
    assert server.app.executions["p1"] == 1


def test_generator_body_is_replayed(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """A generator body is read once, so the retry sends the same bytes (with a Content-Length)."""
    proxy = make_proxy(scripted(DROP_ANSWER))

    def chunks() -> Iterator[bytes]:
        yield b'{"ref": "p1", '
        yield b'"amount": 1}'

    with session(delays) as http:
        response = http.post(proxy.url + "/payments", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 201
    assert [seen.body for seen in proxy.log] == [b'{"ref": "p1", "amount": 1}'] * 2
    assert proxy.log[1].header_values("Content-Length") == ["26"]
    assert server.app.executions["p1"] == 1


def test_get_is_retried_without_a_key(server: Server, make_proxy: MakeProxy, delays: Delays) -> None:
    """B19(e) with requests: a GET is retried and carries no key."""
    proxy = make_proxy(scripted(Fault.respond(502)))
    with session(delays) as http:
        response = http.get(proxy.url + "/payments/pay_p1")
    assert response.status_code == 200
    assert keys_seen(proxy) == [[], []]


def test_max_retries_is_refused() -> None:
    """urllib3's retries cannot be stacked on the adapter's own."""
    with pytest.raises(TypeError, match="retry=RetryPolicy"):
        IdempotentAdapter(max_retries=3)


def test_500_from_the_server_is_retried_under_the_same_key(
    server: Server, make_proxy: MakeProxy, delays: Delays
) -> None:
    """The handler's 500 released the key; the adapter retries it under the same key (one policy, both fronts)."""
    proxy = make_proxy(scripted())
    with session(delays) as http:
        response = http.post(proxy.url + "/payments", json={"ref": "p1", "amount": 1, "fail_first": 1})
    assert response.status_code == 201
    seen = keys_seen(proxy)
    assert len(seen) == 2
    assert seen[0] == seen[1] == [response.request.headers["Idempotency-Key"]]
    assert (server.app.failures["p1"], server.app.executions["p1"]) == (1, 1)
    assert len(delays) == 1


def test_giving_up_returns_the_last_response_and_raise_for_status_names_the_key(
    server: Server, make_proxy: MakeProxy, delays: Delays
) -> None:
    """After the last attempt the last 500 comes back; raise_for_status's HTTPError carries the request and its key."""
    proxy = make_proxy(scripted(*[Fault.respond(500, body=b"down")] * 2))
    with session(delays, retry=RetryPolicy(attempts=2)) as http:
        response = http.post(proxy.url + "/payments", json={"ref": "p1", "amount": 1})
    assert response.status_code == 500
    assert response.content == b"down"
    key = keys_seen(proxy)[0][0]
    assert keys_seen(proxy) == [[key], [key]]
    with pytest.raises(requests.HTTPError) as caught:
        response.raise_for_status()
    assert caught.value.request is not None
    assert caught.value.request.headers["Idempotency-Key"] == key
    assert server.app.executions["p1"] == 0
