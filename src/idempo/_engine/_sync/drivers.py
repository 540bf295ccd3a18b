# Generated from ../_async/drivers.py by scripts/unasync: do not edit. Edit that file and run
# `.venv/bin/python scripts/unasync`; `scripts/unasync --check` (scripts/test) fails on a difference.
"""The driver: run a step generator against a store; and the execution it makes for a leased request.

A step generator yields commands (:mod:`idempo._engine.commands`); the driver
carries each one out and sends its result back, or throws its exception in,
so the generator's own ``try`` blocks decide what a failure means. This is
the only code that differs between the blocking fronts (WSGI, Django, sync
functions: ``drive_sync``, ``TransactionalExecution``) and the async ones
(ASGI, async functions: ``drive_async``, ``AsyncTransactionalExecution``), in
the manner of httpx's ``sync_auth_flow`` / ``async_auth_flow``. It is written
once, async, in ``_engine/_async/drivers.py``; ``_engine/_sync/drivers.py``
is generated from it (``scripts/unasync``). Every store call is timed for the
request's observation here (:mod:`idempo.observability`), so store latency is
measured in one place for every front.

A leased request (:class:`Lease`) runs in a transactional execution: an
execution whose handler may write through a transaction idempo opens and
commits. Its commit path is :func:`idempo._engine.transaction.finalize_steps`,
a step generator of the transactor's calls, carried out by the same driver.
The async finalisation is shielded from cancellation and bounded by
:data:`~idempo._engine.transaction.FINALIZE_TIMEOUT` seconds (past it:
:attr:`~idempo._engine.transaction.Outcome.UNKNOWN`); the blocking one needs
neither (:mod:`idempo._engine.primitives`).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar, cast

from ..._core.flow import Begin, Complete, Decision, Extend, Get, Release, Sleep
from ..._core.policy import Verdict
from ..._core.records import Record, StoredResponse
from ...exceptions import CommitUnknown, LeaseLost
from ...observability._observation import RequestObservation, store_call_sync
from ...typing import Store
from .. import faultpoints, transaction
from ..commands import Call, Command, Lease, LegacyWindow, LoadDigests, Offload
from ..execution import Execution
from ..primitives import deadline_sync, offload_sync, shield_sync, sleep_sync
from ..transaction import (
    Finalized,
    Outcome,
    Transaction,
    TransactionalMixin,
    Transactor,
    finalize_steps,
    landed_or_not,
    transactor_of,
    unreleased_unknown,
)
from .store import settle_once_sync

__all__ = ["TransactionalExecution", "drive_sync"]

T = TypeVar("T")


def drive_sync(
    flow: Generator[Any, Any, T],
    store: Store,
    observation: RequestObservation | None = None,
    *,
    decided: bool = True,
) -> T:
    """Run a step generator against ``store``; return what it returns.

    ``observation``, when given (or yielded by the generator once it
    observes the request), is told the time of each store call and, unless
    ``decided`` is False (the generator tells it itself), the decision the
    generator returns.

    Raises:
        What the generator raises (a StoreError it does not handle).
    """
    value: Any = None
    # One bound method for every step (a bound method is made anew at each attribute read).
    send = resume = flow.send
    while True:
        try:
            command = resume(value)
        except StopIteration as stop:
            if observation is not None and decided:
                observation.decided(cast(Decision, stop.value))
            result: T = stop.value
            return result
        try:
            # The commands of every request first, inline; the rest in _carry_out.
            kind = type(command)
            if kind is Begin:
                record_key, fingerprint, lease_ttl_ms = command.record_key, command.fingerprint, command.lease_ttl_ms
                value = store_call_sync(observation, store, "begin", store.begin, record_key, fingerprint, lease_ttl_ms)
            elif kind is Call:
                value = command.fn()
            elif isinstance(command, RequestObservation):
                value = observation = command
            elif kind is Lease:
                # The execution of a leased request: it opens a transaction only if the handler asks for
                # one (with the store's transactor, or a front's own such as Django's).
                value = TransactionalExecution(
                    store, command.policy, command.record_key, command.token, command.observation, transactor_of(store)
                )
            else:
                value = _carry_out(command, store, observation)
            resume = send
        except BaseException as exc:  # the generator decides what it means
            value, resume = exc, flow.throw


def _carry_out(command: Command, store: Store, observation: RequestObservation | None) -> Any:
    if type(command) is Get:
        return store_call_sync(observation, store, "get", store.get, command.record_key)
    if type(command) is Sleep:
        sleep_sync(command.seconds)
        return None
    if type(command) is LoadDigests:
        return command.source.load(store)
    if type(command) is LegacyWindow:
        return command.source.legacy_open(store)
    if type(command) is Offload:
        return offload_sync(command.fn, *command.args)
    # A settling command made before the handler ran (a held takeover, a legacy record's carry-over):
    # not the request's verdict, so not told to its observation. Shielded: a request cancelled
    # meanwhile still gives back (or holds) what it took.
    with shield_sync():
        assert isinstance(command, Complete | Release | Extend)
        return settle_once_sync(store, command)


class TransactionalExecution(TransactionalMixin, Execution):
    """An execution whose handler may write through a transaction idempo opens and commits.

    Args:
        store: the store holding the record.
        policy: the route's policy.
        record_key: the record being executed.
        token: the lease's fencing token.
        observation: the request's observation.
        transactor: the store's transactor (None: only a front's own can be used).
    """

    __slots__ = ("error", "handle", "outcome", "transactor", "tx", "used")

    def transaction(self, transactor: Transactor | None = None) -> Transaction:
        """The execution's transaction, opened on first use (a connection checked out, BEGIN).

        Args:
            transactor: drive this database instead of the store's (Django's connection).

        Raises:
            TransactionClosed: the record is already settled.
            ConfigurationError: no transactor (the store is not PostgreSQL or SQLite built for it).
            StoreUnavailable: no connection within the deadline.
        """
        if self.tx is not None:
            assert isinstance(self.tx, Transaction)
            return self.tx
        chosen = self._check_open(transactor)
        tx: Transaction = self._opened(chosen, chosen.open(), Transaction)
        faultpoints.reach("after-claim", chosen.fault_connection(self.handle))
        return tx

    def settle(
        self, response: StoredResponse | None, verdict: Verdict | None = None, reason: str | None = None
    ) -> bool:
        """Settle the record once, as an execution does; with a transaction open, COMMIT or ROLLBACK it.

        The commit path is :func:`~idempo._engine.transaction.finalize_steps`.
        True when the record settled at once; :attr:`outcome` says how.
        """
        if self.tx is None:
            return super().settle(response, verdict, reason)
        command = self.command(response, verdict, reason)
        if command is None:
            return False
        # Read at each call: a test shortens it.
        timeout = transaction.FINALIZE_TIMEOUT
        with shield_sync():
            self.keeper.stop()
            steps = finalize_steps(self.used, self.handle, command, self.record_key, self.token, self._hold())
            finalized: Finalized | None = None
            try:
                with deadline_sync(timeout):
                    finalized = drive_sync(steps, self.store, decided=False)
            finally:
                with deadline_sync(timeout):
                    self.used.close(self.handle, broken=finalized is None or finalized.broken)
            if finalized is None:
                error = CommitUnknown(f"record {self.record_key}: finalisation took over {timeout:g} s")
                finalized = Finalized(Outcome.UNKNOWN, Release(self.record_key, self.token), error)
            if unreleased_unknown(finalized):
                try:
                    self.store.release(self.record_key, self.token)
                except LeaseLost:
                    try:
                        record: Record | Exception | None = self.store.get(self.record_key)
                    except Exception as exc:
                        record = exc
                    finalized = landed_or_not(finalized, self.record_key, self.token, record)
                except Exception:
                    pass  # the store's retrying path releases it (the follow-up)
                else:
                    finalized = finalized._replace(followup=None)
            followup = self._finished(finalized, command)
            if followup is None:
                return finalized.outcome in (Outcome.COMMITTED, Outcome.SETTLED)
            return self.keeper.save(followup, self.observation, self.policy.save_retry_for)
        return False  # not reached: the shielded scope swallows nothing

    def fail(self, exc: BaseException, status: int | None = None) -> None:
        """Settle after ``exc``, as an execution does; on a crash an open transaction is given back broken."""
        if not isinstance(exc, Exception):
            self.give_back()
        super().fail(exc, status)

    def give_back(self) -> None:
        """A crash: give an open transaction's connection back broken (the server rolls it back)."""
        if not self.settled and self.tx is not None:
            self.tx.closed = True
            with shield_sync(), deadline_sync(transaction.FINALIZE_TIMEOUT):
                self.used.close(self.handle, broken=True)
