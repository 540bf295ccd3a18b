"""Start-up on a store that is not there, or not as configured (issue 10 item 5).

One behaviour for every network store: unreachable at start-up (the port
refuses, nothing answers) is one warning and the application starts,
answering 503 until the store is back; a misconfiguration (a wrong role or
password, a missing database or schema, a host name that does not resolve, a
database number the server lacks) fails the start-up with one line naming the
cause and the fix, from the ASGI lifespan and from the blocking fronts
(the WSGI middleware, ``@idempotent``) when they are built alike. Building a
store does no I/O: ``open()`` checks, and the fronts call it at start-up.
"""

from __future__ import annotations

import logging
import socket
import uuid
from typing import Any

import anyio
import httpx
import pytest
from store_helpers import OrdersApp, serve, unused_port

from idempo import ConfigurationError, StoreUnavailable
from idempo.asgi import IdempotencyMiddleware
from idempo.wsgi import IdempotencyMiddleware as WSGIMiddleware

UNKNOWN_HOST = "db.idempo-test.invalid"


def _startup_messages(store: Any) -> list[dict[str, Any]]:
    """Run the middleware's lifespan start-up over ``store``; return what it sent the server."""
    sent: list[dict[str, Any]] = []
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, Any]:
        return next(incoming)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        middleware = IdempotencyMiddleware(OrdersApp(), store)
        try:
            await middleware({"type": "lifespan"}, receive, send)
        finally:
            await middleware.store.aclose()

    anyio.run(main)
    return sent


def _failed_startup(store: Any) -> str:
    sent = _startup_messages(store)
    assert sent[0]["type"] == "lifespan.startup.failed", sent
    message: str = sent[0]["message"]
    assert "\n" not in message
    return message


def _wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    start_response("201 Created", [("content-type", "application/json")])
    return [b"{}"]


def _blocking_startup(store: Any) -> None:
    """Build the blocking fronts over ``store`` (their start-up), closing the store whatever happens."""
    try:
        WSGIMiddleware(_wsgi_app, store)
    finally:
        store.close()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "idempo" and r.levelno == logging.WARNING]


@pytest.fixture
def unknown_host(monkeypatch: pytest.MonkeyPatch) -> str:
    """A host name that does not resolve, answered in-process: no query leaves the machine."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == UNKNOWN_HOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return UNKNOWN_HOST


# --- PostgreSQL ---------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_unreachable_at_startup_starts_with_one_warning_and_answers_503(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 item 5: a refusing port at start-up -> the app starts, one warning names the store, then 503."""
    from idempo.stores.postgres import AsyncPostgresStore

    url = f"postgresql://postgres:secret@127.0.0.1:{unused_port()}/test"
    store = AsyncPostgresStore(url, deadline=0.5)
    app = OrdersApp(on_shutdown=store.aclose)
    with (
        caplog.at_level(logging.WARNING, "idempo"),
        serve(IdempotencyMiddleware(app, store)) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        answer = client.post("/orders", json={}, headers={"Idempotency-Key": "k1"})
    assert answer.status_code == 503
    assert answer.headers["retry-after"].isdigit()
    assert app.calls == 0
    startup = [w for w in _warnings(caplog) if "start-up" in w]
    assert len(startup) == 1
    assert f"postgresql://postgres:***@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/test" in startup[0]
    assert "secret" not in startup[0]


@pytest.mark.postgres
def test_blocking_postgres_store_unreachable_at_startup_is_built_then_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The blocking store on a refusing port starts its front (one warning), and each call is StoreUnavailable."""
    from idempo.stores.postgres import PostgresStore

    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{unused_port()}/test", deadline=0.5)
    with caplog.at_level(logging.WARNING, "idempo"):
        WSGIMiddleware(_wsgi_app, store)
    try:
        assert len(_warnings(caplog)) == 1
        with pytest.raises(StoreUnavailable):
            store.begin("k", "fp", 30_000)
    finally:
        store.close()


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("change", "cause", "fix"),
    [
        ("role", 'role "idempo_no_such_role" does not exist', "fix the user name"),
        ("database", 'database "idempo_no_such_db" does not exist', "fix the database name"),
        ("schema", "has no idempo tables in schema", "idempo migrate"),
        ("host", UNKNOWN_HOST, "fix the host name"),
    ],
)
def test_postgres_misconfiguration_is_one_line_naming_cause_and_fix(
    postgres_url: str, unknown_host: str, change: str, cause: str, fix: str
) -> None:
    """Issue 10 item 5: a wrong role, database, schema or host fails the start-up at once, in one line
    with the cause and the fix (ASGI lifespan and the blocking store's constructor)."""
    from idempo.stores.postgres import AsyncPostgresStore, PostgresStore

    url = {
        "role": postgres_url.replace("postgres@", "idempo_no_such_role:pw@", 1),
        "database": postgres_url.rsplit("/", 1)[0] + "/idempo_no_such_db",
        "schema": f"{postgres_url}?schema=idempo_never_{uuid.uuid4().hex[:8]}",
        "host": postgres_url.replace("127.0.0.1", unknown_host, 1),
    }[change]
    message = _failed_startup(AsyncPostgresStore(url))
    assert cause in message, message
    assert fix in message, message
    assert message.startswith("idempo: cannot use the store at ")
    assert ":pw@" not in message
    with pytest.raises(ConfigurationError) as caught:
        _blocking_startup(PostgresStore(url))
    assert cause in str(caught.value)
    assert fix in str(caught.value)


# --- Redis --------------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_unreachable_at_startup_starts_with_one_warning_and_answers_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 10 item 5: Redis refusing at start-up behaves as PostgreSQL: starts, one warning, 503."""
    from idempo.stores.redis import AsyncRedisStore, RedisStore

    url = f"redis://127.0.0.1:{unused_port()}/0"
    store = AsyncRedisStore(url, deadline=0.5)
    app = OrdersApp(on_shutdown=store.aclose)
    with caplog.at_level(logging.WARNING, "idempo"):
        with serve(IdempotencyMiddleware(app, store)) as base, httpx.Client(base_url=base, timeout=10) as client:
            answer = client.post("/orders", json={}, headers={"Idempotency-Key": "k1"})
        assert answer.status_code == 503
        assert app.calls == 0
        assert len([w for w in _warnings(caplog) if "start-up" in w]) == 1
        blocking = RedisStore(url, deadline=0.5)
        WSGIMiddleware(_wsgi_app, blocking)
    try:
        assert len([w for w in _warnings(caplog) if "start-up" in w]) == 2
        with pytest.raises(StoreUnavailable):
            blocking.get("k")
    finally:
        blocking.close()


@pytest.mark.redis
@pytest.mark.parametrize(
    ("change", "cause", "fix"),
    [
        ("user", "invalid username-password pair", "fix the user name or password"),
        ("db", "DB index is out of range", "database number"),
        ("host", "Name or service not known", "fix the host name"),
    ],
)
def test_redis_misconfiguration_is_one_line_naming_cause_and_fix(
    redis_url: str, unknown_host: str, change: str, cause: str, fix: str
) -> None:
    """Issue 10 item 5: an unknown user, a database the server lacks or an unknown host fails the start-up."""
    from idempo.stores.redis import AsyncRedisStore, RedisStore

    base = redis_url.rsplit("/", 1)[0]
    url = {
        "user": base.replace("redis://", "redis://idempo-no-such-user:pw@", 1) + "/0",
        "db": base + "/9999",
        "host": base.replace("127.0.0.1", unknown_host, 1) + "/0",
    }[change]
    message = _failed_startup(AsyncRedisStore(url))
    assert cause in message, message
    assert fix in message, message
    assert ":pw@" not in message
    with pytest.raises(ConfigurationError) as caught:
        _blocking_startup(RedisStore(url))
    assert cause in str(caught.value)
    assert fix in str(caught.value)


@pytest.mark.postgres
def test_a_failed_startup_under_uvicorn_prints_the_cause_without_a_traceback(postgres_url: str, tmp_path: Any) -> None:
    """The one line is all uvicorn prints: the app's lifespan ends instead of waiting in receive() until
    uvicorn cancels it (a new user's trial printed ~40 lines: SystemExit, then CancelledError); the
    app's own shutdown hook runs."""
    import subprocess
    import sys
    import textwrap

    url = f"{postgres_url}?schema=idempo_never_{uuid.uuid4().hex[:8]}"
    shutdown_ran = tmp_path / "shutdown-ran"
    (tmp_path / "failing_app.py").write_text(
        textwrap.dedent(
            f"""
            import contextlib, pathlib
            from starlette.applications import Starlette
            from idempo.asgi import IdempotencyMiddleware

            @contextlib.asynccontextmanager
            async def lifespan(app):
                yield
                pathlib.Path({str(shutdown_ran)!r}).write_text("yes")

            app = IdempotencyMiddleware(Starlette(lifespan=lifespan), store={url!r})
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "failing_app:app", "--host", "127.0.0.1", "--port", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert "the database has no idempo tables in schema" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "CancelledError" not in done.stderr, done.stderr
    assert shutdown_ran.read_text() == "yes"
