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

The async store needs asyncio (psycopg's async connections); it does not run on trio.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, LiteralString
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg_pool
from psycopg import sql

from .._core.records import Acquired, BeginResult, Existing, Record, StoreStats, StoredResponse, encode_headers
from ..exceptions import ConfigurationError, LeaseLost, StoreError
from ._base import ErrorMap, load_queries, load_sql, map_errors, record_from_row
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
    "timeout": float,
    "prepare_threshold": lambda v: None if v.lower() == "none" else int(v),
}
# A begin that finds no row lost a race with a concurrent commit (see the
# begin query); the next attempt sees the committed record.
_BEGIN_ATTEMPTS = 5


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
        timeout: float,
        application_name: str,
        prepare_threshold: int | None,
        connect_timeout: float,
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
        self.timeout: float = given.get("timeout", timeout)
        libpq_names = {name for name, _ in libpq}
        self.conninfo = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(libpq)))
        options = dict(libpq).get("options", "")
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "prepare_threshold": given.get("prepare_threshold", prepare_threshold),
            # Every statement names its tables unqualified; the schema is chosen here.
            "options": f"{options} -c search_path={self.schema}".strip(),
        }
        if "application_name" not in libpq_names:
            kwargs["application_name"] = application_name
        if "connect_timeout" not in libpq_names:
            kwargs["connect_timeout"] = max(1, round(connect_timeout))
        self.kwargs = kwargs

    def pool_arguments(self) -> dict[str, Any]:
        return {
            "conninfo": self.conninfo,
            "kwargs": self.kwargs,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "timeout": self.timeout,
            "name": f"idempo-{self.schema}",
            "open": False,
        }


def _schema_error(schema: str, found: int | None) -> ConfigurationError:
    if found is None:
        what = f"has no idempo tables in schema {schema!r}"
    else:
        what = f"has idempo schema version {found} in schema {schema!r}; this idempo needs {SCHEMA_VERSION}"
    return ConfigurationError(
        f"the PostgreSQL database {what}. Run `idempo migrate --store <the same postgresql:// URL>` "
        "(or call create_schema()) once, before starting the application."
    )


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
            ``min_size``, ``max_size``, ``timeout`` and ``prepare_threshold``
            (they override the arguments below); every other one goes to libpq
            (``sslmode``, ``connect_timeout``, ``application_name``, ...).
        schema: the schema holding idempo's tables (default ``public``); a
            plain identifier.
        min_size: connections the pool keeps open.
        max_size: connections the pool may open.
        timeout: seconds to wait for a free connection before StoreUnavailable.
        application_name: reported to the server (``pg_stat_activity``).
        prepare_threshold: executions of a statement on a connection before
            psycopg prepares it on the server (default 5); None never prepares
            (needed behind PgBouncer in transaction mode before 1.21).
        connect_timeout: seconds to wait for a new connection.
        check_schema: check the schema version now (default). Pass False to
            call :meth:`create_schema` first.

    Raises:
        ConfigurationError: a malformed URL or schema name; the schema is
            missing or older than :data:`SCHEMA_VERSION` (run ``idempo migrate``).
        StoreUnavailable: the database cannot be reached (with ``check_schema``).
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        application_name: str = "idempo",
        prepare_threshold: int | None = 5,
        connect_timeout: float = 5.0,
        check_schema: bool = True,
    ) -> None:
        self._settings = _Settings(
            url,
            schema=schema,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            application_name=application_name,
            prepare_threshold=prepare_threshold,
            connect_timeout=connect_timeout,
        )
        self.schema = self._settings.schema
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = psycopg_pool.ConnectionPool(
            **self._settings.pool_arguments()
        )
        self._pool.open(wait=False)
        if check_schema:
            try:
                self.check_schema()
            except BaseException:
                self._pool.close()
                raise

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        try:
            with _pg_errors(), self._pool.connection() as conn:
                yield conn
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.OperationalError):
                self._drop_dead_connections()
            raise

    def _drop_dead_connections(self) -> None:
        # A killed backend or restarted server leaves every idle connection
        # dead; checking them now makes the next request use a fresh one.
        with contextlib.suppress(Exception):  # best effort: the pool reconnects anyway
            self._pool.check()

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
                raise _schema_error(self.schema, None) from None
            raise
        found = row[0] if row else None
        if found is None or found < SCHEMA_VERSION:
            raise _schema_error(self.schema, found)
        return int(found)

    def create_schema(self) -> list[int]:
        """Create the schema, or upgrade it to :data:`SCHEMA_VERSION`; return the versions applied.

        Runs in one transaction under an advisory lock, so concurrent calls
        are safe and a failure leaves the database as it was.

        Raises:
            StoreError: the database refused (e.g. no CREATE privilege).
            StoreUnavailable: the database cannot be reached.
        """
        applied: list[int] = []
        with self._connection() as conn, conn.transaction():
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
        """See :meth:`idempo.typing.SupportsStats.stats` (one scan of the table, one transaction)."""
        with self._connection() as conn, conn.transaction():
            counts = conn.execute(_Q["stats"], prepare=False).fetchone()
            row = conn.execute(_Q["oldest_lease"], prepare=False, binary=True).fetchone()
        assert counts is not None  # the query always returns one row
        now_ms, in_progress, completed, expired = counts
        oldest = None if row is None else record_from_row(row[0], row[1:])
        return StoreStats(int(now_ms), int(in_progress), int(completed), int(expired), oldest)

    def close(self) -> None:
        """Close the connection pool."""
        self._pool.close()


class AsyncPostgresStore:
    """A store in PostgreSQL, for asyncio (ASGI, async functions).

    Constructing it does no I/O: the pool opens and the schema version is
    checked on first use, or at startup with ``await store.open()``.

    Args: as :class:`PostgresStore`; ``check_schema`` applies to :meth:`open`.

    Raises:
        ConfigurationError: a malformed URL or schema name (here); a missing or
            old schema (on first use or :meth:`open`).
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        application_name: str = "idempo",
        prepare_threshold: int | None = 5,
        connect_timeout: float = 5.0,
        check_schema: bool = True,
    ) -> None:
        self._settings = _Settings(
            url,
            schema=schema,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            application_name=application_name,
            prepare_threshold=prepare_threshold,
            connect_timeout=connect_timeout,
        )
        self.schema = self._settings.schema
        self._check = check_schema
        self._pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] | None = None
        self._ready = False
        self._open_lock: asyncio.Lock | None = None

    async def open(self) -> None:
        """Open the pool and check the schema version (unless ``check_schema=False``).

        Called by the first transition when not called before.

        Raises:
            ConfigurationError: the schema is missing or older than :data:`SCHEMA_VERSION`.
            StoreUnavailable: the database cannot be reached.
        """
        if self._ready:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if not self._ready:
                if self._check:
                    await self.check_schema()
                self._ready = True

    async def _get_pool(self) -> psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]]:
        if self._pool is None:
            # Created here, not in __init__: the pool binds to the running event loop.
            pool = psycopg_pool.AsyncConnectionPool(**self._settings.pool_arguments())
            await pool.open(wait=False)
            self._pool = pool
        return self._pool

    async def _run(
        self, query: LiteralString | sql.Composed, params: dict[str, Any] | None = None, **kw: Any
    ) -> tuple[int, tuple[Any, ...] | None]:
        """Run one statement on a pooled connection; return (rowcount, first row or None)."""
        pool = await self._get_pool()
        try:
            with _pg_errors():
                async with pool.connection() as conn:
                    cursor = await conn.execute(query, params, **kw)
                    return cursor.rowcount, (await cursor.fetchone() if cursor.description else None)
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.OperationalError):
                # See PostgresStore._drop_dead_connections.
                with contextlib.suppress(Exception):
                    await pool.check()
            raise

    async def _transition(
        self, query: LiteralString, params: dict[str, Any], binary: bool = False
    ) -> tuple[int, tuple[Any, ...] | None]:
        if not self._ready:
            await self.open()
        return await self._run(query, params, binary=binary)

    async def check_schema(self) -> int:
        """See :meth:`PostgresStore.check_schema`."""
        try:
            _, row = await self._run(_Q["schema_version"], prepare=False)
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UndefinedTable):
                raise _schema_error(self.schema, None) from None
            raise
        found = row[0] if row else None
        if found is None or found < SCHEMA_VERSION:
            raise _schema_error(self.schema, found)
        return int(found)

    async def create_schema(self) -> list[int]:
        """See :meth:`PostgresStore.create_schema`."""
        applied: list[int] = []
        pool = await self._get_pool()
        with _pg_errors():
            async with pool.connection() as conn, conn.transaction():
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
        self._ready = True
        return applied

    async def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        params = _begin_params(record_key, fingerprint, lease_ttl_ms)
        for _ in range(_BEGIN_ATTEMPTS):
            _, row = await self._transition(_Q["begin"], params, binary=True)
            if row is not None:
                return _begin_result(record_key, row)
        raise StoreError(f"begin could not take or read record {record_key} after {_BEGIN_ATTEMPTS} attempts")

    async def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        count, _ = await self._transition(_Q["complete"], _complete_params(record_key, token, response, record_ttl_ms))
        if count != 1:
            raise LeaseLost()

    async def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        count, _ = await self._transition(_Q["release"], {"record_key": record_key, "token": token})
        if count != 1:
            raise LeaseLost()

    async def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        params = {"record_key": record_key, "token": token, "lease_ttl_ms": int(lease_ttl_ms)}
        count, _ = await self._transition(_Q["extend"], params)
        if count != 1:
            raise LeaseLost()

    async def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        _, row = await self._transition(_Q["get"], {"record_key": record_key}, binary=True)
        return None if row is None else record_from_row(record_key, row)

    async def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`PostgresStore.purge_expired`."""
        count, _ = await self._transition(_Q["purge_expired"], {"limit": int(limit)})
        return int(count)

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._pool is not None:
            await self._pool.close()
        self._ready = False
