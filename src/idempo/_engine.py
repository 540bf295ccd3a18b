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
from ._core.records import BeginResult, Existing
from .exceptions import LeaseLost, StoreError
from .observability import RequestObservation, store_call_async, store_call_sync
from .typing import AsyncStore, Store

__all__ = [
    "begin_async",
    "begin_sync",
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


def begin_sync(
    store: Store, record_key: str, fingerprint: str, policy: Policy, observation: RequestObservation | None = None
) -> Decision:
    """Return what this request does: ``drive_sync(begin_flow(...), store)``, one call cheaper.

    The first ``begin`` is made here and classified by
    :func:`~idempo._core.flow.decide`; only a key still in progress goes on
    to the flow (wait mode, 409), from that first result. Same store calls,
    same decisions, no generator on the common path. ``observation``, when
    given, is told the store time and the decision.

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    result = store_call_sync(observation, store, "begin", store.begin, record_key, fingerprint, policy.lease_ttl_ms)
    decision = decide(result, fingerprint)
    if decision is None:
        assert isinstance(result, Existing)
        return drive_sync(begin_flow(record_key, fingerprint, policy, first=result), store, observation)
    if observation is not None:
        observation.decided(decision)
    return decision


async def begin_async(
    store: AsyncStore, record_key: str, fingerprint: str, policy: Policy, observation: RequestObservation | None = None
) -> Decision:
    """The async twin of :func:`begin_sync`.

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    call = store.begin(record_key, fingerprint, policy.lease_ttl_ms)
    result = await store_call_async(observation, store, "begin", call)
    decision = decide(result, fingerprint)
    if decision is None:
        assert isinstance(result, Existing)
        return await drive_async(begin_flow(record_key, fingerprint, policy, first=result), store, observation)
    if observation is not None:
        observation.decided(decision)
    return decision


def drive_sync(flow: Flow, store: Store, observation: RequestObservation | None = None) -> Decision:
    """Run a flow against a blocking store; return its decision.

    ``observation``, when given, is told the store time and the decision.

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    try:
        command = next(flow)
        while True:
            if isinstance(command, Begin):
                args = (command.record_key, command.fingerprint, command.lease_ttl_ms)
                result: BeginResult | None = store_call_sync(observation, store, "begin", store.begin, *args)
            else:
                time.sleep(command.seconds)
                result = None
            command = flow.send(result)
    except StopIteration as stop:
        decision: Decision = stop.value
        if observation is not None:
            observation.decided(decision)
        return decision


async def drive_async(flow: Flow, store: AsyncStore, observation: RequestObservation | None = None) -> Decision:
    """Run a flow against an async store; return its decision (see :func:`drive_sync`).

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    try:
        command = next(flow)
        while True:
            if isinstance(command, Begin):
                call = store.begin(command.record_key, command.fingerprint, command.lease_ttl_ms)
                result: BeginResult | None = await store_call_async(observation, store, "begin", call)
            else:
                await anyio.sleep(command.seconds)
                result = None
            command = flow.send(result)
    except StopIteration as stop:
        decision: Decision = stop.value
        if observation is not None:
            observation.decided(decision)
        return decision


def settle_sync(store: Store, command: Settle, observation: RequestObservation | None = None) -> bool:
    """Carry out a settling command; return True when the store took it.

    Never raises for the store: the handler already ran and its answer must
    still reach the client. A store failure leaves the record in progress
    until its lease expires (a retry meanwhile gets 409, never a second
    execution; shared/cases B18); a lost lease means another request took
    the record over. Both are logged. ``observation``, when given, is told
    the verdict, the failure and the store time.
    """
    try:
        if isinstance(command, Complete):
            args: tuple[object, ...] = (command.record_key, command.token, command.response, command.record_ttl_ms)
            store_call_sync(observation, store, "complete", store.complete, *args)
        elif isinstance(command, Release):
            store_call_sync(observation, store, "release", store.release, command.record_key, command.token)
        else:
            args = (command.record_key, command.token, command.lease_ttl_ms)
            store_call_sync(observation, store, "extend", store.extend, *args)
    except (StoreError, LeaseLost) as exc:
        _log_settle_failure(command, exc)
        if observation is not None:
            observation.settled(command, exc)
        return False
    if observation is not None:
        observation.settled(command, None)
    return True


async def settle_async(store: AsyncStore, command: Settle, observation: RequestObservation | None = None) -> bool:
    """The async twin of :func:`settle_sync`."""
    try:
        if isinstance(command, Complete):
            call = store.complete(command.record_key, command.token, command.response, command.record_ttl_ms)
            await store_call_async(observation, store, "complete", call)
        elif isinstance(command, Release):
            await store_call_async(observation, store, "release", store.release(command.record_key, command.token))
        else:
            call = store.extend(command.record_key, command.token, command.lease_ttl_ms)
            await store_call_async(observation, store, "extend", call)
    except (StoreError, LeaseLost) as exc:
        _log_settle_failure(command, exc)
        if observation is not None:
            observation.settled(command, exc)
        return False
    if observation is not None:
        observation.settled(command, None)
    return True


def _log_settle_failure(command: Settle, exc: BaseException) -> None:
    action = type(command).__name__.lower()
    extra = {"idempo_event": "", "idempo_operation": action, "idempo_record_key": command.record_key}
    if isinstance(exc, LeaseLost):
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
            "idempo: %s failed (record %s): %s; the record stays in progress until its lease expires",
            action,
            command.record_key,
            exc,
            extra=extra,
        )
