"""The PostgreSQL store (extra ``idempo[postgres]``: psycopg 3 and psycopg_pool).

Records live in one table, ``idempo_records``, in a schema of your choice
(default ``public``). Each transition is one SQL statement in autocommit mode,
so one round trip: ``begin`` is an ``INSERT ... ON CONFLICT (record_key) DO
UPDATE ... WHERE <expired>`` that also returns the live record when it did not
take the lease (``stores/sql/postgres/queries.sql``). A first execution costs
two round trips (``begin``, ``complete``), a replay one. psycopg prepares each
statement on the server after ``prepare_threshold`` executions on a connection.

Clock: every time comes from the database (``now()`` in milliseconds), never
from the application, so servers with skewed clocks agree on leases and TTLs.

Schema: shipped in ``stores/sql/postgres/`` (``schema.sql`` and numbered
``migrations/``) and versioned in ``idempo_schema_version``. It is created or
upgraded only by ``idempo migrate --store postgresql://...`` or
:meth:`PostgresStore.create_schema`, never at request time: the store checks
the version when it starts and raises :class:`~idempo.ConfigurationError`
when the schema is missing or older than this idempo needs.

Expired records behave as absent; :meth:`PostgresStore.purge_expired` deletes
them in bounded batches (the ``expires_at`` index serves it). Run it
periodically (``idempo purge``, cron, pg_cron).

Deadline: every call (pool wait, connect and statement together) ends
within ``deadline`` seconds (default 2): the pool wait is bounded by what is
left of it, each wait for the server's reply by psycopg's wait timeout (a
connection that timed out mid-statement is closed, never reused), and the
server cancels a statement past it on its side (``statement_timeout``,
``idle_in_transaction_session_timeout``). TCP keepalives let the kernel
notice a dead peer on an idle pooled connection. Past the deadline a call
raises :class:`~idempo.exceptions.StoreUnavailable`.

Open and close: as every store (``idempo.stores._base``). Building a store
does no I/O. ``open()`` (the fronts call it at start-up) checks the server
and the schema once over a connection of its own, so a misconfiguration is
named at once: a wrong password or role, a missing database or schema, or a
host name that does not resolve raise
:class:`~idempo.exceptions.ConfigurationError` (one line, with the fix). A
server that cannot be reached is not a misconfiguration: ``open()`` raises
StoreUnavailable (the fronts log one warning and start), and the first call
checks the schema. The pool opens on the first call.

Twins: :class:`PostgresStore` and :class:`AsyncPostgresStore` share
everything but the I/O: the constructor and the checks
(:class:`_PostgresBase`), and each call's statements, written once as a
generator (``_begin``, ``_complete``, ``_stats`` ...) that
:func:`_run_steps` or :func:`_arun_steps` drives on a connection. Those two
drivers run a call on any psycopg connection, the store's or one handed in.

The async store needs asyncio (psycopg's async connections); it does not run on trio.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from time import monotonic
from typing import Any, ClassVar, Generic, LiteralString, NamedTuple, Self, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.abc import PQGen

from .._core.flow import Complete, Release
from .._core.records import Acquired, BeginResult, Existing, Record, StoreStats, StoredResponse, encode_headers
from ..exceptions import ConfigurationError, LeaseLost, StoreError, StoreUnavailable
from ..observability._observation import logger
from ._base import (
    DEFAULT_DEADLINE,
    IN_PROGRESS_GRACE,
    closed,
    deadline_seconds,
    load_queries,
    load_sql,
    map_errors,
    misconfigured,
    record_from_row,
)
from ._psycopg import guard, unguard
from .sql.postgres import SCHEMA_VERSION, migrations

__all__ = ["SCHEMA_VERSION", "AsyncPostgresStore", "PostgresStore", "migrations"]

_Q = load_queries("postgres")
_SCHEMA_SQL = load_sql("postgres", "schema.sql")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# Query options idempo reads from the URL; the rest go to libpq.
_URL_OPTIONS: dict[str, Any] = {
    "schema": str,
    "min_size": int,
    "max_size": int,
    "deadline": deadline_seconds,
    "timeout": deadline_seconds,  # the older name of deadline
    "prepare_threshold": lambda v: None if v.lower() == "none" else int(v),
}
# A begin that finds no row lost a race with a concurrent commit (see the
# begin query); the next attempt sees the committed record.
_BEGIN_ATTEMPTS = 5
# Seconds maintenance calls (stats, create_schema) may take: they scan or
# alter the whole table, which no request waits for.
_MAINTENANCE_DEADLINE = 300.0
# Seconds psycopg_pool keeps retrying one lost connection with backoff.
_RECONNECT_TIMEOUT = 5.0
# Seconds a call waits for a pooled connection while the server refuses new
# ones (the pool's last attempt was refused): a 503 at once rather than after
# the whole deadline, yet long enough to take a connection the pool just made.
_REFUSED_WAIT = 0.05
_RV = TypeVar("_RV")
# The application's pool type of a store twin (from_pool).
_Pool = TypeVar("_Pool", psycopg_pool.ConnectionPool[Any], psycopg_pool.AsyncConnectionPool[Any])


# OperationalError covers refused/reset/killed connections, an exhausted
# pool (PoolTimeout) and statement timeouts (QueryCanceled).
_PG_ERRORS = map_errors((psycopg.OperationalError,), (psycopg.Error,))
# Guards making and closing a blocking store's pool (rare: once per store).
_POOL_LOCK = threading.Lock()


class _Settings:
    """Constructor arguments resolved against the URL; shared by both fronts."""

    def __init__(
        self,
        url: str,
        *,
        schema: str,
        min_size: int,
        max_size: int,
        deadline: float | timedelta,
        application_name: str,
        prepare_threshold: int | None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ConfigurationError(f"a PostgreSQL store URL starts with postgresql://, got {url!r}")
        given: dict[str, Any] = {}
        libpq: list[tuple[str, str]] = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in _URL_OPTIONS:
                try:
                    given[name] = _URL_OPTIONS[name](value)
                except ValueError as exc:
                    raise ConfigurationError(f"bad value for the PostgreSQL URL option {name}: {value!r}") from exc
            else:
                libpq.append((name, value))
        self.schema: str = given.get("schema", schema)
        if not _IDENTIFIER.match(self.schema):
            raise ConfigurationError(f"the schema name must be a plain SQL identifier, got {self.schema!r}")
        self.min_size: int = given.get("min_size", min_size)
        self.max_size: int = given.get("max_size", max_size)
        self.url = url
        self.deadline: float = given.get("deadline", given.get("timeout", deadline_seconds(deadline)))
        libpq_names = {name for name, _ in libpq}
        self.conninfo = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(libpq)))
        options = dict(libpq).get("options", "")
        deadline_ms = math.ceil(self.deadline * 1000)
        server_options = (
            # Every statement names its tables unqualified; the schema is chosen here.
            f"-c search_path={self.schema}"
            # The server gives up when the client does: a statement that outlives
            # the deadline (a lock wait) is cancelled, and so is a transaction
            # left idle by a client that is gone, releasing its locks.
            f" -c statement_timeout={deadline_ms} -c idle_in_transaction_session_timeout={deadline_ms}"
        )
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "prepare_threshold": given.get("prepare_threshold", prepare_threshold),
            "options": f"{options} {server_options}".strip(),
        }
        if "application_name" not in libpq_names:
            kwargs["application_name"] = application_name
        # libpq counts whole seconds and enforces at least 2; a pool connects in
        # the background, so a request still waits no longer than its deadline.
        defaults = {
            "connect_timeout": max(2, math.ceil(self.deadline)),
            # An idle pooled connection to a peer that vanished (a failover, a
            # cut cable) is found dead by the kernel within seconds, and unsent
            # data to it is given up after the deadline (Linux).
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": deadline_ms,
        }
        for name, value in defaults.items():
            if name not in libpq_names:
                kwargs[name] = value
        self.kwargs = kwargs
        #: Why the pool's last connection attempt failed, when the server
        #: refused it (the port is closed); None once an attempt succeeds.
        self.refused: str | None = None

    def connect_failed(self, exc: psycopg.OperationalError) -> None:
        """Note a failed connection attempt of the pool."""
        text = " ".join(str(exc).split())
        self.refused = text if "Connection refused" in text else None

    def pool_wait(self, limit: float) -> float:
        """Seconds a call waits for a pooled connection: its deadline, or a moment while the server refuses."""
        return min(limit, _REFUSED_WAIT) if self.refused is not None else limit

    def connection_classes(self) -> tuple[type[_BoundedConnection], type[_AsyncBoundedConnection]]:
        """Connection classes for this store's pools that tell it how their connection attempts end."""
        settings = self

        class StoreConnection(_BoundedConnection):
            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
                try:
                    conn = super().connect(conninfo, **kwargs)
                except psycopg.OperationalError as exc:
                    settings.connect_failed(exc)
                    raise
                settings.refused = None
                return conn

        class AsyncStoreConnection(_AsyncBoundedConnection):
            @classmethod
            async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
                try:
                    conn = await super().connect(conninfo, **kwargs)
                except psycopg.OperationalError as exc:
                    settings.connect_failed(exc)
                    raise
                settings.refused = None
                return conn

        return StoreConnection, AsyncStoreConnection

    def pool_arguments(self, blocking: bool) -> dict[str, Any]:
        """Arguments of the store's pool: a blocking psycopg_pool.ConnectionPool, or the async one."""
        connection_class = self.connection_classes()[0 if blocking else 1]
        configure = self._configure if blocking else self._configure_async
        return {
            "conninfo": self.conninfo,
            "kwargs": self.kwargs,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "timeout": self.deadline,
            "name": f"idempo-{self.schema}",
            "open": False,
            "connection_class": connection_class,
            "configure": configure,
            # psycopg_pool retries a lost server with a doubling delay (1, 2,
            # 4 ... s) for reconnect_timeout (300 s by default): after a
            # minute's outage the next attempt could be half a minute away.
            # Cut short, the attempt gives up and the next request starts a new
            # one at once, so the store serves again within seconds of its return.
            "reconnect_timeout": _RECONNECT_TIMEOUT,
        }

    def _configure(self, conn: Any) -> None:
        # A wait outside a store call (the pool's own checks) is bounded too.
        conn.idle_bound = self.deadline

    async def _configure_async(self, conn: Any) -> None:
        conn.idle_bound = self.deadline

    def probe_arguments(self) -> dict[str, Any]:
        """Arguments of the one direct connection that checks the server at start-up."""
        return {**self.kwargs, "connect_timeout": max(2, math.ceil(self.deadline))}

    def check_startup(self, exc: psycopg.Error) -> ConfigurationError | None:
        """The ConfigurationError for a start-up failure that is a misconfiguration, else None."""
        return _misconfiguration(self.url, exc)


def _misconfiguration(url: str, exc: psycopg.Error) -> ConfigurationError | None:
    """Name what a connection error says is wrong with the configuration (None: the server is unreachable).

    libpq reports connection failures as text without an SQLSTATE, so the
    messages are matched (they are stable across PostgreSQL 12-17).
    """
    text = str(exc)
    detail = text.rpartition("FATAL:")[2].strip() or text
    if "password authentication failed" in text or "no password supplied" in text:
        return misconfigured(url, detail, "fix the user name or password in the store URL")
    if "role" in text and "does not exist" in text:
        return misconfigured(url, detail, "fix the user name in the store URL, or create the role")
    if "database" in text and "does not exist" in text:
        return misconfigured(url, detail, "fix the database name in the store URL, or create the database")
    if "pg_hba.conf" in text or "permission denied" in text:
        return misconfigured(url, detail, "grant this user access to the database (pg_hba.conf, CONNECT)")
    if "failed to resolve host" in text or "could not translate host name" in text:
        return misconfigured(url, detail, "fix the host name in the store URL")
    return None


class _BoundedConnection(psycopg.Connection[tuple[Any, ...]]):
    """A pooled connection whose every wait for the server ends at the store call's deadline.

    ``deadline`` (monotonic seconds) is set for the length of one store call;
    outside one (the pool's own checks) a wait lasts at most ``idle_bound``
    seconds. psycopg's wait timeout (3.3.9, the version idempo needs) raises an
    OperationalError when a wait times out.
    """

    deadline: float | None = None
    idle_bound: float = DEFAULT_DEADLINE

    def wait(self, gen: PQGen[_RV], interval: float = 0.1, timeout: float | None = None) -> _RV:
        """psycopg's wait, bounded by the call's deadline."""
        return super().wait(gen, interval, _bounded(self.deadline, self.idle_bound, timeout))


class _AsyncBoundedConnection(psycopg.AsyncConnection[tuple[Any, ...]]):
    """The async twin of :class:`_BoundedConnection` (no task cancellation, so no cancel request)."""

    deadline: float | None = None
    idle_bound: float = DEFAULT_DEADLINE

    async def wait(self, gen: PQGen[_RV], interval: float = 0.1, timeout: float | None = None) -> _RV:  # noqa: ASYNC109 (psycopg's signature)
        """psycopg's wait, bounded by the call's deadline."""
        return await super().wait(gen, interval, _bounded(self.deadline, self.idle_bound, timeout))


_IDLE = psycopg.pq.TransactionStatus.IDLE


def _discarding(conn: Any) -> None:
    logger.warning(
        "idempo: a connection of the application's pool was checked out in a transaction (%s), most likely "
        "written through by a reference to tx.connection kept past its handler; it is closed (the server "
        "rolls that transaction back) and another one is used",
        conn.info.transaction_status.name,
    )


def _idle_getconn(pool: psycopg_pool.ConnectionPool[Any], timeout: float) -> Any:
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
        conn = pool.getconn(timeout=max(ends - monotonic(), 0.001))
        if conn.info.transaction_status == _IDLE:
            return conn
        _discarding(conn)
        with contextlib.suppress(Exception):
            conn.close()
        pool.putconn(conn)


async def _aidle_getconn(pool: psycopg_pool.AsyncConnectionPool[Any], timeout: float) -> Any:  # noqa: ASYNC109 (the pool's wait)
    """The async twin of :func:`_idle_getconn`."""
    ends = monotonic() + timeout
    while True:
        conn = await pool.getconn(timeout=max(ends - monotonic(), 0.001))
        if conn.info.transaction_status == _IDLE:
            return conn
        _discarding(conn)
        with contextlib.suppress(Exception):
            await conn.close()
        await pool.putconn(conn)


@contextmanager
def _autocommit(conn: Any) -> Iterator[None]:
    """The app's pooled connection in autocommit mode for one store call, its own mode restored after."""
    restore = not conn.autocommit
    if restore:
        conn.autocommit = True
    try:
        yield
    finally:
        if restore and not conn.closed:
            conn.autocommit = False


@asynccontextmanager
async def _aautocommit(conn: Any) -> AsyncIterator[None]:
    """The async twin of :func:`_autocommit`."""
    restore = not conn.autocommit
    if restore:
        await conn.set_autocommit(True)
    try:
        yield
    finally:
        if restore and not conn.closed:
            await conn.set_autocommit(False)


def _bounded(deadline: float | None, idle_bound: float, timeout: float | None) -> float:
    left = idle_bound if deadline is None else max(deadline - monotonic(), 0.0)
    return left if timeout is None else min(timeout, left)


def _schema_error(url: str, schema: str, found: int | None) -> ConfigurationError:
    if found is None:
        what = f"the database has no idempo tables in schema {schema!r}"
    else:
        what = f"schema {schema!r} holds idempo schema version {found}; this idempo needs {SCHEMA_VERSION}"
    # A store on the app's pool or engine is named "postgresql://(pool NAME)": no URL to repeat.
    target = ("<your database's URL>" + f"?schema={schema}") if url.startswith("postgresql://(") else "<the same URL>"
    return misconfigured(
        url,
        what,
        f"run `idempo migrate --store {target}` (or create_schema()) once, before the application starts",
    )


def _check_version(settings: _Settings, row: tuple[Any, ...] | None) -> int:
    found = row[0] if row else None
    if found is None or found < SCHEMA_VERSION:
        raise _schema_error(settings.url, settings.schema, found)
    return int(found)


def _startup_failure(settings: _Settings, exc: psycopg.Error) -> Exception:
    """What a failed start-up check raises: the misconfiguration it shows, or StoreUnavailable, or StoreError."""
    named = settings.check_startup(exc)
    if named is not None:
        return named
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return _schema_error(settings.url, settings.schema, None)
    if isinstance(exc, psycopg.OperationalError):
        return StoreUnavailable(f"{type(exc).__name__}: {exc}")
    return StoreError(f"{type(exc).__name__}: {exc}")


def _no_connection(settings: _Settings, exc: psycopg_pool.PoolTimeout) -> StoreUnavailable:
    """The error of a call that got no pooled connection: the server's refusal when that is why."""
    if settings.refused is not None:
        return StoreUnavailable(f"the server refuses connections: {settings.refused}")
    return StoreUnavailable(f"PoolTimeout: no connection within the {settings.deadline:g} s deadline ({exc})")


def _broken(exc: StoreError) -> bool:
    """Whether a call failed on a broken connection, rather than by waiting (pool or server) or in SQL."""
    cause = exc.__cause__
    if not isinstance(cause, psycopg.OperationalError):
        return False
    return not (isinstance(cause, psycopg_pool.PoolTimeout) or type(cause).__name__ == "_WaitTimeout")


# --- the statements of each call, written once ----------------------------------------------
#
# Each call is a generator of the statements it runs (sans-I/O): it yields a
# _Statement, receives its _Rows, and returns the call's result or raises
# (LeaseLost, StoreError). :func:`_run_steps` drives one on a blocking psycopg
# connection and :func:`_arun_steps` on an async one: those two are the only
# I/O, on whatever connection they are given (the store's pool, or a
# connection of the application's own). Every statement's text comes from
# ``queries.sql``.


class _Statement(NamedTuple):
    """One statement to execute: text, parameters, binary results, prepare (None: psycopg's threshold)."""

    query: LiteralString | sql.Composed
    params: dict[str, Any] | None = None
    binary: bool = False
    prepare: bool | None = None


class _Rows(NamedTuple):
    """What a statement gave back: the affected row count and the first row (None: no row)."""

    rowcount: int
    row: tuple[Any, ...] | None


_Steps = Generator[_Statement, _Rows, _RV]
#: Statement text -> the text to run instead (see :func:`_qualified`).
_Rewrite = dict[Any, Any]


def _qualified(schema: str) -> _Rewrite:
    """Every query of ``queries.sql`` with idempo's tables qualified by ``schema``.

    The store's own connections set ``search_path``; a connection of the
    application's pool keeps the application's, so its statements name the
    schema instead (no extra round trip, and the handler's own search_path is untouched).
    """
    quoted = sql.Identifier(schema).as_string()
    table = re.compile(r"\b(idempo_records|idempo_schema_version)\b")
    return {text: table.sub(lambda m: f"{quoted}.{m.group(1)}", text) for text in _Q.values()}


def _run_steps(
    conn: psycopg.Connection[Any] | psycopg.Cursor[Any], steps: _Steps[_RV], rewrite: _Rewrite | None = None
) -> _RV:
    """Run a call's statements on a blocking connection and return its result (psycopg's errors as they come).

    ``rewrite`` maps a statement's text to the text to run (its tables
    qualified by the schema, on a connection of the application's own).
    """
    try:
        statement = next(steps)
        while True:
            query = statement.query if rewrite is None else rewrite.get(statement.query, statement.query)
            cursor = conn.execute(query, statement.params, binary=statement.binary, prepare=statement.prepare)
            # rownumber, not description: description builds a Column per column on each read.
            statement = steps.send(_Rows(cursor.rowcount, None if cursor.rownumber is None else cursor.fetchone()))
    except StopIteration as done:
        result: _RV = done.value
        return result


async def _arun_steps(
    conn: psycopg.AsyncConnection[Any] | psycopg.AsyncCursor[Any], steps: _Steps[_RV], rewrite: _Rewrite | None = None
) -> _RV:
    """The async twin of :func:`_run_steps`."""
    try:
        statement = next(steps)
        while True:
            query = statement.query if rewrite is None else rewrite.get(statement.query, statement.query)
            cursor = await conn.execute(query, statement.params, binary=statement.binary, prepare=statement.prepare)
            statement = steps.send(
                _Rows(cursor.rowcount, None if cursor.rownumber is None else await cursor.fetchone())
            )
    except StopIteration as done:
        result: _RV = done.value
        return result


def _begin(record_key: str, fingerprint: str, lease_ttl_ms: int) -> _Steps[BeginResult]:
    params = {"record_key": record_key, "fingerprint": fingerprint, "lease_ttl_ms": int(lease_ttl_ms)}
    for _ in range(_BEGIN_ATTEMPTS):
        row = (yield _Statement(_Q["begin"], params, binary=True)).row
        if row is not None:
            acquired, now_ms, token, takeover, *record = row
            if acquired:
                return Acquired(token, takeover=takeover)
            return Existing(record_from_row(record_key, tuple(record)), now_ms)
    raise StoreError(f"begin could not take or read record {record_key} after {_BEGIN_ATTEMPTS} attempts")


def _fenced(name: LiteralString, params: dict[str, Any]) -> _Steps[None]:
    """complete, release or extend: one statement that changes one row if the token holds it."""
    if (yield _Statement(_Q[name], params)).rowcount != 1:
        raise LeaseLost()


def _complete(record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> _Steps[None]:
    return _fenced(
        "complete",
        {
            "record_key": record_key,
            "token": token,
            "record_ttl_ms": int(record_ttl_ms),
            "status": response.status,
            "headers": encode_headers(response.headers),
            "body": response.body,
        },
    )


def _get(record_key: str) -> _Steps[Record | None]:
    row = (yield _Statement(_Q["get"], {"record_key": record_key}, binary=True)).row
    return None if row is None else record_from_row(record_key, row)


def _purge_expired(limit: int) -> _Steps[int]:
    params = {"limit": int(limit), "grace_ms": int(IN_PROGRESS_GRACE * 1000)}
    return (yield _Statement(_Q["purge_expired"], params)).rowcount


def _maintenance() -> _Statement:
    # A whole-table statement may outlast a request's deadline on the server too.
    return _Statement(f"SET LOCAL statement_timeout = {int(_MAINTENANCE_DEADLINE * 1000)}", prepare=False)


def _stats() -> _Steps[StoreStats]:
    """Run in one transaction (one snapshot for both statements)."""
    yield _maintenance()
    counts = (yield _Statement(_Q["stats"], prepare=False)).row
    row = (yield _Statement(_Q["oldest_lease"], binary=True, prepare=False)).row
    assert counts is not None  # the query always returns one row
    now_ms, in_progress, completed, expired = counts
    oldest = None if row is None else record_from_row(row[0], row[1:])
    return StoreStats(int(now_ms), int(in_progress), int(completed), int(expired), oldest)


def _schema_version() -> _Steps[tuple[Any, ...] | None]:
    return (yield _Statement(_Q["schema_version"], prepare=False)).row


def _create_schema(schema: str, set_path: bool = False, search_path: bool = False) -> _Steps[list[int]]:
    """Run in one transaction: create the schema, or upgrade it; return the versions applied.

    ``set_path``: on a connection of the application's (whose search_path is
    its own), the schema's DDL runs under ``SET LOCAL search_path``;
    ``search_path``: the tables go where that connection's search_path puts
    them (no schema is created or named).
    """
    yield _maintenance()
    if search_path:
        yield _Statement(_Q["migration_lock"], {"schema": ""}, prepare=False)
    else:
        yield _Statement(_Q["migration_lock"], {"schema": schema}, prepare=False)
        yield _Statement(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)), prepare=False)
    if set_path and not search_path:
        yield _Statement(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)), prepare=False)
    row = (yield _Statement(_Q["version_table_exists"], prepare=False)).row
    current = None
    if row is not None and row[0]:
        found = yield from _schema_version()
        current = found[0] if found is not None and found[0] is not None else 0
    applied: list[int] = []
    for version, text in _plan(current):
        yield _Statement(text, prepare=False)
        yield _Statement(_Q["record_version"], {"version": version}, prepare=False)
        applied.append(version)
    return applied


def _plan(current: int | None) -> list[tuple[int, LiteralString]]:
    """The SQL to run to reach SCHEMA_VERSION from ``current`` (None: a fresh schema)."""
    if current is None:
        return [(SCHEMA_VERSION, _SCHEMA_SQL)]
    return [(version, text) for version, text in migrations() if version > current]


# --- the stores ---------------------------------------------------------------------------


class _PostgresBase(Generic[_Pool]):
    """What the blocking and the async PostgreSQL stores share: the constructor, settings and checks,
    and the constructors on the application's pool or engine."""

    _foreign: _Rewrite | None = None
    #: What the twins' from_pool and from_engine differ in (set below the classes they name): the
    #: transactor on the app's pool, the store class on an engine and its transactor in _sqlalchemy.
    _transactor_type: ClassVar[type[_PgTransactor | _AsyncPgTransactor]]
    _engine_type: ClassVar[type[_EnginePostgresStore | _AsyncEnginePostgresStore]]
    _engine_transactor: ClassVar[str]  # a name: _sqlalchemy needs idempo[sqlalchemy], imported when used
    _pool_type: ClassVar[type[Any]]  # the psycopg_pool class from_pool takes
    _engine: Any = None
    _pool: _Pool | None = None

    def _foreign_rewrite(self) -> _Rewrite | None:
        """The statements as a connection that is not the store's runs them: tables qualified by the schema."""
        if self._rewrite is not None or self.schema is None:
            return self._rewrite
        if self._foreign is None:
            self._foreign = _qualified(self.schema)
        return self._foreign

    def __init__(
        self,
        url: str,
        *,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 10,
        deadline: float | timedelta = DEFAULT_DEADLINE,
        application_name: str = "idempo",
        prepare_threshold: int | None = 5,
        check_schema: bool = True,
    ) -> None:
        self._settings = _Settings(
            url,
            schema=schema,
            min_size=min_size,
            max_size=max_size,
            deadline=deadline,
            application_name=application_name,
            prepare_threshold=prepare_threshold,
        )
        self.schema = self._settings.schema
        #: The store URL as given (messages show it with the password masked).
        self.url = url
        #: Seconds one call may take (connect, pool wait and statement together).
        self.deadline = self._settings.deadline
        # The schema version is checked once: by open(), else by the first call.
        self._checked = not check_schema
        self._open = False  # open() succeeded
        self._closed = False
        #: True when the store runs on the application's own pool (from_pool): its
        #: connections are the app's (no search_path, maybe not autocommit), and
        #: the pool is the app's to open and close.
        self._app_pool = False
        # from_pool(schema=None): idempo's tables are wherever the app's search_path finds them.
        self._search_path = False
        self._rewrite: _Rewrite | None = None
        #: How a transactional execution drives this database (see
        #: idempo._engine.transaction); None for a store built from a URL.
        self.transactor: Any = None

    @classmethod
    def from_pool(
        cls,
        pool: _Pool,
        *,
        schema: str | None = None,
        deadline: float | timedelta = DEFAULT_DEADLINE,
        check_schema: bool = True,
    ) -> Self:
        """A store on the application's own psycopg_pool, for transactional mode.

        Records live in ``schema`` of the pool's database (``idempo migrate``
        creates it), so a transactional handler's writes and the record's
        completion commit in one transaction (DESIGN "transactional route").
        Every store call checks a connection out of ``pool`` for one statement
        (switched to autocommit mode for the call, a client-side flag); a
        transactional execution holds one for the handler's transaction. Size the pool for both. The pool is the
        application's: open it before the app starts; :meth:`close` leaves it open.

        Args:
            pool: an open (or to be opened) ``psycopg_pool.ConnectionPool``
                (an ``AsyncConnectionPool`` for :class:`AsyncPostgresStore`).
            schema: the schema holding idempo's tables (a plain identifier):
                statements name it, the connections' ``search_path`` is
                untouched. None (default): the tables are found through the
                connections' own ``search_path``, as the app's tables are.
            deadline: seconds (or a timedelta) a call may wait for a pooled
                connection before StoreUnavailable (default 2). The statements
                themselves are bounded by the server's settings only
                (``statement_timeout``, ``idle_in_transaction_session_timeout``).
            check_schema: as in the constructor.

        Raises:
            ConfigurationError: ``pool`` is not the pool class this store drives
                (a blocking ``ConnectionPool`` given to :class:`AsyncPostgresStore`, or the
                reverse), or a schema name that is not a plain identifier.
        """
        if not isinstance(pool, cls._pool_type):
            # Caught here, not as a TypeError from the first checkout at start-up.
            twin = AsyncPostgresStore if cls._pool_type is psycopg_pool.ConnectionPool else PostgresStore
            raise ConfigurationError(
                f"{cls.__name__}.from_pool takes a psycopg_pool.{cls._pool_type.__name__}, got "
                f"{type(pool).__module__}.{type(pool).__qualname__}; use {twin.__name__}.from_pool for that pool"
            )
        store = cls("postgresql://", schema=schema or "public", deadline=deadline, check_schema=check_schema)
        where = "" if schema is None else f"?schema={schema}"
        store._bind(schema, f"postgresql://(pool {getattr(pool, 'name', '?')}){where}")
        store._pool = pool
        store.transactor = cls._transactor_type(store)  # type: ignore[arg-type]
        return store

    @classmethod
    def from_engine(
        cls,
        engine: Any,
        *,
        schema: str | None = None,
        deadline: float | timedelta = DEFAULT_DEADLINE,
        check_schema: bool = True,
    ) -> Self:
        """A store on the application's SQLAlchemy 2 engine, for transactional mode.

        Needs ``idempo[sqlalchemy]``. idempo's statements run through the engine
        (``text()``); a transactional handler gets ``tx.connection`` (a
        SQLAlchemy ``Connection`` inside idempo's transaction) and ``tx.session``
        (a ``Session`` joined with ``join_transaction_mode="create_savepoint"``);
        on an ``AsyncEngine`` (asyncpg or psycopg, for :class:`AsyncPostgresStore`)
        an ``AsyncConnection`` and an ``AsyncSession``.
        The tables are created by ``idempo migrate``, not by this store.

        Args:
            engine: a ``sqlalchemy.Engine`` on PostgreSQL (psycopg), the
                application's; an ``AsyncEngine`` for :class:`AsyncPostgresStore`.
            schema: as in :meth:`from_pool`.
            deadline: as in :meth:`from_pool` (the engine's pool timeout applies to checkouts).
            check_schema: as in the constructor.

        Raises:
            ConfigurationError: the engine is not on PostgreSQL, or a bad schema name.
        """
        from . import _sqlalchemy

        if getattr(getattr(engine, "dialect", None), "name", None) != "postgresql":
            raise ConfigurationError(f"{cls.__name__}.from_engine needs a SQLAlchemy engine on PostgreSQL")
        store: Self = cls._engine_type(  # type: ignore[assignment]
            "postgresql://", schema=schema or "public", deadline=deadline, check_schema=check_schema
        )
        store._bind(schema, f"postgresql://(engine {engine.url.render_as_string(hide_password=True)})")
        store._engine = engine
        transactor = getattr(_sqlalchemy, cls._engine_transactor)
        store.transactor = transactor(engine, _settle_steps, store.get, store._rewrite)  # type: ignore[attr-defined]
        return store

    def _bind(self, schema: str | None, url: str) -> None:
        """Run on the application's pool or engine, left to the app: statements qualified by ``schema``,
        or (None) unqualified, found through the connections' own search_path."""
        self._app_pool = True
        self._search_path = schema is None
        self._rewrite = None if schema is None else _qualified(schema)
        self.url = url
        self._settings.url = url  # what its errors name: the pool or engine, not "postgresql://"

    def _limits(self, deadline: float | None) -> tuple[float, float]:
        """(seconds the pool wait may take, monotonic end of the call) for a call starting now."""
        limit = self.deadline if deadline is None else deadline
        return self._settings.pool_wait(limit), monotonic() + limit

    def _probe_failed(self, exc: psycopg.Error) -> tuple[Any, ...] | None:
        """What a failed start-up probe means: no idempo tables (None), or the error to raise."""
        if isinstance(exc, psycopg.errors.UndefinedTable):
            return None
        raise _startup_failure(self._settings, exc) from exc

    def _opened(self, row: tuple[Any, ...] | None) -> None:
        """Take the probe's schema version row: the store is open."""
        _check_version(self._settings, row)
        self._checked = self._open = True

    def _checked_on_first_use(self, row: tuple[Any, ...] | None) -> None:
        """Take the schema version row a first call read: a misconfiguration there is that call's StoreError."""
        try:
            _check_version(self._settings, row)
        except ConfigurationError as exc:
            raise StoreError(str(exc)) from exc
        self._checked = True

    def _no_schema(self, exc: StoreError) -> Exception:
        """What check_schema raises for a failed read: no idempo tables is a ConfigurationError."""
        if isinstance(exc.__cause__, psycopg.errors.UndefinedTable):
            error = _schema_error(self._settings.url, self.schema, None)
            error.__suppress_context__ = True
            return error
        return exc


class PostgresStore(_PostgresBase[psycopg_pool.ConnectionPool[Any]]):
    """A store in PostgreSQL, for blocking code (WSGI, Django, sync functions).

    Building it does no I/O: :meth:`open` (the blocking fronts call it when
    built) checks the server and the schema; otherwise the first call does.

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

    def open(self) -> None:
        """Check the server and the schema version now, over a connection of its own.

        Once it succeeded, calling it again does nothing. The blocking fronts
        call it when they are built; without it, the first call checks the schema.

        Raises:
            ConfigurationError: the server refuses the configuration (a wrong
                password or role, a missing database, an unknown host), or
                the schema is missing or older than :data:`SCHEMA_VERSION`
                (run ``idempo migrate``).
            StoreUnavailable: the server cannot be reached.
            StoreError: the store was closed.
        """
        if not self._open:
            self._opened(self._probe())

    def _probe(self) -> tuple[Any, ...] | None:
        """Connect once, directly (no pool left retrying after a failed start-up), and read the schema version."""
        if self._closed:
            raise closed(self.url)
        settings = self._settings
        if self._app_pool:
            assert self._pool is not None
            try:
                with self._pool.connection(timeout=settings.deadline) as conn, conn.transaction():
                    return _run_steps(conn, _schema_version(), self._rewrite)
            except psycopg_pool.PoolClosed as exc:
                raise ConfigurationError(f"{self.url}: the application's pool is not open ({exc})") from exc
            except psycopg.Error as exc:
                return self._probe_failed(exc)
        try:
            with _BoundedConnection.connect(settings.conninfo, **settings.probe_arguments()) as conn:
                conn.deadline = monotonic() + settings.deadline
                return _run_steps(conn, _schema_version())
        except psycopg.Error as exc:
            return self._probe_failed(exc)

    def _get_pool(self) -> psycopg_pool.ConnectionPool[_BoundedConnection]:
        # Made on first use: a store that fails its start-up check (or a
        # command's) leaves no pool retrying and logging in the background.
        with _POOL_LOCK:
            if self._closed:
                raise closed(self.url)
            if self._pool is None:
                pool = psycopg_pool.ConnectionPool(**self._settings.pool_arguments(blocking=True))
                pool.open(wait=False)
                self._pool = pool
            return self._pool

    @contextmanager
    def _connection(self, deadline: float | None = None) -> Iterator[_BoundedConnection]:
        """A pooled connection whose waits end ``deadline`` seconds (default: the store's) from now."""
        wait, ends = self._limits(deadline)
        pool = self._pool or self._get_pool()
        try:
            with _PG_ERRORS:
                try:
                    conn = _idle_getconn(pool, wait) if self._app_pool else pool.getconn(timeout=wait)
                except psycopg_pool.PoolTimeout as exc:
                    raise _no_connection(self._settings, exc) from exc
                conn.deadline = ends
                try:
                    if self._app_pool:
                        # The app's connection, switched to autocommit for the call (a
                        # client-side flag, no round trip): each statement commits on its
                        # own, one round trip, as on the store's own connections.
                        with _autocommit(conn):
                            if not self._checked:
                                self._check_on(conn)
                            yield conn
                    else:
                        if not self._checked:
                            self._check_on(conn)
                        yield conn
                except psycopg.OperationalError:
                    conn.close()  # mid-statement or broken: never reused
                    raise
                finally:
                    conn.deadline = None
                    pool.putconn(conn)
        except StoreError as exc:
            if _broken(exc):
                # A killed backend or restarted server leaves every idle
                # connection dead; checking them now makes the next request use
                # a fresh one. Not after a timeout: the checks would wait too.
                with contextlib.suppress(Exception):  # best effort: the pool reconnects anyway
                    pool.check()
            raise

    def _check_on(self, conn: _BoundedConnection) -> None:
        """The schema check open() did not make, on the first call's connection, within its deadline."""
        try:
            row = _run_steps(conn, _schema_version(), self._rewrite)
        except psycopg.errors.UndefinedTable:
            row = None  # no idempo tables
        self._checked_on_first_use(row)

    def _run(self, steps: _Steps[_RV]) -> _RV:
        """Run one call's statements on a pooled connection."""
        with self._connection() as conn:
            return _run_steps(conn, steps, self._rewrite)

    def check_schema(self) -> int:
        """Return the schema version found.

        Raises:
            ConfigurationError: the schema is missing or older than :data:`SCHEMA_VERSION`.
            StoreUnavailable: the database cannot be reached.
        """
        try:
            row = self._run(_schema_version())
        except StoreError as exc:
            raise self._no_schema(exc) from exc
        return _check_version(self._settings, row)

    def create_schema(self) -> list[int]:
        """Create the schema, or upgrade it to :data:`SCHEMA_VERSION`; return the versions applied.

        Runs in one transaction under an advisory lock, so concurrent calls
        are safe and a failure leaves the database as it was. Maintenance: it
        may take up to 300 s, not the store's deadline.

        Raises:
            ConfigurationError: the server refuses the configuration (checked first,
                over a connection of its own, within the deadline).
            StoreError: the database refused (e.g. no CREATE privilege).
            StoreUnavailable: the database cannot be reached.
        """
        self._probe()
        self._checked = True  # nothing to check before the schema exists
        with self._connection(_MAINTENANCE_DEADLINE) as conn, conn.transaction():
            return _run_steps(conn, _create_schema(self.schema, self._app_pool, self._search_path))

    def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        return self._run(_begin(record_key, fingerprint, lease_ttl_ms))

    def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        self._run(_complete(record_key, token, response, record_ttl_ms))

    def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        self._run(_fenced("release", {"record_key": record_key, "token": token}))

    def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        self._run(_fenced("extend", {"record_key": record_key, "token": token, "lease_ttl_ms": int(lease_ttl_ms)}))

    def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        return self._run(_get(record_key))

    def purge_expired(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records, oldest first; return how many.

        One bounded batch per call: call again while it returns ``limit``.
        """
        return self._run(_purge_expired(limit))

    def stats(self) -> StoreStats:
        """See :meth:`idempo.typing.SupportsStats.stats` (one scan of the table, one transaction).

        Maintenance: it may take up to 300 s, not the store's deadline.
        """
        with self._connection(_MAINTENANCE_DEADLINE) as conn, conn.transaction():
            return _run_steps(conn, _stats(), self._rewrite)

    def settle_on(self, connection: psycopg.Connection[Any], command: Complete | Release) -> None:
        """Run the record's ``complete`` or ``release`` on a connection the caller holds, in its transaction.

        For a front that drives the application's own database connection
        (idempo.django: Django's connection inside ``transaction.atomic()``),
        so that the record's completion is the last statement of that
        transaction (DESIGN "transactional route"). The statement names the
        store's schema and runs on a server-binding cursor of its own, so the
        connection's ``search_path`` and cursor factory do not matter.

        Args:
            connection: a psycopg connection to the store's database.
            command: the settling command (``Complete`` or ``Release``), fenced by its lease token.

        Raises:
            LeaseLost: the token no longer holds the record (0 rows).
            psycopg.Error: as the statement raised it (not mapped: the caller's transaction decides).
        """
        with psycopg.Cursor(connection) as cursor:
            _run_steps(cursor, _settle_steps(command), self._foreign_rewrite())

    def close(self) -> None:
        """Close the connection pool; any later call raises StoreError. Calling it again does nothing."""
        with _POOL_LOCK:
            self._closed, self._open = True, False
            pool, self._pool = self._pool, None
        if pool is not None and not self._app_pool:
            pool.close()


class AsyncPostgresStore(_PostgresBase[psycopg_pool.AsyncConnectionPool[Any]]):
    """A store in PostgreSQL, for asyncio (ASGI, async functions).

    Building it does no I/O: ``await store.open()`` (the ASGI middleware
    calls it at lifespan start-up) checks the server and the schema;
    otherwise the first call does.

    It takes the arguments of :class:`PostgresStore`.

    Raises:
        ConfigurationError: a malformed URL, schema name or deadline.
    """

    async def open(self) -> None:
        """See :meth:`PostgresStore.open`."""
        if not self._open:
            self._opened(await self._probe())

    async def _probe(self) -> tuple[Any, ...] | None:
        """See :meth:`PostgresStore._probe`."""
        if self._closed:
            raise closed(self.url)
        settings = self._settings
        if self._app_pool:
            assert self._pool is not None
            try:
                async with self._pool.connection(timeout=settings.deadline) as pooled, pooled.transaction():
                    return await _arun_steps(pooled, _schema_version(), self._rewrite)
            except psycopg_pool.PoolClosed as exc:
                raise ConfigurationError(f"{self.url}: the application's pool is not open ({exc})") from exc
            except psycopg.Error as exc:
                return self._probe_failed(exc)
        try:
            conn = await _AsyncBoundedConnection.connect(settings.conninfo, **settings.probe_arguments())
            async with conn:
                conn.deadline = monotonic() + settings.deadline
                return await _arun_steps(conn, _schema_version())
        except psycopg.Error as exc:
            return self._probe_failed(exc)

    async def _get_pool(self) -> psycopg_pool.AsyncConnectionPool[_AsyncBoundedConnection]:
        # Made on first use, on the running event loop (the pool binds to it).
        if self._closed:
            raise closed(self.url)
        if self._pool is None:
            pool = psycopg_pool.AsyncConnectionPool(**self._settings.pool_arguments(blocking=False))
            self._pool = pool
            await pool.open(wait=False)
        return self._pool

    @asynccontextmanager
    async def _connection(self, deadline: float | None = None) -> AsyncIterator[_AsyncBoundedConnection]:
        """See :meth:`PostgresStore._connection`."""
        wait, ends = self._limits(deadline)
        pool = self._pool or await self._get_pool()
        try:
            with _PG_ERRORS:
                try:
                    conn = await _aidle_getconn(pool, wait) if self._app_pool else await pool.getconn(timeout=wait)
                except psycopg_pool.PoolTimeout as exc:
                    raise _no_connection(self._settings, exc) from exc
                conn.deadline = ends
                try:
                    if self._app_pool:
                        async with _aautocommit(conn):  # see PostgresStore._connection
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
            if _broken(exc):
                with contextlib.suppress(Exception):  # see PostgresStore._connection
                    await pool.check()
            raise

    async def _check_on(self, conn: _AsyncBoundedConnection) -> None:
        """See :meth:`PostgresStore._check_on`."""
        try:
            row = await _arun_steps(conn, _schema_version(), self._rewrite)
        except psycopg.errors.UndefinedTable:
            row = None
        self._checked_on_first_use(row)

    async def _run(self, steps: _Steps[_RV]) -> _RV:
        """See :meth:`PostgresStore._run`."""
        async with self._connection() as conn:
            return await _arun_steps(conn, steps, self._rewrite)

    async def check_schema(self) -> int:
        """See :meth:`PostgresStore.check_schema`."""
        try:
            row = await self._run(_schema_version())
        except StoreError as exc:
            raise self._no_schema(exc) from exc
        return _check_version(self._settings, row)

    async def create_schema(self) -> list[int]:
        """See :meth:`PostgresStore.create_schema`."""
        await self._probe()
        self._checked = True  # nothing to check before the schema exists
        async with self._connection(_MAINTENANCE_DEADLINE) as conn, conn.transaction():
            return await _arun_steps(conn, _create_schema(self.schema, self._app_pool, self._search_path))

    async def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        return await self._run(_begin(record_key, fingerprint, lease_ttl_ms))

    async def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        await self._run(_complete(record_key, token, response, record_ttl_ms))

    async def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        await self._run(_fenced("release", {"record_key": record_key, "token": token}))

    async def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        params = {"record_key": record_key, "token": token, "lease_ttl_ms": int(lease_ttl_ms)}
        await self._run(_fenced("extend", params))

    async def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        return await self._run(_get(record_key))

    async def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`PostgresStore.purge_expired`."""
        return await self._run(_purge_expired(limit))

    async def stats(self) -> StoreStats:
        """See :meth:`PostgresStore.stats`."""
        async with self._connection(_MAINTENANCE_DEADLINE) as conn, conn.transaction():
            return await _arun_steps(conn, _stats(), self._rewrite)

    async def settle_on(self, connection: psycopg.AsyncConnection[Any], command: Complete | Release) -> None:
        """See :meth:`PostgresStore.settle_on` (an ``AsyncConnection``)."""
        async with psycopg.AsyncCursor(connection) as cursor:
            await _arun_steps(cursor, _settle_steps(command), self._foreign_rewrite())

    async def aclose(self) -> None:
        """See :meth:`PostgresStore.close`."""
        self._closed, self._open = True, False
        pool, self._pool = self._pool, None
        if pool is not None and not self._app_pool:
            await pool.close()


# --- transactional mode: driving the application's own connections -----------------------

# SQLSTATEs of a transaction the server aborted to resolve a conflict; running it
# again is safe: serialization_failure, deadlock_detected, lock_not_available.
_CONFLICTS = frozenset({"40001", "40P01", "55P03"})
# The server going away: admin_shutdown, crash_shutdown, cannot_connect_now.
_GONE = frozenset({"57P01", "57P02", "57P03"})


def _kind(exc: BaseException) -> str:
    """A failure's kind for :mod:`idempo._engine.transaction`: conflict, lost (the connection) or failed."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate in _CONFLICTS:
        return "conflict"
    if isinstance(exc, psycopg.InterfaceError) or sqlstate in _GONE or (sqlstate or "").startswith("08"):
        return "lost"
    if isinstance(exc, psycopg.OperationalError) and sqlstate is None:
        return "lost"  # libpq's own: the server closed the connection, the socket failed
    if isinstance(exc, StoreError):
        return "lost" if isinstance(exc, StoreUnavailable) else "failed"
    return "failed"


def _settle_steps(command: Any) -> _Steps[None]:
    """The statement of a settling command (a complete or a release) as the store runs it."""
    if hasattr(command, "response"):
        return _complete(command.record_key, command.token, command.response, command.record_ttl_ms)
    return _fenced("release", {"record_key": command.record_key, "token": command.token})


def _complete_last(command: Any, rewrite: _Rewrite | None) -> tuple[Any, dict[str, Any]]:
    """The ``complete_last`` statement of a Complete command, and its parameters."""
    query = _Q["complete_last"]
    params = {
        "record_key": command.record_key,
        "token": command.token,
        "record_ttl_ms": int(command.record_ttl_ms),
        "status": command.response.status,
        "headers": encode_headers(command.response.headers),
        "body": command.response.body,
    }
    return (query if rewrite is None else rewrite.get(query, query)), params


class _PgHandle(NamedTuple):
    """One transactional execution's connection, its psycopg transaction, and the connection's own
    cursor factory (the guard's stands in for it while the handler runs)."""

    conn: Any
    tx: Any
    factory: Any


class _PgHandles:
    """What both transactors answer without I/O: the handler's connection, no session, the error kinds."""

    def connection(self, h: _PgHandle) -> Any:
        return h.conn

    def session(self, h: _PgHandle) -> Any:
        return None

    def fault_connection(self, h: _PgHandle) -> Any:
        return h.conn

    def kind(self, exc: BaseException) -> str:
        return _kind(exc)


def _pool_of(store: _PostgresBase[_Pool]) -> _Pool:
    """The app's pool a transaction checks its connection out of (StoreError once the store is closed)."""
    if store._pool is None:
        raise closed(store.url)
    return store._pool


@contextmanager
def _checkout_errors(deadline: float) -> Iterator[None]:
    """A transaction's connection not checked out of the app's pool: StoreUnavailable."""
    try:
        yield
    except psycopg_pool.PoolTimeout as exc:
        raise StoreUnavailable(f"no connection of the application's pool within {deadline:g} s") from exc
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc


# The savepoint idempo makes right after BEGIN: it exists only inside idempo's own transaction, so
# RELEASE or ROLLBACK TO it fails once the handler ended that transaction (a COMMIT or ROLLBACK of its
# own), even when a new transaction has begun since (further statements, autocommit off).
_MARK = "idempo_transaction"
_RELEASE_MARK = b"RELEASE SAVEPOINT idempo_transaction"
_ROLLBACK_TO_MARK = b"ROLLBACK TO SAVEPOINT idempo_transaction"
# 3B001 (the savepoint does not exist) and 25P01 (no transaction in progress).
_NO_MARK = (psycopg.errors.InvalidSavepointSpecification, psycopg.errors.NoActiveSqlTransaction)


def _ended_without_io(h: _PgHandle) -> str | None:
    """Why idempo's transaction is visibly over (the connection idle, the psycopg transaction exited), or None."""
    if h.conn.broken or h.conn.closed:
        return None  # lost, not ended: the commit path decides
    if h.tx.status != psycopg.Transaction.Status.ACTIVE:
        return "its psycopg transaction block was exited"
    if h.conn.info.transaction_status == _IDLE:
        return "a COMMIT or ROLLBACK ran through tx.connection; the connection is in no transaction"
    return None


def _mark_missing(exc: psycopg.Error) -> str:
    return f"a COMMIT or ROLLBACK ran through tx.connection ({type(exc).__name__} on idempo's savepoint)"


def _begin_failed(exc: psycopg.Error) -> StoreUnavailable:
    return StoreUnavailable(f"BEGIN failed: {type(exc).__name__}: {exc}")


class _PgTransactor(_PgHandles):
    """Drives transactional executions on the application's pool (see idempo._engine.transaction.Transactor).

    The handler gets the connection inside a ``psycopg.Transaction``: psycopg
    refuses an explicit ``commit()`` there, and its nested ``transaction()``
    blocks are savepoints.
    """

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    def open(self) -> _PgHandle:
        store = self._store
        pool = _pool_of(store)
        with _checkout_errors(store.deadline):
            conn = _idle_getconn(pool, store.deadline)
        try:
            tx = psycopg.Transaction(conn, savepoint_name=_MARK)
            with conn.pipeline():  # BEGIN and the marking savepoint: one round trip
                tx.__enter__()
        except psycopg.Error as exc:
            pool.putconn(conn)
            raise _begin_failed(exc) from exc
        return _PgHandle(conn, tx, guard(conn))

    def ended(self, h: _PgHandle, committing: bool) -> str | None:
        """Why idempo's transaction is no longer open (see :func:`_ended_without_io`), or None.

        Then the marking savepoint is released (committing) or rolled back to
        (a release or hold follows): that fails when the transaction open is
        not idempo's (the handler ended it and a new one began). A statement the
        guard refused counts as ended.
        """
        refused = unguard(h.conn, h.factory)
        if refused is not None:
            return refused
        why = _ended_without_io(h)
        if why is not None:
            return why
        try:
            # Committing: RELEASE (the completion and COMMIT follow); otherwise ROLLBACK TO (a
            # release or hold follows). Its own round trip: inside the commit pipeline a failure
            # can surface as PipelineAborted, which does not say which statement failed.
            h.conn.execute(_RELEASE_MARK if committing else _ROLLBACK_TO_MARK)
        except _NO_MARK as exc:
            return _mark_missing(exc)
        except psycopg.Error:
            if h.conn.broken or h.conn.closed:
                raise
            # Another failure (the transaction aborted by the handler's own failed statement,
            # 25P02): still idempo's; the commit path meets the same failure and decides.
            return None
        return None

    def run(self, h: _PgHandle, command: Any, *, in_transaction: bool) -> None:
        unguard(h.conn, h.factory)
        if in_transaction:
            _run_steps(h.conn, _settle_steps(command), self._store._rewrite)
        else:
            with h.conn.transaction():
                _run_steps(h.conn, _settle_steps(command), self._store._rewrite)

    def commit(self, h: _PgHandle) -> None:
        unguard(h.conn, h.factory)
        h.tx.__exit__(None, None, None)

    def finish(self, h: _PgHandle, command: Any) -> None:
        """The record's completion and COMMIT in one pipeline: one round trip (see ``complete_last``)."""
        unguard(h.conn, h.factory)
        query, params = _complete_last(command, self._store._rewrite)
        try:
            with h.conn.pipeline():
                h.conn.execute(query, params)
                h.tx.__exit__(None, None, None)
        except psycopg.errors.DivisionByZero as exc:
            raise LeaseLost() from exc

    def rollback(self, h: _PgHandle) -> None:
        unguard(h.conn, h.factory)
        if h.tx.status == psycopg.Transaction.Status.ACTIVE:
            rollback = psycopg.Rollback(h.tx)
            h.tx.__exit__(psycopg.Rollback, rollback, None)  # errors are logged by psycopg, not raised
        elif h.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            h.conn.rollback()
        if h.conn.broken or h.conn.closed:
            raise psycopg.OperationalError("the connection broke during ROLLBACK")

    def close(self, h: _PgHandle, *, broken: bool) -> None:
        pool = self._store._pool
        try:
            unguard(h.conn, h.factory)  # the pool's next borrower gets the connection as the app made it
            if broken or h.conn.broken:
                h.conn.close()
            if pool is not None:
                pool.putconn(h.conn)  # a transaction left open is rolled back by the pool
            else:
                h.conn.close()
        except Exception:
            logger.exception("idempo: giving back a transaction's connection failed")

    def resolve(self, record_key: str) -> Record | None:
        return self._store.get(record_key)


class _AsyncPgTransactor(_PgHandles):
    """The async twin of :class:`_PgTransactor` (see idempo._engine.transaction.AsyncTransactor)."""

    def __init__(self, store: AsyncPostgresStore) -> None:
        self._store = store

    async def open(self) -> _PgHandle:
        store = self._store
        pool = _pool_of(store)
        with _checkout_errors(store.deadline):
            conn = await _aidle_getconn(pool, store.deadline)
        try:
            tx = psycopg.AsyncTransaction(conn, savepoint_name=_MARK)
            async with conn.pipeline():  # see _PgTransactor.open
                await tx.__aenter__()
        except psycopg.Error as exc:
            await pool.putconn(conn)
            raise _begin_failed(exc) from exc
        return _PgHandle(conn, tx, guard(conn))

    async def ended(self, h: _PgHandle, committing: bool) -> str | None:
        """See :meth:`_PgTransactor.ended`."""
        refused = unguard(h.conn, h.factory)
        if refused is not None:
            return refused
        why = _ended_without_io(h)
        if why is not None:
            return why
        try:
            # Committing: RELEASE (the completion and COMMIT follow); otherwise ROLLBACK TO (a
            # release or hold follows). Its own round trip: inside the commit pipeline a failure
            # can surface as PipelineAborted, which does not say which statement failed.
            await h.conn.execute(_RELEASE_MARK if committing else _ROLLBACK_TO_MARK)
        except _NO_MARK as exc:
            return _mark_missing(exc)
        except psycopg.Error:
            if h.conn.broken or h.conn.closed:
                raise
            # Another failure (the transaction aborted by the handler's own failed statement,
            # 25P02): still idempo's; the commit path meets the same failure and decides.
            return None
        return None

    async def run(self, h: _PgHandle, command: Any, *, in_transaction: bool) -> None:
        unguard(h.conn, h.factory)
        if in_transaction:
            await _arun_steps(h.conn, _settle_steps(command), self._store._rewrite)
        else:
            async with h.conn.transaction():
                await _arun_steps(h.conn, _settle_steps(command), self._store._rewrite)

    async def commit(self, h: _PgHandle) -> None:
        unguard(h.conn, h.factory)
        await h.tx.__aexit__(None, None, None)

    async def finish(self, h: _PgHandle, command: Any) -> None:
        """See :meth:`_PgTransactor.finish`."""
        unguard(h.conn, h.factory)
        query, params = _complete_last(command, self._store._rewrite)
        try:
            async with h.conn.pipeline():
                await h.conn.execute(query, params)
                await h.tx.__aexit__(None, None, None)
        except psycopg.errors.DivisionByZero as exc:
            raise LeaseLost() from exc

    async def rollback(self, h: _PgHandle) -> None:
        unguard(h.conn, h.factory)
        if h.tx.status == psycopg.AsyncTransaction.Status.ACTIVE:
            rollback = psycopg.Rollback(h.tx)
            await h.tx.__aexit__(psycopg.Rollback, rollback, None)
        elif h.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            await h.conn.rollback()
        if h.conn.broken or h.conn.closed:
            raise psycopg.OperationalError("the connection broke during ROLLBACK")

    async def close(self, h: _PgHandle, *, broken: bool) -> None:
        pool = self._store._pool
        try:
            unguard(h.conn, h.factory)  # see _PgTransactor.close
            if broken or h.conn.broken:
                await h.conn.close()
            if pool is not None:
                await pool.putconn(h.conn)
            else:
                await h.conn.close()
        except Exception:
            logger.exception("idempo: giving back a transaction's connection failed")

    async def resolve(self, record_key: str) -> Record | None:
        return await self._store.get(record_key)


# --- SQLAlchemy engines (extra idempo[sqlalchemy]) ----------------------------------------


def _undefined_table(exc: BaseException) -> bool:
    """Whether a failed call's cause (psycopg's or SQLAlchemy's) is a missing table (SQLSTATE 42P01)."""
    cause = exc.__cause__
    return getattr(getattr(cause, "orig", cause), "sqlstate", None) == "42P01" or isinstance(
        cause, psycopg.errors.UndefinedTable
    )


class _EnginePostgresStore(PostgresStore):
    """A :class:`PostgresStore` on the application's SQLAlchemy ``Engine`` (see :meth:`PostgresStore.from_engine`)."""

    def open(self) -> None:
        """See :meth:`PostgresStore.open` (over a connection of the engine)."""
        if self._open:
            return
        try:
            row = self._run(_schema_version(), check=False)
        except StoreError as exc:
            if not _undefined_table(exc):
                raise
            row = None
        self._opened(row)

    def check_schema(self) -> int:
        """See :meth:`PostgresStore.check_schema`."""
        self._open = False
        self.open()
        return SCHEMA_VERSION

    def _run(self, steps: _Steps[_RV], check: bool = True) -> _RV:
        """Run one call's statements on a connection of the engine, in autocommit mode."""
        from . import _sqlalchemy

        if self._closed:
            raise closed(self.url)
        if check and not self._checked:
            self.open()
        with _sqlalchemy.sa_errors(), self._engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            result: _RV = _sqlalchemy.run_steps(conn, steps, self._rewrite)
            return result

    def create_schema(self) -> list[int]:
        """Not on an engine: create idempo's tables with ``idempo migrate`` (or a URL-built store's create_schema).

        Raises:
            ConfigurationError: always.
        """
        raise ConfigurationError(
            "a store built by from_engine does not create its schema: run `idempo migrate --store postgresql://...`"
        )

    def stats(self) -> StoreStats:
        """See :meth:`PostgresStore.stats`."""
        from . import _sqlalchemy

        with _sqlalchemy.sa_errors(), self._engine.connect() as conn, conn.begin():
            result: StoreStats = _sqlalchemy.run_steps(conn, _stats(), self._rewrite)
            return result

    def close(self) -> None:
        """Any later call raises StoreError; the engine is the application's (not disposed)."""
        self._closed, self._open = True, False


class _AsyncEnginePostgresStore(AsyncPostgresStore):
    """An :class:`AsyncPostgresStore` on the application's ``AsyncEngine`` (asyncpg or psycopg)."""

    async def open(self) -> None:
        """See :meth:`PostgresStore.open`."""
        if self._open:
            return
        try:
            row = await self._run(_schema_version(), check=False)
        except StoreError as exc:
            if not _undefined_table(exc):
                raise
            row = None
        self._opened(row)

    async def check_schema(self) -> int:
        """See :meth:`PostgresStore.check_schema`."""
        self._open = False
        await self.open()
        return SCHEMA_VERSION

    async def _run(self, steps: _Steps[_RV], check: bool = True) -> _RV:
        """See :meth:`_EnginePostgresStore._run`."""
        from . import _sqlalchemy

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
        """See :meth:`_EnginePostgresStore.create_schema`."""
        raise ConfigurationError(
            "a store built by from_engine does not create its schema: run `idempo migrate --store postgresql://...`"
        )

    async def stats(self) -> StoreStats:
        """See :meth:`PostgresStore.stats`."""
        from . import _sqlalchemy

        with _sqlalchemy.sa_errors():
            async with self._engine.connect() as conn, conn.begin():
                result: StoreStats = await _sqlalchemy.arun_steps(conn, _stats(), self._rewrite)
                return result

    async def aclose(self) -> None:
        """See :meth:`_EnginePostgresStore.close`."""
        self._closed, self._open = True, False


# What from_pool and from_engine build for each twin (these classes are defined after the stores).
PostgresStore._transactor_type = _PgTransactor
PostgresStore._engine_type = _EnginePostgresStore
PostgresStore._engine_transactor = "EngineTransactor"
PostgresStore._pool_type = psycopg_pool.ConnectionPool
AsyncPostgresStore._transactor_type = _AsyncPgTransactor
AsyncPostgresStore._engine_type = _AsyncEnginePostgresStore
AsyncPostgresStore._engine_transactor = "AsyncEngineTransactor"
AsyncPostgresStore._pool_type = psycopg_pool.AsyncConnectionPool
