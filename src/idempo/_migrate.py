"""``idempo migrate``: create or upgrade a store's schema.

Only PostgreSQL has a schema to manage: it is never altered at request time,
so run this once before starting the application, and again after upgrading
idempo. SQLite creates its table when the store opens; Redis and the memory
store have no schema.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import click

from .exceptions import IdempoError
from .stores._base import cannot_use

__all__ = ["migrate"]


@click.command()
@click.option(
    "--store",
    "url",
    envvar="IDEMPO_STORE",
    default=None,
    help="The store URL, e.g. postgresql://user@host/db?schema=idempo (or $IDEMPO_STORE); not needed with --print-sql.",
)
@click.option("--print-sql", is_flag=True, help="Print the PostgreSQL schema (schema.sql) and exit; change nothing.")
def migrate(url: str | None, print_sql: bool) -> None:
    """Create the store's schema, or upgrade it to this idempo's version."""
    scheme = None if url is None else urlsplit(url).scheme.lower()
    if print_sql:
        if scheme not in (None, "postgresql", "postgres"):
            raise click.UsageError("--print-sql applies to postgresql:// stores only")
        # Read from the package alone: a DBA can print the schema without psycopg or a database.
        from .stores._base import load_sql
        from .stores.sql.postgres import SCHEMA_VERSION

        click.echo(load_sql("postgres", "schema.sql"))
        click.echo(f"INSERT INTO idempo_schema_version (version) VALUES ({SCHEMA_VERSION});")
        return
    if url is None:
        raise click.UsageError("Missing option '--store' (or $IDEMPO_STORE).")
    if scheme not in ("postgresql", "postgres"):
        from ._ops import open_store

        open_store(url, must_exist=False).close()  # SQLite creates its file and schema here
        click.echo(f"{scheme}:// stores have no schema to migrate; nothing to do.")
        return

    try:
        from .stores import postgres
    except ImportError as exc:
        raise click.ClickException(f"the postgresql:// store needs `pip install idempo[postgres]` ({exc})") from exc
    try:
        pg = postgres.PostgresStore(url, min_size=1, max_size=1, check_schema=False)
        try:
            applied = pg.create_schema()
        finally:
            pg.close()
    except IdempoError as exc:
        raise click.ClickException(cannot_use(url, exc)) from exc
    if applied:
        versions = ", ".join(str(v) for v in applied)
        click.echo(f"schema {pg.schema!r}: applied version(s) {versions}; now at {postgres.SCHEMA_VERSION}.")
    else:
        click.echo(f"schema {pg.schema!r}: already at version {postgres.SCHEMA_VERSION}; nothing to do.")
