"""ASGI middleware: idempotency for any ASGI app (Starlette, FastAPI, Litestar, ...).

::

    from fastapi import FastAPI
    from idempo import Policy
    from idempo.asgi import IdempotencyMiddleware

    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, store="sqlite:///idempo.db", policy=Policy(require_key=True))

A POST or PATCH with an ``Idempotency-Key`` executes at most once per key
within its scope; repeats get the stored answer with ``Idempotent-Replayed:
true`` (Stripe's header). Every answer of the DESIGN "HTTP behaviour" table is
produced here; the rules come from the IETF draft
draft-ietf-httpapi-idempotency-key-header (sections cited where used).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from . import _config
from ._core.fingerprint import BodySource
from ._core.http import identity_path, takes_part
from ._core.policy import Policy
from ._core.problems import MISSING_KEY, TRANSACTION_NOT_COVERED, problem_response
from ._core.records import StoredResponse
from ._core.routes import RouteOptions, RouteTable
from ._engine._async.drivers import drive_async
from ._engine.execution import AsyncExecution
from ._engine.lease import drain_saves
from ._http.admission import Bypass, Execute, admission
from ._http.asgi import (
    EXCHANGE_SCOPE_KEY,
    ROUTE_OPTIONS_FINDERS,
    STARTUP_CHECKS,
    ASGIApp,
    Exchange,
    Message,
    Receive,
    RouteOptionsFinder,
    Scope,
    Send,
    read_body,
    report_exception,
    run_bypassed,
    run_unkeyed,
    send_answer,
)
from .exceptions import ConfigurationError, StoreError, StoreUnavailable
from .principals import default as default_principal
from .principals import legacy_principal
from .secrets import SecretSource
from .stores._base import warn_unreachable_at_startup
from .typing import AsyncStore

__all__ = ["EXCHANGE_SCOPE_KEY", "IdempotencyMiddleware", "PrincipalResolver", "default_principal", "report_exception"]

#: A transactional route's answer to a request idempo does not cover (its method, or an exempt path).
_NOT_COVERED = problem_response(
    TRANSACTION_NOT_COVERED,
    "This route is transactional: it runs only as a request idempo covers (a method of Policy.methods, "
    "on a path it does not exempt), with an idempotency key.",
)

#: Resolves the principal (who sent the request) from the ASGI scope.
PrincipalResolver = Callable[[Scope], "str | None"]


class IdempotencyMiddleware:
    """Make POST/PATCH requests with an ``Idempotency-Key`` execute at most once.

    On Starlette and FastAPI apps, options declared on a route (FastAPI's
    ``Depends(idempotency(...))`` and ``idempotency_exempt``, see
    :mod:`idempo.fastapi`) are found with the framework's own route matcher
    and override the path patterns; Litestar has its own middleware in
    :mod:`idempo.litestar`.

    Args:
        app: the ASGI app to wrap.
        store: an :class:`~idempo.typing.AsyncStore`, or a store URL such as
            ``"sqlite:///idempo.db"`` or ``"memory://"``.
        policy: the default :class:`~idempo.Policy` (methods, TTLs, wait, ...).
        routes: per-path policies: glob patterns (``fnmatch``, e.g.
            ``"/payments*"``) mapped to a Policy, or to None to exempt the
            path. The first matching pattern wins; unmatched paths use ``policy``.
        principal: returns who sent the request, from the ASGI scope; the
            key is unique per principal, method and path, and a response is
            never replayed to another principal. Returning None answers 400
            (no anonymous bucket). Default :func:`idempo.principals.default`:
            ``scope["user"]`` when an authentication middleware that runs
            before this one set it, else a digest of ``Authorization`` and
            the session cookies, else the client address.
        key_header: the request header carrying the key.
        secret: the server secret every stored and logged digest is keyed
            with (at least 16 bytes); default ``$IDEMPO_SECRET``, else a
            random one kept in the store (see :mod:`idempo.secrets`).

    Raises:
        ConfigurationError: the store URL is unknown, ``routes`` holds a
            value that is neither a Policy nor None, or the secret is
            shorter than 16 bytes.
    """

    def __init__(
        self,
        app: ASGIApp,
        store: AsyncStore | str,
        *,
        policy: Policy | None = None,
        routes: Mapping[str, Policy | None] | None = None,
        principal: PrincipalResolver = default_principal,
        key_header: str = "Idempotency-Key",
        secret: str | bytes | None = None,
    ) -> None:
        self._secret = SecretSource(secret)
        self.app = app
        self.store: AsyncStore = _config.async_store(store) if isinstance(store, str) else store
        # A store built from a URL is the middleware's to close (the testing mode's is shared).
        self._owns_store = isinstance(store, str) and _config.TESTING is None
        self._store_url: str = store if isinstance(store, str) else getattr(store, "url", type(store).__name__)
        self.policy = policy if policy is not None else Policy()
        self._routes = RouteTable(routes)
        self._has_routes = bool(self._routes)
        # The default body reader is called directly (one coroutine less a request); a subclass's override is not.
        self._default_reader = type(self).read_request_body is IdempotencyMiddleware.read_request_body
        self.principal = principal
        self.key_header = key_header
        self._key_header = key_header.lower().encode("latin-1")
        #: A transactional route's answer to a request without a key (DESIGN: 400 problem+json).
        self._missing_key = problem_response(
            MISSING_KEY, f"This route is transactional: it runs only under an {key_header} header; send one."
        )
        # The route-options finders framework glue added (idempo.fastapi), made for this middleware.
        self._finders: list[RouteOptionsFinder] = []

    async def read_request_body(self, scope: Scope, receive: Receive, limit: int) -> bytes | BodySource | None:
        """Read a keyed request's whole body; None past ``limit`` bytes (a 413).

        The default keeps it in memory (:func:`idempo._http.asgi.read_body`);
        ``idempo proxy`` overrides it to spool large bodies to a temporary file.

        Raises:
            ClientGone: the client left mid-upload.
        """
        return await read_body(receive, limit)

    def policy_for(self, path: str) -> Policy | None:
        """Return the policy for a path from the ``routes`` patterns, or None when the path is exempt."""
        return self._routes.policy_for(path, self.policy)

    def _lifespan_send(self, send: Send, scope: Scope | None = None) -> Send:
        """Open the store at startup and close a store built from a URL at shutdown.

        Opening at startup (``store.open()`` where the store has one: the
        PostgreSQL store checks the server and its schema version, Redis
        answers a PING, a Redis Cluster gives its slot map) turns a
        misconfigured store (``ConfigurationError``: a wrong password or
        role, a missing schema, an unknown host) into a failed startup with
        one line naming the cause and the fix, instead of an error on every
        request. A store that cannot be reached (``StoreUnavailable``) is not
        a misconfiguration: one warning is logged and the app starts,
        answering 503 until the store is back, so a store blip cannot stop a
        deploy. A store passed in as an object is the caller's to close.
        """

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                open_ = getattr(self.store, "open", None)
                if open_ is not None:
                    try:
                        await open_()
                    except StoreUnavailable as exc:
                        warn_unreachable_at_startup(self._store_url, exc)
                    except (ConfigurationError, StoreError) as exc:
                        if self._owns_store:
                            await self.store.aclose()
                        await send({"type": "lifespan.startup.failed", "message": f"idempo: {exc}"})
                        return
                try:
                    # Framework glue's checks (idempo.fastapi: transactional routes).
                    for check in STARTUP_CHECKS:
                        check(scope or {}, self.app, self.store)
                except ConfigurationError as exc:
                    if self._owns_store:
                        await self.store.aclose()
                    await send({"type": "lifespan.startup.failed", "message": f"idempo: {exc}"})
                    return
            elif message["type"] == "lifespan.shutdown.complete" and self._owns_store:
                await self.store.aclose()
            await send(message)

        return lifespan_send

    def _lifespan_receive(self, receive: Receive) -> Receive:
        """At shutdown, wait for the saves still retried in the background before the app's own shutdown runs.

        A save that failed after its handler ran is retried while the process
        lives (DESIGN "HTTP behaviour"); a graceful shutdown waits for those
        up to ``idempo._engine.lease.SHUTDOWN_WAIT`` seconds (10), before the
        app's shutdown hooks close what the store may use (its pool), and
        logs each one left.
        """

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await drain_saves(self.store)
            return message

        return lifespan_receive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                failed = _StartupFailed()
                lifespan_receive = self._lifespan_receive(failed.receive(receive))
                await self.app(scope, lifespan_receive, self._lifespan_send(failed.send(send), scope))
            else:
                await self.app(scope, receive, send)
            return
        route, policy = self._routes.route_for(scope["path"], self.policy) if self._has_routes else ("*", self.policy)
        if ROUTE_OPTIONS_FINDERS:
            options = self._route_options(scope, policy)
            if options is not None:
                policy = options.apply(policy, self.policy)
        await self.handle(scope, receive, send, self.app, policy, route)

    def _route_options(self, scope: Scope, policy: Policy | None) -> RouteOptions | None:
        """The options the route ``scope`` goes to declares, as the framework glue's finders see them."""
        finders = self._finders
        if len(finders) != len(ROUTE_OPTIONS_FINDERS):
            finders = self._finders = [factory(self._routes) for factory in ROUTE_OPTIONS_FINDERS]
        for finder in finders:
            options = finder.find(scope, self.app, policy, self.policy)
            if options is not None:
                return options
        return None

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, app: ASGIApp, policy: Policy | None, route: str = "*"
    ) -> None:
        """Serve one HTTP request with ``app`` under ``policy`` (None: pass it through untouched).

        The engine behind :meth:`__call__`, also used by the Litestar
        middleware once Litestar has resolved the route's policy. ``route``
        is the label logs, metrics and spans name the route by (a pattern,
        never a raw path).

        The request is admitted by the steps every front shares
        (:func:`idempo._http.admission.admission`); one that takes the lease
        runs in an :class:`~idempo._http.asgi.Exchange`.
        """
        method: str = scope["method"]
        if policy is None or (method not in policy.methods and not takes_part(policy, method)):
            await run_unkeyed(app, scope, receive, send, _NOT_COVERED)
            return
        key_values = []
        content_types = []
        key_header = self._key_header
        for name, value in scope["headers"]:
            if name == key_header:
                key_values.append(value)
            elif name == b"content-type":
                content_types.append(value)
        path: str = scope["path"]
        resolve = self.principal
        limit = policy.max_request_body
        steps = admission(
            self.store,
            policy,
            self._secret,
            front="asgi",
            route=route,
            method=method,
            path=path,
            identity_path=identity_path(path, scope.get("raw_path")),
            query=scope.get("query_string", b""),
            key_values=key_values,
            content_types=content_types,
            principal=lambda: resolve(scope),
            legacy_principal=lambda who: legacy_principal(scope, resolve, who),
            read_body=(
                (lambda: read_body(receive, limit))
                if self._default_reader
                else (lambda: self.read_request_body(scope, receive, limit))
            ),
        )
        admitted = await drive_async(steps, self.store, decided=False)
        if admitted is None:
            await run_unkeyed(app, scope, receive, send, self._missing_key)
        elif isinstance(admitted, StoredResponse):
            await send_answer(send, admitted)
        elif isinstance(admitted, Execute):
            assert isinstance(admitted.execution, AsyncExecution)
            exchange = Exchange(app, admitted.execution, admitted.observation, policy, admitted.body, receive, send)
            try:
                await exchange(scope)
            finally:
                admitted.observation.finish()
        elif isinstance(admitted, Bypass):
            await run_bypassed(app, scope, receive, send, admitted)
        # else GONE: the client left mid-upload; nothing run, no one to answer.


class _StartupFailed:
    """Ends the app's lifespan when idempo turned its start-up into ``lifespan.startup.failed``.

    The server exits without sending ``lifespan.shutdown``, so the app would
    wait in ``receive()`` until the server cancels it, and uvicorn prints that
    cancellation's traceback under idempo's one-line cause. Instead the app's
    next ``receive()`` is a ``lifespan.shutdown`` (its shutdown hooks run) and
    its ``lifespan.shutdown.complete`` goes nowhere: the server asked for none.
    """

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = False

    def send(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                self.failed = True
            elif self.failed and message["type"] == "lifespan.shutdown.complete":
                return
            await send(message)

        return lifespan_send

    def receive(self, receive: Receive) -> Receive:
        async def lifespan_receive() -> Message:
            if self.failed:
                return {"type": "lifespan.shutdown"}
            return await receive()

        return lifespan_receive
