"""Starlette: the transaction of a transactional route (DESIGN "transactional route").

::

    from idempo.asgi import IdempotencyMiddleware
    from idempo.starlette import transaction

    async def create_payment(request: Request) -> Response:
        tx = await transaction(request)
        await tx.connection.execute("INSERT INTO payments ...")
        return JSONResponse({"status": "pending"}, status_code=201)

    app = Starlette(routes=[Route("/payments", create_payment, methods=["POST"])])
    app.add_middleware(IdempotencyMiddleware, store=AsyncPostgresStore.from_pool(pool))

The transaction opens on the first call (a connection of the store's
database checked out, BEGIN); the handler writes through
``tx.connection``; :class:`idempo.asgi.IdempotencyMiddleware` completes the
record as the transaction's last statement, commits, and only then sends the
response, held whole until COMMIT returned.
"""

from __future__ import annotations

from starlette.requests import HTTPConnection

from ._engine.transaction import AsyncTransaction
from ._http.asgi import EXCHANGE_SCOPE_KEY, Exchange
from .exceptions import MissingKey

__all__ = ["transaction"]


async def transaction(request: HTTPConnection) -> AsyncTransaction:
    """The request's transaction, opened on the first call (later calls return the same one).

    Args:
        request: the Starlette request (``HTTPConnection``) of a route behind
            :class:`idempo.asgi.IdempotencyMiddleware`.

    Returns:
        the :class:`~idempo.transactional.AsyncTransaction`: ``connection``
        (psycopg ``AsyncConnection``, or the sqlite3 proxy), ``record_key``, ``token``.

    Raises:
        MissingKey: the request runs without a record (no ``Idempotency-Key``,
            a method the policy leaves out, the store bypassed): a
            transactional route needs one (use ``Policy(require_key=True)``).
            Left to propagate, the middleware answers it with a 400
            ``application/problem+json`` (``missing-key``, or
            ``transaction-not-covered`` for a method or path idempo leaves out).
        TransactionClosed: the record is already settled (a background task),
            or the answer started before the transaction opened.
        ConfigurationError: the store cannot open transactions (Redis, memory,
            a PostgreSQL store not built by ``from_pool``).
        StoreUnavailable: no connection within the store's deadline.
    """
    exchange = request.scope.get(EXCHANGE_SCOPE_KEY)
    if not isinstance(exchange, Exchange):
        raise MissingKey(
            f"{request.url.path} is transactional: it runs only as a request idempo covers (a method of "
            "Policy.methods) with an idempotency key; send one, and declare Policy(require_key=True) on the route"
        )
    return await exchange.transaction()
