"""The Celery app the tests' workers run (``celery -A tests.celery_tasks.tasks worker``), configured by the environment.

Every task appends ``start <order_id> <pid>`` to a ledger file when its body
starts and ``done <order_id>`` when it ends: the test counts executions from
that file, whatever process ran them.

Environment (set by ``conftest.py``):
    IDEMPO_CELERY_BROKER: the broker and result backend URL (a Redis db of the tests' own).
    IDEMPO_CELERY_PREFIX: a key prefix of this test session's own (broker and results).
    IDEMPO_CELERY_STORE: the idempo store URL every worker shares.
    IDEMPO_CELERY_VISIBILITY: the broker's visibility timeout, seconds.
    IDEMPO_CELERY_DATABASE: the app's own database of the transactional tasks (set per worker): a
        PostgreSQL conninfo whose search_path holds idempo's tables and ``payments``, or an SQLite file.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from celery.exceptions import TimeLimitExceeded

from idempo import Verdict
from idempo.celery import IdempotentTask, idempotent_task
from idempo.transactional import Transaction
from idempo.typing import Store

PREFIX = os.environ.get("IDEMPO_CELERY_PREFIX", "idempo-test-celery:")
BROKER = os.environ.get("IDEMPO_CELERY_BROKER", "redis://127.0.0.1:6379/7")
#: The lease of the tasks: short, so a dead worker's task is taken over within a second.
LEASE = 1.0

app = Celery("idempo_tests", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("IDEMPO_CELERY_VISIBILITY", "3")),
        "global_keyprefix": PREFIX,
        # Look for messages whose visibility timeout passed every second (kombu's default: 100 s).
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    result_backend_transport_options={"global_keyprefix": PREFIX},
    task_default_queue=f"{PREFIX}tasks",
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    idempo_store=os.environ.get("IDEMPO_CELERY_STORE", "memory://"),
)


def note(ledger: str, line: str) -> None:
    """Append one line to the ledger (one write, so lines of two processes never interleave)."""
    with open(ledger, "a", encoding="utf-8") as file:
        file.write(line + "\n")


def _charge(order_id: str, cents: int, ledger: str, seconds: float) -> dict[str, object]:
    note(ledger, f"start {order_id} {os.getpid()}")
    time.sleep(seconds)
    note(ledger, f"done {order_id}")
    return {"order_id": order_id, "cents": cents, "pid": os.getpid()}


@app.task(
    base=IdempotentTask,
    idempotency_key="order_id",
    idempotency_lease_ttl=LEASE,
    idempotency_exclude=["ledger", "seconds"],
)
def charge(order_id: str, cents: int, ledger: str, seconds: float = 0.0) -> dict[str, object]:
    """Charge an order once per order id (a duplicate is retried until the first run settles)."""
    return _charge(order_id, cents, ledger, seconds)


@idempotent_task(app, key="order_id", lease_ttl=LEASE, exclude=["ledger", "seconds"], on_duplicate="drop")
def charge_or_drop(order_id: str, cents: int, ledger: str, seconds: float = 0.0) -> dict[str, object]:
    """As :func:`charge`, made with the decorator; a duplicate of a running charge is dropped."""
    return _charge(order_id, cents, ledger, seconds)


@idempotent_task(app, key="order_id", lease_ttl=LEASE, exclude=["ledger", "seconds"], on_takeover="hold")
def charge_or_hold(order_id: str, cents: int, ledger: str, seconds: float = 0.0) -> dict[str, object]:
    """As :func:`charge`; the redelivered task of a worker that died is held, not run again."""
    return _charge(order_id, cents, ledger, seconds)


#: A lease far longer than the tests wait: a key these tasks leave behind is found only if it is settled.
LONG_LEASE = 120.0


@idempotent_task(app, key="order_id", lease_ttl=LONG_LEASE, exclude=["ledger", "seconds"], time_limit=1)
def charge_limited(order_id: str, cents: int, ledger: str, seconds: float = 0.0) -> dict[str, object]:
    """As :func:`charge`, killed by a hard time limit of 1 s (prefork pool): its key is released."""
    return _charge(order_id, cents, ledger, seconds)


@idempotent_task(
    app,
    key="order_id",
    lease_ttl=LONG_LEASE,
    exclude=["ledger", "seconds"],
    time_limit=1,
    exception_verdicts={TimeLimitExceeded: Verdict.HOLD},
)
def charge_limited_hold(order_id: str, cents: int, ledger: str, seconds: float = 0.0) -> dict[str, object]:
    """As :func:`charge_limited`, but a run killed by the time limit holds its key (its outcome is unknown)."""
    return _charge(order_id, cents, ledger, seconds)


@idempotent_task(app, key="order_id", lease_ttl=LONG_LEASE, exclude=["ledger", "seconds"])
def charge_revocable(order_id: str, cents: int, ledger: str, seconds: float = 0.0) -> dict[str, object]:
    """As :func:`charge`, with a long lease: revoked with terminate=True, its key is released."""
    return _charge(order_id, cents, ledger, seconds)


@app.task(base=IdempotentTask, idempotency_key="order_id", idempotency_lease_ttl=3600.0)
def long_lease(order_id: str) -> str:
    """A task whose lease outlasts the broker's visibility timeout: the worker warns at start."""
    return order_id


def app_database() -> Store:
    """idempo's store on the app's own database (``IDEMPO_CELERY_DATABASE``), built once in each worker process."""
    database = os.environ["IDEMPO_CELERY_DATABASE"]
    if database.startswith("postgresql"):
        import psycopg_pool

        from idempo.stores.postgres import PostgresStore

        # One connection for idempo's claim, one for the task's transaction.
        pool = psycopg_pool.ConnectionPool(database, min_size=1, max_size=2, open=True)
        return PostgresStore.from_pool(pool)
    from idempo.stores.sqlite import SQLiteStore

    return SQLiteStore(database)


def _insert_payment(tx: Transaction, order_id: str, cents: int) -> int:
    param = "%s" if os.environ["IDEMPO_CELERY_DATABASE"].startswith("postgresql") else "?"
    query = f"INSERT INTO payments (order_id, cents) VALUES ({param}, {param}) RETURNING id"
    return int(tx.connection.execute(query, (order_id, cents)).fetchone()[0])


@idempotent_task(app, key="order_id", store=app_database, transactional=True, lease_ttl=LEASE)
def pay(order_id: str, cents: int, *, tx: Transaction) -> dict[str, object]:
    """Write the order's payment row through the task's transaction: it commits with the record, or not at all."""
    return {"order_id": order_id, "cents": cents, "payment_id": _insert_payment(tx, order_id, cents)}


@idempotent_task(app, key="order_id", store=app_database, transactional=True, lease_ttl=LEASE)
def pay_or_fail(order_id: str, cents: int, fail: bool, *, tx: Transaction) -> dict[str, object]:
    """As :func:`pay`, raising after the write when ``fail``: the row rolls back, the key is released."""
    payment_id = _insert_payment(tx, order_id, cents)
    if fail:
        raise RuntimeError("the provider declined")
    return {"order_id": order_id, "cents": cents, "payment_id": payment_id}


@idempotent_task(
    app, key="order_id", store=app_database, transactional=True, lease_ttl=LONG_LEASE, exclude=["seconds"], time_limit=1
)
def pay_slowly(order_id: str, cents: int, seconds: float, *, tx: Transaction) -> dict[str, object]:
    """As :func:`pay`, sleeping ``seconds`` after the write, killed by a hard time limit of 1 s (prefork pool)."""
    payment_id = _insert_payment(tx, order_id, cents)
    time.sleep(seconds)
    return {"order_id": order_id, "cents": cents, "payment_id": payment_id}
