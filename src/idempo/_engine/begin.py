"""What a request does before its handler runs: :func:`begin_steps`, and the wait rooms.

:func:`begin_steps` is the whole protocol up to the decision, written once
for every front as a step generator (:mod:`idempo._engine.commands`): the
first ``begin``, classified by :func:`idempo._core.flow.decide`; the record a
version before keyed digests kept, looked up while the legacy window is
open; a running duplicate waited for (:func:`idempo._core.flow.begin_flow`,
wait mode) or answered 409; a takeover held under ``on_takeover="hold"``.
:mod:`idempo._engine._async.drivers` drive it to the decision (``decided=False``: it tells
the observation itself), as :mod:`idempo._engine.admission` does.

Wait mode (``Policy.wait``): the duplicates of one running request that wait
in one process are counted per store and record key, at most
``Policy.max_waiters`` (one more gets 409 at once), and they share their
polls (:class:`WaitRoom`): a waiter that wakes after another waiter's
``begin`` answered since it went to sleep takes that answer instead of asking
the store again. So a burst of duplicates costs one ``begin`` each on
arrival, then about one poll per backoff step for them all, not one per
waiter and step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from .._core.flow import (
    Begin,
    Complete,
    Decision,
    Get,
    Held,
    InProgress,
    LegacyIdentity,
    Proceed,
    Release,
    Replay,
    begin_flow,
    completed_decision,
    decide,
    legacy_decision,
    retry_after_seconds,
    takeover_hold,
)
from .._core.policy import Policy
from .._core.records import Acquired, BeginResult, Existing
from ..observability._observation import RequestObservation
from ..secrets import SecretSource
from .commands import Command, LegacyWindow
from .lease import adopt_pending_save

__all__ = ["Legacy", "WaitRoom", "begin_steps"]


@dataclass(frozen=True, slots=True)
class Legacy:
    """Where to look for a request's record as a version before keyed digests kept it.

    Attributes:
        source: the front's secret source, which knows whether the legacy
            window (:func:`idempo.secrets.open_legacy_window`) is open.
        identity: returns where that version kept this request's record, or
            None when it cannot tell (CPU only: called once the window is
            known to be open).
    """

    source: SecretSource
    identity: Callable[[], LegacyIdentity | None]


class WaitRoom:
    """The duplicates of one running request waiting in this process, and their latest poll.

    It is the :class:`~idempo._core.flow.Polls` of their flows.

    Attributes:
        waiters: how many wait now.
        latest: the last in-progress record a waiter's ``begin`` found, and
            when (``time.monotonic()`` seconds) it answered.
    """

    __slots__ = ("latest", "waiters")

    def __init__(self) -> None:
        self.waiters = 0
        self.latest: tuple[Existing, float] | None = None

    def mark(self) -> float:
        """Now, in ``time.monotonic()`` seconds."""
        return time.monotonic()

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


def begin_steps(
    store: object,
    record_key: str,
    fingerprint: str,
    policy: Policy,
    observation: RequestObservation | None = None,
    legacy: Legacy | None = None,
) -> Generator[Command, Any, Decision]:
    """The steps that decide what this request does; returns the :data:`~idempo._core.flow.Decision`.

    The first ``begin`` is classified by :func:`~idempo._core.flow.decide`;
    only a key still in progress goes on to :func:`~idempo._core.flow.begin_flow`
    (wait mode, 409), from that first result, so the common cases make no
    second generator. ``observation``, when given, is told the decision.

    A takeover (an expired lease with no result) under
    ``policy.on_takeover == "hold"`` does not proceed: the store gave this
    request the lease atomically, so no other request executes meanwhile, and
    the record is held here (:func:`~idempo._core.flow.takeover_hold`); the
    decision is :class:`~idempo._core.flow.Held` with ``takeover=True``. When
    the store fails to take the hold, the lease lapses and the next request
    holds it again: nothing runs either way.

    ``legacy``: when the request took a fresh lease and the legacy window is
    open, the request also looks where a version before keyed digests kept
    its record (one ``get``): such a record replays, or answers 422 or 409,
    as it did before the upgrade; a replay is carried over to the new record
    key for the rest of its TTL, and the lease is released otherwise.

    Args:
        store: the store the commands go to (its identity keys the wait rooms).

    Raises (from the driver):
        StoreError: the store failed (StoreUnavailable when unreachable).
    """
    result: BeginResult = yield Begin(record_key, fingerprint, policy.lease_ttl_ms)
    if legacy is not None and isinstance(result, Acquired) and not result.takeover:
        found = yield from _legacy_steps(record_key, result.token, legacy, policy)
        if found is not None:
            if observation is not None:
                observation.decided(found)
            return found
    decision: Decision | None = decide(result, fingerprint)
    if decision is None:
        assert isinstance(result, Existing)
        if policy.wait <= 0:
            decision = yield from begin_flow(record_key, fingerprint, policy, first=result)
        else:
            room = _enter_room(store, record_key, policy)
            if room is None:
                # The 409 of a duplicate that finds max_waiters already waiting.
                lease_left_ms = result.record.lease_expires_at_ms - result.now_ms
                decision = InProgress(retry_after_seconds(policy, lease_left_ms))
            else:
                try:
                    decision = yield from begin_flow(record_key, fingerprint, policy, first=result, polls=room)
                finally:
                    _leave_room(store, record_key, room)
    assert decision is not None
    if type(decision) is Proceed and decision.takeover:
        decision = yield from _adopt_or_hold(store, record_key, policy, decision)
    if observation is not None:
        observation.decided(decision)
    return decision


def _adopt_or_hold(
    store: object, record_key: str, policy: Policy, decision: Proceed
) -> Generator[Command, Any, Decision]:
    """What a request that took an expired lease over does: save a result this process holds, hold, or execute.

    This process may hold the record's result: its save failed and is being
    retried through a store outage longer than the lease (:mod:`idempo._engine.lease`).
    The request then saves that result under the lease it took (one
    ``complete``) and answers with it, instead of running the handler a second
    time (DESIGN: never a second execution while the process lives). Should
    that ``complete`` fail, the retries carry on under the new lease and the
    request gets 409. Otherwise ``on_takeover`` decides (:func:`takeover_hold`).
    """
    adoption = adopt_pending_save(store, record_key, decision.token)
    if adoption is not None:
        save, saved = adoption
        error = yield save
        saved(error)
        if error is None:
            return completed_decision(save.response)
        return InProgress(retry_after_seconds(policy, policy.lease_ttl_ms))
    hold = takeover_hold(policy, record_key, decision.token)
    if hold is not None:
        yield hold
        return Held("takeover", takeover=True)
    return decision


def _legacy_steps(
    record_key: str, token: int, legacy: Legacy, policy: Policy
) -> Generator[Command, Any, Decision | None]:
    """Look where the older version kept the record; settle the fresh lease by what is there (see begin_steps)."""
    try:
        if not (yield LegacyWindow(legacy.source)):
            return None
        identity = legacy.identity()
        if identity is None:
            return None
        old = yield Get(identity.record_key)
    except Exception:
        yield Release(record_key, token)  # nothing decided: give the lease back
        raise
    now_ms = int(time.time() * 1000)
    decision = legacy_decision(old, identity.fingerprint, policy, now_ms)
    if decision is None:
        return None
    # Not told to the observation: the request did not run, nothing was settled for it.
    if isinstance(decision, Replay):
        # For the rest of the old record's TTL, by this machine's clock.
        yield Complete(record_key, token, decision.response, max(1, old.expires_at_ms - now_ms))
    else:
        yield Release(record_key, token)
    return decision
