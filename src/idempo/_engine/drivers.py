"""The two drivers: run a step generator against a blocking or an async store.

A step generator yields commands (:mod:`idempo._engine.commands`); a driver
carries each one out and sends its result back, or throws its exception in,
so the generator's own ``try`` blocks decide what a failure means. This is
the only code that differs between the blocking fronts (WSGI, Django, sync
functions) and the async ones (ASGI, async functions), in the manner of
httpx's ``sync_auth_flow`` / ``async_auth_flow``. Every store call is timed
for the request's observation here (:mod:`idempo.observability`), so store
latency is measured in one place for every front.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread

from .._core.flow import Begin, Complete, Decision, Extend, Get, Release, Sleep
from ..observability._observation import RequestObservation, observe_request, store_call_async, store_call_sync
from ..typing import AsyncStore, Store
from .commands import Call, Command, Lease, LegacyWindow, LoadDigests, Observe, Offload
from .store import settle_once_async, settle_once_sync
from .transaction import AsyncTransactionalExecution, TransactionalExecution, transactor_of

__all__ = ["drive_async", "drive_sync"]

T = TypeVar("T")


def drive_sync(
    flow: Generator[Any, Any, T], store: Store, observation: RequestObservation | None = None, *, decided: bool = True
) -> T:
    """Run a step generator against a blocking store; return what it returns.

    ``observation``, when given (or made by an :class:`Observe` command),
    is told the time of each store call and, unless ``decided`` is False
    (the generator tells it itself), the decision the generator returns.

    Raises:
        What the generator raises (a StoreError it does not handle).
    """
    value: Any = None
    resume = flow.send
    while True:
        try:
            command = resume(value)
        except StopIteration as stop:
            if observation is not None and decided:
                observation.decided(cast(Decision, stop.value))
            result: T = stop.value
            return result
        try:
            # The commands of every request first, inline; the rest in _carry_out_sync.
            kind = type(command)
            if kind is Begin:
                args = (command.record_key, command.fingerprint, command.lease_ttl_ms)
                value = store_call_sync(observation, store, "begin", store.begin, *args)
            elif kind is Call:
                value = command.fn()
            elif kind is Observe:
                value = observation = observe_request(command.front, command.method, command.route, command.path)
            elif kind is Lease:
                value = _execution(store, command)
            else:
                value = _carry_out_sync(command, store, observation)
            resume = flow.send
        except BaseException as exc:  # the generator decides what it means
            value, resume = exc, flow.throw


async def drive_async(
    flow: Generator[Any, Any, T],
    store: AsyncStore,
    observation: RequestObservation | None = None,
    *,
    decided: bool = True,
) -> T:
    """The async twin of :func:`drive_sync`."""
    value: Any = None
    resume = flow.send
    while True:
        try:
            command = resume(value)
        except StopIteration as stop:
            if observation is not None and decided:
                observation.decided(cast(Decision, stop.value))
            result: T = stop.value
            return result
        try:
            # The commands of every request first, inline; the rest in _carry_out_async.
            kind = type(command)
            if kind is Begin:
                call = store.begin(command.record_key, command.fingerprint, command.lease_ttl_ms)
                value = await store_call_async(observation, store, "begin", call)
            elif kind is Call:
                value = await command.fn()
            elif kind is Observe:
                value = observation = observe_request(command.front, command.method, command.route, command.path)
            elif kind is Lease:
                value = _async_execution(store, command)
            else:
                value = await _carry_out_async(command, store, observation)
            resume = flow.send
        except BaseException as exc:  # the generator decides what it means
            value, resume = exc, flow.throw


def _execution(store: Store, lease: Lease) -> TransactionalExecution:
    """The execution of a leased request: it opens a transaction only if the handler asks for one
    (with the store's transactor, or a front's own such as Django's)."""
    transactor = transactor_of(store)
    return TransactionalExecution(store, lease.policy, lease.record_key, lease.token, lease.observation, transactor)


def _async_execution(store: AsyncStore, lease: Lease) -> AsyncTransactionalExecution:
    """The async twin of :func:`_execution`."""
    transactor = transactor_of(store)
    return AsyncTransactionalExecution(
        store, lease.policy, lease.record_key, lease.token, lease.observation, transactor
    )


def _carry_out_sync(command: Command, store: Store, observation: RequestObservation | None) -> Any:
    if type(command) is Get:
        return store_call_sync(observation, store, "get", store.get, command.record_key)
    if type(command) is Sleep:
        time.sleep(command.seconds)
        return None
    if type(command) is LoadDigests:
        return command.source.load(store)
    if type(command) is LegacyWindow:
        return command.source.legacy_open(store)
    if type(command) is Offload:
        return command.fn(*command.args)
    # A settling command made before the handler ran (a held takeover, a legacy record's carry-over):
    # not the request's verdict, so not told to its observation.
    assert isinstance(command, Complete | Release | Extend)
    return settle_once_sync(store, command)


async def _carry_out_async(command: Command, store: AsyncStore, observation: RequestObservation | None) -> Any:
    if type(command) is Get:
        return await store_call_async(observation, store, "get", store.get(command.record_key))
    if type(command) is Sleep:
        await anyio.sleep(command.seconds)
        return None
    if type(command) is LoadDigests:
        return await command.source.aload(store)
    if type(command) is LegacyWindow:
        return await command.source.alegacy_open(store)
    if type(command) is Offload:
        return await anyio.to_thread.run_sync(command.fn, *command.args)
    # Shielded: a request cancelled meanwhile still gives back (or holds) what it took.
    with anyio.CancelScope(shield=True):
        assert isinstance(command, Complete | Release | Extend)
        return await settle_once_async(store, command)
