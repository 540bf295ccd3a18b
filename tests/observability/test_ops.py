"""`idempo inspect`, `idempo stats` and `idempo purge` as subprocesses against SQLite and PostgreSQL; store stats()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from idempo import Acquired, StoredResponse, SupportsStats, make_record_key, store_from_url
from idempo.asgi import IdempotencyMiddleware
from idempo.secrets import store_secret
from idempo.stores import MemoryStore
from tests.conftest import SESSION
from tests.support.servers import running_asgi

from .conftest import KEY, PRINCIPAL, SECRET, record_key

RESPONSE = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"id":"pay_1"}')


def idempo(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m idempo ARGS`` as an operator would; capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "idempo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def as_json(*args: str) -> dict[str, object]:
    """Run a command with --json; it must exit 0."""
    result = idempo(*args, "--json")
    assert result.returncode == 0, result.stderr
    document: dict[str, object] = json.loads(result.stdout)
    return document


@pytest.fixture(scope="module")
def postgres_ops_url(postgres_url: str) -> Iterator[str]:
    """A schema of this module's own, created with `idempo migrate`; dropped afterwards."""
    import psycopg

    schema = f"idempo_ops_{SESSION}"
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={schema}&application_name=idempo-ops-{SESSION}"
    migrated = idempo("migrate", "--store", url)
    assert migrated.returncode == 0, migrated.stderr
    yield url
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store: an SQLite file, or this module's PostgreSQL schema emptied."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'idempo.db'}"
        return
    import psycopg

    url: str = request.getfixturevalue("postgres_ops_url")
    base: str = request.getfixturevalue("postgres_url")
    schema = url.split("schema=")[1].split("&")[0]
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {schema}.idempo_records")
    yield url


def serve_one_payment(url: str, secret: str | None = None) -> None:
    """POST /orders/1 with KEY through the middleware on ``url``, over real HTTP; the record is completed.

    Without ``secret``, the middleware keys its digests with the secret the store keeps.
    """

    async def orders(request: Request) -> JSONResponse:
        return JSONResponse({"id": "pay_1"}, status_code=201)

    app = IdempotencyMiddleware(Starlette(routes=[Route("/orders/{n}", orders, methods=["POST"])]), url, secret=secret)
    with running_asgi(app) as base, httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
        answer = client.post("/orders/1", json={"sku": "A"}, headers={"Idempotency-Key": KEY})
        assert answer.status_code == 201
        # The record is completed before the last byte is sent; it is readable now.


def add_leases(url: str, expired: int) -> str:
    """One live lease (returned record key) and ``expired`` completed records whose TTL has run out.

    Completed ones: an in-progress record whose lease ran out is kept 24 h
    (the stores' grace), so purge leaves it.
    """
    store = store_from_url(url)
    try:
        live = "live-" + uuid.uuid4().hex
        store.begin(live, "fp", 600_000)
        for _ in range(expired):
            key = "expired-" + uuid.uuid4().hex
            acquired = store.begin(key, "fp", 600_000)
            assert isinstance(acquired, Acquired)
            store.complete(key, acquired.token, StoredResponse(201, (), b"{}"), 1)
    finally:
        store.close()
    time.sleep(0.05)
    return live


def test_inspect_stats_purge_round(store_url: str) -> None:
    """inspect shows the record a request left; stats counts by state; purge deletes the expired in batches."""
    serve_one_payment(store_url)
    live = add_leases(store_url, expired=3)
    scope = ("--store", store_url, "--principal", PRINCIPAL, "--path", "/orders/1")
    store = store_from_url(store_url)
    try:
        kept = make_record_key(PRINCIPAL, "POST", "/orders/1", KEY, secret=store_secret(store))
    finally:
        store.close()

    # No --secret: inspect keys the record key with the secret the store keeps, as the app did.
    record = as_json("inspect", KEY, *scope)
    assert record["record_key"] == kept
    assert record["state"] == "completed"
    assert record["lease_expires_at"] is None
    assert 0 < float(record["expires_in_s"]) <= 86400  # type: ignore[arg-type]
    response = record["response"]
    assert isinstance(response, dict)
    assert response["status"] == 201
    assert ["content-type", "application/json"] in response["headers"]
    assert response["body_preview"] == '{"id":"pay_1"}'
    # The draft's sf-string form names the same key.
    assert as_json("inspect", f'"{KEY}"', *scope)["record_key"] == kept

    counted = as_json("stats", "--store", store_url)
    assert (counted["in_progress"], counted["completed"], counted["expired"], counted["total"]) == (1, 1, 3, 5)
    oldest = counted["oldest_lease"]
    assert isinstance(oldest, dict)
    assert oldest["record_key"] == live
    assert float(oldest["lease_remaining_s"]) > 500  # type: ignore[arg-type]

    assert as_json("purge", "--store", store_url, "--batch", "2") == {
        "purged": 3,
        "batches": 2,
        "seconds": pytest.approx(0, abs=60),
    }
    assert as_json("stats", "--store", store_url)["expired"] == 0

    missing = idempo("inspect", "--record-key", "0" * 32, "--store", store_url, "--json")
    assert missing.returncode == 1
    assert json.loads(missing.stdout) == {"record_key": "0" * 32, "found": False}


def test_human_output(tmp_path: Path) -> None:
    """Without --json: readable tables (dates, remaining seconds, the body), and a final purge count."""
    url = f"sqlite:///{tmp_path / 'idempo.db'}"
    serve_one_payment(url, secret=SECRET)
    live = add_leases(url, expired=2)

    shown = idempo("inspect", KEY, "--store", url, "--principal", PRINCIPAL, "--path", "/orders/1", "--secret", SECRET)
    assert shown.returncode == 0, shown.stderr
    assert record_key() in shown.stdout
    assert "completed" in shown.stdout
    assert '{"id":"pay_1"}' in shown.stdout
    assert "content-type: application/json" in shown.stdout
    # The app used SECRET; inspect without it finds nothing, and says that the secret is the likely
    # cause (not "never created"): with none at all, and with another one.
    unkeyed = idempo("inspect", KEY, "--store", url, "--principal", PRINCIPAL, "--path", "/orders/1")
    assert unkeyed.returncode == 1
    assert "give it with --secret or $IDEMPO_SECRET" in unkeyed.stdout
    other = idempo(
        "inspect", KEY, "--store", url, "--principal", PRINCIPAL, "--path", "/orders/1", "--secret", SECRET + "-other"
    )
    assert other.returncode == 1
    assert "or the app keys its records with another secret" in other.stdout
    assert "computed with --secret / $IDEMPO_SECRET" in other.stdout

    lease = idempo("inspect", "--record-key", live, "--store", url)
    assert "in_progress" in lease.stdout
    assert "lease expires" in lease.stdout

    counted = idempo("stats", "--store", url)
    assert "expired (to purge)  2" in counted.stdout
    assert live in counted.stdout

    purged = idempo("purge", "--store", url)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith("purged 2 expired records in 1 batch")


def test_usage_errors(tmp_path: Path) -> None:
    """inspect without a scope, with a malformed key or a placeholder bearer is a usage error; --store named."""
    url = f"sqlite:///{tmp_path / 'idempo.db'}"
    assert idempo("inspect", KEY, "--store", url).returncode == 2
    assert idempo("inspect", "two, keys", "--store", url, "--principal", "p", "--path", "/x").returncode == 2
    placeholder = idempo("inspect", KEY, "--store", url, "--authorization", "Bearer null", "--path", "/x")
    assert placeholder.returncode == 2
    assert "--principal addr:<ip>" in placeholder.stderr
    bad = idempo("stats", "--store", "nosuch://x")
    assert bad.returncode == 2
    assert "--store" in bad.stderr


# --- stats() on every store (in-process) ------------------------------------------------------


def empty_store_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL with no records: a fresh file, an emptied schema, a fresh Redis prefix."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'idempo.db'}"
    if kind == "redis":
        # Under the session's prefix (the session deletes its keys), in a namespace of its own.
        base: str = request.getfixturevalue("redis_store_url")
        return f"{base}stats-{uuid.uuid4().hex[:8]}:"
    import psycopg

    url: str = request.getfixturevalue("postgres_ops_url")
    schema = url.split("schema=")[1].split("&")[0]
    with psycopg.connect(request.getfixturevalue("postgres_url"), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {schema}.idempo_records")
    return url


@pytest.mark.parametrize(
    "kind",
    [
        "memory",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
    ],
)
def test_stats_counts_by_state(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """stats() counts live in-progress, live completed and expired records and finds the oldest lease."""
    store = MemoryStore() if kind == "memory" else store_from_url(empty_store_url(kind, request, tmp_path))
    assert isinstance(store, SupportsStats)
    try:
        store.begin("first-" + uuid.uuid4().hex, "fp", 600_000)
        time.sleep(0.01)
        store.begin("second-" + uuid.uuid4().hex, "fp", 600_000)
        done = "done-" + uuid.uuid4().hex
        acquired = store.begin(done, "fp", 600_000)
        assert isinstance(acquired, Acquired)
        store.complete(done, acquired.token, RESPONSE, 600_000)
        store.begin("gone-" + uuid.uuid4().hex, "fp", 1)
        time.sleep(0.05)
        counted = store.stats()
    finally:
        store.close()
    assert (counted.in_progress, counted.completed, counted.expired) == (2, 1, 1)
    assert counted.oldest_lease is not None
    assert counted.oldest_lease.record_key.startswith("first-")
    assert counted.oldest_lease.created_at_ms <= counted.now_ms


def test_inspect_shows_a_held_key_and_resolve_ends_the_hold(store_url: str) -> None:
    """Issue 10 item 9: `idempo inspect` shows a held record and why; `idempo resolve --complete-with-status`
    replaces it with that answer (replayed to retries), `--release` removes it; neither touches a stored answer."""
    from idempo import Marker

    store = store_from_url(store_url)
    try:
        held, released, stored = ("held-" + uuid.uuid4().hex, "rel-" + uuid.uuid4().hex, "ok-" + uuid.uuid4().hex)
        for key, response in ((held, None), (released, None), (stored, RESPONSE)):
            acquired = store.begin(key, "fp", 600_000)
            assert isinstance(acquired, Acquired)
            marker = Marker(Marker.HELD, "takeover").response()
            store.complete(key, acquired.token, response or marker, 600_000)
    finally:
        store.close()
    document = as_json("inspect", "--record-key", held, "--store", store_url)
    assert document["held"] == {"reason": "takeover", "first_status": None, "first_body_size": None}
    shown = idempo("inspect", "--record-key", held, "--store", store_url)
    assert "held" in shown.stdout
    assert "takeover" in shown.stdout
    done = idempo("resolve", "--record-key", held, "--store", store_url, "--complete-with-status", "201")
    assert done.returncode == 0, done.stderr
    assert "completed record" in done.stdout
    response = as_json("inspect", "--record-key", held, "--store", store_url)["response"]
    assert isinstance(response, dict)
    assert response["status"] == 201
    assert idempo("resolve", "--record-key", released, "--store", store_url, "--release").returncode == 0
    assert idempo("inspect", "--record-key", released, "--store", store_url).returncode == 1
    refused = idempo("resolve", "--record-key", stored, "--store", store_url, "--release")
    assert refused.returncode == 1
    assert "not held" in refused.stdout
