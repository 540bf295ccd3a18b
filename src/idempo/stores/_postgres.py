"""What the PostgreSQL store twins share, without I/O: settings, statements, checks, the constructors.

:class:`~idempo.stores.postgres.PostgresStore` and
:class:`~idempo.stores.postgres.AsyncPostgresStore` are written once, async,
in ``stores/_async/postgres.py``; the blocking one is generated from it
(``stores/_sync/postgres.py``, ``scripts/unasync``). What they run is here,
once: the constructor's settings resolved against the URL (:class:`Settings`),
each call's statements as a generator (:func:`begin_steps`, ...; sans-I/O: it
yields a :class:`Statement`, receives its :class:`Rows`), the start-up and
schema checks, the error mapping, the constructors on the application's pool
or engine (:class:`PostgresBase`), and what the transactors answer without
I/O (:class:`PgHandles`).
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from time import monotonic
from typing import Any, ClassVar, Generic, LiteralString, NamedTuple, Self, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg_pool
from psycopg import sql

from .._core.records import Acquired, BeginResult, Existing, Record, StoreStats, StoredResponse, encode_headers
from ..exceptions import ConfigurationError, LeaseLost, StoreError, StoreUnavailable, TransactionControlled
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
from .sql.postgres import SCHEMA_VERSION, migrations

__all__ = [
    "IDLE",
    "MAINTENANCE_DEADLINE",
    "MARK",
    "NO_MARK",
    "PG_ERRORS",
    "RELEASE_MARK",
    "ROLLBACK_TO_MARK",
    "AsyncPoolLock",
    "PgHandle",
    "PgHandles",
    "PoolLock",
    "PostgresBase",
    "Rewrite",
    "Rows",
    "Settings",
    "Statement",
    "Steps",
    "begin_failed",
    "begin_steps",
    "bounded",
    "broken",
    "check_version",
    "checkout_errors",
    "complete_last",
    "complete_steps",
    "create_schema_steps",
    "discarding",
    "ended_without_io",
    "fenced_steps",
    "finish_failed",
    "first_error",
    "get_steps",
    "mark_missing",
    "no_connection",
    "pool_of",
    "purge_steps",
    "schema_version_steps",
    "settle_steps",
    "stats_steps",
    "undefined_table",
]

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
MAINTENANCE_DEADLINE = 300.0
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
PG_ERRORS = map_errors((psycopg.OperationalError,), (psycopg.Error,))
#: The lock a store's pool is made and closed under (rare: once per store), one per store: the
#: blocking twin's guards it from other threads, the async twin's from other tasks (the async
#: pool opens on the event loop). scripts/unasync turns the one name into the other.
PoolLock = threading.Lock
AsyncPoolLock = asyncio.Lock


class Settings:
    """Constructor arguments resolved against the URL; shared by both twins."""

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

    def pool_arguments(self, connection_class: type[Any]) -> dict[str, Any]:
        """Arguments of the store's pool (psycopg_pool's blocking or async one) of ``connection_class``."""
        return {
            "conninfo": self.conninfo,
            "kwargs": self.kwargs,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "timeout": self.deadline,
            "name": f"idempo-{self.schema}",
            "open": False,
            "connection_class": connection_class,
            # psycopg_pool retries a lost server with a doubling delay (1, 2,
            # 4 ... s) for reconnect_timeout (300 s by default): after a
            # minute's outage the next attempt could be half a minute away.
            # Cut short, the attempt gives up and the next request starts a new
            # one at once, so the store serves again within seconds of its return.
            "reconnect_timeout": _RECONNECT_TIMEOUT,
        }

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


IDLE = psycopg.pq.TransactionStatus.IDLE


def discarding(conn: Any) -> None:
    """Log that a connection of the app's pool came out of it inside a transaction (it is closed, not used)."""
    logger.warning(
        "idempo: a connection of the application's pool was checked out in a transaction (%s), most likely "
        "written through by a reference to tx.connection kept past its handler; it is closed (the server "
        "rolls that transaction back) and another one is used",
        conn.info.transaction_status.name,
    )


def bounded(deadline: float | None, idle_bound: float, timeout: float | None) -> float:
    """Seconds a wait for the server may take: what is left of the call (``deadline``, monotonic; None:
    ``idle_bound``, outside a call), at most psycopg's own ``timeout``."""
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


def check_version(settings: Settings, row: tuple[Any, ...] | None) -> int:
    """The schema version a ``schema_version`` row holds; ConfigurationError when missing or too old."""
    found = row[0] if row else None
    if found is None or found < SCHEMA_VERSION:
        raise _schema_error(settings.url, settings.schema, found)
    return int(found)


def _startup_failure(settings: Settings, exc: psycopg.Error) -> Exception:
    """What a failed start-up check raises: the misconfiguration it shows, or StoreUnavailable, or StoreError."""
    named = settings.check_startup(exc)
    if named is not None:
        return named
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return _schema_error(settings.url, settings.schema, None)
    if isinstance(exc, psycopg.OperationalError):
        return StoreUnavailable(f"{type(exc).__name__}: {exc}")
    return StoreError(f"{type(exc).__name__}: {exc}")


def no_connection(settings: Settings, exc: psycopg_pool.PoolTimeout) -> StoreUnavailable:
    """The error of a call that got no pooled connection: the server's refusal when that is why."""
    if settings.refused is not None:
        return StoreUnavailable(f"the server refuses connections: {settings.refused}")
    return StoreUnavailable(f"PoolTimeout: no connection within the {settings.deadline:g} s deadline ({exc})")


def broken(exc: StoreError) -> bool:
    """Whether a call failed on a broken connection, rather than by waiting (pool or server) or in SQL."""
    cause = exc.__cause__
    if not isinstance(cause, psycopg.OperationalError):
        return False
    return not (isinstance(cause, psycopg_pool.PoolTimeout) or type(cause).__name__ == "_WaitTimeout")


# --- the statements of each call, written once ----------------------------------------------
#
# Each call is a generator of the statements it runs (sans-I/O): it yields a
# Statement, receives its Rows, and returns the call's result or raises
# (LeaseLost, StoreError). The store twins' ``_run_steps`` (stores/_async/postgres.py
# and its generated blocking twin) drives one on a psycopg connection: the only
# I/O, on whatever connection it is given (the store's pool, or a connection of
# the application's own). Every statement's text comes from ``queries.sql``.


class Statement(NamedTuple):
    """One statement to execute: text, parameters, binary results, prepare (None: psycopg's threshold)."""

    query: LiteralString | sql.Composed
    params: dict[str, Any] | None = None
    binary: bool = False
    prepare: bool | None = None


class Rows(NamedTuple):
    """What a statement gave back: the affected row count and the first row (None: no row)."""

    rowcount: int
    row: tuple[Any, ...] | None


Steps = Generator[Statement, Rows, _RV]
#: Statement text -> the text to run instead (see :func:`_qualified`).
Rewrite = dict[Any, Any]


def _qualified(schema: str) -> Rewrite:
    """Every query of ``queries.sql`` with idempo's tables qualified by ``schema``.

    The store's own connections set ``search_path``; a connection of the
    application's pool keeps the application's, so its statements name the
    schema instead (no extra round trip, and the handler's own search_path is untouched).
    """
    quoted = sql.Identifier(schema).as_string()
    table = re.compile(r"\b(idempo_records|idempo_schema_version)\b")
    return {text: table.sub(lambda m: f"{quoted}.{m.group(1)}", text) for text in _Q.values()}


def begin_steps(record_key: str, fingerprint: str, lease_ttl_ms: int) -> Steps[BeginResult]:
    params = {"record_key": record_key, "fingerprint": fingerprint, "lease_ttl_ms": int(lease_ttl_ms)}
    for _ in range(_BEGIN_ATTEMPTS):
        row = (yield Statement(_Q["begin"], params, binary=True)).row
        if row is not None:
            acquired, now_ms, token, takeover, *record = row
            if acquired:
                return Acquired(token, takeover=takeover)
            return Existing(record_from_row(record_key, tuple(record)), now_ms)
    raise StoreError(f"begin could not take or read record {record_key} after {_BEGIN_ATTEMPTS} attempts")


def fenced_steps(name: LiteralString, params: dict[str, Any]) -> Steps[None]:
    """complete, release or extend: one statement that changes one row if the token holds it."""
    if (yield Statement(_Q[name], params)).rowcount != 1:
        raise LeaseLost()


def complete_steps(record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> Steps[None]:
    return fenced_steps(
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


def get_steps(record_key: str) -> Steps[Record | None]:
    row = (yield Statement(_Q["get"], {"record_key": record_key}, binary=True)).row
    return None if row is None else record_from_row(record_key, row)


def purge_steps(limit: int) -> Steps[int]:
    params = {"limit": int(limit), "grace_ms": int(IN_PROGRESS_GRACE * 1000)}
    return (yield Statement(_Q["purge_expired"], params)).rowcount


def _maintenance() -> Statement:
    # A whole-table statement may outlast a request's deadline on the server too.
    return Statement(f"SET LOCAL statement_timeout = {int(MAINTENANCE_DEADLINE * 1000)}", prepare=False)


def stats_steps() -> Steps[StoreStats]:
    """Run in one transaction (one snapshot for both statements)."""
    yield _maintenance()
    counts = (yield Statement(_Q["stats"], prepare=False)).row
    row = (yield Statement(_Q["oldest_lease"], binary=True, prepare=False)).row
    assert counts is not None  # the query always returns one row
    now_ms, in_progress, completed, expired = counts
    oldest = None if row is None else record_from_row(row[0], row[1:])
    return StoreStats(int(now_ms), int(in_progress), int(completed), int(expired), oldest)


def schema_version_steps() -> Steps[tuple[Any, ...] | None]:
    return (yield Statement(_Q["schema_version"], prepare=False)).row


def create_schema_steps(schema: str, set_path: bool = False, search_path: bool = False) -> Steps[list[int]]:
    """Run in one transaction: create the schema, or upgrade it; return the versions applied.

    ``set_path``: on a connection of the application's (whose search_path is
    its own), the schema's DDL runs under ``SET LOCAL search_path``;
    ``search_path``: the tables go where that connection's search_path puts
    them (no schema is created or named).
    """
    yield _maintenance()
    if search_path:
        yield Statement(_Q["migration_lock"], {"schema": ""}, prepare=False)
    else:
        yield Statement(_Q["migration_lock"], {"schema": schema}, prepare=False)
        yield Statement(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)), prepare=False)
    if set_path and not search_path:
        yield Statement(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)), prepare=False)
    row = (yield Statement(_Q["version_table_exists"], prepare=False)).row
    current = None
    if row is not None and row[0]:
        found = yield from schema_version_steps()
        current = found[0] if found is not None and found[0] is not None else 0
    applied: list[int] = []
    for version, text in _plan(current):
        yield Statement(text, prepare=False)
        yield Statement(_Q["record_version"], {"version": version}, prepare=False)
        applied.append(version)
    return applied


def _plan(current: int | None) -> list[tuple[int, LiteralString]]:
    """The SQL to run to reach SCHEMA_VERSION from ``current`` (None: a fresh schema)."""
    if current is None:
        return [(SCHEMA_VERSION, _SCHEMA_SQL)]
    return [(version, text) for version, text in migrations() if version > current]


# --- the stores ---------------------------------------------------------------------------


class PostgresBase(Generic[_Pool]):
    """What the blocking and the async PostgreSQL stores share: the constructor, settings and checks,
    and the constructors on the application's pool or engine."""

    _foreign: Rewrite | None = None
    #: What the twins' from_pool and from_engine differ in (set by each twin, in stores/_async/postgres.py
    #: and its generated twin): the transactor on the app's pool, the store class on an engine.
    _transactor_type: ClassVar[Callable[[Any], Any]]
    _engine_type: ClassVar[type[Any]]
    _pool_type: ClassVar[type[Any]]  # the psycopg_pool class from_pool takes
    #: The lock the store's pool is made and closed under (PoolLock or AsyncPoolLock): one per store.
    _lock_type: ClassVar[type[Any]]
    _engine: Any = None
    _pool: _Pool | None = None

    def _foreign_rewrite(self) -> Rewrite | None:
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
        self._settings = Settings(
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
        self._rewrite: Rewrite | None = None
        #: How a transactional execution drives this database (see
        #: idempo._engine.transaction); None for a store built from a URL.
        self.transactor: Any = None
        self._pool_lock = self._lock_type()

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
            twin = "AsyncPostgresStore" if cls._pool_type is psycopg_pool.ConnectionPool else "PostgresStore"
            raise ConfigurationError(
                f"{cls.__name__}.from_pool takes a psycopg_pool.{cls._pool_type.__name__}, got "
                f"{type(pool).__module__}.{type(pool).__qualname__}; use {twin}.from_pool for that pool"
            )
        store = cls("postgresql://", schema=schema or "public", deadline=deadline, check_schema=check_schema)
        where = "" if schema is None else f"?schema={schema}"
        store._bind(schema, f"postgresql://(pool {getattr(pool, 'name', '?')}){where}")
        store._pool = pool
        store.transactor = cls._transactor_type(store)
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
        if getattr(getattr(engine, "dialect", None), "name", None) != "postgresql":
            raise ConfigurationError(f"{cls.__name__}.from_engine needs a SQLAlchemy engine on PostgreSQL")
        store: Self = cls._engine_type(
            "postgresql://", schema=schema or "public", deadline=deadline, check_schema=check_schema
        )
        store._bind(schema, f"postgresql://(engine {engine.url.render_as_string(hide_password=True)})")
        store._engine = engine
        store.transactor = store._transactor_on(engine)
        return store

    def _transactor_on(self, engine: Any) -> Any:
        """The transactor of a transactional execution on the app's SQLAlchemy ``engine`` (an engine store's)."""
        raise NotImplementedError

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
        check_version(self._settings, row)
        self._checked = self._open = True

    def _checked_on_first_use(self, row: tuple[Any, ...] | None) -> None:
        """Take the schema version row a first call read: a misconfiguration there is that call's StoreError."""
        try:
            check_version(self._settings, row)
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


def settle_steps(command: Any) -> Steps[None]:
    """The statement of a settling command (a complete or a release) as the store runs it."""
    if hasattr(command, "response"):
        return complete_steps(command.record_key, command.token, command.response, command.record_ttl_ms)
    return fenced_steps("release", {"record_key": command.record_key, "token": command.token})


def complete_last(command: Any, rewrite: Rewrite | None) -> tuple[Any, dict[str, Any]]:
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


class PgHandle(NamedTuple):
    """One transactional execution's connection, its psycopg transaction, and the connection's own
    cursor factory (the guard's stands in for it while the handler runs)."""

    conn: Any
    tx: Any
    factory: Any


class PgHandles:
    """What both transactors answer without I/O: the handler's connection, no session, the error kinds."""

    def connection(self, h: PgHandle) -> Any:
        return h.conn

    def session(self, h: PgHandle) -> Any:
        return None

    def fault_connection(self, h: PgHandle) -> Any:
        return h.conn

    def kind(self, exc: BaseException) -> str:
        return _kind(exc)


def pool_of(store: PostgresBase[_Pool]) -> _Pool:
    """The app's pool a transaction checks its connection out of (StoreError once the store is closed)."""
    if store._pool is None:
        raise closed(store.url)
    return store._pool


@contextmanager
def checkout_errors(deadline: float) -> Iterator[None]:
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
MARK = "idempo_transaction"
RELEASE_MARK = b"RELEASE SAVEPOINT idempo_transaction"
ROLLBACK_TO_MARK = b"ROLLBACK TO SAVEPOINT idempo_transaction"
# 3B001 (the savepoint does not exist) and 25P01 (no transaction in progress).
NO_MARK = (psycopg.errors.InvalidSavepointSpecification, psycopg.errors.NoActiveSqlTransaction)


def ended_without_io(h: PgHandle) -> str | None:
    """Why idempo's transaction is visibly over (the connection idle, the psycopg transaction exited), or None."""
    if h.conn.broken or h.conn.closed:
        return None  # lost, not ended: the commit path decides
    if h.tx.status != psycopg.Transaction.Status.ACTIVE:
        return "its psycopg transaction block was exited"
    if h.conn.info.transaction_status == IDLE:
        return "a COMMIT or ROLLBACK ran through tx.connection; the connection is in no transaction"
    return None


def mark_missing(exc: psycopg.Error) -> str:
    return f"a COMMIT or ROLLBACK ran through tx.connection ({type(exc).__name__} on idempo's savepoint)"


def first_error(exc: BaseException) -> BaseException:
    """The statement's error behind a pipeline's PipelineAborted.

    psycopg raises the first failed statement's error of a pipeline; only when
    it surfaced while the pipeline was being synced can the PipelineAborted of
    a statement after it (fetched in the ``finally`` of psycopg's exit) replace
    it, the first one then being its ``__context__``.
    """
    while isinstance(exc, psycopg.errors.PipelineAborted) and exc.__context__ is not None:
        exc = exc.__context__
    return exc


def finish_failed(exc: psycopg.Error) -> None:
    """Raise what a failed commit pipeline (RELEASE, completion, COMMIT) means, when it is more than ``exc``.

    Raises:
        TransactionControlled: the RELEASE found no savepoint (3B001) or no transaction (25P01): the
            handler ended idempo's transaction (no other statement of the pipeline fails so).
        LeaseLost: the completion divided by zero (``complete_last``: the token holds no record).
    """
    first = first_error(exc)
    if isinstance(first, NO_MARK):
        raise TransactionControlled(mark_missing(first)) from exc
    if isinstance(first, psycopg.errors.DivisionByZero):
        raise LeaseLost() from exc


def begin_failed(exc: psycopg.Error) -> StoreUnavailable:
    return StoreUnavailable(f"BEGIN failed: {type(exc).__name__}: {exc}")


# --- SQLAlchemy engines (extra idempo[sqlalchemy]) ----------------------------------------


def undefined_table(exc: BaseException) -> bool:
    """Whether a failed call's cause (psycopg's or SQLAlchemy's) is a missing table (SQLSTATE 42P01)."""
    cause = exc.__cause__
    return getattr(getattr(cause, "orig", cause), "sqlstate", None) == "42P01" or isinstance(
        cause, psycopg.errors.UndefinedTable
    )
