"""The proxy's engine: an ASGI app that puts idempo's guarantees in front of an upstream.

:class:`ProxyApp` is idempo's ASGI :class:`~idempo.asgi.IdempotencyMiddleware`
around a forwarder (:mod:`idempo.proxy.forwarder`), with one
:class:`~idempo.Policy` per configured route (:meth:`ProxyApp.policy_for`).
Build it with :func:`create_app` from a :class:`~idempo.proxy.config.ProxyConfig`,
or let ``uvicorn --factory idempo.proxy.app:app_factory`` build it from the
environment (``IDEMPO_PROXY_CONFIG`` and the other ``IDEMPO_PROXY_*`` variables).

What it does with a request:

- our own ``Via`` coming back is a loop: 508 problem+json (RFC 9110 section 7.6.3);
- a passthrough route, a method no route makes idempotent, a request without
  a key (where none is required), and everything under ``disable``: streamed
  through untouched, body and answer;
- a keyed request is admitted by the middleware (400 for a missing or bad key
  before the body is read, 413 over ``max_request_body``, 422/409/replay from
  the record), then forwarded once with ``Content-Length``, the client's
  ``Idempotency-Key`` (in one form per key, whichever the client used) and
  ``Idempo-Attempt: <fencing token>``, its answer
  streamed to the client while it is captured raw (a gzip body is stored and
  replayed as the bytes the upstream sent).

Upstream failures (:class:`~idempo.proxy.forwarder.UpstreamFailure`) get a
verdict from the route's ``outcomes``: ``connect-error`` (502) and
``pool-timeout`` (503), whose request was never sent, release the key, with
``Retry-After``; a failure after the request was sent (502, or 504 past the
deadline; problem type ``upstream-outcome-unknown``) holds it by default, so
retries get 409 until ``hold_ttl``. A request is never sent twice by the
proxy itself. A client that disconnects does not stop the exchange: it runs,
shielded, to the proxy's own total deadline (``upstream.deadline``) and the
record completes, so the retry gets the replay.

HTTP hygiene (RFC 9110 section 7.6.1): hop-by-hop fields and every field named
in ``Connection`` are removed in both directions and so never stored;
``Via: 1.1 idempo`` is added both ways; ``X-Forwarded-For``, ``-Proto`` and
``-Host`` are replaced, or appended to when the peer is in
``trusted_proxies``; so is ``Forwarded`` (RFC 7239), to which the proxy adds
its own element (``for=<peer>;proto=<scheme>;host=<Host>``). WebSockets are tunnelled to the upstream, never keyed.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import hashlib
import ipaddress
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio

from .. import _config
from .._core.keys import format_key, parse_key
from .._core.policy import Policy, Verdict
from .._core.problems import (
    KEYS_UNAVAILABLE,
    LOOP_DETECTED,
    TOKEN_REJECTED,
    UPSTREAM_BUSY,
    UPSTREAM_DEADLINE,
    UPSTREAM_OUTCOME_UNKNOWN,
    UPSTREAM_UNREACHABLE,
    Problem,
    problem_response,
)
from .._core.records import StoredResponse
from .._engine.lease import drain_saves
from .._http.asgi import EXCHANGE_SCOPE_KEY, Exchange, Message, Receive, Scope, Send, send_answer
from ..asgi import IdempotencyMiddleware
from ..exceptions import ConfigurationError, StoreError, StoreUnavailable
from ..observability._observation import logger
from ..stores._base import warn_unreachable_at_startup
from ..typing import AsyncStore
from ._body import CHUNK_BYTES, SpooledBody, read_spooled
from ._metrics import ProxyMetrics
from .config import (
    FAILURES,
    AuthorizationScope,
    HeaderScope,
    JWTScope,
    ProxyConfig,
    Route,
    UpstreamSettings,
    UpstreamTarget,
    load_config,
)
from .forwarder import ATTEMPT, Attempt, Forwarder, HttpxForwarder, UpstreamFailure, failure_class

__all__ = [
    "HOP_BY_HOP",
    "ProxyApp",
    "ProxyMiddleware",
    "app_factory",
    "create_app",
    "create_forwarder",
    "failure_answer",
]

#: Hop-by-hop fields (RFC 9110 section 7.6.1, plus the obsolete ``Keep-Alive``
#: and ``Proxy-Connection``): meaningful for one connection, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_VIA = b"1.1 idempo"
_PRINCIPAL_KEY = "idempo.proxy.principal"
_BODY_KEY = "idempo.proxy.body"
_ROUTE_KEY = "idempo.proxy.route"
_RECEIVE_KEY = "idempo.proxy.receive"


class ProxyMiddleware(IdempotencyMiddleware):
    """idempo's ASGI middleware, reading a keyed request's body into a :class:`~idempo.proxy._body.SpooledBody`.

    The body is kept in memory while small and in a temporary file beyond, so a
    large upload does not stay in memory while the upstream works; it is
    fingerprinted from there and sent upstream from there, with its
    ``Content-Length``. The proxy closes it once the request is done.
    """

    async def read_request_body(self, scope: Scope, receive: Receive, limit: int) -> SpooledBody | None:
        """See :meth:`idempo.asgi.IdempotencyMiddleware.read_request_body`."""
        body = await read_spooled(receive, limit)
        scope[_BODY_KEY] = body
        return body


class _CutOff(BaseException):
    """The proxy is shutting down and the graceful timeout ended an exchange: its lease is kept.

    A BaseException, so the execution settles nothing (a crash): the upstream
    may have executed the request, and the lease expiring decides by
    ``on_takeover``.
    """


class _ClientGone(Exception):
    """The client left while an unkeyed request's body was streamed upstream."""


def _client_left(failure: UpstreamFailure) -> bool:
    """True when an exchange failed because its client left mid-body: aiohttp's body writer wraps the
    :class:`_ClientGone` it met (in the failure's chain of causes); httpx lets it through as it is."""
    cause = failure.__cause__
    while cause is not None:
        if isinstance(cause, _ClientGone):
            return True
        cause = cause.__cause__
    return False


def _connection_named(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Hop-by-hop fields plus every field the ``Connection`` fields name."""
    named = set(HOP_BY_HOP)
    for name, value in headers:
        if name == b"connection":
            named.update(part.strip().lower() for part in value.split(b",") if part.strip())
    return frozenset(named)


def _clean(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` (lower-case names) without hop-by-hop and ``Connection``-named fields."""
    drop = _connection_named(headers)
    return [(name, value) for name, value in headers if name not in drop]


def _via_loops(headers: list[tuple[bytes, bytes]]) -> bool:
    """True when a ``Via`` field names us (``<protocol> idempo``): the request came round again."""
    for name, value in headers:
        if name == b"via":
            for entry in value.split(b","):
                parts = entry.split()
                if len(parts) >= 2 and parts[1] == b"idempo":
                    return True
    return False


def _problem(problem: Problem, detail: str, retry_after: int | None = None) -> StoredResponse:
    return problem_response(problem, detail, retry_after=retry_after)


def failure_answer(failure: UpstreamFailure, retry_after: int) -> StoredResponse:
    """The answer for a failed exchange: 502/503 with ``Retry-After`` (never sent), else 502/504 unknown."""
    if failure.kind == "connect-error":
        detail = "The upstream could not be reached; the request was not sent. Retry later."
        return _problem(UPSTREAM_UNREACHABLE, detail, retry_after)
    if failure.kind == "pool-timeout":
        detail = "No connection to the upstream was free in time; the request was not sent. Retry later."
        return _problem(UPSTREAM_BUSY, detail, retry_after)
    detail = (
        "The request was sent to the upstream, but its answer was lost "
        f"({failure.kind}); it may or may not have taken effect. Retrying with the same "
        "Idempotency-Key answers 409 until the key's hold ends: check the outcome first."
    )
    return _problem(UPSTREAM_DEADLINE if failure.kind == "deadline" else UPSTREAM_OUTCOME_UNKNOWN, detail)


def create_forwarder(target: UpstreamTarget, settings: UpstreamSettings) -> Forwarder:
    """The forwarder ``[upstream] client`` names: an :class:`~idempo.proxy.aiohttp_forwarder.AiohttpForwarder`
    (the default), or an :class:`~idempo.proxy.forwarder.HttpxForwarder`.

    Raises:
        ImportError: ``client = "aiohttp"`` and aiohttp is not installed (it is in ``idempo[proxy]``).
    """
    if settings.client == "httpx":
        return HttpxForwarder(target, settings)
    from .aiohttp_forwarder import AiohttpForwarder

    return AiohttpForwarder(target, settings)


class ProxyApp:
    """The ``idempo proxy`` ASGI app (see the module docstring).

    Args:
        config: the checked configuration (:func:`~idempo.proxy.config.load_config`).
        store: the store, or None for the one ``config.proxy.store`` names.
        forwarder: the connection to the upstream, or None for the one
            ``config.upstream.client`` names (:func:`create_forwarder`).
        metrics: the proxy's metrics, or None for ones in prometheus-client's
            default registry (``False`` would record nothing; see
            :class:`~idempo.proxy._metrics.ProxyMetrics`).
        secret: the server secret; default ``$IDEMPO_SECRET``, else one kept in the store.

    Raises:
        ConfigurationError: the store URL is unknown; a JWT scope's keys cannot be read.
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        store: AsyncStore | None = None,
        forwarder: Forwarder | None = None,
        metrics: ProxyMetrics | None = None,
        secret: str | bytes | None = None,
    ) -> None:
        self.config = config
        self.store: AsyncStore = store if store is not None else _config.async_store(config.proxy.store)
        self._owns_store = store is None and _config.TESTING is None
        self.forwarder: Forwarder = (
            forwarder if forwarder is not None else create_forwarder(config.proxy.upstream, config.upstream)
        )
        self._host = config.proxy.upstream.base_url.split("://", 1)[1].encode("latin-1")
        self.metrics = metrics if metrics is not None else ProxyMetrics()
        self.middleware = ProxyMiddleware(self.forward, self.store, principal=self._principal, secret=secret)
        self._policies: dict[str, Policy] = {}
        self._resolvers: dict[str, Any] = {}
        for route in (*config.routes, config.default_route):
            if route.settings is None:
                continue
            self._policies[route.name] = self._policy(route)
            if isinstance(route.settings.scope, JWTScope):
                from .principal import JWTPrincipalResolver

                try:
                    self._resolvers[route.name] = JWTPrincipalResolver(route.settings.scope)
                except (OSError, ValueError) as exc:
                    raise ConfigurationError(f"route {route.name!r}: the JWT scope's keys: {exc}") from None
        self._trusted = config.proxy.trusted_proxies
        #: True once the proxy is shutting down (the admin port's /readyz answers 503).
        self.draining = False
        self._cut_off = False
        self._shields: set[anyio.CancelScope] = set()
        # Each keyed exchange's watch on its client (a plain asyncio task, see _watch_client).
        self._watches: set[asyncio.Task[None]] = set()

    # --- routes and policies ------------------------------------------------------------------

    @staticmethod
    def _policy(route: Route) -> Policy:
        settings = route.settings
        assert settings is not None
        outcomes = settings.outcomes
        return settings.policy().replace(
            on_takeover=outcomes.on_takeover,
            exception_verdicts={failure_class(kind): outcomes.verdict_for_failure(kind) for kind in FAILURES},
        )

    def policy_for(self, scope: Scope) -> tuple[Route, Policy | None]:
        """The route of a request and its policy; None for a passthrough route (or ``disable``)."""
        route = self.config.route_for(scope["path"])
        if self.config.proxy.disable or route.passthrough:
            return route, None
        return route, self._policies[route.name]

    def _principal(self, scope: Scope) -> str | None:
        """Who sent the request, by its route's ``scope`` (a verified JWT claim was resolved before)."""
        route: Route = scope[_ROUTE_KEY]
        assert route.settings is not None
        kind = route.settings.scope
        if isinstance(kind, JWTScope):
            principal = scope.get(_PRINCIPAL_KEY)
            return principal if isinstance(principal, str) else None
        if isinstance(kind, HeaderScope):
            wanted = kind.name.encode("latin-1")
            headers: list[tuple[bytes, bytes]] = scope["headers"]
            for name, value in headers:
                if name == wanted and value.strip():
                    return "hdr:" + value.strip().decode("latin-1")
            return None
        assert isinstance(kind, AuthorizationScope)
        for name, value in scope["headers"]:
            if name == b"authorization":
                # Unkeyed here; the record key keys it again with the server secret.
                return "authz:" + hashlib.sha256(value).hexdigest()
        return "anonymous"

    # --- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        send = _dated(send)
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if _via_loops(headers):
            detail = "The request already passed through idempo proxy: the upstream points back at the proxy."
            await send_answer(send, _problem(LOOP_DETECTED, detail))
            return
        route, policy = self.policy_for(scope)
        scope[_ROUTE_KEY] = route
        if policy is None or scope["method"] not in policy.methods:
            await self.forward(scope, receive, send)
            return
        resolver = self._resolvers.get(route.name)
        if resolver is not None and any(name == b"idempotency-key" for name, _ in headers):
            answer = await self._verify(resolver, scope)
            if answer is not None:
                await send_answer(send, answer)
                return
        scope[_RECEIVE_KEY] = receive  # the server's own: once the body is read, for the watch on the client
        try:
            await self.middleware.handle(scope, receive, send, self.forward, policy, route.name)
        except UpstreamFailure:
            pass  # answered, and the record settled by the failure's verdict
        except _CutOff:
            pass  # shutting down: the lease is kept
        finally:
            body = scope.get(_BODY_KEY)
            if isinstance(body, SpooledBody):
                body.close()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Tunnel a WebSocket to the upstream, never keyed: messages pass both ways until either side closes.

        The handshake is refused (403) when the upstream refuses it or cannot be
        reached. Needs the ``websockets`` package (``uvicorn[standard]``, in ``idempo[proxy]``).
        """
        from websockets.asyncio.client import connect, unix_connect
        from websockets.exceptions import ConnectionClosed

        await receive()  # websocket.connect
        if _via_loops(scope["headers"]):
            await send({"type": "websocket.close", "code": 1008})
            return
        skip = {b"host", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions"}
        skip |= {b"sec-websocket-protocol", b"origin", b"user-agent"}
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in self._request_headers(scope)
            if name not in skip
        ]
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        found = {name: value.decode("latin-1") for name, value in raw if name in (b"origin", b"user-agent")}
        target = self.config.proxy.upstream
        base = target.base_url.replace("http", "ws", 1)
        uri = base + _target(scope).decode("latin-1")
        options: dict[str, Any] = {
            "additional_headers": headers,
            "subprotocols": scope.get("subprotocols") or None,
            "origin": found.get(b"origin"),
            "user_agent_header": found.get(b"user-agent"),
            "compression": None,
            "max_size": None,
            "open_timeout": self.config.upstream.connect_timeout,
            "proxy": None,  # never HTTP_PROXY from the environment
        }
        try:
            if target.uds is not None:
                upstream = await unix_connect(target.uds, uri, **options)
            else:
                upstream = await connect(uri, **options)
        except Exception as exc:
            logger.warning("idempo proxy: the upstream refused a WebSocket (%s: %s)", type(exc).__name__, exc)
            await send({"type": "websocket.close", "code": 1011})
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def from_client(cancel: anyio.CancelScope) -> None:
            while True:
                message = await receive()
                if message["type"] == "websocket.receive":
                    text = message.get("text")
                    await upstream.send(text if text is not None else message.get("bytes") or b"")
                else:  # websocket.disconnect
                    await upstream.close(message.get("code", 1000))
                    cancel.cancel()
                    return

        async def from_upstream(cancel: anyio.CancelScope) -> None:
            try:
                async for data in upstream:
                    key = "text" if isinstance(data, str) else "bytes"
                    await send({"type": "websocket.send", key: data})
            except ConnectionClosed:
                pass
            with contextlib.suppress(OSError):  # the client may have gone too
                await send({"type": "websocket.close", "code": upstream.close_code or 1000})
            cancel.cancel()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(from_client, group.cancel_scope)
                group.start_soon(from_upstream, group.cancel_scope)
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.close()

    async def _verify(self, resolver: Any, scope: Scope) -> StoredResponse | None:
        """Resolve a JWT principal into the scope; the 401/503 answer when it cannot be."""
        from .principal import KeysUnavailable, PrincipalRejected

        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            scope[_PRINCIPAL_KEY] = await resolver.aresolve(authorization)
        except PrincipalRejected as exc:
            answer = _problem(TOKEN_REJECTED, f"The bearer token was refused ({exc.reason}).")
            return StoredResponse(401, (*answer.headers, (b"www-authenticate", b"Bearer")), answer.body)
        except KeysUnavailable:
            return _problem(KEYS_UNAVAILABLE, "The keys to check the bearer token could not be fetched.", 1)
        return None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Open the store at start-up; at shutdown, cut off what still runs and close everything."""
        try:
            await self._lifespan_messages(receive, send)
        finally:
            for watch in list(self._watches):
                watch.cancel()

    def _start_watch(self, receive: Receive, exchange: Exchange) -> asyncio.Task[None]:
        """Watch a keyed exchange's client (:meth:`_watch_client`) in a task of its own, cancelled as the exchange ends.

        A plain asyncio task rather than one of an anyio task group: the watch
        is started and cancelled once per keyed request, and anyio's
        ``start_soon`` and ``CancelScope.cancel`` (which formats the task's
        repr for its cancel message) cost ~230k instructions per keyed request
        (15 % of it), ``create_task`` and ``Task.cancel`` ~33k (bench/README.md,
        the proxy section). The server is asyncio's (uvicorn), as the forwarders are.
        """
        watch = asyncio.get_running_loop().create_task(self._watch_client(receive, exchange))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        return watch

    async def _watch_client(self, receive: Receive, exchange: Exchange) -> None:
        """Count a keyed exchange as detached from the moment its client leaves before the whole answer.

        The exchange itself goes on (shielded, to the total deadline): this only
        counts it in ``idempo_proxy_detached_inflight`` until the exchange ends
        and cancels the watch.
        """
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not exchange.complete:
            self.metrics.detached_inflight.inc()
            try:
                await asyncio.get_running_loop().create_future()  # until the exchange ends and cancels the watch
            finally:
                self.metrics.detached_inflight.dec()

    async def _lifespan_messages(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                open_ = getattr(self.store, "open", None)
                try:
                    if open_ is not None:
                        await open_()
                except StoreUnavailable as exc:
                    warn_unreachable_at_startup(self.config.proxy.store, exc)
                except (ConfigurationError, StoreError) as exc:
                    await send({"type": "lifespan.startup.failed", "message": f"idempo proxy: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def shutdown(self) -> None:
        """Cut off the exchanges still running (their leases are kept), wait for the saves still retried, close
        the pool and the store.

        A record whose save failed after its answer went out is retried in the
        background while the process lives (DESIGN "HTTP behaviour", a failed
        save); as the ASGI middleware's lifespan does, the shutdown waits for
        those up to ``idempo._engine.lease.SHUTDOWN_WAIT`` seconds (10) before
        the store is closed, and logs each one left (:func:`~idempo._engine.lease.drain_saves`).
        Before, the store was closed under them: the save was dropped, and the
        lease left to expire and a takeover to run the request upstream again.
        """
        self.draining = True
        self._cut_off = True
        for shield in list(self._shields):
            shield.cancel()
        await self.forwarder.aclose()
        await drain_saves(self.middleware.store)
        if self._owns_store:
            await self.store.aclose()

    # --- the forwarder ------------------------------------------------------------------------

    def _request_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The client's header fields as the upstream gets them: cleaned, with Via and X-Forwarded-*."""
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        drop = _connection_named(raw) | {b"expect", b"content-length"}
        client = scope.get("client")
        peer = client[0] if client else None
        trusted = False
        if peer is not None and self._trusted:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                address = None
            trusted = address is not None and any(address in network for network in self._trusted)
        forwarded: list[bytes] = []
        forwarded_for: list[bytes] = []
        forwarded_proto: bytes | None = None
        forwarded_host: bytes | None = None
        host: bytes | None = None
        headers: list[tuple[bytes, bytes]] = []
        for name, value in raw:
            if name in drop:
                continue
            if name == b"forwarded":  # RFC 7239: believed from a trusted proxy only, like X-Forwarded-*
                if trusted:
                    forwarded.append(value)
                continue
            if name == b"x-forwarded-for":
                if trusted:
                    forwarded_for.append(value)
                continue
            if name == b"x-forwarded-proto":
                if trusted and forwarded_proto is None:
                    forwarded_proto = value
                continue
            if name == b"x-forwarded-host":
                if trusted and forwarded_host is None:
                    forwarded_host = value
                continue
            if name == b"host":
                host = value
            headers.append((name, value))
        if host is None:
            host = self._host
            headers.insert(0, (b"host", host))
        if peer is not None:
            forwarded_for.append(peer.encode("latin-1"))
        if forwarded_for:
            headers.append((b"x-forwarded-for", b", ".join(forwarded_for)))
        scheme = scope.get("scheme", "http").encode("latin-1")
        headers.append((b"x-forwarded-proto", forwarded_proto or scheme))
        headers.append((b"x-forwarded-host", forwarded_host or host))
        # Our own element of Forwarded (RFC 7239 section 4): who we heard from, how, and for which host.
        element = [b"for=" + _forwarded_node(peer)] if peer is not None else []
        element += [b"proto=" + scheme, b"host=" + _forwarded_value(host)]
        forwarded.append(b";".join(element))
        headers.append((b"forwarded", b", ".join(forwarded)))
        headers.append((b"via", _VIA))
        return headers

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app behind the middleware: send the request upstream once, stream its answer back.

        A keyed request (the middleware's :class:`~idempo._http.asgi.Exchange`
        in the scope) is sent with its whole body and ``Content-Length``, and
        runs shielded from cancellation until the total deadline; an unkeyed
        one streams its body through.

        Raises:
            UpstreamFailure: a keyed exchange failed (after its answer, if any,
                was sent), so the middleware settles the record by its verdict.
            _CutOff: a keyed exchange was cut off by the shutdown.
        """
        started_at = time.perf_counter()
        watch: asyncio.Task[None] | None = None  # a keyed exchange's watch on its client, ended with the exchange
        exchange = scope.get(EXCHANGE_SCOPE_KEY)
        keyed = isinstance(exchange, Exchange)
        route: Route | None = scope.get(_ROUTE_KEY)
        label = route.name if route is not None else "default"
        headers = self._request_headers(scope)
        body: bytes | AsyncIterator[bytes]
        if isinstance(exchange, Exchange):
            message = await receive()  # the body the middleware read (spooled)
            whole: bytes | SpooledBody = message.get("body", b"")
            if isinstance(whole, bytes):
                body = whole
            elif len(whole) <= CHUNK_BYTES:
                # Small (the common case): one bytes object, so the forwarder writes the head and
                # the body at once, without an async iterator's machinery per request.
                body = whole.read()
            else:
                body = whole.achunks()
            headers = _canonical_key(headers)
            headers.append((b"content-length", b"%d" % len(whole)))
            headers.append((b"idempo-attempt", b"%d" % exchange.execution.token))
            client_receive = scope.get(_RECEIVE_KEY)
            if client_receive is not None:
                watch = self._start_watch(client_receive, exchange)
        else:
            body = b""
            for name, value in scope["headers"]:
                if name == b"content-length":
                    headers.append((name, value))
                    body = self._client_body(receive)
                    break
                if name == b"transfer-encoding" and b"chunked" in value.lower():
                    headers.append((b"transfer-encoding", b"chunked"))
                    body = self._client_body(receive)
                    break
        retry_after = self._policies[label].retry_after if label in self._policies else 1
        metrics = self.metrics
        metrics.upstream_requests.labels(label).inc()
        metrics.inflight.inc()
        failure: UpstreamFailure | None = None
        started = False
        upstream_at = time.perf_counter()
        deadline = anyio.current_time() + self.config.upstream.deadline
        attempt = Attempt()
        attempt_set = ATTEMPT.set(attempt)
        try:
            with anyio.CancelScope(shield=keyed, deadline=deadline) as shield:
                self._shields.add(shield)
                response = None
                try:
                    response = await self.forwarder.send(scope["method"], _target(scope), headers, body)
                    response_headers = _clean(response.headers)
                    response_headers.append((b"via", _VIA))
                    await send({"type": "http.response.start", "status": response.status, "headers": response_headers})
                    started = True
                    # The chunk that completes a Content-Length body goes out as the
                    # answer's end: the middleware settles the record before the client
                    # has the answer's last byte (a retry finds it settled).
                    remaining = _content_length(response.headers)
                    ended = False
                    async for chunk in response.aiter_raw():
                        if not chunk or ended:
                            continue
                        if remaining is not None:
                            remaining -= len(chunk)
                            ended = remaining <= 0
                        await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
                    if not ended:
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                except UpstreamFailure as exc:
                    if _client_left(exc):
                        return
                    failure = exc
                except _ClientGone:
                    return
                finally:
                    self._shields.discard(shield)
                    if response is not None:
                        with anyio.CancelScope(shield=True):
                            await response.aclose()
            if shield.cancelled_caught and failure is None:
                if self._cut_off:
                    raise _CutOff()
                if attempt.unsent is not None:  # still waiting for a connection: nothing was sent
                    failure = failure_class(attempt.unsent)(
                        f"the deadline ({self.config.upstream.deadline} s) ended before the request was sent"
                    )
                else:
                    failure = failure_class("deadline")(f"no whole answer within {self.config.upstream.deadline} s")
        finally:
            ATTEMPT.reset(attempt_set)
            if watch is not None:
                watch.cancel()
            metrics.inflight.dec()
            now = time.perf_counter()
            metrics.upstream_seconds.labels(label).observe(now - upstream_at)
            metrics.overhead_seconds.labels(label).observe(max(0.0, (upstream_at - started_at)))
        if failure is None:
            if isinstance(exchange, Exchange):
                capture = exchange.capture
                if capture.too_large:
                    metrics.not_stored.labels("too_large").inc()
                elif capture.verdict is not Verdict.STORE:
                    metrics.not_stored.labels("status").inc()
            return
        metrics.upstream_errors.labels(failure.kind).inc()
        if not started:
            await send_answer(send, failure_answer(failure, retry_after))
        if keyed:
            if failure.sent:
                metrics.unknown_outcomes.labels(failure.kind).inc()
            raise failure

    async def _client_body(self, receive: Receive) -> AsyncIterator[bytes]:
        """An unkeyed request's body, chunk by chunk as the client sends it."""
        while True:
            message: Message = await receive()
            if message["type"] != "http.request":
                raise _ClientGone()
            chunk: bytes | SpooledBody = message.get("body", b"")
            if isinstance(chunk, SpooledBody):  # a bypass (the store down, fail_open): the body already read
                for part in chunk.chunks():
                    yield part
            elif chunk:
                yield chunk
            if not message.get("more_body", False):
                return


_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _forwarded_value(value: bytes) -> bytes:
    """A ``Forwarded`` parameter value: the token itself, else a quoted-string (RFC 7239 section 4)."""
    if value and all(byte in _TOKEN for byte in value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _forwarded_node(peer: str) -> bytes:
    """The ``for=`` node of a peer address: an IPv6 address bracketed and quoted (RFC 7239 section 6)."""
    node = peer.encode("latin-1")
    return _forwarded_value(b"[" + node + b"]" if ":" in peer else node)


def _canonical_key(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A keyed request's fields with its ``Idempotency-Key`` in one form per key, for the upstream.

    The client may send the key bare (``k``) or as an sf-string (``"k"``); both
    name the same key (DESIGN "idempotency key"), and a retry may use the other
    form. The upstream gets one line in :func:`~idempo._core.keys.format_key`'s
    form (bare when the key can be, as idempo's own client sends it; an
    sf-string otherwise), so every attempt of one key reaches it as the same
    value. The middleware admitted the key, so it parses.
    """
    values = [value for name, value in headers if name == b"idempotency-key"]
    if not values:
        return headers
    key = parse_key(values)
    assert key is not None
    canonical = format_key(key).encode("ascii")
    if values == [canonical]:
        return headers
    kept = [(name, value) for name, value in headers if name != b"idempotency-key"]
    kept.append((b"idempotency-key", canonical))
    return kept


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The ``Content-Length`` of an answer's headers; None when there is none, or more than one value."""
    found = [value for name, value in headers if name == b"content-length"]
    if len(found) != 1 or not found[0].strip().isdigit():
        return None
    return int(found[0])


def _target(scope: Scope) -> bytes:
    """The request target as the client sent it: the raw path and ``?query``."""
    path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    query: bytes = scope.get("query_string", b"")
    return path + b"?" + query if query else path


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> bytes:
    """``second`` (seconds since the epoch) as an IMF-fixdate (RFC 9110 section 5.6.7); the last one kept,
    so a second's answers format it once."""
    return email.utils.formatdate(second, usegmt=True).encode()


def _dated(send: Send) -> Send:
    """``send`` adding a ``Date`` to an answer that has none.

    The server's own Date is off (the upstream's reaches the client), so a
    replay (idempo does not store ``Date``), the proxy's own answers (400,
    409, 502, ...) and an upstream answer without one would go out undated:
    RFC 9110 section 6.6.1 asks an origin server with a clock to send Date,
    and a recipient that forwards an undated response to append one.
    """

    async def dated_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers") or ()
            if not any(name.lower() == b"date" for name, _ in headers):
                message = {**message, "headers": [*headers, (b"date", _http_date(int(time.time())))]}
        await send(message)

    return dated_send


def create_app(config: ProxyConfig, **options: Any) -> ProxyApp:
    """The proxy's ASGI app for ``config`` (the entry point of ``idempo proxy``, the demo and the bench).

    Args:
        config: the configuration (:func:`~idempo.proxy.config.load_config`).
        options: passed to :class:`ProxyApp` (``store``, ``forwarder``, ``metrics``, ``secret``).

    Returns:
        The app; serve it with uvicorn (``date_header=False, server_header=False``,
        so the upstream's ``Date`` and ``Server`` are the ones the client gets).
    """
    return ProxyApp(config, **options)


def app_factory(environ: Mapping[str, str] | None = None) -> ProxyApp:
    """The app configured by the environment, for ``uvicorn --factory idempo.proxy.app:app_factory``.

    ``IDEMPO_PROXY_CONFIG`` names the file; the other ``IDEMPO_PROXY_*``
    variables override it (:data:`~idempo.proxy.config.ENVIRONMENT`). Also
    what gunicorn's ``UvicornWorker`` loads (``idempo.proxy.app:app_factory()``).

    Raises:
        ProxyConfigError: the configuration is wrong (the message names the key).
    """
    return create_app(load_config(None, environ=os.environ if environ is None else environ))


Factory = Callable[[], ProxyApp]
