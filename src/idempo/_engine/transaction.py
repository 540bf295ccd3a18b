"""The transactional commit path: the record's completion is the last statement of the handler's transaction.

DESIGN "transactional route", guarantee 6; the design and its outcome table are
shared/TRANSACTIONAL.md. A transactional execution (``TransactionalExecution``,
``AsyncTransactionalExecution``: :mod:`idempo._engine._async.drivers`,
and the blocking one generated from it) is an execution that may hold a
transaction on the app's own database. The claim (``begin``) committed on its own, as on every route, so
duplicates see the record in progress. When the handler asks for the
transaction (its ``transaction()``) a connection is
checked out and a transaction begun; the handler writes through it. Settling
then follows one rule, written once in :func:`finalize_steps`:

- *store* (a real response): the record's ``complete``, fenced by the lease
  token, runs inside the transaction, then COMMIT. Zero rows (the lease was
  taken over): ROLLBACK, :attr:`Outcome.LEASE_LOST`.
- *release* or *hold*: ROLLBACK first, then the release or hold on the same
  connection, as its own short transaction.
- A conflict (40001, 40P01, 55P03, SQLite busy) at any statement: ROLLBACK,
  release on the same connection, :attr:`Outcome.CONFLICT`.
- Another failure (a deferred constraint at COMMIT): ROLLBACK, release,
  :attr:`Outcome.FAILED`.
- The handler ended idempo's transaction itself (a COMMIT or ROLLBACK through
  the connection, by any route the transactor can see: ``ended``, or ``finish``
  raising TransactionControlled): whatever is open is rolled back and the key
  HELD (its writes may have committed, so a retry must not run again),
  :attr:`Outcome.ENDED`, 500. Checked first, on success and failure alike.
- The connection lost (at the completion or at COMMIT): the record, read on a
  fresh connection, decides: completed with our token means it committed
  (:attr:`Outcome.COMMITTED`); otherwise a token-checked release (a no-op if
  it did commit) and :attr:`Outcome.UNKNOWN`.

Until the handler asks for the transaction, a transactional execution settles
as a plain one. How a database is driven is a :class:`Transactor` (the stores
have theirs; ``idempo.django`` passes one on Django's own connection).

Fault points (:mod:`idempo._engine.faultpoints`): ``after-claim`` when the
transaction opens, ``before-commit`` after the completion and before COMMIT,
``after-commit`` after COMMIT returned; the fronts reach ``before-send``
(:meth:`TransactionalMixin.before_send`) just before the response leaves.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Generator
from typing import Any, NamedTuple, Protocol

from .._core.errors import describe, driver_error
from .._core.flow import Complete, Release, finish
from .._core.policy import Policy, Verdict
from .._core.problems import (
    COMMIT_FAILED,
    COMMIT_UNKNOWN,
    LEASE_LOST,
    TRANSACTION_CONFLICT,
    TRANSACTION_ENDED,
    problem_response,
)
from .._core.records import MARKER_STATUS, Marker, Record, RecordState, StoredResponse
from ..exceptions import (
    CommitFailed,
    CommitUnknown,
    ConfigurationError,
    LeaseLost,
    TransactionClosed,
    TransactionConflict,
    TransactionControlled,
    TransactionError,
)
from ..observability._observation import RequestObservation, logger
from . import faultpoints
from .commands import Call
from .store import Settle

__all__ = [
    "FINALIZE_TIMEOUT",
    "AsyncTransaction",
    "AsyncTransactor",
    "Finalized",
    "Outcome",
    "Transaction",
    "TransactionalMixin",
    "Transactor",
    "commits",
    "finalize_steps",
    "landed_or_not",
    "problem_for",
    "require_transactor",
    "transactor_of",
    "unreleased_unknown",
]

#: Seconds the async finalisation (completion, COMMIT, resolve, release) may take
#: before it is given up as an unknown outcome (it is shielded from cancellation).
FINALIZE_TIMEOUT = 10.0


class Outcome(enum.Enum):
    """How a transactional execution ended (see the module docstring)."""

    #: No transaction was opened, or it rolled back and the record was released or held:
    #: the app's own answer goes out.
    SETTLED = "settled"
    #: The writes and the record's completion committed together: the response goes out.
    COMMITTED = "committed"
    #: The lease was taken over: rolled back; 409, a retry gets the winner's replay.
    LEASE_LOST = "lease_lost"
    #: The database aborted the transaction to resolve a conflict: rolled back, released; 503.
    CONFLICT = "conflict"
    #: COMMIT failed for another definite reason: rolled back, released; 500.
    FAILED = "failed"
    #: The connection was lost and the record says it did not commit: released; 503.
    UNKNOWN = "unknown"
    #: The handler ended idempo's transaction itself (COMMIT or ROLLBACK by any route): what is
    #: open is rolled back and the key held, since its writes may have committed; 500.
    ENDED = "ended"


class Transactor(Protocol):
    """How idempo drives one database for transactional executions (blocking).

    A store that supports transactional mode has one as ``store.transactor``;
    a front may pass its own (Django's connection) to
    a transactional execution's ``transaction()``. ``h`` is the handle
    :meth:`open` returned (a connection and its transaction).
    """

    def open(self) -> Any:
        """Check out a connection and begin a transaction; return the handle.

        Raises:
            StoreUnavailable: no connection within the deadline.
        """

    def connection(self, h: Any) -> Any:
        """What the handler gets as ``tx.connection``."""

    def session(self, h: Any) -> Any:
        """What the handler gets as ``tx.session`` (a SQLAlchemy Session), or None."""

    def run(self, h: Any, command: Complete | Release, *, in_transaction: bool) -> None:
        """Run the store's statement for ``command`` on ``h``'s connection.

        ``in_transaction``: inside the open transaction (the completion);
        False: after a rollback, as its own short transaction, committed.

        Raises:
            LeaseLost: the statement matched no row (the token no longer holds the record).
        """

    def commit(self, h: Any) -> None:
        """COMMIT the transaction."""

    def rollback(self, h: Any) -> None:
        """ROLLBACK the transaction."""

    def close(self, h: Any, *, broken: bool) -> None:
        """Give the connection back (``broken``: it failed, discard it). Never raises."""

    def resolve(self, record_key: str) -> Record | None:
        """Read the record on a fresh connection (for a COMMIT whose outcome is unknown)."""

    def kind(self, exc: BaseException) -> str:
        """``"conflict"`` (retry-safe abort), ``"lost"`` (the connection is gone) or ``"failed"``."""

    def fault_connection(self, h: Any) -> Any:
        """The connection :func:`idempo._engine.faultpoints.reach` cuts for ``drop-connection``."""

    # Optional: ``finish(h, command)`` runs the completion and COMMIT together (one round trip),
    # raising LeaseLost when the completion matched no row (the transaction then rolled back), and
    # TransactionControlled when the transaction it commits is not idempo's (the handler ended it).
    # Optional: ``ended(h, committing)`` says why idempo's transaction is no longer open and
    # outermost (the handler committed or rolled it back), or None while it is; ``committing``:
    # the completion follows (a check without I/O; ``finish`` makes the rest).


class AsyncTransactor(Protocol):
    """The async twin of :class:`Transactor`: ``open``, ``run``, ``commit``, ``rollback``, ``close`` and
    ``resolve`` are coroutines; ``connection``, ``session``, ``kind`` and ``fault_connection`` are not."""

    async def open(self) -> Any:
        """See :meth:`Transactor.open`."""

    def connection(self, h: Any) -> Any:
        """See :meth:`Transactor.connection`."""

    def session(self, h: Any) -> Any:
        """See :meth:`Transactor.session`."""

    async def run(self, h: Any, command: Complete | Release, *, in_transaction: bool) -> None:
        """See :meth:`Transactor.run`."""

    async def commit(self, h: Any) -> None:
        """See :meth:`Transactor.commit`."""

    async def rollback(self, h: Any) -> None:
        """See :meth:`Transactor.rollback`."""

    async def close(self, h: Any, *, broken: bool) -> None:
        """See :meth:`Transactor.close`."""

    async def resolve(self, record_key: str) -> Record | None:
        """See :meth:`Transactor.resolve`."""

    def kind(self, exc: BaseException) -> str:
        """See :meth:`Transactor.kind`."""

    def fault_connection(self, h: Any) -> Any:
        """See :meth:`Transactor.fault_connection`."""


def transactor_of(store: object) -> Any:
    """The store's transactor, or None when the store cannot run transactional executions."""
    return getattr(store, "transactor", None)


def require_transactor(store: object, name: str) -> None:
    """Refuse a store that cannot commit with the handler's writes (checked when a front is built).

    Raises:
        ConfigurationError: the store has no transactor (Redis, memory, a URL-built PostgreSQL store).
    """
    if transactor_of(store) is None:
        raise ConfigurationError(
            f"{name}: transactional=True needs a store on the application's own database: "
            "PostgresStore.from_pool(pool) / from_engine(engine), or an SQLite store on the app's file; "
            f"{type(store).__name__} cannot commit with the handler's writes"
        )


class _TransactionBase:
    __slots__ = ("_connection", "_session", "closed", "record_key", "token")

    def __init__(self, connection: Any, session: Any, record_key: str, token: int) -> None:
        self._connection = connection
        self._session = session
        self.record_key = record_key
        self.token = token
        self.closed = False

    @property
    def connection(self) -> Any:
        """The connection the handler writes through, inside idempo's transaction.

        A psycopg connection (its ``commit()`` is refused inside the
        transaction), an :class:`idempo.stores.sqlite.SQLiteConnection` proxy
        (``commit``/``rollback``/``close`` raise TransactionControlled), or a
        SQLAlchemy ``Connection``.

        Raises:
            TransactionClosed: the transaction was already committed or rolled back.
        """
        if self.closed:
            raise TransactionClosed(
                f"the transaction of record {self.record_key} is finished; "
                "use it only inside the handler (not in a background task)"
            )
        return self._connection

    @property
    def session(self) -> Any:
        """A SQLAlchemy Session joined to the transaction (``join_transaction_mode="create_savepoint"``),
        or None when the store is not built on a SQLAlchemy engine.

        Raises:
            TransactionClosed: the transaction was already committed or rolled back.
        """
        if self.closed:
            raise TransactionClosed(f"the transaction of record {self.record_key} is finished")
        return self._session

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} record {self.record_key} token {self.token} ({state})>"


class Transaction(_TransactionBase):
    """The transaction a transactional handler writes through (blocking fronts and sync functions).

    Attributes:
        connection: see :attr:`_TransactionBase.connection`.
        session: a SQLAlchemy Session joined to the transaction, or None.
        record_key: the record this execution holds (str).
        token: its lease's fencing token (int).
        closed: True once idempo committed or rolled it back.
    """

    __slots__ = ()


class AsyncTransaction(_TransactionBase):
    """The transaction a transactional handler writes through (ASGI routes and async functions).

    The attributes of :class:`Transaction`; ``connection`` is an async
    connection (psycopg's ``AsyncConnection``, a SQLAlchemy ``AsyncConnection``)
    or the sqlite3 proxy (blocking: keep the writes short).
    """

    __slots__ = ()


def _call(transactor: Transactor | AsyncTransactor, name: str, *args: Any, **kwargs: Any) -> Call:
    """The command that calls the transactor's ``name`` (awaited by the async driver)."""
    return Call(functools.partial(getattr(transactor, name), *args, **kwargs))


class Finalized(NamedTuple):
    """What :func:`finalize_steps` ends in: the outcome, a settling command left for the store's own
    retrying path (None: settled), the error behind a non-committed outcome, and whether the
    connection broke (the caller closes it, discarding a broken one)."""

    outcome: Outcome
    followup: Settle | None
    error: Exception | None
    broken: bool = False


def commits(command: Settle) -> bool:
    """Whether a settling command completes the record with a real response (the COMMIT path)."""
    return isinstance(command, Complete) and command.response.status != MARKER_STATUS


def finalize_steps(
    transactor: Transactor | AsyncTransactor,
    h: Any,
    command: Settle,
    record_key: str,
    token: int,
    hold: Settle | None = None,
) -> Generator[Call, Any, Finalized]:
    """The commit path, once for both drivers: yields the transactor's calls (:class:`Call` commands, which the
    drivers carry out), returns the :class:`Finalized`.

    ``hold``: the command that holds the key when the handler ended idempo's
    transaction itself (default: a held marker kept for the record's TTL).

    Never raises an ``Exception`` of the database: every failure becomes an
    outcome (an :class:`~idempo._engine.faultpoints.InjectedFault` raised at
    ``after-commit`` propagates, the transaction committed). The caller closes
    the connection afterwards (:meth:`Transactor.close`).
    """
    fault_connection = transactor.fault_connection(h)
    if hold is None:
        hold = Complete(record_key, token, Marker(Marker.HELD, _ENDED_REASON, None).response(), 86_400_000)
    committing_now = commits(command)
    if hasattr(transactor, "ended"):
        try:
            why = yield _call(transactor, "ended", h, committing_now)
        except Exception as exc:
            # The check itself failed: a lost connection is the commit path's to resolve (it
            # fails the same way); anything else, assume the worst.
            why = None if transactor.kind(exc) == "lost" else f"{describe(exc)}, while checking it"
        if why is not None:
            return (yield from _ended(transactor, h, record_key, hold, why))
    if not committing_now:
        # Release or hold: nothing of the handler's is kept.
        if not (yield from _rollback(transactor, h)):
            return Finalized(Outcome.SETTLED, command, None, True)
        return Finalized(Outcome.SETTLED, (yield from _run_after_rollback(transactor, h, command)), None, False)
    committing = False
    try:
        if hasattr(transactor, "finish"):
            # The completion and COMMIT in one round trip (psycopg's pipeline): a
            # completion that matches no row aborts the transaction (LeaseLost).
            faultpoints.reach("before-commit", fault_connection)
            committing = True
            yield _call(transactor, "finish", h, command)
        else:
            yield _call(transactor, "run", h, command, in_transaction=True)
            faultpoints.reach("before-commit", fault_connection)
            committing = True
            yield _call(transactor, "commit", h)
    except TransactionControlled as exc:
        return (yield from _ended(transactor, h, record_key, hold, str(exc)))
    except Exception as exc:
        kind = "lease_lost" if isinstance(exc, LeaseLost) else transactor.kind(exc)
        if isinstance(exc, faultpoints.InjectedFault):
            kind = "failed"
        if kind == "lost":
            return (yield from _resolve(transactor, record_key, token, exc, committing))
        broken = not (yield from _rollback(transactor, h))
        if kind == "lease_lost":
            return Finalized(Outcome.LEASE_LOST, None, exc, broken)
        release = Release(record_key, token)
        followup = release if broken else (yield from _run_after_rollback(transactor, h, release))
        if kind == "conflict":
            error: Exception = TransactionConflict(f"record {record_key}: {describe(exc)}")
            outcome = Outcome.CONFLICT
        else:
            error = CommitFailed(f"record {record_key}: {describe(exc)}")
            outcome = Outcome.FAILED
        error.__cause__ = driver_error(exc)  # a SQLAlchemy error's text holds the statement's parameters
        return Finalized(outcome, followup, error, broken)
    faultpoints.reach("after-commit", fault_connection)
    return Finalized(Outcome.COMMITTED, None, None, False)


_ENDED_REASON = "the handler ended the transaction"


def _ended(
    transactor: Transactor | AsyncTransactor, h: Any, record_key: str, hold: Settle, why: str
) -> Generator[Call, Any, Finalized]:
    """The handler ended idempo's transaction: roll back what is open, hold the key (see the module docstring)."""
    error = TransactionControlled(
        f"record {record_key}: the handler ended, or tried to end, idempo's transaction ({why}); what it "
        "committed, if anything, stays, so the key is held (retries get 409 outcome-unknown) until the hold expires"
    )
    if not (yield from _rollback(transactor, h)):
        return Finalized(Outcome.ENDED, hold, error, True)
    return Finalized(Outcome.ENDED, (yield from _run_after_rollback(transactor, h, hold)), error, False)


def _rollback(transactor: Transactor | AsyncTransactor, h: Any) -> Generator[Call, Any, bool]:
    """ROLLBACK; False when it failed (the connection is broken: the server aborts the transaction)."""
    try:
        yield _call(transactor, "rollback", h)
    except Exception as exc:
        logger.warning("idempo: rolling back a transaction failed (%s); the connection is discarded", describe(exc))
        return False
    return True


def _run_after_rollback(
    transactor: Transactor | AsyncTransactor, h: Any, command: Settle
) -> Generator[Call, Any, Settle | None]:
    """Settle on the same connection after a rollback; the command back for the store's path if that failed."""
    try:
        yield _call(transactor, "run", h, command, in_transaction=False)
    except LeaseLost:
        logger.warning("idempo: record %s was taken over; nothing to release", command.record_key)
    except Exception as exc:
        logger.warning(
            "idempo: settling record %s after a rollback failed (%s); retrying", command.record_key, describe(exc)
        )
        return command
    return None


def _resolve(
    transactor: Transactor | AsyncTransactor, record_key: str, token: int, exc: Exception, committing: bool
) -> Generator[Call, Any, Finalized]:
    """The connection was lost: the record, read on a fresh connection, says whether COMMIT happened."""
    if committing:
        try:
            record: Record | None = yield _call(transactor, "resolve", record_key)
        except Exception as read_error:
            logger.warning("idempo: reading record %s after a lost COMMIT failed: %s", record_key, describe(read_error))
        else:
            if (
                record is not None
                and record.state is RecordState.COMPLETED
                and record.token == token
                and record.marker is None
            ):
                return Finalized(Outcome.COMMITTED, None, None, True)
    error = CommitUnknown(f"record {record_key}: the connection was lost ({describe(exc)})")
    error.__cause__ = driver_error(exc)
    # Token-checked: a no-op if the COMMIT did land (the record is completed, not in progress).
    return Finalized(Outcome.UNKNOWN, Release(record_key, token), error, True)


def unreleased_unknown(finalized: Finalized) -> bool:
    """Whether an unknown outcome still has its token-checked release to make."""
    return finalized.outcome is Outcome.UNKNOWN and isinstance(finalized.followup, Release)


def landed_or_not(finalized: Finalized, record_key: str, token: int, record: Record | Exception | None) -> Finalized:
    """The release after an unknown COMMIT was refused: the record (read again, or the read's error) says why.

    Completed under our token: the COMMIT landed after all (the statement
    ran on, or the release waited for its row lock), so the outcome is
    COMMITTED and the response goes out. Otherwise another request holds the
    record, or it is gone: nothing to release, the outcome stays unknown.
    """
    if isinstance(record, Exception):
        logger.warning(
            "idempo: record %s: the release after an unknown COMMIT was refused and reading the record failed "
            "(%s); a retry with the key gets what the record holds",
            record_key,
            describe(record),
        )
        return finalized._replace(followup=None)
    if record is not None and record.state is RecordState.COMPLETED and record.token == token and record.marker is None:
        # WARNING: the COMMIT outlived finalisation or its connection (slow storage, a replication stall).
        logger.warning("idempo: record %s: the COMMIT of unknown outcome did land; the response goes out", record_key)
        return Finalized(Outcome.COMMITTED, None, None, finalized.broken)
    logger.warning(
        "idempo: record %s: not released after an unknown COMMIT: %s",
        record_key,
        "it is gone" if record is None else "another request holds it now",
    )
    return finalized._replace(followup=None)


def problem_for(outcome: Outcome, error: Exception | None, policy: Policy) -> StoredResponse | None:
    """The answer a route sends instead of the app's for a transactional outcome; None: send the app's."""
    detail = str(error) if error is not None else ""
    if outcome is Outcome.LEASE_LOST:
        return problem_response(
            LEASE_LOST, "The lease expired and another request took this key over.", retry_after=policy.retry_after
        )
    if outcome is Outcome.CONFLICT:
        return problem_response(
            TRANSACTION_CONFLICT, "The database rolled the transaction back to resolve a conflict.", retry_after=1
        )
    if outcome is Outcome.UNKNOWN:
        return problem_response(
            COMMIT_UNKNOWN,
            "The database did not confirm COMMIT (the connection was lost, or it took too long), so whether the "
            "writes committed is unknown. Retry with the same Idempotency-Key: it is answered with the committed "
            "response if they did, and runs once more if they did not.",
            retry_after=1,
        )
    if outcome is Outcome.ENDED:
        return problem_response(
            TRANSACTION_ENDED,
            "The handler committed or rolled back the transaction idempo commits with the record, so its writes "
            "may have committed: this Idempotency-Key is held and will not run again. Let idempo commit "
            "(use a savepoint for a partial rollback).",
        )
    if outcome is Outcome.FAILED:
        del detail  # the database's message stays in the log, not in the answer
        return problem_response(COMMIT_FAILED, "The transaction could not be committed.")
    return None


def _error_for(finalized: Finalized) -> Exception | None:
    if finalized.outcome is Outcome.LEASE_LOST:
        error = TransactionError("the lease was taken over while the call ran; its transaction rolled back")
        error.__cause__ = finalized.error
        return error
    return finalized.error


class TransactionalMixin:
    """What the blocking and the async transactional executions share."""

    record_key: str
    token: int
    policy: Policy
    observation: RequestObservation | None
    settled: bool

    def __init__(
        self,
        store: Any,
        policy: Policy,
        record_key: str,
        token: int,
        observation: RequestObservation | None,
        transactor: Transactor | AsyncTransactor | None,
    ) -> None:
        """The execution's arguments, and ``transactor``: the store's (None: only a front's own can be used)."""
        super().__init__(store, policy, record_key, token, observation)  # type: ignore[call-arg]
        self.transactor = transactor
        self.used: Any = None
        self.tx: Transaction | AsyncTransaction | None = None
        self.handle: Any = None
        self.outcome = Outcome.SETTLED
        #: The error behind a non-committed outcome (TransactionConflict, CommitFailed, CommitUnknown ...).
        self.error: Exception | None = None

    @property
    def transactional_open(self) -> bool:
        """Whether the handler opened the transaction (the front must buffer the whole response)."""
        return self.tx is not None

    def _check_open(self, transactor: Any) -> Any:
        if self.settled:
            raise TransactionClosed(f"record {self.record_key} is already settled; its transaction is finished")
        chosen = transactor if transactor is not None else self.transactor
        if chosen is None:
            raise ConfigurationError("this store cannot run transactional executions (PostgreSQL or SQLite only)")
        return chosen

    def _opened(self, chosen: Any, handle: Any, cls: type[_TransactionBase]) -> Any:
        self.used, self.handle = chosen, handle
        tx = cls(chosen.connection(handle), chosen.session(handle), self.record_key, self.token)
        self.tx = tx  # type: ignore[assignment]
        return tx

    def _finished(self, finalized: Finalized, command: Settle) -> Settle | None:
        """Record the outcome; tell the observation; return the follow-up for the store's path."""
        assert self.tx is not None
        self.tx.closed = True
        self.outcome = finalized.outcome
        self.error = finalized.error
        if finalized.followup is None and self.observation is not None:
            try:
                told: Settle = (
                    command
                    if finalized.outcome in (Outcome.COMMITTED, Outcome.SETTLED)
                    else self._hold()
                    if finalized.outcome is Outcome.ENDED
                    else Release(self.record_key, self.token)
                )
                self.observation.settled(told, LeaseLost() if finalized.outcome is Outcome.LEASE_LOST else None)
            except Exception:
                logger.exception("idempo: recording the settle of record %s failed", self.record_key)
        if finalized.outcome not in (Outcome.COMMITTED, Outcome.SETTLED):
            logger.warning(
                "idempo: the transaction of record %s did not commit (%s): %s",
                self.record_key,
                finalized.outcome.value,
                finalized.error,
                extra={"idempo_event": f"transaction_{finalized.outcome.value}", "idempo_record_key": self.record_key},
            )
        return finalized.followup

    def _hold(self) -> Settle:
        """The command that holds the key when the handler ended the transaction (the policy's hold TTL)."""
        return finish(self.policy, self.record_key, self.token, None, verdict=Verdict.HOLD, reason=_ENDED_REASON)

    def problem(self) -> StoredResponse | None:
        """The answer to send instead of the app's (LEASE_LOST 409, CONFLICT/UNKNOWN 503, FAILED 500), or None."""
        return problem_for(self.outcome, self.error, self.policy)

    def call_error(self) -> Exception | None:
        """What ``@idempotent`` raises for a non-committed outcome (None: committed or settled)."""
        return _error_for(Finalized(self.outcome, None, self.error))

    def before_send(self) -> None:
        """Reach the ``before-send`` fault point (the fronts call it just before the response leaves)."""
        if self.tx is not None:
            faultpoints.reach("before-send", None)
