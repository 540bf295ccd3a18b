"""Transactional routes behind the ASGI middleware (FastAPI's ``tx: idempo.fastapi.Transaction``, Starlette's
``await idempo.starlette.transaction(request)``), served by uvicorn in a child process, on PostgreSQL (the
app's AsyncConnectionPool) and SQLite (the app's file), driven by a real HTTP client: every row of the outcome
table in shared/TRANSACTIONAL.md that a route can reach."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import PgApp, SQLiteApp, app_env, serve

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _post(url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + "/payments", json=body, headers={"Idempotency-Key": key}, timeout=30)


def _problem(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json", response.text
    kind: str = json.loads(response.content)["type"]
    return kind.rsplit("/", 1)[1]


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest) -> tuple[str, PgApp | SQLiteApp]:
    """The app's database under test: (backend name, its app fixture)."""
    name = str(request.param)
    app = request.getfixturevalue("pg_app" if name == "postgres" else "sqlite_app")
    return name, app


@pytest.mark.parametrize("front", ["fastapi", "starlette"])
def test_commits_then_replays(front: str, database: tuple[str, PgApp | SQLiteApp]) -> None:
    """The write and the record commit together, the response is sent after COMMIT, a retry is a byte-identical
    replay, and the business table holds one row."""
    backend, app = database
    with serve(app_env(backend, front, app)) as (url, _):
        first = _post(url, "k1", {"order_id": "o1", "cents": 100})
        again = _post(url, "k1", {"order_id": "o1", "cents": 100})
    assert first.status_code == 201, first.text
    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers.get("idempotent-replayed") == "true"
    assert app.rows() == [("o1", 100)]


def test_outcomes_postgres(pg_app: PgApp) -> None:
    """On PostgreSQL: write-then-raise and a 500 leave no row and run again; a stored 4xx commits; a response
    over max_response_body rolls back (500); a deferred constraint failing at COMMIT rolls back (500
    commit-failed, released); 40001 at COMMIT is 503 transaction-conflict with Retry-After, released; a
    request without a key is refused before anything opens."""
    with serve(app_env("postgres", "fastapi", pg_app)) as (url, _):
        raised = _post(url, "r1", {"order_id": "raise", "mode": "raise"})
        assert raised.status_code == 500
        assert pg_app.rows("raise") == []
        retried = _post(url, "r1", {"order_id": "raise", "mode": "raise"})
        assert retried.status_code == 500  # ran again (released), and rolled back again

        assert _post(url, "r2", {"order_id": "five", "mode": "500"}).status_code == 500
        assert pg_app.rows("five") == []

        declined = _post(url, "r3", {"order_id": "declined", "mode": "400"})
        assert declined.status_code == 400
        assert pg_app.rows("declined") == [("declined", 1)]
        replay = _post(url, "r3", {"order_id": "declined", "mode": "400"})
        assert replay.content == declined.content
        assert replay.headers.get("idempotent-replayed") == "true"

        big = _post(url, "r4", {"order_id": "big", "mode": "big"})
        assert (big.status_code, _problem(big)) == (500, "transactional-response-too-large")
        assert pg_app.rows("big") == []
        assert _post(url, "r4", {"order_id": "big", "mode": "big"}).status_code == 500  # released: runs again

        failed = _post(url, "r5", {"order_id": "dup", "mode": "deferred", "ref": "same"})
        assert (failed.status_code, _problem(failed)) == (500, "commit-failed")
        assert pg_app.rows("dup") == []
        ok = _post(url, "r5", {"order_id": "dup", "mode": "deferred", "ref": "same"})
        assert ok.status_code == 500  # released, so the retry executed (and failed the same way)

        conflict = _post(url, "r6", {"order_id": "ser", "cents": 40001})
        assert (conflict.status_code, _problem(conflict)) == (503, "transaction-conflict")
        assert conflict.headers["retry-after"] == "1"
        assert pg_app.rows("ser") == []

        missing = httpx.post(url + "/payments", json={"order_id": "nokey"}, timeout=10)
        assert missing.status_code == 400
        assert pg_app.rows("nokey") == []


def test_outcomes_sqlite(sqlite_app: SQLiteApp) -> None:
    """On SQLite (Starlette): write-then-raise leaves no row, a stored 4xx commits, a response over
    max_response_body rolls back."""
    with serve(app_env("sqlite", "starlette", sqlite_app)) as (url, _):
        assert _post(url, "r1", {"order_id": "raise", "mode": "raise"}).status_code == 500
        assert sqlite_app.rows("raise") == []
        assert _post(url, "r3", {"order_id": "declined", "mode": "400"}).status_code == 400
        assert sqlite_app.rows("declined") == [("declined", 1)]
        big = _post(url, "r4", {"order_id": "big", "mode": "big"})
        assert (big.status_code, _problem(big)) == (500, "transactional-response-too-large")
        assert sqlite_app.rows("big") == []
        assert _post(url, "r5", {"order_id": "after", "cents": 2}).status_code == 201
        assert sqlite_app.rows("after") == [("after", 2)]


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_connection_lost_during_commit(backend: str, request: pytest.FixtureRequest) -> None:
    """The connection drops just before COMMIT (fault point before-commit=drop-connection): the record, read on
    a fresh connection, is not completed with our token, so it is released (token-checked) and the answer is
    503 commit-unknown; nothing was written, and a retry (faults off) executes once."""
    app = request.getfixturevalue("pg_app" if backend == "postgres" else "sqlite_app")
    env = app_env(backend, "fastapi", app, IDEMPO_FAULTS="before-commit=drop-connection")
    with serve(env) as (url, _):
        lost = _post(url, "c1", {"order_id": "lost"})
        assert (lost.status_code, _problem(lost)) == (503, "commit-unknown")
        assert "retry-after" in lost.headers
    assert app.rows("lost") == []
    with serve(app_env(backend, "fastapi", app)) as (url, _):
        assert _post(url, "c1", {"order_id": "lost"}).status_code == 201
    assert app.rows("lost") == [("lost", 1)]


def test_background_task_gets_transaction_closed(pg_app: PgApp, tmp_path: Path) -> None:
    """A background task runs after the commit: the transaction it kept is closed (TransactionClosed)."""
    log = tmp_path / "background.log"
    env = app_env("postgres", "starlette", pg_app, IDEMPO_TX_BACKGROUND_LOG=str(log))
    with serve(env) as (url, _):
        assert _post(url, "b1", {"order_id": "bg", "mode": "background"}).status_code == 201
        for _ in range(100):
            if log.exists() and log.read_text():
                break
            httpx.get(url + "/health")
    assert log.read_text().split() == ["TransactionClosed"]
    assert pg_app.rows("bg") == [("bg", 1)]


def test_write_on_a_second_connection_escapes(pg_app: PgApp) -> None:
    """The trap, documented: a write through a connection of the app's own (not tx.connection) is outside
    idempo's transaction, so it survives the rollback when the handler fails."""
    with serve(app_env("postgres", "fastapi", pg_app)) as (url, _):
        assert _post(url, "t1", {"order_id": "trap", "mode": "second"}).status_code == 500
    assert pg_app.rows("trap") == [("trap", -1)]  # the tx write rolled back; the other one stayed


def test_fifty_duplicates_with_a_pool_of_five(pg_app: PgApp) -> None:
    """50 concurrent duplicates of one key on a pool of 5 connections: one row; every other answer is 409 or the
    replay; none waits out the pool (no 503, no 500)."""
    env = app_env("postgres", "fastapi", pg_app, IDEMPO_TX_POOL="5")
    with serve(env) as (url, _), concurrent.futures.ThreadPoolExecutor(50) as workers:
        body = {"order_id": "burst", "mode": "slow"}
        answers = list(workers.map(lambda _: _post(url, "burst", body), range(50)))
    statuses = sorted({a.status_code for a in answers})
    assert set(statuses) <= {201, 409}, [a.text for a in answers if a.status_code not in (201, 409)]
    assert 201 in statuses
    assert pg_app.rows("burst") == [("burst", 1)]


@pytest.mark.parametrize("front", ["fastapi", "starlette"])
def test_no_connection_for_the_transaction_is_503_and_released(front: str, pg_app: PgApp) -> None:
    """A pool of 2 and four keys whose claims are all made before any transaction opens: two hold their
    transaction, the other two find no connection within the store's deadline. Those get DESIGN's 503
    problem+json with Retry-After (not a 500 traceback), their keys are released, and their retries commit:
    one row per key."""
    env = app_env("postgres", front, pg_app, IDEMPO_TX_POOL="2", IDEMPO_TX_DEADLINE="0.3", IDEMPO_TX_GATE="4")
    orders = [f"pool-{n}" for n in range(4)]
    with serve(env) as (url, _), concurrent.futures.ThreadPoolExecutor(4) as workers:
        first = list(workers.map(lambda order: _post(url, order, {"order_id": order, "mode": "hold"}), orders))
        assert sorted(a.status_code for a in first) == [201, 201, 503, 503], [a.text[:200] for a in first]
        for answer in first:
            if answer.status_code == 503:
                assert _problem(answer) == "store-unavailable"
                assert int(answer.headers["retry-after"]) >= 1
        for order, answer in zip(orders, first, strict=True):
            if answer.status_code == 503:
                retried = _post(url, order, {"order_id": order, "mode": "hold"})
                for _ in range(20):  # the release may wait for a pooled connection: 409 until then
                    if retried.status_code != 409:
                        break
                    time.sleep(0.2)
                    retried = _post(url, order, {"order_id": order, "mode": "hold"})
                assert retried.status_code == 201, retried.text
    for order in orders:
        assert len(pg_app.rows(order)) == 1


@pytest.mark.parametrize("front", ["fastapi", "starlette"])
def test_transactional_route_outside_idempo_is_a_400_problem(front: str, sqlite_app: SQLiteApp) -> None:
    """A policy that does not require a key: the transactional route, called without one, answers 400
    application/problem+json missing-key (not FastAPI's {"detail"}, not a 500 traceback); called with a method
    idempo does not cover (GET, with a key), 400 transaction-not-covered. Nothing is written."""
    with serve(app_env("sqlite", front, sqlite_app, IDEMPO_TX_REQUIRE_KEY="0")) as (url, _):
        no_key = httpx.post(url + "/payments", json={"order_id": "x"}, timeout=10)
        assert (no_key.status_code, _problem(no_key)) == (400, "missing-key")
        assert "Idempotency-Key" in no_key.json()["detail"]
        on_get = httpx.get(url + "/payments", headers={"Idempotency-Key": "g1"}, timeout=10)
        assert (on_get.status_code, _problem(on_get)) == (400, "transaction-not-covered")
        keyed = _post(url, "k1", {"order_id": "keyed"})  # the route still works under a key
        assert keyed.status_code == 201
    assert sqlite_app.rows() == [("keyed", 1)]


def test_key_required(sqlite_app: SQLiteApp) -> None:
    """A transactional route without a key answers 400 and writes nothing."""
    with serve(app_env("sqlite", "fastapi", sqlite_app)) as (url, _):
        assert httpx.post(url + "/payments", json={"order_id": "x"}, timeout=10).status_code == 400
    assert sqlite_app.rows() == []
