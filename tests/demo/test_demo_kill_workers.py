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
    """One small --kill-workers run on SQLite, shared by the tests that read its report."""
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
def test_kill_workers_prints_the_kills_and_the_plain_column(
    kill_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    """The report has a "workers killed" row and a column for the plain middleware; the command exits 0."""
    done, _ = kill_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert "workers killed" in done.stdout
    assert "plain middleware" in done.stdout


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
