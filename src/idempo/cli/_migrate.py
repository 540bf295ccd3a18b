"""``idempo migrate``: create or upgrade a store's schema.

Only PostgreSQL has a schema to manage: it is never altered at request time,
so run this once before starting the application, and again after upgrading
idempo. SQLite creates its table when the store opens; Redis and the memory
store have no schema.

``--legacy-digests`` (any store) opens the legacy window when upgrading from
a version whose digests were not keyed: for ``--legacy-window`` seconds, the
application also finds the records that version wrote
(:func:`idempo.secrets.open_legacy_window`; docs/operating.md, "Upgrading to
keyed digests").
"""

from __future__ import annotations

from urllib.parse import urlsplit

import click
from click.core import ParameterSource

from ..exceptions import IdempoError
from ..stores._base import cannot_use

__all__ = ["migrate"]


@click.command()
@click.option(
    "--store",
    "url",
    envvar="IDEMPO_STORE",
    default=None,
    help="The store URL, e.g. postgresql://user@host/db?schema=idempo (or $IDEMPO_STORE); not needed with --print-sql, "
    "which ignores $IDEMPO_STORE.",
)
@click.option("--print-sql", is_flag=True, help="Print the PostgreSQL schema (schema.sql) and exit; change nothing.")
@click.option(
    "--legacy-digests",
    is_flag=True,
    help="Upgrading from a version with unkeyed digests: open the legacy window, in which the application also "
    "finds the records that version wrote (replays them, or answers 422/409 as before). Run it before the first "
    "process of this version starts.",
)
@click.option(
    "--legacy-window",
    type=click.FloatRange(min=1),
    default=86400.0,
    show_default=True,
    metavar="SECONDS",
    help="How long the legacy window stays open: the longest record_ttl (or hold_ttl) the older version used.",
)
def migrate(url: str | None, print_sql: bool, legacy_digests: bool, legacy_window: float) -> None:
    """Create the store's schema, or upgrade it to this idempo's version."""
    if print_sql and click.get_current_context().get_parameter_source("url") is not ParameterSource.COMMANDLINE:
        # $IDEMPO_STORE names the application's store, which --print-sql never
        # touches: whatever it is (an SQLite file, a directory, unset), print.
        url = None
    scheme = None if url is None else urlsplit(url).scheme.lower()
    if print_sql:
        if scheme not in (None, "postgresql", "postgres"):
            raise click.UsageError("--print-sql applies to postgresql:// stores only")
        # Read from the package alone: a DBA can print the schema without psycopg or a database.
        from ..stores._base import load_sql
        from ..stores.sql.postgres import SCHEMA_VERSION

        click.echo(load_sql("postgres", "schema.sql"))
        click.echo(f"INSERT INTO idempo_schema_version (version) VALUES ({SCHEMA_VERSION});")
        return
    if url is None:
        raise click.UsageError("Missing option '--store' (or $IDEMPO_STORE).")
    if scheme not in ("postgresql", "postgres"):
        from ._records import open_store

        store = open_store(url, must_exist=False)  # SQLite creates its file and schema here
        store.close()
        click.echo(f"{scheme}:// stores have no schema to migrate" + ("." if legacy_digests else "; nothing to do."))
        if legacy_digests:
            _open_legacy_window(url, legacy_window)
        return

    try:
        from ..stores import postgres
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
    if legacy_digests:
        _open_legacy_window(url, legacy_window)


def _open_legacy_window(url: str, seconds: float) -> None:
    """Open the legacy window in the store at ``url`` and say until when."""
    from datetime import UTC, datetime

    from ..secrets import open_legacy_window
    from ._records import open_store

    store = open_store(url)
    try:
        until = open_legacy_window(store, seconds)
    except IdempoError as exc:
        raise click.ClickException(cannot_use(url, exc)) from exc
    finally:
        store.close()
    when = datetime.fromtimestamp(until / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    click.echo(
        f"legacy window open until {when}: processes of this version that start before then also find the "
        "records of versions before keyed digests."
    )
