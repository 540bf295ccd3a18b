"""The transactional examples of docs/transactional.md and the README run as written: served by uvicorn in a
child process, one payment posted twice, one row and a replay."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import PgApp, _free_port

ROOT = Path(__file__).resolve().parents[2]


def _serve_and_pay(module: str, env: dict[str, str], cwd: Path) -> tuple[httpx.Response, httpx.Response]:
    port = _free_port()
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), "IDEMPO_SECRET": "s" * 32, **env}
    command = [sys.executable, "-m", "uvicorn", f"{module}:app", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=child_env, cwd=cwd)
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
    return first, again


@pytest.mark.postgres
def test_fastapi_example(pg_app: PgApp, tmp_path: Path) -> None:
    """examples/transactional/fastapi_payments.py on PostgreSQL: 201, then the replay; one row."""
    first, again = _serve_and_pay(
        "examples.transactional.fastapi_payments", {"DATABASE_URL": pg_app.conninfo()}, tmp_path
    )
    assert first.status_code == 201, first.text
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert pg_app.rows("o1") == [("o1", 1999)]


def test_starlette_example(tmp_path: Path) -> None:
    """examples/transactional/starlette_payments.py on SQLite: 201, then the replay; one row in the app's file."""
    first, again = _serve_and_pay("examples.transactional.starlette_payments", {}, tmp_path)
    assert first.status_code == 201, first.text
    assert again.content == first.content
    with sqlite3.connect(tmp_path / "payments.db") as conn:
        assert conn.execute("SELECT order_id, cents FROM payments").fetchall() == [("o1", 1999)]
