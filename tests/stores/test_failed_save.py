"""Issue 10 item 1 end to end: the store goes away while results are being saved; nothing runs twice.

A real uvicorn server, the real shared Redis behind a TCP relay of the test's
own, which the test cuts (every connection closed, new ones refused) while
handlers are running, so each handler's ``complete`` fails. Every client still
gets its 201; duplicates during the outage get 503 (begin fails) or 409; once
the relay is back, each process-held result is saved by its retry and every
retry replays it. The handler's ledger shows one execution per key.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
import httpx
import pytest
from store_helpers import serve
from tests.support.clock import eventually

from idempo.asgi import IdempotencyMiddleware

pytestmark = pytest.mark.redis


class CuttableRelay:
    """A TCP relay to ``target`` that can be cut (every connection closed, new ones closed on accept) and restored."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.cut = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def sever(self) -> None:
        """Cut: close every relayed connection, refuse new ones."""
        self.cut.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self.cut.clear()

    def close(self) -> None:
        self.sever()
        self._listener.close()


class GatedApp:
    """POST /orders: records the execution in a ledger, waits for the gate, answers 201 with the order id."""

    def __init__(self) -> None:
        self.ledger: list[str] = []
        self.entered = threading.Semaphore(0)
        self.gate = threading.Event()
        self.store: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.store.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        key = dict(scope["headers"])[b"idempotency-key"].decode()
        self.ledger.append(key)
        self.entered.release()
        await anyio.to_thread.run_sync(self.gate.wait, 30)
        body = b'{"order_id":"%s"}' % key.encode()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def relay(redis_url: str) -> Iterator[CuttableRelay]:
    parts = urlsplit(redis_url)
    relay = CuttableRelay((parts.hostname or "127.0.0.1", parts.port or 6379))
    yield relay
    relay.close()


def test_redis_cut_while_saving_executes_nothing_twice(relay: CuttableRelay) -> None:
    """Five requests run; the relay to Redis is cut before they answer: each client gets 201, duplicates during
    the outage are refused (503/409), and after the relay is restored every key replays: ledger = one per key."""
    from idempo.stores.redis import AsyncRedisStore

    app = GatedApp()
    store = AsyncRedisStore(
        f"redis://127.0.0.1:{relay.port}/0", prefix=f"failed-save-{uuid.uuid4().hex}:", socket_timeout=1.0
    )
    app.store = store
    keys = [str(uuid.uuid4()) for _ in range(5)]
    with serve(IdempotencyMiddleware(app, store)) as base, httpx.Client(base_url=base, timeout=30) as client:

        def post(key: str) -> httpx.Response:
            return client.post("/orders", content=b"{}", headers={"Idempotency-Key": key})

        with ThreadPoolExecutor(len(keys)) as pool:
            firsts = [pool.submit(post, key) for key in keys]
            for _ in keys:
                assert app.entered.acquire(timeout=10)
            relay.sever()  # the store goes away while every handler runs
            app.gate.set()
            answers = [first.result() for first in firsts]
        assert [a.status_code for a in answers] == [201] * len(keys)
        during = [post(key).status_code for key in keys]
        assert set(during) <= {409, 503}, during
        relay.restore()

        def all_replayed() -> bool:
            return all(post(key).headers.get("idempotent-replayed") == "true" for key in keys)

        assert eventually(all_replayed, timeout=20)
        for key in keys:
            replay = post(key)
            assert replay.json() == {"order_id": key}
    assert sorted(app.ledger) == sorted(keys), "a key was executed twice"
