"""The ``idempo`` command group: its help imports no command, and a command whose extra is missing says which."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import idempo
from idempo.cli import _COMMANDS, main
from idempo.stores._base import load_sql
from idempo.stores.sql.postgres import SCHEMA_VERSION

# Runs the idempo entry point with the third-party packages named in argv[1] (comma-separated)
# made unimportable, as if their extra were not installed; argv[2:] are the command's arguments.
_WITHOUT = """
import sys

blocked = set(sys.argv[1].split(","))


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Block())
from idempo.cli import main

main(sys.argv[2:], prog_name="idempo")
"""

# What `pip install 'idempo[cli]'` alone leaves out: the demo's, the client's and the stores' packages.
_ONLY_CLI = ("httpx", "uvicorn", "fastapi", "h11", "tenacity", "prometheus_client", "psycopg", "redis")


def idempo_without(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``idempo ARGS`` in a subprocess where the packages in ``blocked`` cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT, ",".join(blocked), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.parametrize("args", [("--help",), ()], ids=["--help", "bare"])
def test_help_lists_every_command_with_only_the_cli_extra(args: tuple[str, ...]) -> None:
    """`idempo --help` and bare `idempo` list every command and its short help without importing any command."""
    # With the demo's packages (and rich) missing, importing idempo.demo.command or idempo._ops would fail.
    done = idempo_without((*_ONLY_CLI, "rich"), *args)
    assert done.returncode == (0 if args else 2), done.stderr
    listing = done.stdout if args else done.stdout + done.stderr
    for name, entry in _COMMANDS.items():
        # Help is at most 80 columns wide, so a short help may be cut: look for its start.
        assert re.search(rf"^  {name} +{re.escape(entry.short_help[:40])}", listing, re.MULTILINE), listing
    assert "extra" not in listing


def test_short_help_table_matches_each_command() -> None:
    """The short help `idempo --help` shows is the one each command would show itself."""
    context = click.Context(main)
    for name, entry in _COMMANDS.items():
        command = main.get_command(context, name)
        assert command is not None
        assert command.get_short_help_str(limit=1000) == entry.short_help


def test_demo_without_its_extra_prints_the_hint() -> None:
    """Running `idempo demo` without the demo extra prints one line naming the extra and exits non-zero."""
    done = idempo_without(_ONLY_CLI, "demo", "--payments", "1")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "pip install 'idempo[demo]'" in done.stderr


@pytest.mark.parametrize("command", ["inspect", "stats", "purge"])
def test_a_command_without_the_cli_extra_names_it(command: str, tmp_path: Path) -> None:
    """Without rich (only idempo[fastapi], say), a command that needs it prints one line naming idempo[cli]."""
    store = f"sqlite:///{tmp_path / 'idempo.db'}"
    args = ("inspect", "--record-key", "0" * 32) if command == "inspect" else (command,)
    done = idempo_without(("rich",), *args, "--store", store)
    assert done.returncode == 1  # as the demo's hint
    assert done.stdout == ""
    assert done.stderr == f"idempo {command} needs the cli extra: pip install 'idempo[cli]' (No module named 'rich')\n"
    assert not (tmp_path / "idempo.db").exists()  # the hint comes before the store is opened


def test_a_command_that_does_not_need_rich_runs_without_it() -> None:
    """`idempo migrate` needs click only: its help shows without rich."""
    done = idempo_without(("rich",), "migrate", "--help")
    assert done.returncode == 0, done.stderr
    assert "--print-sql" in done.stdout


def test_version_is_the_package_version() -> None:
    """`idempo --version` prints idempo.__version__, the one place the version is written (the wheel reads it too)."""
    done = CliRunner().invoke(main, ["--version"])
    assert done.exit_code == 0, done.output
    assert done.output == f"idempo, version {idempo.__version__}\n"


def test_print_sql_needs_no_store_and_no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """`idempo migrate --print-sql` alone prints the PostgreSQL schema and its version row, without psycopg."""
    monkeypatch.delenv("IDEMPO_STORE", raising=False)
    done = idempo_without(("psycopg", "psycopg_pool"), "migrate", "--print-sql")
    assert done.returncode == 0, done.stderr
    schema = load_sql("postgres", "schema.sql")
    assert done.stdout == f"{schema}\nINSERT INTO idempo_schema_version (version) VALUES ({SCHEMA_VERSION});\n"
    assert "CREATE TABLE idempo_records" in schema


def test_migrate_without_store_or_print_sql_names_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """`idempo migrate` with neither --store (nor $IDEMPO_STORE) nor --print-sql is a usage error naming --store."""
    monkeypatch.delenv("IDEMPO_STORE", raising=False)
    done = CliRunner().invoke(main, ["migrate"])
    assert done.exit_code == 2
    assert "Missing option '--store'" in done.output


def test_print_sql_refuses_a_store_without_schema() -> None:
    """`--print-sql` with a store URL that is not PostgreSQL is a usage error, not a PostgreSQL schema."""
    done = CliRunner().invoke(main, ["migrate", "--print-sql", "--store", "redis://127.0.0.1:6379/0"])
    assert done.exit_code == 2
    assert "postgresql:// stores only" in done.output
