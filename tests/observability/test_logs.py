"""One log record per decision on the ``idempo`` logger, after real requests over HTTP (uvicorn, httpx)."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable

import pytest

from idempo import Policy
from idempo._core.digests import Digests
from idempo.observability import instrument
from idempo.stores.redis import AsyncRedisStore
from tests.support.servers import free_port

from .conftest import KEY, PRINCIPAL, SECRET, Site, eventually, record_key

FIELDS = {
    "idempo_outcome",
    "idempo_front",
    "idempo_method",
    "idempo_route",
    "idempo_path",
    "idempo_status",
    "idempo_record_key",
    "idempo_scope_hash",
    "idempo_key_hash",
    "idempo_lease_takeover",
    "idempo_verdict",
    "idempo_settle_error",
    "idempo_error",
    "idempo_detail",
    "idempo_store_ms",
    "idempo_handler_ms",
    "idempo_duration_ms",
}


def decisions(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The per-request records captured so far."""
    return [r for r in caplog.records if r.name == "idempo" and hasattr(r, "idempo_outcome")]


def wait_records(caplog: pytest.LogCaptureFixture, count: int) -> list[logging.LogRecord]:
    """Wait until ``count`` per-request records were emitted; return them."""
    return eventually(lambda: (found := decisions(caplog)) and len(found) >= count and found)  # type: ignore[no-any-return]


def dead_redis_store() -> AsyncRedisStore:
    """A store whose server is not there: every call raises StoreUnavailable at once (connection refused)."""
    return AsyncRedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1, retries=0)


def test_executed_then_replayed_records_carry_every_field(
    serve: Callable[..., Site], caplog: pytest.LogCaptureFixture
) -> None:
    """A first request logs `executed` and its repeat `replayed`, at DEBUG, with the documented fields and hashes."""
    caplog.set_level(logging.DEBUG, logger="idempo")
    site = serve()
    assert site.post().status_code == 201
    assert site.post().headers["idempotent-replayed"] == "true"
    executed, replayed = wait_records(caplog, 2)

    assert (executed.idempo_outcome, executed.levelno) == ("executed", logging.DEBUG)
    assert (replayed.idempo_outcome, replayed.levelno) == ("replayed", logging.DEBUG)
    for record in (executed, replayed):
        assert set(vars(record)) >= FIELDS
        assert record.idempo_front == "asgi"
        assert record.idempo_method == "POST"
        assert record.idempo_route == "/orders/*"  # the routes pattern, not the path
        assert record.idempo_path == "/orders/1"
        assert record.idempo_status == 201
        assert record.idempo_record_key == record_key()
        # Keyed with the server secret: the plain SHA-256 of the key is not in the log (guarantee 7).
        assert record.idempo_key_hash == Digests(SECRET.encode()).log_hash(KEY)
        assert record.idempo_key_hash != hashlib.sha256(KEY.encode()).hexdigest()[:16]
        assert len(record.idempo_scope_hash) == 16
        assert record.idempo_store_ms >= 0
        assert record.idempo_duration_ms >= record.idempo_store_ms
    assert executed.idempo_scope_hash == replayed.idempo_scope_hash
    assert executed.idempo_verdict == "store"
    assert executed.idempo_handler_ms >= 0
    assert replayed.idempo_handler_ms is None
    assert site.handlers.executions["orders"] == 1


def test_raw_key_never_logged_unless_enabled(serve: Callable[..., Site], caplog: pytest.LogCaptureFixture) -> None:
    """Neither the raw key nor the body appears in any record; instrument(log_keys=True) adds idempo_key."""
    caplog.set_level(logging.DEBUG, logger="idempo")
    site = serve()
    site.post(body=b'{"card":"4242424242424242"}')
    (record,) = wait_records(caplog, 1)
    everything = record.getMessage() + repr(vars(record))
    assert KEY not in everything
    assert "4242424242424242" not in everything
    assert not hasattr(record, "idempo_key")

    instrument(log_keys=True)
    site.post(key="another-key")
    second = wait_records(caplog, 2)[1]
    assert second.idempo_key == "another-key"


def test_client_errors_are_info(serve: Callable[..., Site], caplog: pytest.LogCaptureFixture) -> None:
    """mismatch (422), missing_key and invalid_key (400) are logged at INFO with their status."""
    caplog.set_level(logging.INFO, logger="idempo")
    site = serve(policy=Policy(require_key=True))
    assert site.post().status_code == 201
    assert site.post(body=b'{"sku":"B","qty":9}').status_code == 422
    assert site.post("/failing", key=None).status_code == 400
    assert site.post(key="two, keys").status_code == 400
    records = wait_records(caplog, 3)  # the executed record is DEBUG: not captured at INFO
    assert [(r.idempo_outcome, r.idempo_status, r.levelno) for r in records] == [
        ("mismatch", 422, logging.INFO),
        ("missing_key", 400, logging.INFO),
        ("invalid_key", 400, logging.INFO),
    ]
    assert records[1].idempo_record_key is None  # rejected before a record key exists
    assert records[1].idempo_route == "*"  # the default policy's label


def test_conflict_while_in_progress(serve: Callable[..., Site], caplog: pytest.LogCaptureFixture) -> None:
    """A duplicate of a running request is logged as `conflict` (409, INFO)."""
    caplog.set_level(logging.INFO, logger="idempo")
    site = serve()
    first: list[int] = []
    runner = threading.Thread(target=lambda: first.append(site.post("/slow").status_code))
    runner.start()
    assert site.handlers.entered.wait(10)
    assert site.post("/slow").status_code == 409
    site.handlers.gate.set()
    runner.join(10)
    assert first == [201]
    (record,) = wait_records(caplog, 1)
    assert (record.idempo_outcome, record.idempo_status, record.levelno) == ("conflict", 409, logging.INFO)


def test_released_and_held_outcomes(serve: Callable[..., Site], caplog: pytest.LogCaptureFixture) -> None:
    """A 500 is `released` (DEBUG); a 504 under HOLD is `held` (WARNING); a raise is `released` with its error."""
    caplog.set_level(logging.DEBUG, logger="idempo")
    site = serve()
    assert site.post("/failing").status_code == 500
    assert site.post("/held").status_code == 504
    assert site.post("/boom").status_code == 500
    released, held, raised = wait_records(caplog, 3)
    assert (released.idempo_outcome, released.idempo_verdict, released.levelno) == ("released", "release", 10)
    assert (held.idempo_outcome, held.idempo_verdict, held.levelno) == ("held", "hold", logging.WARNING)
    assert held.idempo_route == "/held"
    assert (raised.idempo_outcome, raised.levelno) == ("released", logging.DEBUG)
    assert raised.idempo_error == "RuntimeError: boom"


def test_lease_takeover_is_a_warning(serve: Callable[..., Site], caplog: pytest.LogCaptureFixture) -> None:
    """A request that takes over a crashed holder's expired lease logs `lease_takeover` at WARNING."""
    caplog.set_level(logging.DEBUG, logger="idempo")
    site = serve()
    crashed = site.store.sync.begin(record_key(), "fingerprint-of-the-crashed-request", 1000)  # type: ignore[attr-defined]
    site.clock.advance(2)  # its lease expired
    assert site.post().status_code == 201
    (record,) = wait_records(caplog, 1)
    assert (record.idempo_outcome, record.levelno) == ("lease_takeover", logging.WARNING)
    assert record.idempo_lease_takeover is True
    assert record.idempo_verdict == "store"
    assert site.store.sync.get(record_key()).token > crashed.token  # type: ignore[attr-defined]


def test_store_error_is_an_error_and_bypass_a_warning(
    serve: Callable[..., Site], caplog: pytest.LogCaptureFixture
) -> None:
    """An unreachable store logs `store_error` (503, ERROR) at the default level; fail_open logs `bypassed`."""
    caplog.set_level(logging.WARNING, logger="idempo")
    closed = serve(store=dead_redis_store())
    assert closed.post().status_code == 503
    (error,) = [r for r in wait_records(caplog, 1) if r.idempo_record_key == record_key()]
    assert (error.idempo_outcome, error.idempo_status, error.levelno) == ("store_error", 503, logging.ERROR)
    assert error.idempo_error.startswith("StoreUnavailable")
    assert closed.handlers.executions["orders"] == 0

    opened = serve(store=dead_redis_store(), policy=Policy(fail_open=True))
    assert opened.post("/failing").status_code == 500
    bypassed = eventually(
        lambda: next((r for r in decisions(caplog) if r.idempo_record_key == record_key("/failing")), None)
    )
    assert (bypassed.idempo_outcome, bypassed.idempo_status, bypassed.levelno) == ("bypassed", 500, logging.WARNING)
    assert bypassed.idempo_record_key == record_key("/failing")
    assert bypassed.idempo_store_ms is None  # DEBUG off, no metrics or spans: store calls are not timed


def test_principal_in_scope_hash(serve: Callable[..., Site], caplog: pytest.LogCaptureFixture) -> None:
    """The same key from two principals gives two scope hashes and two record keys; the principal is not logged."""
    caplog.set_level(logging.DEBUG, logger="idempo")
    site = serve()
    site.post(headers={"authorization": "Bearer alice"})
    site.post(headers={"authorization": "Bearer bob"})
    alice, bob = wait_records(caplog, 2)
    assert alice.idempo_scope_hash != bob.idempo_scope_hash
    assert alice.idempo_record_key != bob.idempo_record_key
    assert alice.idempo_key_hash == bob.idempo_key_hash
    assert "alice" not in repr(vars(alice))
    assert PRINCIPAL not in repr(vars(alice))
