"""Fault points (arm_faults, IDEMPO_FAULTS): each action fails as named; an unarmed point does nothing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import idempo.testing
from idempo._engine import faultpoints


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    yield
    idempo.testing.arm_faults(None)


def test_unarmed_points_do_nothing() -> None:
    """With nothing armed, reaching every point returns None and raises nothing."""
    for point in idempo.testing.FAULT_POINTS:
        assert faultpoints.reach(point) is None
    assert idempo.testing.armed_faults() == {}


def test_raise_raises_injected_fault_at_that_point_only() -> None:
    """A point armed with raise raises InjectedFault naming it; the other points pass."""
    idempo.testing.arm_faults("before-commit=raise")
    faultpoints.reach("after-claim")
    with pytest.raises(idempo.testing.InjectedFault) as caught:
        faultpoints.reach("before-commit")
    assert caught.value.point == "before-commit"
    faultpoints.reach("after-commit")


def test_bad_spec_is_refused_with_the_valid_names() -> None:
    """An unknown point or action is a ValueError that lists what is valid."""
    with pytest.raises(ValueError, match="points: after-claim, before-commit"):
        idempo.testing.arm_faults("before-lunch=kill")
    with pytest.raises(ValueError, match="actions: kill, drop-connection, raise"):
        idempo.testing.arm_faults({"after-commit": "explode"})


def test_kill_from_the_environment_sigkills_the_process(tmp_path: Path) -> None:
    """IDEMPO_FAULTS=after-commit=kill read at import: the process dies of SIGKILL at that point, not before."""
    marker = tmp_path / "reached"
    code = (
        "from pathlib import Path\n"
        "from idempo._engine import faultpoints\n"
        "faultpoints.reach('after-claim')\n"
        "faultpoints.reach('before-commit')\n"
        f"Path({str(marker)!r}).write_text('before the armed point')\n"
        "faultpoints.reach('after-commit')\n"
        "print('survived')\n"
    )
    env = {**os.environ, "IDEMPO_FAULTS": "after-commit=kill"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert marker.read_text() == "before the armed point"
    assert "survived" not in done.stdout


def test_drop_connection_closes_a_sqlite_connection(tmp_path: Path) -> None:
    """drop-connection on a sqlite3 connection closes it: the next statement fails."""
    connection = sqlite3.connect(tmp_path / "app.db")
    idempo.testing.arm_faults("before-commit=drop-connection")
    faultpoints.reach("before-commit", connection)
    with pytest.raises(sqlite3.ProgrammingError):
        connection.execute("SELECT 1")


def test_drop_connection_cuts_a_postgres_connection_at_the_socket(postgres_url: str) -> None:
    """drop-connection on a psycopg connection shuts its socket: the next statement raises OperationalError."""
    import psycopg

    with psycopg.connect(postgres_url) as connection:
        connection.execute("SELECT 1")
        idempo.testing.arm_faults({"before-commit": "drop-connection"})
        faultpoints.reach("before-commit", connection)
        with pytest.raises(psycopg.OperationalError):
            connection.execute("SELECT 1")
