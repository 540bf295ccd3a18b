"""The settling store call, written once, async: ``settle_once_async`` and ``settle_async``.

``_engine/_sync/store.py`` (``settle_once_sync``, ``settle_sync``) is
generated from it by ``scripts/unasync``. Which store method and arguments a
command means, and the log of a failed settle, are in :mod:`idempo._engine.store`.
"""

from __future__ import annotations

from ...observability._observation import RequestObservation, logger, store_call_async
from ...typing import AsyncStore
from ..store import Settle, log_settle_failure, store_call

__all__ = ["settle_async", "settle_once_async"]


async def settle_async(store: AsyncStore, command: Settle, observation: RequestObservation | None = None) -> bool:
    """Carry out a settling command once; return True when the store took it (the call below, which never raises)."""
    return await settle_once_async(store, command, observation) is None


async def settle_once_async(
    store: AsyncStore, command: Settle, observation: RequestObservation | None = None
) -> Exception | None:
    """Make the store call of a settling command once; return None when the store took it, else the error.

    Never raises: the handler already ran and its answer must still reach
    the client. The error (LeaseLost: another request took the record over;
    any other: the store failed, and the lease keeper's ``save``
    (:mod:`idempo._engine.lease`) retries it) is logged and told to
    ``observation`` with the verdict and the store time.
    """
    operation, args = store_call(command)
    error: Exception | None = None
    try:
        await store_call_async(observation, store, operation, getattr(store, operation), *args)
    except Exception as exc:  # a StoreError, LeaseLost, or a third-party store's own error
        error = exc
        log_settle_failure(command, exc)
    if observation is not None:
        try:
            observation.settled(command, error)
        except Exception:  # an observation's failure must not undo a settle
            logger.exception("idempo: recording the settle of record %s failed", command.record_key)
    return error
