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

import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import anyio
import anyio.to_thread

from ._core.flow import LegacyIdentity, Proceed
from ._core.http import (
    BYPASSED_HEADER,
    ResponseCapture,
    RouteOptions,
    RouteTable,
    body_too_large_answer,
    check_key,
    content_type_of,
    decision_answer,
    fingerprint_off_loop,
    identity_path,
    legacy_identity,
    principal_required_answer,
    request_identity,
    store_unavailable_answer,
)
from ._core.policy import Policy, Verdict
from ._core.records import StoredResponse
from ._engine.begin import Legacy, begin_async
from ._engine.execution import AsyncExecution
from .exceptions import ConfigurationError, StoreError, StoreUnavailable
from .observability import Outcome, RequestObservation, logger, observe_request
from .principals import default as default_principal
from .principals import legacy_principal
from .secrets import SecretSource
from .stores import async_store_from_url
from .stores._base import warn_unreachable_at_startup
from .typing import AsyncStore

__all__ = ["EXCHANGE_SCOPE_KEY", "IdempotencyMiddleware", "default_principal", "report_exception"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Resolves the principal (who sent the request) from the ASGI scope.
PrincipalResolver = Callable[[Scope], "str | None"]

# Response extensions whose bodies never pass through ``send``; hidden from
# the app so every response can be captured.
_UNCAPTURABLE = ("http.response.pathsend", "http.response.zerocopysend")

#: The scope key under which the middleware leaves the state of a request it
#: executes; :func:`report_exception` reads it.
EXCHANGE_SCOPE_KEY = "idempo.exchange"


class _Reported:
    """The exception a framework reported for the request being executed, if any."""

    __slots__ = ("exception",)

    def __init__(self) -> None:
        self.exception: BaseException | None = None


def report_exception(scope: Scope, exc: BaseException) -> None:
    """Tell the middleware that the handler raised ``exc`` though the framework answered anyway.

    For frameworks whose exception handling sits between the middleware and
    the handler (Litestar answers 500 inside the middleware stack), so the
    exception never reaches the middleware: reporting it lets
    ``Policy.exception_verdicts`` decide what happens to the record.
    :class:`idempo.litestar.IdempotencyPlugin` does this for Litestar. A no-op
    for requests the middleware does not execute.

    Args:
        scope: the request's ASGI scope, as the app received it.
        exc: the exception the handler raised.
    """
    reported = scope.get(EXCHANGE_SCOPE_KEY)
    if isinstance(reported, _Reported):
        reported.exception = exc


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
        self.store: AsyncStore = async_store_from_url(store) if isinstance(store, str) else store
        self._owns_store = isinstance(store, str)
        self._store_url: str = store if isinstance(store, str) else getattr(store, "url", type(store).__name__)
        self.policy = policy if policy is not None else Policy()
        self._routes = RouteTable(routes)
        self.principal = principal
        self.key_header = key_header
        self._key_header = key_header.lower().encode("latin-1")
        self._route_options = _StarletteRouteOptions(self._routes)

    def policy_for(self, path: str) -> Policy | None:
        """Return the policy for a path from the ``routes`` patterns, or None when the path is exempt."""
        return self._routes.policy_for(path, self.policy)

    def _lifespan_send(self, send: Send) -> Send:
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
            elif message["type"] == "lifespan.shutdown.complete" and self._owns_store:
                await self.store.aclose()
            await send(message)

        return lifespan_send

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._lifespan_send(send))
            else:
                await self.app(scope, receive, send)
            return
        route, policy = self._routes.route_for(scope["path"], self.policy) if self._routes else ("*", self.policy)
        if "starlette" in sys.modules:
            options = self._route_options.find(scope, self.app, policy, self.policy)
            if options is not None:
                policy = options.apply(policy, self.policy)
        await self.handle(scope, receive, send, self.app, policy, route)

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, app: ASGIApp, policy: Policy | None, route: str = "*"
    ) -> None:
        """Serve one HTTP request with ``app`` under ``policy`` (None: pass it through untouched).

        The engine behind :meth:`__call__`, also used by the Litestar
        middleware once Litestar has resolved the route's policy. ``route``
        is the label logs, metrics and spans name the route by (a pattern,
        never a raw path).
        """
        method: str = scope["method"]
        if policy is None or method not in policy.methods:
            await app(scope, receive, send)
            return

        key_values = []
        content_types = []
        for name, value in scope["headers"]:
            if name == self._key_header:
                key_values.append(value)
            elif name == b"content-type":
                content_types.append(value)
        path: str = scope["path"]
        key = check_key(policy, method, path, key_values)
        if key is None:
            await app(scope, receive, send)
            return
        observation = observe_request("asgi", method, route, path)
        if isinstance(key, StoredResponse):
            observation.finish(Outcome.INVALID_KEY if key_values else Outcome.MISSING_KEY, key.status)
            await _send_answer(send, key)
            return
        content_type = content_type_of(content_types)
        if isinstance(content_type, StoredResponse):
            observation.finish(Outcome.CONTENT_TYPE_AMBIGUOUS, content_type.status)
            await _send_answer(send, content_type)
            return
        principal = self.principal(scope)
        if principal is None:
            observation.finish(Outcome.NO_PRINCIPAL, 400)
            await _send_answer(send, principal_required_answer())
            return
        try:
            body = await _read_body(receive, policy.max_request_body)
        except _ClientGone:
            observation.finish(Outcome.BODY_INCOMPLETE)
            return  # no one to answer, nothing run, nothing stored
        if body is None:
            observation.finish(Outcome.BODY_TOO_LARGE, 413)
            await _send_answer(send, body_too_large_answer(policy))
            return

        try:
            digests = self._secret.digests or await self._secret.aload(self.store)
        except StoreError as exc:
            await self._store_failed(exc, policy, app, scope, _replay_body(body, receive), send, observation)
            return
        query = scope.get("query_string", b"")
        identity_at = identity_path(path, scope.get("raw_path"))
        facts = (policy, digests, principal, method, identity_at, query, content_type, body, key)
        if fingerprint_off_loop(policy, content_type, len(body)):
            # A large body's fingerprint (canonical JSON: about 1 s for 10 MiB)
            # is computed in a worker thread: the loop keeps serving meanwhile.
            identity = await anyio.to_thread.run_sync(request_identity, *facts)
        else:
            identity = request_identity(*facts)
        observation.identify(principal, key, identity.record_key, digests)
        legacy = None
        if self._secret.legacy_possible():

            def old_identity() -> LegacyIdentity | None:
                # After a fresh lease: where a version before keyed digests kept the record.
                old = legacy_principal(scope, self.principal, principal)
                if old is None:
                    return None
                query = scope.get("query_string", b"")
                return legacy_identity(policy, old, method, path, query, content_type, body, key)

            legacy = Legacy(self._secret, old_identity)

        try:
            call = begin_async(self.store, identity.record_key, identity.fingerprint, policy, observation, legacy)
            decision = await call
        except StoreError as exc:
            await self._store_failed(exc, policy, app, scope, _replay_body(body, receive), send, observation)
            return
        if isinstance(decision, Proceed):
            try:
                await self._execute(
                    policy, identity.record_key, decision.token, app, scope, body, receive, send, observation
                )
            finally:
                observation.finish()
        else:
            answer = decision_answer(decision)
            observation.finish(status=answer.status)
            await _send_answer(send, answer)

    async def _store_failed(
        self,
        exc: StoreError,
        policy: Policy,
        app: ASGIApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        observation: RequestObservation,
    ) -> None:
        """Fail closed with 503, or run the app unprotected when the policy fails open.

        Either way the request's record says so: ``store_error`` (ERROR) or
        ``bypassed`` (WARNING), with the store's error.
        """
        if not policy.fail_open:
            answer = store_unavailable_answer(policy)
            observation.finish(Outcome.STORE_ERROR, answer.status, exc)
            await _send_answer(send, answer)
            return
        observation.outcome, observation.error = Outcome.BYPASSED, exc
        status: int | None = None

        async def marked_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), BYPASSED_HEADER]}
            await send(message)

        observation.handler_started()
        try:
            await app(scope, receive, marked_send)
        finally:
            observation.handler_finished(status)
            observation.finish()

    async def _execute(
        self,
        policy: Policy,
        record_key: str,
        token: int,
        app: ASGIApp,
        scope: Scope,
        body: bytes,
        receive: Receive,
        send: Send,
        observation: RequestObservation,
    ) -> None:
        """Run the app holding the lease; capture its response; settle the record.

        The app first receives ``body`` (already read), then the real stream.

        The record is settled (completed, released or held) before the last
        body message reaches the client, so a client that retries as soon as
        it has the answer finds the record settled. The app runs to the end
        even when the client has gone: its result is still recorded and the
        retry gets the replay (shared/cases B04).

        Every way out settles the record through one :class:`AsyncExecution`:
        when idempo's own code fails after the app started answering (the
        capture, the verdict, the settle, the observation), the record is
        released (or held, as the verdict says), renewals stop, and the app's
        answer is passed through untouched from there on.
        """
        capture = ResponseCapture(policy)
        execution = AsyncExecution(self.store, policy, record_key, token, observation)
        start: Message | None = None
        start_sent = False
        complete = False
        client_gone = False
        # True once idempo's own code failed: the rest of the answer passes through.
        broken = False
        done: anyio.Event | None = None

        async def forward(message: Message) -> None:
            nonlocal client_gone
            if client_gone:
                return
            try:
                await send(message)
            except OSError:
                # ASGI 2.4: send raises OSError once the client is gone. The app
                # goes on, so its result is still recorded for the retry.
                client_gone = True

        async def settle(response: StoredResponse | None, outcome: Verdict, reason: str | None = None) -> None:
            if capture.refusal is not None:
                # Not stored (the capture released it); the server does with the
                # response what it does with any it cannot send (uvicorn drops it).
                observation.response_refused(capture.refusal)
                response, outcome = None, Verdict.RELEASE
            await execution.settle(response, outcome, reason)
            if done is not None:
                done.set()

        async def failed(exc: Exception) -> None:
            nonlocal broken
            broken = True
            logger.error(
                "idempo: capturing the answer of record %s failed; the record is released",
                record_key,
                exc_info=exc,
            )
            await execution.fail(exc, start["status"] if start is not None else None)
            if done is not None:
                done.set()

        async def capture_send(message: Message) -> None:
            nonlocal start, start_sent, complete
            kind = message["type"]
            if broken:
                if kind == "http.response.body" and start is not None and not start_sent:
                    start_sent = True
                    await forward(start)
                await forward(message)
                return
            try:
                if kind == "http.response.start":
                    start = message
                    capture.start(message["status"], message.get("headers", ()))
                    if capture.refusal is not None:
                        observation.response_refused(capture.refusal)
                    return
                if kind != "http.response.body" or start is None or execution.settled:
                    await forward(message)
                    return
                capture.add(message.get("body", b""))
                if not message.get("more_body", False):
                    complete = True
                    # With exception verdicts configured, an answer that is not
                    # stored is settled when the app finishes: frameworks send
                    # their 500 before re-raising, and the exception decides.
                    if capture.verdict is Verdict.STORE or not policy.exception_verdicts:
                        await settle(capture.response(), capture.verdict, f"status {capture.status}")
                    elif done is not None:
                        done.set()  # the response is whole: an app waiting for the disconnect may have it
            except Exception as exc:
                await failed(exc)
                if kind == "http.response.start":
                    return
            if not start_sent and start is not None:
                start_sent = True
                await forward(start)
            await forward(message)

        body_pending = True

        async def app_receive() -> Message:
            nonlocal done, body_pending
            if body_pending:
                body_pending = False
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            if message["type"] != "http.disconnect" or execution.settled or complete:
                return message
            # Hide the client's departure until the response is complete, so
            # frameworks that stop on disconnect (Starlette's StreamingResponse)
            # finish the work the lease stands for.
            if done is None:
                done = anyio.Event()
            await done.wait()
            return message

        extensions = scope.get("extensions")
        if extensions and any(name in extensions for name in _UNCAPTURABLE):
            extensions = {k: v for k, v in extensions.items() if k not in _UNCAPTURABLE}
            scope = {**scope, "extensions": extensions}
        # Added in place (a key of our own): the app's changes to the scope,
        # such as the route a router picked, stay visible to outer middleware.
        reported = _Reported()
        scope[EXCHANGE_SCOPE_KEY] = reported
        try:
            observation.handler_started()
            try:
                await app(scope, app_receive, capture_send)
            except Exception as exc:
                observation.error = exc
                if not execution.settled:
                    await execution.fail(exc, start["status"] if start is not None else None)
                    if done is not None:
                        done.set()
                raise
            finally:
                observation.handler_finished(start["status"] if start is not None else None)
            if not execution.settled:
                # Either a deferred non-stored answer (decided by the exception a
                # framework reported, if any), or the app returned without
                # completing its response: nothing whole to store.
                reason = None
                if not complete:
                    outcome = Verdict.RELEASE
                elif reported.exception is not None and capture.verdict is not Verdict.STORE:
                    outcome = _exception_verdict(policy, reported.exception)
                    reason = f"exception {type(reported.exception).__name__}"
                else:
                    outcome = capture.verdict
                await settle(None, outcome, reason)
                if start is not None and not start_sent:
                    start_sent = True
                    await forward(start)
        except BaseException as exc:
            # Whatever failed (the app, or idempo's own code after it): the
            # record is settled by it, and renewals stop. A crash (cancellation,
            # SystemExit) settles nothing: the lease expires, a retry may execute.
            await execution.fail(exc, start["status"] if start is not None else None)
            raise


def _exception_verdict(policy: Policy, exc: BaseException) -> Verdict:
    verdict = policy.verdict_for_exception(exc)
    # STORE makes no sense without a result: an exception is never replayed.
    return Verdict.RELEASE if verdict is Verdict.STORE else verdict


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """Read the whole request body; None when it exceeds ``limit`` bytes.

    Raises:
        _ClientGone: the client left mid-upload. Nothing may run on a partial
            body: its fingerprint would refuse the complete retry with 422.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _replay_body(body: bytes, receive: Receive) -> Receive:
    """A receive callable that hands the app the body already read, then the real stream."""
    pending = True

    async def replay_receive() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay_receive


async def _send_answer(send: Send, response: StoredResponse) -> None:
    await send({"type": "http.response.start", "status": response.status, "headers": list(response.headers)})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


class _StarletteRouteOptions:
    """Finds the :class:`RouteOptions` declared on the route a request goes to (Starlette, FastAPI).

    The middleware runs before routing, so it asks the framework's own
    matcher (``route.matches(scope)``, in the router's order, into mounts),
    as the router will a moment later. What a route declares is read once per
    route and cached; apps that declare nothing are not matched at all, and
    neither is a request whose method no route's options and no path's policy
    could make take part (a GET, usually).

    Args:
        table: the middleware's path patterns; their policies are the bases
            route options may derive from.
    """

    def __init__(self, table: RouteTable) -> None:
        self._table = table
        self._per_route: dict[int, tuple[object, RouteOptions | None]] = {}
        self._routes: object = None
        # Every route list the last read walked, nested ones included.
        self._lists: tuple[_RouteList, ...] = ()
        self._default: Policy | None = None
        self._any = False
        self._methods: frozenset[str] = frozenset()
        self._starlette: type[Any] | None = None

    def find(self, scope: Scope, app: Any, policy: Policy | None, default: Policy) -> RouteOptions | None:
        """Return the options of the route ``scope`` goes to, or None where they cannot matter.

        Args:
            scope: the request's ASGI scope.
            app: the app the middleware wraps (the Starlette app when it wraps
                one from outside, so ``scope["app"]`` is not set yet).
            policy: the policy of the request's path (None: exempt by a pattern).
            default: the middleware's default policy.
        """
        starlette = self._starlette
        if starlette is None:
            from starlette.applications import Starlette

            starlette = self._starlette = Starlette
        # Added with app.add_middleware, the app is in the scope; wrapped
        # around the app from outside, it is the app itself.
        holder: Any = scope.get("app")
        if not isinstance(holder, starlette):
            holder = app
            if not isinstance(holder, starlette):
                return None
        routes: Sequence[Any] = holder.router.routes
        if routes is not self._routes or default is not self._default or _changed(self._lists):
            # Read once per route table: a route added later, at the top or
            # in a mounted app or an included router, changes some list.
            self._read(routes, default)
        if not self._any:
            return None
        method: str = scope["method"]
        if method not in self._methods and (policy is None or method not in policy.methods):
            # Whichever route the request goes to, its policy leaves the method
            # out, so the request passes through: the match would change nothing.
            return None
        route = _match(routes, scope)
        return None if route is None else self._options(route)

    def _read(self, routes: Sequence[Any], default: Policy) -> None:
        lists: list[_RouteList] = []
        declared = [options for route in _all_routes(routes, lists) if (options := self._options(route)) is not None]
        # A route's options derive from its path's policy, which depends on
        # the request's path, so take every policy the path could have.
        bases = [default, *(base for base in self._table.policies() if base is not None)]
        methods: set[str] = set()
        for options in declared:
            for base in bases:
                derived = options.apply(base, default)
                if derived is not None:
                    methods.update(derived.methods)
        self._any = bool(declared)
        self._methods = frozenset(methods)
        self._routes, self._lists, self._default = routes, tuple(lists), default

    def _options(self, route: object) -> RouteOptions | None:
        cached = self._per_route.get(id(route))
        if cached is not None and cached[0] is route:
            return cached[1]
        options = None
        dependant = getattr(route, "dependant", None)
        if dependant is not None:
            options = _dependant_options(dependant)
        self._per_route[id(route)] = (route, options)
        return options


def _flat(routes: Iterable[Any]) -> Iterator[Any]:
    """Routes in the router's order, with FastAPI's included routers opened in place.

    FastAPI (0.120+) keeps an included router as one entry whose
    ``effective_candidates()`` are its routes with the include's prefix and
    dependencies applied; each candidate ``matches`` like a route and has the
    combined ``dependant``.
    """
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            yield from _flat(candidates())
        else:
            yield route


#: A route list as read, to tell later whether it changed: (the object that
#: holds it, None for the top level; its list now, fetched cheaply; the list
#: then; its length then). Checked on every request, so never anything that
#: walks routes: for a FastAPI included router, the router's own route list
#: (FastAPI rebuilds the include's candidates when that list changes).
_RouteList = tuple[Any, Callable[[Any], Any], Any, int]


def _own_routes(owner: Any) -> Any:
    return owner.routes


def _router_routes(owner: Any) -> Any:
    return owner.original_router.routes


def _changed(lists: tuple[_RouteList, ...]) -> bool:
    """True when a route list read before is another list now, or has another length."""
    for owner, fetch, seen, count in lists:
        current = seen if owner is None else fetch(owner)
        if (seen is not None and current is not seen) or len(current) != count:
            return True
    return False


def _all_routes(routes: Sequence[Any], lists: list[_RouteList], owner: Any = None, fetch: Any = None) -> Iterator[Any]:
    """Every route, nested ones included; records each route list walked in ``lists``.

    A list its owner makes afresh on each access (a property) is recorded by
    length only (``seen`` None), or the check would find it changed every time.
    """
    own = routes if owner is None else fetch(owner)
    stable = owner is None or fetch(owner) is own
    lists.append((owner, fetch, own if stable else None, len(own)))
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            fetch_included = _router_routes if hasattr(route, "original_router") else _candidates
            yield from _all_routes(candidates(), lists, route, fetch_included)
            continue
        yield route
        children = getattr(route, "routes", None)
        # An empty list counts when it is the mounted app's own (routes may
        # be added to it later), not a fresh [] made for an app without routes.
        if children is not None and not hasattr(route, "endpoint") and (children or route.routes is children):
            yield from _all_routes(children, lists, route, _own_routes)


def _candidates(owner: Any) -> Any:
    return owner.effective_candidates()


def _match(routes: Iterable[Any], scope: Scope) -> Any:
    """The route the framework's router will pick for ``scope`` (first full match), or None."""
    from starlette.routing import Match

    for route in _flat(routes):
        match, child_scope = route.matches(scope)
        if match is not Match.FULL:
            continue
        children = getattr(route, "routes", None)
        if children is not None and not hasattr(route, "endpoint"):  # a Mount or Host
            return _match(children, {**scope, **child_scope})
        return route
    return None


def _dependant_options(dependant: Any) -> RouteOptions | None:
    """The options of the innermost idempotency dependency in a FastAPI dependency tree.

    Router dependencies come before the route's own in ``dependant.dependencies``,
    so the last one found (the route's) wins.
    """
    found: RouteOptions | None = getattr(dependant.call, "idempo_route_options", None)
    for sub in dependant.dependencies:
        options = _dependant_options(sub)
        if options is not None:
            found = options
    return found
