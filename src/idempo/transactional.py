"""Transactional mode: exactly one committed effect per key (DESIGN "transactional route", guarantee 6).

A transactional handler writes through a transaction idempo opened on the
application's own database; the record's completion, fenced by the lease
token, is that transaction's last statement, and the response leaves only
after COMMIT returned. A crash at any instant leaves both the writes and the
completed record, or neither. See docs/transactional.md.

::

    pool = psycopg_pool.ConnectionPool("postgresql://.../app", open=True)
    store = PostgresStore.from_pool(pool)

    @idempotent(store=store, key="order_id", transactional=True)
    def charge(order_id: str, cents: int, *, tx: Transaction) -> int:
        row = tx.connection.execute(
            "INSERT INTO charges (order_id, cents) VALUES (%s, %s) RETURNING id", (order_id, cents)
        ).fetchone()
        return row[0]

Which stores: ``PostgresStore.from_pool`` / ``AsyncPostgresStore.from_pool``
(psycopg_pool), and :class:`~idempo.stores.sqlite.SQLiteStore` /
:class:`~idempo.stores.sqlite.AsyncSQLiteStore` on the app's own file. Their
``transactor`` attribute drives the database (:class:`Transactor`); Redis and
memory stores have none, and a transactional route or function on them is a
:class:`~idempo.exceptions.ConfigurationError` at start-up.
"""

from __future__ import annotations

from ._engine.transaction import (
    FINALIZE_TIMEOUT,
    AsyncTransaction,
    AsyncTransactor,
    Outcome,
    Transaction,
    Transactor,
)
from .stores.sqlite import SQLiteConnection

__all__ = [
    "FINALIZE_TIMEOUT",
    "AsyncTransaction",
    "AsyncTransactor",
    "Outcome",
    "SQLiteConnection",
    "Transaction",
    "Transactor",
]
