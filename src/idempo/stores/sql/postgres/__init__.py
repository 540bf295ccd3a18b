"""idempo's PostgreSQL schema, migrations and named queries.

Reading them needs no PostgreSQL driver, so ``idempo migrate --print-sql``
works without the ``postgres`` extra.
"""

from __future__ import annotations

import re
from importlib import resources

__all__ = ["SCHEMA_VERSION", "migrations"]


def migrations() -> list[tuple[int, str]]:
    """The shipped migrations as ``(version, sql)``, in order (``migrations/NNNN_name.sql``)."""
    folder = resources.files(__name__).joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = re.match(r"^(\d{4})_\w+\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text("utf-8")))
    return sorted(found)


#: The schema version this idempo needs: the last migration's number.
SCHEMA_VERSION = migrations()[-1][0]
