"""``idempo demo --kill-workers``: the storm while a supervisor SIGKILLs uvicorn workers, run small."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PAYMENTS = 40


def idempo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``python -m idempo ARGS`` and capture its output."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "idempo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture(scope="module")
def kill_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    """One small --kill-workers run on SQLite (both columns), shared by the tests that read its report."""
    report = tmp_path_factory.mktemp("demo-kill") / "report.json"
    done = idempo(
        "demo",
        "--kill-workers",
        "--payments",
        str(PAYMENTS),
        "--concurrency",
        "8",
        "--workers",
        "2",
        "--kill-every",
        "0.2-0.3",
        "--seed",
        "11",
        "--json",
        str(report),
    )
    return done, json.loads(report.read_text()) if report.exists() else {}


@pytest.mark.slow
def test_kill_workers_exits_zero_with_no_double_charge_on_the_transactional_route(
    kill_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    """The command exits 0 and prints `double charges: 0` (the transactional column), the kills and both columns."""
    done, _ = kill_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert "double charges: 0" in done.stdout.splitlines()
    assert "workers killed" in done.stdout
    assert "transactional" in done.stdout
    assert "plain middleware" in done.stdout


@pytest.mark.slow
def test_kill_workers_charges_each_payment_once_on_the_transactional_route(
    kill_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    """Transactional: workers were killed, yet one payment row and one charge per payment, none lost, every reused
    key refused; the handler ran more often than that (the executions the kills rolled back)."""
    _, document = kill_run
    runs = document["runs"]
    assert isinstance(runs, dict)
    run = runs["transactional"]
    assert run["workers_killed"] > 0
    assert run["payments"] == run["payment_rows"] == run["provider_charges"] == PAYMENTS
    assert run["double_charges"] == run["lost"] == run["told_failed_but_charged"] == 0
    assert run["key_reuses"] == run["key_reuses_refused"]
    assert run["handler_executions"] >= PAYMENTS
    assert document["failures"] == []


@pytest.mark.slow
def test_kill_workers_kills_workers_and_every_payment_still_ends_with_a_row(
    kill_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    """Workers were SIGKILLed during the storm; the clients' retries still got every payment a 2xx and a row."""
    _, document = kill_run
    runs = document["runs"]
    assert isinstance(runs, dict)
    plain = runs["plain"]
    assert plain["workers_killed"] > 0
    assert plain["payments"] == PAYMENTS
    assert plain["payment_rows"] == PAYMENTS
    assert plain["lost"] == 0
    assert plain["provider_charges"] >= PAYMENTS


def test_kill_workers_needs_two_workers() -> None:
    """--workers below 2 is a usage error: the last worker serving is never killed."""
    done = idempo("demo", "--kill-workers", "--workers", "1", "--payments", "1")
    assert done.returncode == 2
    assert "--workers" in done.stderr


def test_kill_workers_refuses_a_store_without_transactions() -> None:
    """--kill-workers on Redis (or memory) is a usage error naming --store: the transactional column needs SQL."""
    done = idempo("demo", "--kill-workers", "--store", "memory://", "--payments", "1")
    assert done.returncode == 2
    assert "--store" in done.stderr
