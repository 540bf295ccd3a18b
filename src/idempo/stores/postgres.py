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

Twins: :class:`AsyncPostgresStore` is written once (``stores/_async/postgres.py``)
and :class:`PostgresStore` is generated from it by ``scripts/unasync``
(``stores/_sync/postgres.py``, checked in CI): the same code but for
``await``. What they share without I/O, the constructor, the checks and each
call's statements written once as a generator that the store's
``_run_steps`` drives on any psycopg connection (the store's or one handed
in), is in ``stores/_postgres.py``.

The async store needs asyncio (psycopg's async connections); it does not run on trio.
"""

from __future__ import annotations

from ._async.postgres import AsyncPostgresStore
from ._sync.postgres import PostgresStore
from .sql.postgres import SCHEMA_VERSION, migrations

__all__ = ["SCHEMA_VERSION", "AsyncPostgresStore", "PostgresStore", "migrations"]
