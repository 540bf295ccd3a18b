"""Litestar: idempotency as a Litestar plugin and middleware, with options per route handler.

::

    from litestar import Litestar, post
    from idempo import Policy
    from idempo.litestar import IdempotencyPlugin, idempotency, idempotency_exempt

    @post("/payments", idempotency=idempotency(require_key=True, record_ttl=3600))
    async def pay(data: Payment) -> Receipt: ...

    @post("/webhooks", idempotency=idempotency_exempt)
    async def webhook(data: Event) -> None: ...

    app = Litestar([pay, webhook], plugins=[IdempotencyPlugin(store="sqlite:///idempo.db", policy=Policy())])

:class:`IdempotencyPlugin` adds :class:`IdempotencyMiddleware` (Litestar's own
middleware protocol, ``litestar.middleware.ASGIMiddleware``, Litestar 2.15+)
and an ``after_exception`` hook; the middleware alone
(``Litestar(middleware=[IdempotencyMiddleware(...)])``) works too. One
instance, so one store, serves the whole app. It runs after Litestar has
routed the request, so a handler's options come from its ``opt`` (an
``idempotency=`` keyword on the route decorator, or ``opt=`` on a router or
controller; the handler's wins, as Litestar merges ``opt``).

The HTTP behaviour is the ASGI middleware's (:mod:`idempo.asgi`): it is the
same engine. Litestar answers a handler's exception with 500 inside the
middleware stack, so the exception never reaches the middleware; the
plugin's ``after_exception`` hook reports it (:func:`idempo.asgi.report_exception`)
so ``Policy.exception_verdicts`` apply. Without the plugin, a handler's
exception releases the key (the 500's verdict), whatever those say.

The plugin also waits, at the app's shutdown, for the saves still retried in
the background (:func:`idempo._engine.lease.drain_saves`, up to 10 s), as the
ASGI middleware's lifespan does. The middleware alone cannot: Litestar runs
its lifespan itself and passes no lifespan scope to middleware, so without the
plugin a graceful shutdown leaves such a save to a takeover.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any, cast

from litestar.config.app import AppConfig
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.plugins import InitPlugin
from litestar.types import ASGIApp, Receive, Scope, Send

from ._core.policy import Policy
from ._core.routes import RouteOptions
from ._engine.lease import drain_saves
from .asgi import IdempotencyMiddleware as _ASGIMiddleware
from .asgi import PrincipalResolver, default_principal, report_exception
from .exceptions import ConfigurationError
from .typing import AsyncStore

__all__ = ["IdempotencyMiddleware", "IdempotencyPlugin", "idempotency", "idempotency_exempt"]

#: The ``opt`` key a route handler's options are read from.
OPT_KEY = "idempotency"


def idempotency(
    policy: Policy | None = None,
    *,
    require_key: bool | None = None,
    record_ttl: float | timedelta | None = None,
    lease_ttl: float | timedelta | None = None,
    **changes: Any,
) -> RouteOptions:
    """Idempotency options for a route handler: ``@post("/x", idempotency=idempotency(...))``.

    Args:
        policy: a whole :class:`~idempo.Policy` for the handler, replacing the
            middleware's; None derives it from the middleware's with the changes.
        require_key: answer 400 when the request has no key.
        record_ttl: seconds (or a timedelta) the handler's completed records are kept.
        lease_ttl: seconds (or a timedelta) a request holds the lease.
        **changes: any other :class:`~idempo.Policy` argument.

    Raises:
        ConfigurationError: a change is not a valid Policy argument value.
        TypeError: a change is not a Policy argument.
    """
    return RouteOptions.declared(
        policy, require_key=require_key, record_ttl=record_ttl, lease_ttl=lease_ttl, changes=changes
    )


#: Exempts a route handler: ``@post("/webhooks", idempotency=idempotency_exempt)``.
idempotency_exempt = RouteOptions(exempt=True)


async def _unrouted(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
    raise RuntimeError("idempo.litestar: the engine is always given the next app")


class IdempotencyMiddleware(ASGIMiddleware):
    """Make POST/PATCH requests with an ``Idempotency-Key`` execute at most once (Litestar).

    Args:
        store: an :class:`~idempo.typing.AsyncStore`, or a store URL such as
            ``"sqlite:///idempo.db"``. One instance serves every route.
        policy: the default :class:`~idempo.Policy`.
        routes: per-path policies (glob patterns to a Policy, or None to
            exempt), as in :class:`idempo.asgi.IdempotencyMiddleware`; a
            handler's ``idempotency`` option wins over them.
        principal: returns who sent the request, from the ASGI scope (which
            holds Litestar's ``user`` and ``auth`` once its authentication
            middleware ran). Default :func:`idempo.principals.default`: the
            scope's ``user`` when set, else a digest of ``Authorization`` and
            the session cookies, else the client address.
        key_header: the request header carrying the key.
        secret: the server secret every stored and logged digest is keyed
            with; default ``$IDEMPO_SECRET``, else a random one kept in the
            store (see :mod:`idempo.secrets`).

    Raises:
        ConfigurationError: the store URL is unknown or ``routes`` holds a
            value that is neither a Policy nor None.
    """

    scopes = (ScopeType.HTTP,)

    def __init__(
        self,
        store: AsyncStore | str,
        *,
        policy: Policy | None = None,
        routes: Mapping[str, Policy | None] | None = None,
        principal: PrincipalResolver = default_principal,
        key_header: str = "Idempotency-Key",
        secret: str | bytes | None = None,
    ) -> None:
        self._engine = _ASGIMiddleware(
            _unrouted, store, policy=policy, routes=routes, principal=principal, key_header=key_header, secret=secret
        )

    @property
    def store(self) -> AsyncStore:
        """The store records live in."""
        return self._engine.store

    @property
    def policy(self) -> Policy:
        """The default policy."""
        return self._engine.policy

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        """Resolve the handler's policy and serve the request through the ASGI engine."""
        engine = self._engine
        raw = cast("dict[str, Any]", scope)
        policy = engine.policy_for(raw["path"])
        handler = raw.get("route_handler")
        options = handler.opt.get(OPT_KEY) if handler is not None else None
        if options is not None:
            if isinstance(options, Policy):
                options = RouteOptions(policy=options)
            if not isinstance(options, RouteOptions):
                raise ConfigurationError(f"the {OPT_KEY!r} option of {handler} must come from idempotency()")
            policy = options.apply(policy, engine.policy)
        await engine.handle(raw, receive, send, next_app, policy)  # type: ignore[arg-type]


class IdempotencyPlugin(InitPlugin):
    """Add idempo to a Litestar app: ``Litestar(..., plugins=[IdempotencyPlugin(store=...)])``.

    Adds an :class:`IdempotencyMiddleware` built from the arguments (see
    there) and an ``after_exception`` hook that reports handler exceptions
    to it, so ``Policy.exception_verdicts`` apply.

    Raises:
        ConfigurationError: the store URL is unknown or ``routes`` holds a
            value that is neither a Policy nor None.
    """

    __slots__ = ("middleware",)

    def __init__(
        self,
        store: AsyncStore | str,
        *,
        policy: Policy | None = None,
        routes: Mapping[str, Policy | None] | None = None,
        principal: PrincipalResolver = default_principal,
        key_header: str = "Idempotency-Key",
        secret: str | bytes | None = None,
    ) -> None:
        self.middleware = IdempotencyMiddleware(
            store, policy=policy, routes=routes, principal=principal, key_header=key_header, secret=secret
        )

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Register the middleware, the exception hook, and the wait for save retries at shutdown."""
        app_config.middleware.append(self.middleware)
        app_config.after_exception.append(_report)
        # The last lifespan manager is the first to exit: the wait comes before
        # the app's own managers and on_shutdown hooks close what the store uses.
        app_config.lifespan.append(self._saves_drained)
        return app_config

    @contextlib.asynccontextmanager
    async def _saves_drained(self, app: Any) -> AsyncIterator[None]:
        """At shutdown, wait (bounded) for the saves still retried in the background, as the ASGI middleware does."""
        yield
        await drain_saves(self.middleware.store)


async def _report(exc: Exception, scope: Scope) -> None:
    report_exception(cast("dict[str, Any]", scope), exc)
