"""Celery + transactional mode: each order's payment row is committed once, even when its worker is killed.

Run (Redis at 127.0.0.1:6379, or set REDIS_URL; DATABASE is the app's SQLite file or a
``postgresql://`` URL whose database holds idempo's tables, made by ``idempo migrate``)::

    pip install 'idempo[celery]'                     # 'idempo[celery,postgres]' for PostgreSQL
    celery -A examples.transactional.celery_payments worker --loglevel=INFO
    python examples/transactional/celery_payments.py  # sends each order twice

The task writes its payment row through ``tx``, the transaction idempo opened
on the app's own database; the record's completion is that transaction's last
statement. A worker killed after the INSERT and before COMMIT leaves no row
(the database rolls the transaction back when the connection drops); the
redelivered task runs once its lease lapsed and writes the one row. A worker
killed after COMMIT leaves the row and the completed record: the redelivery
returns the stored result without running.
"""

from __future__ import annotations

import os
import sqlite3

from celery import Celery

from idempo.celery import idempotent_task
from idempo.transactional import Transaction
from idempo.typing import Store

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
#: Every key of the example in Redis (broker, results) starts with this.
PREFIX = os.environ.get("PREFIX", "idempo-example-celery-tx:")
DATABASE = os.environ.get("DATABASE", "celery_payments.db")
POSTGRES = DATABASE.startswith(("postgresql://", "postgres://"))
PARAM = "%s" if POSTGRES else "?"  # the driver's placeholder

app = Celery("payments", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_transport_options={"visibility_timeout": 60, "global_keyprefix": PREFIX},
    result_backend_transport_options={"global_keyprefix": PREFIX},
    task_default_queue=f"{PREFIX}tasks",
    broker_connection_retry_on_startup=True,
)


def app_store() -> Store:
    """idempo's store on the app's own database; idempo calls it once in each worker process.

    A factory, not a store: the prefork pool forks its children, and a
    psycopg pool (connections, threads) must not cross a fork.
    """
    if POSTGRES:
        import psycopg_pool

        from idempo.stores.postgres import PostgresStore

        # The pool the app's tasks use; idempo's claim takes one connection, the task's transaction another.
        pool = psycopg_pool.ConnectionPool(DATABASE, min_size=1, max_size=4, open=True)
        return PostgresStore.from_pool(pool)
    from idempo.stores.sqlite import SQLiteStore

    return SQLiteStore(DATABASE)  # the app's file: the payment and its record commit together


def create_tables() -> None:
    """The payments table (idempo's own tables: ``idempo migrate`` on PostgreSQL, made by the store on SQLite)."""
    ddl = "CREATE TABLE IF NOT EXISTS payments (id {} PRIMARY KEY, order_id TEXT NOT NULL, cents INTEGER NOT NULL)"
    if POSTGRES:
        import psycopg

        with psycopg.connect(DATABASE, autocommit=True) as conn:
            conn.execute(ddl.format("serial"))
    else:
        with sqlite3.connect(DATABASE) as conn:
            conn.execute(ddl.format("INTEGER"))


@idempotent_task(app, name="payments.pay", key="order_id", store=app_store, transactional=True, lease_ttl=10)
def pay(order_id: str, cents: int, *, tx: Transaction) -> dict[str, object]:
    """Record the order's payment: the row and the idempotency record commit together, or neither."""
    row = tx.connection.execute(
        f"INSERT INTO payments (order_id, cents) VALUES ({PARAM}, {PARAM}) RETURNING id", (order_id, cents)
    ).fetchone()
    return {"order_id": order_id, "cents": cents, "payment_id": row[0]}


def payment_rows() -> int:
    """How many payment rows the database holds."""
    if POSTGRES:
        import psycopg

        with psycopg.connect(DATABASE, autocommit=True) as conn:
            return int(conn.execute("SELECT count(*) FROM payments").fetchone()[0])  # type: ignore[index]
    with sqlite3.connect(DATABASE) as conn:
        return int(conn.execute("SELECT count(*) FROM payments").fetchone()[0])


def main() -> None:
    create_tables()
    orders = [("order-1", 1999), ("order-2", 500), ("order-3", 4200)]
    sent = [pay.delay(order_id, cents) for order_id, cents in orders for _ in range(2)]  # each order twice
    receipts = [result.get(timeout=60) for result in sent]
    for result, receipt in zip(sent, receipts, strict=True):
        print(f"  task {result.id}: {receipt['order_id']} paid, payment {receipt['payment_id']}")
    same = all(receipts[i] == receipts[i + 1] for i in range(0, len(receipts), 2))
    print(f"{len(sent)} tasks, {payment_rows()} payment rows; each duplicate got its order's payment: {same}")


if __name__ == "__main__":
    main()
