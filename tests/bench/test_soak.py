"""The kill and outage soak (bench/soak.py, issue 10): its judgement of double executions, its relay, one short run.

The soak itself is a command that prints figures; these tests pin what its
figures mean (the rule that tells an allowed takeover from a forbidden second
execution), that its relay cuts the store the two ways it claims, and that a
short run on SQLite with real workers and real SIGKILLs completes clean.
"""

from __future__ import annotations

import json
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from soak_figures import (
    ALIVE,
    TAKEOVER,
    UNEXPLAINED,
    AttemptRecord,
    ClientAnswer,
    Execution,
    Outage,
    Recorded,
    Settings,
    WorkerLife,
    checks,
    classify_repeats,
    compute,
    render,
    save_due,
)

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _life(name: str, ended: float | None = None) -> WorkerLife:
    """A worker that lived to the end, or was SIGKILLed at ``ended``."""
    return WorkerLife(name, pid=1, started=0.0, ready=0.5, ended=ended, killed=ended is not None)


def _verdicts(
    first_end: float | None, died: float | None, outages: list[Outage] | None = None, second: float = 17.0
) -> list[str]:
    runs = [Execution("k", "w1.1-1", "w1.1", 1.0, first_end), Execution("k", "w2.1-1", "w2.1", second, second + 0.02)]
    pairs = classify_repeats(runs, [_life("w1.1", died), _life("w2.1")], outages or [], grace=4.0)
    return [verdict for _, _, verdict in pairs["k"]]


def test_holder_killed_mid_handler_is_an_allowed_takeover() -> None:
    """B04: the first holder died inside the handler; the takeover after its lease is allowed."""
    assert _verdicts(first_end=None, died=1.01) == [TAKEOVER]


def test_holder_killed_between_handler_end_and_save_is_an_allowed_takeover() -> None:
    """Killed an instant after the handler returned: its result was never saved, the takeover is allowed."""
    assert _verdicts(first_end=1.02, died=1.03) == [TAKEOVER]


def test_first_execution_ended_and_process_lived_is_forbidden() -> None:
    """Issue 10 item 1: the handler ran, its process lived on, and the key executed again: counted as ALIVE."""
    assert _verdicts(first_end=1.02, died=None) == [ALIVE]


def test_process_killed_long_after_it_could_have_saved_is_forbidden() -> None:
    """A holder that outlived the time to save (store reachable) and died later does not excuse the takeover."""
    assert _verdicts(first_end=1.02, died=10.0) == [ALIVE]


def test_process_killed_after_the_second_execution_started_is_forbidden() -> None:
    """Two executions while the first process still lived, whatever happened to it afterwards."""
    assert _verdicts(first_end=1.02, died=18.0) == [ALIVE]


def test_holder_killed_while_the_store_was_cut_is_an_allowed_takeover() -> None:
    """Killed while still retrying its save during an outage: it died unsaved, the takeover is allowed."""
    assert _verdicts(first_end=1.02, died=8.0, outages=[Outage("blackhole", 1.0, 6.0)]) == [TAKEOVER]


def test_unfinished_execution_whose_process_lived_is_unexplained() -> None:
    """No end and no death: nothing the soak does explains a second execution."""
    assert _verdicts(first_end=None, died=None) == [UNEXPLAINED]


def test_save_due_counts_from_the_end_of_each_cut_that_follows() -> None:
    """The time to save restarts after a cut that begins within it, and after the next one chained to it."""
    cuts = [Outage("refuse", -5.0, -1.0), Outage("blackhole", 2.0, 5.0), Outage("refuse", 7.0, 9.0)]
    assert save_due(1.0, [], grace=3.0) == 4.0
    assert save_due(1.0, cuts, grace=3.0) == 12.0
    assert save_due(1.0, cuts[:2], grace=3.0) == 8.0


def _recorded() -> Recorded:
    """A small run: key a clean, b executed twice while alive, c lost, d taken over after a kill."""
    executions = [
        Execution("a", "w1.1-1", "w1.1", 1.0, 1.02),
        Execution("b", "w2.1-1", "w2.1", 10.5, 10.52),
        Execution("b", "w2.1-9", "w2.1", 26.0, 26.02),
        Execution("d", "w1.1-2", "w1.1", 19.9, None),
        Execution("d", "w3.1-4", "w3.1", 35.5, 35.52),
    ]
    lives = [_life("w1.1", ended=20.0), _life("w2.1"), _life("w3.1")]
    attempts = [
        AttemptRecord("a", 1.0, 1.03, 201),
        AttemptRecord("a", 1.1, 1.11, 201, replayed=True),
        AttemptRecord("b", 10.4, 10.53, 201),
        AttemptRecord("c", 11.0, 16.0, 503),
        AttemptRecord("c", 17.0, 17.2, 503),
        AttemptRecord("d", 19.8, 20.0, None, error="RemoteProtocolError"),
        AttemptRecord("d", 35.4, 35.53, 201),
    ]
    answers = [
        ClientAnswer("a", "first", 201, b"A", 1.0, 1.03),
        ClientAnswer("a", "later", 201, b"A", 1.1, 1.11),
        ClientAnswer("b", "first", 201, b"B1", 10.4, 10.53),
        ClientAnswer("b", "concurrent", 201, b"B2", 10.4, 26.03),
        ClientAnswer("c", "first", 503, b"{}", 11.0, 17.2),
        ClientAnswer("d", "first", 201, b"D", 19.8, 35.53),
    ]
    return Recorded(
        Settings(deadline=2.0, lease=15.0, save_grace=4.0),
        executions,
        lives,
        [Outage("blackhole", 10.0, 15.0)],
        attempts,
        answers,
        load_seconds=40.0,
    )


def test_figures_count_what_happened() -> None:
    """Executions per key, the split of double executions, lost and different answers, 503s, waits and blocks."""
    figures = compute(_recorded())
    assert figures["requests"] == 7
    assert figures["keys"] == 4
    assert figures["executions_per_key"] == {"0": 1, "1": 1, "2": 2, "3+": 0}
    assert figures["keys_executed_twice"] == {
        "total": 2,
        "first_ended_process_lived": 1,
        "holder_died_unsaved": 1,
        "unexplained": 0,
    }
    assert figures["five_xx"] == {"503": 2}
    assert figures["latency_503"]["max_s"] == 5.0
    assert figures["latency_503"]["over_bound"] == 1
    assert figures["wait_during_outages"]["all"]["count"] == 2
    assert figures["wait_during_outages"]["blackhole"]["max_s"] == 5.0
    assert figures["lost_answers"] == {"count": 1, "by_last_answer": {"503": 1}}
    assert figures["keys_with_different_answers"] == 1
    assert figures["blocked_after_kill"]["count"] == 1
    assert figures["blocked_after_kill"]["max_s"] == 15.5
    assert figures["workers"]["killed"] == 1


def test_checks_fail_on_each_broken_promise() -> None:
    """Each check of issue 10's "Done when" fails on the small run's faults; a clean run passes them all."""
    failed = [text for passed, text in checks(compute(_recorded())) if not passed]
    assert len(failed) == 5
    assert "ended while its process lived: 1" in failed[0]
    clean = _recorded()
    clean.executions = [e for e in clean.executions if e.key in ("a", "d")]
    clean.attempts = [a for a in clean.attempts if a.key in ("a", "d")]
    clean.answers = [a for a in clean.answers if a.key in ("a", "d")]
    figures = compute(clean)
    assert all(passed for passed, _ in checks(figures))
    assert "keys executed twice    1:" in render(figures)


def test_committed_rows_fail_on_any_key_with_two_even_a_takeover() -> None:
    """Counting committed rows (the transactional app), a key with two fails, even the takeover after a kill
    that handler entries allow: the killed holder's writes must have rolled back with it."""
    clean = _recorded()
    clean.executions = [e for e in clean.executions if e.key in ("a", "d")]
    clean.attempts = [a for a in clean.attempts if a.key in ("a", "d")]
    clean.answers = [a for a in clean.answers if a.key in ("a", "d")]
    figures = compute(clean)
    assert all(passed for passed, _ in checks(figures))
    failed = [text for passed, text in checks(figures, committed=True) if not passed]
    assert failed == ["keys with two committed rows: 1 (must be 0)"]
    clean.executions = [e for e in clean.executions if e.id != "w1.1-2"]
    assert all(passed for passed, _ in checks(compute(clean), committed=True))


# --- the relay ----------------------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def relay() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """bench/soak_relay.py in front of an echo server; yields the process and the relay's port."""
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "soak_relay.py"), "--upstream", f"127.0.0.1:{echo.server_address[1]}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().split()
        assert line[0] == "listening"
        yield process, int(line[1])
    finally:
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.close()
        process.wait(10)
        process.stdout.close()
        echo.shutdown()
        echo.server_close()


def _switch(process: subprocess.Popen[str], mode: str) -> None:
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.write(mode + "\n")
    process.stdin.flush()
    assert process.stdout.readline().split()[:2] == ["ok", mode]


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(5)
    return sock


def _silent(sock: socket.socket) -> bool:
    sock.settimeout(0.3)
    try:
        sock.recv(10)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)
    return False


def test_relay_blackhole_holds_bytes_and_refuse_resets_and_refuses(relay: tuple[subprocess.Popen[str], int]) -> None:
    """Blackhole: open and new connections pass nothing, held bytes arrive after; refuse: RST and ECONNREFUSED."""
    process, port = relay
    with _connect(port) as old:
        old.sendall(b"a")
        assert old.recv(10) == b"a"

        _switch(process, "blackhole")
        old.sendall(b"b")
        assert _silent(old)
        with _connect(port) as new:  # accepted, then silent
            new.sendall(b"c")
            assert _silent(new)
            _switch(process, "pass")
            assert old.recv(10) == b"b"
            assert new.recv(10) == b"c"

        _switch(process, "refuse")
        with pytest.raises(ConnectionResetError):
            old.recv(10)
        with pytest.raises(ConnectionRefusedError):
            _connect(port)

    _switch(process, "pass")
    with _connect(port) as again:
        again.sendall(b"e")
        assert again.recv(10) == b"e"


# --- one short run --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.sqlite
def test_short_soak_on_sqlite_runs_clean(tmp_path: Path) -> None:
    """Two real uvicorn workers on SQLite, SIGKILLed every 1-2 s for a few seconds: every check passes."""
    report = tmp_path / "soak.json"
    command = [sys.executable, str(BENCH / "soak.py"), "--store", "sqlite", "--duration", "6", "--lease", "0.5"]
    command += ["--workers", "2", "--clients", "8", "--concurrency", "4", "--verify", "20", "--json", str(report)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    figures = json.loads(report.read_text())["figures"]
    assert figures["requests"] > 0
    assert figures["workers"]["killed"] >= 1
    assert figures["keys_executed_twice"]["first_ended_process_lived"] == 0
    assert figures["lost_answers"]["count"] == 0
    assert figures["verify"]["identical"] == figures["verify"]["keys"]
