"""Issue 5's acceptance test: lost answers never double-charge, through the real transport, proxy and server."""

from __future__ import annotations

import os
from functools import partial

import anyio

from idempo.faults import FaultKind, FaultProxy, random_faults, serve_app

from .payments_app import PaymentRun, PaymentsApp, protected, send_payments

#: Logical payments per run; IDEMPO_ACCEPTANCE_PAYMENTS overrides (bench/client_faults.py runs 1000 too).
PAYMENTS = int(os.environ.get("IDEMPO_ACCEPTANCE_PAYMENTS", "1000"))


def run(refs: list[str], drop_answer: float) -> tuple[PaymentRun, PaymentsApp, FaultProxy]:
    app = PaymentsApp()
    with (
        serve_app(protected(app)) as upstream,
        FaultProxy(upstream, random_faults(5, drop_answer=drop_answer)) as proxy,
    ):
        result = anyio.run(partial(send_payments, proxy.url, refs))
    return result, app, proxy


def test_dropped_answers_execute_once_and_match_a_fault_free_run() -> None:
    """30% of answers dropped after execution: N payments give N executions and N 201s identical to a clean run."""
    refs = [f"p{i:05d}" for i in range(PAYMENTS)]
    clean, clean_app, _ = run(refs, drop_answer=0.0)
    faulty, faulty_app, proxy = run(refs, drop_answer=0.3)

    assert sum(clean_app.executions.values()) == PAYMENTS
    assert sum(faulty_app.executions.values()) == PAYMENTS
    assert set(faulty_app.executions) == set(refs)
    assert set(faulty_app.executions.values()) == {1}
    assert {status for status, _ in faulty.answers.values()} == {201}
    assert faulty.answers == clean.answers
    dropped = proxy.fault_counts()[FaultKind.DROP_ANSWER]
    assert dropped > 0.2 * PAYMENTS
    assert faulty.attempts == len(proxy.log) == PAYMENTS + dropped
    print(
        f"\n{PAYMENTS} payments: {sum(faulty_app.executions.values())} executions, "
        f"{len(faulty.answers)} answers, {faulty.attempts} attempts ({dropped} answers dropped), "
        f"{faulty.seconds:.1f}s with faults, {clean.seconds:.1f}s without"
    )
