"""The commands on a store they cannot use (issue 10 items 5 and 8).

One wording in ``demo``, ``stats``, ``inspect``, ``purge`` and ``migrate``:
``Error: cannot use the store at <URL, password masked>: <cause>``, one line,
exit status 1. The commands that only look at a store never create an SQLite
file that is not there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port as unused_port

from .test_ops import idempo

SCOPE = ("--record-key", "0" * 32)
COMMANDS = {
    "stats": ("stats",),
    "inspect": ("inspect", *SCOPE),
    "purge": ("purge",),
    "migrate": ("migrate",),
    "demo": ("demo", "--payments", "1"),
}


def _one_line_error(result: object, url_shown: str) -> str:
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == 1, stderr  # type: ignore[attr-defined]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"Error: cannot use the store at {url_shown}: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["stats", "inspect", "purge"])
def test_a_missing_sqlite_file_is_not_created(command: str, tmp_path: Path) -> None:
    """Issue 10 item 8: stats/inspect/purge on a mistyped SQLite path say the file does not exist, exit 1,
    and leave no file behind."""
    path = tmp_path / "typo.db"
    url = f"sqlite:///{path}"
    line = _one_line_error(idempo(*COMMANDS[command], "--store", url), url)
    assert "does not exist" in line
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["stats", "inspect", "purge"])
def test_a_directory_is_named_as_the_cause(command: str, tmp_path: Path) -> None:
    """An SQLite URL naming a directory: one line saying it is a directory (it said "does not exist")."""
    url = f"sqlite:///{tmp_path}"
    line = _one_line_error(idempo(*COMMANDS[command], "--store", url), url)
    assert f"{tmp_path} is a directory, not an SQLite file" in line


@pytest.fixture
def unreadable_file() -> Iterator[Path]:
    """An SQLite store file only its owner (root) may open, in a directory anyone may enter."""
    directory = Path(tempfile.mkdtemp(prefix="idempo-perm-"))
    try:
        directory.chmod(0o755)
        path = directory / "idempo.db"
        assert idempo("migrate", "--store", f"sqlite:///{path}").returncode == 0
        path.chmod(0o600)
        yield path
    finally:
        shutil.rmtree(directory)


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m idempo ARGS`` as the user nobody (setpriv), so file permissions apply."""
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "idempo", *args]
    env = {**os.environ, "COLUMNS": "200", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("command", ["stats", "inspect", "purge"])
def test_a_file_without_permission_is_named_as_the_cause(command: str, unreadable_file: Path) -> None:
    """An SQLite file this user may not open: one line naming the URL and "permission denied" (root runs them
    as nobody, since root passes every permission check)."""
    url = f"sqlite:///{unreadable_file}"
    line = _one_line_error(as_nobody(*COMMANDS[command], "--store", url), url)
    assert "permission denied" in line


def test_print_sql_ignores_an_sqlite_idempo_store(tmp_path: Path) -> None:
    """`migrate --print-sql` with $IDEMPO_STORE naming an SQLite file (or a directory) prints the schema and
    touches nothing: before, it refused ("applies to postgresql:// stores only")."""
    for store in (tmp_path / "app.db", tmp_path):
        result = subprocess.run(
            [sys.executable, "-m", "idempo", "migrate", "--print-sql"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "IDEMPO_STORE": f"sqlite:///{store}"},
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "CREATE TABLE idempo_records" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_migrate_creates_the_sqlite_file(tmp_path: Path) -> None:
    """migrate is the command that creates a store: it still makes the SQLite file and its schema."""
    path = tmp_path / "new.db"
    result = idempo("migrate", "--store", f"sqlite:///{path}")
    assert result.returncode == 0, result.stderr
    assert path.exists()


@pytest.mark.postgres
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unreachable_postgres_is_one_line_in_every_command(command: str) -> None:
    """Issue 10 items 5 and 8: a PostgreSQL port that refuses -> the same one line in every command,
    naming the URL with its password masked and the cause."""
    port = unused_port()
    url = f"postgresql://app:s3cret@127.0.0.1:{port}/test"
    line = _one_line_error(idempo(*COMMANDS[command], "--store", url), f"postgresql://app:***@127.0.0.1:{port}/test")
    assert "Connection refused" in line
    assert "s3cret" not in line


@pytest.mark.postgres
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_wrong_postgres_role_is_one_line_with_the_fix(command: str, postgres_url: str) -> None:
    """Issue 10 item 5: a role that does not exist is named at once, with the fix, not a PoolTimeout."""
    url = postgres_url.replace("postgres@", "idempo_no_such_role:pw@", 1)
    line = _one_line_error(idempo(*COMMANDS[command], "--store", url), url.replace(":pw@", ":***@"))
    assert 'role "idempo_no_such_role" does not exist' in line
    assert "fix the user name" in line


@pytest.mark.redis
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unreachable_redis_is_one_line_in_every_command(command: str) -> None:
    """Issue 10 item 8: Redis refusing connections reads as PostgreSQL does, in every command."""
    url = f"redis://:s3cret@127.0.0.1:{unused_port()}/0"
    line = _one_line_error(idempo(*COMMANDS[command], "--store", url), url.replace(":s3cret@", ":***@"))
    assert "Connection refused" in line or "Connect call failed" in line
    assert "s3cret" not in line
