"""The PostgreSQL schema: schema.sql equals every migration applied in order; the version gate; `idempo migrate`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.postgres


@pytest.fixture
def schemas(postgres_url: str) -> Iterator[list[str]]:
    """Names for throwaway schemas; each is dropped afterwards."""
    import psycopg

    names: list[str] = []
    yield names
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for name in names:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def _new_schema(schemas: list[str]) -> str:
    name = f"idempo_mig_{uuid.uuid4().hex[:10]}"
    schemas.append(name)
    return name


def _describe(conn: Any, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every column, index and constraint of a schema, with the schema name taken out."""
    columns = conn.execute(
        "SELECT table_name, ordinal_position, column_name, data_type, is_nullable, column_default"
        " FROM information_schema.columns WHERE table_schema = %s ORDER BY table_name, ordinal_position",
        (schema,),
    ).fetchall()
    indexes = conn.execute(
        "SELECT tablename, indexname, replace(indexdef, %s, '') FROM pg_indexes"
        " WHERE schemaname = %s ORDER BY indexname",
        (schema + ".", schema),
    ).fetchall()
    constraints = conn.execute(
        "SELECT c.relname, k.conname, pg_get_constraintdef(k.oid) FROM pg_constraint k"
        " JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = k.connamespace"
        " WHERE n.nspname = %s ORDER BY k.conname",
        (schema,),
    ).fetchall()
    return {"columns": columns, "indexes": indexes, "constraints": constraints}


def test_schema_sql_equals_all_migrations_applied(postgres_url: str, schemas: list[str]) -> None:
    """schema.sql (fresh installs) and migrations/*.sql applied in order (upgrades) build the same schema."""
    import psycopg

    from idempo.stores.postgres import SCHEMA_VERSION, PostgresStore, migrations

    fresh = _new_schema(schemas)
    store = PostgresStore(f"{postgres_url}?schema={fresh}", check_schema=False)
    assert store.create_schema() == [SCHEMA_VERSION]
    store.close()

    upgraded = _new_schema(schemas)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {upgraded}")
        versions = []
        with conn.transaction():
            conn.execute(f"SET LOCAL search_path TO {upgraded}")
            for version, text in migrations():
                conn.execute(text)
                versions.append(version)
        assert versions == list(range(1, SCHEMA_VERSION + 1)), (
            "migrations must be numbered 0001, 0002, ... without gaps"
        )
        fresh_shape, upgraded_shape = _describe(conn, fresh), _describe(conn, upgraded)
    assert fresh_shape["columns"], "schema.sql created no tables"
    assert fresh_shape == upgraded_shape


def test_store_refuses_a_missing_or_old_schema(postgres_url: str, schemas: list[str]) -> None:
    """The store checks the schema version at start and tells the user to run `idempo migrate`.

    At start-up (``open()``, ``await open()``) it is a ConfigurationError; on a
    first call that could not be checked before, a StoreError (the fronts answer 503) with the
    same advice.
    """
    import asyncio

    import psycopg

    from idempo import ConfigurationError, StoreError
    from idempo.stores.postgres import AsyncPostgresStore, PostgresStore

    schema = _new_schema(schemas)
    url = f"{postgres_url}?schema={schema}"

    def open_blocking() -> None:
        store = PostgresStore(url)
        try:
            store.open()
        finally:
            store.close()

    with pytest.raises(ConfigurationError, match="idempo migrate"):
        open_blocking()

    async def first_use() -> None:
        store = AsyncPostgresStore(url)
        try:
            with pytest.raises(StoreError, match="idempo migrate"):
                await store.begin("k", "fp", 1000)
            with pytest.raises(ConfigurationError, match="idempo migrate"):
                await store.open()
        finally:
            await store.aclose()

    asyncio.run(first_use())

    store = PostgresStore(url, check_schema=False)
    store.create_schema()
    store.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"UPDATE {schema}.idempo_schema_version SET version = 0")
    with pytest.raises(ConfigurationError, match="version 0"):
        open_blocking()


def test_idempo_migrate_command_creates_then_finds_nothing_to_do(postgres_url: str, schemas: list[str]) -> None:
    """`idempo migrate --store postgresql://...` creates the schema; a second run changes nothing."""
    from click.testing import CliRunner

    from idempo.cli import main
    from idempo.stores.postgres import SCHEMA_VERSION, PostgresStore

    schema = _new_schema(schemas)
    url = f"{postgres_url}?schema={schema}"
    runner = CliRunner()
    first = runner.invoke(main, ["migrate", "--store", url])
    assert first.exit_code == 0, first.output
    assert f"applied version(s) {SCHEMA_VERSION}" in first.output
    second = runner.invoke(main, ["migrate", "--store", url])
    assert second.exit_code == 0, second.output
    assert "nothing to do" in second.output
    store = PostgresStore(url)
    assert store.check_schema() == SCHEMA_VERSION
    store.close()
    printed = runner.invoke(main, ["migrate", "--store", url, "--print-sql"])
    assert "CREATE TABLE idempo_records" in printed.output


def test_idempo_migrate_concurrent_runs_are_safe(postgres_url: str, schemas: list[str]) -> None:
    """Two create_schema() calls at once: the advisory lock serialises them, the schema is created once."""
    from concurrent.futures import ThreadPoolExecutor

    from idempo.stores.postgres import SCHEMA_VERSION, PostgresStore

    schema = _new_schema(schemas)
    url = f"{postgres_url}?schema={schema}"
    stores = [PostgresStore(url, check_schema=False) for _ in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda store: store.create_schema(), stores))
        assert sorted(results) == [[], [SCHEMA_VERSION]]
    finally:
        for store in stores:
            store.close()


def test_migrate_command_for_stores_without_schema(tmp_path: Any) -> None:
    """`idempo migrate` on sqlite:// or memory:// explains there is nothing to migrate."""
    from click.testing import CliRunner

    from idempo.cli import main

    result = CliRunner().invoke(main, ["migrate", "--store", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output
