"""Django transactional views under waitress, on PostgreSQL and SQLite: the view runs in transaction.atomic() on
the records' alias and the record's completion is that block's last statement, through Django's own connection."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import _free_port
from .servers import ROOT, Database, serving, start

pytestmark = pytest.mark.slow


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The app's database, with idempo's records and ``payments``, on each backend."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    db = Database(request.param, url, tmp_path)
    db.create()
    yield db
    db.drop()


def post(url: str, order_id: str, cents: int = 100, key: str | None = None, **extra: Any) -> httpx.Response:
    body = {"order_id": order_id, "cents": cents, **extra}
    headers = {"Idempotency-Key": key or str(uuid.uuid4()), "Content-Type": "application/json"}
    return httpx.post(url + "/payments", content=json.dumps(body), headers=headers, timeout=30)


def test_transactional_view_commits_its_row_with_the_record(database: Database) -> None:
    """One row and a 201; the same key replays the same bytes without a second row; a streamed answer is held
    whole until COMMIT and replayed the same; a write then a raise, or a 500, leaves no row and the retry runs
    once; a stored 400 keeps its write."""
    with serving("django", database.env()) as url:
        key = str(uuid.uuid4())
        first = post(url, "o-commit", key=key)
        assert first.status_code == 201
        assert first.json() == {"order_id": "o-commit", "cents": 100, "status": "charged"}
        again = post(url, "o-commit", key=key)
        assert again.status_code == 201
        assert again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
        assert database.rows("o-commit") == [("o-commit", 100)]

        key = str(uuid.uuid4())
        streamed = post(url, "o-stream", key=key, mode="stream")
        assert streamed.status_code == 201
        assert streamed.json()["order_id"] == "o-stream"
        assert post(url, "o-stream", key=key, mode="stream").content == streamed.content
        assert database.rows("o-stream") == [("o-stream", 100)]

        key = str(uuid.uuid4())
        assert post(url, "o-raise", key=key, mode="raise").status_code == 500
        assert database.rows("o-raise") == []
        assert post(url, "o-raise", key=key, mode="raise").status_code == 500  # released: it ran again
        assert database.rows("o-raise") == []

        key = str(uuid.uuid4())
        assert post(url, "o-500", key=key, mode="500").status_code == 500
        assert database.rows("o-500") == []

        key = str(uuid.uuid4())
        declined = post(url, "o-400", key=key, mode="400")
        assert declined.status_code == 400
        assert database.rows("o-400") == [("o-400", 100)]
        assert post(url, "o-400", key=key, mode="400").content == declined.content
        assert database.rows("o-400") == [("o-400", 100)]


def test_a_view_that_rolls_its_block_back_is_released_and_not_stored(database: Database) -> None:
    """transaction.set_rollback(True) then a 201: nothing commits, so the view's answer goes out unstored (no
    replay header), no row is left, and the same key runs the view again at once (no 409 until the lease ends)."""
    with serving("django", database.env()) as url:
        key = str(uuid.uuid4())
        first = post(url, "o-rollback", key=key, mode="set_rollback")
        assert first.status_code == 201
        assert "idempotent-replayed" not in first.headers
        assert database.rows("o-rollback") == []
        again = post(url, "o-rollback", key=key, mode="set_rollback")
        assert again.status_code == 201
        assert "idempotent-replayed" not in again.headers
        assert again.json()["run"] == first.json()["run"] + 1  # the view ran again
        assert database.rows("o-rollback") == []
        # The released key then commits normally: one row, replayed after.
        done = post(url, "o-rollback", key=key)
        assert done.status_code == 201
        assert post(url, "o-rollback", key=key).headers["idempotent-replayed"] == "true"
        assert database.rows("o-rollback") == [("o-rollback", 100)]


@pytest.mark.parametrize(
    ("sql", "mode"),
    [
        (["COMMIT"], "raise"),
        (["COMMIT"], ""),
        (["COMMIT", "INSERT INTO payments (order_id, cents) VALUES ('o-ended', 2)"], "raise"),
    ],
    ids=["commit-raise", "commit-201", "commit-write-raise"],
)
def test_a_view_that_commits_the_block_itself_holds_the_key(database: Database, sql: list[str], mode: str) -> None:
    """The view writes, runs a raw COMMIT through Django's connection (perhaps writes again), then raises or
    answers 201. On PostgreSQL (psycopg 3) the COMMIT is refused before it is sent: nothing commits. On SQLite it
    runs and is found after the view: what it committed stays. Either way the key is held (500
    transaction-ended, then 409 outcome-unknown, the view not run again) instead of released, where the retry
    ran the view again and committed a second row."""
    with serving("django", database.env()) as url:
        key = str(uuid.uuid4())
        first = post(url, "o-ended", key=key, mode=mode, sql=sql)
        assert first.status_code == 500, first.text
        assert first.headers["content-type"] == "application/problem+json", first.text
        assert first.json()["type"].endswith("/transaction-ended")
        retry = post(url, "o-ended", key=key, mode=mode, sql=sql)
        assert retry.status_code == 409, retry.text
        assert retry.json()["type"].endswith("/outcome-unknown")
        assert post(url, "o-next", key=str(uuid.uuid4())).status_code == 201  # the connection serves on
    committed = database.rows("o-ended")
    if database.backend == "postgres":
        assert committed == []  # psycopg 3: the COMMIT was refused before it was sent
    else:
        # SQLite: found after the view. The write after the COMMIT committed at once too (Django's SQLite
        # connection autocommits between Django's transactions).
        assert committed == [("o-ended", 100)] + ([("o-ended", 2)] if len(sql) > 1 else [])
    assert database.rows("o-next") == [("o-next", 100)]


def test_sqlite_without_immediate_mode_takes_the_write_lock_at_the_start(tmp_path: Path) -> None:
    """An SQLite alias with Django's default (deferred) transactions, and a view that reads before it writes:
    four keys at once never get SQLITE_BUSY's 500 page, because idempo takes the write lock as the block's first
    statement. A claim that waits past the store's busy_timeout meanwhile is a 503 problem with Retry-After (the
    view not run), and its retry commits: in the end one row per key."""
    database = Database("sqlite", None, tmp_path)
    database.create()
    with serving("django", database.env(IDEMPO_TX_SQLITE_MODE="deferred")) as url:
        keys = {f"o-deferred-{n}": str(uuid.uuid4()) for n in range(4)}
        pending = list(keys)
        for _ in range(10):
            with ThreadPoolExecutor(len(pending)) as pool:
                answers = list(pool.map(lambda order: post(url, order, key=keys[order], mode="read_first"), pending))
            for answer in answers:
                assert answer.status_code in (201, 503), answer.text[:300]
                if answer.status_code == 503:
                    assert answer.headers["content-type"] == "application/problem+json"
                    assert "retry-after" in answer.headers
            pending = [order for order, answer in zip(pending, answers, strict=True) if answer.status_code == 503]
            if not pending:
                break
        assert pending == []
        for order in keys:
            assert database.rows(order) == [(order, 100)]


@pytest.mark.postgres
def test_commit_failure_is_rolled_back_released_and_answered_500(postgres_url: str, tmp_path: Path) -> None:
    """A deferred UNIQUE constraint fails the atomic block's COMMIT: no row, a 500 commit-failed problem, and the
    key released (the same request runs again and fails the same way, rather than replaying)."""
    database = Database("postgres", postgres_url, tmp_path)
    database.create()
    try:
        with serving("django", database.env()) as url:
            key = str(uuid.uuid4())
            failed = post(url, "o-deferred", key=key, mode="deferred", ref="r1")
            assert failed.status_code == 500
            assert failed.headers["content-type"] == "application/problem+json"
            assert failed.json()["type"].endswith("/commit-failed")
            assert database.rows("o-deferred") == []
            assert post(url, "o-deferred", key=key, mode="deferred", ref="r1").status_code == 500
    finally:
        database.drop()


def test_a_transactional_view_on_a_store_that_cannot_join_is_refused_at_start_up(tmp_path: Path) -> None:
    """A transactional view with a memory store: the server does not start, and says why."""
    env = {"IDEMPO_TX_BACKEND": "memory://", "IDEMPO_TX_DB": str(tmp_path / "app.db"), "IDEMPO_SECRET": "s" * 32}
    with pytest.raises(RuntimeError, match="transactional view"):
        start("django", env)


def test_an_async_view_cannot_be_transactional() -> None:
    """An async view (a function, or an async class-based view's as_view()) marked transactional is refused when
    decorated, naming why; marked without transactional=True, an async class-based view stays async."""
    code = (
        "import django\n"
        "from django.conf import settings\n"
        "settings.configure()\n"
        "django.setup()\n"
        "from asgiref.sync import iscoroutinefunction\n"
        "from django.views import View\n"
        "from idempo.django import idempotency, idempotency_required\n"
        "async def view(request): ...\n"
        "class Pay(View):\n"
        "    async def post(self, request): ...\n"
        "for decorator, target in [(idempotency_required(transactional=True), view),\n"
        "                          (idempotency(transactional=True), Pay.as_view())]:\n"
        "    try:\n"
        "        decorator(target)\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, 'SynchronousOnlyOperation' in str(exc))\n"
        "print(iscoroutinefunction(idempotency()(Pay.as_view())))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    # Django marks an async class-based view with asgiref's marker, which inspect does not read on 3.11.
    assert done.stdout.split("\n")[:3] == ["ConfigurationError True", "ConfigurationError True", "True"], done.stderr


def test_django_example(tmp_path: Path) -> None:
    """examples/transactional/django_payments.py under waitress on SQLite: 201, then the replay; one row."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IDEMPO_SECRET": "s" * 32, "PAYMENTS_DB": str(tmp_path / "p.db")}
    app = "examples.transactional.django_payments:application"
    command = [sys.executable, "-m", "waitress", "--listen", f"127.0.0.1:{port}", app]
    process = subprocess.Popen(command, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/payments"
    headers = {"Idempotency-Key": "8e03978e-40d5-43e8-bc93-6894a57f9324"}
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"the example exited with {process.returncode}"
            try:
                first = httpx.post(url, json={"order_id": "o1", "cents": 1999}, headers=headers, timeout=10)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the example did not start"
                time.sleep(0.1)
        again = httpx.post(url, json={"order_id": "o1", "cents": 1999}, headers=headers, timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
    assert first.status_code == 201, first.text
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    with sqlite3.connect(tmp_path / "p.db") as conn:
        assert conn.execute("SELECT order_id, cents FROM payments").fetchall() == [("o1", 1999)]
