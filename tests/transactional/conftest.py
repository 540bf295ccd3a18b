"""Fixtures for transactional mode: the app's own database (a PostgreSQL schema or an SQLite file) with a
business table, and stores bound to it (``from_pool``, the app's file)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import psycopg_pool
import pytest

from idempo.stores.postgres import AsyncPostgresStore, PostgresStore
from idempo.stores.sqlite import AsyncSQLiteStore, SQLiteStore

# ref: a deferred unique constraint (a COMMIT that fails for a definite reason); cents 40001: a
# deferred trigger that fails the COMMIT with a serialization failure (SQLSTATE 40001).
PAYMENTS_PG = """
CREATE TABLE {schema}.payments (
    id serial PRIMARY KEY, order_id text NOT NULL, cents int NOT NULL, ref text,
    CONSTRAINT payments_ref UNIQUE (ref) DEFERRABLE INITIALLY DEFERRED
);
CREATE FUNCTION {schema}.conflict_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.cents = 40001 THEN
        RAISE EXCEPTION 'could not serialize access (test)' USING ERRCODE = '40001';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER conflict_at_commit AFTER INSERT ON {schema}.payments
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.conflict_at_commit();
"""
PAYMENTS_SQLITE = (
    "CREATE TABLE payments (id INTEGER PRIMARY KEY, order_id TEXT NOT NULL, cents INTEGER NOT NULL, ref TEXT UNIQUE)"
)


class PgApp:
    """The app's PostgreSQL database: a schema of the test's own holding idempo's tables and ``payments``."""

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema

    def conninfo(self) -> str:
        """Connection string whose search_path is the test's schema (the app's tables unqualified)."""
        return f"{self.url}{'&' if '?' in self.url else '?'}options=-csearch_path%3D{self.schema}"

    def rows(self, order_id: str | None = None) -> list[tuple[object, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            if order_id is None:
                return conn.execute(f"SELECT order_id, cents FROM {self.schema}.payments ORDER BY id").fetchall()
            query = f"SELECT order_id, cents FROM {self.schema}.payments WHERE order_id = %s"
            return conn.execute(query, (order_id,)).fetchall()

    def record(self, record_key: str) -> tuple[object, ...] | None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            query = f"SELECT state, token, status FROM {self.schema}.idempo_records WHERE record_key = %s"
            return conn.execute(query, (record_key,)).fetchone()


@pytest.fixture
def pg_app(postgres_url: str) -> Iterator[PgApp]:
    """A schema of this test's own with idempo's tables (``idempo migrate``) and a payments table."""
    schema = f"idempo_tx_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(f"{postgres_url}?schema={schema}", check_schema=False)
    store.create_schema()
    store.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(PAYMENTS_PG.format(schema=schema))
    yield PgApp(postgres_url, schema)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def pg_pool(pg_app: PgApp) -> Iterator[psycopg_pool.ConnectionPool]:
    """The app's own blocking pool (connections not in autocommit mode, as psycopg's default)."""
    pool = psycopg_pool.ConnectionPool(pg_app.conninfo(), min_size=1, max_size=5, open=True)
    yield pool
    pool.close()


@pytest.fixture
def pg_store(pg_app: PgApp, pg_pool: psycopg_pool.ConnectionPool) -> Iterator[PostgresStore]:
    store = PostgresStore.from_pool(pg_pool, schema=pg_app.schema)
    store.open()
    yield store
    store.close()


@pytest.fixture
async def apg_store(pg_app: PgApp) -> AsyncIterator[AsyncPostgresStore]:
    """An AsyncPostgresStore on the app's own AsyncConnectionPool (asyncio only)."""
    pool = psycopg_pool.AsyncConnectionPool(pg_app.conninfo(), min_size=1, max_size=5, open=False)
    await pool.open()
    store = AsyncPostgresStore.from_pool(pool, schema=pg_app.schema)
    await store.open()
    yield store
    await store.aclose()
    await pool.close()


class SQLiteApp:
    """The app's SQLite file, holding idempo's records and ``payments``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self, order_id: str | None = None) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.path) as conn:
            if order_id is None:
                return conn.execute("SELECT order_id, cents FROM payments ORDER BY id").fetchall()
            return conn.execute("SELECT order_id, cents FROM payments WHERE order_id = ?", (order_id,)).fetchall()

    def record(self, record_key: str) -> tuple[object, ...] | None:
        with sqlite3.connect(self.path) as conn:
            query = "SELECT state, token, status FROM idempo_records WHERE record_key = ?"
            row: tuple[object, ...] | None = conn.execute(query, (record_key,)).fetchone()
            return row


@pytest.fixture
def sqlite_app(tmp_path: Path) -> SQLiteApp:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute(PAYMENTS_SQLITE)
    return SQLiteApp(path)


@pytest.fixture
def sqlite_store(sqlite_app: SQLiteApp) -> Iterator[SQLiteStore]:
    store = SQLiteStore(sqlite_app.path, busy_timeout=1.0)
    store.open()
    yield store
    store.close()


@pytest.fixture
async def asqlite_store(sqlite_app: SQLiteApp) -> AsyncIterator[AsyncSQLiteStore]:
    store = AsyncSQLiteStore(sqlite_app.path, busy_timeout=1.0)
    await store.open()
    yield store
    await store.aclose()


@pytest.fixture
def anyio_backend() -> str:
    """psycopg's async connections need asyncio."""
    return "asyncio"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Serve tests.transactional.tx_app with uvicorn in a child process, lifespan on; yield (URL, process)."""
    root = Path(__file__).resolve().parents[2]
    child_env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.transactional.tx_app:create_app",
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
    process = subprocess.Popen(command, env=child_env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited with {process.returncode}")
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the app did not start") from None
                time.sleep(0.05)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()


def app_env(backend: str, front: str, app: PgApp | SQLiteApp, **extra: str) -> dict[str, str]:
    """The environment of tx_app for one backend and front."""
    env = {"IDEMPO_TX_BACKEND": backend, "IDEMPO_TX_FRONT": front, "IDEMPO_SECRET": "s" * 32}
    if isinstance(app, PgApp):
        env.update(IDEMPO_TX_DB=app.conninfo(), IDEMPO_TX_SCHEMA=app.schema)
    else:
        env["IDEMPO_TX_DB"] = str(app.path)
    env.update(extra)
    return env
