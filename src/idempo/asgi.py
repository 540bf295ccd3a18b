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

import fnmatch
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import anyio

from ._core.flow import Proceed, finish
from ._core.http import (
    BYPASSED_HEADER,
    ResponseCapture,
    body_too_large_answer,
    check_key,
    decision_answer,
    principal_required_answer,
    request_identity,
    store_unavailable_answer,
)
from ._core.keys import principal_from_credentials
from ._core.policy import Policy, Verdict
from ._core.records import StoredResponse
from ._engine import begin_async, complete_async, logger, settle_async
from .exceptions import ConfigurationError, StoreError
from .stores import async_store_from_url
from .typing import AsyncStore

__all__ = ["IdempotencyMiddleware", "default_principal"]

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


def default_principal(scope: Scope) -> str:
    """The default principal: a hash of the ``Authorization`` credentials.

    Without credentials, the client's address (behind a proxy, run uvicorn
    with ``--proxy-headers`` so it is the real client's), so two anonymous
    callers are never one silent global bucket (shared/cases B11). Only when
    the server reports no client address either is the principal
    ``"anonymous"``.
    """
    for name, value in scope["headers"]:
        if name == b"authorization":
            return principal_from_credentials(value)
    client = scope.get("client")
    return "addr:" + str(client[0]) if client else "anonymous"


class IdempotencyMiddleware:
    """Make POST/PATCH requests with an ``Idempotency-Key`` execute at most once.

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
            (no anonymous bucket). Default :func:`default_principal`.
        key_header: the request header carrying the key.

    Raises:
        ConfigurationError: the store URL is unknown or ``routes`` holds a
            value that is neither a Policy nor None.
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
    ) -> None:
        self.app = app
        self.store: AsyncStore = async_store_from_url(store) if isinstance(store, str) else store
        self.policy = policy if policy is not None else Policy()
        self._routes: list[tuple[re.Pattern[str], Policy | None]] = []
        for pattern, route_policy in (routes or {}).items():
            if route_policy is not None and not isinstance(route_policy, Policy):
                raise ConfigurationError(f"routes[{pattern!r}] must be a Policy or None")
            self._routes.append((re.compile(fnmatch.translate(pattern)), route_policy))
        self.principal = principal
        self._key_header = key_header.lower().encode("latin-1")

    def policy_for(self, path: str) -> Policy | None:
        """Return the policy for a path, or None when the path is exempt."""
        for pattern, route_policy in self._routes:
            if pattern.match(path):
                return route_policy
        return self.policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        policy = self.policy_for(scope["path"]) if self._routes else self.policy
        if policy is None or method not in policy.methods:
            await self.app(scope, receive, send)
            return

        key_values = []
        content_type = None
        for name, value in scope["headers"]:
            if name == self._key_header:
                key_values.append(value)
            elif name == b"content-type":
                content_type = value
        path: str = scope["path"]
        key = check_key(policy, method, path, key_values)
        if key is None:
            await self.app(scope, receive, send)
            return
        if isinstance(key, StoredResponse):
            await _send_answer(send, key)
            return
        principal = self.principal(scope)
        if principal is None:
            await _send_answer(send, principal_required_answer())
            return
        body = await _read_body(receive, policy.max_request_body)
        if body is None:
            await _send_answer(send, body_too_large_answer(policy))
            return

        identity = request_identity(
            policy, principal, method, path, scope.get("query_string", b""), content_type, body, key
        )
        try:
            decision = await begin_async(self.store, identity.record_key, identity.fingerprint, policy)
        except StoreError as exc:
            await self._store_failed(exc, policy, scope, _replay_body(body, receive), send)
            return
        if isinstance(decision, Proceed):
            await self._execute(policy, identity.record_key, decision.token, scope, body, receive, send)
        else:
            await _send_answer(send, decision_answer(decision))

    async def _store_failed(self, exc: StoreError, policy: Policy, scope: Scope, receive: Receive, send: Send) -> None:
        """Fail closed with 503, or run the app unprotected when the policy fails open."""
        if not policy.fail_open:
            logger.error("idempo: store failed at begin, answering 503: %s", exc)
            await _send_answer(send, store_unavailable_answer(policy))
            return
        logger.warning("idempo: store failed at begin, running without idempotency (fail_open): %s", exc)

        async def marked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), BYPASSED_HEADER]}
            await send(message)

        await self.app(scope, receive, marked_send)

    async def _execute(
        self, policy: Policy, record_key: str, token: int, scope: Scope, body: bytes, receive: Receive, send: Send
    ) -> None:
        """Run the app holding the lease; capture its response; settle the record.

        The app first receives ``body`` (already read), then the real stream.
        The record is settled (completed, released or held) before the last
        body message reaches the client, so a client that retries as soon as
        it has the answer finds the record settled. The app runs to the end
        even when the client has gone: its result is still recorded and the
        retry gets the replay (shared/cases B04).
        """
        store = self.store
        capture = ResponseCapture(policy)
        start: Message | None = None
        start_sent = False
        settled = False
        complete = False
        client_gone = False
        body_pending = True
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

        async def settle(response: StoredResponse | None, outcome: Verdict) -> None:
            nonlocal settled
            settled = True
            if outcome is Verdict.STORE and response is not None:
                await complete_async(store, record_key, token, response, policy.record_ttl_ms)
            else:
                await settle_async(store, finish(policy, record_key, token, response, verdict=outcome))
            if done is not None:
                done.set()

        async def capture_send(message: Message) -> None:
            nonlocal start, start_sent, complete, client_gone
            kind = message["type"]
            if kind == "http.response.start":
                start = message
                capture.start(message["status"], message.get("headers", ()))
                return
            if kind != "http.response.body" or start is None or settled:
                await forward(message)
                return
            capture.add(message.get("body", b""))
            if not message.get("more_body", False):
                complete = True
                # With exception verdicts configured, an answer that is not
                # stored is settled when the app finishes: frameworks send
                # their 500 before re-raising, and the exception decides.
                if capture.verdict is Verdict.STORE or not policy.exception_verdicts:
                    await settle(capture.response(), capture.verdict)
            if client_gone:
                return
            try:
                if not start_sent:
                    start_sent = True
                    await send(start)
                await send(message)
            except OSError:
                client_gone = True  # see forward()

        async def app_receive() -> Message:
            nonlocal done, body_pending
            if body_pending:
                body_pending = False
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            if message["type"] != "http.disconnect" or settled:
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
        try:
            await self.app(scope, app_receive, capture_send)
        except Exception as exc:
            if not settled:
                await settle(None, policy.verdict_for_exception(exc))
            raise
        if not settled:
            # Either a deferred non-stored answer, or the app returned without
            # completing its response: nothing whole to store.
            await settle(None, capture.verdict if complete else Verdict.RELEASE)
            if start is not None and not start_sent:
                await forward(start)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """Read the whole request body; None when it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left before the body was complete
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
