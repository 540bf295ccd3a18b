"""Child processes for the transactional tests of the fronts: the apps of ``crash_apps.py``, and their databases."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg

from idempo.stores.postgres import PostgresStore

from .conftest import PAYMENTS_PG, PAYMENTS_SQLITE, _free_port

ROOT = Path(__file__).resolve().parents[2]


class Database:
    """The app's database for one backend: idempo's records and ``payments`` (a PostgreSQL schema, an SQLite file)."""

    def __init__(self, backend: str, postgres_url: str | None, workdir: Path) -> None:
        self.backend = backend
        self.url = postgres_url
        self.schema = f"idempo_txd_{uuid.uuid4().hex[:10]}"
        self.path = workdir / "app.db"

    def create(self) -> None:
        if self.backend == "postgres":
            assert self.url is not None
            store = PostgresStore(f"{self.url}?schema={self.schema}", check_schema=False)
            store.create_schema()
            store.close()
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(PAYMENTS_PG.format(schema=self.schema))  # type: ignore[arg-type]
        else:
            with sqlite3.connect(self.path) as conn:
                conn.execute(PAYMENTS_SQLITE)

    def drop(self) -> None:
        if self.backend == "postgres":
            assert self.url is not None
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")  # type: ignore[arg-type]

    def rows(self, order_id: str) -> list[tuple[object, ...]]:
        """The payments of one order: (order_id, cents)."""
        if self.backend == "postgres":
            assert self.url is not None
            with psycopg.connect(self.url, autocommit=True) as conn:
                query = f"SELECT order_id, cents FROM {self.schema}.payments WHERE order_id = %s"
                return conn.execute(query, (order_id,)).fetchall()  # type: ignore[arg-type]
        with sqlite3.connect(self.path) as conn:
            return conn.execute("SELECT order_id, cents FROM payments WHERE order_id = ?", (order_id,)).fetchall()

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of crash_apps for this database."""
        env = {"IDEMPO_TX_BACKEND": self.backend, "IDEMPO_SECRET": "s" * 32, "IDEMPO_FAULTS": ""}
        if self.backend == "postgres":
            assert self.url is not None
            env.update(IDEMPO_TX_DB=self.url, IDEMPO_TX_SCHEMA=self.schema)
        else:
            env["IDEMPO_TX_DB"] = str(self.path)
        env.update(extra)
        return env


def _command(front: str, port: int) -> list[str]:
    if front == "django":
        return [
            sys.executable,
            "-m",
            "waitress",
            "--listen",
            f"127.0.0.1:{port}",
            "--threads",
            "4",
            "--call",
            "tests.transactional.crash_apps:django_app",
        ]
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.transactional.crash_apps:fastapi_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--lifespan",
        "on",
    ]


def start(front: str, env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    """Start ``front`` (``fastapi`` or ``django``) in a child process; return its URL once it answers.

    Raises:
        RuntimeError: the process exited (its stderr in the message) or did not answer within 30 s.
    """
    return start_many(front, [env])[0]


def start_many(front: str, envs: list[dict[str, str]]) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """Start one process of ``front`` per environment, all at once; return their URLs once each answers.

    Raises:
        RuntimeError: a process exited (its stderr in the message) or did not answer within 30 s; every
            process started is stopped first.
    """
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    for env in envs:
        child_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
        port = _free_port()
        process = subprocess.Popen(_command(front, port), env=child_env, stderr=subprocess.PIPE, cwd=ROOT)
        started.append((f"http://127.0.0.1:{port}", process))
    try:
        for url, process in started:
            _wait_up(url, process)
    except BaseException:
        for _, process in started:
            stop(process)
        raise
    return started


def _wait_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            assert process.stderr is not None
            with process.stderr:
                error = process.stderr.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"the app exited with {process.returncode}: {error}")
        try:
            httpx.get(url + "/health", timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not start") from None
            time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; close its stderr."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


@contextmanager
def serving(front: str, env: dict[str, str]) -> Iterator[str]:
    """Serve ``front`` while the block runs; yield its URL."""
    url, process = start(front, env)
    try:
        yield url
    finally:
        stop(process)
