"""The exceptions idempo raises.

Every exception derives from :class:`IdempoError`::

    IdempoError
    ├── ConfigurationError        bad Policy, store URL or argument; raised at construction
    ├── KeyRejected               the request cannot proceed under its key (.status_code)
    │   ├── MissingKey            400: the route requires a key and none was sent
    │   ├── InvalidKey            400: the header is not one valid key
    │   ├── KeyInProgress         409: the first request with this key is still running
    │   ├── KeyHeld               409: the first outcome is unknown; the key is held
    │   ├── ResultNotReplayable   410: the first answer was not kept; it will not run again
    │   └── FingerprintMismatch   422: the key was used for a different request
    ├── LeaseLost                 complete/release/extend found another lease token
    └── StoreError                the store failed; the original error is in __cause__
        └── StoreUnavailable      the store could not be reached (connection, timeout)

Normal outcomes (replay, in progress, mismatch) are return values inside the
core; they become :class:`KeyRejected` subclasses only at the edge, for the
``@idempotent`` decorator and the client. The HTTP middleware turns them into
problem responses instead (RFC 9457).

A message defaults to the class docstring, so ``raise LeaseLost()`` still says
what happened.
"""

from __future__ import annotations

__all__ = [
    "CommitFailed",
    "CommitUnknown",
    "ConfigurationError",
    "FingerprintMismatch",
    "IdempoError",
    "InvalidKey",
    "KeyHeld",
    "KeyInProgress",
    "KeyRejected",
    "LeaseLost",
    "MissingKey",
    "ResultNotReplayable",
    "StoreError",
    "StoreUnavailable",
    "TransactionClosed",
    "TransactionConflict",
    "TransactionControlled",
    "TransactionError",
]


class IdempoError(Exception):
    """An idempo error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip().splitlines()[0])


class ConfigurationError(IdempoError):
    """idempo was configured with a value it cannot use."""


class KeyRejected(IdempoError):
    """The request cannot proceed under its idempotency key.

    Attributes:
        status_code: the HTTP status an adapter answers with (400, 409, 410 or 422).
    """

    status_code: int = 400


class MissingKey(KeyRejected):
    """The route requires an Idempotency-Key header and the request has none."""

    status_code = 400


class InvalidKey(KeyRejected):
    """The Idempotency-Key header is not one valid key.

    The IETF draft (draft-ietf-httpapi-idempotency-key-header, section 2.1)
    defines the value as one RFC 8941 sf-string; idempo also accepts the bare
    token form most clients send. Anything else is rejected.
    """

    status_code = 400


class KeyInProgress(KeyRejected):
    """A request with this idempotency key is still being processed.

    Attributes:
        retry_after: seconds (int) after which a retry may find the result.
    """

    status_code = 409

    def __init__(self, message: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class KeyHeld(KeyRejected):
    """The first request with this idempotency key has an unknown outcome, so the key is held.

    Neither replayed nor executed again until the record expires
    (``Policy.hold_ttl``) or an operator resolves it (``idempo resolve``):
    a HOLD verdict, or a takeover under ``on_takeover="hold"``.

    Attributes:
        reason: why it is held, e.g. ``"takeover"`` or ``"exception TimeoutError"``.
    """

    status_code = 409

    def __init__(self, message: str | None = None, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class ResultNotReplayable(KeyRejected):
    """The first request with this idempotency key ran, but its answer was not kept; it will not run again.

    The answer was larger than ``Policy.max_response_body``, or the store
    would not take it within ``Policy.save_retry_for``.
    """

    status_code = 410


class FingerprintMismatch(KeyRejected):
    """The idempotency key was already used for a different request.

    The draft (section 2.7) asks for 422 when a key is reused with another
    payload; idempo compares the request fingerprint.
    """

    status_code = 422


class LeaseLost(IdempoError):
    """The lease token no longer matches the record: this result was not stored.

    The lease expired and another request took the record over (its fencing
    token is newer), or the record expired and was purged.
    """


class StoreError(IdempoError):
    """The store failed; the original exception is in ``__cause__``."""


class StoreUnavailable(StoreError):
    """The store could not be reached (connection refused, reset or timed out)."""


class TransactionError(IdempoError):
    """A transactional execution's transaction did not commit; the record was released (a retry executes).

    The handler's writes were rolled back with it (DESIGN "transactional route").
    """


class TransactionConflict(TransactionError):
    """The database aborted the transaction to resolve a conflict: a serialization failure (SQLSTATE
    40001), a deadlock (40P01), a lock not available (55P03), or SQLite's write lock busy past its timeout.

    Nothing of the attempt remains; running it again is safe. ``@idempotent(transactional=True)``
    retries it in process (``Policy``-independent: 3 attempts, jittered); an HTTP route answers
    503 ``transaction-conflict`` with ``Retry-After``.

    Attributes:
        retry_after: seconds (int) a client should wait before retrying.
    """

    def __init__(self, message: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CommitFailed(TransactionError):
    """COMMIT (or the record's completion) failed for a definite reason other than a conflict,
    such as a deferred constraint; the transaction rolled back. An HTTP route answers 500."""


class CommitUnknown(TransactionError):
    """The connection was lost during COMMIT and the record, read again on a fresh connection, does not
    hold this execution's result: the lease was released (fenced by its token) and a retry executes.
    An HTTP route answers 503 ``commit-unknown`` with ``Retry-After``."""


class TransactionControlled(IdempoError):
    """idempo controls this transaction: the handler may not commit, roll back or close its connection.

    The record's completion is the transaction's last statement; idempo commits it
    (or rolls it back) once the handler returned. Use a savepoint for a partial rollback.
    Raised where the handler tries (the SQLite proxy; on a SQLAlchemy engine, ``Connection.commit()``
    or a COMMIT / END / ROLLBACK statement, see idempo.stores._sqlalchemy), and by ``@idempotent`` when the
    handler did end the transaction: the key is then held (an HTTP route answers 500
    ``transaction-ended``; retries get 409 ``outcome-unknown``).
    """


class TransactionClosed(IdempoError):
    """The transaction was already committed or rolled back (it is used after the handler returned,
    e.g. from a background task)."""
