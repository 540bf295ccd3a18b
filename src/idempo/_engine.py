"""Drivers: carry out the commands of the sans-I/O flow against a store.

``begin_sync`` / ``begin_async`` run the protocol to its decision (the first
``begin`` inline, :func:`idempo._core.flow.begin_flow` only for a key that is
in progress); ``drive_sync`` / ``drive_async`` run a flow generator to its
decision; ``settle_sync`` / ``settle_async`` carry out the one command that
settles a record after the handler ran. They are the only place the fronts
(ASGI, WSGI, the decorator) touch a store, so the error handling is written
once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator

import anyio

from ._core.flow import Begin, Complete, Decision, Extend, Release, Sleep, begin_flow, decide
from ._core.policy import Policy
from ._core.records import BeginResult, Existing, StoredResponse
from .exceptions import LeaseLost, StoreError
from .typing import AsyncStore, Store

__all__ = [
    "begin_async",
    "begin_sync",
    "complete_async",
    "complete_sync",
    "drive_async",
    "drive_sync",
    "logger",
    "settle_async",
    "settle_sync",
]

#: The logger every idempo component logs to.
logger = logging.getLogger("idempo")

Flow = Generator[Begin | Sleep, BeginResult | None, Decision]
Settle = Complete | Release | Extend


def begin_sync(store: Store, record_key: str, fingerprint: str, policy: Policy) -> Decision:
    """Return what this request does: ``drive_sync(begin_flow(...), store)``, one call cheaper.

    The first ``begin`` is made here and classified by
    :func:`~idempo._core.flow.decide`; only a key still in progress goes on
    to the flow (wait mode, 409), from that first result. Same store calls,
    same decisions, no generator on the common path.

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    result = store.begin(record_key, fingerprint, policy.lease_ttl_ms)
    decision = decide(result, fingerprint)
    if decision is not None:
        return decision
    assert isinstance(result, Existing)
    return drive_sync(begin_flow(record_key, fingerprint, policy, first=result), store)


async def begin_async(store: AsyncStore, record_key: str, fingerprint: str, policy: Policy) -> Decision:
    """The async twin of :func:`begin_sync`.

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    result = await store.begin(record_key, fingerprint, policy.lease_ttl_ms)
    decision = decide(result, fingerprint)
    if decision is not None:
        return decision
    assert isinstance(result, Existing)
    return await drive_async(begin_flow(record_key, fingerprint, policy, first=result), store)


def drive_sync(flow: Flow, store: Store) -> Decision:
    """Run a flow against a blocking store; return its decision.

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    try:
        command = next(flow)
        while True:
            if isinstance(command, Begin):
                result: BeginResult | None = store.begin(command.record_key, command.fingerprint, command.lease_ttl_ms)
            else:
                time.sleep(command.seconds)
                result = None
            command = flow.send(result)
    except StopIteration as stop:
        decision: Decision = stop.value
        return decision


async def drive_async(flow: Flow, store: AsyncStore) -> Decision:
    """Run a flow against an async store; return its decision.

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    try:
        command = next(flow)
        while True:
            if isinstance(command, Begin):
                result: BeginResult | None = await store.begin(
                    command.record_key, command.fingerprint, command.lease_ttl_ms
                )
            else:
                await anyio.sleep(command.seconds)
                result = None
            command = flow.send(result)
    except StopIteration as stop:
        decision: Decision = stop.value
        return decision


def settle_sync(store: Store, command: Settle) -> bool:
    """Carry out a settling command; return True when the store took it.

    Never raises for the store: the handler already ran and its answer must
    still reach the client. A store failure leaves the record in progress
    until its lease expires (a retry meanwhile gets 409, never a second
    execution; shared/cases B18); a lost lease means another request took
    the record over. Both are logged.
    """
    if isinstance(command, Complete):
        return complete_sync(store, command.record_key, command.token, command.response, command.record_ttl_ms)
    try:
        if isinstance(command, Release):
            store.release(command.record_key, command.token)
        else:
            store.extend(command.record_key, command.token, command.lease_ttl_ms)
    except (StoreError, LeaseLost) as exc:
        _log_settle_failure(type(command).__name__.lower(), command.record_key, exc)
        return False
    return True


async def settle_async(store: AsyncStore, command: Settle) -> bool:
    """The async twin of :func:`settle_sync`."""
    if isinstance(command, Complete):
        return await complete_async(store, command.record_key, command.token, command.response, command.record_ttl_ms)
    try:
        if isinstance(command, Release):
            await store.release(command.record_key, command.token)
        else:
            await store.extend(command.record_key, command.token, command.lease_ttl_ms)
    except (StoreError, LeaseLost) as exc:
        _log_settle_failure(type(command).__name__.lower(), command.record_key, exc)
        return False
    return True


def complete_sync(store: Store, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> bool:
    """``settle_sync(store, Complete(...))`` without the command object: the common outcome's fast path.

    Returns True when the store took the response; never raises for the
    store (see :func:`settle_sync`).
    """
    try:
        store.complete(record_key, token, response, record_ttl_ms)
    except (StoreError, LeaseLost) as exc:
        _log_settle_failure("complete", record_key, exc)
        return False
    return True


async def complete_async(
    store: AsyncStore, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int
) -> bool:
    """The async twin of :func:`complete_sync`."""
    try:
        await store.complete(record_key, token, response, record_ttl_ms)
    except (StoreError, LeaseLost) as exc:
        _log_settle_failure("complete", record_key, exc)
        return False
    return True


def _log_settle_failure(action: str, record_key: str, exc: BaseException) -> None:
    if isinstance(exc, LeaseLost):
        logger.warning(
            "idempo: %s refused, the lease was taken over (record %s); this result was not stored",
            action,
            record_key,
        )
    else:
        logger.error(
            "idempo: %s failed (record %s): %s; the record stays in progress until its lease expires",
            action,
            record_key,
            exc,
        )
