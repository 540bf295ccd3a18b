# Generated from ../_async/store.py by scripts/unasync: do not edit. Edit that file and run
# `.venv/bin/python scripts/unasync`; `scripts/unasync --check` (scripts/test) fails on a difference.
"""The settling store call, written once, async: ``settle_once_async`` and ``settle_async``.

``_engine/_sync/store.py`` (``settle_once_sync``, ``settle_sync``) is
generated from it by ``scripts/unasync``. Which store method and arguments a
command means, and the log of a failed settle, are in :mod:`idempo._engine.store`.
"""

from __future__ import annotations

from ...observability._observation import RequestObservation, logger, store_call_sync
from ...typing import Store
from ..store import Settle, log_settle_failure, store_call

__all__ = ["settle_sync", "settle_once_sync"]


def settle_sync(store: Store, command: Settle, observation: RequestObservation | None = None) -> bool:
    """Carry out a settling command once; return True when the store took it (the call below, which never raises)."""
    return settle_once_sync(store, command, observation) is None


def settle_once_sync(store: Store, command: Settle, observation: RequestObservation | None = None) -> Exception | None:
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
        store_call_sync(observation, store, operation, getattr(store, operation), *args)
    except Exception as exc:  # a StoreError, LeaseLost, or a third-party store's own error
        error = exc
        log_settle_failure(command, exc)
    if observation is not None:
        try:
            observation.settled(command, error)
        except Exception:  # an observation's failure must not undo a settle
            logger.exception("idempo: recording the settle of record %s failed", command.record_key)
    return error
