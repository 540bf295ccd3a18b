"""The sans-I/O protocol flow, driven by hand and against the memory store."""

from __future__ import annotations

import pytest

from idempo import Acquired, Existing, Marker, Policy, Record, RecordState, StoredResponse, Verdict
from idempo._core.flow import (
    Begin,
    Complete,
    InProgress,
    Mismatch,
    Proceed,
    Release,
    Replay,
    Sleep,
    begin_flow,
    decide,
    finish,
    retry_after_seconds,
)
from idempo._engine._async.drivers import drive_async
from idempo._engine._async.store import settle_async
from idempo._engine._sync.drivers import drive_sync
from idempo._engine._sync.store import settle_sync
from idempo._engine.begin import begin_steps
from idempo.stores import AsyncMemoryStore, MemoryStore
from tests.support.clock import FakeClock

RESPONSE = StoredResponse(201, ((b"content-type", b"application/json"),), b"{}")


def record(state: RecordState, fingerprint: str = "fp", lease_expires_at_ms: int = 10_000) -> Record:
    response = RESPONSE if state is RecordState.COMPLETED else None
    return Record("rk", state, fingerprint, 7, lease_expires_at_ms, 0, lease_expires_at_ms, response)


def run(flow: object, *results: object) -> tuple[list[object], object]:
    """Drive a flow with canned results; return (commands seen, decision)."""
    commands = [flow.send(None)]  # type: ignore[attr-defined]
    try:
        for result in results:
            commands.append(flow.send(result))  # type: ignore[attr-defined]
    except StopIteration as stop:
        return commands, stop.value
    raise AssertionError("flow did not finish")


def test_acquired_proceeds_with_the_token() -> None:
    """A fresh lease: Proceed with the store's token."""
    commands, decision = run(begin_flow("rk", "fp", Policy()), Acquired(5, takeover=True))
    assert commands == [Begin("rk", "fp", 30_000)]
    assert decision == Proceed(5, takeover=True)


def test_completed_record_with_same_fingerprint_replays() -> None:
    """A completed record with the same fingerprint: Replay of its response."""
    _, decision = run(begin_flow("rk", "fp", Policy()), Existing(record(RecordState.COMPLETED), 0))
    assert decision == Replay(RESPONSE)


@pytest.mark.parametrize("state", list(RecordState))
def test_other_fingerprint_is_a_mismatch_in_any_state(state: RecordState) -> None:
    """Another fingerprint is a mismatch whether the record runs or completed."""
    _, decision = run(begin_flow("rk", "other", Policy()), Existing(record(state), 0))
    assert decision == Mismatch()


def test_in_progress_without_wait_is_409_at_once() -> None:
    """wait=0: an in-progress duplicate gets InProgress with Retry-After bounded by the lease left."""
    _, decision = run(begin_flow("rk", "fp", Policy(retry_after=5)), Existing(record(RecordState.IN_PROGRESS), 8_500))
    assert decision == InProgress(2)


def test_wait_mode_polls_with_growing_pauses_then_gives_up() -> None:
    """wait>0: Begin, Sleep, Begin... pauses double and sum to exactly the wait bound, then 409."""
    flow = begin_flow("rk", "fp", Policy(wait=0.1))
    busy = Existing(record(RecordState.IN_PROGRESS), 0)
    commands = [flow.send(None)]
    decision = None
    try:
        while True:
            commands.append(flow.send(busy if isinstance(commands[-1], Begin) else None))
    except StopIteration as stop:
        decision = stop.value
    sleeps = [c.seconds for c in commands if isinstance(c, Sleep)]
    assert sleeps[:3] == [0.01, 0.02, 0.04]
    assert sum(sleeps) == pytest.approx(0.1)
    assert isinstance(decision, InProgress)


def test_wait_mode_ends_in_replay_or_takeover() -> None:
    """While waiting, the first request completing gives Replay; its lease expiring gives Proceed."""
    busy = Existing(record(RecordState.IN_PROGRESS), 0)
    done = Existing(record(RecordState.COMPLETED), 0)
    _, decision = run(begin_flow("rk", "fp", Policy(wait=5)), busy, None, done)
    assert decision == Replay(RESPONSE)
    _, decision = run(begin_flow("rk", "fp", Policy(wait=5)), busy, None, Acquired(8, takeover=True))
    assert decision == Proceed(8, takeover=True)


def test_retry_after_is_at_least_one_and_never_past_the_lease() -> None:
    """Retry-After: policy value, capped by the lease time left (rounded up), at least 1."""
    policy = Policy(retry_after=10)
    assert retry_after_seconds(policy, 3_200) == 4
    assert retry_after_seconds(policy, 60_000) == 10
    assert retry_after_seconds(policy, -5) == 1
    assert retry_after_seconds(Policy(retry_after=0), 5_000) == 1


def test_finish_maps_outcomes_to_store_commands() -> None:
    """STORE completes, RELEASE releases, HOLD completes with a held marker for hold_ttl; no response releases."""
    policy = Policy(hold_ttl=60)
    assert finish(policy, "rk", 3, RESPONSE) == Complete("rk", 3, RESPONSE, 86_400_000)
    failed = StoredResponse(500, (), b"")
    assert finish(policy, "rk", 3, failed) == Release("rk", 3)
    assert finish(policy, "rk", 3, None) == Release("rk", 3)
    held = Marker(Marker.HELD, "verdict").response()
    assert finish(policy, "rk", 3, None, verdict=Verdict.HOLD) == Complete("rk", 3, held, 60_000)
    timeout = StoredResponse(504, (), b"")
    held_504 = Marker(Marker.HELD, "status 504", 504).response()
    assert finish(policy, "rk", 3, timeout, verdict=Verdict.HOLD) == Complete("rk", 3, held_504, 60_000)
    assert finish(policy, "rk", 3, None, verdict=Verdict.STORE) == Release("rk", 3)


def test_drivers_run_the_flow_against_a_store() -> None:
    """drive_sync/drive_async: first call proceeds, duplicate gets 409; settle completes; replay after."""
    import anyio

    clock = FakeClock()
    store = MemoryStore(clock=clock)
    policy = Policy()
    first = drive_sync(begin_flow("rk", "fp", policy), store)
    assert isinstance(first, Proceed)
    assert isinstance(drive_sync(begin_flow("rk", "fp", policy), store), InProgress)
    assert settle_sync(store, finish(policy, "rk", first.token, RESPONSE)) is True
    assert drive_sync(begin_flow("rk", "fp", policy), store) == Replay(RESPONSE)

    async def async_side() -> None:
        astore = AsyncMemoryStore(store)
        assert await drive_async(begin_flow("rk", "fp", policy), astore) == Replay(RESPONSE)
        other = await drive_async(begin_flow("rk2", "fp", Policy(wait=0.05)), astore)
        assert isinstance(other, Proceed)
        waited = await drive_async(begin_flow("rk2", "fp", Policy(wait=0.05)), astore)
        assert isinstance(waited, InProgress)
        assert await settle_async(astore, Release("rk2", other.token)) is True
        assert await settle_async(astore, Release("rk2", other.token)) is False  # lease lost: logged, not raised

    anyio.run(async_side)


def test_settle_reports_a_lost_lease_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    """A stale holder's complete is refused by the store; settle logs it and returns False."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    stale = store.begin("rk", "fp", 1000)
    assert isinstance(stale, Acquired)
    clock.advance(2)
    fresh = store.begin("rk", "fp", 1000)
    assert isinstance(fresh, Acquired)
    assert fresh.takeover is True
    assert fresh.token > stale.token
    with caplog.at_level("WARNING", logger="idempo"):
        assert settle_sync(store, Complete("rk", stale.token, RESPONSE, 1000)) is False
    assert "taken over" in caplog.text
    held = store.get("rk")
    assert held is not None
    assert held.state is RecordState.IN_PROGRESS
    assert held.token == fresh.token


def test_decide_classifies_a_begin_result_as_the_flow_does() -> None:
    """decide: Acquired proceeds, a completed match replays, another fingerprint mismatches, in progress is None."""
    assert decide(Acquired(5, takeover=True), "fp") == Proceed(5, takeover=True)
    assert decide(Existing(record(RecordState.COMPLETED), 0), "fp") == Replay(RESPONSE)
    assert decide(Existing(record(RecordState.COMPLETED), 0), "other") == Mismatch()
    assert decide(Existing(record(RecordState.IN_PROGRESS), 0), "other") == Mismatch()
    assert decide(Existing(record(RecordState.IN_PROGRESS), 0), "fp") is None


def begin_sync(store: MemoryStore, record_key: str, fingerprint: str, policy: Policy) -> object:
    return drive_sync(begin_steps(store, record_key, fingerprint, policy), store, decided=False)


async def begin_async(store: AsyncMemoryStore, record_key: str, fingerprint: str, policy: Policy) -> object:
    return await drive_async(begin_steps(store, record_key, fingerprint, policy), store, decided=False)


def test_begin_drivers_decide_as_the_flow_driven_in_full() -> None:
    """begin_steps driven by drive_sync/drive_async gives the flow's decisions: proceed, 409, wait, replay, mismatch."""
    import anyio

    store = MemoryStore(clock=FakeClock())
    policy = Policy()
    first = begin_sync(store, "rk", "fp", policy)
    assert isinstance(first, Proceed)
    assert begin_sync(store, "rk", "fp", Policy(retry_after=3)) == InProgress(3)
    assert begin_sync(store, "rk", "other", policy) == Mismatch()
    assert settle_sync(store, finish(policy, "rk", first.token, RESPONSE)) is True
    assert begin_sync(store, "rk", "fp", policy) == Replay(RESPONSE)

    async def async_side() -> None:
        astore = AsyncMemoryStore(MemoryStore())
        held = await begin_async(astore, "rk", "fp", policy)
        assert isinstance(held, Proceed)
        # a duplicate in wait mode polls from the first result, then answers 409
        assert isinstance(await begin_async(astore, "rk", "fp", Policy(wait=0.03)), InProgress)
        assert await settle_async(astore, Complete("rk", held.token, RESPONSE, 1000)) is True
        assert await begin_async(astore, "rk", "fp", policy) == Replay(RESPONSE)

    anyio.run(async_side)


def test_begin_sync_waits_for_a_running_duplicate_from_its_first_result() -> None:
    """In wait mode the flow starts from the driver's first begin: one Sleep, then the replay."""
    flow = begin_flow("rk", "fp", Policy(wait=5), first=Existing(record(RecordState.IN_PROGRESS), 0))
    commands, decision = run(flow, None, Existing(record(RecordState.COMPLETED), 0))
    assert commands == [Sleep(0.01), Begin("rk", "fp", 30_000)]
    assert decision == Replay(RESPONSE)
