"""@idempotent(transactional=True) on PostgreSQL (the app's psycopg_pool) and SQLite (the app's file):
the function's writes commit with its record, or not at all."""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

import psycopg
import psycopg_pool
import pytest

from idempo import idempotent
from idempo.exceptions import CommitFailed, ConfigurationError, KeyHeld, TransactionControlled
from idempo.stores.memory import MemoryStore
from idempo.stores.postgres import AsyncPostgresStore, PostgresStore
from idempo.stores.sqlite import AsyncSQLiteStore, SQLiteStore
from idempo.transactional import AsyncTransaction, Transaction

from .conftest import PgApp, SQLiteApp

pytestmark = pytest.mark.postgres


def _charge_pg(store: PostgresStore, scope: str) -> Any:
    calls: list[str] = []

    @idempotent(store=store, key="order_id", scope=scope, transactional=True)
    def charge(order_id: str, cents: int, *, tx: Transaction) -> int:
        calls.append(order_id)
        row = tx.connection.execute(
            "INSERT INTO payments (order_id, cents) VALUES (%s, %s) RETURNING id", (order_id, cents)
        ).fetchone()
        return int(row[0])

    charge.calls = calls  # type: ignore[attr-defined]
    return charge


def test_pg_commits_once_and_replays(pg_store: PostgresStore, pg_app: PgApp) -> None:
    """The write and the record commit together; a repeat replays without writing again."""
    charge = _charge_pg(pg_store, f"s-{uuid.uuid4().hex}")
    first = charge("o1", 100)
    assert charge("o1", 100) == first
    assert charge.calls == ["o1"]
    assert pg_app.rows() == [("o1", 100)]


def test_pg_raise_rolls_back_and_releases(pg_store: PostgresStore, pg_app: PgApp) -> None:
    """Write then raise: no row stays, and the retry runs (once) and commits."""
    attempts: list[int] = []

    @idempotent(store=pg_store, key="order_id", scope=f"s-{uuid.uuid4().hex}", transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> str:
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, 1)", (order_id,))
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("provider down")
        return "ok"

    with pytest.raises(RuntimeError):
        charge("o2")
    assert pg_app.rows() == []
    assert charge("o2") == "ok"
    assert pg_app.rows() == [("o2", 1)]


@pytest.mark.parametrize("then", ["propagate", "swallow and return"])
@pytest.mark.parametrize("method", ["commit", "rollback"])
def test_pg_commit_refused_inside(
    pg_store: PostgresStore, pg_pool: psycopg_pool.ConnectionPool, pg_app: PgApp, method: str, then: str
) -> None:
    """tx.connection.commit() (or rollback()) inside idempo's transaction is refused before it runs
    (TransactionControlled) and the key is held, as for a COMMIT statement and on every other store: the call
    raises TransactionControlled, the next KeyHeld (the function not run again), no row. Before, psycopg's own
    ProgrammingError left the function like any error: the key was released and the next call ran it again.
    The pool's connection serves on with its own methods."""
    calls: list[str] = []

    @idempotent(store=pg_store, key="order_id", scope=f"s-{uuid.uuid4().hex}", transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> str:
        calls.append(order_id)
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, 1)", (order_id,))
        try:
            getattr(tx.connection, method)()
        except TransactionControlled:
            if then == "propagate":
                raise
        return "ok"

    with pytest.raises(TransactionControlled):
        charge("o3")
    with pytest.raises(KeyHeld):
        charge("o3")
    assert calls == ["o3"]
    assert pg_app.rows() == []
    with pg_pool.connection() as conn:
        assert "commit" not in vars(conn)  # the guard is off the pool's connections


def _end_through(conn: Any, how: str) -> None:
    """A COMMIT reaching the server through one of psycopg's paths (blocking)."""
    if how == "execute":
        conn.execute("/* app */ COMMIT")
    elif how == "cursor":
        with conn.cursor() as cur:
            cur.execute("END;")
    elif how == "composed":
        conn.execute(psycopg.sql.SQL("COMMIT"))
    elif how == "executemany":
        with conn.cursor() as cur:
            cur.executemany("COMMIT", [()])
    elif how == "pipeline":
        with conn.pipeline():
            conn.execute("ROLLBACK")
    else:
        conn.execute("INSERT INTO payments (order_id, cents) VALUES ('in-string', 8); COMMIT")


@pytest.mark.parametrize("then", ["propagate", "swallow and return"])
@pytest.mark.parametrize("how", ["execute", "cursor", "composed", "executemany", "pipeline", "write; COMMIT"])
def test_pg_commit_statement_refused_before_it_runs(
    pg_store: PostgresStore, pg_pool: psycopg_pool.ConnectionPool, pg_app: PgApp, how: str, then: str
) -> None:
    """A COMMIT / END / ROLLBACK statement through tx.connection (its execute, a cursor, a sql.Composed,
    executemany, a pipeline, or after a write in one string) is refused before it is sent: TransactionControlled
    naming the rule; nothing commits, the key is held (KeyHeld, the function not run again), even when the
    function caught the error and returned. Before, the statement committed the row with the record still in
    progress, and only the check after the function held the key. The pool's connection serves on unguarded."""
    calls: list[str] = []
    refusals: list[str] = []

    @idempotent(store=pg_store, key="order_id", scope=f"s-{uuid.uuid4().hex}", transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> str:
        calls.append(order_id)
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, 1)", (order_id,))
        try:
            _end_through(tx.connection, how)
        except TransactionControlled as exc:
            refusals.append(str(exc))
            if then == "propagate":
                raise
        return "ok"

    with pytest.raises(TransactionControlled):
        charge("g1")
    with pytest.raises(KeyHeld):
        charge("g1")
    assert calls == ["g1"]
    assert len(refusals) == 1
    assert "refused" in refusals[0]
    assert pg_app.rows() == []

    @idempotent(store=pg_store, key="order_id", scope=f"s-{uuid.uuid4().hex}", transactional=True)
    def plain(order_id: str, *, tx: Transaction) -> str:
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, 1)", (order_id,))
        return "ok"

    assert plain("g2") == "ok"
    assert pg_app.rows() == [("g2", 1)]
    with pg_pool.connection() as conn:
        assert conn.cursor_factory is psycopg.Cursor  # the guard is off the pool's connections


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["execute", "cursor", "stream"])
async def test_async_pg_commit_statement_refused_before_it_runs(
    apg_store: AsyncPostgresStore, pg_app: PgApp, how: str
) -> None:
    """The async twin: a COMMIT through AsyncConnection.execute, an AsyncCursor, or a cursor's stream() is
    refused before it is sent; TransactionControlled, then KeyHeld; no row."""

    @idempotent(store=apg_store, key="order_id", scope=f"s-{uuid.uuid4().hex}", transactional=True)
    async def charge(order_id: str, *, tx: AsyncTransaction) -> str:
        await tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, 1)", (order_id,))
        if how == "execute":
            await tx.connection.execute("COMMIT")
        elif how == "cursor":
            async with tx.connection.cursor() as cur:
                await cur.execute("COMMIT")
        else:
            async with tx.connection.cursor() as cur:
                async for _ in cur.stream("COMMIT"):
                    pass
        return "ok"

    with pytest.raises(TransactionControlled):
        await charge("a1")
    with pytest.raises(KeyHeld):
        await charge("a1")
    assert pg_app.rows() == []


def test_sqlite_commits_once(sqlite_store: SQLiteStore, sqlite_app: SQLiteApp) -> None:
    """SQLite on the app's file: one row, then replays."""
    calls: list[str] = []

    @idempotent(store=sqlite_store, key="order_id", scope=f"s-{uuid.uuid4().hex}", transactional=True)
    def charge(order_id: str, cents: int, *, tx: Transaction) -> int:
        calls.append(order_id)
        cur = tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (?, ?)", (order_id, cents))
        return int(cur.lastrowid)

    first = charge("o1", 5)
    assert charge("o1", 5) == first
    assert calls == ["o1"]
    assert sqlite_app.rows() == [("o1", 5)]


@pytest.mark.parametrize("then", ["raise", "swallow and return"])
def test_sqlite_proxy_refuses_transaction_control(sqlite_store: SQLiteStore, sqlite_app: SQLiteApp, then: str) -> None:
    """The sqlite3 proxy's commit/rollback/close and a COMMIT statement raise; nothing is written. As on
    psycopg and SQLAlchemy, the key is then held (KeyHeld, the function not run again), whether the function
    raised its own error afterwards (it propagates) or caught the refusals and returned (TransactionControlled).
    Before, the key was released and the next call ran the function again, or the return committed."""
    tried: list[str] = []

    @idempotent(store=sqlite_store, key="order_id", scope=f"s-{uuid.uuid4().hex}", transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> str:
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (?, 1)", (order_id,))
        for action in (tx.connection.commit, tx.connection.rollback, tx.connection.close):
            with pytest.raises(TransactionControlled):
                action()
            tried.append(action.__name__)
        with pytest.raises(TransactionControlled):
            tx.connection.execute("COMMIT")
        if then == "raise":
            raise ValueError("no")
        return "ok"

    with pytest.raises(ValueError if then == "raise" else TransactionControlled):
        charge("o9")
    with pytest.raises(KeyHeld):
        charge("o9")
    assert tried == ["commit", "rollback", "close"]
    assert sqlite_app.rows() == []


@pytest.mark.anyio
async def test_async_pg(apg_store: AsyncPostgresStore, pg_app: PgApp) -> None:
    """An async function on an AsyncConnectionPool: one row, replays."""
    calls: list[str] = []

    @idempotent(store=apg_store, key="order_id", scope=f"s-{uuid.uuid4().hex}", transactional=True)
    async def charge(order_id: str, *, tx: AsyncTransaction) -> int:
        calls.append(order_id)
        cur = await tx.connection.execute(
            "INSERT INTO payments (order_id, cents) VALUES (%s, 7) RETURNING id", (order_id,)
        )
        row = await cur.fetchone()
        return int(row[0])

    first = await charge("a1")
    assert await charge("a1") == first
    assert calls == ["a1"]
    assert pg_app.rows() == [("a1", 7)]


@pytest.mark.anyio
async def test_async_sqlite(asqlite_store: AsyncSQLiteStore, sqlite_app: SQLiteApp) -> None:
    """An async function on the app's SQLite file."""

    @idempotent(store=asqlite_store, key="order_id", scope=f"s-{uuid.uuid4().hex}", transactional=True)
    async def charge(order_id: str, *, tx: AsyncTransaction) -> str:
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (?, 3)", (order_id,))
        return "done"

    assert await charge("a2") == "done"
    assert await charge("a2") == "done"
    assert sqlite_app.rows() == [("a2", 3)]


def test_memory_store_refused_at_decoration() -> None:
    """A store that cannot commit with the function's writes is a ConfigurationError when decorating."""
    with pytest.raises(ConfigurationError, match="transactional=True needs"):

        @idempotent(store=MemoryStore(), key="k", transactional=True)
        def f(k: str, *, tx: Transaction) -> None: ...


def test_function_without_tx_refused(sqlite_store: SQLiteStore) -> None:
    with pytest.raises(ConfigurationError, match="named tx"):

        @idempotent(store=sqlite_store, key="k", transactional=True)
        def f(k: str) -> None: ...


def test_url_built_postgres_store_refused(postgres_store_url: str) -> None:
    """A PostgresStore built from a URL has its own pool: not the app's transaction."""
    store = PostgresStore(postgres_store_url)
    try:
        with pytest.raises(ConfigurationError, match="from_pool"):

            @idempotent(store=store, key="k", transactional=True)
            def f(k: str, *, tx: Transaction) -> None: ...
    finally:
        store.close()


def test_sqlite_sees_its_own_file(sqlite_store: SQLiteStore, sqlite_app: SQLiteApp) -> None:
    """The record and the business row are in one file: read both from a plain sqlite3 connection."""

    @idempotent(store=sqlite_store, key="order_id", scope=f"s-{uuid.uuid4().hex}", transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> None:
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (?, 2)", (order_id,))

    charge("f1")
    with sqlite3.connect(sqlite_app.path) as conn:
        (states,) = conn.execute("SELECT count(*) FROM idempo_records WHERE state = 'completed'").fetchone()
    assert states == 1


def test_consumer(sqlite_store: SQLiteStore, sqlite_app: SQLiteApp) -> None:
    """IdempotentConsumer(transactional=True): the handler gets tx; a redelivery is a duplicate, one row."""
    from idempo.consumer import IdempotentConsumer, Outcome

    def handle(message: dict[str, Any], *, tx: Transaction) -> None:
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (?, 8)", (message["id"],))

    consumer = IdempotentConsumer(handle, store=sqlite_store, message_id=lambda m: m["id"], transactional=True)
    assert consumer.process({"id": "m1"}) is Outcome.PROCESSED
    assert consumer.process({"id": "m1"}) is Outcome.DUPLICATE
    assert sqlite_app.rows() == [("m1", 8)]


def test_hold_rolls_back_and_holds(sqlite_store: SQLiteStore, sqlite_app: SQLiteApp) -> None:
    """An exception whose verdict is HOLD: the writes roll back, and the key is held on the same connection."""
    from idempo import Verdict
    from idempo.exceptions import KeyHeld

    @idempotent(
        store=sqlite_store,
        key="order_id",
        scope=f"s-{uuid.uuid4().hex}",
        transactional=True,
        exception_verdicts={TimeoutError: Verdict.HOLD},
    )
    def charge(order_id: str, *, tx: Transaction) -> None:
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (?, 9)", (order_id,))
        raise TimeoutError("the provider did not answer")

    with pytest.raises(TimeoutError):
        charge("h1")
    with pytest.raises(KeyHeld):
        charge("h1")
    assert sqlite_app.rows() == []


@pytest.mark.parametrize("point", ["after-claim", "before-commit", "after-commit"])
def test_fault_points_raise(point: str, sqlite_store: SQLiteStore, sqlite_app: SQLiteApp) -> None:
    """Each fault point of a transactional execution is reached: armed with raise, InjectedFault comes out; before
    the commit nothing is kept (the key released), after it the row and the record are (a repeat replays)."""
    from idempo.testing import InjectedFault, arm_faults

    @idempotent(store=sqlite_store, key="order_id", scope=f"s-{uuid.uuid4().hex}", transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> str:
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (?, 1)", (order_id,))
        return "ok"

    arm_faults({point: "raise"})
    try:
        with pytest.raises((InjectedFault, CommitFailed)):
            charge("p1")
    finally:
        arm_faults(None)
    committed = point == "after-commit"
    assert sqlite_app.rows() == ([("p1", 1)] if committed else [])
    assert charge("p1") == "ok"
    assert sqlite_app.rows() == [("p1", 1)]
