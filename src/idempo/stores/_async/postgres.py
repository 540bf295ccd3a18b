"""The PostgreSQL store's I/O, written once: ``AsyncPostgresStore``, its transactor and its engine store.

``stores/_sync/postgres.py`` (``PostgresStore`` and the rest, blocking)
is generated from this file by ``scripts/unasync``: ``async`` and ``await``
are dropped and the async names swapped for the blocking ones (psycopg's
``AsyncConnection`` for ``Connection``, ``aclose`` for ``close``, ...), so a
docstring here says what both twins do. What they share without I/O (the
settings, each call's statements, the checks, the constructors) is in
``stores/_postgres.py``; the public names are in ``stores/postgres.py``.

The async store needs asyncio (psycopg's async connections); it does not run on trio.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from time import monotonic
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg.abc import PQGen

from ..._core.flow import Complete, Release
from ..._core.records import BeginResult, Record, StoreStats, StoredResponse
from ...exceptions import ConfigurationError, StoreError
from ...observability._observation import logger
from .._base import DEFAULT_DEADLINE, closed
from .._postgres import (
    IDLE,
    MAINTENANCE_DEADLINE,
    MARK,
    NO_MARK,
    PG_ERRORS,
    RELEASE_MARK,
    ROLLBACK_TO_MARK,
    AsyncPoolLock,
    PgHandle,
    PgHandles,
    PostgresBase,
    Rewrite,
    Rows,
    Settings,
    Steps,
    begin_failed,
    begin_steps,
    bounded,
    broken,
    check_version,
    checkout_errors,
    complete_last,
    complete_steps,
    create_schema_steps,
    discarding,
    ended_without_io,
    fenced_steps,
    finish_failed,
    get_steps,
    mark_missing,
    no_connection,
    pool_of,
    purge_steps,
    schema_version_steps,
    settle_steps,
    stats_steps,
    undefined_table,
)
from .._psycopg import guard, unguard
from ..sql.postgres import SCHEMA_VERSION

__all__ = ["AsyncPostgresStore"]

_RV = TypeVar("_RV")


class _AsyncBoundedConnection(psycopg.AsyncConnection[tuple[Any, ...]]):
    """A connection whose every wait for the server ends at the store call's deadline.

    ``deadline`` (monotonic seconds) is set for the length of one store call;
    outside one (the pool's own checks) a wait lasts at most ``idle_bound``
    seconds. psycopg's wait timeout (3.3.9, the version idempo needs) raises an
    OperationalError when a wait times out (no task cancellation, so no cancel request).
    """

    deadline: float | None = None
    idle_bound: float = DEFAULT_DEADLINE
    _store_cursor: psycopg.AsyncCursor[tuple[Any, ...]] | None = None

    async def wait(self, gen: PQGen[_RV], interval: float = 0.1, timeout: float | None = None) -> _RV:  # noqa: ASYNC109 (psycopg's signature)
        """psycopg's wait, bounded by the call's deadline."""
        return await super().wait(gen, interval, bounded(self.deadline, self.idle_bound, timeout))

    def store_cursor(self) -> psycopg.AsyncCursor[tuple[Any, ...]]:
        """The one cursor the store's calls run on, made on the first call on this connection.

        ``conn.execute()`` makes a cursor per statement (an adapters map, a
        transformer, a weak-reference callback each time); one cursor,
        executed again, keeps its transformer while the statement is the same
        one (psycopg's ``_last_query``). Each execute resets what the cursor
        held; it lives and dies with its connection.
        """
        cursor = self._store_cursor
        if cursor is None:
            cursor = self._store_cursor = self.cursor()
        return cursor


def _store_connection(settings: Settings) -> type[_AsyncBoundedConnection]:
    """The connection class of a store's pool: each of its connection attempts told to ``settings``."""

    class AsyncStoreConnection(_AsyncBoundedConnection):
        # A wait outside a store call (the pool's own checks) is bounded too.
        idle_bound = settings.deadline

        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            try:
                conn = await super().connect(conninfo, **kwargs)
            except psycopg.OperationalError as exc:
                settings.connect_failed(exc)
                raise
            settings.refused = None
            return conn

    return AsyncStoreConnection


async def _aidle_getconn(pool: psycopg_pool.AsyncConnectionPool[Any], timeout: float) -> Any:  # noqa: ASYNC109 (the pool's wait)
    """A connection of the application's pool that is idle (in no transaction), within ``timeout`` seconds.

    psycopg_pool hands out what it was given back. A connection written through
    after it was given back (a reference to ``tx.connection`` kept past the
    handler, see docs/transactional.md) sits in the pool inside a transaction:
    idempo's BEGIN would only open a savepoint inside it (and its COMMIT release
    it), a store call could not switch it to autocommit. Such a connection is
    closed and given back (the pool replaces it), never used.

    Raises:
        psycopg_pool.PoolTimeout: no idle connection within ``timeout``.
    """
    ends = monotonic() + timeout
    while True:
        conn = await pool.getconn(timeout=max(ends - monotonic(), 0.001))
        if conn.info.transaction_status == IDLE:
            return conn
        discarding(conn)
        with contextlib.suppress(Exception):
            await conn.close()
        await pool.putconn(conn)


@asynccontextmanager
async def _aautocommit(conn: Any) -> AsyncIterator[None]:
    """The app's pooled connection in autocommit mode for one store call, its own mode restored after."""
    restore = not conn.autocommit
    if restore:
        await conn.set_autocommit(True)
    try:
        yield
    finally:
        if restore and not conn.closed:
            await conn.set_autocommit(False)


async def _arun_steps(
    conn: psycopg.AsyncConnection[Any] | psycopg.AsyncCursor[Any], steps: Steps[_RV], rewrite: Rewrite | None = None
) -> _RV:
    """Run a call's statements on a connection and return its result (psycopg's errors as they come).

    ``rewrite`` maps a statement's text to the text to run (its tables
    qualified by the schema, on a connection of the application's own).
    """
    try:
        statement = next(steps)
        while True:
            query = statement.query if rewrite is None else rewrite.get(statement.query, statement.query)
            cursor = await conn.execute(query, statement.params, binary=statement.binary, prepare=statement.prepare)
            # rownumber, not description: description builds a Column per column on each read.
            statement = steps.send(Rows(cursor.rowcount, None if cursor.rownumber is None else await cursor.fetchone()))
    except StopIteration as done:
        result: _RV = done.value
        return result


class AsyncPostgresStore(PostgresBase[psycopg_pool.AsyncConnectionPool[Any]]):
    """A store in PostgreSQL, for asyncio (ASGI, async functions: ``AsyncPostgresStore``) or for
    blocking code (WSGI, Django, sync functions: ``PostgresStore``).

    Building it does no I/O: :meth:`open` (the fronts call it at start-up:
    the ASGI middleware at lifespan start-up, the blocking fronts when they
    are built) checks the server and the schema; otherwise the first call does.

    Args:
        url: ``postgresql://[user[:password]@]host[:port]/dbname[?options]``
            (``postgres://`` too). idempo reads the query options ``schema``,
            ``min_size``, ``max_size``, ``deadline`` (``timeout``, its older
            name) and ``prepare_threshold`` (they override the arguments
            below); every other one goes to libpq (``sslmode``,
            ``connect_timeout``, ``application_name``, ...).
        schema: the schema holding idempo's tables (default ``public``); a
            plain identifier.
        min_size: connections the pool keeps open.
        max_size: connections the pool may open.
        deadline: seconds (or a timedelta) one call may take, pool wait,
            connect and statement together, before StoreUnavailable (default 2).
        application_name: reported to the server (``pg_stat_activity``).
        prepare_threshold: executions of a statement on a connection before
            psycopg prepares it on the server (default 5); None never prepares
            (needed behind PgBouncer in transaction mode before 1.21).
        check_schema: let the first call check the schema version when
            :meth:`open` was not called (default). Pass False to call
            :meth:`create_schema` first.

    Raises:
        ConfigurationError: a malformed URL, schema name or deadline.
    """

    _pool_type = psycopg_pool.AsyncConnectionPool
    _lock_type = AsyncPoolLock

    async def open(self) -> None:
        """Check the server and the schema version now, over a connection of its own.

        Once it succeeded, calling it again does nothing. The fronts call it
        at start-up; without it, the first call checks the schema.

        Raises:
            ConfigurationError: the server refuses the configuration (a wrong
                password or role, a missing database, an unknown host), or
                the schema is missing or older than :data:`~idempo.stores.postgres.SCHEMA_VERSION`
                (run ``idempo migrate``).
            StoreUnavailable: the server cannot be reached.
            StoreError: the store was closed.
        """
        if not self._open:
            self._opened(await self._probe())

    async def _probe(self) -> tuple[Any, ...] | None:
        """Connect once, directly (no pool left retrying after a failed start-up), and read the schema version."""
        if self._closed:
            raise closed(self.url)
        settings = self._settings
        if self._app_pool:
            assert self._pool is not None
            try:
                async with self._pool.connection(timeout=settings.deadline) as conn, conn.transaction():
                    return await _arun_steps(conn, schema_version_steps(), self._rewrite)
            except psycopg_pool.PoolClosed as exc:
                raise ConfigurationError(f"{self.url}: the application's pool is not open ({exc})") from exc
            except psycopg.Error as exc:
                return self._probe_failed(exc)
        try:
            probe = await _AsyncBoundedConnection.connect(settings.conninfo, **settings.probe_arguments())
            async with probe:
                probe.deadline = monotonic() + settings.deadline
                return await _arun_steps(probe, schema_version_steps())
        except psycopg.Error as exc:
            return self._probe_failed(exc)

    async def _get_pool(self) -> psycopg_pool.AsyncConnectionPool[_AsyncBoundedConnection]:
        # Made on first use (on the running event loop, which the async pool binds to): a store
        # that fails its start-up check (or a command's) leaves no pool retrying and logging in
        # the background. Under the store's lock: made once, whichever thread or task comes first.
        async with self._pool_lock:
            if self._closed:
                raise closed(self.url)
            if self._pool is None:
                pool = psycopg_pool.AsyncConnectionPool(
                    **self._settings.pool_arguments(_store_connection(self._settings))
                )
                await pool.open(wait=False)
                self._pool = pool
            return self._pool

    @asynccontextmanager
    async def _connection(self, deadline: float | None = None) -> AsyncIterator[_AsyncBoundedConnection]:
        """A pooled connection whose waits end ``deadline`` seconds (default: the store's) from now."""
        wait, ends = self._limits(deadline)
        pool = self._pool or await self._get_pool()
        try:
            with PG_ERRORS:
                try:
                    conn = await _aidle_getconn(pool, wait) if self._app_pool else await pool.getconn(timeout=wait)
                except psycopg_pool.PoolTimeout as exc:
                    raise no_connection(self._settings, exc) from exc
                conn.deadline = ends
                try:
                    if self._app_pool:
                        # The app's connection, switched to autocommit for the call (a
                        # client-side flag, no round trip): each statement commits on its
                        # own, one round trip, as on the store's own connections.
                        async with _aautocommit(conn):
                            if not self._checked:
                                await self._check_on(conn)
                            yield conn
                    else:
                        if not self._checked:
                            await self._check_on(conn)
                        yield conn
                except psycopg.OperationalError:
                    await conn.close()  # mid-statement or broken: never reused
                    raise
                finally:
                    conn.deadline = None
                    await pool.putconn(conn)
        except StoreError as exc:
            if broken(exc):
                # A killed backend or restarted server leaves every idle
                # connection dead; checking them now makes the next request use
                # a fresh one. Not after a timeout: the checks would wait too.
                with contextlib.suppress(Exception):  # best effort: the pool reconnects anyway
                    await pool.check()
            raise

    async def _check_on(self, conn: _AsyncBoundedConnection) -> None:
        """The schema check open() did not make, on the first call's connection, within its deadline."""
        try:
            row = await _arun_steps(conn, schema_version_steps(), self._rewrite)
        except psycopg.errors.UndefinedTable:
            row = None  # no idempo tables
        self._checked_on_first_use(row)

    async def _run(self, steps: Steps[_RV]) -> _RV:
        """Run one call's statements on a pooled connection."""
        if self._app_pool or not self._checked:
            async with self._connection() as conn:
                return await _arun_steps(conn, steps, self._rewrite)
        # The request path (the store's own pool, its schema checked): _connection's steps written
        # out, without a generator context manager per call, on the connection's one store cursor.
        wait, ends = self._limits(None)
        pool = self._pool or await self._get_pool()
        try:
            with PG_ERRORS:
                try:
                    conn = await pool.getconn(timeout=wait)
                except psycopg_pool.PoolTimeout as exc:
                    raise no_connection(self._settings, exc) from exc
                conn.deadline = ends
                try:
                    return await _arun_steps(conn.store_cursor(), steps)
                except psycopg.OperationalError:
                    await conn.close()  # mid-statement or broken: never reused
                    raise
                finally:
                    conn.deadline = None
                    await pool.putconn(conn)
        except StoreError as exc:
            if broken(exc):
                with contextlib.suppress(Exception):  # see _connection
                    await pool.check()
            raise

    async def check_schema(self) -> int:
        """Return the schema version found.

        Raises:
            ConfigurationError: the schema is missing or older than :data:`~idempo.stores.postgres.SCHEMA_VERSION`.
            StoreUnavailable: the database cannot be reached.
        """
        try:
            row = await self._run(schema_version_steps())
        except StoreError as exc:
            raise self._no_schema(exc) from exc
        return check_version(self._settings, row)

    async def create_schema(self) -> list[int]:
        """Create the schema, or upgrade it to :data:`~idempo.stores.postgres.SCHEMA_VERSION`; return the versions
        applied.

        Runs in one transaction under an advisory lock, so concurrent calls
        are safe and a failure leaves the database as it was. Maintenance: it
        may take up to 300 s, not the store's deadline.

        Raises:
            ConfigurationError: the server refuses the configuration (checked first,
                over a connection of its own, within the deadline).
            StoreError: the database refused (e.g. no CREATE privilege).
            StoreUnavailable: the database cannot be reached.
        """
        await self._probe()
        self._checked = True  # nothing to check before the schema exists
        async with self._connection(MAINTENANCE_DEADLINE) as conn, conn.transaction():
            return await _arun_steps(conn, create_schema_steps(self.schema, self._app_pool, self._search_path))

    async def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        return await self._run(begin_steps(record_key, fingerprint, lease_ttl_ms))

    async def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        await self._run(complete_steps(record_key, token, response, record_ttl_ms))

    async def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        await self._run(fenced_steps("release", {"record_key": record_key, "token": token}))

    async def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        params = {"record_key": record_key, "token": token, "lease_ttl_ms": int(lease_ttl_ms)}
        await self._run(fenced_steps("extend", params))

    async def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        return await self._run(get_steps(record_key))

    async def purge_expired(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records, oldest first; return how many.

        One bounded batch per call: call again while it returns ``limit``.
        """
        return await self._run(purge_steps(limit))

    async def stats(self) -> StoreStats:
        """See :meth:`idempo.typing.SupportsStats.stats` (one scan of the table, one transaction).

        Maintenance: it may take up to 300 s, not the store's deadline.
        """
        async with self._connection(MAINTENANCE_DEADLINE) as conn, conn.transaction():
            return await _arun_steps(conn, stats_steps(), self._rewrite)

    async def settle_on(self, connection: psycopg.AsyncConnection[Any], command: Complete | Release) -> None:
        """Run the record's ``complete`` or ``release`` on a connection the caller holds, in its transaction.

        For a front that drives the application's own database connection
        (idempo.django: Django's connection inside ``transaction.atomic()``),
        so that the record's completion is the last statement of that
        transaction (DESIGN "transactional route"). The statement names the
        store's schema and runs on a server-binding cursor of its own, so the
        connection's ``search_path`` and cursor factory do not matter.

        Args:
            connection: a psycopg connection to the store's database (an
                ``AsyncConnection`` for ``AsyncPostgresStore``).
            command: the settling command (``Complete`` or ``Release``), fenced by its lease token.

        Raises:
            LeaseLost: the token no longer holds the record (0 rows).
            psycopg.Error: as the statement raised it (not mapped: the caller's transaction decides).
        """
        async with psycopg.AsyncCursor(connection) as cursor:
            await _arun_steps(cursor, settle_steps(command), self._foreign_rewrite())

    async def aclose(self) -> None:
        """Close the connection pool; any later call raises StoreError. Calling it again does nothing.

        (``close()`` on ``PostgresStore``, ``aclose()`` on ``AsyncPostgresStore``.)
        """
        async with self._pool_lock:
            self._closed, self._open = True, False
            pool, self._pool = self._pool, None
        if pool is not None and not self._app_pool:
            await pool.close()


# --- transactional mode: driving the application's own connections -----------------------


class _AsyncPgTransactor(PgHandles):
    """Drives transactional executions on the application's pool (see idempo._engine.transaction: the
    Transactor protocol, AsyncTransactor for the async store).

    The handler gets the connection inside a psycopg ``Transaction`` (``AsyncTransaction``), guarded
    (idempo.stores._psycopg): a COMMIT-like statement, ``commit()`` and ``rollback()`` are refused and
    remembered (the key is then held); its nested ``transaction()`` blocks are savepoints.
    """

    def __init__(self, store: AsyncPostgresStore) -> None:
        self._store = store

    async def open(self) -> PgHandle:
        store = self._store
        pool = pool_of(store)
        with checkout_errors(store.deadline):
            conn = await _aidle_getconn(pool, store.deadline)
        try:
            tx = psycopg.AsyncTransaction(conn, savepoint_name=MARK)
            async with conn.pipeline():  # BEGIN and the marking savepoint: one round trip
                await tx.__aenter__()
        except psycopg.Error as exc:
            await pool.putconn(conn)
            raise begin_failed(exc) from exc
        return PgHandle(conn, tx, guard(conn))

    async def ended(self, h: PgHandle, committing: bool) -> str | None:
        """Why idempo's transaction is no longer open (see ``ended_without_io``), or None.

        Not committing (a release or hold follows), the marking savepoint is
        then rolled back to: that fails when the transaction open is not
        idempo's (the handler ended it and a new one began). Committing, that
        check is the RELEASE that :meth:`finish` sends first in its pipeline.
        A statement the guard refused counts as ended.
        """
        refused = unguard(h.conn, h.factory)
        if refused is not None:
            return refused
        why = ended_without_io(h)
        if why is not None or committing:
            return why
        try:
            await h.conn.execute(ROLLBACK_TO_MARK)
        except NO_MARK as exc:
            return mark_missing(exc)
        except psycopg.Error:
            if h.conn.broken or h.conn.closed:
                raise
            # Another failure (the transaction aborted by the handler's own failed statement,
            # 25P02): still idempo's; the commit path meets the same failure and decides.
            return None
        return None

    async def run(self, h: PgHandle, command: Any, *, in_transaction: bool) -> None:
        unguard(h.conn, h.factory)
        if in_transaction:
            await _arun_steps(h.conn, settle_steps(command), self._store._rewrite)
        else:
            async with h.conn.transaction():
                await _arun_steps(h.conn, settle_steps(command), self._store._rewrite)

    async def commit(self, h: PgHandle) -> None:
        unguard(h.conn, h.factory)
        await h.tx.__aexit__(None, None, None)

    async def finish(self, h: PgHandle, command: Any) -> None:
        """RELEASE of the marking savepoint, the record's completion and COMMIT in one pipeline: one round trip.

        The three share one sync point, so a failed statement skips the rest
        (the server discards them up to the sync; the transaction is left
        aborted, and the commit path rolls it back). A RELEASE that finds no
        savepoint means the handler ended idempo's transaction and began another
        (TransactionControlled: what it committed stays, the key is held); a
        completion that matches no row means the lease was lost (LeaseLost, see
        ``complete_last``).

        Raises:
            TransactionControlled: the marking savepoint is gone.
            LeaseLost: the token no longer holds the record.
        """
        unguard(h.conn, h.factory)
        query, params = complete_last(command, self._store._rewrite)
        try:
            async with h.conn.pipeline():
                await h.conn.execute(RELEASE_MARK)
                await h.conn.execute(query, params)
                await h.tx.__aexit__(None, None, None)
        except psycopg.Error as exc:
            finish_failed(exc)
            raise

    async def rollback(self, h: PgHandle) -> None:
        unguard(h.conn, h.factory)
        if h.tx.status == psycopg.AsyncTransaction.Status.ACTIVE:
            rollback = psycopg.Rollback(h.tx)
            await h.tx.__aexit__(psycopg.Rollback, rollback, None)  # errors are logged by psycopg, not raised
        elif h.conn.info.transaction_status != IDLE:
            await h.conn.rollback()
        if h.conn.broken or h.conn.closed:
            raise psycopg.OperationalError("the connection broke during ROLLBACK")

    async def close(self, h: PgHandle, *, broken: bool) -> None:
        pool = self._store._pool
        try:
            unguard(h.conn, h.factory)  # the pool's next borrower gets the connection as the app made it
            if broken or h.conn.broken:
                await h.conn.close()
            if pool is not None:
                await pool.putconn(h.conn)  # a transaction left open is rolled back by the pool
            else:
                await h.conn.close()
        except Exception:
            logger.exception("idempo: giving back a transaction's connection failed")

    async def resolve(self, record_key: str) -> Record | None:
        return await self._store.get(record_key)


# --- SQLAlchemy engines (extra idempo[sqlalchemy]) ----------------------------------------


class _AsyncEnginePostgresStore(AsyncPostgresStore):
    """The store on the application's SQLAlchemy engine (see ``from_engine``): an ``AsyncEngine``
    (asyncpg or psycopg) for ``AsyncPostgresStore``, an ``Engine`` (psycopg) for ``PostgresStore``."""

    async def open(self) -> None:
        """See :meth:`~idempo.stores.postgres.AsyncPostgresStore.open` (over a connection of the engine)."""
        if self._open:
            return
        try:
            row = await self._run(schema_version_steps(), check=False)
        except StoreError as exc:
            if not undefined_table(exc):
                raise
            row = None
        self._opened(row)

    async def check_schema(self) -> int:
        """See :meth:`~idempo.stores.postgres.AsyncPostgresStore.check_schema`."""
        self._open = False
        await self.open()
        return SCHEMA_VERSION

    async def _run(self, steps: Steps[_RV], check: bool = True) -> _RV:
        """Run one call's statements on a connection of the engine, in autocommit mode."""
        from .. import _sqlalchemy

        if self._closed:
            raise closed(self.url)
        if check and not self._checked:
            await self.open()
        with _sqlalchemy.sa_errors():
            async with self._engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                result: _RV = await _sqlalchemy.arun_steps(conn, steps, self._rewrite)
                return result

    async def create_schema(self) -> list[int]:
        """Not on an engine: create idempo's tables with ``idempo migrate`` (or a URL-built store's create_schema).

        Raises:
            ConfigurationError: always.
        """
        raise ConfigurationError(
            "a store built by from_engine does not create its schema: run `idempo migrate --store postgresql://...`"
        )

    async def stats(self) -> StoreStats:
        """See :meth:`~idempo.stores.postgres.AsyncPostgresStore.stats`."""
        from .. import _sqlalchemy

        with _sqlalchemy.sa_errors():
            async with self._engine.connect() as conn, conn.begin():
                result: StoreStats = await _sqlalchemy.arun_steps(conn, stats_steps(), self._rewrite)
                return result

    async def aclose(self) -> None:
        """Any later call raises StoreError; the engine is the application's (not disposed)."""
        self._closed, self._open = True, False

    def _transactor_on(self, engine: Any) -> Any:
        from .. import _sqlalchemy

        return _sqlalchemy.AsyncEngineTransactor(engine, settle_steps, self.get, self._rewrite)


# What from_pool and from_engine build (these classes are defined after the store).
AsyncPostgresStore._transactor_type = _AsyncPgTransactor
AsyncPostgresStore._engine_type = _AsyncEnginePostgresStore
