"""Transactional mode on the app's SQLAlchemy 2 engines: psycopg and asyncpg on PostgreSQL, pysqlite and
aiosqlite on an SQLite file. The handler writes through the SQLAlchemy connection or the joined session
(join_transaction_mode="create_savepoint"); its writes commit with the record, or not at all."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

import idempo.fastapi
from idempo import idempotent
from idempo.asgi import IdempotencyMiddleware
from idempo.exceptions import CommitUnknown, ConfigurationError, KeyHeld, TransactionControlled
from idempo.stores.postgres import AsyncPostgresStore, PostgresStore
from idempo.stores.sqlite import AsyncSQLiteStore, SQLiteStore
from idempo.transactional import AsyncTransaction, Transaction

from .conftest import PgApp, SQLiteApp

_INSERT = text("INSERT INTO payments (order_id, cents) VALUES (:order_id, :cents)")


def _pg_url(pg_app: PgApp, driver: str) -> str:
    base = pg_app.url.replace("postgresql://", f"postgresql+{driver}://", 1)
    if driver == "asyncpg":
        return base
    return f"{base}?options=-csearch_path%3D{pg_app.schema}"


def _scope() -> str:
    return f"s-{uuid.uuid4().hex}"


@pytest.mark.postgres
def test_psycopg_engine(pg_app: PgApp) -> None:
    """PostgresStore.from_engine on a psycopg engine: the row and the record commit together; the session's own
    commit() only releases its savepoint; a raise rolls everything back."""
    engine = create_engine(_pg_url(pg_app, "psycopg"))
    store = PostgresStore.from_engine(engine)
    store.open()
    calls: list[str] = []

    @idempotent(store=store, key="order_id", scope=_scope(), transactional=True)
    def charge(order_id: str, fail: bool = False, *, tx: Transaction) -> str:
        calls.append(order_id)
        tx.connection.execute(_INSERT, {"order_id": order_id, "cents": 1})
        tx.session.execute(_INSERT, {"order_id": order_id + "-session", "cents": 2})
        tx.session.commit()  # a savepoint: idempo's transaction stays open
        if fail:
            raise RuntimeError("boom")
        return "ok"

    assert charge("e1") == "ok"
    assert charge("e1") == "ok"
    with pytest.raises(RuntimeError):
        charge("e2", True)
    assert calls == ["e1", "e2"]
    assert pg_app.rows() == [("e1", 1), ("e1-session", 2)]
    store.close()
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.anyio
async def test_asyncpg_engine(pg_app: PgApp) -> None:
    """AsyncPostgresStore.from_engine on an asyncpg engine (idempo's tables named by schema)."""
    engine = create_async_engine(_pg_url(pg_app, "asyncpg"))
    store = AsyncPostgresStore.from_engine(engine, schema=pg_app.schema)
    await store.open()
    insert = text(f"INSERT INTO {pg_app.schema}.payments (order_id, cents) VALUES (:order_id, :cents)")

    @idempotent(store=store, key="order_id", scope=_scope(), transactional=True)
    async def charge(order_id: str, *, tx: AsyncTransaction) -> str:
        await tx.session.execute(insert, {"order_id": order_id, "cents": 3})
        return "ok"

    assert await charge("a1") == "ok"
    assert await charge("a1") == "ok"
    assert pg_app.rows() == [("a1", 3)]
    await store.aclose()
    await engine.dispose()


def test_pysqlite_engine(sqlite_app: SQLiteApp) -> None:
    """SQLiteStore.from_engine on a pysqlite engine: one row, then replays; a raise leaves nothing."""
    engine = create_engine(f"sqlite:///{sqlite_app.path}")
    store = SQLiteStore.from_engine(engine)
    store.open()

    @idempotent(store=store, key="order_id", scope=_scope(), transactional=True)
    def charge(order_id: str, fail: bool = False, *, tx: Transaction) -> str:
        tx.connection.execute(_INSERT, {"order_id": order_id, "cents": 4})
        if fail:
            raise RuntimeError("boom")
        return "ok"

    assert charge("s1") == "ok"
    assert charge("s1") == "ok"
    with pytest.raises(RuntimeError):
        charge("s2", True)
    assert sqlite_app.rows() == [("s1", 4)]
    store.close()
    engine.dispose()


@pytest.mark.anyio
async def test_aiosqlite_engine(sqlite_app: SQLiteApp) -> None:
    """AsyncSQLiteStore.from_engine on an aiosqlite engine, writing through the AsyncSession."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{sqlite_app.path}")
    store = AsyncSQLiteStore.from_engine(engine)
    await store.open()

    @idempotent(store=store, key="order_id", scope=_scope(), transactional=True)
    async def charge(order_id: str, *, tx: AsyncTransaction) -> str:
        await tx.session.execute(_INSERT, {"order_id": order_id, "cents": 5})
        return "ok"

    assert await charge("q1") == "ok"
    assert await charge("q1") == "ok"
    assert sqlite_app.rows() == [("q1", 5)]
    await store.aclose()
    await engine.dispose()


def test_wrong_dialect(tmp_path: Path) -> None:
    engine: Any = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigurationError):
        PostgresStore.from_engine(engine)
    with pytest.raises(ConfigurationError):
        SQLiteStore.from_engine(create_engine("sqlite://"))


@pytest.mark.anyio
async def test_fastapi_session_dependency(sqlite_app: SQLiteApp) -> None:
    """FastAPI's ``session: idempo.fastapi.Session`` writes through the AsyncSession joined to the transaction."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{sqlite_app.path}")
    app = FastAPI()

    @app.post("/payments", status_code=201)
    async def pay(session: idempo.fastapi.Session) -> dict[str, str]:
        await session.execute(_INSERT, {"order_id": "f1", "cents": 6})
        await session.commit()  # releases the savepoint only
        return {"ok": "yes"}

    app.add_middleware(IdempotencyMiddleware, store=AsyncSQLiteStore.from_engine(engine))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        first = await client.post("/payments", headers={"Idempotency-Key": "f1"})
        again = await client.post("/payments", headers={"Idempotency-Key": "f1"})
    assert first.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert sqlite_app.rows() == [("f1", 6)]
    await engine.dispose()


@pytest.mark.parametrize("how", ["commit()", "COMMIT statement"])
@pytest.mark.parametrize("then", ["return", "raise"])
@pytest.mark.parametrize("driver", ["psycopg", "pysqlite"])
def test_handler_commit_holds_the_key(
    driver: str, then: str, how: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The handler commits idempo's transaction itself (SQLAlchemy's Connection.commit(), or a COMMIT statement
    through it), then returns or raises: the call raises TransactionControlled (or the handler's exception) and
    the key is held, so a retry raises KeyHeld without running; the row the handler committed is the one
    effect (REVIEW-TX F2)."""
    app: Any = request.getfixturevalue("pg_app" if driver == "psycopg" else "sqlite_app")
    if driver == "psycopg":
        engine = create_engine(_pg_url(app, "psycopg"))
        store: Any = PostgresStore.from_engine(engine)
    else:
        engine = create_engine(f"sqlite:///{app.path}")
        store = SQLiteStore.from_engine(engine)
    store.open()
    calls: list[str] = []

    @idempotent(store=store, key="order_id", scope=_scope(), transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> str:
        calls.append(order_id)
        tx.connection.execute(_INSERT, {"order_id": order_id, "cents": 1})
        if how == "commit()":
            tx.connection.commit()
        else:
            tx.connection.exec_driver_sql("COMMIT")
        if then == "raise":
            raise RuntimeError("provider down after the commit")
        return "ok"

    with pytest.raises(TransactionControlled if then == "return" else RuntimeError):
        charge("h1")
    with pytest.raises(KeyHeld):
        charge("h1")
    assert calls == ["h1"]
    assert app.rows() == [("h1", 1)]
    store.close()
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.anyio
@pytest.mark.parametrize("how", ["commit()", "COMMIT statement", "COMMIT then a write"])
async def test_asyncpg_handler_commit_holds_the_key(pg_app: PgApp, how: str) -> None:
    """The async twin on asyncpg (AsyncConnection.commit(), or COMMIT through text(), perhaps followed by a
    write, then a raise): TransactionControlled (or the handler's exception), then KeyHeld; the row written
    before the COMMIT is there (the asyncpg adapter runs the write after it outside any transaction)."""
    engine = create_async_engine(_pg_url(pg_app, "asyncpg"))
    store = AsyncPostgresStore.from_engine(engine, schema=pg_app.schema)
    await store.open()
    insert = text(f"INSERT INTO {pg_app.schema}.payments (order_id, cents) VALUES (:order_id, :cents)")
    calls: list[str] = []

    @idempotent(store=store, key="order_id", scope=_scope(), transactional=True)
    async def charge(order_id: str, *, tx: AsyncTransaction) -> str:
        calls.append(order_id)
        await tx.connection.execute(insert, {"order_id": order_id, "cents": 1})
        if how == "commit()":
            await tx.connection.commit()
        else:
            await tx.connection.execute(text("COMMIT"))
        if how == "COMMIT then a write":
            await tx.connection.execute(insert, {"order_id": order_id, "cents": 2})
            raise RuntimeError("provider down after the commit")
        return "ok"

    with pytest.raises(RuntimeError if how == "COMMIT then a write" else TransactionControlled):
        await charge("h2")
    with pytest.raises(KeyHeld):
        await charge("h2")
    assert calls == ["h2"]
    # Once: the retry did not run. The adapter sent the write after the COMMIT on its own (autocommit).
    assert pg_app.rows() == [("h2", 1), ("h2", 2)] if how == "COMMIT then a write" else [("h2", 1)]
    await store.aclose()
    await engine.dispose()


@pytest.mark.postgres
@pytest.mark.anyio
async def test_lost_connection_logs_no_stored_response(pg_app: PgApp, caplog: pytest.LogCaptureFixture) -> None:
    """The handler's backend is terminated before idempo completes the record (asyncpg engine): SQLAlchemy's
    error renders the statement's parameters, i.e. the response being stored. idempo's log lines and the
    CommitUnknown it raises name the driver's error only: the response's body is nowhere (guarantee 7,
    REVIEW-TX F7)."""
    engine = create_async_engine(_pg_url(pg_app, "asyncpg"))
    store = AsyncPostgresStore.from_engine(engine, schema=pg_app.schema)
    await store.open()
    insert = text(f"INSERT INTO {pg_app.schema}.payments (order_id, cents) VALUES (:order_id, :cents)")
    secret = "card-4111-secret-body"

    @idempotent(store=store, key="order_id", scope=_scope(), transactional=True)
    async def charge(order_id: str, *, tx: AsyncTransaction) -> dict[str, str]:
        await tx.connection.execute(insert, {"order_id": order_id, "cents": 1})
        pid = (await tx.connection.execute(text("SELECT pg_backend_pid()"))).scalar()
        async with await psycopg.AsyncConnection.connect(pg_app.url, autocommit=True) as side:
            await side.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return {"paid": secret}

    caplog.set_level(logging.DEBUG, logger="idempo")
    with pytest.raises(CommitUnknown) as raised:
        await charge("t1")
    chain: list[BaseException] = []
    error: BaseException | None = raised.value
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert [r for r in caplog.records if "did not commit" in r.getMessage()]  # the line under test was logged
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert secret not in logged
    assert all(secret not in str(e) for e in chain)
    assert pg_app.rows() == []
    await store.aclose()
    await engine.dispose()
