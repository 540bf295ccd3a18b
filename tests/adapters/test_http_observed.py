"""Every front reports each decision through the one observation hook (logs here; metrics and spans share it)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from idempo import Policy
from tests.adapters.conftest import B_PRIME, ServeFactory
from tests.support.clock import FakeClock, eventually
from tests.support.orders import STREAM_CHUNKS
from tests.support.stores import write_locked


def outcomes(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int | None]]:
    """(outcome, status) of every per-request record on the idempo logger so far."""
    return [
        (r.idempo_outcome, r.idempo_status)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "idempo" and hasattr(r, "idempo_outcome")
    ]


def test_each_decision_is_logged_once_with_its_outcome(serve: ServeFactory, caplog: pytest.LogCaptureFixture) -> None:
    """executed, replayed, mismatch, released, missing_key: one record each, with the status answered."""
    caplog.set_level(logging.DEBUG, logger="idempo")
    s = serve(policy=Policy(require_key=True))
    s.post()
    s.post()
    s.post(body=B_PRIME)
    s.post(key="other", headers={"x-test-status": "503"})
    s.post(key=None)
    expected = [
        ("executed", 201),
        ("replayed", 201),
        ("mismatch", 422),
        ("released", 503),
        ("missing_key", 400),
    ]
    assert eventually(lambda: outcomes(caplog) == expected), outcomes(caplog)
    front = {r.idempo_front for r in caplog.records if hasattr(r, "idempo_front")}  # type: ignore[attr-defined]
    assert len(front) == 1


@pytest.mark.parametrize(
    ("headers", "handler_ms"),
    [
        pytest.param({"x-test-sleep": "0.05"}, 50, id="slow"),
        # Each chunk is produced 10 ms after the last, while the server iterates the body.
        pytest.param({"x-test-response": "stream"}, 10 * len(STREAM_CHUNKS), id="streamed"),
    ],
)
def test_bypassed_request_is_logged_with_the_handlers_status_and_time(
    serve: ServeFactory, caplog: pytest.LogCaptureFixture, tmp_path: Path, headers: dict[str, str], handler_ms: int
) -> None:
    """B18(c) observed: fail_open with the store down logs one ``bypassed`` record with status and handler time.

    The handler's time covers its whole answer, a streamed body included.
    """
    caplog.set_level(logging.DEBUG, logger="idempo")
    clock = FakeClock()
    path = tmp_path / "idempo.db"
    s = serve(store=serve.sqlite_store(path, clock, busy_timeout=0.1), clock=clock, policy=Policy(fail_open=True))
    with write_locked(path):
        answer = s.post(headers=headers)
    assert answer.status_code == 201
    assert answer.headers["idempotency-bypassed"] == "store-unavailable"
    if "x-test-response" in headers:
        assert answer.content == b"".join(STREAM_CHUNKS)
    assert s.orders.calls == 1
    assert eventually(lambda: outcomes(caplog) == [("bypassed", 201)]), outcomes(caplog)
    (record,) = [r for r in caplog.records if hasattr(r, "idempo_outcome")]
    assert record.levelno == logging.WARNING
    # uvloop (libuv) runs timers on a millisecond clock cached at each loop turn, so a 50 ms sleep can
    # end up to 1 ms early by the perf_counter idempo times the handler with.
    assert record.idempo_handler_ms >= handler_ms - 1  # type: ignore[attr-defined]
