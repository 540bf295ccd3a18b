"""WSGI middleware: idempotency for any WSGI app (Flask, Django, Pyramid, Bottle, ...).

::

    from flask import Flask
    from idempo import Policy
    from idempo.wsgi import IdempotencyMiddleware

    app = Flask(__name__)
    app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, "sqlite:///idempo.db", policy=Policy(require_key=True))

The behaviour is the ASGI middleware's (:mod:`idempo.asgi`), rule for rule:
both admit a request with the same steps (:mod:`idempo._http.admission`),
this one driven against a blocking :class:`~idempo.typing.Store`. What is
particular to WSGI (PEP 3333, :mod:`idempo._http.wsgi`):

- The request body is read from ``wsgi.input`` (at most ``CONTENT_LENGTH``
  bytes, refused with 413 past ``Policy.max_request_body`` before reading)
  and handed to the app as a fresh ``io.BytesIO``. With a key, a
  ``CONTENT_LENGTH`` that is not a number of bytes is a 400
  ``invalid-content-length`` on any route, as on Django.
- Servers fold repeated header lines into one comma-separated
  ``HTTP_IDEMPOTENCY_KEY``; it is split back (commas inside an sf-string
  stay), so two different keys are a 400 as on ASGI.
- The response is captured through ``start_response`` (``exc_info`` restarts
  it; the legacy ``write`` callable is captured too) and while the server
  iterates the body. The record is settled when the app's iterable is
  exhausted, one chunk before the client receives the end of the body, so a
  client that retries as soon as it has the answer finds the record settled.
  The app's iterable is always closed (its ``close()``, e.g. a generator's).
- A client that goes away mid-body makes the server stop iterating and call
  ``close()``: the rest of the app's iterable is consumed and the record
  settled, so the retry gets the replay (shared/cases B04).
- ``wsgi.file_wrapper`` is withheld from apps whose response is captured, so
  file responses pass through the capture like any other body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from . import _config
from ._core.http import declared_length, invalid_content_length_answer, takes_part
from ._core.keys import split_folded
from ._core.policy import Policy
from ._core.records import StoredResponse
from ._core.routes import RouteTable
from ._engine._sync.drivers import drive_sync
from ._engine.execution import Execution
from ._http.admission import BodyIncomplete as BodyIncomplete
from ._http.admission import Bypass, Execute, admission
from ._http.wsgi import (
    EXCHANGE_ENVIRON_KEY,
    Environ,
    ExcInfo,
    Exchange,
    StartResponse,
    WSGIApp,
    Write,
    answer,
    header_bytes,
    identity_path_of,
    read_input,
    report_exception,
    request_path,
    run_bypassed,
)
from ._http.wsgi import CapturedBody as CapturedBody
from ._http.wsgi import read_body as read_body
from .observability._observation import Outcome, observe_request
from .principals import default as default_principal
from .principals import legacy_principal
from .secrets import SecretSource
from .stores._base import open_at_startup
from .typing import Store

__all__ = [
    "EXCHANGE_ENVIRON_KEY",
    "IdempotencyMiddleware",
    "PrincipalResolver",
    "default_principal",
    "report_exception",
]
# BodyIncomplete, CapturedBody, read_body and request_path stay importable from
# here as before; they are the front's internals (idempo._http), not its API.

#: Resolves the principal (who sent the request) from the WSGI environ.
PrincipalResolver = Callable[[Environ], "str | None"]


class IdempotencyMiddleware:
    """Make POST/PATCH requests with an ``Idempotency-Key`` execute at most once (WSGI).

    Args:
        app: the WSGI app to wrap (for Flask, ``app.wsgi_app``; see also
            :class:`idempo.flask.Idempotency`).
        store: a blocking :class:`~idempo.typing.Store`, or a store URL such
            as ``"sqlite:///idempo.db"`` or ``"memory://"``.
        policy: the default :class:`~idempo.Policy` (methods, TTLs, wait, ...).
            In wait mode a duplicate holds a server thread while it waits.
        routes: per-path policies: glob patterns (``fnmatch``, e.g.
            ``"/payments*"``) mapped to a Policy, or to None to exempt the
            path. The first matching pattern wins; unmatched paths use ``policy``.
            Paths include ``SCRIPT_NAME``.
        principal: returns who sent the request, from the WSGI environ; the
            key is unique per principal, method and path, and a response is
            never replayed to another principal. Returning None answers 400
            (no anonymous bucket). Default :func:`idempo.principals.default`:
            the framework's user (``REMOTE_USER``, Flask-Login's with the Flask
            extension), else a digest of ``Authorization`` and the session
            cookies, else ``REMOTE_ADDR``.
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
        app: WSGIApp,
        store: Store | str,
        *,
        policy: Policy | None = None,
        routes: Mapping[str, Policy | None] | None = None,
        principal: PrincipalResolver = default_principal,
        key_header: str = "Idempotency-Key",
        secret: str | bytes | None = None,
    ) -> None:
        self._secret = SecretSource(secret)
        self.app = app
        self.store: Store = _config.sync_store(store) if isinstance(store, str) else store
        open_at_startup(self.store)  # a misconfigured store fails the start-up; an unreachable one is a warning
        self.policy = policy if policy is not None else Policy()
        self._routes = RouteTable(routes)
        self.principal = principal
        self.key_header = key_header
        self._environ_key = "HTTP_" + key_header.upper().replace("-", "_")

    def policy_for(self, path: str) -> Policy | None:
        """Return the policy for a path from the ``routes`` patterns, or None when the path is exempt."""
        return self._routes.policy_for(path, self.policy)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self._routes:
            route, policy = self._routes.route_for(request_path(environ), self.policy)
        else:
            route, policy = "*", self.policy
        return self.handle(environ, start_response, self.app, policy, route)

    def handle(
        self,
        environ: Environ,
        start_response: StartResponse,
        app: WSGIApp,
        policy: Policy | None,
        route: str = "*",
    ) -> Iterable[bytes]:
        """Serve one request with ``app`` under ``policy`` (None: pass it through untouched).

        The engine behind :meth:`__call__`, also used by the Flask extension
        once Flask has resolved the view's policy. ``route`` is the label logs,
        metrics and spans name the route by (a pattern, never a raw path).

        The request is admitted by the steps every front shares
        (:func:`idempo._http.admission.admission`); one that takes the lease
        runs in an :class:`~idempo._http.wsgi.Exchange`.
        """
        raw_key = environ.get(self._environ_key)
        if raw_key is not None and declared_length(environ.get("CONTENT_LENGTH")) is None:
            # A Content-Length that is not 1*DIGIT (RFC 9110 section 8.6): "abc",
            # "0x10", 4,301 digits. A server that passes it on (Werkzeug's) leaves
            # each framework to guess (Werkzeug reads no body), so the
            # fingerprint would cover an empty body. With a key, it is idempo's
            # request to answer, on any route, as on Django.
            refused = invalid_content_length_answer()
            observe_request("wsgi", environ["REQUEST_METHOD"], route, request_path(environ)).finish(
                Outcome.INVALID_CONTENT_LENGTH, refused.status
            )
            return answer(start_response, refused)
        method: str = environ["REQUEST_METHOD"]
        if policy is None or not takes_part(policy, method):
            return app(environ, start_response)
        path = request_path(environ)
        raw_content_type = environ.get("CONTENT_TYPE")
        resolve = self.principal
        steps = admission(
            self.store,
            policy,
            self._secret,
            front="wsgi",
            route=route,
            method=method,
            path=path,
            identity_path=identity_path_of(environ),
            query=environ.get("QUERY_STRING", ""),
            key_values=[] if raw_key is None else split_folded(header_bytes(raw_key)),
            content_types=[header_bytes(raw_content_type)] if raw_content_type else [],
            principal=lambda: resolve(environ),
            legacy_principal=lambda who: legacy_principal(environ, resolve, who),
            read_body=lambda: read_input(environ, policy),
        )
        admitted = drive_sync(steps, self.store, decided=False)
        if admitted is None:
            return app(environ, start_response)
        if isinstance(admitted, StoredResponse):
            return answer(start_response, admitted)
        if isinstance(admitted, Execute):
            assert isinstance(admitted.execution, Execution)
            return self._execute(
                Exchange(admitted.execution, admitted.observation, policy), app, environ, start_response
            )
        assert isinstance(admitted, Bypass)  # GONE is ASGI's alone
        return run_bypassed(admitted, app, environ, start_response)

    def _execute(
        self, exchange: Exchange, app: WSGIApp, environ: Environ, start_response: StartResponse
    ) -> Iterable[bytes]:
        """Run the app holding the lease; capture its response; settle the record when the body ends."""
        environ[EXCHANGE_ENVIRON_KEY] = exchange
        environ.pop("wsgi.file_wrapper", None)
        capture = exchange.capture

        def capture_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None, /
        ) -> Write:
            # Captured before the server sees it, so a response the server
            # refuses (it raises) is known as refused. PEP 3333: a second call
            # carries exc_info; the server's own start_response re-raises it
            # once the headers are sent, and the exception settles the record.
            with exchange.guard():
                exchange.start(status, headers)
            write = start_response(status, headers, exc_info)

            def capture_write(data: bytes) -> object:
                with exchange.guard():
                    capture.add(data)
                return write(data)

            return capture_write

        try:
            body = app(environ, capture_start_response)
        except BaseException as exc:
            exchange.settle(exc)
            raise
        return CapturedBody(exchange, body)
