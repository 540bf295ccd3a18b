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
from sqlalchemy.orm import Session

import idempo.fastapi
from idempo import idempotent
from idempo.asgi import IdempotencyMiddleware
from idempo.exceptions import CommitUnknown, ConfigurationError, KeyHeld, TransactionControlled
from idempo.stores._base import ending_statement
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


def _end_it(tx: Any, how: str) -> None:
    """End idempo's transaction through SQLAlchemy, as a handler might (sync)."""
    if how == "commit()":
        tx.connection.commit()
    elif how == "Session commit()":  # a session of the app's own, taking the connection's transaction over
        session = Session(bind=tx.connection, join_transaction_mode="control_fully")
        session.execute(_INSERT, {"order_id": "by-session", "cents": 9})
        session.commit()
    elif how == "COMMIT statement":
        tx.connection.exec_driver_sql("/* app */ COMMIT")
    elif how == "write; COMMIT in one string":  # psycopg runs both (no parameters: the simple protocol)
        tx.connection.exec_driver_sql("INSERT INTO payments (order_id, cents) VALUES ('in-string', 8); COMMIT")
    else:
        tx.connection.exec_driver_sql("END")


@pytest.mark.parametrize("then", ["propagate", "swallow and return"])
@pytest.mark.parametrize(
    ("driver", "how"),
    [
        ("psycopg", "commit()"),
        ("psycopg", "Session commit()"),
        ("psycopg", "COMMIT statement"),
        ("psycopg", "write; COMMIT in one string"),
        ("pysqlite", "commit()"),
        ("pysqlite", "Session commit()"),
        ("pysqlite", "END statement"),
    ],
)
def test_handler_commit_is_refused_and_holds_the_key(
    driver: str, how: str, then: str, request: pytest.FixtureRequest
) -> None:
    """The handler tries to commit idempo's transaction itself (SQLAlchemy's Connection.commit(), a Session of
    its own in control of the connection, a COMMIT / END statement through it, alone or after a write): refused
    before it runs (TransactionControlled naming the rule), so nothing commits. The handler lets the error out,
    or catches it and returns: either way the call raises TransactionControlled, the key is held (a retry
    raises KeyHeld without running), and no row is committed; before, the handler's COMMIT committed its row
    with the record still in progress, and only a check after the handler returned held the key."""
    app: Any = request.getfixturevalue("pg_app" if driver == "psycopg" else "sqlite_app")
    if driver == "psycopg":
        engine = create_engine(_pg_url(app, "psycopg"))
        store: Any = PostgresStore.from_engine(engine)
    else:
        engine = create_engine(f"sqlite:///{app.path}")
        store = SQLiteStore.from_engine(engine)
    store.open()
    calls: list[str] = []
    refusals: list[str] = []

    @idempotent(store=store, key="order_id", scope=_scope(), transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> str:
        calls.append(order_id)
        tx.connection.execute(_INSERT, {"order_id": order_id, "cents": 1})
        try:
            _end_it(tx, how)
        except TransactionControlled as exc:
            refusals.append(str(exc))
            if then == "propagate":
                raise
        return "ok"

    with pytest.raises(TransactionControlled):
        charge("h1")
    with pytest.raises(KeyHeld):
        charge("h1")
    assert calls == ["h1"]
    assert len(refusals) == 1
    assert "refused" in refusals[0]
    assert "savepoint" in refusals[0]
    assert app.rows() == []
    assert _post_next(store, app) == [("next", 1)]  # the engine's connections serve on
    store.close()
    engine.dispose()


def _post_next(store: Any, app: Any) -> list[tuple[object, ...]]:
    @idempotent(store=store, key="order_id", scope=_scope(), transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> str:
        tx.connection.execute(_INSERT, {"order_id": order_id, "cents": 1})
        return "ok"

    assert charge("next") == "ok"
    rows: list[tuple[object, ...]] = app.rows("next")
    return rows


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["commit()", "COMMIT statement", "ROLLBACK statement"])
async def test_fastapi_handler_commit_is_refused_answering_transaction_ended(sqlite_app: SQLiteApp, how: str) -> None:
    """A FastAPI route on an aiosqlite engine commits (or rolls back) idempo's transaction through
    ``tx.connection``: refused before it runs; the answer is 500 problem transaction-ended, a retry 409
    outcome-unknown without running, and no row is committed (the handler's write rolled back)."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{sqlite_app.path}")
    app = FastAPI()
    runs: list[int] = []

    @app.post("/payments", status_code=201)
    async def pay(tx: idempo.fastapi.Transaction) -> dict[str, str]:
        runs.append(1)
        await tx.connection.execute(_INSERT, {"order_id": "r1", "cents": 6})
        if how == "commit()":
            await tx.connection.commit()
        else:
            await tx.connection.execute(text(how.split()[0]))
        return {"ok": "yes"}

    app.add_middleware(IdempotencyMiddleware, store=AsyncSQLiteStore.from_engine(engine))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = await client.post("/payments", headers={"Idempotency-Key": "r1"})
        again = await client.post("/payments", headers={"Idempotency-Key": "r1"})
    assert (first.status_code, first.headers["content-type"]) == (500, "application/problem+json"), first.text
    assert first.json()["type"].endswith("/transaction-ended")
    assert (again.status_code, again.json()["type"].rsplit("/", 1)[1]) == (409, "outcome-unknown")
    assert runs == [1]
    assert sqlite_app.rows() == []
    await engine.dispose()


@pytest.mark.postgres
@pytest.mark.anyio
@pytest.mark.parametrize("how", ["commit()", "COMMIT statement", "COMMIT then a write"])
async def test_asyncpg_handler_commit_is_refused_and_holds_the_key(pg_app: PgApp, how: str) -> None:
    """The async twin on asyncpg (AsyncConnection.commit(), or COMMIT through text(), perhaps followed by a
    write): refused before it runs, so the write after it never happens either (the asyncpg adapter would have
    sent it outside any transaction, committed at once); TransactionControlled, then KeyHeld; no row."""
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

    with pytest.raises(TransactionControlled):
        await charge("h2")
    with pytest.raises(KeyHeld):
        await charge("h2")
    assert calls == ["h2"]
    assert pg_app.rows() == []
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


@pytest.mark.parametrize(
    ("sql", "head"),
    [
        ("COMMIT", "COMMIT"),
        ("commit;", "COMMIT"),
        ("/* app */ END", "END"),
        ("-- app\nROLLBACK", "ROLLBACK"),
        ("ROLLBACK AND CHAIN", "ROLLBACK"),
        ("ABORT", "ABORT"),
        ("PREPARE TRANSACTION 'gx'", "PREPARE TRANSACTION"),
        ("INSERT INTO payments VALUES (1); COMMIT", "COMMIT"),
        ("SELECT $1; /* then */ commit", "COMMIT"),
        ("SELECT $tag$ x; $tag$; END", "END"),
        ("ROLLBACK TO SAVEPOINT sp", None),
        ("ROLLBACK TRANSACTION TO sp", None),
        ("ROLLBACK WORK TO SAVEPOINT sp", None),
        ("PREPARE q AS SELECT 1", None),
        ("BEGIN", None),
        ("SELECT commit_id FROM t", None),
        ("INSERT INTO t VALUES ('a; commit')", None),
        ("INSERT INTO t VALUES ('it''s; COMMIT')", None),
        ("SELECT E'it\\'s; COMMIT'", None),
        ('SELECT 1 AS "x;commit"', None),
        ("SELECT 1 -- ; COMMIT", None),
        ("SELECT 1 /* ; COMMIT */", None),
        ("DO $$ BEGIN COMMIT; END $$", None),
        ("SELECT 1;", None),
    ],
)
def test_ending_statement(sql: str, head: str | None) -> None:
    """The statement check of the SQLAlchemy guard: the first statement that ends the transaction, however
    written (comments before it, a ';' after it, after other statements), and nothing inside a string, a
    quoted name, a comment or a dollar quote; ROLLBACK TO (a savepoint) ends nothing."""
    assert ending_statement(sql) == head
