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

Start-up: the store checks the server and the schema once (the blocking
store when built, the async one in :meth:`AsyncPostgresStore.open`) over a
connection of its own, so a misconfiguration is named at once: a wrong
password or role, a missing database or schema, or a host name that does
not resolve raise :class:`~idempo.exceptions.ConfigurationError` (one line,
with the fix). A server that cannot be reached is not a misconfiguration:
the blocking store logs one warning and checks again on first use.

The async store needs asyncio (psycopg's async connections); it does not run on trio.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from time import monotonic
from typing import Any, LiteralString, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.abc import PQGen

from .._core.records import Acquired, BeginResult, Existing, Record, StoreStats, StoredResponse, encode_headers
from ..exceptions import ConfigurationError, LeaseLost, StoreError, StoreUnavailable
from ._base import (
    DEFAULT_DEADLINE,
    ErrorMap,
    deadline_seconds,
    load_queries,
    load_sql,
    map_errors,
    misconfigured,
    record_from_row,
    warn_unreachable_at_startup,
)
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


# OperationalError covers refused/reset/killed connections, an exhausted
# pool (PoolTimeout) and statement timeouts (QueryCanceled).
_PG_ERRORS = map_errors((psycopg.OperationalError,), (psycopg.Error,))


def _pg_errors() -> ErrorMap:
    return _PG_ERRORS


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

    def pool_arguments(self, connection_class: type[Any], configure: Any) -> dict[str, Any]:
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


def _bounded(deadline: float | None, idle_bound: float, timeout: float | None) -> float:
    left = idle_bound if deadline is None else max(deadline - monotonic(), 0.0)
    return left if timeout is None else min(timeout, left)


def _schema_error(url: str, schema: str, found: int | None) -> ConfigurationError:
    if found is None:
        what = f"the database has no idempo tables in schema {schema!r}"
    else:
        what = f"schema {schema!r} holds idempo schema version {found}; this idempo needs {SCHEMA_VERSION}"
    return misconfigured(
        url,
        what,
        "run `idempo migrate --store <the same URL>` (or create_schema()) once, before the application starts",
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


def _timed_out(exc: BaseException) -> bool:
    """Whether a call failed by waiting (pool or server) rather than on a broken connection."""
    return isinstance(exc, psycopg_pool.PoolTimeout) or type(exc).__name__ == "_WaitTimeout"


def _maintenance(conn: Any) -> Any:
    # A whole-table statement may outlast a request's deadline on the server too.
    return conn.execute(f"SET LOCAL statement_timeout = {int(_MAINTENANCE_DEADLINE * 1000)}", prepare=False)


def _begin_params(record_key: str, fingerprint: str, lease_ttl_ms: int) -> dict[str, Any]:
    return {"record_key": record_key, "fingerprint": fingerprint, "lease_ttl_ms": int(lease_ttl_ms)}


def _begin_result(record_key: str, row: tuple[Any, ...]) -> BeginResult:
    acquired, now_ms, token, takeover, *record = row
    if acquired:
        return Acquired(token, takeover=takeover)
    return Existing(record_from_row(record_key, tuple(record)), now_ms)


def _complete_params(record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> dict[str, Any]:
    return {
        "record_key": record_key,
        "token": token,
        "record_ttl_ms": int(record_ttl_ms),
        "status": response.status,
        "headers": encode_headers(response.headers),
        "body": response.body,
    }


def _create_schema_statement(schema: str) -> sql.Composed:
    return sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))


def _plan(current: int | None) -> list[tuple[int, LiteralString]]:
    """The SQL to run to reach SCHEMA_VERSION from ``current`` (None: a fresh schema)."""
    if current is None:
        return [(SCHEMA_VERSION, _SCHEMA_SQL)]
    return [(version, text) for version, text in migrations() if version > current]


class PostgresStore:
    """A store in PostgreSQL, for blocking code (WSGI, Django, sync functions).

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
        check_schema: check the server and the schema version now (default),
            over a connection of its own. Pass False to call
            :meth:`create_schema` first.

    Raises:
        ConfigurationError: a malformed URL, schema name or deadline; with
            ``check_schema``, a server that refuses the configuration (wrong
            password or role, missing database, unknown host) or a schema
            missing or older than :data:`SCHEMA_VERSION` (run ``idempo
            migrate``). An unreachable server is logged (one warning) and
            checked again on first use, where it is StoreUnavailable.
    """

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
        self._pool: psycopg_pool.ConnectionPool[_BoundedConnection] = psycopg_pool.ConnectionPool(
            **self._settings.pool_arguments(self._settings.connection_classes()[0], self._settings._configure)
        )
        # Opened on first use: a store that fails its start-up check (or a
        # command's) leaves no pool retrying and logging in the background.
        self._pool_opened = False
        self._pool_lock = threading.Lock()
        self._checked = not check_schema
        if check_schema:
            try:
                self.open()
            except StoreUnavailable as exc:
                warn_unreachable_at_startup(url, exc)
            except BaseException:
                self.close()
                raise

    def open(self) -> None:
        """Check the server and the schema version now, over a connection of its own.

        The constructor calls it (with ``check_schema``); the first call
        checks the schema when it could not.

        Raises:
            ConfigurationError: the server refuses the configuration (see the
                class), or the schema is missing or older than :data:`SCHEMA_VERSION`.
            StoreUnavailable: the server cannot be reached.
        """
        _check_version(self._settings, self._probe())
        self._checked = True

    def _probe(self) -> tuple[Any, ...] | None:
        """Connect once, directly, and read the schema version row (None: no idempo tables).

        Raises:
            ConfigurationError: the server refuses the configuration.
            StoreUnavailable: the server cannot be reached.
        """
        settings = self._settings
        try:
            with _BoundedConnection.connect(settings.conninfo, **settings.probe_arguments()) as conn:
                conn.deadline = monotonic() + settings.deadline
                return conn.execute(_Q["schema_version"], prepare=False).fetchone()
        except psycopg.errors.UndefinedTable:
            return None
        except psycopg.Error as exc:
            raise _startup_failure(settings, exc) from exc

    @contextmanager
    def _connection(self, deadline: float | None = None) -> Iterator[_BoundedConnection]:
        """A pooled connection whose waits end ``deadline`` seconds (default: the store's) from now."""
        limit = self.deadline if deadline is None else deadline
        ends = monotonic() + limit
        if not self._pool_opened:
            with self._pool_lock:
                if not self._pool_opened:
                    self._pool.open(wait=False)
                    self._pool_opened = True
        try:
            with _pg_errors():
                try:
                    conn = self._pool.getconn(timeout=self._settings.pool_wait(limit))
                except psycopg_pool.PoolTimeout as exc:
                    raise _no_connection(self._settings, exc) from exc
                conn.deadline = ends
                try:
                    if not self._checked:
                        self._check_on(conn)
                    yield conn
                except psycopg.OperationalError:
                    conn.close()  # mid-statement or broken: never reused
                    raise
                finally:
                    conn.deadline = None
                    self._pool.putconn(conn)
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.OperationalError) and not _timed_out(exc.__cause__):
                # A killed backend or restarted server leaves every idle
                # connection dead; checking them now makes the next request use
                # a fresh one. Not after a timeout: the checks would wait too.
                with contextlib.suppress(Exception):  # best effort: the pool reconnects anyway
                    self._pool.check()
            raise

    def _check_on(self, conn: _BoundedConnection) -> None:
        """The schema check the constructor could not make, within this call's deadline."""
        try:
            _check_version(self._settings, conn.execute(_Q["schema_version"], prepare=False).fetchone())
        except psycopg.errors.UndefinedTable:
            raise StoreError(str(_schema_error(self._settings.url, self.schema, None))) from None
        except ConfigurationError as exc:
            raise StoreError(str(exc)) from exc
        self._checked = True

    def check_schema(self) -> int:
        """Return the schema version found.

        Raises:
            ConfigurationError: the schema is missing or older than :data:`SCHEMA_VERSION`.
            StoreUnavailable: the database cannot be reached.
        """
        try:
            with self._connection() as conn:
                row = conn.execute(_Q["schema_version"], prepare=False).fetchone()
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UndefinedTable):
                raise _schema_error(self._settings.url, self.schema, None) from None
            raise
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
        applied: list[int] = []
        self._probe()
        self._checked = True  # nothing to check before the schema exists
        with self._connection(_MAINTENANCE_DEADLINE) as conn, conn.transaction():
            _maintenance(conn)
            conn.execute(_Q["migration_lock"], {"schema": self.schema}, prepare=False)
            conn.execute(_create_schema_statement(self.schema), prepare=False)
            row = conn.execute(_Q["version_table_exists"], prepare=False).fetchone()
            current = None
            if row is not None and row[0]:
                found = conn.execute(_Q["schema_version"], prepare=False).fetchone()
                current = found[0] if found is not None and found[0] is not None else 0
            for version, text in _plan(current):
                conn.execute(text, prepare=False)
                conn.execute(_Q["record_version"], {"version": version}, prepare=False)
                applied.append(version)
        return applied

    def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        params = _begin_params(record_key, fingerprint, lease_ttl_ms)
        with self._connection() as conn:
            for _ in range(_BEGIN_ATTEMPTS):
                row = conn.execute(_Q["begin"], params, binary=True).fetchone()
                if row is not None:
                    return _begin_result(record_key, row)
        raise StoreError(f"begin could not take or read record {record_key} after {_BEGIN_ATTEMPTS} attempts")

    def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        with self._connection() as conn:
            count = conn.execute(_Q["complete"], _complete_params(record_key, token, response, record_ttl_ms)).rowcount
        if count != 1:
            raise LeaseLost()

    def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        with self._connection() as conn:
            count = conn.execute(_Q["release"], {"record_key": record_key, "token": token}).rowcount
        if count != 1:
            raise LeaseLost()

    def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        params = {"record_key": record_key, "token": token, "lease_ttl_ms": int(lease_ttl_ms)}
        with self._connection() as conn:
            count = conn.execute(_Q["extend"], params).rowcount
        if count != 1:
            raise LeaseLost()

    def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        with self._connection() as conn:
            row = conn.execute(_Q["get"], {"record_key": record_key}, binary=True).fetchone()
        return None if row is None else record_from_row(record_key, row)

    def purge_expired(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records, oldest first; return how many.

        One bounded batch per call: call again while it returns ``limit``.
        """
        with self._connection() as conn:
            return conn.execute(_Q["purge_expired"], {"limit": int(limit)}).rowcount

    def stats(self) -> StoreStats:
        """See :meth:`idempo.typing.SupportsStats.stats` (one scan of the table, one transaction).

        Maintenance: it may take up to 300 s, not the store's deadline.
        """
        with self._connection(_MAINTENANCE_DEADLINE) as conn, conn.transaction():
            _maintenance(conn)
            counts = conn.execute(_Q["stats"], prepare=False).fetchone()
            row = conn.execute(_Q["oldest_lease"], prepare=False, binary=True).fetchone()
        assert counts is not None  # the query always returns one row
        now_ms, in_progress, completed, expired = counts
        oldest = None if row is None else record_from_row(row[0], row[1:])
        return StoreStats(int(now_ms), int(in_progress), int(completed), int(expired), oldest)

    def close(self) -> None:
        """Close the connection pool."""
        with self._pool_lock:
            self._pool_opened = True  # a call after close() fails rather than reopening
        self._pool.close()


class AsyncPostgresStore:
    """A store in PostgreSQL, for asyncio (ASGI, async functions).

    Constructing it does no I/O: the pool opens on first use, and the server
    and schema are checked at start-up by ``await store.open()`` (the ASGI
    middleware calls it at lifespan start-up), else within the first call.

    It takes the arguments of :class:`PostgresStore`; ``check_schema`` applies
    to :meth:`open` and the first call.

    Raises:
        ConfigurationError: a malformed URL, schema name or deadline (here).
    """

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
        self._pool: psycopg_pool.AsyncConnectionPool[_AsyncBoundedConnection] | None = None
        self._ready = not check_schema

    async def open(self) -> None:
        """Check the server and the schema version now, over a connection of its own.

        Call it at start-up (the ASGI middleware does, at lifespan start-up);
        without it, the first call checks the schema within its deadline.

        Raises:
            ConfigurationError: the server refuses the configuration (see
                :class:`PostgresStore`), or the schema is missing or older
                than :data:`SCHEMA_VERSION`.
            StoreUnavailable: the server cannot be reached.
        """
        if self._ready:
            return
        _check_version(self._settings, await self._probe())
        self._ready = True

    async def _probe(self) -> tuple[Any, ...] | None:
        """See :meth:`PostgresStore._probe`."""
        settings = self._settings
        try:
            conn = await _AsyncBoundedConnection.connect(settings.conninfo, **settings.probe_arguments())
            async with conn:
                conn.deadline = monotonic() + settings.deadline
                return await (await conn.execute(_Q["schema_version"], prepare=False)).fetchone()
        except psycopg.errors.UndefinedTable:
            return None
        except psycopg.Error as exc:
            raise _startup_failure(settings, exc) from exc

    async def _get_pool(self) -> psycopg_pool.AsyncConnectionPool[_AsyncBoundedConnection]:
        if self._pool is None:
            # Created here, not in __init__: the pool binds to the running event loop.
            classes = self._settings.connection_classes()
            arguments = self._settings.pool_arguments(classes[1], self._settings._configure_async)
            pool: psycopg_pool.AsyncConnectionPool[_AsyncBoundedConnection] = psycopg_pool.AsyncConnectionPool(
                **arguments
            )
            await pool.open(wait=False)
            self._pool = pool
        return self._pool

    @asynccontextmanager
    async def _connection(self, deadline: float | None = None) -> AsyncIterator[_AsyncBoundedConnection]:
        """See :meth:`PostgresStore._connection`."""
        pool = await self._get_pool()
        limit = self.deadline if deadline is None else deadline
        ends = monotonic() + limit
        try:
            with _pg_errors():
                try:
                    conn = await pool.getconn(timeout=self._settings.pool_wait(limit))
                except psycopg_pool.PoolTimeout as exc:
                    raise _no_connection(self._settings, exc) from exc
                conn.deadline = ends
                try:
                    if not self._ready:
                        await self._check_on(conn)
                    yield conn
                except psycopg.OperationalError:
                    await conn.close()  # mid-statement or broken: never reused
                    raise
                finally:
                    conn.deadline = None
                    await pool.putconn(conn)
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.OperationalError) and not _timed_out(exc.__cause__):
                with contextlib.suppress(Exception):  # see PostgresStore._connection
                    await pool.check()
            raise

    async def _check_on(self, conn: _AsyncBoundedConnection) -> None:
        """See :meth:`PostgresStore._check_on`."""
        try:
            row = await (await conn.execute(_Q["schema_version"], prepare=False)).fetchone()
            _check_version(self._settings, row)
        except psycopg.errors.UndefinedTable:
            raise StoreError(str(_schema_error(self._settings.url, self.schema, None))) from None
        except ConfigurationError as exc:
            raise StoreError(str(exc)) from exc
        self._ready = True

    async def _run(
        self, query: LiteralString, params: dict[str, Any] | None = None, binary: bool = False
    ) -> tuple[int, tuple[Any, ...] | None]:
        """Run one statement on a pooled connection; return (rowcount, first row or None)."""
        async with self._connection() as conn:
            cursor = await conn.execute(query, params, binary=binary)
            return cursor.rowcount, (await cursor.fetchone() if cursor.description else None)

    async def check_schema(self) -> int:
        """See :meth:`PostgresStore.check_schema`."""
        try:
            async with self._connection() as conn:
                row = await (await conn.execute(_Q["schema_version"], prepare=False)).fetchone()
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UndefinedTable):
                raise _schema_error(self._settings.url, self.schema, None) from None
            raise
        return _check_version(self._settings, row)

    async def create_schema(self) -> list[int]:
        """See :meth:`PostgresStore.create_schema`."""
        applied: list[int] = []
        await self._probe()
        self._ready = True  # nothing to check before the schema exists
        async with self._connection(_MAINTENANCE_DEADLINE) as conn, conn.transaction():
            await _maintenance(conn)
            await conn.execute(_Q["migration_lock"], {"schema": self.schema}, prepare=False)
            await conn.execute(_create_schema_statement(self.schema), prepare=False)
            row = await (await conn.execute(_Q["version_table_exists"], prepare=False)).fetchone()
            current = None
            if row is not None and row[0]:
                found = await (await conn.execute(_Q["schema_version"], prepare=False)).fetchone()
                current = found[0] if found is not None and found[0] is not None else 0
            for version, text in _plan(current):
                await conn.execute(text, prepare=False)
                await conn.execute(_Q["record_version"], {"version": version}, prepare=False)
                applied.append(version)
        return applied

    async def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        params = _begin_params(record_key, fingerprint, lease_ttl_ms)
        async with self._connection() as conn:
            for _ in range(_BEGIN_ATTEMPTS):
                row = await (await conn.execute(_Q["begin"], params, binary=True)).fetchone()
                if row is not None:
                    return _begin_result(record_key, row)
        raise StoreError(f"begin could not take or read record {record_key} after {_BEGIN_ATTEMPTS} attempts")

    async def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        count, _ = await self._run(_Q["complete"], _complete_params(record_key, token, response, record_ttl_ms))
        if count != 1:
            raise LeaseLost()

    async def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        count, _ = await self._run(_Q["release"], {"record_key": record_key, "token": token})
        if count != 1:
            raise LeaseLost()

    async def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        params = {"record_key": record_key, "token": token, "lease_ttl_ms": int(lease_ttl_ms)}
        count, _ = await self._run(_Q["extend"], params)
        if count != 1:
            raise LeaseLost()

    async def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        _, row = await self._run(_Q["get"], {"record_key": record_key}, binary=True)
        return None if row is None else record_from_row(record_key, row)

    async def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`PostgresStore.purge_expired`."""
        count, _ = await self._run(_Q["purge_expired"], {"limit": int(limit)})
        return int(count)

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._pool is not None:
            await self._pool.close()
