"""The ASGI front's I/O: reading the body, sending an answer, and running an app under the lease.

:class:`Exchange` is one request the ASGI middleware executes, as an object
of its own (Starlette's ``GZipResponder`` is the model): the app gets the
exchange's :meth:`Exchange.receive` and :meth:`Exchange.send`, which capture
its answer and hold ``http.response.start`` back until idempo has decided;
:meth:`Exchange.commit` is the one point where the record is settled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

import anyio

from .._core.capture import ResponseCapture, Settlement
from .._core.fingerprint import BodySource
from .._core.http import BYPASSED_HEADER
from .._core.policy import Policy, Verdict
from .._core.problems import (
    STORE_UNAVAILABLE,
    TRANSACTIONAL_RESPONSE_TOO_LARGE,
    TRANSACTION_CONFLICT,
    problem_response,
)
from .._core.records import StoredResponse
from .._core.routes import RouteOptions, RouteTable
from .._engine._async.drivers import AsyncTransactionalExecution
from .._engine.execution import AsyncExecution
from .._engine.transaction import AsyncTransaction
from ..exceptions import MissingKey, StoreUnavailable, TransactionClosed
from ..observability._observation import RequestObservation, logger
from .admission import Bypass, ClientGone

__all__ = [
    "EXCHANGE_SCOPE_KEY",
    "ROUTE_OPTIONS_FINDERS",
    "STARTUP_CHECKS",
    "ASGIApp",
    "Exchange",
    "Message",
    "Receive",
    "RouteOptionsFinder",
    "Scope",
    "Send",
    "add_route_options_finder",
    "add_startup_check",
    "read_body",
    "replay_body",
    "report_exception",
    "run_bypassed",
    "send_answer",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The scope key under which the middleware leaves the :class:`Exchange` of a
#: request it executes; :func:`report_exception` reads it.
EXCHANGE_SCOPE_KEY = "idempo.exchange"

# Response extensions whose bodies never pass through ``send``; hidden from
# the app so every response can be captured.
_UNCAPTURABLE = ("http.response.pathsend", "http.response.zerocopysend")  # two: Exchange tests each by index


class RouteOptionsFinder(Protocol):
    """Finds the options the route a request goes to declares, for a framework the ASGI front does not know."""

    def find(self, scope: Scope, app: Any, policy: Policy | None, default: Policy) -> RouteOptions | None:
        """The options of the route ``scope`` goes to, or None.

        Args:
            scope: the request's ASGI scope (before routing).
            app: the app the middleware wraps.
            policy: the policy of the request's path (None: exempt by a pattern).
            default: the middleware's default policy.
        """


#: Makes the finders of one middleware from its path patterns. Framework glue
#: adds its own (:func:`add_route_options_finder`) when it is imported, so the
#: generic ASGI front needs no framework knowledge: idempo.fastapi adds
#: Starlette's route matcher (:mod:`idempo._http.starlette`).
ROUTE_OPTIONS_FINDERS: list[Callable[[RouteTable], RouteOptionsFinder]] = []


def add_route_options_finder(factory: Callable[[RouteTable], RouteOptionsFinder]) -> None:
    """Make every ASGI middleware ask finders made by ``factory`` for a route's options (once per factory)."""
    if factory not in ROUTE_OPTIONS_FINDERS:
        ROUTE_OPTIONS_FINDERS.append(factory)


#: Checks the ASGI middleware runs at lifespan start-up, after opening the store:
#: ``check(scope, app, store)`` raises ConfigurationError for an app the store
#: cannot serve (idempo.fastapi: a transactional route on a store without a
#: transactor, or a sync transactional route).
STARTUP_CHECKS: list[Callable[[Scope, Any, Any], None]] = []


def add_startup_check(check: Callable[[Scope, Any, Any], None]) -> None:
    """Make every ASGI middleware run ``check(lifespan_scope, app, store)`` at start-up (once per check)."""
    if check not in STARTUP_CHECKS:
        STARTUP_CHECKS.append(check)


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
    exchange = scope.get(EXCHANGE_SCOPE_KEY)
    if isinstance(exchange, Exchange):
        exchange.reported = exc


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """Read the whole request body; None when it exceeds ``limit`` bytes.

    Raises:
        ClientGone: the client left mid-upload. Nothing may run on a partial
            body: its fingerprint would refuse the complete retry with 422.
    """
    message = await receive()
    if message["type"] != "http.request":
        raise ClientGone()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit else None  # the whole body in one message, as most are
    if len(body) > limit:
        return None
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay_body(body: bytes | BodySource, receive: Receive) -> Receive:
    """A receive callable that hands the app the body already read, then the real stream.

    A body the middleware's reader did not keep as bytes (``idempo proxy``'s
    spooled body) is handed over as that object, for an app that knows it.
    """
    pending = True

    async def replay_receive() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay_receive


async def send_answer(send: Send, response: StoredResponse) -> None:
    """Answer with a stored response or a problem: its status, headers (repeats kept) and body."""
    await send({"type": "http.response.start", "status": response.status, "headers": list(response.headers)})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


async def run_unkeyed(app: ASGIApp, scope: Scope, receive: Receive, send: Send, refusal: StoredResponse) -> None:
    """Run ``app`` on a request that has no record (no key, a method or path idempo leaves out).

    A transactional route on it (``idempo.starlette.transaction``, FastAPI's
    ``Transaction``) raises :class:`~idempo.exceptions.MissingKey`: answered
    with ``refusal`` (a 400 problem) instead of a 500 traceback. Costs nothing
    on the way through: only the exception is caught.
    """
    try:
        await app(scope, receive, send)
    except MissingKey as exc:
        try:
            await send_answer(send, refusal)
        except Exception:
            # The app had started an answer of its own before asking: the
            # server refuses a second one, so the exception stands.
            raise exc from None


async def run_bypassed(app: ASGIApp, scope: Scope, receive: Receive, send: Send, bypass: Bypass) -> None:
    """Run the app unprotected (the store failed, the policy fails open), its answer marked bypassed.

    The request's record says so: ``bypassed`` (WARNING), with the store's
    error, the handler's status and time.
    """
    status: int | None = None

    async def marked_send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            message = {**message, "headers": [*message.get("headers", ()), BYPASSED_HEADER]}
        await send(message)

    bypass.observation.handler_started()
    try:
        await app(scope, replay_body(bypass.body, receive), marked_send)
    finally:
        bypass.finish(status)


class Exchange:
    """One request the ASGI middleware runs holding the lease: the app's receive and send, and the settle.

    The app first receives ``body`` (already read), then the real stream. Its
    answer is captured as it goes out; ``http.response.start`` is held back
    until the first body message, and the record is settled (:meth:`commit`)
    before the last body message reaches the client, so a client that retries
    as soon as it has the answer finds the record settled. The app runs to
    the end even when the client has gone: its result is still recorded and
    the retry gets the replay (shared/cases B04).

    Every way out settles the record through one :class:`AsyncExecution`:
    when idempo's own code fails after the app started answering (the
    capture, the verdict, the settle, the observation), the record is
    released (or held, as the verdict says), renewals stop, and the app's
    answer is passed through untouched from there on.

    :meth:`commit` is where a variant that settles differently (a
    transactional route: the record's completion inside the handler's
    transaction, then COMMIT) extends the exchange.

    Args:
        app: the ASGI app.
        execution: the request's lease.
        observation: the request's observation (the caller finishes it).
        policy: the route's policy.
        body: the request body, already read (bytes; ``idempo proxy`` passes
            its spooled :class:`~idempo._core.fingerprint.BodySource` to its forwarder).
        receive: the server's receive.
        send: the server's send.
    """

    __slots__ = (
        "_body_pending",
        "_done",
        "_held",
        "_last",
        "_receive",
        "_send",
        "app",
        "body",
        "broken",
        "capture",
        "client_gone",
        "complete",
        "execution",
        "observation",
        "open_failed",
        "reported",
        "start",
        "start_sent",
    )

    def __init__(
        self,
        app: ASGIApp,
        execution: AsyncExecution,
        observation: RequestObservation,
        policy: Policy,
        body: bytes | BodySource,
        receive: Receive,
        send: Send,
    ) -> None:
        self.app = app
        self.execution = execution
        self.observation = observation
        self.capture = ResponseCapture(policy)
        self.body = body
        self._receive = receive
        self._send = send
        #: The app's ``http.response.start``, held back until the first body message.
        self.start: Message | None = None
        self.start_sent = False
        #: True once the app's body ended (``more_body`` false).
        self.complete = False
        self.client_gone = False
        #: True once idempo's own code failed: the rest of the answer passes through.
        self.broken = False
        #: The exception a framework reported for the handler (:func:`report_exception`).
        self.reported: BaseException | None = None
        #: Why the handler's transaction could not open (no connection within the deadline).
        self.open_failed: StoreUnavailable | None = None
        self._body_pending = True
        #: A transactional execution's body messages, held until COMMIT returned.
        self._held: list[Message] = []
        #: The last body message of an answer whose settle waits for the app to return.
        self._last: Message | None = None
        # Set once the record is settled (or the answer is whole), for an app
        # waiting on a disconnect the exchange hides meanwhile.
        self._done: anyio.Event | None = None

    @property
    def status(self) -> int | None:
        """The status the app answered, once it started answering."""
        return self.start["status"] if self.start is not None else None

    async def __call__(self, scope: Scope) -> None:
        """Run the app on ``scope``; settle the record whichever way it ends."""
        extensions = scope.get("extensions")
        if extensions and (_UNCAPTURABLE[0] in extensions or _UNCAPTURABLE[1] in extensions):
            extensions = {k: v for k, v in extensions.items() if k not in _UNCAPTURABLE}
            scope = {**scope, "extensions": extensions}
        # Added in place (a key of our own): the app's changes to the scope,
        # such as the route a router picked, stay visible to outer middleware.
        scope[EXCHANGE_SCOPE_KEY] = self
        execution, observation = self.execution, self.observation
        try:
            observation.handler_started()
            try:
                await self.app(scope, self.receive, self.send)
            except Exception as exc:
                observation.error = exc
                if self.transactional and not execution.settled and self._conflict(exc):
                    # A statement of the handler's transaction was aborted to resolve a
                    # conflict (40001, 40P01, 55P03): rolled back, released, 503.
                    await self._commit_transaction(Settlement(None, Verdict.RELEASE, None), conflict=exc)
                    return
                if self.open_failed is not None and not execution.settled and self.start is None:
                    # No connection for the handler's transaction (the pool exhausted):
                    # the store's outage, not the app's bug: 503 with Retry-After, as
                    # any store failure before the handler could write (DESIGN).
                    await self._unavailable(self.open_failed)
                    return
                if not execution.settled:
                    await self.fail(exc)
                    if (
                        isinstance(execution, AsyncTransactionalExecution)
                        and execution.transactional_open
                        and not self.start_sent
                        and (problem := execution.problem()) is not None
                    ):
                        # The handler ended idempo's transaction, then raised: the key is
                        # held, and the answer says so (the exception still goes up).
                        self.start_sent = True
                        await self._send_instead(problem)
                await self._send_last()
                raise
            finally:
                start = self.start
                observation.handler_finished(start["status"] if start is not None else None)
            if not execution.settled:
                # Either a deferred answer that is not stored (decided by the
                # exception a framework reported, if any), or the app returned
                # without completing its response: nothing whole to store.
                await self.commit(self.capture.settlement(complete=self.complete, reported=self.reported))
                if self.start is not None and not self.start_sent:
                    self.start_sent = True
                    await self.forward(self.start)
            await self._send_last()
        except BaseException as exc:
            # Whatever failed (the app, or idempo's own code after it): the
            # record is settled by it, and renewals stop. A crash (cancellation,
            # SystemExit) settles nothing: the lease expires, a retry may execute.
            await execution.fail(exc, self.status)
            raise

    @property
    def transactional(self) -> bool:
        """Whether the handler opened the execution's transaction (the answer is held until COMMIT)."""
        execution = self.execution
        return isinstance(execution, AsyncTransactionalExecution) and execution.transactional_open

    async def transaction(self) -> AsyncTransaction:
        """The execution's transaction, opened on first use (DESIGN "transactional route").

        Raises:
            TransactionClosed: the record is settled, or the answer started before the transaction opened.
            ConfigurationError: the store cannot open transactions.
            StoreUnavailable: no connection within the store's deadline.
        """
        execution = self.execution
        if not isinstance(execution, AsyncTransactionalExecution):
            raise TransactionClosed("this request's execution cannot hold a transaction")
        if not execution.transactional_open and self.start is not None:
            raise TransactionClosed("the answer has started: open the transaction before responding")
        try:
            return await execution.transaction()
        except StoreUnavailable as exc:
            # Noted: if it escapes the app, the exchange answers 503 instead of a 500.
            self.open_failed = exc
            raise

    async def _unavailable(self, exc: StoreUnavailable) -> None:
        """The handler's transaction could not open: the key released, and a 503 problem with Retry-After."""
        execution = self.execution
        logger.warning("idempo: no connection for the transaction of record %s: %s", execution.record_key, exc)
        await execution.fail(exc, None)
        self.start_sent = True
        await self._send_instead(
            problem_response(
                STORE_UNAVAILABLE,
                "No database connection for the transaction within the deadline; nothing was committed. Retry later.",
                retry_after=execution.policy.retry_after,
            )
        )
        self._wake()

    async def commit(self, settlement: Settlement, *, transactional: bool | None = None) -> None:
        """Settle the record by ``settlement``: the one point the answer's verdict reaches the store.

        ``transactional``: :attr:`transactional`, when the caller just read it (None: read here).
        """
        if self.transactional if transactional is None else transactional:
            await self._commit_transaction(settlement)
            return
        if self.capture.refusal is not None:
            # Not stored (the capture released it); the server does with the
            # response what it does with any it cannot send (uvicorn drops it).
            self.observation.response_refused(self.capture.refusal)
        await self.execution.settle(settlement.response, settlement.verdict, settlement.reason)
        self._wake()

    def _conflict(self, exc: Exception) -> bool:
        """Whether the handler's exception is its database aborting the transaction to resolve a conflict."""
        execution = self.execution
        assert isinstance(execution, AsyncTransactionalExecution)
        try:
            return bool(execution.used.kind(exc) == "conflict") and not self.start_sent
        except Exception:
            return False

    async def _commit_transaction(self, settlement: Settlement, conflict: Exception | None = None) -> None:
        """COMMIT (or roll back) the handler's transaction, then send the held answer, or the problem instead.

        A response over ``max_response_body`` cannot be held until COMMIT:
        rolled back, released, 500 problem.
        """
        execution = self.execution
        assert isinstance(execution, AsyncTransactionalExecution)
        capture = self.capture
        problem: StoredResponse | None = None
        if capture.refusal is not None:
            self.observation.response_refused(capture.refusal)
        if capture.too_large:
            settlement = Settlement(None, Verdict.RELEASE, None)
            problem = problem_response(
                TRANSACTIONAL_RESPONSE_TOO_LARGE,
                f"The response exceeds {execution.policy.max_response_body} bytes.",
            )
        await execution.settle(settlement.response, settlement.verdict, settlement.reason)
        if conflict is not None:
            problem = problem_response(
                TRANSACTION_CONFLICT, "The database rolled the transaction back to resolve a conflict.", retry_after=1
            )
        problem = problem or execution.problem()
        held, self._held = self._held, []
        start, self.start_sent = self.start, True
        if problem is not None:
            await self._send_instead(problem)
        elif start is not None:
            execution.before_send()
            await self.forward(start)
            for message in held:
                await self.forward(message)
        self._wake()

    async def _send_instead(self, answer: StoredResponse) -> None:
        self.observation.answered_instead(answer.status)
        if self.client_gone:
            return
        try:
            await send_answer(self._send, answer)
        except OSError:
            self.client_gone = True

    async def fail(self, exc: Exception) -> None:
        """The app raised: settle by the exception's verdict (a response no server may send is released)."""
        if self.capture.refusal is not None:
            await self.commit(Settlement(None, Verdict.RELEASE, None))
            return
        await self.execution.fail(exc, self.status)
        self._wake()

    async def broke(self, exc: Exception) -> None:
        """idempo's own code failed while the app answered: settle by the failure, pass the rest through."""
        self.broken = True
        logger.error(
            "idempo: capturing the answer of record %s failed; the record is released",
            self.execution.record_key,
            exc_info=exc,
        )
        await self.execution.fail(exc, self.status)
        self._wake()

    async def forward(self, message: Message) -> None:
        """Send ``message`` to the client, unless it has gone (the app goes on regardless)."""
        if self.client_gone:
            return
        try:
            await self._send(message)
        except OSError:
            # ASGI 2.4: send raises OSError once the client is gone. The app
            # goes on, so its result is still recorded for the retry.
            self.client_gone = True

    async def send(self, message: Message) -> None:
        """The app's ``send``: capture the answer, settle at its end, forward it."""
        kind = message["type"]
        if self.broken:
            if kind == "http.response.body" and self.start is not None and not self.start_sent:
                self.start_sent = True
                await self.forward(self.start)
            await self.forward(message)
            return
        capture = self.capture
        try:
            if kind == "http.response.start":
                self.start = message
                capture.start(message["status"], message.get("headers", ()))
                if capture.refusal is not None:
                    self.observation.response_refused(capture.refusal)
                return
            execution = self.execution
            if kind != "http.response.body" or self.start is None or execution.settled:
                await self.forward(message)
                return
            # self.transactional, read once for this message (commit is told it).
            transactional = isinstance(execution, AsyncTransactionalExecution) and execution.transactional_open
            if transactional:
                # Held until COMMIT returned: a transactional route never sends
                # what may yet roll back (TRANSACTIONAL.md, "fully buffered").
                capture.add(message.get("body", b""))
                self._held.append(message)
                if not message.get("more_body", False):
                    self.complete = True
                    if capture.settles_when_whole():
                        await self.commit(capture.settlement(complete=True), transactional=True)
                return
            capture.add(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True
                if capture.settles_when_whole():
                    await self.commit(capture.settlement(complete=True), transactional=False)
                else:
                    # The verdict waits for the app to return (an exception it
                    # raises after this answer decides it); so does the answer's
                    # end, or a client retrying as soon as it has the whole answer
                    # (a 500) would find the record not yet released: a 409.
                    self._last = message
                    self._wake()  # the response is whole: an app waiting for the disconnect may have it
                    return
        except Exception as exc:
            await self.broke(exc)
            if kind == "http.response.start":
                return
        # forward() twice, inlined: the status line held back (if still held), then this message.
        start = None
        if not self.start_sent and self.start is not None:
            self.start_sent = True
            start = self.start
        if self.client_gone:
            return
        try:
            if start is not None:
                await self._send(start)
            await self._send(message)
        except OSError:
            self.client_gone = True

    async def _send_last(self) -> None:
        """Send the answer's held end (and its status line, if still held), now that the record is settled."""
        last, self._last = self._last, None
        if last is None:
            return
        if self.start is not None and not self.start_sent:
            self.start_sent = True
            await self.forward(self.start)
        await self.forward(last)

    async def receive(self) -> Message:
        """The app's ``receive``: the body already read, then the server's messages.

        The client's departure is hidden until the response is complete, so
        frameworks that stop on disconnect (Starlette's ``StreamingResponse``)
        finish the work the lease stands for.
        """
        if self._body_pending:
            self._body_pending = False
            return {"type": "http.request", "body": self.body, "more_body": False}
        if self._last is not None:
            # The app waits on the client after its whole answer (a long-poll's
            # cleanup awaits the disconnect): the client needs the answer's end
            # to go, so it goes now, before the settle.
            await self._send_last()
        message = await self._receive()
        if message["type"] != "http.disconnect" or self.execution.settled or self.complete:
            return message
        if self._done is None:
            self._done = anyio.Event()
        await self._done.wait()
        return message

    def _wake(self) -> None:
        if self._done is not None:
            self._done.set()
