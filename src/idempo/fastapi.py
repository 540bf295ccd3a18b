"""FastAPI: route-level idempotency options, documented in the OpenAPI schema.

::

    from fastapi import Depends, FastAPI
    from idempo import Policy
    from idempo.fastapi import idempotency, idempotency_exempt, install

    app = FastAPI()
    install(app, store="sqlite:///idempo.db", policy=Policy())

    @app.post("/payments", status_code=201, dependencies=[Depends(idempotency(require_key=True, record_ttl=3600))])
    async def pay(payment: Payment) -> Receipt: ...

    @app.post("/webhooks", dependencies=[Depends(idempotency_exempt)])
    async def webhook(event: Event) -> None: ...

:func:`install` adds :class:`idempo.asgi.IdempotencyMiddleware` and documents
every route it covers: the ``Idempotency-Key`` header parameter (required
where the route requires a key) and idempo's own ``application/problem+json``
answers (draft-ietf-httpapi-idempotency-key-header section 2.7; RFC 9457;
DESIGN "HTTP behaviour"): 400 (key missing or malformed), 409 (in progress,
with ``Retry-After``), 410 (the first answer was not kept), 413 (body too
large), 422 (key reused with another request) and 503 (store unavailable,
with ``Retry-After``; not under ``fail_open``).

The options are FastAPI dependencies, so they also work on a router
(``APIRouter(dependencies=[Depends(idempotency_exempt)])``); a route's own
options win over its router's. The middleware runs before routing, so it
finds a request's route with Starlette's own matcher (``route.matches``, in
the router's order) and reads the route's options once, cached; a request
whose method no route's options and no path policy cover (a GET, usually)
skips the match. The dependency itself does nothing at request time.

Options derive from the policy the middleware would use for the path
(``routes`` patterns, else its default): ``idempotency(record_ttl=3600)``
changes only the TTL; ``idempotency(policy=Policy(...))`` replaces the policy.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends
from starlette.applications import Starlette
from starlette.requests import Request

from ._core.keys import MAX_KEY_LENGTH
from ._core.policy import Policy
from ._core.problems import PROBLEM_BASE
from ._core.routes import RouteOptions, RouteTable
from ._engine.transaction import AsyncTransaction, transactor_of
from ._http.asgi import Scope, add_route_options_finder, add_startup_check
from ._http.starlette import StarletteRouteOptions, dependant_options, flat_routes
from .asgi import IdempotencyMiddleware, PrincipalResolver, default_principal
from .exceptions import ConfigurationError
from .secrets import SecretSource
from .starlette import transaction as _starlette_transaction
from .typing import AsyncStore

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["Idempotency", "Session", "Transaction", "document", "idempotency", "idempotency_exempt", "install"]

# The ASGI middleware finds a route's options with Starlette's own matcher
# once this module is imported (the options below cannot exist without it).
add_route_options_finder(StarletteRouteOptions)


async def _transaction(request: Request) -> AsyncTransaction:
    """The dependency behind :data:`Transaction`: the request's transaction, opened now.

    Without a record (no key, a method idempo leaves out) it raises
    :class:`~idempo.exceptions.MissingKey`, which the middleware answers with a
    400 ``application/problem+json`` (not FastAPI's ``{"detail"}``).
    """
    return await _starlette_transaction(request)


Transaction = Annotated[AsyncTransaction, Depends(_transaction)]
"""A route parameter annotated with it gets the request's transaction (DESIGN "transactional route").

``async def create(body: PaymentIn, tx: idempo.fastapi.Transaction)``: the
route is transactional because it asks. The transaction opens when the
dependency resolves (a connection checked out, BEGIN); the handler writes
through ``tx.connection``; the middleware completes the record as the
transaction's last statement, commits, and sends the response only after
COMMIT returned. Checked at start-up: the store must be able to open
transactions (``AsyncPostgresStore.from_pool``, ``AsyncSQLiteStore`` on the
app's file) and the route must be ``async def``; otherwise the app does not
start (ConfigurationError). A request without an ``Idempotency-Key`` gets a 400
problem (``missing-key``); one with a method idempo leaves out, a 400
``transaction-not-covered``.
"""


async def _session(tx: Transaction) -> Any:
    """The dependency behind :data:`Session`: the SQLAlchemy session joined to the request's transaction."""
    session = tx.session
    if session is None:  # the start-up check refuses such a store; kept for apps served without lifespan
        raise ConfigurationError(_SESSION_FIX)
    return session


Session = Annotated[Any, Depends(_session)]
"""A route parameter annotated with it gets a SQLAlchemy ``AsyncSession`` joined to the request's transaction.

``async def create(body: PaymentIn, session: idempo.fastapi.Session)``: as :data:`Transaction` (the
route is transactional because it asks), for a store built on the app's ``AsyncEngine``
(``AsyncPostgresStore.from_engine``, ``AsyncSQLiteStore.from_engine``). The session is bound to
the transaction's connection with ``join_transaction_mode="create_savepoint"``: its ``commit()``
releases a savepoint, never idempo's transaction.
"""


_SESSION_FIX = (
    "idempo.fastapi.Session needs a store built on the app's SQLAlchemy AsyncEngine: "
    "AsyncPostgresStore.from_engine(engine) or AsyncSQLiteStore.from_engine(engine) "
    "(or ask for idempo.fastapi.Transaction and write through tx.connection)"
)


def _asks_for(dependant: Any, calls: tuple[Any, ...]) -> bool:
    for sub in getattr(dependant, "dependencies", ()):
        if getattr(sub, "call", None) in calls or _asks_for(sub, calls):
            return True
    return False


def _asks_for_transaction(dependant: Any) -> bool:
    return _asks_for(dependant, (_transaction, _session))


def _binds_sessions(transactor: Any) -> bool:
    """Whether a transactor binds a SQLAlchemy session to its transaction (the stores' ``from_engine``)."""
    module = sys.modules.get("idempo.stores._sqlalchemy")  # imported by from_engine; absent, no store used it
    return module is not None and isinstance(transactor, (module.EngineTransactor, module.AsyncEngineTransactor))


def _routes_of(routes: Any) -> Iterator[Any]:
    for route in flat_routes(routes):
        yield route
        children = getattr(route, "routes", None)
        if children and not hasattr(route, "endpoint"):
            yield from _routes_of(children)


def _check_transactional_routes(scope: Scope, app: Any, store: Any) -> None:
    """Start-up check: every route asking for :data:`Transaction` (or :data:`Session`) can have one.

    Raises:
        ConfigurationError: the store cannot open transactions, a route asks
            for a :data:`Session` on a store not built on a SQLAlchemy engine,
            or the route is a sync ``def``.
    """
    holder = scope.get("app")
    if not isinstance(holder, Starlette):
        holder = app
        if not isinstance(holder, Starlette):
            return
    for route in _routes_of(holder.router.routes):
        dependant = getattr(route, "dependant", None)
        if dependant is None or not _asks_for_transaction(dependant):
            continue
        name = getattr(route, "path", "?")
        if transactor_of(store) is None:
            raise ConfigurationError(
                f"route {name} asks for a transaction, but {type(store).__name__} cannot open one: "
                "use AsyncPostgresStore.from_pool(pool) on the app's database, or AsyncSQLiteStore on the app's file"
            )
        if _asks_for(dependant, (_session,)) and not _binds_sessions(transactor_of(store)):
            raise ConfigurationError(f"route {name} asks for idempo.fastapi.Session, but {_SESSION_FIX}")
        endpoint = getattr(route, "endpoint", None)
        if endpoint is not None and not inspect.iscoroutinefunction(endpoint):
            raise ConfigurationError(
                f"route {name} asks for a transaction but is a sync def: its transaction is async; make it async def"
            )


add_startup_check(_check_transactional_routes)

_PROBLEM_SCHEMA = "IdempotencyProblem"
_PROBLEM_MEDIA = "application/problem+json"
_PROBLEM_CONTENT = {_PROBLEM_MEDIA: {"schema": {"$ref": f"#/components/schemas/{_PROBLEM_SCHEMA}"}}}
# idempo's own answers on a covered route (DESIGN "HTTP behaviour"): status -> description.
_ANSWERS = {
    "400": "The Idempotency-Key is missing where required, or malformed.",
    "409": "A request with this Idempotency-Key is still being processed; retry after `Retry-After` seconds.",
    "410": (
        "The first answer for this Idempotency-Key was not kept (it was larger than the route stores), "
        "and the request will not run again for this key."
    ),
    "413": "The request body is larger than an idempotent request may send.",
    "422": "The Idempotency-Key was already used with a different request.",
    "503": "The idempotency store is unavailable; the request did not run. Retry after `Retry-After` seconds.",
}
# The answers that carry Retry-After.
_RETRY_AFTER = frozenset({"409", "503"})


class Idempotency:
    """A FastAPI dependency that carries one route's idempotency options; made by :func:`idempotency`.

    Attributes:
        idempo_route_options: the options, read by the middleware.
    """

    __slots__ = ("idempo_route_options",)

    def __init__(self, options: RouteOptions) -> None:
        self.idempo_route_options = options

    async def __call__(self) -> None:
        """Nothing at request time: the middleware already applied the options."""

    def __repr__(self) -> str:
        return f"Idempotency({self.idempo_route_options!r})"


def idempotency(
    policy: Policy | None = None,
    *,
    require_key: bool | None = None,
    record_ttl: float | timedelta | None = None,
    lease_ttl: float | timedelta | None = None,
    **changes: Any,
) -> Idempotency:
    """Idempotency options for one route (or router), as a dependency: ``Depends(idempotency(...))``.

    Args:
        policy: a whole :class:`~idempo.Policy` for the route, replacing the
            middleware's; None derives the route's policy from the
            middleware's with the changes below.
        require_key: answer 400 when the request has no key.
        record_ttl: seconds (or a timedelta) the route's completed records are kept.
        lease_ttl: seconds (or a timedelta) a request holds the lease.
        **changes: any other :class:`~idempo.Policy` argument (``methods``,
            ``wait``, ``status_verdicts``, ...).

    Raises:
        ConfigurationError: a change is not a valid Policy argument value.
        TypeError: a change is not a Policy argument.
    """
    return Idempotency(
        RouteOptions.declared(
            policy, require_key=require_key, record_ttl=record_ttl, lease_ttl=lease_ttl, changes=changes
        )
    )


#: The dependency that exempts a route (or a router's routes) from idempotency:
#: ``dependencies=[Depends(idempotency_exempt)]``.
idempotency_exempt = Idempotency(RouteOptions(exempt=True))


def install(
    app: FastAPI,
    store: AsyncStore | str,
    *,
    policy: Policy | None = None,
    routes: Mapping[str, Policy | None] | None = None,
    principal: PrincipalResolver = default_principal,
    key_header: str = "Idempotency-Key",
    secret: str | bytes | None = None,
) -> None:
    """Add :class:`idempo.asgi.IdempotencyMiddleware` to a FastAPI app and document it in the schema.

    The arguments are the middleware's (see :class:`idempo.asgi.IdempotencyMiddleware`).
    Call it once, before the app serves its first request; routes may be
    added after it.

    The default principal is ``scope["user"]`` when Starlette's
    ``AuthenticationMiddleware`` runs before idempo's: add it after calling
    ``install`` (the middleware added last runs first).

    Raises:
        ConfigurationError: ``routes`` holds a value that is neither a Policy
            nor None, or the secret is shorter than 16 bytes (a bad store URL
            is reported when the app starts serving).
    """
    RouteTable(routes)  # fail here rather than on the first request
    SecretSource(secret)
    app.add_middleware(
        IdempotencyMiddleware,
        store=store,
        policy=policy,
        routes=routes,
        principal=principal,
        key_header=key_header,
        secret=secret,
    )
    document(app, policy=policy, routes=routes, key_header=key_header)


def document(
    app: FastAPI,
    *,
    policy: Policy | None = None,
    routes: Mapping[str, Policy | None] | None = None,
    key_header: str = "Idempotency-Key",
) -> None:
    """Document idempotency in the app's OpenAPI schema (``install`` calls it).

    For every route the middleware covers (a method of its policy, not
    exempt), adds the key header parameter (required when the route requires
    a key) and the 400/409/410/413/422/503 problem answers (no 503 under
    ``fail_open``), with an ``IdempotencyProblem`` schema (RFC 9457). Use
    it when the middleware was added by hand; pass the same ``policy``,
    ``routes`` and ``key_header``.
    """
    default = policy if policy is not None else Policy()
    table = RouteTable(routes)
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        _add_idempotency(app, schema, default, table, key_header)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_idempotency(app: FastAPI, schema: dict[str, Any], default: Policy, table: RouteTable, key_header: str) -> None:
    paths = schema.get("paths", {})
    documented = False
    for route in flat_routes(app.routes):
        # APIRoutes, and (FastAPI 0.120+) the routes of included routers,
        # which carry the include's prefix and dependencies.
        if getattr(route, "dependant", None) is None or not getattr(route, "include_in_schema", False):
            continue
        route_policy = table.policy_for(route.path, default)
        options = dependant_options(route.dependant)
        if options is not None:
            route_policy = options.apply(route_policy, default)
        if route_policy is None:
            continue
        for method in route.methods or ():
            operation = paths.get(route.path_format, {}).get(method.lower())
            if method not in route_policy.methods or operation is None:
                continue
            _document_operation(operation, route_policy, key_header)
            documented = True
    if documented:
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas[_PROBLEM_SCHEMA] = _problem_schema()


def _document_operation(operation: dict[str, Any], policy: Policy, key_header: str) -> None:
    parameters: list[dict[str, Any]] = operation.setdefault("parameters", [])
    name = key_header.lower()
    if not any(p.get("in") == "header" and str(p.get("name", "")).lower() == name for p in parameters):
        parameters.append(
            {
                "name": key_header,
                "in": "header",
                "required": policy.require_key,
                "description": (
                    "A unique value (e.g. a UUID) that makes retries of this request safe: it executes once per key,"
                    " and a repeat gets the first answer with `Idempotent-Replayed: true`. Sent bare or as an RFC 9651"
                    " sf-string (draft-ietf-httpapi-idempotency-key-header)."
                ),
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH + 2},
            }
        )
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for status, description in _ANSWERS.items():
        if status == "503" and policy.fail_open:
            continue  # the store unreachable, the request runs without idempotency instead
        existing = responses.get(status)
        if existing is None:
            answer: dict[str, Any] = {"description": description, "content": copy.deepcopy(_PROBLEM_CONTENT)}
            if status in _RETRY_AFTER:
                answer["headers"] = {
                    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
                }
            responses[status] = answer
        else:
            # FastAPI's own 422 (validation error), or an answer the route declares, stays; ours is
            # added beside it, unless the route documents a problem answer of its own there.
            content: dict[str, Any] = existing.setdefault("content", {})
            if _PROBLEM_MEDIA in content:
                continue
            existing["description"] = _beside(str(existing.get("description") or ""), list(content), description)
            content.update(copy.deepcopy(_PROBLEM_CONTENT))


def _beside(theirs: str, media: list[str], ours: str) -> str:
    """One description for an answer the route documents and idempo's of the same status.

    ``"Validation Error"`` (FastAPI's 422) and the mismatch read ``"Validation
    Error (application/json), or the Idempotency-Key was already used with a
    different request (application/problem+json)."``: which body is which.
    """
    theirs = theirs.strip().rstrip(".")
    if not theirs:
        return ours
    if media:
        theirs = f"{theirs} ({', '.join(media)})"
    return f"{theirs}, or {ours[0].lower()}{ours[1:].rstrip('.')} ({_PROBLEM_MEDIA})."


def _problem_schema() -> dict[str, Any]:
    return {
        "title": "Problem",
        "description": f"An RFC 9457 problem; `type` is one of the {PROBLEM_BASE}* URIs.",
        "type": "object",
        "properties": {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
        "required": ["type", "title", "status", "detail"],
    }
