"""The fault proxy itself: plans, and faithful forwarding when no fault applies."""

from __future__ import annotations

import httpx
import pytest

from idempo.faults import (
    DROP_ANSWER,
    PASS,
    RESET_BEFORE_BODY,
    Fault,
    FaultKind,
    FaultProxy,
    RequestHead,
    random_faults,
    scripted,
)

from .conftest import Server

POST = RequestHead("POST", "/payments", ())
GET = RequestHead("GET", "/payments/1", ())


def test_scripted_plan_then_default() -> None:
    """A scripted plan applies its faults in order, then its `then` fault to every later request."""
    plan = scripted(DROP_ANSWER, RESET_BEFORE_BODY, then=Fault.respond(502))
    assert [plan(POST).kind for _ in range(4)] == [
        FaultKind.DROP_ANSWER,
        FaultKind.RESET_BEFORE_BODY,
        FaultKind.RESPOND,
        FaultKind.RESPOND,
    ]


def test_random_plan_is_seeded_and_filtered() -> None:
    """The same seed gives the same faults; methods outside `methods` always pass; fractions are checked."""
    first = random_faults(3, drop_answer=0.5, methods={"POST"})
    second = random_faults(3, drop_answer=0.5, methods={"POST"})
    draws = [first(POST) for _ in range(200)]
    assert draws == [second(POST) for _ in range(200)]
    assert 60 < draws.count(DROP_ANSWER) < 140
    assert {first(GET) for _ in range(50)} == {PASS}
    with pytest.raises(ValueError, match="at most 1"):
        random_faults(1, drop_answer=0.6, stall=0.6)


def test_pass_forwards_faithfully(server: Server) -> None:
    """With no fault, the proxy answers what the server answers: status, headers and body bytes."""
    with FaultProxy(server.url) as proxy, httpx.Client() as http:
        direct = http.post(server.url + "/payments", json={"ref": "a", "amount": 1})
        proxied = http.post(proxy.url + "/payments", json={"ref": "b", "amount": 1})
        head = http.head(proxy.url + "/payments/pay_a")
    assert proxied.status_code == direct.status_code == 201
    assert proxied.content == direct.content.replace(b'"a"', b'"b"').replace(b"pay_a", b"pay_b")
    assert proxied.headers["location"] == "/payments/pay_b"
    assert proxied.headers["content-type"] == "application/json"
    assert head.status_code == 200
    assert head.content == b""
    assert [seen.method for seen in proxy.log] == ["POST", "HEAD"]
    assert proxy.log[0].connection == proxy.log[1].connection  # keep-alive across requests


def test_faults_seen_by_a_plain_client(server: Server) -> None:
    """Each fault looks to a client as it would on a real network: lost answer, reset, gateway 503."""
    plan = scripted(DROP_ANSWER, RESET_BEFORE_BODY, Fault.respond(503, retry_after=7))
    with FaultProxy(server.url, plan) as proxy, httpx.Client(base_url=proxy.url) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            http.post("/payments", json={"ref": "a", "amount": 1})
        with pytest.raises((httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
            http.post("/payments", json={"ref": "b", "amount": 1})
        unavailable = http.post("/payments", json={"ref": "c", "amount": 1})
    assert unavailable.status_code == 503
    assert unavailable.headers["retry-after"] == "7"
    assert dict(server.app.executions) == {"a": 1}
