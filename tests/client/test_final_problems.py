"""The client never retries a final problem: 409 ``outcome-unknown`` (a held key) or 410 ``response-not-replayable``.

A real idempo server (uvicorn, memory store) answers them: a 504 its policy
holds makes every retry of the key a 409 ``outcome-unknown`` without
Retry-After, and a first answer over ``max_response_body`` makes every retry
a 410. Retrying either only spends the attempts (and, for 409, the time: the
key stays held for ``hold_ttl``). The retry policy here retries 410 too, so
only the problem type can stop it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import requests

from idempo import Policy, Verdict
from idempo.asgi import IdempotencyMiddleware
from idempo.client import AsyncIdempotentTransport, Attempt, IdempotentTransport, RetryPolicy
from idempo.faults import serve_app
from idempo.requests_adapter import IdempotentAdapter
from idempo.stores import AsyncMemoryStore

RETRY = RetryPolicy(attempts=4, retry_statuses={409, 410, 429, 500, 502, 503, 504})
UNKNOWN = "https://idempo.dev/problems/outcome-unknown"
GONE = "https://idempo.dev/problems/response-not-replayable"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/held`` answers 504 (held by the policy); ``/big`` answers a body over max_response_body."""
    while (await receive())["type"] != "http.request":
        pass
    status, body = (504, b"gateway") if scope["path"] == "/held" else (200, b"x" * 100)
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The app behind idempo: 504 held, answers over 16 bytes not kept."""
    policy = Policy(status_verdicts={504: Verdict.HOLD}, max_response_body=16)
    with serve_app(IdempotencyMiddleware(app, AsyncMemoryStore(), policy=policy)) as base:
        yield base


class Attempts(list[Attempt[Any]]):
    """The on_attempt hook: every attempt, in order."""

    def __call__(self, attempt: Attempt[Any]) -> None:
        self.append(attempt)


def no_sleep(seconds: float) -> None:
    """Retries go at once: the test counts attempts, not time."""


def test_httpx_stops_at_outcome_unknown_and_at_not_replayable(url: str) -> None:
    """The 504 is retried once; the 409 outcome-unknown it turns into is final. A 410 is final at once."""
    attempts = Attempts()
    transport = IdempotentTransport(retry=RETRY, on_attempt=attempts, sleep=no_sleep)
    with httpx.Client(transport=transport, base_url=url) as client:
        held = client.post("/held", content=b"{}", extensions={"idempotency_key": "held-httpx"})
        assert held.status_code == 409
        assert held.json()["type"] == UNKNOWN
        assert [a.status for a in attempts] == [504, 409]
        attempts.clear()
        assert client.post("/big", content=b"{}", extensions={"idempotency_key": "big-httpx"}).status_code == 200
        gone = client.post("/big", content=b"{}", extensions={"idempotency_key": "big-httpx"})
        assert gone.status_code == 410
        assert gone.json()["type"] == GONE
        assert [a.status for a in attempts] == [200, 410]


def test_async_httpx_stops_at_outcome_unknown(url: str) -> None:
    """The async transport makes the same decision."""
    attempts = Attempts()

    async def main() -> httpx.Response:
        async def sleep(seconds: float) -> None:
            pass

        transport = AsyncIdempotentTransport(retry=RETRY, on_attempt=attempts, sleep=sleep)
        async with httpx.AsyncClient(transport=transport, base_url=url) as client:
            return await client.post("/held", content=b"{}", extensions={"idempotency_key": "held-async"})

    held = anyio.run(main)
    assert held.json()["type"] == UNKNOWN
    assert [a.status for a in attempts] == [504, 409]


def test_requests_stops_at_outcome_unknown_and_at_not_replayable(url: str) -> None:
    """The requests adapter makes the same decisions."""
    attempts = Attempts()
    session = requests.Session()
    session.mount("http://", IdempotentAdapter(retry=RETRY, on_attempt=attempts, sleep=no_sleep))
    with session:
        held = session.post(f"{url}/held", data=b"{}", headers={"Idempotency-Key": "held-requests"})
        assert held.status_code == 409
        assert held.json()["type"] == UNKNOWN
        assert [a.status for a in attempts] == [504, 409]
        attempts.clear()
        session.post(f"{url}/big", data=b"{}", headers={"Idempotency-Key": "big-requests"})
        gone = session.post(f"{url}/big", data=b"{}", headers={"Idempotency-Key": "big-requests"})
        assert gone.json()["type"] == GONE
        assert [a.status for a in attempts] == [200, 410]
