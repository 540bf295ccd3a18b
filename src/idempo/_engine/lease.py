"""Lease renewal: keep a running request's lease alive, so a slow handler is never run twice.

A lease expires ``lease_ttl`` after it was taken. A handler that outlives it
would let a retry take the record over and execute a second time. While the
handler runs, the lease is therefore extended every third of its TTL; when the
process dies, the renewals stop with it and the lease expires at most
``lease_ttl`` later (DESIGN guarantee 2).

Renewal costs next to nothing for requests faster than a third of the lease:
an async keeper is an entry in the registry of one renewal task per event
loop, a blocking keeper an entry in the heap of one shared thread; neither
touches the store unless the handler is still running when its renewal is due.

A keeper also carries the save: :meth:`LeaseKeeper.save` makes the settling
store call (complete, release, or a hold) once, inline; when the store fails,
the keeper keeps renewing the lease and retries the save in the background with
jittered backoff until it lands, the lease is lost to a takeover, or
``Policy.save_retry_for`` passes. So a result that reached the handler's end
is never executed a second time while the process lives (DESIGN "HTTP
behaviour", a failed save); only a process that dies with its result unsaved
leaves a takeover behind."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import heapq
import itertools
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import anyio

from .._core.flow import Complete, Release
from .._core.records import Marker, Record, RecordState
from ..exceptions import LeaseLost, StoreError
from ..observability._observation import RequestObservation, logger, save_outcome, store_label
from ..typing import AsyncStore, Store
from ._async.store import settle_once_async
from ._sync.store import settle_once_sync
from .store import Settle, call_store_async, call_store_sync

__all__ = [
    "SHUTDOWN_WAIT",
    "AsyncLeaseKeeper",
    "AsyncUnrenewedLease",
    "LeaseKeeper",
    "UnrenewedLease",
    "adopt_pending_save",
    "drain_saves",
    "drain_saves_sync",
]


# Seconds: how late a blocking renewal may run at most beyond its due time.
_GRANULARITY = 0.05
# Seconds: the first pause before retrying a failed save, doubled up to the cap.
_SAVE_FIRST = 0.1
_SAVE_CAP = 5.0
# Strong references to the background save retries, so none is collected mid-way.
_SAVING: set[Any] = set()
#: Seconds a graceful shutdown waits for the saves still retried in the background
#: (:func:`drain_saves`: the ASGI lifespan's shutdown; :func:`drain_saves_sync`: a
#: blocking process's exit) before it leaves them and logs each one.
SHUTDOWN_WAIT = 10.0
# Seconds between two looks at what is left while a shutdown waits.
_DRAIN_POLL = 0.05
# The saves being retried in the background, of any keeper: what a shutdown waits for.
_RETRYING: dict[_PendingSave, None] = {}
_RETRYING_LOCK = threading.Lock()
_exit_hook = False
# The jitter's own generator: a save retry draws from another thread at any
# moment, and must not move the application's global random state (a seeded
# simulation, or hypothesis, which fails a test whose strategy sees it move).
_JITTER = random.Random()


def _save_delay(retries: int) -> float:
    """Seconds before the next save attempt: exponential, capped, with equal jitter.

    Half the step is fixed and half random, so processes that failed together
    do not retry together ("equal jitter", AWS Architecture Blog,
    "Exponential Backoff And Jitter").
    """
    step = min(_SAVE_CAP, _SAVE_FIRST * 2.0 ** min(retries, 16))
    return step / 2 + _JITTER.uniform(0, step / 2)


class _PendingSave:
    """A settling command the store failed to take, retried until it lands, is refused, or the bound passes.

    The decisions (when to retry, when to give up, the fallback at the bound)
    are here once; the blocking and async keepers only make the store calls.
    """

    __slots__ = ("command", "deadline", "due", "fell_back", "finished", "keeper", "label", "retries", "store", "token")

    def __init__(
        self, store: object, command: Settle, retry_for: float, keeper: LeaseKeeper | AsyncLeaseKeeper | None = None
    ) -> None:
        self.store = store
        self.command = command
        #: The keeper that renews the lease and retries this save (moved to an adopted lease by :meth:`adopt`).
        self.keeper = keeper
        #: True once the save landed through an adoption (:meth:`adopted`): the retries end.
        self.finished = False
        self.token = command.token
        self.label = store_label(store)
        self.retries = 0
        self.fell_back = False
        now = time.monotonic()
        self.deadline = now + retry_for
        self.due = now + _save_delay(0)

    def attempting(self) -> None:
        """One more attempt is about to be made (counted in ``idempo_save_retries_total``)."""
        self.retries += 1
        save_outcome(self.label, "retry")

    def adopt(self, token: int) -> Complete | None:
        """Move this save to the lease ``token`` that a duplicate in this process took over; None for a release.

        The result this process holds is then saved under the new lease: by
        the duplicate at once (the command returned), and by the background
        retries from now on, whose renewals keep the new lease instead.
        """
        command = self.command
        if not isinstance(command, Complete):
            return None  # a release: the duplicate that took the lease over may well execute
        adopted = Complete(command.record_key, token, command.response, command.record_ttl_ms)
        self.command = adopted
        self.token = token
        if self.keeper is not None:
            self.keeper.retarget(token)
        return adopted

    def adopted(self, error: Exception | None) -> None:
        """The duplicate made the adopted save: landed (``error`` None: the retries and renewals end), or not
        (they go on, under the new lease)."""
        if error is not None:
            return
        self.finished = True
        self.landed()
        _retried(self)
        if self.keeper is not None:
            self.keeper.cancel()

    def landed(self) -> None:
        """The save landed: log it (WARNING: the key answered 409 meanwhile) and count it."""
        save_outcome(self.label, "saved")
        logger.warning(
            "idempo: %s of record %s landed after %d retries; duplicates got 409 meanwhile, none executed",
            _action(self.command),
            self.command.record_key,
            self.retries,
            extra=_extra(self.command, "save_recovered", self.retries),
        )

    def refused(self, record: Any) -> None:
        """The store refused an attempt (LeaseLost); ``record``, read after it, says why: logged and counted as that.

        ``record`` is the record, None when there is none, or ``_UNKNOWN``
        when it could not be read. A refusal is not always a takeover: an
        earlier attempt may have landed (its reply lost), and the release
        that follows a COMMIT of unknown outcome (transactional mode) is
        refused when that COMMIT landed after all (REVIEW-TX F9).
        """
        command = self.command
        if _saved_already(record, command):
            self.landed()
            return
        action, record_key, retries = _action(command), command.record_key, self.retries
        if (
            isinstance(command, Release)
            and isinstance(record, Record)
            and record.state is RecordState.COMPLETED
            and record.token == command.token
        ):
            save_outcome(self.label, "saved")
            logger.warning(
                "idempo: release of record %s refused after %d retries: the record is completed under this "
                "request's lease, so its COMMIT landed after all; a retry replays the committed response",
                record_key,
                retries,
                extra=_extra(command, "commit_landed", retries),
            )
            return
        if record is _UNKNOWN:
            why = "and reading the record failed, so whether the lease was taken over is unknown"
        elif record is None:
            why = "the record is gone (expired or purged)"
        else:
            why = "the lease was taken over"
        save_outcome(self.label, "lease_lost")
        if isinstance(command, Release):
            # Nothing was to be kept: a refused release loses no result.
            logger.warning(
                "idempo: release of record %s refused after %d retries: %s; nothing to release",
                record_key,
                retries,
                why,
                extra=_extra(command, "lease_lost", retries),
            )
            return
        logger.error(
            "idempo: %s of record %s refused after %d retries: %s; this result was not stored",
            action,
            record_key,
            retries,
            why,
            extra=_extra(command, "lease_lost", retries),
        )

    def failed(self, exc: BaseException) -> bool:
        """The attempt failed in the store; return True to try again (at :attr:`due`), False when given up.

        At the bound a result that could not be stored is replaced, once, by a
        not-replayable marker (small, so a store that refused the response may
        take it): retries then get 410 rather than a second execution. When
        that fails too, the lease is left to expire.
        """
        now = time.monotonic()
        if now < self.deadline:
            self.due = now + _save_delay(self.retries)
            logger.debug(
                "idempo: %s of record %s failed again: %s", _action(self.command), self.command.record_key, exc
            )
            return True
        command = self.command
        if not self.fell_back and isinstance(command, Complete) and Marker.of(command.response) is None:
            self.fell_back = True
            marker = Marker(Marker.NOT_REPLAYABLE, "save_failed", command.response.status, len(command.response.body))
            self.command = Complete(command.record_key, command.token, marker.response(), command.record_ttl_ms)
            self.due = now
            return True
        save_outcome(self.label, "given_up")
        logger.error(
            "idempo: gave up saving record %s after %d retries (save_retry_for passed): %s; the lease is left to "
            "expire, after which a takeover decides (on_takeover)",
            command.record_key,
            self.retries,
            exc,
            extra=_extra(command, "save_given_up", self.retries),
        )
        return False


def _retrying(pending: _PendingSave) -> None:
    """``pending`` is retried in the background from now on: a shutdown waits for it."""
    with _RETRYING_LOCK:
        _RETRYING[pending] = None


def _retried(pending: _PendingSave) -> None:
    """``pending`` is over (landed, refused, given up, or its retries ended otherwise)."""
    with _RETRYING_LOCK:
        _RETRYING.pop(pending, None)


def adopt_pending_save(
    store: object, record_key: str, token: int
) -> tuple[Complete, Callable[[Exception | None], None]] | None:
    """The result this process holds for ``record_key``, to save under the lease ``token`` just taken over.

    A save that failed after the handler ran is retried in the background
    while the process keeps the lease (DESIGN "HTTP behaviour": never a second
    execution while the process lives). When the store was unreachable for
    longer than the lease, a duplicate that reaches the store first takes the
    expired lease over. If this process holds the result, that duplicate must
    not execute: it saves the result under its own lease instead (the
    command returned) and answers from it. The retries move to the new lease
    (:meth:`_PendingSave.adopt`).

    Args:
        store: the store the duplicate took the lease over in.
        record_key: the record taken over.
        token: the new lease's fencing token.

    Returns:
        The ``Complete`` that saves the held result (or marker) under
        ``token``, and the function to call with its error (None: it landed,
        the retries end); or None when this process holds no result for the
        record (nothing pending, or only a release pending).
    """
    with _RETRYING_LOCK:
        for pending in _RETRYING:
            if pending.store is store and pending.command.record_key == record_key and not pending.finished:
                adopted = pending.adopt(token)
                return None if adopted is None else (adopted, pending.adopted)
    return None


def _left(store: object | None) -> list[_PendingSave]:
    with _RETRYING_LOCK:
        return [pending for pending in _RETRYING if store is None or pending.store is store]


def _waiting(left: list[_PendingSave], timeout: float) -> None:
    logger.warning(
        "idempo: shutting down: waiting up to %g s for %d saves still being retried (records %s)",
        timeout,
        len(left),
        ", ".join(pending.command.record_key for pending in left),
        extra={"idempo_event": "shutdown_waiting"},
    )


def _abandoned(left: list[_PendingSave], timeout: float) -> None:
    for pending in left:
        command = pending.command
        logger.error(
            "idempo: shut down with the %s of record %s not landed after %d retries and %g s of waiting: its "
            "lease is left to expire, after which a takeover decides (on_takeover)",
            _action(command),
            command.record_key,
            pending.retries,
            timeout,
            extra=_extra(command, "save_abandoned", pending.retries),
        )


async def drain_saves(store: object) -> None:
    """Wait for the saves of ``store`` still retried in the background, up to :data:`SHUTDOWN_WAIT` seconds.

    Called at a graceful shutdown (the ASGI lifespan's), so a result whose
    save failed is not left to a takeover (a second execution, under the
    default ``on_takeover``) just because the process was stopping. Logs
    one WARNING when there is something to wait for, and one ERROR
    (``save_abandoned``) per save still not landed at the bound; an empty
    wait costs nothing. On asyncio and trio. ``store``: the store whose
    saves to wait for (another store's are not this shutdown's).
    """
    for pause in _drain_pauses(store):
        await anyio.sleep(pause)


def drain_saves_sync(store: object | None = None) -> None:
    """The blocking twin of :func:`drain_saves` (``store`` None: every store's); run at the process's exit."""
    for pause in _drain_pauses(store):
        time.sleep(pause)


def _drain_pauses(store: object | None) -> Iterator[float]:
    """The shutdown wait written once: yields the seconds to sleep between looks; the twins only sleep."""
    left = _left(store)
    if not left:
        return
    bound = SHUTDOWN_WAIT
    _waiting(left, bound)
    deadline = time.monotonic() + bound
    while left and time.monotonic() < deadline:
        yield _DRAIN_POLL
        left = _left(store)
    _abandoned(left, bound)


def _drain_at_exit() -> None:
    # Logging at interpreter exit can fail; never turn an exit into a traceback.
    with contextlib.suppress(Exception):
        drain_saves_sync()


def _action(command: Settle) -> str:
    return type(command).__name__.lower()


def _extra(command: Settle, event: str, retries: int) -> dict[str, Any]:
    return {
        "idempo_event": event,
        "idempo_operation": _action(command),
        "idempo_record_key": command.record_key,
        "idempo_save_retries": retries,
    }


def _saved_already(record: Any, command: Settle) -> bool:
    """True when ``record`` (read after a LeaseLost) shows this command landed on an earlier attempt.

    A store whose reply was lost (PostgreSQL, SQLite) refuses the resent
    ``complete``, since the record is completed by then; the record, still
    under this token, tells the two apart. A release leaves no record.
    """
    if isinstance(command, Release):
        return record is None
    return record is not None and record.state is RecordState.COMPLETED and record.token == command.token


def _interval(lease_ttl_ms: int) -> float:
    """Seconds between renewals: a third of the lease, so two renewals may fail before it lapses."""
    return max(lease_ttl_ms / 3000, 0.001)


def _log_failure(record_key: str, exc: BaseException) -> None:
    if isinstance(exc, LeaseLost):
        logger.warning("idempo: lease renewal refused, the lease was taken over (record %s)", record_key)
    else:
        logger.error("idempo: lease renewal failed (record %s): %s; retrying", record_key, exc)


class _LoopRenewer:
    """One task per event loop that renews the leases of every async keeper on it.

    A timer per request would cost each request a timer start and cancel (a
    libuv timer under uvloop); here a request costs a dict insert and delete,
    and the task wakes every half interval of the shortest lease it serves.
    """

    # It holds no reference to its loop: the registry is keyed weakly by the
    # loop, and the task (which does hold it) ends once no keeper is left, so
    # a finished loop (asyncio.run per job) is not kept alive by idempo.

    def __init__(self) -> None:
        self.keepers: dict[AsyncLeaseKeeper, None] = {}
        self.tick = 1.0
        self.task: asyncio.Task[None] | None = None

    def add(self, keeper: AsyncLeaseKeeper, loop: asyncio.AbstractEventLoop) -> None:
        self.keepers[keeper] = None
        if keeper.interval / 2 < self.tick:
            self.tick = keeper.interval / 2
        if self.task is None:
            self.task = loop.create_task(self._run(), name="idempo-lease-renewer")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.keepers:
                await asyncio.sleep(self.tick)
                now = loop.time()
                due = [keeper for keeper in self.keepers if keeper.due <= now]
                if due:
                    # Concurrently: one slow store call must not delay every other lease.
                    await asyncio.gather(*(keeper.renew() for keeper in due))
        finally:
            self.task = None


_RENEWERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopRenewer] = weakref.WeakKeyDictionary()
# The last loop's renewer: a server runs one loop, so a request finds it with a
# weak reference's call instead of a WeakKeyDictionary lookup (which makes one
# weak reference of its own per call). Weak: it keeps no finished loop alive.
_last_renewer: tuple[weakref.ref[asyncio.AbstractEventLoop], _LoopRenewer] | None = None


def _renewer_of(loop: asyncio.AbstractEventLoop) -> _LoopRenewer:
    """The renewer of ``loop`` (made on its first keeper)."""
    global _last_renewer
    last = _last_renewer
    if last is not None and last[0]() is loop:
        return last[1]
    renewer = _RENEWERS.get(loop)
    if renewer is None:
        renewer = _RENEWERS[loop] = _LoopRenewer()
    _last_renewer = (weakref.ref(loop), renewer)
    return renewer


class AsyncLeaseKeeper:
    """Extends a lease on an async store while the handler runs (asyncio; a no-op elsewhere).

    Args:
        store: the store holding the record.
        record_key: the record whose lease to keep.
        token: the lease's fencing token.
        lease_ttl_ms: the lease TTL in milliseconds; each renewal sets the
            expiry this far from the store's clock.

    Call :meth:`stop` when the handler has finished (in a ``finally``), or
    :meth:`cancel` on a crash path. On trio (Hypercorn's trio worker) each
    keeper renews from a trio system task of its own; outside any event loop
    nothing is renewed.
    """

    __slots__ = ("_args", "_paused", "_renewer", "_renewing", "_stopped", "_trio", "due", "interval")

    def __init__(self, store: AsyncStore, record_key: str, token: int, lease_ttl_ms: int) -> None:
        self._args = (store, record_key, token, lease_ttl_ms)
        self._stopped = False
        # True while a save attempt runs: a renewal must not race it.
        self._paused = False
        self._renewing: asyncio.Future[None] | None = None
        self._trio: _TrioRenewal | None = None
        self.interval = _interval(lease_ttl_ms)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._renewer: _LoopRenewer | None = None
            self.due = 0.0
            self._trio = _TrioRenewal.start(self)
            return
        last = _last_renewer  # _renewer_of(loop)'s first test, inlined: a server's every request passes it
        renewer = last[1] if last is not None and last[0]() is loop else _renewer_of(loop)
        self._renewer = renewer
        self.due = loop.time() + self.interval
        renewer.add(self, loop)

    async def renew(self) -> None:
        """Extend the lease once (called by the loop's renewer when due)."""
        if self._stopped or self._paused:
            return
        store, record_key, token, lease_ttl_ms = self._args
        loop = asyncio.get_running_loop()
        self._renewing = loop.create_future()
        try:
            await store.extend(record_key, token, lease_ttl_ms)
        except LeaseLost as exc:
            if self._args[2] == token:  # else the lease moved to a takeover this process adopted (retarget)
                if not self._stopped:  # a renewal racing the final complete is expected
                    _log_failure(record_key, exc)
                self.cancel()
                return
        except Exception as exc:  # a store failure, or a third-party store's own error: retry next time
            _log_failure(record_key, exc)
        finally:
            self._renewing.set_result(None)
            self._renewing = None
        self.due = loop.time() + self.interval

    def retarget(self, token: int) -> None:
        """Renew the lease ``token`` from now on: a duplicate in this process took the record over to save
        the result this keeper holds (:func:`adopt_pending_save`)."""
        store, record_key, _, lease_ttl_ms = self._args
        self._args = (store, record_key, token, lease_ttl_ms)

    async def stop(self) -> None:
        """Stop renewing; waits for a renewal in flight, so it never lands after the record settles."""
        self.cancel()
        renewing = self._renewing
        if renewing is not None:
            await asyncio.shield(renewing)
        if self._trio is not None:
            await self._trio.stopped()

    async def _quiet(self) -> None:
        """Pause renewals and wait for one in flight, so a save attempt never races a renewal."""
        self._paused = True
        renewing = self._renewing
        if renewing is not None:
            await asyncio.shield(renewing)
        if self._trio is not None:
            await self._trio.quiet()

    async def save(self, command: Settle, observation: RequestObservation | None, retry_for: float) -> bool:
        """Settle the record with ``command``; return True when the store took it at once.

        On a store failure the lease is kept: renewals go on and the save is
        retried in a background task (see :class:`_PendingSave`), so the
        caller can send its answer now. A lost lease ends the renewals.
        Renewals stop for good once the save landed, was refused, or was
        given up. Never raises.
        """
        store = self._args[0]
        if self._renewing is None and self._trio is None:
            self._paused = True  # what _quiet() does when no renewal is in flight, without its coroutine
        else:
            try:
                await self._quiet()
            except BaseException:
                self.cancel()
                raise
        try:
            error = await settle_once_async(store, command, observation)
        except BaseException:
            await self.stop()
            raise
        if error is None or isinstance(error, LeaseLost) or self._stopped:
            if self._renewing is None and self._trio is None:
                self.cancel()  # what stop() does when no renewal is in flight, without its coroutine
            else:
                await self.stop()
            return error is None
        pending = _PendingSave(store, command, retry_for, self)
        self._paused = False
        _retrying(pending)
        if not self._spawn(pending):
            _retried(pending)
            await self.stop()
        return False

    def _spawn(self, pending: _PendingSave) -> bool:
        """Retry ``pending`` in the background of this loop (asyncio or trio); False when there is none."""
        try:
            if self._renewer is not None:
                task = asyncio.get_running_loop().create_task(self._retry(pending), name="idempo-save-retry")
                _SAVING.add(task)
                task.add_done_callback(_SAVING.discard)
                return True
            trio = sys.modules.get("trio")
            if self._trio is not None and trio is not None:
                trio.lowlevel.spawn_system_task(
                    self._retry, pending, name="idempo-save-retry", context=contextvars.copy_context()
                )
                return True
        except Exception:
            logger.exception("idempo: cannot start the save retry of record %s", self._args[1])
        logger.error(
            "idempo: no event loop to retry the save of record %s in; the lease is left to expire", self._args[1]
        )
        return False

    async def _retry(self, pending: _PendingSave) -> None:
        """Retry a failed save until it lands, the lease is lost, or the bound passes; then stop renewing."""
        store, record_key = self._args[0], self._args[1]
        try:
            while True:
                await anyio.sleep(max(0.0, pending.due - time.monotonic()))
                if pending.finished:  # a duplicate saved it under the lease it took over (adopted)
                    return
                if self._stopped:  # the lease was lost meanwhile (a renewal was refused)
                    record = await _get_async(store, record_key)
                    pending.refused(record)
                    return
                await self._quiet()
                pending.attempting()
                try:
                    await call_store_async(store, pending.command)
                except LeaseLost:
                    record = await _get_async(store, record_key)
                    pending.refused(record)
                    return
                except Exception as exc:  # a StoreError, or a third-party store's own: retry
                    if not pending.failed(exc):
                        return
                else:
                    pending.landed()
                    return
                self._paused = False
        except Exception:  # never let the retry end a trio run or leave an unretrieved task error
            logger.exception("idempo: the save retry of record %s failed", record_key)
        finally:
            _retried(pending)
            self.cancel()

    def cancel(self) -> None:
        """Stop renewing without waiting (a crash path: the lease is left to expire)."""
        self._stopped = True
        renewer = self._renewer
        if renewer is not None:
            renewer.keepers.pop(self, None)
        if self._trio is not None:
            self._trio.cancel()


class _TrioRenewal:
    """One keeper's renewals on trio: a system task that sleeps an interval and extends, until stopped.

    A system task, because the keeper outlives no nursery of the request's
    (the handler runs inside the middleware's own call). A task per request
    is dearer than asyncio's shared renewer, and trio servers are few.
    """

    __slots__ = ("_done", "_keeper", "_renewing", "_scope", "_trio")

    def __init__(self, trio: Any, keeper: AsyncLeaseKeeper) -> None:
        self._trio = trio
        self._keeper = keeper
        self._scope = trio.CancelScope()
        self._renewing = False
        self._done = trio.Event()

    @classmethod
    def start(cls, keeper: AsyncLeaseKeeper) -> _TrioRenewal | None:
        """Start renewing ``keeper``'s lease when the caller runs under trio; else None."""
        trio = sys.modules.get("trio")  # imported by whoever runs trio; never imported here
        if trio is None:
            return None
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:  # trio is imported but this is not its thread
            return None
        renewal = cls(trio, keeper)
        # A system task starts from an empty context; the request's own keeps
        # its log records' context.
        trio.lowlevel.spawn_system_task(renewal._run, name="idempo-lease-renewer", context=contextvars.copy_context())
        return renewal

    async def _run(self) -> None:
        keeper = self._keeper
        try:
            with self._scope:
                while not keeper._stopped:
                    await self._trio.sleep(keeper.interval)
                    if keeper._stopped:
                        break
                    if keeper._paused:
                        continue
                    store, record_key, token, lease_ttl_ms = keeper._args  # read anew: retarget() moves it
                    self._renewing = True
                    try:
                        # Shielded: a stop() waits for this call rather than
                        # cancel it halfway through the store's transition;
                        # bounded by the lease, which is lost by then anyway,
                        # so a hung store cannot hold up the trio run's end.
                        deadline = self._trio.current_time() + lease_ttl_ms / 1000
                        with self._trio.CancelScope(shield=True, deadline=deadline):
                            await store.extend(record_key, token, lease_ttl_ms)
                    except LeaseLost as exc:
                        if keeper._args[2] != token:
                            continue  # the lease moved to a takeover this process adopted (retarget)
                        if not keeper._stopped:  # a renewal racing the final complete is expected
                            _log_failure(record_key, exc)
                        return
                    except Exception as exc:  # an exception in a system task would end the whole trio run
                        _log_failure(record_key, exc)
                    finally:
                        self._renewing = False
        finally:
            self._done.set()

    def cancel(self) -> None:
        """Stop the task: at once while it sleeps; after the store call while it renews."""
        if not self._renewing:
            self._scope.cancel()

    async def stopped(self) -> None:
        """Wait until the task has ended (a renewal in flight has landed)."""
        await self._done.wait()

    async def quiet(self) -> None:
        """Wait until no renewal is in flight (the keeper is paused, so none starts)."""
        while self._renewing:
            await self._trio.sleep(0.005)


class _Scheduler:
    """One daemon thread that runs the blocking keepers (renewals, save retries), earliest first.

    A keeper's latest wake-up is the one that counts (``keeper._wake``): an
    earlier entry still in the heap is skipped when it comes up.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, LeaseKeeper]] = []
        self._counter = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, keeper: LeaseKeeper, due: float) -> None:
        with self._wake:
            entry = next(self._counter)
            keeper._wake = entry
            heapq.heappush(self._heap, (due, entry, keeper))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="idempo-lease-keeper", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is keeper:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    # Renewals need no precision finer than this; waking for
                    # every finished request's entry would cost CPU under load.
                    self._wake.wait(None if timeout is None else max(timeout, _GRANULARITY))
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    _, entry, keeper = heapq.heappop(self._heap)
                    if keeper._wake == entry:
                        due.append(keeper)
            for keeper in due:
                try:
                    again = keeper._tick()
                except Exception as exc:  # a third-party store's own error must not kill the thread
                    _log_failure(keeper._args[1], exc)
                    again = time.monotonic() + keeper.interval
                if again is not None:
                    self.add(keeper, again)


_SCHEDULER = _Scheduler()


def _after_fork_in_child() -> None:
    # A forked child (gunicorn --preload) inherits the scheduler but not its
    # thread, nor any of the parent's retries.
    _Scheduler.__init__(_SCHEDULER)
    _RETRYING.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _exit_waits() -> None:
    """Make the process's exit wait for the blocking keepers' retried saves (registered once, on the first)."""
    global _exit_hook
    if not _exit_hook:
        _exit_hook = True
        atexit.register(_drain_at_exit)


class LeaseKeeper:
    """Extends a lease on a blocking store while the handler runs, and while a failed save is retried.

    Args: as :class:`AsyncLeaseKeeper`. Renewals and save retries run on one
    shared daemon thread, so the store must be usable from another thread
    (idempo's are). Call :meth:`save` to settle the record, or :meth:`stop`.
    """

    __slots__ = ("_args", "_lock", "_pending", "_renew_due", "_stopped", "_wake", "interval")

    def __init__(self, store: Store, record_key: str, token: int, lease_ttl_ms: int) -> None:
        self._args: tuple[Any, ...] = (store, record_key, token, lease_ttl_ms)
        self._lock = threading.Lock()
        self._stopped = False
        self._pending: _PendingSave | None = None
        self._wake = -1
        self.interval = _interval(lease_ttl_ms)
        self._renew_due = time.monotonic() + self.interval
        _SCHEDULER.add(self, self._renew_due)

    def renew(self) -> bool:
        """Extend the lease once; return whether to keep renewing."""
        store, record_key, token, lease_ttl_ms = self._args
        with self._lock:
            if self._stopped:
                return False
            try:
                store.extend(record_key, token, lease_ttl_ms)
            except LeaseLost as exc:
                if self._args[2] != token:
                    return True  # the lease moved to a takeover this process adopted (retarget)
                if self._pending is None:
                    _log_failure(record_key, exc)
                return False
            except StoreError as exc:
                _log_failure(record_key, exc)
            return True

    def _tick(self) -> float | None:
        """Run what is due (a save attempt, a renewal); return when to run next (monotonic), None to stop."""
        again = self._run_due()
        if again is None and self._pending is not None:
            _retried(self._pending)
        return again

    def _run_due(self) -> float | None:
        if self._stopped:
            return None
        now = time.monotonic()
        pending = self._pending
        if pending is not None and now >= pending.due:
            with self._lock:
                if self._stopped:
                    return None
                if self._attempt(pending):
                    self._stopped = True
                    return None
        if now >= self._renew_due:
            if not self.renew():
                with self._lock:
                    pending = self._pending
                    if pending is not None and not self._stopped:
                        # The lease is gone: the save can no longer land (or it already did).
                        self._stopped = True
                        record = _get_sync(self._args[0], self._args[1])
                        pending.refused(record)
                return None
            self._renew_due = time.monotonic() + self.interval
        pending = self._pending
        return self._renew_due if pending is None else min(self._renew_due, pending.due)

    def _attempt(self, pending: _PendingSave) -> bool:
        """One retry of a failed save (the lock held); True when it is over (landed, refused, given up)."""
        store = self._args[0]
        pending.attempting()
        try:
            call_store_sync(store, pending.command)
        except LeaseLost:
            record = _get_sync(store, self._args[1])
            pending.refused(record)
            return True
        except Exception as exc:  # a StoreError, or a third-party store's own: retry
            return not pending.failed(exc)
        pending.landed()
        return True

    def save(self, command: Settle, observation: RequestObservation | None, retry_for: float) -> bool:
        """Settle the record with ``command``; return True when the store took it at once.

        The blocking twin of :meth:`AsyncLeaseKeeper.save`: on a store failure
        the lease is kept and the save retried on the keepers' thread.
        Never raises for the store.
        """
        store = self._args[0]
        with self._lock:  # waits for a renewal in flight
            self._stopped = True
        error = settle_once_sync(store, command, observation)
        if error is None or isinstance(error, LeaseLost):
            return error is None
        pending = _PendingSave(store, command, retry_for, self)
        _retrying(pending)
        _exit_waits()
        with self._lock:
            self._pending = pending
            self._stopped = False
        _SCHEDULER.add(self, min(pending.due, self._renew_due))
        return False

    def cancel(self) -> None:
        """Stop renewing and retrying without waiting for a call in flight (its result no longer matters)."""
        self._stopped = True

    def retarget(self, token: int) -> None:
        """Renew the lease ``token`` from now on (see :meth:`AsyncLeaseKeeper.retarget`)."""
        store, record_key, _, lease_ttl_ms = self._args
        self._args = (store, record_key, token, lease_ttl_ms)

    def stop(self) -> None:
        """Stop renewing; waits for a renewal in flight, so it never lands after the record settles."""
        with self._lock:
            self._stopped = True


def _get_sync(store: Store, record_key: str) -> Any:
    try:
        return store.get(record_key)
    except Exception:
        return _UNKNOWN


async def _get_async(store: AsyncStore, record_key: str) -> Any:
    try:
        return await store.get(record_key)
    except Exception:
        return _UNKNOWN


# A record that could not be read: neither saved nor released, as far as anyone knows.
_UNKNOWN = object()


class UnrenewedLease:
    """A lease nothing renews, whose save is made once (the testing mode: no thread, nothing in the background).

    The interface of :class:`LeaseKeeper`: :meth:`save` settles the record
    with one store call (never raises for the store; a failure is logged and
    the lease left to expire), :meth:`stop` does nothing.
    """

    __slots__ = ("_store",)

    def __init__(self, store: Store) -> None:
        self._store = store

    def save(self, command: Settle, observation: RequestObservation | None, retry_for: float) -> bool:
        """Settle the record with ``command`` once; True when the store took it."""
        return settle_once_sync(self._store, command, observation) is None

    def stop(self) -> None:
        """Nothing to stop."""


class AsyncUnrenewedLease:
    """The async twin of :class:`UnrenewedLease` (the interface of :class:`AsyncLeaseKeeper`)."""

    __slots__ = ("_store",)

    def __init__(self, store: AsyncStore) -> None:
        self._store = store

    async def save(self, command: Settle, observation: RequestObservation | None, retry_for: float) -> bool:
        """Settle the record with ``command`` once; True when the store took it."""
        return await settle_once_async(self._store, command, observation) is None

    async def stop(self) -> None:
        """Nothing to stop."""

    def cancel(self) -> None:
        """Nothing to cancel."""
