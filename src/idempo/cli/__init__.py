"""The ``idempo`` command line (needs the ``cli`` extra: click and rich).

Each subcommand lives in its own module and is imported only when it runs, so
``idempo --help`` stays fast, lists every command whichever extras are
installed, and one command's dependencies never burden another. Register a
command by adding a line to ``_COMMANDS``.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

try:
    import click
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise SystemExit("the idempo command needs the cli extra: pip install 'idempo[cli]'") from exc

from .._version import __version__

__all__ = ["main"]


class _Entry(NamedTuple):
    """Where a subcommand lives, the extra it needs, and its one-line help."""

    target: str  # "module:attribute" of a click.Command
    extra: str
    # The command's short help, kept here so that `idempo --help` need not import the
    # command (a test checks it against the command's own).
    short_help: str


_COMMANDS: dict[str, _Entry] = {
    "demo": _Entry(
        "idempo.demo.command:demo",
        "demo",
        "Show what idempo changes: a retry storm against a payments API, with and without it.",
    ),
    "inspect": _Entry(
        "idempo.cli._records:inspect",
        "cli",
        "Show the record an idempotency KEY has in the store: state, lease, stored response.",
    ),
    "migrate": _Entry(
        "idempo.cli._migrate:migrate", "cli", "Create the store's schema, or upgrade it to this idempo's version."
    ),
    "proxy": _Entry(
        "idempo.proxy._command:proxy",
        "proxy",
        "Put the Idempotency-Key guarantee in front of any HTTP API (a reverse proxy).",
    ),
    "purge": _Entry(
        "idempo.cli._records:purge", "cli", "Delete expired records, in batches, until none is left; print how many."
    ),
    "resolve": _Entry(
        "idempo.cli._records:resolve",
        "cli",
        "End the hold on a KEY whose first outcome is unknown: --release it, or --complete-with-status N.",
    ),
    "stats": _Entry(
        "idempo.cli._records:stats",
        "cli",
        "Count the store's records by state, the expired ones awaiting purge, and show the oldest lease.",
    ),
}


class _LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that command is used.

    Click's lazy-loading pattern, plus a help listing read from ``_COMMANDS``:
    click's own listing would import every command to ask for its help.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The subcommand names, sorted."""
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import and return the subcommand ``cmd_name`` (None for an unknown name).

        Raises SystemExit (status 1, as the demo's own hint) with one line naming
        the extra to install when a third-party module the command needs is missing.
        """
        entry = _COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, _, attribute = entry.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            # A missing idempo module is a bug, not a missing extra: let it raise.
            if exc.name is None or exc.name.partition(".")[0] == "idempo":
                raise
            raise SystemExit(
                f"idempo {cmd_name} needs the {entry.extra} extra: pip install 'idempo[{entry.extra}]' ({exc})"
            ) from exc
        command: Any = getattr(module, attribute)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Write the "Commands" section of the help from ``_COMMANDS``, importing none of them."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        # A bare Command shortens the text exactly as the imported command would.
        rows = [
            (name, click.Command(name, help=_COMMANDS[name].short_help).get_short_help_str(limit)) for name in names
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
# The version is written once, in idempo/_version.py; the wheel's metadata is built from it too
# (pyproject.toml's [tool.hatch.version]), so an editable install left stale still prints the source's.
@click.version_option(version=__version__, prog_name="idempo")
def main() -> None:
    """idempo: make APIs safe to retry (one execution per Idempotency-Key)."""
