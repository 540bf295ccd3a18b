"""The SQLite store: idempo's embedded default, safe across processes on one machine.

The database is one file in WAL mode, so readers never wait for the writer.
Each transition is atomic across threads and processes: ``complete``,
``release`` and ``extend`` are single conditional statements; ``begin`` on an
absent key is one ``INSERT ... ON CONFLICT DO NOTHING``, and otherwise takes
SQLite's write lock (``BEGIN IMMEDIATE``) to read and write in one
transaction. A replay costs one read and no write.

Times come from the store's clock (``time.time`` by default, injectable for
tests); every process on one machine shares it.

Durability: ``synchronous=NORMAL`` (the default) loses nothing when a process
crashes; after an operating-system crash or power loss the last transactions
may be lost. Pass ``synchronous="FULL"`` to sync every commit to disk.

Twins: :class:`SQLiteStore` and :class:`AsyncSQLiteStore` share everything
but the I/O call: the constructor (:class:`_SQLiteBase`), the connections and
every transition (:class:`_Database`, whose transitions take the connection
to run on). The blocking store runs a transition on its thread's connection;
the async one on the event loop's thread without waiting for a lock, and in a
worker thread when it must wait.

Open and close: as every store (``idempo.stores._base``). Building the store
does no I/O; ``open()`` (or the first call) opens the file, creating it and
its schema when missing. A file that cannot be opened (a missing directory,
no permission) is a :class:`~idempo.exceptions.ConfigurationError` from
``open()``, and StoreUnavailable from a call.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, ClassVar, Literal, NamedTuple, Self, TypeVar

import anyio.to_thread

from .._core.flow import Complete, Release
from .._core.records import (
    Acquired,
    BeginResult,
    Existing,
    Record,
    StoreStats,
    StoredResponse,
    encode_headers,
    next_token,
)
from ..exceptions import ConfigurationError, LeaseLost, StoreUnavailable, TransactionControlled
from ..typing import Clock
from ._base import (
    IN_PROGRESS_GRACE,
    ErrorMap,
    closed,
    load_queries,
    load_sql,
    map_errors,
    misconfigured,
    record_from_row,
    sqlite_kind,
)

__all__ = ["AsyncSQLiteStore", "SQLiteConnection", "SQLiteStore"]

_Q = load_queries("sqlite")
_SCHEMA = load_sql("sqlite", "schema.sql")
_EXPIRES_AT = 5  # index of expires_at in a select_record row
_T = TypeVar("_T")


# OperationalError covers a locked database past busy_timeout, an
# unreadable file and I/O errors: the store cannot serve now.
_SQLITE_ERRORS = map_errors((sqlite3.OperationalError,), (sqlite3.Error,))


def _sqlite_errors() -> ErrorMap:
    return _SQLITE_ERRORS


Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


class _Database:
    """One SQLite file: per-thread connections, and the transitions, written once.

    Each transition takes the connection it runs on and raises sqlite3's
    errors as they come; the store maps them (``_sqlite_errors``).
    """

    def __init__(self, path: str | os.PathLike[str], clock: Clock, busy_timeout: float, synchronous: str) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file::memory:"):
            raise ConfigurationError("SQLiteStore needs a file; use MemoryStore for an in-memory store")
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.url = f"sqlite:///{self.path}"
        self.clock = clock
        self.busy_timeout_ms = int(busy_timeout * 1000)
        self.synchronous = synchronous.upper()
        #: The file and its schema are there (opened once by any connection).
        self.ready = False
        self.closed = False
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._ready_lock = threading.Lock()

    def connection(self, busy_timeout_ms: int) -> sqlite3.Connection:
        """This thread's connection with the given busy timeout (milliseconds); the file opened first.

        Raises:
            StoreError: the store was closed.
        """
        conns: dict[int, sqlite3.Connection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(busy_timeout_ms)
        if conn is None:
            if self.closed:
                raise closed(self.url)
            # check_same_thread=False only so close() can close every thread's
            # connection; each is used by its own thread alone.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conns[busy_timeout_ms] = conn
            with self._all_lock:
                self._all.append(conn)
            conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        if not self.ready:
            self._prepare(conn, busy_timeout_ms)
        return conn

    def _prepare(self, conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
        """Put the file in WAL mode and create the schema, once per store, waiting up to the
        connection's busy timeout (milliseconds; 0 on the async store's event-loop attempt, which
        then hands the call to a worker thread that waits the store's ``busy_timeout``).

        Connections racing to open a new file (threads here, or other processes)
        can get SQLITE_BUSY from ``journal_mode = WAL`` or the schema's first
        write without the busy handler being called: SQLite returns at once
        where waiting could deadlock (a lock upgrade from a read, the switch
        out of the rollback journal). Those attempts are repeated until
        the timeout has passed, then the error is raised.

        Raises:
            sqlite3.Error: the last failure once the timeout has passed, or any non-busy failure.
        """
        with self._ready_lock:  # one opener per process: the others find the file ready
            if self.ready:
                return
            deadline = time.monotonic() + busy_timeout_ms / 1000
            pause = 0.005
            while True:
                try:
                    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                        conn.execute("PRAGMA journal_mode = WAL")
                    conn.executescript(_SCHEMA)  # IF NOT EXISTS: idempotent across processes
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                        raise
                    time.sleep(pause)
                    pause = min(pause * 2, 0.1)
                    continue
                self.ready = True
                return

    def run(self, busy_timeout_ms: int, transition: Callable[..., _T], *args: Any) -> _T:
        """Run a transition on this thread's connection (sqlite3's errors raised as they come)."""
        return transition(self.connection(busy_timeout_ms), *args)

    def open_now(self, busy_timeout_ms: int) -> None:
        """Open the file and its schema now, naming a file that cannot be opened as a misconfiguration.

        Raises:
            ConfigurationError: the file cannot be opened or created.
            sqlite3.Error: any other failure (busy, I/O), as it comes.
        """
        try:
            self.connection(busy_timeout_ms)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_CANTOPEN:
                raise
            raise misconfigured(
                self.url, str(exc), "check the path: its folder must exist and be writable by this process"
            ) from exc

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def close(self) -> None:
        self.closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    # --- transitions ------------------------------------------------------------------------

    def begin(self, conn: sqlite3.Connection, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        key = {"record_key": record_key}
        now = self.now_ms()
        # A live record is answered from a plain read: no write lock for replays.
        row = conn.execute(_Q["select_record"], key).fetchone()
        if row is not None and row[_EXPIRES_AT] > now:
            return Existing(record_from_row(record_key, row), now)
        if row is None:
            # An absent key (the usual first execution): one INSERT that does
            # nothing if another connection inserted the key meanwhile. One
            # statement is atomic on its own, so no BEGIN IMMEDIATE and no
            # second read; on a conflict the locked path below decides.
            token = next_token(0, now)
            params = {
                "record_key": record_key,
                "fingerprint": fingerprint,
                "token": token,
                "lease_expires_at": now + lease_ttl_ms,
                "now": now,
            }
            if conn.execute(_Q["insert_lease"], params).rowcount == 1:
                return Acquired(token)
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = self.now_ms()
            row = conn.execute(_Q["select_record"], key).fetchone()
            if row is not None and row[_EXPIRES_AT] > now:
                conn.execute("COMMIT")
                return Existing(record_from_row(record_key, row), now)
            token = next_token(row[2] if row is not None else 0, now)
            conn.execute(
                _Q["take_lease"],
                {
                    "record_key": record_key,
                    "fingerprint": fingerprint,
                    "token": token,
                    "lease_expires_at": now + lease_ttl_ms,
                    "now": now,
                },
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return Acquired(token, takeover=row is not None and row[0] == "in_progress")

    def complete(
        self, conn: sqlite3.Connection, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int
    ) -> None:
        params = {
            "record_key": record_key,
            "token": token,
            "now": self.now_ms(),
            "record_ttl_ms": record_ttl_ms,
            "status": response.status,
            "headers": encode_headers(response.headers),
            "body": response.body,
        }
        if conn.execute(_Q["complete"], params).rowcount != 1:
            raise LeaseLost()

    def release(self, conn: sqlite3.Connection, record_key: str, token: int) -> None:
        params = {"record_key": record_key, "token": token, "now": self.now_ms()}
        if conn.execute(_Q["release"], params).rowcount != 1:
            raise LeaseLost()

    def extend(self, conn: sqlite3.Connection, record_key: str, token: int, lease_ttl_ms: int) -> None:
        params = {"record_key": record_key, "token": token, "now": self.now_ms(), "lease_ttl_ms": lease_ttl_ms}
        if conn.execute(_Q["extend"], params).rowcount != 1:
            raise LeaseLost()

    def get(self, conn: sqlite3.Connection, record_key: str) -> Record | None:
        row = conn.execute(_Q["select_record"], {"record_key": record_key}).fetchone()
        if row is None or row[_EXPIRES_AT] <= self.now_ms():
            return None
        return record_from_row(record_key, row)

    def purge_expired(self, conn: sqlite3.Connection, limit: int) -> int:
        params = {"now": self.now_ms(), "limit": limit, "grace_ms": int(IN_PROGRESS_GRACE * 1000)}
        return conn.execute(_Q["purge_expired"], params).rowcount

    def stats(self, conn: sqlite3.Connection) -> StoreStats:
        now = self.now_ms()
        conn.execute("BEGIN")  # one read snapshot for both statements (WAL)
        try:
            in_progress, completed, expired = conn.execute(_Q["stats"], {"now": now}).fetchone()
            row = conn.execute(_Q["oldest_lease"], {"now": now}).fetchone()
        finally:
            conn.execute("COMMIT")
        oldest = None if row is None else record_from_row(row[0], row[1:])
        return StoreStats(now, in_progress, completed, expired, oldest)


# --- transactional mode: the app's writes and the record in one transaction on one file ----

# Statements a handler may not run through the proxy: they end (or would start) the transaction.
# ROLLBACK TO (a savepoint) is a partial rollback and passes (see _check_statement).
_CONTROL = frozenset({"COMMIT", "END", "ROLLBACK", "BEGIN"})
# Leading whitespace and SQL comments (``-- ...`` to the line's end, ``/* ... */``), which SQLite skips.
_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$))*", re.DOTALL)
_COMMENT = re.compile(r"--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$)", re.DOTALL)
_WORD = re.compile(r"\w+")


class SQLiteConnection:
    """The sqlite3 connection a transactional handler writes through, inside idempo's transaction.

    Everything of ``sqlite3.Connection`` (``execute``, ``executemany``,
    ``cursor``, ``row_factory``, ...) passes through, except what would end
    idempo's transaction: ``commit()``, ``rollback()``, ``close()``,
    ``executescript()``, setting ``autocommit`` or ``isolation_level``, and a
    ``COMMIT``, ``END``, ``ROLLBACK`` or ``BEGIN`` statement (whatever the
    comments before it or the ``;`` after it), through the connection or a
    cursor of it, raise :class:`~idempo.exceptions.TransactionControlled`.
    ``SAVEPOINT`` / ``RELEASE`` / ``ROLLBACK TO`` give a partial rollback.

    An attempt to end the transaction (all of these but ``BEGIN``) is
    remembered in :attr:`refused`, so the request is answered as for a
    transaction the handler ended, as on psycopg and SQLAlchemy (500
    ``transaction-ended``, the key held; ``@idempotent`` raises
    TransactionControlled), even when the handler caught the error.

    Args:
        conn: the sqlite3 connection in its ``BEGIN IMMEDIATE`` transaction.

    Attributes:
        refused: why the first attempt to end the transaction was refused (str), or None.
    """

    __slots__ = ("_conn", "refused")
    refused: str | None

    def __init__(self, conn: sqlite3.Connection) -> None:
        object.__setattr__(self, "_conn", conn)
        object.__setattr__(self, "refused", None)

    def _refuse(self, what: str, message: str | None = None) -> TransactionControlled:
        """Remember that the handler tried ``what`` (the transactor's ``ended`` reads it); the error to raise."""
        if self.refused is None:
            object.__setattr__(self, "refused", f"it tried {what} through tx.connection, refused before it ran")
        return TransactionControlled(message)

    def commit(self) -> None:
        """Raises TransactionControlled: idempo commits once the handler returned."""
        raise self._refuse("commit()")

    def rollback(self) -> None:
        """Raises TransactionControlled: raise an exception (or return a status that is not stored) instead."""
        raise self._refuse("rollback()")

    def close(self) -> None:
        """Raises TransactionControlled: idempo gives the connection back."""
        raise self._refuse("close()")

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        """``sqlite3.Connection.execute`` on a guarded cursor; a statement ending or starting the transaction raises."""
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        """``sqlite3.Connection.executemany`` on a guarded cursor."""
        return self.cursor().executemany(sql, parameters)

    def executescript(self, script: str, /) -> sqlite3.Cursor:
        """Raises TransactionControlled: ``executescript`` commits first (sqlite3's rule)."""
        raise self._refuse("executescript()", _EXECUTESCRIPT)

    def cursor(self, factory: type[sqlite3.Cursor] | None = None) -> sqlite3.Cursor:
        """``sqlite3.Connection.cursor``: a cursor whose ``execute`` and ``executemany`` refuse what
        ends or starts the transaction, and whose ``executescript`` raises (``factory``: a Cursor subclass)."""
        conn: sqlite3.Connection = self._conn
        cursor = conn.cursor(_guarded(factory or sqlite3.Cursor))
        cursor._idempo_proxy = self  # type: ignore[attr-defined]  # where its refusals are remembered
        return cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("autocommit", "isolation_level"):
            # Either can commit the open transaction (Python 3.12's autocommit=True does).
            raise self._refuse(f"setting {name}", f"setting {name} could end idempo's transaction")
        setattr(self._conn, name, value)

    def __enter__(self) -> SQLiteConnection:
        raise self._refuse("its context manager", "the connection's context manager commits; idempo commits instead")

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - __enter__ raises
        return None


_EXECUTESCRIPT = "executescript() commits the transaction first; run the statements one by one"


class _GuardedCursor(sqlite3.Cursor):
    """A cursor of the proxy: statements are checked (:func:`_check_statement`) before they run."""

    def execute(self, sql: str, parameters: Any = (), /) -> Self:
        _check_statement(sql, getattr(self, "_idempo_proxy", None))
        return super().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> Self:
        _check_statement(sql, getattr(self, "_idempo_proxy", None))
        return super().executemany(sql, parameters)

    def executescript(self, script: str, /) -> Self:
        proxy: SQLiteConnection | None = getattr(self, "_idempo_proxy", None)
        if proxy is not None:
            raise proxy._refuse("executescript()", _EXECUTESCRIPT)
        raise TransactionControlled(_EXECUTESCRIPT)


@functools.lru_cache(maxsize=32)
def _guarded(factory: type[sqlite3.Cursor]) -> type[sqlite3.Cursor]:
    """``factory`` with the proxy's statement check (a subclass of it, made once)."""
    if issubclass(factory, _GuardedCursor):
        return factory
    if factory is sqlite3.Cursor:
        return _GuardedCursor
    return type(f"Guarded{factory.__name__}", (_GuardedCursor, factory), {})


def _check_statement(sql: str, proxy: SQLiteConnection | None = None) -> None:
    """Raise TransactionControlled for a statement that ends or starts the transaction.

    ``proxy``: the connection proxy that remembers a refused COMMIT, END or
    ROLLBACK (a BEGIN cannot end idempo's transaction: it is refused only).

    SQLite's own reading: comments and whitespace before the first keyword are
    skipped, and a keyword ends at the first character that cannot be in a
    word (so ``COMMIT;`` is COMMIT). ``ROLLBACK [TRANSACTION] TO`` is a
    savepoint's partial rollback and passes. sqlite3 runs one statement per
    ``execute``, so only the first matters.
    """
    rest = sql[_LEADING.match(sql).end() :]  # type: ignore[union-attr]  # the pattern matches the empty string
    words = _WORD.match(rest)
    head = words.group().upper() if words else ""
    if head not in _CONTROL:
        return
    if head == "ROLLBACK":
        following = [w.upper() for w in _WORD.findall(_COMMENT.sub(" ", rest))[1:3]]
        if following[:1] == ["TO"] or following == ["TRANSACTION", "TO"]:
            return
    message = f"{head} ends idempo's transaction; use SAVEPOINT for a partial rollback"
    if proxy is not None and head != "BEGIN":
        raise proxy._refuse(f"a {head} statement", message)
    raise TransactionControlled(message)


class _SQLiteHandle:
    __slots__ = ("conn", "proxy")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.proxy = SQLiteConnection(conn)


class _SQLiteHandles:
    """What both transactors answer without I/O: the handler's connection, no session, the error kinds."""

    def connection(self, h: _SQLiteHandle) -> Any:
        return h.proxy

    def session(self, h: _SQLiteHandle) -> Any:
        return None

    def fault_connection(self, h: _SQLiteHandle) -> Any:
        return h.conn

    def kind(self, exc: BaseException) -> str:
        return sqlite_kind(exc)


class _SQLiteTransactor(_SQLiteHandles):
    """Drives transactional executions on the store's file (see idempo._engine.transaction.Transactor).

    Each transaction has a connection of its own, in ``BEGIN IMMEDIATE``: it
    takes the write lock at once, so a later write cannot fail with
    SQLITE_BUSY without waiting ``busy_timeout`` (a deferred transaction that
    upgrades does). One writer at a time: while a handler's transaction is
    open, other claims wait for it (up to ``busy_timeout``).
    """

    def __init__(self, db: _Database) -> None:
        self._db = db

    def open_now(self) -> _SQLiteHandle:
        db = self._db
        db.connection(db.busy_timeout_ms)  # the file and its schema exist
        conn = sqlite3.connect(db.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {db.busy_timeout_ms}")
            conn.execute(f"PRAGMA synchronous = {db.synchronous}")
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreUnavailable(f"BEGIN IMMEDIATE on {db.url} failed: {exc}") from exc
        return _SQLiteHandle(conn)

    def open(self) -> _SQLiteHandle:
        return self.open_now()

    def ended(self, h: _SQLiteHandle, committing: bool) -> str | None:
        """Why idempo's transaction is no longer open (the handler ended it past the proxy), or None.

        An attempt the proxy refused counts as ended (:attr:`SQLiteConnection.refused`), as a statement
        psycopg's guard or SQLAlchemy's refused does: one rule for a handler's own COMMIT on every store.
        """
        if h.proxy.refused is not None:
            return h.proxy.refused
        try:
            open_ = h.conn.in_transaction
        except sqlite3.ProgrammingError:
            return None  # closed: lost, not ended
        return None if open_ else "a COMMIT or ROLLBACK ran on the connection; it is in no transaction"

    def run(self, h: _SQLiteHandle, command: Any, *, in_transaction: bool) -> None:
        # Outside a transaction each statement commits on its own (isolation_level=None).
        if hasattr(command, "response"):
            self._db.complete(h.conn, command.record_key, command.token, command.response, command.record_ttl_ms)
        else:
            self._db.release(h.conn, command.record_key, command.token)

    def commit(self, h: _SQLiteHandle) -> None:
        h.conn.execute("COMMIT")

    def rollback(self, h: _SQLiteHandle) -> None:
        if h.conn.in_transaction:
            h.conn.execute("ROLLBACK")

    def close(self, h: _SQLiteHandle, *, broken: bool) -> None:
        with contextlib.suppress(Exception):  # closing a sqlite3 connection does not fail in practice
            h.conn.close()  # an open transaction is rolled back

    def resolve(self, record_key: str) -> Record | None:
        with _sqlite_errors():
            return self._db.run(self._db.busy_timeout_ms, self._db.get, record_key)


class _AsyncSQLiteTransactor(_SQLiteHandles):
    """The async twin of :class:`_SQLiteTransactor`: BEGIN IMMEDIATE waits in a worker thread;
    the other statements run on the event loop's thread (they take no lock to wait for)."""

    def __init__(self, db: _Database) -> None:
        self._sync = _SQLiteTransactor(db)

    async def open(self) -> _SQLiteHandle:
        return await anyio.to_thread.run_sync(self._sync.open_now)

    async def ended(self, h: _SQLiteHandle, committing: bool) -> str | None:
        return self._sync.ended(h, committing)

    async def run(self, h: _SQLiteHandle, command: Any, *, in_transaction: bool) -> None:
        self._sync.run(h, command, in_transaction=in_transaction)

    async def commit(self, h: _SQLiteHandle) -> None:
        self._sync.commit(h)

    async def rollback(self, h: _SQLiteHandle) -> None:
        self._sync.rollback(h)

    async def close(self, h: _SQLiteHandle, *, broken: bool) -> None:
        self._sync.close(h, broken=broken)

    async def resolve(self, record_key: str) -> Record | None:
        return await anyio.to_thread.run_sync(self._sync.resolve, record_key)


class _Statement(NamedTuple):
    """One statement for a SQLAlchemy engine's connection (idempo.stores._sqlalchemy)."""

    query: str
    params: dict[str, Any]


def _engine_settle_steps(db: _Database) -> Callable[[Any], Generator[_Statement, Any, None]]:
    """The statements that settle a record for a command, for a SQLAlchemy engine's connection."""

    def steps(command: Any) -> Generator[_Statement, Any, None]:
        params: dict[str, Any] = {"record_key": command.record_key, "token": command.token, "now": db.now_ms()}
        if hasattr(command, "response"):
            params.update(
                record_ttl_ms=command.record_ttl_ms,
                status=command.response.status,
                headers=encode_headers(command.response.headers),
                body=command.response.body,
            )
            query = _Q["complete"]
        else:
            query = _Q["release"]
        if (yield _Statement(query, params)).rowcount != 1:
            raise LeaseLost()

    return steps


def _engine_path(engine: Any) -> str:
    if getattr(getattr(engine, "dialect", None), "name", None) != "sqlite":
        raise ConfigurationError("from_engine needs a SQLAlchemy engine on SQLite (sqlite:// or sqlite+aiosqlite://)")
    path = engine.url.database
    if not path or path == ":memory:":
        raise ConfigurationError("from_engine needs an engine on an SQLite file, not an in-memory database")
    return str(path)


class _SQLiteBase:
    """What the blocking and the async SQLite stores share: the constructor and the database."""

    #: Builds the store's transactor from its database: the one thing the twins' constructors differ in;
    #: from_engine's transactor, named in _sqlalchemy (it needs idempo[sqlalchemy], imported when used).
    _transactor_type: ClassVar[type[_SQLiteTransactor | _AsyncSQLiteTransactor]]
    _engine_transactor: ClassVar[str]

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = time.time,
        busy_timeout: float = 2.0,
        synchronous: Synchronous = "NORMAL",
    ) -> None:
        self._db = _Database(path, clock, busy_timeout, synchronous)
        #: The store URL (``sqlite:///`` and the path).
        self.url = self._db.url
        #: How a transactional execution drives this file (idempo._engine.transaction).
        self.transactor: Any = self._transactor_type(self._db)

    @classmethod
    def from_engine(
        cls, engine: Any, *, clock: Clock = time.time, busy_timeout: float = 2.0, synchronous: Synchronous = "NORMAL"
    ) -> Self:
        """A store in the file of the application's SQLAlchemy 2 engine, for transactional mode.

        Needs ``idempo[sqlalchemy]``. A transactional handler gets ``tx.connection``
        (a SQLAlchemy ``Connection`` in a ``BEGIN IMMEDIATE`` transaction) and
        ``tx.session`` (a ``Session`` joined with ``join_transaction_mode="create_savepoint"``);
        for :class:`AsyncSQLiteStore`, an ``AsyncEngine`` (aiosqlite), an
        ``AsyncConnection`` and an ``AsyncSession``.
        The other arguments are the constructor's.

        Raises:
            ConfigurationError: the engine is not on an SQLite file.
        """
        from . import _sqlalchemy

        store = cls(_engine_path(engine), clock=clock, busy_timeout=busy_timeout, synchronous=synchronous)
        transactor = getattr(_sqlalchemy, cls._engine_transactor)
        store.transactor = transactor(engine, _engine_settle_steps(store._db), store.get)  # type: ignore[attr-defined]
        return store

    @property
    def path(self) -> str:
        """The database file."""
        return self._db.path


class SQLiteStore(_SQLiteBase):
    """A store in an SQLite file, for blocking code (WSGI, Django, sync functions).

    Each thread gets its own connection; a write waits up to ``busy_timeout``
    for another process's write lock, then raises StoreUnavailable. Building
    it does no I/O: :meth:`open`, or the first call, opens the file.

    Args:
        path: the database file; created with its schema when missing.
        clock: returns seconds since the epoch (default ``time.time``).
        busy_timeout: seconds to wait for the write lock (default 2): SQLite's
            deadline. A local call waits only for another writer; past it,
            StoreUnavailable (503), as a network store past its deadline.
        synchronous: SQLite's ``synchronous`` pragma (default ``"NORMAL"``).

    Raises:
        ConfigurationError: ``path`` is ``:memory:`` or ``synchronous`` is unknown.

    Transactional mode: the store is on the application's own file when
    ``path`` is the app's database; a transactional handler writes through
    ``tx.connection`` (a :class:`SQLiteConnection`) and its writes commit with
    the record. The records must live in that same file: SQLite commits
    atomically per file only (ATTACH with WAL is not atomic across files).
    """

    _transactor_type = _SQLiteTransactor
    _engine_transactor = "EngineTransactor"

    def _call(self, transition: Callable[..., _T], *args: Any) -> _T:
        with _sqlite_errors():
            return self._db.run(self._db.busy_timeout_ms, transition, *args)

    def open(self) -> None:
        """Open the file now, creating it and its schema when missing (the first call does otherwise).

        Raises:
            ConfigurationError: the file cannot be opened or created (a missing folder, no permission).
            StoreUnavailable: another process held the write lock past ``busy_timeout``.
            StoreError: the store was closed, or SQLite failed otherwise.
        """
        with _sqlite_errors():
            self._db.open_now(self._db.busy_timeout_ms)

    def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        return self._call(self._db.begin, record_key, fingerprint, lease_ttl_ms)

    def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        self._call(self._db.complete, record_key, token, response, record_ttl_ms)

    def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        self._call(self._db.release, record_key, token)

    def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        self._call(self._db.extend, record_key, token, lease_ttl_ms)

    def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        return self._call(self._db.get, record_key)

    def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`idempo.typing.Store.purge_expired`."""
        return self._call(self._db.purge_expired, limit)

    def stats(self) -> StoreStats:
        """See :meth:`idempo.typing.SupportsStats.stats` (one scan of the table)."""
        return self._call(self._db.stats)

    def settle_on(self, connection: sqlite3.Connection, command: Complete | Release) -> None:
        """Run the record's ``complete`` or ``release`` on a connection the caller holds, in its transaction.

        For a front that drives the application's own connection to this file
        (idempo.django: Django's connection inside ``transaction.atomic()``),
        so that the record's completion is the last statement of that
        transaction (DESIGN "transactional route").

        Args:
            connection: a sqlite3 connection to the store's file.
            command: the settling command (``Complete`` or ``Release``), fenced by its lease token.

        Raises:
            LeaseLost: the token no longer holds the record (0 rows).
            sqlite3.Error: as the statement raised it (not mapped: the caller's transaction decides).
        """
        _settle_on(self._db, connection, command)

    def close(self) -> None:
        """Close every thread's connection; any later call raises StoreError. Calling it again does nothing."""
        self._db.close()


class AsyncSQLiteStore(_SQLiteBase):
    """A store in an SQLite file, for asyncio and trio (ASGI, async functions).

    Each statement first runs on the event loop's thread with a zero busy
    timeout: when no other connection holds the write lock (the usual case)
    it returns in tens of microseconds, cheaper than a hop to a worker thread.
    When another writer holds the lock, the statement is handed to a worker
    thread (``anyio.to_thread``) that waits up to ``busy_timeout``, so the
    event loop never blocks on a lock.

    It takes the arguments of :class:`SQLiteStore`.
    """

    _transactor_type = _AsyncSQLiteTransactor
    _engine_transactor = "AsyncEngineTransactor"

    async def _call(self, transition: Callable[..., _T], *args: Any) -> _T:
        with _sqlite_errors():
            try:
                return self._db.run(0, transition, *args)
            except sqlite3.OperationalError as exc:
                # Busy: nothing was written (a statement or a rolled-back
                # transaction), so the worker thread can run it afresh. The
                # low byte: extended busy codes (BUSY_SNAPSHOT, BUSY_RECOVERY) too.
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
            db = self._db
            return await anyio.to_thread.run_sync(functools.partial(db.run, db.busy_timeout_ms, transition, *args))

    async def open(self) -> None:
        """See :meth:`SQLiteStore.open` (in a worker thread: opening may wait for the write lock)."""
        with _sqlite_errors():
            await anyio.to_thread.run_sync(self._db.open_now, self._db.busy_timeout_ms)

    async def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        return await self._call(self._db.begin, record_key, fingerprint, lease_ttl_ms)

    async def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        await self._call(self._db.complete, record_key, token, response, record_ttl_ms)

    async def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        await self._call(self._db.release, record_key, token)

    async def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        await self._call(self._db.extend, record_key, token, lease_ttl_ms)

    async def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        return await self._call(self._db.get, record_key)

    async def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`idempo.typing.Store.purge_expired`."""
        return await self._call(self._db.purge_expired, limit)

    async def stats(self) -> StoreStats:
        """See :meth:`SQLiteStore.stats`."""
        return await self._call(self._db.stats)

    async def settle_on(self, connection: sqlite3.Connection, command: Complete | Release) -> None:
        """See :meth:`SQLiteStore.settle_on` (runs on the calling thread: one short statement)."""
        _settle_on(self._db, connection, command)

    async def aclose(self) -> None:
        """See :meth:`SQLiteStore.close`."""
        self._db.close()


def _settle_on(db: _Database, connection: sqlite3.Connection, command: Complete | Release) -> None:
    if isinstance(command, Complete):
        db.complete(connection, command.record_key, command.token, command.response, command.record_ttl_ms)
    else:
        db.release(connection, command.record_key, command.token)
