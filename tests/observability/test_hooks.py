"""The hook a blocking front (WSGI, Django, the decorator) calls, driven through the sync engine."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from idempo import Policy, StoredResponse
from idempo._core.digests import Digests
from idempo._core.flow import Proceed, begin_flow, finish
from idempo._engine._sync.drivers import drive_sync
from idempo._engine._sync.store import settle_sync
from idempo.observability import Outcome, instrument, observe_request
from idempo.stores.sqlite import SQLiteStore

RESPONSE = StoredResponse(200, (), b"{}")


def run_once(store: SQLiteStore, key: str) -> None:
    """What a blocking front does for one call: observe, drive, run, settle, finish."""
    policy = Policy()
    observation = observe_request("decorator", "charge", "charge", "charge")
    try:
        observation.identify("tenant-1", key, key, Digests(b"hooks test secret, 16+"))
        decision = drive_sync(begin_flow(key, "fp", policy), store, observation)
        if isinstance(decision, Proceed):
            observation.handler_started()
            observation.handler_finished(200)
            settle_sync(store, finish(policy, key, decision.token, RESPONSE), observation)
    finally:
        observation.finish()


def test_sync_front_reports_through_the_same_hook(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    """A sync front gets the same records and metrics: executed then replayed, store calls timed by operation."""
    registry = CollectorRegistry()
    instrument(metrics=registry)
    caplog.set_level(logging.DEBUG, logger="idempo")
    store = SQLiteStore(f"{tmp_path}/idempo.db")
    try:
        run_once(store, "k1")
        run_once(store, "k1")
    finally:
        store.close()
    outcomes = [r.idempo_outcome for r in caplog.records if hasattr(r, "idempo_outcome")]
    assert outcomes == [Outcome.EXECUTED, Outcome.REPLAYED]
    labels = {"outcome": "executed", "method": "charge", "route": "charge"}
    assert registry.get_sample_value("idempo_requests_total", labels) == 1
    count = "idempo_store_operation_duration_seconds_count"
    assert registry.get_sample_value(count, {"store": "sqlite", "operation": "begin"}) == 2
    assert registry.get_sample_value(count, {"store": "sqlite", "operation": "complete"}) == 1
    assert registry.get_sample_value("idempo_leases_in_flight", {"route": "charge"}) == 0
