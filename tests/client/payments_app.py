"""The payments server the client tests run against: a raw ASGI app behind idempo's middleware.

``POST /payments`` with ``{"ref": str, "amount": int}`` charges once per
execution (counted in :attr:`PaymentsApp.executions`, by ref) and answers 201
with a body that depends only on the request, so a run with faults can be
compared byte for byte with a run without. ``amount <= 0`` is a 400;
``"block": true`` holds the handler until :attr:`PaymentsApp.gate` is set;
``"fail_first": n`` makes the first ``n`` executions of that ref answer 500
(counted in :attr:`PaymentsApp.failures`), as a handler hitting a database
blip would. ``GET`` answers 200.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from idempo.asgi import IdempotencyMiddleware
from idempo.client import AsyncIdempotentTransport, Attempt, RetryPolicy
from idempo.stores.memory import AsyncMemoryStore

Message = MutableMapping[str, Any]


class PaymentsApp:
    """The handler: counts executions per payment ref."""

    def __init__(self) -> None:
        self.executions: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.gate = threading.Event()
        self.blocked = threading.Event()

    async def __call__(
        self, scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        if scope["method"] != "POST":
            await _answer(send, 200, {"ok": True})
            return
        payment = json.loads(body)
        if payment.get("amount", 0) <= 0:
            await _answer(send, 400, {"error": "amount must be positive"})
            return
        if payment.get("block"):
            self.blocked.set()
            # The gate is a threading.Event set by the test's thread, so poll it.
            while not self.gate.is_set():  # noqa: ASYNC110
                await anyio.sleep(0.005)
        ref = payment["ref"]
        if self.failures[ref] < payment.get("fail_first", 0):
            self.failures[ref] += 1
            await _answer(send, 500, {"error": "database unavailable"})
            return
        self.executions[ref] += 1
        answer = {"payment_id": f"pay_{ref}", "amount": payment["amount"], "status": "captured"}
        await _answer(send, 201, answer, [(b"location", f"/payments/pay_{ref}".encode())])


async def _answer(
    send: Callable[[Message], Awaitable[None]],
    status: int,
    payload: object,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    all_headers = [(b"content-type", b"application/json"), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


def protected(app: PaymentsApp) -> IdempotencyMiddleware:
    """The app behind idempo's ASGI middleware with an in-memory store (default policy)."""
    return IdempotencyMiddleware(app, AsyncMemoryStore())


@dataclass
class PaymentRun:
    """What a batch of payments ended with.

    Attributes:
        answers: ref -> (final status, final body bytes); an exception's class name as status when one was raised.
        attempts: HTTP attempts made, retries included.
        seconds: wall time of the batch (for the report, never asserted).
    """

    answers: dict[str, tuple[int | str, bytes]]
    attempts: int
    seconds: float


def payment_for(ref: str, index: int) -> dict[str, object]:
    """The payment sent for ref number ``index``."""
    return {"ref": ref, "amount": 100 + index}


async def send_payments(base_url: str, refs: Sequence[str], *, concurrency: int = 50) -> PaymentRun:
    """Send one POST /payments per ref through AsyncIdempotentTransport, ``concurrency`` at a time.

    The backoff is tiny (at most 10 ms) so a batch is quick; 20 attempts make
    a payment whose every answer is lost practically impossible at a 30% drop rate.
    """
    attempts = 0

    def count(attempt: Attempt[httpx.Response]) -> None:
        nonlocal attempts
        attempts += 1

    policy = RetryPolicy(attempts=20, wait_initial=0.001, wait_max=0.01)
    transport = AsyncIdempotentTransport(retry=policy, on_attempt=count)
    answers: dict[str, tuple[int | str, bytes]] = {}
    todo = iter(enumerate(refs))
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(transport=transport, base_url=base_url, timeout=30, limits=limits) as http:

        async def worker() -> None:
            for index, ref in todo:
                try:
                    response = await http.post("/payments", json=payment_for(ref, index))
                except httpx.HTTPError as exc:
                    answers[ref] = (type(exc).__name__, b"")
                else:
                    answers[ref] = (response.status_code, response.content)

        async with anyio.create_task_group() as tasks:
            for _ in range(concurrency):
                tasks.start_soon(worker)
    return PaymentRun(answers, attempts, time.perf_counter() - started)
