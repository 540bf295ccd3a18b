"""One executing request's lease, from the handler's start until its record is settled.

:class:`Execution` (blocking fronts) and :class:`AsyncExecution` (async
fronts) are the one place that guarantees every executed request's record is
settled exactly once (completed, released or held) and its renewals stop,
however idempo's own code fails after the handler ran: a front calls
``settle`` with the captured answer, ``fail`` from any exception handler, and
``abandon`` on a crash. A store failure while settling keeps the lease and
retries the save (:meth:`idempo._engine.lease.LeaseKeeper.save`).

The two share everything but the I/O: :meth:`_ExecutionBase.command` is
where a verdict becomes the store command that settles the record (through
:func:`idempo._core.flow.finish`); ``settle`` then saves it, the one step a
transactional execution does differently (the completion inside the
handler's transaction).
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, ClassVar, TypeVar

import anyio

from .. import _config
from .._core.flow import Release, failure_verdict, finish
from .._core.policy import Policy, Verdict
from .._core.records import StoredResponse
from ..observability._observation import RequestObservation, logger
from ..typing import AsyncStore, Store
from .lease import AsyncLeaseKeeper, AsyncUnrenewedLease, LeaseKeeper, UnrenewedLease
from .store import Settle

__all__ = ["AsyncExecution", "Execution", "shielded"]

T = TypeVar("T")


class _Resumed:
    """The rest of a coroutine whose first step already ran: awaiting it hands its pending awaitable on."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self.coro = coro
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self.coro, self.pending
        while True:
            try:
                value = yield pending
            except BaseException as exc:  # thrown in by the event loop (a cancellation) or close(): coro decides
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    pending = coro.send(value)
                except StopIteration as done:
                    return done.value


async def shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` shielded from cancellation (``anyio.CancelScope(shield=True)``), a scope only if it suspends.

    A coroutine cannot be cancelled before it first suspends: a cancellation
    is delivered at a suspension point. So the first step runs outside the
    scope, and a coroutine that finishes in it (the memory store's settle)
    costs no cancel scope (about 4 us and two WeakKeyDictionary writes on
    asyncio, 5 % of a memory-store request in the server). One that suspends
    enters the scope before its pending awaitable reaches the event loop, and
    runs the rest shielded, as ``with CancelScope(shield=True): await coro``
    would. What ``coro`` raises propagates.
    """
    try:
        pending = coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    with anyio.CancelScope(shield=True):  # never cancelled itself: it swallows nothing
        resumed: T = await _Resumed(coro, pending)
    return resumed


class _ExecutionBase:
    """What the blocking and the async execution share: the constructor, the settled flag, the command,
    the failure verdict.

    Args:
        store: the store holding the record.
        policy: the route's policy (verdicts, TTLs, ``save_retry_for``).
        record_key: the record being executed.
        token: the lease's fencing token.
        observation: the request's observation, told the settle.
    """

    __slots__ = ("keeper", "observation", "policy", "record_key", "settled", "store", "token")

    #: The lease keeper that renews, and the one of the testing mode that does not (no thread, nothing
    #: left running after a test): the one thing the twins' constructors differ in.
    _keeper_types: ClassVar[
        tuple[type[LeaseKeeper], type[UnrenewedLease]] | tuple[type[AsyncLeaseKeeper], type[AsyncUnrenewedLease]]
    ]

    def __init__(
        self, store: Any, policy: Policy, record_key: str, token: int, observation: RequestObservation | None
    ) -> None:
        self.store = store
        self.policy = policy
        self.record_key = record_key
        self.token = token
        self.observation = observation
        self.settled = False
        # Renews the lease while the handler runs, so a slow handler is never run twice.
        renewing, unrenewed = self._keeper_types
        self.keeper: Any = (
            renewing(store, record_key, token, policy.lease_ttl_ms) if _config.TESTING is None else unrenewed(store)
        )

    def command(self, response: StoredResponse | None, verdict: Verdict | None, reason: str | None) -> Settle | None:
        """Claim the one settle; return the command that settles the record, or None when it was settled before.

        ``response``, ``verdict`` and ``reason`` as :func:`idempo._core.flow.finish`.
        Never raises: idempo's own failure to build the command releases the
        record instead.
        """
        if self.settled:
            return None
        self.settled = True
        try:
            return finish(self.policy, self.record_key, self.token, response, verdict=verdict, reason=reason)
        except Exception:
            logger.exception("idempo: settling record %s failed; releasing it", self.record_key)
            return Release(self.record_key, self.token)

    def failure(self, exc: BaseException, status: int | None) -> tuple[Verdict, str] | None:
        """The verdict and reason after ``exc``; None for a crash (not an ``Exception``): settle nothing."""
        if not isinstance(exc, Exception):
            return None
        return failure_verdict(self.policy, exc, status), f"exception {type(exc).__name__}"


class Execution(_ExecutionBase):
    """One request's lease on a blocking store, from the handler's start until its record is settled.

    It takes the arguments of :class:`_ExecutionBase` (``store`` a blocking store).
    """

    __slots__ = ()
    _keeper_types = (LeaseKeeper, UnrenewedLease)
    store: Store
    keeper: LeaseKeeper | UnrenewedLease

    def settle(
        self, response: StoredResponse | None, verdict: Verdict | None = None, reason: str | None = None
    ) -> bool:
        """Settle the record once (later calls do nothing); True when the store took it at once.

        ``response``, ``verdict`` and ``reason`` as :func:`idempo._core.flow.finish`.
        Never raises: idempo's own failure to build the command releases the
        record instead; a store failure is retried in the background.
        """
        command = self.command(response, verdict, reason)
        if command is None:
            return False
        try:
            return self.keeper.save(command, self.observation, self.policy.save_retry_for)
        except Exception:
            logger.exception("idempo: settling record %s failed", self.record_key)
            self.keeper.stop()
            return False

    def fail(self, exc: BaseException, status: int | None = None) -> None:
        """Settle after ``exc`` (the handler's, or idempo's own after the handler ran), unless already settled.

        An ``Exception`` settles by its verdict (``Policy.exception_verdicts``),
        or HOLD when ``status`` (the answer's, if one was started) maps to
        HOLD; otherwise the record is released so a retry executes. Anything
        else (a crash: SystemExit, KeyboardInterrupt) settles nothing and the
        lease is left to expire. Renewals stop either way. Never raises.
        """
        failure = self.failure(exc, status)
        if failure is None:
            self.abandon()
        else:
            self.settle(None, *failure)

    def abandon(self) -> None:
        """A crash: settle nothing and stop renewing, so the lease expires (DESIGN guarantee 2)."""
        if not self.settled:
            self.settled = True
            self.keeper.stop()


class AsyncExecution(_ExecutionBase):
    """The async twin of :class:`Execution` (ASGI, async functions)."""

    __slots__ = ()
    _keeper_types = (AsyncLeaseKeeper, AsyncUnrenewedLease)
    store: AsyncStore
    keeper: AsyncLeaseKeeper | AsyncUnrenewedLease

    async def settle(
        self, response: StoredResponse | None, verdict: Verdict | None = None, reason: str | None = None
    ) -> bool:
        """See :meth:`Execution.settle`."""
        command = self.command(response, verdict, reason)
        if command is None:
            return False
        # Shielded: a cancelled request still settles what it ran, and the
        # renewals stop (or go on with a pending save) either way.
        try:
            return await shielded(self.keeper.save(command, self.observation, self.policy.save_retry_for))
        except Exception:
            logger.exception("idempo: settling record %s failed", self.record_key)
            await shielded(self.keeper.stop())
        return False

    async def fail(self, exc: BaseException, status: int | None = None) -> None:
        """See :meth:`Execution.fail`."""
        failure = self.failure(exc, status)
        if failure is None:
            self.abandon()
        else:
            await self.settle(None, *failure)

    def abandon(self) -> None:
        """See :meth:`Execution.abandon` (does not wait for a renewal in flight)."""
        if not self.settled:
            self.settled = True
            self.keeper.cancel()
