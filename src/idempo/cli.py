"""The ``idempo`` command line (needs the ``cli`` extra: click and rich).

Each subcommand lives in its own module and is imported only when it runs, so
``idempo --help`` stays fast and one command's dependencies never burden
another. Register a command by adding a line to ``_COMMANDS``.
"""

from __future__ import annotations

import importlib
from typing import Any

try:
    import click
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise SystemExit("the idempo command needs the cli extra: pip install 'idempo[cli]'") from exc

__all__ = ["main"]

# command name -> "module:attribute" of a click.Command
_COMMANDS: dict[str, str] = {
    "demo": "idempo.demo.command:demo",
    "inspect": "idempo._ops:inspect",
    "migrate": "idempo._migrate:migrate",
    "purge": "idempo._ops:purge",
    "stats": "idempo._ops:stats",
}


class _LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attribute = target.partition(":")
        command: Any = getattr(importlib.import_module(module_name), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="idempo")
def main() -> None:
    """idempo: make APIs safe to retry (one execution per Idempotency-Key)."""
