"""The storm's client half: idempo's retrying httpx transport, watched through its ``on_attempt`` hook."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from idempo._core.problems import FINGERPRINT_MISMATCH
from idempo.demo.payments import create_app, read_ledger
from idempo.demo.storm import Share, Shares, StormResult, StormSettings, plan_payments, run_storm, summarize
from idempo.faults import serve_app
from idempo.stores import AsyncMemoryStore

PAYMENTS = 20


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> tuple[StormResult, Path]:
    """One small storm, every share present, against the payments API with idempo (memory store)."""
    database = tmp_path_factory.mktemp("storm") / "payments.db"
    plan = plan_payments(PAYMENTS, seed=11, shares=Shares(double_click=0.3, client_timeout=0.2, key_reuse=0.2))
    app = create_app(database, store=AsyncMemoryStore())
    with serve_app(app, lifespan="on") as base_url:
        result = anyio.run(run_storm, base_url, plan, StormSettings(concurrency=PAYMENTS))
    return result, database


def test_every_attempt_the_transport_reports_lands_in_its_clients_answer(storm: tuple[StormResult, Path]) -> None:
    """The tally counts each attempt once, and each is in exactly one client's answer, ending with its status."""
    result, _ = storm
    answers = [answer for outcome in result.outcomes for answer in outcome.answers]
    answers += [outcome.reuse_answer for outcome in result.outcomes if outcome.reuse_answer is not None]
    assert sum(len(answer.attempts) for answer in answers) == result.tally.requests
    assert sum(result.tally.other_kinds.values()) == result.tally.other_errors
    assert all(answer.attempts and answer.attempts[-1].status == answer.status for answer in answers)


def test_retries_reuse_the_key_so_each_payment_runs_once(storm: tuple[StormResult, Path]) -> None:
    """Through the transport every payment executes once and succeeds; no order is charged twice."""
    result, database = storm
    report = summarize(result, read_ledger(database))
    assert report.payments == report.handler_executions == report.provider_charges == report.payment_rows == PAYMENTS
    assert report.check() == []
    assert all(outcome.succeeded for outcome in result.outcomes)


def test_a_timed_out_request_is_retried_under_its_key_until_the_replay(storm: tuple[StormResult, Path]) -> None:
    """Client timeout share: the first attempt times out, the transport retries, the last attempt is the replay."""
    result, _ = storm
    slow = [outcome for outcome in result.outcomes if outcome.planned.share is Share.CLIENT_TIMEOUT]
    assert slow
    for outcome in slow:
        (answer,) = outcome.answers
        assert answer.attempts[0].timed_out
        assert answer.ok
        assert answer.attempts[-1].replayed


def test_double_clicks_share_one_key_and_get_the_same_bytes(storm: tuple[StormResult, Path]) -> None:
    """The clicks of a double click send the key the storm gave; one executes, the others replay the same body."""
    result, _ = storm
    clicked = [outcome for outcome in result.outcomes if outcome.planned.share is Share.DOUBLE_CLICK]
    assert clicked
    for outcome in clicked:
        assert len(outcome.answers) == outcome.planned.clicks
        assert all(answer.ok for answer in outcome.answers)
        assert len({answer.body for answer in outcome.answers}) == 1
        assert sum(not answer.attempts[-1].replayed for answer in outcome.answers) == 1


def test_a_reused_key_gets_422_once_and_is_not_retried(storm: tuple[StormResult, Path]) -> None:
    """Key reuse share: the other amount under the same key gets idempo's 422 on the only attempt made."""
    result, _ = storm
    reused = [outcome for outcome in result.outcomes if outcome.planned.share is Share.KEY_REUSE]
    assert reused
    for outcome in reused:
        answer = outcome.reuse_answer
        assert answer is not None
        assert answer.status == 422
        (attempt,) = answer.attempts
        assert attempt.problem == FINGERPRINT_MISMATCH.type
