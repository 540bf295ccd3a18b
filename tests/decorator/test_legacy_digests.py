"""@idempotent, the consumers and `idempo migrate` in the legacy window (issue 11 item 3; docs/operating.md).

A message redelivered across the upgrade, or a call retried across it, finds
the record the older version wrote (unkeyed digests) while the window
``idempo migrate --legacy-digests`` opened is open: it replays instead of
running again.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from idempo import Acquired, FingerprintMismatch, StoredResponse, idempotent, store_from_url
from idempo._core.digests import legacy_record_key, legacy_value
from idempo._engine.calls import canonical_form
from idempo.cli import main
from idempo.consumer import IdempotentConsumer, Outcome
from idempo.secrets import LEGACY_RECORD_KEY, open_legacy_window
from idempo.serializers import fingerprint_form
from idempo.stores import MemoryStore

JSON_200 = ((b"content-type", b"application/json"),)


def old_record(store: MemoryStore, scope: str, key: str, fingerprint: str, body: bytes) -> None:
    """A completed record as the version before keyed digests wrote it."""
    record_key = legacy_record_key("", "@idempotent", scope, key)
    began = store.begin(record_key, fingerprint, 30_000)
    assert isinstance(began, Acquired)
    store.complete(record_key, began.token, StoredResponse(200, JSON_200, body), 60_000)


def test_a_call_answered_before_the_upgrade_replays_in_the_window() -> None:
    """The old result comes back and the function does not run; another argument is still a mismatch."""
    store = MemoryStore()
    open_legacy_window(store, 3600)
    old_record(store, "orders", "K1", legacy_value(canonical_form({"qty": fingerprint_form(3)})), b'{"qty":3}')
    calls: list[int] = []

    @idempotent(store=store, key="key", scope="orders")
    def order(key: str, qty: int) -> dict[str, int]:
        calls.append(qty)
        return {"qty": qty}

    assert order("K1", 3) == {"qty": 3}
    assert order("K1", 3) == {"qty": 3}
    with pytest.raises(FingerprintMismatch):
        order("K1", 4)
    assert calls == []


def test_outside_the_window_an_old_record_is_absent() -> None:
    """No window: the call runs (never a mismatch from an old record)."""
    store = MemoryStore()
    old_record(store, "orders", "K1", "not this call's", b'{"qty":1}')

    @idempotent(store=store, key="key", scope="orders")
    def order(key: str, qty: int) -> dict[str, int]:
        return {"qty": qty}

    assert order("K1", 3) == {"qty": 3}


def test_a_message_processed_before_the_upgrade_is_a_duplicate_in_the_window() -> None:
    """A redelivery across the deploy: the consumer skips it (ack) instead of handling it twice."""
    store = MemoryStore()
    open_legacy_window(store, 3600)
    old_record(store, "payments", "msg-1", "", b"null")
    handled: list[str] = []
    consumer = IdempotentConsumer(handled.append, store=store, message_id=lambda m: m, scope="payments")
    assert consumer.process("msg-1") is Outcome.DUPLICATE
    assert consumer.process("msg-2") is Outcome.PROCESSED
    assert handled == ["msg-2"]


def test_migrate_opens_the_legacy_window(tmp_path: Path) -> None:
    """`idempo migrate --legacy-digests --legacy-window 120` opens the window for 120 s and says until when."""
    url = f"sqlite:///{tmp_path / 'idempo.db'}"
    done = CliRunner().invoke(main, ["migrate", "--store", url, "--legacy-digests", "--legacy-window", "120"])
    assert done.exit_code == 0, done.output
    assert "legacy window open until" in done.output
    store = store_from_url(url)
    try:
        marker = store.get(LEGACY_RECORD_KEY)
        assert marker is not None
        assert abs(marker.expires_at_ms - (time.time() + 120) * 1000) < 30_000
        assert store.stats().in_progress == 0  # idempo's own record, not a request's
    finally:
        store.close()
    plain = CliRunner().invoke(main, ["migrate", "--store", url])
    assert plain.exit_code == 0
    assert "legacy window" not in plain.output
