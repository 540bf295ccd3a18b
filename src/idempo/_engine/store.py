"""The store calls that settle a record: the one place a settling command becomes a store call.

``settle_once_async`` (``_engine/_async/store.py``) and its blocking twin
``settle_once_sync`` (``_engine/_sync/store.py``, generated from it by
``scripts/unasync``) make the call of a settling command
(:class:`~idempo._core.flow.Complete`, ``Release``, ``Extend``) once, timed
for the request's observation, and never raise for the store: the handler
already ran and its answer must still reach the client
(:mod:`idempo._engine.lease` retries a failed save). ``call_store_sync`` /
``call_store_async`` make the same call untimed and raising, for those
background retries. Which store method and arguments a command means is
written once, in :func:`store_call`; the log of a failed settle in
:func:`log_settle_failure`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, cast

from .._core.flow import Complete, Extend, Release
from ..exceptions import LeaseLost
from ..observability._observation import logger
from ..typing import AsyncStore, Store

__all__ = ["Settle", "call_store_async", "call_store_sync", "log_settle_failure", "store_call"]

#: A command that settles a record (or, ``Extend``, keeps its lease).
Settle = Complete | Release | Extend


def store_call(command: Settle) -> tuple[str, tuple[object, ...]]:
    """The store method a settling command calls (``"complete"``, ``"release"``, ``"extend"``) and its arguments."""
    if isinstance(command, Complete):
        return "complete", (command.record_key, command.token, command.response, command.record_ttl_ms)
    if isinstance(command, Release):
        return "release", (command.record_key, command.token)
    return "extend", (command.record_key, command.token, command.lease_ttl_ms)


def call_store_sync(store: Store, command: Settle) -> None:
    """Make a settling command's store call, untimed (a background retry); raises what the store raises."""
    operation, args = store_call(command)
    getattr(store, operation)(*args)


async def call_store_async(store: AsyncStore, command: Settle) -> None:
    """The async twin of :func:`call_store_sync`."""
    operation, args = store_call(command)
    await cast(Awaitable[Any], getattr(store, operation)(*args))


def log_settle_failure(command: Settle, exc: BaseException) -> None:
    """Log a settle the store refused (LeaseLost: a warning) or failed (an error: the save is retried)."""
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
