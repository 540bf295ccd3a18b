"""The version of idempo, written once (pyproject.toml's [tool.hatch.version] reads it)."""

__version__ = "0.1.0"
