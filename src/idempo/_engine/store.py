"""The store calls that settle a record: the one place a settling command becomes a store call.

``settle_once_sync`` / ``settle_once_async`` make the call of a settling
command (:class:`~idempo._core.flow.Complete`, ``Release``, ``Extend``)
once, timed for the request's observation, and never raise for the store:
the handler already ran and its answer must still reach the client
(:mod:`idempo._engine.lease` retries a failed save). ``call_store_sync`` /
``call_store_async`` make the same call untimed and raising, for those
background retries. Which store method and arguments a command means is
written once, in :func:`store_call`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, cast

from .._core.flow import Complete, Extend, Release
from ..exceptions import LeaseLost
from ..observability._observation import RequestObservation, logger, store_call_async, store_call_sync
from ..typing import AsyncStore, Store

__all__ = [
    "Settle",
    "call_store_async",
    "call_store_sync",
    "settle_async",
    "settle_once_async",
    "settle_once_sync",
    "settle_sync",
    "store_call",
]

#: A command that settles a record (or, ``Extend``, keeps its lease).
Settle = Complete | Release | Extend


def store_call(command: Settle) -> tuple[str, tuple[object, ...]]:
    """The store method a settling command calls (``"complete"``, ``"release"``, ``"extend"``) and its arguments."""
    if isinstance(command, Complete):
        return "complete", (command.record_key, command.token, command.response, command.record_ttl_ms)
    if isinstance(command, Release):
        return "release", (command.record_key, command.token)
    return "extend", (command.record_key, command.token, command.lease_ttl_ms)


def settle_sync(store: Store, command: Settle, observation: RequestObservation | None = None) -> bool:
    """Carry out a settling command once; return True when the store took it (see :func:`settle_once_sync`)."""
    return settle_once_sync(store, command, observation) is None


async def settle_async(store: AsyncStore, command: Settle, observation: RequestObservation | None = None) -> bool:
    """The async twin of :func:`settle_sync`."""
    return await settle_once_async(store, command, observation) is None


def settle_once_sync(store: Store, command: Settle, observation: RequestObservation | None = None) -> Exception | None:
    """Make the store call of a settling command once; return None when the store took it, else the error.

    Never raises: the handler already ran and its answer must still reach
    the client. The error (LeaseLost: another request took the record over;
    any other: the store failed, and :meth:`idempo._engine.lease.LeaseKeeper.save`
    retries it) is logged and told to ``observation`` with the verdict and
    the store time.
    """
    operation, args = store_call(command)
    error: Exception | None = None
    try:
        store_call_sync(observation, store, operation, getattr(store, operation), *args)
    except Exception as exc:  # a StoreError, LeaseLost, or a third-party store's own error
        error = exc
        _log_settle_failure(command, exc)
    if observation is not None:
        try:
            observation.settled(command, error)
        except Exception:  # an observation's failure must not undo a settle
            logger.exception("idempo: recording the settle of record %s failed", command.record_key)
    return error


async def settle_once_async(
    store: AsyncStore, command: Settle, observation: RequestObservation | None = None
) -> Exception | None:
    """The async twin of :func:`settle_once_sync`."""
    operation, args = store_call(command)
    error: Exception | None = None
    try:
        await store_call_async(observation, store, operation, getattr(store, operation), *args)
    except Exception as exc:  # a StoreError, LeaseLost, or a third-party store's own error
        error = exc
        _log_settle_failure(command, exc)
    if observation is not None:
        try:
            observation.settled(command, error)
        except Exception:  # an observation's failure must not undo a settle
            logger.exception("idempo: recording the settle of record %s failed", command.record_key)
    return error


def call_store_sync(store: Store, command: Settle) -> None:
    """Make a settling command's store call, untimed (a background retry); raises what the store raises."""
    operation, args = store_call(command)
    getattr(store, operation)(*args)


async def call_store_async(store: AsyncStore, command: Settle) -> None:
    """The async twin of :func:`call_store_sync`."""
    operation, args = store_call(command)
    await cast(Awaitable[Any], getattr(store, operation)(*args))


def _log_settle_failure(command: Settle, exc: BaseException) -> None:
    action = type(command).__name__.lower()
    extra = {"idempo_event": "", "idempo_operation": action, "idempo_record_key": command.record_key}
    if isinstance(exc, LeaseLost) and isinstance(command, Release):
        # The record was not read: a release is refused when another request
        # took the record over, when it is gone, and when a COMMIT of unknown
        # outcome completed it under this very lease (REVIEW-TX F9), so the
        # message names all three instead of a takeover that may not be.
        extra["idempo_event"] = "lease_lost"
        logger.warning(
            "idempo: release refused (record %s): the record is no longer in progress under this request's lease "
            "(taken over, gone, or completed under it by a COMMIT that landed); nothing to release",
            command.record_key,
            extra=extra,
        )
    elif isinstance(exc, LeaseLost):
        extra["idempo_event"] = "lease_lost"
        logger.warning(
            "idempo: %s refused, the lease was taken over (record %s); this result was not stored",
            action,
            command.record_key,
            extra=extra,
        )
    else:
        extra["idempo_event"] = "store_error"
        logger.error(
            "idempo: %s failed (record %s): %s; the lease is kept and the save retried (Policy.save_retry_for)",
            action,
            command.record_key,
            exc,
            extra=extra,
        )
