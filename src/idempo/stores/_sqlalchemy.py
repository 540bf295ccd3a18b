"""SQLAlchemy 2 engines as the application's database, for transactional mode (extra ``idempo[sqlalchemy]``).

``PostgresStore.from_engine`` / ``AsyncPostgresStore.from_engine`` (psycopg or asyncpg) and
``SQLiteStore.from_engine`` / ``AsyncSQLiteStore.from_engine`` (pysqlite or aiosqlite) run idempo's
statements through the engine with ``text()``, so every driver works: the PostgreSQL queries keep
psycopg's ``%(name)s`` placeholders in ``queries.sql`` and are rewritten once to ``(:name)``
(:func:`sa_query`; the parentheses keep a cast such as ``::bigint`` after a parameter apart from it).

A transactional handler gets ``tx.connection``, a SQLAlchemy ``Connection`` (or ``AsyncConnection``)
inside the transaction idempo began, and ``tx.session``, a ``Session`` (``AsyncSession``) bound to that
connection with ``join_transaction_mode="create_savepoint"``: the session's own ``commit()`` or
``rollback()`` only releases or rolls back a savepoint, never idempo's transaction. While the handler
runs, a :class:`_Guard` on the connection refuses (``TransactionControlled``, before anything is sent)
what would commit idempo's transaction: ``Connection.commit()`` (and a ``Session``'s commit that
reaches it) through SQLAlchemy's ``commit`` event, and a ``COMMIT`` / ``END`` / ``ROLLBACK`` /
``ABORT`` / ``PREPARE TRANSACTION`` statement through ``before_cursor_execute``.

This module knows nothing of the stores: a store hands it the statements of a call (a generator of
objects with ``query`` and ``params``, sent back ``Rows``) and how to read a record.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from sqlalchemy import Engine, TextClause, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from .._core.errors import describe, driver_error
from .._core.records import Record
from ..exceptions import StoreError, StoreUnavailable, TransactionControlled
from ._base import ending_statement, sqlite_kind

__all__ = [
    "AsyncEngineTransactor",
    "EngineTransactor",
    "Rows",
    "arun_steps",
    "kind",
    "run_steps",
    "sa_errors",
    "sa_query",
]

_PARAM = re.compile(r"%\((\w+)\)s")
# SQLSTATEs of a transaction the server aborted to resolve a conflict (see stores/postgres.py).
_CONFLICTS = frozenset({"40001", "40P01", "55P03"})


class Rows(NamedTuple):
    """What a statement gave back: the affected row count and the first row (None: no row)."""

    rowcount: int
    row: tuple[Any, ...] | None


@functools.lru_cache(maxsize=256)
def sa_query(query: str) -> TextClause:
    """A statement of ``queries.sql`` as a SQLAlchemy ``text()``: ``%(name)s`` becomes ``(:name)``."""
    return text(_PARAM.sub(r"(:\1)", query))


def _text(query: Any, rewrite: dict[Any, Any] | None) -> TextClause:
    if rewrite is not None:
        query = rewrite.get(query, query)
    if not isinstance(query, str):
        query = query.as_string()  # a psycopg sql.Composed
    return sa_query(query)


def run_steps(conn: Any, steps: Generator[Any, Any, Any], rewrite: dict[Any, Any] | None = None) -> Any:
    """Run a call's statements on a SQLAlchemy ``Connection``; return its result (errors as they come)."""
    try:
        statement = next(steps)
        while True:
            result = conn.execute(_text(statement.query, rewrite), statement.params or {})
            row = result.fetchone() if result.returns_rows else None
            statement = steps.send(Rows(result.rowcount, None if row is None else tuple(row)))
    except StopIteration as done:
        return done.value


async def arun_steps(conn: Any, steps: Generator[Any, Any, Any], rewrite: dict[Any, Any] | None = None) -> Any:
    """The async twin of :func:`run_steps`, on an ``AsyncConnection``."""
    try:
        statement = next(steps)
        while True:
            result = await conn.execute(_text(statement.query, rewrite), statement.params or {})
            row = result.fetchone() if result.returns_rows else None
            statement = steps.send(Rows(result.rowcount, None if row is None else tuple(row)))
    except StopIteration as done:
        return done.value


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE behind a SQLAlchemy error (psycopg's ``sqlstate``, asyncpg's through SQLAlchemy's adapter)."""
    orig = getattr(exc, "orig", exc)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


def kind(exc: BaseException, dialect: str) -> str:
    """A failure's kind for :mod:`idempo._engine.transaction`: ``conflict``, ``lost`` or ``failed``."""
    orig = getattr(exc, "orig", exc)
    if dialect == "sqlite":
        return sqlite_kind(orig)
    code = sqlstate(exc)
    if code in _CONFLICTS:
        return "conflict"
    if getattr(exc, "connection_invalidated", False) or isinstance(exc, sa_exc.ResourceClosedError):
        return "lost"
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) and (code is None or code.startswith("08")):
        return "lost"
    if isinstance(exc, StoreUnavailable):
        return "lost"
    return "failed"


@contextmanager
def sa_errors() -> Iterator[None]:
    """SQLAlchemy's errors as idempo's: a lost or refused connection is StoreUnavailable, the rest StoreError."""
    try:
        yield
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
        raise StoreUnavailable(describe(exc)) from driver_error(exc)
    except sa_exc.SQLAlchemyError as exc:
        raise StoreError(describe(exc)) from driver_error(exc)


def _driver_in_transaction(raw: Any) -> bool | None:
    """Whether the driver's connection is inside a transaction (None: this driver cannot say).

    ``raw`` is the pool's DB-API connection: psycopg's, pysqlite's, or SQLAlchemy's adapter around
    an async driver's (``_connection``: asyncpg, psycopg's AsyncConnection, aiosqlite).
    """
    for candidate in (raw, getattr(raw, "_connection", None)):
        info = getattr(candidate, "info", None)
        status = getattr(info, "transaction_status", None)
        if status is not None:
            return bool(status != 0)  # psycopg's TransactionStatus.IDLE is 0
        if isinstance(candidate, sqlite3.Connection):
            return candidate.in_transaction
        inner = getattr(candidate, "_conn", None)  # aiosqlite's thread-bound sqlite3 connection
        if isinstance(inner, sqlite3.Connection):
            return inner.in_transaction
    asyncpg_conn: Any = getattr(raw, "_connection", None)
    if hasattr(asyncpg_conn, "is_in_transaction"):
        # SQLAlchemy's asyncpg adapter starts the server's transaction with the first statement.
        return None if getattr(raw, "_transaction", None) is None else bool(asyncpg_conn.is_in_transaction())
    return None


# --- the guard: what would end idempo's transaction is refused while the handler runs ----------


class _Guard:
    """Refuses, while the handler runs, what would commit idempo's transaction on its ``Connection``.

    The record's completion must be the last statement of the handler's
    transaction (DESIGN "transactional route"): a handler that commits first
    leaves its writes committed with the record still in progress, which a
    crash then turns into a second execution. SQLAlchemy's ``commit`` event
    runs before the DB-API commit, and ``before_cursor_execute`` before the
    statement is sent; raising there sends nothing. ``refused`` remembers the
    attempt, so that idempo answers as for a transaction the handler ended
    (500 ``transaction-ended``, the key held), even if the handler caught the error.

    ``armed`` is cleared as soon as idempo settles, so its own COMMIT, ROLLBACK
    and statements pass.
    """

    __slots__ = ("armed", "refused")

    def __init__(self, conn: Any) -> None:
        """Listen on ``conn`` (a sync ``Connection``; an ``AsyncConnection``'s ``sync_connection``)."""
        self.armed = True
        self.refused: str | None = None
        event.listen(conn, "commit", self._on_commit)
        event.listen(conn, "before_cursor_execute", self._on_statement)

    def _refuse(self, what: str) -> TransactionControlled:
        self.refused = f"it tried {what}, refused before it ran"
        return TransactionControlled(
            f"{what} would commit idempo's transaction before the record's completion, refused (transactional "
            "mode: idempo commits the handler's writes with the record once the handler returned). "
            "Use tx.session.commit() or tx.connection.begin_nested() (a savepoint) for a partial commit "
            "or rollback, and raise to roll everything back"
        )

    def _on_commit(self, conn: Any) -> None:
        if self.armed:
            raise self._refuse("Connection.commit() (or a Session's commit() through it)")

    def _on_statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.armed and (head := ending_statement(statement)) is not None:
            raise self._refuse(f"a {head} statement through tx.connection")


# The savepoint idempo makes when it begins: it exists only inside idempo's own transaction, so
# ROLLBACK TO it fails once the handler ended that transaction, even after a new one has begun. Making it
# also starts the server's transaction at once (psycopg and asyncpg begin lazily), so the driver's
# status tells a transaction ended from one never started.
_MARK = "SAVEPOINT idempo_transaction"
_ROLLBACK_TO_MARK = "ROLLBACK TO SAVEPOINT idempo_transaction"


def _mark_missing(exc: Exception) -> str:
    orig = getattr(exc, "orig", exc)
    return f"a COMMIT or ROLLBACK ran through tx.connection ({type(orig).__name__} on idempo's savepoint)"


def _ended(conn: Any, trans: Any) -> str | None:
    """Why idempo's transaction on a SQLAlchemy ``Connection`` is no longer open and outermost, or None.

    ``trans`` is idempo's root transaction. ``Connection.commit()`` / ``rollback()`` end it (a
    later statement autobegins another); a COMMIT or ROLLBACK statement leaves SQLAlchemy unaware,
    but not the driver.
    """
    if conn.closed or conn.invalidated:
        return None  # lost, not ended: the commit path decides
    if not trans.is_active or conn.get_transaction() is not trans:
        return "tx.connection.commit() or rollback() ended it"
    try:
        raw = conn.connection.dbapi_connection
    except Exception:
        return None
    if _driver_in_transaction(raw) is False:
        return "a COMMIT or ROLLBACK statement ran through tx.connection; the connection is in no transaction"
    return None


class _Handle(NamedTuple):
    """One transactional execution's SQLAlchemy connection, its transaction, the joined session and the guard."""

    conn: Any
    trans: Any
    session: Any
    guard: _Guard


def _left_pending(conn: Any, trans: Any) -> bool:
    """Whether a refused ``commit()`` left idempo's transaction inactive but still the connection's.

    SQLAlchemy deactivates a transaction whose commit raised, expecting the
    commit to have ended the driver's transaction; here it never ran, so the
    driver's transaction is still open and SQLAlchemy's ``rollback()`` would
    not send a ROLLBACK: the driver's own ``rollback()`` must.
    """
    return not trans.is_active and conn.get_transaction() is trans


def _driver_rollback(conn: Any) -> None:
    """Roll back the driver's transaction under a SQLAlchemy ``Connection`` (see :func:`_left_pending`)."""
    conn.connection.dbapi_connection.rollback()


#: Gives the statements that settle a record for a command (Complete or Release): a generator of
#: objects with ``query`` and ``params`` that is sent :class:`Rows` and raises LeaseLost on 0 rows.
SettleSteps = Callable[[Any], Generator[Any, Any, None]]


class _EngineBase:
    """What both engine transactors share: the constructor and the answers that need no I/O.

    Args:
        engine: the application's engine (PostgreSQL or SQLite): an ``Engine``,
            or an ``AsyncEngine`` for :class:`AsyncEngineTransactor`.
        settle_steps: the store's statements for a settling command.
        resolve: reads a record on a fresh connection (a coroutine function for the async twin).
        rewrite: statement text -> the text to run (a schema named), or None.
    """

    def __init__(
        self,
        engine: Any,
        settle_steps: SettleSteps,
        resolve: Callable[[str], Any],
        rewrite: dict[Any, Any] | None = None,
    ) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self._settle_steps = settle_steps
        self._resolve = resolve
        self._rewrite = rewrite

    def connection(self, h: _Handle) -> Any:
        return h.conn

    def session(self, h: _Handle) -> Any:
        return h.session

    def kind(self, exc: BaseException) -> str:
        return kind(exc, self._dialect)


class EngineTransactor(_EngineBase):
    """Drives transactional executions on a SQLAlchemy ``Engine`` (see idempo._engine.transaction.Transactor).

    It takes the arguments of :class:`_EngineBase`.
    """

    _engine: Engine

    def open(self) -> _Handle:
        with sa_errors():
            conn = self._engine.connect()
        try:
            trans = conn.begin()
            if self._dialect == "sqlite":
                # Take the write lock now: a deferred transaction that upgrades later gets
                # SQLITE_BUSY without waiting busy_timeout.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            conn.exec_driver_sql(_MARK)
        except sa_exc.SQLAlchemyError as exc:
            conn.close()
            raise StoreUnavailable(f"BEGIN failed: {describe(exc)}") from driver_error(exc)
        session = Session(bind=conn, join_transaction_mode="create_savepoint")
        return _Handle(conn, trans, session, _Guard(conn))

    def fault_connection(self, h: _Handle) -> Any:
        return h.conn

    def ended(self, h: _Handle, committing: bool) -> str | None:
        """Why idempo's transaction is no longer open (the handler ended it), or None (see :func:`_ended`).

        Not committing (a release or hold follows), idempo's savepoint is rolled back to: that fails
        when the transaction open is not idempo's. A commit the guard refused counts as ended.
        """
        h.guard.armed = False
        if h.guard.refused is not None:
            return h.guard.refused
        why = _ended(h.conn, h.trans)
        if why is not None or committing or h.conn.invalidated:
            return why
        try:
            h.conn.exec_driver_sql(_ROLLBACK_TO_MARK)
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise
            return _mark_missing(exc)
        return None

    def run(self, h: _Handle, command: Any, *, in_transaction: bool) -> None:
        h.guard.armed = False
        if in_transaction:
            h.session.flush()  # the session's pending writes belong to the transaction too
            run_steps(h.conn, self._settle_steps(command), self._rewrite)
        else:
            with h.conn.begin():
                run_steps(h.conn, self._settle_steps(command), self._rewrite)

    def commit(self, h: _Handle) -> None:
        h.guard.armed = False
        h.trans.commit()

    def rollback(self, h: _Handle) -> None:
        h.guard.armed = False
        h.session.close()
        if _left_pending(h.conn, h.trans):
            _driver_rollback(h.conn)
        if h.trans.is_active or h.conn.get_transaction() is h.trans:
            h.trans.rollback()
        elif h.conn.in_transaction():
            h.conn.rollback()
        if h.conn.invalidated:
            raise sa_exc.InterfaceError("ROLLBACK", None, Exception("the connection broke during ROLLBACK"))

    def close(self, h: _Handle, *, broken: bool) -> None:
        h.guard.armed = False
        try:
            h.session.close()
            if broken and not h.conn.invalidated:
                h.conn.invalidate()
            h.conn.close()
        except Exception:  # giving a connection back never fails a request
            pass

    def resolve(self, record_key: str) -> Record | None:
        record: Record | None = self._resolve(record_key)
        return record


class AsyncEngineTransactor(_EngineBase):
    """The async twin of :class:`EngineTransactor`, on an ``AsyncEngine`` (asyncpg, psycopg, aiosqlite)."""

    _engine: AsyncEngine

    async def open(self) -> _Handle:
        with sa_errors():
            conn: AsyncConnection = await self._engine.connect()
        try:
            trans = await conn.begin()
            if self._dialect == "sqlite":
                await conn.exec_driver_sql("BEGIN IMMEDIATE")  # see EngineTransactor.open
            await conn.exec_driver_sql(_MARK)
        except sa_exc.SQLAlchemyError as exc:
            await conn.close()
            raise StoreUnavailable(f"BEGIN failed: {describe(exc)}") from driver_error(exc)
        session = AsyncSession(bind=conn, join_transaction_mode="create_savepoint")
        return _Handle(conn, trans, session, _Guard(conn.sync_connection))

    def fault_connection(self, h: _Handle) -> Any:
        return h.conn.sync_connection

    async def ended(self, h: _Handle, committing: bool) -> str | None:
        """See :meth:`EngineTransactor.ended`."""
        h.guard.armed = False
        if h.guard.refused is not None:
            return h.guard.refused
        why = _ended(h.conn.sync_connection, h.trans.sync_transaction)
        if why is not None or committing or h.conn.invalidated:
            return why
        try:
            await h.conn.exec_driver_sql(_ROLLBACK_TO_MARK)
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise
            return _mark_missing(exc)
        return None

    async def run(self, h: _Handle, command: Any, *, in_transaction: bool) -> None:
        h.guard.armed = False
        if in_transaction:
            await h.session.flush()
            await arun_steps(h.conn, self._settle_steps(command), self._rewrite)
        else:
            async with h.conn.begin():
                await arun_steps(h.conn, self._settle_steps(command), self._rewrite)

    async def commit(self, h: _Handle) -> None:
        h.guard.armed = False
        await h.trans.commit()

    async def rollback(self, h: _Handle) -> None:
        h.guard.armed = False
        await h.session.close()
        if _left_pending(h.conn.sync_connection, h.trans.sync_transaction):
            await h.conn.run_sync(_driver_rollback)
        if h.trans.is_active or h.conn.sync_connection.get_transaction() is h.trans.sync_transaction:
            await h.trans.rollback()
        elif h.conn.in_transaction():
            await h.conn.rollback()
        if h.conn.invalidated:
            raise sa_exc.InterfaceError("ROLLBACK", None, Exception("the connection broke during ROLLBACK"))

    async def close(self, h: _Handle, *, broken: bool) -> None:
        h.guard.armed = False
        try:
            await h.session.close()
            if broken and not h.conn.invalidated:
                await h.conn.invalidate()
            await h.conn.close()
        except Exception:  # giving a connection back never fails a request
            pass

    async def resolve(self, record_key: str) -> Record | None:
        result: Record | None = await self._resolve(record_key)
        return result
