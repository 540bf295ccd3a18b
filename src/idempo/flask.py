"""Flask: the WSGI middleware as a Flask extension, with view decorators.

::

    from flask import Flask
    from idempo import Policy
    from idempo.flask import Idempotency, idempotency, idempotency_exempt

    app = Flask(__name__)
    Idempotency(app, store="sqlite:///idempo.db", policy=Policy())

    @app.post("/payments")
    @idempotency(require_key=True, record_ttl=3600)
    def pay(): ...

    @app.post("/webhooks")
    @idempotency_exempt
    def webhook(): ...

:class:`Idempotency` wraps ``app.wsgi_app`` with
:class:`idempo.wsgi.IdempotencyMiddleware` (so the behaviour is the WSGI
middleware's), and adds what only Flask knows:

- A view's options (the decorators, placed under ``@app.post``) are found
  with Flask's own URL map (``url_map.bind_to_environ(...).match()``) before
  Flask dispatches; they win over the ``routes`` patterns. Apps that declare
  none skip the match.
- A view's uncaught exception, which Flask turns into its own 500, is
  reported to the middleware through Flask's ``got_request_exception``
  signal, so ``Policy.exception_verdicts`` apply as on ASGI.
- With Flask-Login, the default principal is the logged-in user (the
  ``_user_id`` Flask-Login keeps in the app's session), so a user's retry is
  one principal whatever its session cookie (:mod:`idempo.principals`).

The plain middleware (``app.wsgi_app = IdempotencyMiddleware(app.wsgi_app,
...)``) works too, without those two.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

from flask import Flask, got_request_exception, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RoutingException

from ._core.policy import Policy
from ._core.routes import RouteOptions
from ._http.wsgi import Environ, StartResponse, request_path
from .exceptions import ConfigurationError
from .principals import USER_ENVIRON_KEY, flask_login_user
from .typing import Store
from .wsgi import IdempotencyMiddleware, PrincipalResolver, default_principal, report_exception

__all__ = ["Idempotency", "idempotency", "idempotency_exempt"]

View = TypeVar("View", bound=Callable[..., Any])


def _decorate(view: View, options: RouteOptions) -> View:
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return view(*args, **kwargs)

    wrapper.idempo_route_options = options  # type: ignore[attr-defined]
    decorated: View = wrapper  # type: ignore[assignment]
    return decorated


def idempotency(
    policy: Policy | None = None,
    *,
    require_key: bool | None = None,
    record_ttl: float | timedelta | None = None,
    lease_ttl: float | timedelta | None = None,
    **changes: Any,
) -> Callable[[View], View]:
    """Set a view's idempotency options (place it under ``@app.post(...)``).

    Args:
        policy: a whole :class:`~idempo.Policy` for the view; None derives it
            from the middleware's (``routes`` patterns, else ``policy``).
        require_key: answer 400 when the request has no key.
        record_ttl: seconds (or a timedelta) the view's completed records are kept.
        lease_ttl: seconds (or a timedelta) a request holds the lease.
        **changes: any other :class:`~idempo.Policy` argument.

    Raises:
        ConfigurationError: a change is not a valid Policy argument value.
        TypeError: a change is not a Policy argument.
    """
    options = RouteOptions.declared(
        policy, require_key=require_key, record_ttl=record_ttl, lease_ttl=lease_ttl, changes=changes
    )
    return lambda view: _decorate(view, options)


def idempotency_exempt(view: View) -> View:
    """Exempt a view from idempotency (place it under ``@app.post(...)``)."""
    return _decorate(view, RouteOptions(exempt=True))


class Idempotency:
    """The Flask extension: ``Idempotency(app, store=...)`` or ``Idempotency(store=...).init_app(app)``.

    Args:
        app: the Flask app, or None to call :meth:`init_app` later.
        store: a blocking :class:`~idempo.typing.Store` or a store URL; None
            reads ``app.config["IDEMPO_STORE"]``.
        policy: the default :class:`~idempo.Policy`.
        routes: per-path policies (glob patterns to a Policy, or None to exempt).
        principal: returns who sent the request, from the WSGI environ.
            Default :func:`idempo.principals.default`: Flask-Login's user,
            else a digest of ``Authorization`` and the session cookies, else
            ``REMOTE_ADDR``.
        key_header: the request header carrying the key.
        secret: the server secret every stored and logged digest is keyed
            with; None reads ``app.config["IDEMPO_SECRET"]``, else
            ``$IDEMPO_SECRET``, else a random one kept in the store.

    Raises:
        ConfigurationError: no store is given, the URL is unknown,
            ``routes`` holds a value that is neither a Policy nor None, or
            the secret is shorter than 16 bytes.
    """

    def __init__(
        self,
        app: Flask | None = None,
        store: Store | str | None = None,
        *,
        policy: Policy | None = None,
        routes: Mapping[str, Policy | None] | None = None,
        principal: PrincipalResolver = default_principal,
        key_header: str = "Idempotency-Key",
        secret: str | bytes | None = None,
    ) -> None:
        self._options: dict[str, Any] = {
            "policy": policy,
            "routes": routes,
            "principal": principal,
            "key_header": key_header,
        }
        self._secret = secret
        self._store = store
        self.middleware: IdempotencyMiddleware | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Wrap ``app.wsgi_app`` and connect the exception signal."""
        store = self._store if self._store is not None else app.config.get("IDEMPO_STORE")
        if store is None:
            raise ConfigurationError("idempo.flask.Idempotency needs store= or app.config['IDEMPO_STORE']")
        secret = self._secret if self._secret is not None else app.config.get("IDEMPO_SECRET")
        self.middleware = IdempotencyMiddleware(app.wsgi_app, store, secret=secret, **self._options)
        app.wsgi_app = _FlaskIdempotency(app, self.middleware)  # type: ignore[method-assign]
        got_request_exception.connect(_report, app, weak=False)
        app.extensions["idempo"] = self


def _report(sender: Flask, exception: BaseException, **extra: Any) -> None:
    report_exception(request.environ, exception)


class _FlaskIdempotency:
    """The WSGI middleware with the policy resolved per view through Flask's URL map."""

    def __init__(self, app: Flask, middleware: IdempotencyMiddleware) -> None:
        self.flask = app
        self.middleware = middleware
        self._seen = -1
        self._any = False

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        middleware = self.middleware
        if getattr(self.flask, "login_manager", None) is not None:
            # Hand Flask-Login's user to the principal resolver, read only if it asks.
            flask = self.flask
            environ[USER_ENVIRON_KEY] = lambda: flask_login_user(flask, environ)
        policy = middleware.policy_for(request_path(environ))
        options = self._view_options(environ)
        if options is not None:
            policy = options.apply(policy, middleware.policy)
        return middleware.handle(environ, start_response, middleware.app, policy)

    def _view_options(self, environ: Environ) -> RouteOptions | None:
        views = self.flask.view_functions
        if len(views) != self._seen:
            self._any = any(hasattr(view, "idempo_route_options") for view in views.values())
            self._seen = len(views)
        if not self._any:
            return None
        try:
            endpoint, _ = self.flask.url_map.bind_to_environ(environ).match()
        except (HTTPException, RoutingException):
            return None  # Flask answers 404, 405 or a redirect itself
        options: RouteOptions | None = getattr(views.get(endpoint), "idempo_route_options", None)
        return options
