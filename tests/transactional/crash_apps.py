"""The crash matrix's apps: one transactional payment per key, on each front, for child processes.

Every front writes one row into ``payments`` (order_id, cents) through the
transaction idempo gives it and answers ``{"order_id", "cents", "status":
"charged"}``: a body that depends on the input only, so a retry that executes
again after a rollback answers what a fault-free run would have.

Environment (all fronts):
    IDEMPO_TX_BACKEND: ``postgres`` or ``sqlite``.
    IDEMPO_TX_DB: the PostgreSQL URL (``postgresql://user@host:port/db``) or the SQLite file.
    IDEMPO_TX_SCHEMA: the PostgreSQL schema holding idempo's tables and ``payments``.
    IDEMPO_TX_LEASE: lease seconds.
    IDEMPO_FAULTS: fault points to arm (idempo._engine.faultpoints), read at import.

Fronts:
    - FastAPI under uvicorn: ``uvicorn tests.transactional.crash_apps:fastapi_app --factory``
      (``tx: idempo.fastapi.Transaction``; ``AsyncPostgresStore.from_pool`` or ``AsyncSQLiteStore``).
    - Django under waitress: ``waitress --call tests.transactional.crash_apps:django_app``
      (``@idempotency_required(transactional=True)``, the row written through Django's connection).
    - ``@idempotent(transactional=True)``: ``python -m tests.transactional.crash_apps ORDER_ID:CENTS ...``
      calls the function once per argument and prints one JSON line per result.
"""

import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from idempo import Policy


def _policy() -> Policy:
    return Policy(require_key=True, lease_ttl=float(os.environ.get("IDEMPO_TX_LEASE", "1")))


def _answer(order_id: str, cents: int) -> dict[str, Any]:
    return {"order_id": order_id, "cents": cents, "status": "charged"}


def _pg_conninfo() -> str:
    url = os.environ["IDEMPO_TX_DB"]
    schema = os.environ["IDEMPO_TX_SCHEMA"]
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


# --- FastAPI --------------------------------------------------------------------------


def fastapi_app() -> Any:
    """The FastAPI front: ``POST /payments`` asks for ``tx: idempo.fastapi.Transaction``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    import idempo.fastapi
    from idempo.asgi import IdempotencyMiddleware

    backend = os.environ["IDEMPO_TX_BACKEND"]
    pool: Any = None
    if backend == "postgres":
        import psycopg_pool

        from idempo.stores.postgres import AsyncPostgresStore

        pool = psycopg_pool.AsyncConnectionPool(_pg_conninfo(), min_size=1, max_size=4, open=False, timeout=5)
        store: Any = AsyncPostgresStore.from_pool(pool, schema=os.environ["IDEMPO_TX_SCHEMA"])
    else:
        from idempo.stores.sqlite import AsyncSQLiteStore

        store = AsyncSQLiteStore(os.environ["IDEMPO_TX_DB"], busy_timeout=2.0)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        if pool is not None:
            await pool.open()
        yield
        if pool is not None:
            await pool.close()

    api = FastAPI(lifespan=lifespan)

    @api.post("/payments", status_code=201)
    async def create_payment(request: Request, tx: idempo.fastapi.Transaction) -> Response:
        body = await request.json()
        order_id, cents = body["order_id"], int(body["cents"])
        if backend == "postgres":
            await tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (%s, %s)", (order_id, cents))
        else:
            tx.connection.execute("INSERT INTO payments (order_id, cents) VALUES (?, ?)", (order_id, cents))
        return JSONResponse(_answer(order_id, cents), status_code=201)

    @api.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    api.add_middleware(IdempotencyMiddleware, store=store, policy=_policy())
    return api


# --- Django ---------------------------------------------------------------------------


#: Counts the Django view's runs in this process: an answer carrying the count shows the view ran again.
_DJANGO_RUNS = itertools.count(1)


def _pay(request: Any) -> Any:
    from django.db import connection
    from django.http import JsonResponse

    body = json.loads(request.body)
    order_id, cents = body["order_id"], int(body["cents"])
    mode = body.get("mode", "")
    if mode == "read_first":  # a read, then the write below: a deferred SQLite transaction must upgrade
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM payments")
        time.sleep(0.3)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO payments (order_id, cents, ref) VALUES (%s, %s, %s)", [order_id, cents, body.get("ref")]
        )
        for statement in body.get("sql", ()):  # raw SQL through Django's connection, after the write
            cursor.execute(statement)
    if mode == "raise":
        raise RuntimeError("provider down")
    if mode == "set_rollback":  # the view rolls its own block back, yet answers 201
        from django.db import transaction

        transaction.set_rollback(True)
        return JsonResponse({**_answer(order_id, cents), "run": next(_DJANGO_RUNS)}, status=201)
    if mode == "500":
        return JsonResponse({"error": "provider down"}, status=500)
    if mode == "400":
        return JsonResponse({"error": "card declined", "order_id": order_id}, status=400)
    if mode == "deferred":  # a second row with the same ref: the deferred UNIQUE fails at COMMIT
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO payments (order_id, cents, ref) VALUES (%s, 0, %s)", [order_id, body.get("ref")]
            )
    if mode == "stream":
        from django.http import StreamingHttpResponse

        chunks = [json.dumps(_answer(order_id, cents))[:10], json.dumps(_answer(order_id, cents))[10:]]
        return StreamingHttpResponse(iter([c.encode() for c in chunks]), status=201, content_type="application/json")
    return JsonResponse(_answer(order_id, cents), status=201)


def _health(request: Any) -> Any:
    from django.http import HttpResponse

    return HttpResponse(b"ok")


urlpatterns: list[Any] = []


def django_app() -> Any:
    """The Django front: ``POST /payments`` is ``@idempotency_required(transactional=True)``."""
    import django
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application
    from django.urls import path

    from idempo.django import idempotency_required

    backend = os.environ["IDEMPO_TX_BACKEND"]
    if backend == "postgres":
        url = urlsplit(os.environ["IDEMPO_TX_DB"])
        schema = os.environ["IDEMPO_TX_SCHEMA"]
        database = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": url.path.lstrip("/"),
            "USER": url.username or "postgres",
            "PASSWORD": url.password or "",
            "HOST": url.hostname or "127.0.0.1",
            "PORT": str(url.port or 5432),
            "OPTIONS": {"options": f"-c search_path={schema}"},
        }
        store: Any = f"{os.environ['IDEMPO_TX_DB']}?schema={schema}"
    elif backend == "sqlite":
        database = {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ["IDEMPO_TX_DB"],
            # IDEMPO_TX_SQLITE_MODE=deferred: Django's default (the alias sets no transaction_mode).
            "OPTIONS": {"transaction_mode": "IMMEDIATE"}
            if os.environ.get("IDEMPO_TX_SQLITE_MODE") != "deferred"
            else {},
        }
        store = f"sqlite:///{os.environ['IDEMPO_TX_DB']}"
    else:  # a store that cannot join Django's transaction: the start-up check refuses it
        database = {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["IDEMPO_TX_DB"]}
        store = backend
    policy = _policy()
    settings.configure(
        DEBUG=False,
        SECRET_KEY="idempo-tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["idempo.django.IdempotencyMiddleware"],
        INSTALLED_APPS=[],
        DATABASES={"default": database},
        USE_TZ=True,
        IDEMPO={"STORE": store, "DATABASE": "default", "POLICY": {"lease_ttl": policy.lease_ttl}},
    )
    urlpatterns[:] = [
        path("payments", idempotency_required(transactional=True)(_pay)),
        path("health", _health),
    ]
    django.setup()
    return get_wsgi_application()


# --- @idempotent ----------------------------------------------------------------------


def main(argv: list[str]) -> None:
    """Call the transactional function once per ``ORDER_ID:CENTS`` argument; print each result as a JSON line."""
    from idempo import idempotent

    backend = os.environ["IDEMPO_TX_BACKEND"]
    if backend == "postgres":
        import psycopg_pool

        from idempo.stores.postgres import PostgresStore

        pool = psycopg_pool.ConnectionPool(_pg_conninfo(), min_size=1, max_size=2, open=True)
        store: Any = PostgresStore.from_pool(pool, schema=os.environ["IDEMPO_TX_SCHEMA"])
        mark = "%s"
    else:
        from idempo.stores.sqlite import SQLiteStore

        store = SQLiteStore(os.environ["IDEMPO_TX_DB"], busy_timeout=2.0)
        mark = "?"

    @idempotent(store=store, key="order_id", lease_ttl=_policy().lease_ttl, transactional=True)
    def charge(order_id: str, cents: int, *, tx: Any) -> dict[str, Any]:
        tx.connection.execute(f"INSERT INTO payments (order_id, cents) VALUES ({mark}, {mark})", (order_id, cents))
        return _answer(order_id, cents)

    for argument in argv:
        order_id, _, cents = argument.partition(":")
        print(json.dumps(charge(order_id, int(cents)), sort_keys=True), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
