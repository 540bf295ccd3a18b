"""The crash matrix (issue 12): every fault point x {PostgreSQL, SQLite} x {FastAPI route, Django view, decorator}.

For each point, a process starts with the point armed to SIGKILL itself, gets key K, and dies there: the
client sees the connection drop and the process exits -9. Then a process without faults, once the short
lease has lapsed, gets K again: the answer is the one a fault-free run gives (a fresh 201 where the kill came
before COMMIT, the committed answer replayed where it came after), a further retry replays the same bytes,
and the database holds exactly one row for K's payment, never two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from idempo._engine.faultpoints import POINTS

from .servers import ROOT, Database, serving, start_many, stop

pytestmark = pytest.mark.slow

LEASE = 1.0
#: Points where the kill comes before COMMIT: the retry executes again. After it: the retry is a replay.
BEFORE_COMMIT = frozenset({"after-claim", "before-commit"})


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    db = Database(request.param, url, tmp_path)
    db.create()
    yield db
    db.drop()


def _post(url: str, key: str, order_id: str, cents: int) -> httpx.Response:
    body = json.dumps({"order_id": order_id, "cents": cents})
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    return httpx.post(url + "/payments", content=body, headers=headers, timeout=30)


def _call(env: dict[str, str], *payments: str) -> subprocess.CompletedProcess[str]:
    """Run the transactional function in a process of its own, once per ``ORDER_ID:CENTS``."""
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    command = [sys.executable, "-m", "tests.transactional.crash_apps", *payments]
    return subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


def _expected(order_id: str, cents: int) -> dict[str, object]:
    return {"order_id": order_id, "cents": cents, "status": "charged"}


@pytest.mark.parametrize("front", ["fastapi", "django"])
def test_a_kill_at_any_fault_point_leaves_one_committed_payment_route(front: str, database: Database) -> None:
    """Routes: the kill drops the connection and the process exits -9; the retry answers 201 with the fault-free
    body (or replays it), a further retry replays the same bytes, and the order has one row."""
    cases = {point: (str(uuid.uuid4()), f"o-{point}", 100 + index) for index, point in enumerate(POINTS)}
    # One process per point, started together (each dies on its one request).
    armed = [database.env(IDEMPO_FAULTS=f"{point}=kill", IDEMPO_TX_LEASE=str(LEASE)) for point in cases]
    servers = start_many(front, armed)
    try:
        for (point, (key, order_id, cents)), (url, process) in zip(cases.items(), servers, strict=True):
            try:
                answer = _post(url, key, order_id, cents)
            except httpx.TransportError:
                pass  # the connection dropped: the process killed itself at the point
            else:
                pytest.fail(f"{point}: {answer.status_code} {answer.text}")
            assert process.wait(10) == -9, point
    finally:
        for _, process in servers:
            stop(process)
    time.sleep(LEASE + 0.2)
    with serving(front, database.env(IDEMPO_TX_LEASE=str(LEASE))) as url:
        for point, (key, order_id, cents) in cases.items():
            retry = _post(url, key, order_id, cents)
            assert retry.status_code == 201, (point, retry.text)
            assert retry.json() == _expected(order_id, cents), point
            replayed = retry.headers.get("idempotent-replayed") == "true"
            assert replayed is (point not in BEFORE_COMMIT), point
            again = _post(url, key, order_id, cents)
            assert again.status_code == 201
            assert again.content == retry.content, point
            assert again.headers["idempotent-replayed"] == "true"
    for point, (_, order_id, cents) in cases.items():
        assert database.rows(order_id) == [(order_id, cents)], point


def test_a_kill_at_any_fault_point_leaves_one_committed_payment_decorator(database: Database) -> None:
    """@idempotent(transactional=True): the process dies -9 at the point; a fresh process's call returns the
    fault-free result, a further call the same, and the order has one row."""
    cases = {point: (f"o-{point}", 100 + index) for index, point in enumerate(POINTS)}
    for point, (order_id, cents) in cases.items():
        died = _call(database.env(IDEMPO_FAULTS=f"{point}=kill", IDEMPO_TX_LEASE=str(LEASE)), f"{order_id}:{cents}")
        assert died.returncode == -9, (point, died.stdout, died.stderr)
        assert died.stdout == ""
    time.sleep(LEASE + 0.2)
    payments = [f"{order_id}:{cents}" for order_id, cents in cases.values()]
    first = _call(database.env(IDEMPO_TX_LEASE=str(LEASE)), *payments, *payments)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    results = [json.loads(line) for line in lines]
    expected = [_expected(order_id, cents) for order_id, cents in cases.values()]
    assert results == expected + expected
    assert lines[: len(cases)] == lines[len(cases) :]
    for point, (order_id, cents) in cases.items():
        assert database.rows(order_id) == [(order_id, cents)], point
