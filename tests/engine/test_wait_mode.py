"""Wait mode under a burst of duplicates (issue 10 item 6).

200 duplicates of one slow request used to make every waiter poll the store
on its own backoff (2,601 ``begin`` calls in 2.2 s). Now at most
``Policy.max_waiters`` wait per key and process (the rest get 409 at once),
and the waiters share their polls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import MutableMapping
from typing import Any

import anyio
import anyio.to_thread
import httpx

from idempo import Policy
from idempo._engine.begin import _rooms
from idempo.asgi import IdempotencyMiddleware
from idempo.stores import AsyncMemoryStore, MemoryStore
from idempo.wsgi import IdempotencyMiddleware as WSGIMiddleware
from tests.support.servers import running_asgi
from tests.support.stores import CountingStore

DUPLICATES = 200
WAITERS = 8


class HeldApp:
    """POST answers 201 once ``release`` is set; counts its executions."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        await anyio.to_thread.run_sync(self.release.wait, 60)
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"order_id":1}'})


def test_a_burst_of_duplicates_waits_bounded_and_shares_its_polls() -> None:
    """Issue 10 item 6: 200 duplicates in wait mode -> the handler runs once, max_waiters wait and get the
    replay, the rest get 409 at once, and the store sees about one begin per duplicate, not one per poll."""
    app = HeldApp()
    store = CountingStore(AsyncMemoryStore())
    policy = Policy(wait=30, max_waiters=WAITERS)
    answers: list[httpx.Response] = []

    async def burst(base: str) -> None:
        limits = httpx.Limits(max_connections=DUPLICATES + 10)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            refused = anyio.Event()

            async def one() -> None:
                answers.append(await client.post("/orders", content=b"{}", headers={"Idempotency-Key": "k"}))
                if len(answers) == DUPLICATES - 1 - WAITERS:
                    refused.set()

            async with anyio.create_task_group() as group:
                for _ in range(DUPLICATES):
                    group.start_soon(one)
                # Every duplicate that does not wait has its 409 before the first request ends.
                await refused.wait()
                app.release.set()

    with running_asgi(IdempotencyMiddleware(app, store, policy=policy)) as base:
        anyio.run(burst, base)

    statuses = sorted(answer.status_code for answer in answers)
    assert app.calls == 1
    assert statuses.count(409) == DUPLICATES - 1 - WAITERS
    assert statuses.count(201) == 1 + WAITERS
    assert sum(answer.headers.get("idempotent-replayed") == "true" for answer in answers) == WAITERS
    # One begin per arrival; the waiters' polls, shared, add a few per backoff step.
    assert store.calls["begin"] <= DUPLICATES + 60, store.calls
    assert _rooms == {}, "a finished wait leaves its room behind"


def test_blocking_waiters_share_their_polls() -> None:
    """The sync driver (WSGI) bounds and shares in the same way: 40 threads, one execution, few polls."""
    release = threading.Event()
    calls = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(1)
        release.wait(30)
        start_response("201 Created", [("Content-Type", "application/json")])
        return [b'{"order_id":1}']

    store = CountingStore(MemoryStore())
    middleware = WSGIMiddleware(app, store, policy=Policy(wait=30, max_waiters=4))
    statuses: list[str] = []

    def one() -> None:
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/orders",
            "HTTP_IDEMPOTENCY_KEY": "k",
            "CONTENT_LENGTH": "2",
            "wsgi.input": __import__("io").BytesIO(b"{}"),
            "REMOTE_ADDR": "127.0.0.1",
        }
        for _ in middleware(environ, lambda status, headers, exc_info=None: statuses.append(status)):
            pass

    threads = [threading.Thread(target=one) for _ in range(40)]
    for thread in threads:
        thread.start()
    ends = time.monotonic() + 30
    while len(statuses) < 40 - 1 - 4 and time.monotonic() < ends:
        time.sleep(0.01)
    time.sleep(0.6)  # the waiters poll a few backoff steps meanwhile
    release.set()
    for thread in threads:
        thread.join(30)
    assert len(calls) == 1
    assert sum(status.startswith("409") for status in statuses) == 40 - 1 - 4
    assert sum(status.startswith("201") for status in statuses) == 1 + 4
    assert store.calls["begin"] <= 40 + 20, store.calls
