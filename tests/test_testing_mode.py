"""idempo.testing.set_testing(): idempo as a fast, deterministic pass for an application's own tests."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from idempo import Policy, RecordState, idempotent, make_record_key
from idempo._engine.execution import AsyncExecution, Execution
from idempo._engine.lease import AsyncUnrenewedLease, UnrenewedLease
from idempo.asgi import IdempotencyMiddleware
from idempo.stores import MemoryStore
from idempo.testing import SECRET, current_store, is_testing, set_testing
from idempo.wsgi import IdempotencyMiddleware as WSGIMiddleware
from tests.support.orders import Orders, starlette_app
from tests.support.servers import running_asgi

KEY = "order-42"
BODY = b'{"sku":"A","qty":1}'
HEADERS = {"content-type": "application/json", "Idempotency-Key": KEY}
LOCAL = "addr:127.0.0.1"


def test_a_store_url_names_the_testing_memory_store(tmp_path: Path) -> None:
    """A URL given while testing opens nothing (no SQLite file); the request executes once, the retry replays,
    and the record is in current_store() under a record key keyed with SECRET."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    orders = Orders()
    with set_testing(), running_asgi(IdempotencyMiddleware(starlette_app(orders), url)) as base:
        first = httpx.post(base + "/orders", content=BODY, headers=HEADERS)
        again = httpx.post(base + "/orders", content=BODY, headers=HEADERS)
        record = current_store().get(make_record_key(LOCAL, "POST", "/orders", KEY, secret=SECRET))
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert orders.calls == 1
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert not (tmp_path / "app.db").exists()


def test_the_secret_is_fixed_and_no_warning_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A front given no secret= uses SECRET, not $IDEMPO_SECRET nor one kept in the store: no 'no secret' warning."""
    monkeypatch.setenv("IDEMPO_SECRET", "an environment secret, 16 bytes+")
    calls: list[int] = []
    caplog.set_level(logging.WARNING, logger="idempo")
    with set_testing():

        @idempotent(store="memory://", key="order_id", scope="orders.charge")
        def charge(order_id: str, cents: int) -> int:
            calls.append(cents)
            return cents

        assert charge("o-1", 100) == charge("o-1", 100) == 100
        stored = current_store().get(_function_record_key("orders.charge", "o-1"))
    assert calls == [100]
    assert stored is not None
    assert "no secret configured" not in caplog.text


def _function_record_key(scope: str, key: str) -> str:
    from idempo.decorator import record_key

    return record_key(scope, key, secret=SECRET)


def test_no_lease_is_renewed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler slower than a third of the lease: no renewal (no extend) in testing mode; executions hold an
    unrenewed lease, so nothing runs in the background after a test."""
    extends: list[str] = []
    extend = MemoryStore.extend

    def counted(self: MemoryStore, record_key: str, token: int, lease_ttl_ms: int) -> None:
        extends.append(record_key)
        extend(self, record_key, token, lease_ttl_ms)

    monkeypatch.setattr(MemoryStore, "extend", counted)
    keepers: list[object] = []
    for cls in (Execution, AsyncExecution):
        original = cls.__init__

        def spy(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            _original(self, *args, **kwargs)
            keepers.append(self.keeper)

        monkeypatch.setattr(cls, "__init__", spy)
    orders = Orders()
    with set_testing():
        app = IdempotencyMiddleware(starlette_app(orders), "memory://", policy=Policy(lease_ttl=0.3))
        with running_asgi(app) as base:
            answer = httpx.post(base + "/orders", content=BODY, headers={**HEADERS, "x-test-sleep": "0.25"})
        wsgi_calls: list[int] = []

        def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            threading.Event().wait(0.25)
            wsgi_calls.append(1)
            start_response("201 Created", [("content-type", "application/json")])
            return [b"{}"]

        wsgi = WSGIMiddleware(wsgi_app, "memory://", policy=Policy(lease_ttl=0.3))
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/other",
            "HTTP_IDEMPOTENCY_KEY": "k2",
            "REMOTE_ADDR": "127.0.0.1",
            "wsgi.input": __import__("io").BytesIO(b"{}"),
            "CONTENT_LENGTH": "2",
        }
        body = wsgi(environ, lambda status, headers, exc_info=None: None)
        b"".join(body)
    assert answer.status_code == 201
    assert wsgi_calls == [1]
    assert extends == []
    assert {type(keeper) for keeper in keepers} == {AsyncUnrenewedLease, UnrenewedLease}


def test_set_testing_restores_the_mode_before_it() -> None:
    """As a context manager it restores the mode it found (an outer block's store too); alone it stays on."""
    assert not is_testing()
    with set_testing():
        outer = current_store()
        with set_testing():
            assert current_store() is not outer  # each set_testing() starts from an empty store
        assert current_store() is outer
        with set_testing(False):
            assert not is_testing()
        assert current_store() is outer
    assert not is_testing()
    with pytest.raises(RuntimeError):
        current_store()
    set_testing()
    try:
        assert is_testing()
    finally:
        set_testing(False)
    assert not is_testing()


def test_async_and_blocking_fronts_share_the_records() -> None:
    """A blocking and an async function on one store URL see one record: the testing store is shared."""
    calls: list[str] = []
    with set_testing():

        @idempotent(store="redis://127.0.0.1:1/0", key="key", scope="shared")
        def blocking(key: str) -> str:
            calls.append("blocking")
            return "done"

        @idempotent(store="redis://127.0.0.1:1/0", key="key", scope="shared")
        async def asynchronous(key: str) -> str:
            calls.append("async")
            return "done"

        assert blocking("k") == "done"
        assert anyio.run(asynchronous, "k") == "done"
    assert calls == ["blocking"]
