"""``idempo demo --store`` against the real PostgreSQL and Redis: the schema made first, fresh keys, one charge each."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
from tests.demo.test_demo_command import idempo
from tests.support.clock import eventually

PAYMENTS = 40
SEED = "5"


def run_demo(store_url: str, report: Path) -> tuple[str, dict[str, Any]]:
    """Run a small demo (with idempo only) against ``store_url``; return its output and its idempo run's numbers."""
    done = idempo(
        "demo", "--payments", str(PAYMENTS), "--concurrency", "16", "--seed", SEED, "--no-bare",
        "--store", store_url, "--json", str(report),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "double charges: 0" in done.stdout.splitlines()
    document = json.loads(report.read_text())
    assert document["failures"] == []
    run: dict[str, Any] = document["runs"]["idempo"]
    return done.stdout, run


def assert_consistent(run: dict[str, Any]) -> None:
    """One execution, one charge and one row per payment; every reused key refused; the attempts add up."""
    assert run["payments"] == run["handler_executions"] == run["provider_charges"] == run["payment_rows"] == PAYMENTS
    assert run["double_charges"] == run["lost"] == run["told_failed_but_charged"] == 0
    assert run["mismatches"] == run["key_reuses"] == run["key_reuses_refused"] > 0
    assert run["replays"] > 0
    # Each handler execution, replay, 409 and 422 is one attempt; timeouts and
    # other errors are attempts too, some of which executed the handler.
    answered = run["handler_executions"] + run["replays"] + run["conflicts"] + run["mismatches"]
    assert answered <= run["requests"] <= answered + run["timeouts"] + run["other_errors"]
    assert sum(run["other_kinds"].values()) == run["other_errors"]


def with_query(url: str, **options: str) -> str:
    """``url`` with these query options set (replacing any of the same name)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode({**dict(parse_qsl(parts.query)), **options})))


@pytest.fixture
def fresh_postgres_store_url(postgres_url: str, postgres_store_url: str) -> Iterator[tuple[str, str]]:
    """A store URL on a schema nobody has created yet (this session's, suffixed); dropped afterwards.

    Its connections carry the schema's name as ``application_name``, so a test can count them.
    """
    import psycopg

    schema = dict(parse_qsl(urlsplit(postgres_store_url).query))["schema"] + "_demo"
    yield with_query(postgres_url, schema=schema, application_name=schema), schema
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.mark.postgres
@pytest.mark.slow
def test_demo_on_postgresql_creates_the_schema_then_uses_fresh_keys_each_run(
    postgres_url: str, fresh_postgres_store_url: tuple[str, str], tmp_path: Path
) -> None:
    """`idempo demo` on a new PostgreSQL schema creates it first; a second run executes every payment anew."""
    import psycopg

    url, schema = fresh_postgres_store_url
    first_output, first = run_demo(url, tmp_path / "first.json")
    assert f"store schema '{schema}': applied version(s)" in first_output
    assert_consistent(first)

    # Same seed, same orders, same store: only fresh keys make the second run execute again.
    second_output, second = run_demo(url, tmp_path / "second.json")
    assert f"store schema '{schema}': up to date" in second_output
    assert_consistent(second)

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        # Besides the secret the store keeps for the demo's digests (idempo.secrets).
        query = f"SELECT count(*) FROM {schema}.idempo_records WHERE record_key <> 'idempo:secret'"
        (records,) = conn.execute(query).fetchone() or (0,)

        def connections_left() -> int:
            query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            (count,) = conn.execute(query, (schema,)).fetchone() or (0,)
            return int(count)

        # A backend leaves pg_stat_activity a moment after its client hung up.
        assert eventually(lambda: connections_left() == 0)
    assert records == 2 * PAYMENTS  # one record per key, none shared between the runs


@pytest.mark.redis
@pytest.mark.slow
def test_demo_on_redis_charges_each_payment_once(redis_url: str, redis_store_url: str, tmp_path: Path) -> None:
    """`idempo demo --store redis://...` reports `double charges: 0` and leaves one record per payment."""
    import redis

    # Under the session's prefix (its keys are deleted after the session), a prefix of this test's own.
    prefix = dict(parse_qsl(urlsplit(redis_store_url).query))["prefix"] + "demo:"
    _, run = run_demo(with_query(redis_store_url, prefix=prefix), tmp_path / "report.json")
    assert_consistent(run)
    client = redis.Redis.from_url(redis_url)
    try:
        records = list(client.scan_iter(match=prefix + "*", count=1000))
    finally:
        client.close()
    # One per payment, and the secret the store keeps for the demo's digests (idempo.secrets).
    assert (prefix + "{idempo:secret}").encode() in records
    assert len(records) == PAYMENTS + 1
