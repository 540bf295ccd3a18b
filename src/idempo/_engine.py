"""Drivers: carry out the commands of the sans-I/O flow against a store.

``begin_sync`` / ``begin_async`` run the protocol to its decision (the first
``begin`` inline, :func:`idempo._core.flow.begin_flow` only for a key that is
in progress), and hold a key taken over under ``on_takeover="hold"``;
``drive_sync`` / ``drive_async`` run a flow generator to its decision;
``settle_once_sync`` / ``settle_once_async`` make the one store call that
settles a record after the handler ran (:mod:`idempo._lease` retries it when
the store fails). They are the only place the fronts (ASGI, WSGI, the
decorator) touch a store, so the error handling is written once.

Wait mode (``Policy.wait``): the duplicates of one running request that wait
in one process are counted per store and record key, at most
``Policy.max_waiters`` (one more gets 409 at once), and they share their
polls: a waiter that wakes after another waiter's ``begin`` answered since it
went to sleep takes that answer instead of asking the store again. So a burst
of duplicates costs one ``begin`` each on arrival, then about one poll per
backoff step for them all, not one per waiter and step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Generator

import anyio

from ._core.flow import (
    Begin,
    Complete,
    Decision,
    Extend,
    Held,
    InProgress,
    LegacyIdentity,
    Proceed,
    Release,
    Replay,
    Sleep,
    begin_flow,
    decide,
    legacy_decision,
    retry_after_seconds,
    takeover_hold,
)
from ._core.policy import Policy
from ._core.records import Acquired, BeginResult, Existing
from .exceptions import LeaseLost
from .observability import RequestObservation, store_call_async, store_call_sync
from .typing import AsyncStore, Store

__all__ = [
    "begin_async",
    "begin_sync",
    "call_store_async",
    "call_store_sync",
    "drive_async",
    "drive_sync",
    "logger",
    "settle_async",
    "settle_once_async",
    "settle_once_sync",
    "settle_sync",
]

#: The logger every idempo component logs to.
logger = logging.getLogger("idempo")

Flow = Generator[Begin | Sleep, BeginResult | None, Decision]
Settle = Complete | Release | Extend


class WaitRoom:
    """The duplicates of one running request waiting in this process, and their latest poll.

    Attributes:
        waiters: how many wait now.
        latest: the last in-progress record a waiter's ``begin`` found, and
            when (``time.monotonic()`` seconds) it answered.
    """

    __slots__ = ("latest", "waiters")

    def __init__(self) -> None:
        self.waiters = 0
        self.latest: tuple[Existing, float] | None = None

    def fresh(self, since: float) -> Existing | None:
        """A poll answered after ``since`` (monotonic seconds), if any: as good as asking again."""
        latest = self.latest
        if latest is not None and latest[1] >= since:
            return latest[0]
        return None

    def found(self, result: BeginResult) -> None:
        """Keep a ``begin`` answer for the other waiters (an in-progress record only: a lease is never shared)."""
        if isinstance(result, Existing):
            self.latest = (result, time.monotonic())


_rooms: dict[tuple[int, str], WaitRoom] = {}
_rooms_lock = threading.Lock()


def _enter_room(store: object, record_key: str, policy: Policy) -> WaitRoom | None:
    """Count one more waiter for ``record_key``; None when ``policy.max_waiters`` already wait."""
    with _rooms_lock:
        room = _rooms.get((id(store), record_key))
        if room is None:
            room = _rooms[(id(store), record_key)] = WaitRoom()
        if room.waiters >= policy.max_waiters:
            return None
        room.waiters += 1
        return room


def _leave_room(store: object, record_key: str, room: WaitRoom) -> None:
    with _rooms_lock:
        room.waiters -= 1
        if room.waiters == 0 and _rooms.get((id(store), record_key)) is room:
            del _rooms[(id(store), record_key)]


def _full(policy: Policy, first: Existing) -> InProgress:
    """The 409 of a duplicate that finds ``max_waiters`` already waiting."""
    return InProgress(retry_after_seconds(policy, first.record.lease_expires_at_ms - first.now_ms))


def begin_sync(
    store: Store,
    record_key: str,
    fingerprint: str,
    policy: Policy,
    observation: RequestObservation | None = None,
    legacy: Callable[[], LegacyIdentity | None] | None = None,
) -> Decision:
    """Return what this request does: ``drive_sync(begin_flow(...), store)``, one call cheaper.

    The first ``begin`` is made here and classified by
    :func:`~idempo._core.flow.decide`; only a key still in progress goes on
    to the flow (wait mode, 409), from that first result. Same store calls,
    same decisions, no generator on the common path. ``observation``, when
    given, is told the store time and the decision.

    A takeover (an expired lease with no result) under
    ``policy.on_takeover == "hold"`` does not proceed: the store gave this
    request the lease atomically, so no other request executes meanwhile, and
    the record is held here (:func:`~idempo._core.flow.takeover_hold`); the
    decision is :class:`~idempo._core.flow.Held` with ``takeover=True``. When
    the store fails to take the hold, the lease lapses and the next request
    holds it again: nothing runs either way.

    ``legacy``: called when the request took a fresh lease; returns where a
    version before keyed digests kept this request's record while the legacy
    window is open, else None. The request then looks there too (one
    ``get``): such a record replays, or answers 422 or 409, as it did before
    the upgrade; a replay is carried over to the new record key for the rest
    of its TTL, and the lease is released otherwise.

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    result = store_call_sync(observation, store, "begin", store.begin, record_key, fingerprint, policy.lease_ttl_ms)
    if legacy is not None and isinstance(result, Acquired) and not result.takeover:
        found = _legacy_sync(store, record_key, result.token, legacy, policy, observation)
        if found is not None:
            if observation is not None:
                observation.decided(found)
            return found
    decision: Decision | None = decide(result, fingerprint)
    if decision is None:
        assert isinstance(result, Existing)
        flow = begin_flow(record_key, fingerprint, policy, first=result)
        if policy.wait <= 0:
            decision = drive_sync(flow, store, observation, decided=False)
        else:
            room = _enter_room(store, record_key, policy)
            if room is None:
                decision = _full(policy, result)
            else:
                try:
                    decision = drive_sync(flow, store, observation, room, decided=False)
                finally:
                    _leave_room(store, record_key, room)
    assert decision is not None
    if type(decision) is Proceed and decision.takeover:
        hold = takeover_hold(policy, record_key, decision.token)
        if hold is not None:
            settle_once_sync(store, hold, None)
            decision = Held("takeover", takeover=True)
    if observation is not None:
        observation.decided(decision)
    return decision


async def begin_async(
    store: AsyncStore,
    record_key: str,
    fingerprint: str,
    policy: Policy,
    observation: RequestObservation | None = None,
    legacy: Callable[[], Awaitable[LegacyIdentity | None]] | None = None,
) -> Decision:
    """The async twin of :func:`begin_sync`.

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    call = store.begin(record_key, fingerprint, policy.lease_ttl_ms)
    result = await store_call_async(observation, store, "begin", call)
    if legacy is not None and isinstance(result, Acquired) and not result.takeover:
        found = await _legacy_async(store, record_key, result.token, legacy, policy, observation)
        if found is not None:
            if observation is not None:
                observation.decided(found)
            return found
    decision: Decision | None = decide(result, fingerprint)
    if decision is None:
        assert isinstance(result, Existing)
        flow = begin_flow(record_key, fingerprint, policy, first=result)
        if policy.wait <= 0:
            decision = await drive_async(flow, store, observation, decided=False)
        else:
            room = _enter_room(store, record_key, policy)
            if room is None:
                decision = _full(policy, result)
            else:
                try:
                    decision = await drive_async(flow, store, observation, room, decided=False)
                finally:
                    _leave_room(store, record_key, room)
    assert decision is not None
    if type(decision) is Proceed and decision.takeover:
        hold = takeover_hold(policy, record_key, decision.token)
        if hold is not None:
            await settle_once_async(store, hold, None)
            decision = Held("takeover", takeover=True)
    if observation is not None:
        observation.decided(decision)
    return decision


def _legacy_settlement(record_key: str, token: int, decision: Decision, expires_at_ms: int) -> Settle:
    """What becomes of the fresh lease once a legacy record decided: its answer carried over, or released."""
    if isinstance(decision, Replay):
        # For the rest of the old record's TTL, by this machine's clock.
        return Complete(record_key, token, decision.response, max(1, expires_at_ms - int(time.time() * 1000)))
    return Release(record_key, token)


def _legacy_sync(
    store: Store,
    record_key: str,
    token: int,
    legacy: Callable[[], LegacyIdentity | None],
    policy: Policy,
    observation: RequestObservation | None,
) -> Decision | None:
    """Look where the older version kept the record; settle the fresh lease by what is there (see begin_sync)."""
    try:
        identity = legacy()
        if identity is None:
            return None
        old = store_call_sync(observation, store, "get", store.get, identity.record_key)
    except Exception:
        settle_once_sync(store, Release(record_key, token))  # nothing decided: give the lease back
        raise
    decision = legacy_decision(old, identity.fingerprint, policy, int(time.time() * 1000))
    if decision is not None:
        assert old is not None
        # Not told to the observation: the request did not run, nothing was settled for it.
        settle_once_sync(store, _legacy_settlement(record_key, token, decision, old.expires_at_ms))
    return decision


async def _legacy_async(
    store: AsyncStore,
    record_key: str,
    token: int,
    legacy: Callable[[], Awaitable[LegacyIdentity | None]],
    policy: Policy,
    observation: RequestObservation | None,
) -> Decision | None:
    """The async twin of :func:`_legacy_sync`."""
    try:
        identity = await legacy()
        if identity is None:
            return None
        old = await store_call_async(observation, store, "get", store.get(identity.record_key))
    except Exception:
        with anyio.CancelScope(shield=True):
            await settle_once_async(store, Release(record_key, token))
        raise
    decision = legacy_decision(old, identity.fingerprint, policy, int(time.time() * 1000))
    if decision is not None:
        assert old is not None
        await settle_once_async(store, _legacy_settlement(record_key, token, decision, old.expires_at_ms))
    return decision


def drive_sync(
    flow: Flow,
    store: Store,
    observation: RequestObservation | None = None,
    room: WaitRoom | None = None,
    *,
    decided: bool = True,
) -> Decision:
    """Run a flow against a blocking store; return its decision.

    ``observation``, when given, is told the store time and (unless
    ``decided`` is False: the caller tells it) the decision.
    ``room``, when given, shares the polls of the waiters of one key (see
    the module docstring).

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    slept_at = time.monotonic()
    try:
        command = next(flow)
        while True:
            if isinstance(command, Begin):
                result: BeginResult | None = room.fresh(slept_at) if room is not None else None
                if result is None:
                    args = (command.record_key, command.fingerprint, command.lease_ttl_ms)
                    result = store_call_sync(observation, store, "begin", store.begin, *args)
                    if room is not None:
                        room.found(result)
            else:
                slept_at = time.monotonic()
                time.sleep(command.seconds)
                result = None
            command = flow.send(result)
    except StopIteration as stop:
        decision: Decision = stop.value
        if observation is not None and decided:
            observation.decided(decision)
        return decision


async def drive_async(
    flow: Flow,
    store: AsyncStore,
    observation: RequestObservation | None = None,
    room: WaitRoom | None = None,
    *,
    decided: bool = True,
) -> Decision:
    """Run a flow against an async store; return its decision (see :func:`drive_sync`).

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    slept_at = time.monotonic()
    try:
        command = next(flow)
        while True:
            if isinstance(command, Begin):
                result: BeginResult | None = room.fresh(slept_at) if room is not None else None
                if result is None:
                    call = store.begin(command.record_key, command.fingerprint, command.lease_ttl_ms)
                    result = await store_call_async(observation, store, "begin", call)
                    if room is not None:
                        room.found(result)
            else:
                slept_at = time.monotonic()
                await anyio.sleep(command.seconds)
                result = None
            command = flow.send(result)
    except StopIteration as stop:
        decision: Decision = stop.value
        if observation is not None and decided:
            observation.decided(decision)
        return decision


def settle_sync(store: Store, command: Settle, observation: RequestObservation | None = None) -> bool:
    """Carry out a settling command once; return True when the store took it (see :func:`settle_once_sync`)."""
    return settle_once_sync(store, command, observation) is None


async def settle_async(store: AsyncStore, command: Settle, observation: RequestObservation | None = None) -> bool:
    """The async twin of :func:`settle_sync`."""
    return await settle_once_async(store, command, observation) is None


def settle_once_sync(store: Store, command: Settle, observation: RequestObservation | None = None) -> Exception | None:
    """Make the store call of a settling command once; return None when the store took it, else the error.

    Never raises for the store: the handler already ran and its answer must
    still reach the client. The error (LeaseLost: another request took the
    record over; any other: the store failed, and
    :meth:`idempo._lease.LeaseKeeper.save` retries it) is logged and told to
    ``observation`` with the verdict and the store time.
    """
    error: Exception | None = None
    try:
        if isinstance(command, Complete):
            args: tuple[object, ...] = (command.record_key, command.token, command.response, command.record_ttl_ms)
            store_call_sync(observation, store, "complete", store.complete, *args)
        elif isinstance(command, Release):
            store_call_sync(observation, store, "release", store.release, command.record_key, command.token)
        else:
            args = (command.record_key, command.token, command.lease_ttl_ms)
            store_call_sync(observation, store, "extend", store.extend, *args)
    except Exception as exc:  # a StoreError, LeaseLost, or a third-party store's own error
        error = exc
        _log_settle_failure(command, exc)
    _tell(observation, command, error)
    return error


async def settle_once_async(
    store: AsyncStore, command: Settle, observation: RequestObservation | None = None
) -> Exception | None:
    """The async twin of :func:`settle_once_sync`."""
    error: Exception | None = None
    try:
        if isinstance(command, Complete):
            call = store.complete(command.record_key, command.token, command.response, command.record_ttl_ms)
            await store_call_async(observation, store, "complete", call)
        elif isinstance(command, Release):
            await store_call_async(observation, store, "release", store.release(command.record_key, command.token))
        else:
            call = store.extend(command.record_key, command.token, command.lease_ttl_ms)
            await store_call_async(observation, store, "extend", call)
    except Exception as exc:  # a StoreError, LeaseLost, or a third-party store's own error
        error = exc
        _log_settle_failure(command, exc)
    _tell(observation, command, error)
    return error


def call_store_sync(store: Store, command: Settle) -> None:
    """Make a settling command's store call, untimed (a background retry); raises what the store raises."""
    if isinstance(command, Complete):
        store.complete(command.record_key, command.token, command.response, command.record_ttl_ms)
    elif isinstance(command, Release):
        store.release(command.record_key, command.token)
    else:
        store.extend(command.record_key, command.token, command.lease_ttl_ms)


async def call_store_async(store: AsyncStore, command: Settle) -> None:
    """The async twin of :func:`call_store_sync`."""
    if isinstance(command, Complete):
        await store.complete(command.record_key, command.token, command.response, command.record_ttl_ms)
    elif isinstance(command, Release):
        await store.release(command.record_key, command.token)
    else:
        await store.extend(command.record_key, command.token, command.lease_ttl_ms)


def _tell(observation: RequestObservation | None, command: Settle, error: Exception | None) -> None:
    if observation is None:
        return
    try:
        observation.settled(command, error)
    except Exception:  # an observation's failure must not undo a settle
        logger.exception("idempo: recording the settle of record %s failed", command.record_key)


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
            "idempo: %s failed (record %s): %s; the lease is kept and the save retried (Policy.save_retry_for)",
            action,
            command.record_key,
            exc,
            extra=extra,
        )
