"""Fixtures for transactional mode: the app's own database (a PostgreSQL schema or an SQLite file) with a
business table, and stores bound to it (``from_pool``, the app's file)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import psycopg_pool
import pytest

from idempo.stores.postgres import AsyncPostgresStore, PostgresStore
from idempo.stores.sqlite import AsyncSQLiteStore, SQLiteStore

PAYMENTS_PG = "CREATE TABLE {schema}.payments (id serial PRIMARY KEY, order_id text NOT NULL, cents int NOT NULL)"
PAYMENTS_SQLITE = "CREATE TABLE payments (id INTEGER PRIMARY KEY, order_id TEXT NOT NULL, cents INTEGER NOT NULL)"


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
