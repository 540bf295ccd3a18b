"""A handler that tries to end idempo's transaction, or keeps its connection past the handler
(REVIEW-TX F1, F2, F4, F5): served by uvicorn in a child process (tests.transactional.tx_app) on
PostgreSQL and SQLite, driven by a real HTTP client; each test counts the committed rows."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from .conftest import PgApp, SQLiteApp, app_env, serve

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _post(url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + "/payments", json=body, headers={"Idempotency-Key": key}, timeout=30)


def _problem(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json", response.text
    kind: str = json.loads(response.content)["type"]
    return kind.rsplit("/", 1)[1]


@pytest.mark.parametrize(
    ("statement", "via", "swallow"),
    [
        ("COMMIT;", None, False),
        ("/* app */ COMMIT", None, False),
        ("-- app\nEND", None, False),
        ("COMMIT", "cursor", True),
        ("commit", "method", False),
        ("ROLLBACK", None, True),
    ],
)
def test_sqlite_proxy_refuses_commit_however_written(
    sqlite_app: SQLiteApp, statement: str, via: str | None, swallow: bool
) -> None:
    """A COMMIT (or END, ROLLBACK) behind a comment or before a ';', through a cursor of the proxy, or the
    proxy's commit(), is refused (TransactionControlled) before it runs, and the handler lets the error out or
    catches it and answers 201. As on psycopg and SQLAlchemy, the answer is 500 problem transaction-ended and
    the key is held: a retry gets 409 outcome-unknown and does not run; no payment row is committed. Before,
    the key was released (the retry ran the handler again) or, the error caught, the write committed with
    the record as though nothing had been tried."""
    with serve(app_env("sqlite", "starlette", sqlite_app)) as (url, _):
        body = {"order_id": "o", "sql": [statement], "via": via, "swallow": swallow}
        first = _post(url, "k", body)
        assert (first.status_code, _problem(first)) == (500, "transaction-ended")
        retry = _post(url, "k", body)
        assert (retry.status_code, _problem(retry)) == (409, "outcome-unknown")
        assert _post(url, "other", {"order_id": "next"}).status_code == 201  # the file serves on
    assert sqlite_app.rows("o") == []
    assert sqlite_app.rows("next") == [("next", 1)]


def test_sqlite_proxy_allows_rollback_to_a_savepoint(sqlite_app: SQLiteApp) -> None:
    """SAVEPOINT / ROLLBACK TO / RELEASE (the partial rollback the docs offer) pass the proxy: the
    write inside the savepoint is undone, the one before it commits with the record, and a retry replays."""
    with serve(app_env("sqlite", "starlette", sqlite_app)) as (url, _):
        body = {
            "order_id": "o",
            "sql": [
                "SAVEPOINT sp",
                "INSERT INTO payments (order_id, cents) VALUES ('o', 2)",
                "ROLLBACK TO sp",
                "ROLLBACK TRANSACTION TO SAVEPOINT sp",
                "RELEASE sp",
            ],
        }
        first = _post(url, "k", body)
        assert first.status_code == 201, first.text
        again = _post(url, "k", body)
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.content == first.content
    assert sqlite_app.rows("o") == [("o", 1)]


def test_kept_connection_does_not_poison_the_next_transaction(pg_app: PgApp, tmp_path: Path) -> None:
    """A background task writes through a reference to tx.connection kept past the handler, after idempo
    committed and gave the connection back to a pool of one: the connection sits in the pool inside that
    stray transaction. The next request's checkout discards it (rolled back, closed) instead of opening a
    savepoint inside it: that request's payment row and record commit (its retry replays), and the stray
    write is not committed."""
    log = tmp_path / "kept.log"
    env = app_env("postgres", "starlette", pg_app, IDEMPO_TX_POOL="1", IDEMPO_TX_BACKGROUND_LOG=str(log))
    with serve(env) as (url, _):
        assert _post(url, "k1", {"order_id": "first", "mode": "kept"}).status_code == 201
        for _ in range(100):
            if log.exists() and log.read_text():
                break
            httpx.get(url + "/health")
        assert log.read_text().split() == ["kept"]
        second = _post(url, "k2", {"order_id": "second"})
        assert second.status_code == 201, second.text
        again = _post(url, "k2", {"order_id": "second"})
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.content == second.content
    assert pg_app.rows() == [("first", 1), ("second", 1)]


@pytest.mark.parametrize(
    ("statements", "mode", "via", "committed"),
    [
        (["COMMIT"], "raise", None, []),
        (["COMMIT"], "", None, []),
        (["ROLLBACK"], "", None, []),
        (["/* app */ END;"], "", None, []),
        (["SELECT 1; COMMIT"], "", None, []),
        (["COMMIT", "INSERT INTO payments (order_id, cents) VALUES ('o', 2)"], "raise", None, []),
        (["COMMIT"], "raise", "cursor", []),
        # The connection's own commit() / rollback(): refused by idempo's guard (psycopg's ProgrammingError
        # left the handler as an error like any other, and the key was released).
        (["commit"], "", "method", []),
        (["rollback"], "", "method", []),
        # Past psycopg (libpq itself): not refused, found after the handler.
        (["COMMIT"], "raise", "pgconn", [("o", 1)]),
        (["COMMIT"], "", "pgconn", [("o", 1)]),
        # libpq sends the write after the COMMIT outside any transaction: committed at once.
        (["COMMIT", "INSERT INTO payments (order_id, cents) VALUES ('o', 2)"], "", "pgconn", [("o", 1), ("o", 2)]),
        # A new transaction begun after it: the status says one is open, idempo's savepoint is gone (the
        # RELEASE sent first in the commit pipeline fails, so the completion and COMMIT behind it do not run).
        (["COMMIT", "BEGIN", "INSERT INTO payments (order_id, cents) VALUES ('o', 2)"], "", "pgconn", [("o", 1)]),
    ],
)
def test_psycopg_handler_ending_the_transaction_holds_the_key(
    pg_app: PgApp, statements: list[str], mode: str, via: str | None, committed: list[tuple[object, ...]]
) -> None:
    """A handler runs COMMIT, END or ROLLBACK through tx.connection (psycopg, FastAPI; its execute or a
    cursor's, or calls its commit() or rollback()), then raises or answers 201: the statement is refused
    before it is sent, so nothing commits.
    Sent past psycopg (libpq's exec_), it runs, and idempo finds it after the handler: what it committed stays
    the one effect (a write libpq sent after it committed at once too). Either way the answer is
    500 problem transaction-ended and the key is held (a retry gets 409 outcome-unknown and does not run)."""
    with serve(app_env("postgres", "fastapi", pg_app)) as (url, _):
        body = {"order_id": "o", "sql": statements, "mode": mode, "via": via}
        first = _post(url, "k", body)
        assert (first.status_code, _problem(first)) == (500, "transaction-ended")
        retry = _post(url, "k", body)
        assert (retry.status_code, _problem(retry)) == (409, "outcome-unknown")
        assert _post(url, "other", {"order_id": "next"}).status_code == 201  # the pool serves on
    assert pg_app.rows("o") == committed
    assert pg_app.rows("next") == [("next", 1)]


def test_transaction_ended_logs_the_status_sent(pg_app: PgApp) -> None:
    """The handler commits idempo's transaction and answers 201: the client gets 500 transaction-ended, and the
    request's log line (held, WARNING) says 500, the status sent, not the app's 201."""
    with serve(app_env("postgres", "fastapi", pg_app)) as (url, process):
        first = _post(url, "k", {"order_id": "o", "sql": ["COMMIT"], "mode": ""})
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        assert process.stderr is not None
        log = process.stderr.read().decode()
    assert (first.status_code, _problem(first)) == (500, "transaction-ended")
    held = [line for line in log.splitlines() if line.startswith("idempo: held POST /payments")]
    assert len(held) == 1, log
    assert " -> 500 " in held[0], held[0]


def test_commit_unknown_says_the_outcome_is_unknown(pg_app: PgApp) -> None:
    """The connection drops just before COMMIT: the 503 commit-unknown answer says the outcome is unknown and
    that a retry with the same key is answered correctly; it does not claim nothing was kept (REVIEW-TX F9)."""
    env = app_env("postgres", "fastapi", pg_app, IDEMPO_FAULTS="before-commit=drop-connection")
    with serve(env) as (url, _):
        lost = _post(url, "c1", {"order_id": "lost"})
    assert (lost.status_code, _problem(lost)) == (503, "commit-unknown")
    problem = json.loads(lost.content)
    text = f"{problem['title']} {problem['detail']}"
    assert "unknown" in text
    assert "same Idempotency-Key" in text
    assert "nothing was kept" not in text


def test_commit_outliving_finalisation_that_lands_is_answered_committed(pg_app: PgApp) -> None:
    """COMMIT outlives the finalisation timeout (a deferred trigger sleeps 1.5 s; the timeout is 0.5 s) and
    lands after the connection was given up: the token-checked release is refused because the record is
    completed under this request's token, so the answer is the committed 201 (a retry replays it, one row),
    and the log does not say the lease was taken over, since nobody took it (REVIEW-TX F9)."""
    with psycopg.connect(pg_app.url, autocommit=True) as conn:
        conn.execute(
            f"CREATE FUNCTION {pg_app.schema}.slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN IF NEW.order_id = 'slow' THEN PERFORM pg_sleep(1.5); END IF; RETURN NULL; END $$"
        )
        conn.execute(
            f"CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {pg_app.schema}.payments DEFERRABLE "
            f"INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {pg_app.schema}.slow_commit()"
        )
    env = app_env("postgres", "fastapi", pg_app, IDEMPO_TX_FINALIZE_TIMEOUT="0.5")
    with serve(env) as (url, process):
        first = _post(url, "k", {"order_id": "slow"})
        again = _post(url, "k", {"order_id": "slow"})
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        assert process.stderr is not None
        log = process.stderr.read().decode()
    assert "did land" in log, log
    assert "taken over" not in log, log
    assert first.status_code == 201, first.text
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.content == first.content
    assert pg_app.rows("slow") == [("slow", 1)]
