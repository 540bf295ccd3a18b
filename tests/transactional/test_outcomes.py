"""The outcome table of shared/TRANSACTIONAL.md for @idempotent(transactional=True), against real PostgreSQL:
conflicts retried in process, a failed COMMIT, a COMMIT whose outcome is unknown (resolved from the record),
a lease lost to a takeover, and finalisation shielded from cancellation and bounded by a timeout."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import anyio
import psycopg
import pytest

import idempo._engine.transaction as transaction_engine
from idempo import idempotent
from idempo.exceptions import CommitFailed, CommitUnknown, TransactionConflict, TransactionError
from idempo.stores.postgres import AsyncPostgresStore, PostgresStore
from idempo.testing import set_testing
from idempo.transactional import AsyncTransaction, Transaction

from .conftest import PgApp

pytestmark = pytest.mark.postgres

_RAISE_40001 = "DO $$ BEGIN RAISE EXCEPTION 'could not serialize (test)' USING ERRCODE = '40001'; END $$"


def _scope() -> str:
    return f"s-{uuid.uuid4().hex}"


def test_conflict_in_a_statement_is_retried(pg_store: PostgresStore, pg_app: PgApp) -> None:
    """40001 raised by one of the function's statements: rolled back, released, run again in process; the
    third attempt commits one row."""
    attempts: list[int] = []

    @idempotent(store=pg_store, key="order_id", scope=_scope(), transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> int:
        attempts.append(1)
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, 1)", (order_id,))
        if len(attempts) < 3:
            tx.connection.execute(_RAISE_40001)
        return len(attempts)

    assert charge("c1") == 3
    assert pg_app.rows("c1") == [("c1", 1)]


def test_conflict_at_commit_gives_up_after_three_retries(pg_store: PostgresStore, pg_app: PgApp) -> None:
    """40001 at every COMMIT (a deferred trigger): 1 + 3 attempts, then TransactionConflict; nothing kept and
    the key released (a later call executes)."""
    attempts: list[int] = []

    @idempotent(store=pg_store, key="order_id", scope=_scope(), transactional=True)
    def charge(order_id: str, cents: int, *, tx: Transaction) -> None:
        attempts.append(1)
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, %s)", (order_id, cents))

    with pytest.raises(TransactionConflict):
        charge("c2", 40001)
    assert len(attempts) == 4
    assert pg_app.rows("c2") == []


def test_deferred_constraint_fails_commit(pg_store: PostgresStore, pg_app: PgApp) -> None:
    """A deferred unique constraint fails COMMIT: CommitFailed, rolled back, released (a retry executes)."""
    attempts: list[int] = []

    @idempotent(store=pg_store, key="order_id", scope=_scope(), transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> None:
        attempts.append(1)
        for _ in range(2):
            tx.connection.execute("INSERT INTO payments (order_id, cents, ref) VALUES (%s, 1, 'r')", (order_id,))

    with pytest.raises(CommitFailed):
        charge("c3")
    with pytest.raises(CommitFailed):
        charge("c3")
    assert len(attempts) == 2
    assert pg_app.rows("c3") == []


class _LostReply:
    """Wraps a transactor: COMMIT lands, then its reply is 'lost' (the connection is closed, an error raised);
    or, with ``before=True``, the connection drops before COMMIT is sent."""

    def __init__(self, inner: Any, *, before: bool) -> None:
        self._inner = inner
        self._before = before

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def finish(self, h: Any, command: Any) -> None:
        """The completion and COMMIT (one round trip on psycopg), then the reply lost."""
        if not self._before:
            self._inner.finish(h, command)
        h.conn.close()
        raise psycopg.OperationalError("server closed the connection unexpectedly")


def test_lost_commit_that_landed_returns_the_result(pg_store: PostgresStore, pg_app: PgApp) -> None:
    """The connection is lost after COMMIT landed: the record (read on a fresh connection) is completed with
    our token, so the call returns its result; one row; a repeat replays."""
    pg_store.transactor = _LostReply(pg_store.transactor, before=False)
    calls: list[int] = []

    @idempotent(store=pg_store, key="order_id", scope=_scope(), transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> str:
        calls.append(1)
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, 1)", (order_id,))
        return "charged"

    assert charge("c4") == "charged"
    assert charge("c4") == "charged"
    assert len(calls) == 1
    assert pg_app.rows("c4") == [("c4", 1)]


def test_lost_commit_that_did_not_land_releases(pg_store: PostgresStore, pg_app: PgApp) -> None:
    """The connection is lost before COMMIT: the record is not completed with our token, so a token-checked
    release and CommitUnknown; nothing kept; a later call executes."""
    inner = pg_store.transactor
    pg_store.transactor = _LostReply(inner, before=True)
    calls: list[int] = []

    @idempotent(store=pg_store, key="order_id", scope=_scope(), transactional=True)
    def charge(order_id: str, *, tx: Transaction) -> str:
        calls.append(1)
        tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, 1)", (order_id,))
        return "charged"

    with pytest.raises(CommitUnknown):
        charge("c5")
    assert pg_app.rows("c5") == []
    pg_store.transactor = inner
    assert charge("c5") == "charged"
    assert len(calls) == 2
    assert pg_app.rows("c5") == [("c5", 1)]


def test_lease_lost_to_a_takeover_rolls_back(pg_store: PostgresStore, pg_app: PgApp) -> None:
    """A call outlives its lease (no renewal in the testing mode) while a duplicate takes the key over and
    commits: the first call's completion matches no row, so it rolls back and raises TransactionError; the
    business table holds exactly one row, the duplicate's."""
    with set_testing():
        executions: list[int] = []
        started = threading.Event()

        @idempotent(store=pg_store, key="order_id", scope=_scope(), transactional=True, lease_ttl=0.3)
        def charge(order_id: str, *, tx: Transaction) -> int:
            executions.append(1)
            number = len(executions)
            tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, %s)", (order_id, number))
            if number == 1:
                started.set()
                time.sleep(0.8)
            return number

        outcome: list[BaseException | int] = []

        def first() -> None:
            try:
                outcome.append(charge("c6"))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=first)
        thread.start()
        started.wait(5)
        time.sleep(0.4)  # the first call's lease has expired: the duplicate takes the key over
        assert charge("c6") == 2
        thread.join(10)
    assert len(outcome) == 1
    assert isinstance(outcome[0], TransactionError)
    assert pg_app.rows("c6") == [("c6", 2)]


@pytest.mark.anyio
async def test_finalisation_is_shielded_from_cancellation(apg_store: AsyncPostgresStore, pg_app: PgApp) -> None:
    """The caller is cancelled while COMMIT is in flight: the commit still completes (row and record kept)."""
    inner = apg_store.transactor
    committing = anyio.Event()

    class SlowCommit:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        async def finish(self, h: Any, command: Any) -> None:
            committing.set()
            await anyio.sleep(0.3)
            await inner.finish(h, command)

    apg_store.transactor = SlowCommit()

    @idempotent(store=apg_store, key="order_id", scope=_scope(), transactional=True)
    async def charge(order_id: str, *, tx: AsyncTransaction) -> str:
        await tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, 1)", (order_id,))
        return "ok"

    # Cancelled once the COMMIT is in flight (not by a clock: on a loaded machine the
    # handler itself may outlast a fixed delay, and a cancelled handler commits nothing).
    cancelled = anyio.CancelScope()

    async def call() -> None:
        with cancelled:
            await charge("c7")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(call)
        await committing.wait()
        cancelled.cancel()
    assert cancelled.cancel_called
    assert pg_app.rows("c7") == [("c7", 1)]
    apg_store.transactor = inner
    assert await charge("c7") == "ok"  # a replay: completed by the shielded commit
    assert pg_app.rows("c7") == [("c7", 1)]


@pytest.mark.anyio
async def test_finalisation_is_bounded(
    apg_store: AsyncPostgresStore, pg_app: PgApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A COMMIT that never returns is given up after FINALIZE_TIMEOUT: CommitUnknown, the connection discarded
    (its transaction aborted), the key released."""
    monkeypatch.setattr(transaction_engine, "FINALIZE_TIMEOUT", 0.3)
    inner = apg_store.transactor

    class StuckCommit:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        async def finish(self, h: Any, command: Any) -> None:
            await anyio.sleep(30)

    apg_store.transactor = StuckCommit()

    @idempotent(store=apg_store, key="order_id", scope=_scope(), transactional=True)
    async def charge(order_id: str, *, tx: AsyncTransaction) -> str:
        await tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, 1)", (order_id,))
        return "ok"

    with pytest.raises(CommitUnknown):
        await charge("c8")
    assert pg_app.rows("c8") == []
    apg_store.transactor = inner
    assert await charge("c8") == "ok"
    assert pg_app.rows("c8") == [("c8", 1)]
