"""WSGI middleware: idempotency for any WSGI app (Flask, Django, Pyramid, Bottle, ...).

::

    from flask import Flask
    from idempo import Policy
    from idempo.wsgi import IdempotencyMiddleware

    app = Flask(__name__)
    app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, "sqlite:///idempo.db", policy=Policy(require_key=True))

The behaviour is the ASGI middleware's (:mod:`idempo.asgi`), rule for rule:
both ask :mod:`idempo._core.http` what to answer, and this one drives the
protocol against a blocking :class:`~idempo.typing.Store` with
:func:`idempo._engine.begin.begin_sync`. What is particular to WSGI (PEP 3333):

- The request body is read from ``wsgi.input`` (at most ``CONTENT_LENGTH``
  bytes, refused with 413 past ``Policy.max_request_body`` before reading)
  and handed to the app as a fresh ``io.BytesIO``.
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

import contextlib
import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import TypeVar
from wsgiref.types import StartResponse as StartResponse
from wsgiref.types import WSGIApplication, WSGIEnvironment

from ._core.flow import LegacyIdentity, Proceed
from ._core.http import (
    BYPASSED_HEADER,
    ResponseCapture,
    RouteTable,
    body_incomplete_answer,
    body_too_large_answer,
    check_key,
    content_type_of,
    decision_answer,
    legacy_identity,
    principal_required_answer,
    request_identity,
    store_unavailable_answer,
)
from ._core.keys import split_folded
from ._core.policy import Policy, Verdict
from ._core.records import StoredResponse
from ._engine.begin import Legacy, begin_sync
from ._engine.execution import Execution
from .exceptions import StoreError
from .observability import Outcome, RequestObservation, logger, observe_request
from .principals import default as default_principal
from .principals import legacy_principal
from .secrets import SecretSource
from .stores import store_from_url
from .typing import Store

__all__ = [
    "EXCHANGE_ENVIRON_KEY",
    "BodyIncomplete",
    "CapturedBody",
    "IdempotencyMiddleware",
    "default_principal",
    "read_body",
    "report_exception",
    "request_path",
]

Environ = WSGIEnvironment
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
Write = Callable[[bytes], object]
WSGIApp = WSGIApplication

#: Resolves the principal (who sent the request) from the WSGI environ.
PrincipalResolver = Callable[[Environ], "str | None"]

#: The environ key under which the middleware leaves the state of a request it
#: executes; :func:`report_exception` reads it.
EXCHANGE_ENVIRON_KEY = "idempo.exchange"

_READ_CHUNK = 64 * 1024
# The Idempotency-Bypassed header line as WSGI (and Django) headers are: text.
_BYPASSED_HEADER = (BYPASSED_HEADER[0].decode("latin-1"), BYPASSED_HEADER[1].decode("latin-1"))


def report_exception(environ: Environ, exc: BaseException) -> None:
    """Tell the middleware that the handler raised ``exc`` though the framework answered anyway.

    Frameworks such as Flask catch a handler's exception and answer 500
    themselves, so the middleware never sees the exception. Reporting it lets
    ``Policy.exception_verdicts`` decide what happens to the record, as on
    ASGI; :class:`idempo.flask.Idempotency` does this for Flask. A no-op for
    requests the middleware does not execute.

    Args:
        environ: the request's WSGI environ.
        exc: the exception the handler raised.
    """
    exchange = environ.get(EXCHANGE_ENVIRON_KEY)
    if isinstance(exchange, _Exchange):
        exchange.reported = exc


def request_path(environ: Environ) -> str:
    """The request path as ASGI servers report it: ``SCRIPT_NAME + PATH_INFO``, URL-decoded, UTF-8.

    PEP 3333 hands the path as latin-1 text of the raw bytes; decoding the
    bytes as UTF-8 gives the path an ASGI server would (bytes that are not
    UTF-8 become U+FFFD), for route patterns and logs. Record keys and
    fingerprints keep those bytes (:func:`_undecoded`).
    """
    raw: str = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    try:
        return raw.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a server that already decoded it
        return raw


def _undecoded(raw: str) -> str | None:
    """PEP 3333's latin-1 text of a path decoded with its bytes kept, or None when they are UTF-8.

    Record keys and fingerprints are made of this path where it is not None:
    bytes that are not UTF-8 are kept (``surrogateescape``), so
    ``/files/%FF`` and ``/files/%FE`` differ, and the result equals the ASGI
    front's (:func:`idempo._core.http.identity_path`) for the same request. A
    UTF-8 path keeps the path it always had, so its record key never changes.
    """
    if raw.isascii():
        return None
    try:
        data = raw.encode("latin-1")
    except UnicodeEncodeError:  # a server that already decoded it
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", "surrogateescape")
    return None


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
        self.store: Store = store_from_url(store) if isinstance(store, str) else store
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
        """
        method: str = environ["REQUEST_METHOD"]
        if policy is None or method not in policy.methods:
            return app(environ, start_response)
        path = request_path(environ)
        admitted = _admit(
            self.store,
            policy,
            environ,
            environ,
            front="wsgi",
            route=route,
            method=method,
            path=path,
            identity_path=_undecoded(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")) or path,
            key_name=self._environ_key,
            principal=self.principal,
            read=_read_input,
            secret=self._secret,
        )
        if admitted is None:
            return app(environ, start_response)
        if isinstance(admitted, _Exchange):
            return self._execute(admitted, app, environ, start_response)
        if isinstance(admitted, StoredResponse):
            return _answer(start_response, admitted)
        return _run_bypassed(admitted, app, environ, start_response)

    def _execute(
        self, exchange: _Exchange, app: WSGIApp, environ: Environ, start_response: StartResponse
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


_Request = TypeVar("_Request")


@dataclass(frozen=True, slots=True)
class _Bypass:
    """A request the store failed to admit under a policy that fails open: the app runs unprotected.

    The front runs it without a lease, marks the answer ``Idempotency-Bypassed``
    and finishes ``observation`` as ``bypassed`` with ``error``.
    """

    observation: RequestObservation
    error: StoreError

    def finish(self, status: int | None) -> None:
        """The handler is done and answered ``status`` (None: nothing): finish the observation as ``bypassed``."""
        self.observation.handler_finished(status)
        self.observation.finish(Outcome.BYPASSED, error=self.error)


def _admit(
    store: Store,
    policy: Policy,
    request: _Request,
    environ: Environ,
    *,
    front: str,
    route: str,
    method: str,
    path: str,
    identity_path: str,
    key_name: str,
    principal: Callable[[_Request], str | None],
    read: Callable[[_Request, Policy], bytes | None],
    secret: SecretSource,
) -> StoredResponse | _Exchange | _Bypass | None:
    """Admit one request to a blocking store: the steps the WSGI and Django middlewares share.

    Reads the idempotency key (``key_name``), ``QUERY_STRING`` and
    ``CONTENT_TYPE`` from ``environ`` (Django's ``request.META``); asks
    ``principal(request)`` who sent it (None: 400) and ``read(request,
    policy)`` for the body (None past ``policy.max_request_body``: 413;
    :class:`BodyIncomplete`: 400); then runs ``begin``. The caller has
    checked that ``policy`` covers ``method``; ``front`` and ``route`` label
    the observation; ``path`` is shown in logs and problem details,
    ``identity_path`` (the same path with bytes that are not UTF-8 kept) makes
    the record key and the fingerprint.

    Returns:
        None to pass the request through untouched; a StoredResponse to answer
        without running the app (a replay, 400, 409, 413, 422, or 503 when the
        store failed and the policy fails closed), the observation finished;
        an ``_Exchange`` to run the app holding the lease; a :class:`_Bypass`
        when the store failed and the policy fails open.
    """
    raw_key = environ.get(key_name)
    key_values = [] if raw_key is None else split_folded(_latin1(raw_key))
    key = check_key(policy, method, path, key_values)
    if key is None:
        return None
    observation = observe_request(front, method, route, path)
    if isinstance(key, StoredResponse):
        observation.finish(Outcome.INVALID_KEY if key_values else Outcome.MISSING_KEY, key.status)
        return key
    raw_content_type = environ.get("CONTENT_TYPE")
    content_type = content_type_of([_latin1(raw_content_type)] if raw_content_type else [])
    if isinstance(content_type, StoredResponse):
        observation.finish(Outcome.CONTENT_TYPE_AMBIGUOUS, content_type.status)
        return content_type
    who = principal(request)
    if who is None:
        observation.finish(Outcome.NO_PRINCIPAL, 400)
        return principal_required_answer()
    try:
        body = read(request, policy)
    except BodyIncomplete:
        observation.finish(Outcome.BODY_INCOMPLETE, 400)
        return body_incomplete_answer()
    if body is None:
        observation.finish(Outcome.BODY_TOO_LARGE, 413)
        return body_too_large_answer(policy)

    query = environ.get("QUERY_STRING", "")
    try:
        digests = secret.digests or secret.load(store)
        identity = request_identity(policy, digests, who, method, identity_path, query, content_type, body, key)
        observation.identify(who, key, identity.record_key, digests)
        legacy = None
        if secret.legacy_possible():

            def old_identity() -> LegacyIdentity | None:
                # After a fresh lease: where a version before keyed digests kept the record.
                old = legacy_principal(request, principal, who)
                if old is None:
                    return None
                return legacy_identity(policy, old, method, path, query, content_type, body, key)

            legacy = Legacy(secret, old_identity)

        decision = begin_sync(store, identity.record_key, identity.fingerprint, policy, observation, legacy)
    except StoreError as exc:
        if policy.fail_open:
            return _Bypass(observation, exc)
        answer = store_unavailable_answer(policy)
        observation.finish(Outcome.STORE_ERROR, answer.status, exc)
        return answer
    if not isinstance(decision, Proceed):
        answer = decision_answer(decision)
        observation.finish(status=answer.status)
        return answer
    return _Exchange(store, policy, identity.record_key, decision.token, observation)


def _latin1(text: str) -> bytes:
    """A header's bytes from PEP 3333's latin-1 text (UTF-8 from a server that decoded it otherwise)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _read_input(environ: Environ, policy: Policy) -> bytes | None:
    """:func:`read_body` under the policy's limit; the body read is handed to the app as a fresh stream."""
    body = read_body(environ, policy.max_request_body)
    if body is not None:
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
    return body


def _run_bypassed(bypass: _Bypass, app: WSGIApp, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Run the app unprotected (the store failed, the policy fails open), its answer marked bypassed.

    The request's record says so: ``bypassed`` (WARNING), with the store's
    error, the handler's status and its time until the body ends
    (:class:`_BypassedBody`).
    """
    status: int | None = None

    def marked_start_response(
        status_line: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None, /
    ) -> Write:
        nonlocal status
        write = start_response(status_line, [*headers, _BYPASSED_HEADER], exc_info)
        # After the server's call: with exc_info once the headers are sent, it
        # re-raises and the status already sent stands.
        status = _status_code(status_line)
        return write

    bypass.observation.handler_started()
    try:
        body = app(environ, marked_start_response)
    except BaseException:
        bypass.finish(status)
        raise
    if isinstance(body, (list, tuple)) or _is_file_wrapper(environ, body):
        # A body already whole (or the server's own file wrapper): the app has
        # answered and done its work. Handed back as it is, the server keeps
        # its Content-Length for one chunk and its sendfile for a file.
        bypass.finish(status)
        return body
    # A body with a length keeps it: a server sets Content-Length from a
    # one-chunk body's len() (PEP 3333).
    wrapper = _SizedBypassedBody if hasattr(body, "__len__") else _BypassedBody
    return wrapper(bypass, body, lambda: status)


def _is_file_wrapper(environ: Environ, body: Iterable[bytes]) -> bool:
    """True when ``body`` is an instance of the server's ``wsgi.file_wrapper`` (PEP 3333's optional file handling)."""
    wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(wrapper, type) and isinstance(body, wrapper)


class _BypassedBody:
    """A bypassed answer's body as the server iterates it; the request's observation finishes at its end.

    A lazy app (a generator that calls ``start_response`` on its first
    iteration, a streamed response) works and answers while its body is
    iterated, so the handler's time and status are read once, when the body is
    exhausted, raises, or is closed (the client left), whichever comes first.
    :meth:`close` always closes the app's iterable; what the server left
    unread is not consumed: no record waits for it.

    Args:
        bypass: the bypassed request.
        body: the app's iterable.
        status: returns the status the app answered so far (None: none yet).
    """

    __slots__ = ("_body", "_bypass", "_done", "_iterator", "_status")

    def __init__(self, bypass: _Bypass, body: Iterable[bytes], status: Callable[[], int | None]) -> None:
        self._bypass = bypass
        self._body = body
        self._status = status
        self._iterator: Iterator[bytes] | None = None
        self._done = False

    def __iter__(self) -> _BypassedBody:
        return self

    def __next__(self) -> bytes:
        try:
            if self._iterator is None:
                self._iterator = iter(self._body)
            return next(self._iterator)
        except BaseException:
            # The end (StopIteration), the app's exception or a crash: the handler is done.
            self._finish()
            raise

    def close(self) -> None:
        """Close the app's iterable, then finish the observation if the body had not ended."""
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._bypass.finish(self._status())


class _SizedBypassedBody(_BypassedBody):
    """A :class:`_BypassedBody` over an iterable with a length, which it reports as its own."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._body)  # type: ignore[arg-type]


class _Exchange:
    """One executing request: its lease (an :class:`Execution`), the capture of its response, and its settling.

    Every step after the app started is run under :meth:`guard`: when
    idempo's own code fails (the capture, header encoding, the verdict, the
    settle, the observation), the record is released (or held, as the verdict
    says), renewals stop, the failure is logged, and the app's answer passes
    through untouched from there on.
    """

    __slots__ = ("capture", "execution", "observation", "policy", "reported", "started")

    def __init__(
        self, store: Store, policy: Policy, record_key: str, token: int, observation: RequestObservation
    ) -> None:
        self.policy = policy
        self.capture = ResponseCapture(policy)
        self.started = False
        self.reported: BaseException | None = None
        self.observation = observation
        self.execution = Execution(store, policy, record_key, token, observation)
        observation.handler_started()

    @property
    def settled(self) -> bool:
        """True once the record is settled (or idempo gave up capturing the answer)."""
        return self.execution.settled

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run idempo's own step of the exchange: a failure in it settles the record and is not raised."""
        try:
            yield
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: Exception) -> None:
        """idempo's own code failed after the app ran: log, settle by the failure, finish the observation."""
        if self.execution.settled:
            logger.debug("idempo: capturing the answer of record %s failed again: %r", self.execution.record_key, exc)
            return
        logger.error(
            "idempo: capturing the answer of record %s failed; the record is released",
            self.execution.record_key,
            exc_info=exc,
        )
        self.execution.fail(exc, self.capture.status if self.started else None)
        self._finish(None)

    def start(self, status: int | str, headers: Iterable[tuple[str, str]]) -> None:
        """Capture the status (a WSGI status line, or Django's code) and header lines (text, PEP 3333).

        A line that is not latin-1 text, or a status line that does not start
        with a code, is a response no server can send: it is never stored.
        """
        self.started = True
        capture = self.capture
        code = status if isinstance(status, int) else _status_code(status)
        try:
            lines = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        except (AttributeError, UnicodeEncodeError):
            capture.start(code, ())
            capture.refuse("a response header line is not latin-1 text (PEP 3333)")
        else:
            capture.start(code, lines)
        if code == 0:
            capture.refuse(f"the status line {str(status)[:64]!r} does not start with a status code")

    def abandon(self) -> None:
        """A crash (SystemExit, KeyboardInterrupt): settle nothing, stop renewing; the lease expires."""
        self.execution.abandon()
        self._finish(None)

    def settle(self, raised: BaseException | None = None) -> None:
        """Settle the record once: by the exception the app raised, else by the captured response.

        A response that is not stored, answered for an exception the
        framework reported (:func:`report_exception`), is settled by that
        exception's verdict, as on ASGI. Never raises.
        """
        execution = self.execution
        if execution.settled:
            return
        if raised is not None:
            self.observation.error = raised
            if self.capture.refusal is not None:
                # The server refused the answer (it raised): never stored, as any refused one.
                self.observation.response_refused(self.capture.refusal)
                execution.settle(None, Verdict.RELEASE)
            else:
                execution.fail(raised, self.capture.status if self.started else None)
            self._finish(self.capture.status if self.started else None)
            return
        try:
            capture = self.capture
            response: StoredResponse | None = None
            reason = None
            if capture.refusal is not None:
                # No server may send it: never stored.
                verdict = Verdict.RELEASE
                self.observation.response_refused(capture.refusal)
            elif not self.started:
                verdict = Verdict.RELEASE  # the body ended without a status line: nothing whole to store
            elif capture.verdict is not Verdict.STORE and self.reported is not None:
                verdict = self.policy.verdict_for_exception(self.reported)
                verdict = Verdict.RELEASE if verdict is Verdict.STORE else verdict
                reason = f"exception {type(self.reported).__name__}"
            else:
                response, verdict = capture.response(), capture.verdict
                reason = f"status {capture.status}"
            self.observation.handler_finished(capture.status if self.started else None)
            execution.settle(response, verdict, reason)
        except Exception as exc:
            logger.error("idempo: settling record %s failed", execution.record_key, exc_info=exc)
            execution.fail(exc, self.capture.status if self.started else None)
        self._finish(None)

    def _finish(self, status: int | None) -> None:
        observation = self.observation
        try:
            if observation.handler_seconds is None:
                observation.handler_finished(status)
            observation.finish()
        except Exception:  # an observation's failure must not undo a settle
            logger.exception("idempo: recording record %s failed", self.execution.record_key)


class CapturedBody:
    """The app's response body as the server iterates it: captured, and the record settled at its end.

    One chunk is held back until the next one exists, so the record is
    settled before the last chunk reaches the server (and the client).
    :meth:`close` finishes an iteration the server stopped early (the client
    left) and always closes the app's iterable.
    """

    __slots__ = ("_body", "_done", "_exchange", "_held", "_iterator")

    def __init__(self, exchange: _Exchange, body: Iterable[bytes]) -> None:
        self._exchange = exchange
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._held: bytes | None = None
        self._done = False

    def __iter__(self) -> CapturedBody:
        return self

    def __next__(self) -> bytes:
        exchange = self._exchange
        while not self._done:
            try:
                if self._iterator is None:
                    self._iterator = iter(self._body)
                chunk = next(self._iterator)
            except StopIteration:
                self._done = True
                exchange.settle()
                break
            except BaseException as exc:
                # The app's exception settles by its verdict; a crash (SystemExit,
                # KeyboardInterrupt) settles nothing: the side effect may be half
                # done, so the lease is left to expire (DESIGN, B03).
                self._done = True
                exchange.settle(exc)
                raise
            if not exchange.settled:
                try:
                    exchange.capture.add(chunk)
                except Exception as exc:
                    exchange.fail(exc)
            held, self._held = self._held, chunk
            if held is not None:
                return held
        held, self._held = self._held, None
        if held is None:
            raise StopIteration
        return held

    def close(self) -> None:
        """Consume what the server left unread, settle, and close the app's iterable."""
        try:
            if not self._done:
                logger.info("idempo: the server stopped reading the response (client gone); finishing it")
                self._held = None
                for _ in self:
                    pass
        finally:
            try:
                close = getattr(self._body, "close", None)
                if close is not None:
                    close()
            finally:
                # Whatever happened above, the record is settled and renewals stop.
                self._exchange.settle()


class BodyIncomplete(Exception):
    """``wsgi.input`` ended before ``CONTENT_LENGTH`` bytes: the client left mid-upload."""


def read_body(environ: Environ, limit: int) -> bytes | None:
    """Read the request body from ``wsgi.input``; None when it exceeds ``limit`` bytes.

    Raises:
        BodyIncomplete: the input ended before its declared length. Nothing
            may run on a partial body: its fingerprint would refuse the
            complete retry with 422.

    Reads at most ``CONTENT_LENGTH`` bytes (PEP 3333: never past it); a
    larger declared length is refused before reading. Without a length, the
    body is read to its end only when the server says the input is
    terminated (``wsgi.input_terminated``), else it is empty.
    """
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    declared = (environ.get("CONTENT_LENGTH") or "").strip()
    if declared:
        try:
            remaining = max(int(declared), 0)
        except ValueError:
            remaining = 0
        if remaining > limit:
            return None
    elif environ.get("wsgi.input_terminated"):
        remaining = limit + 1
    else:
        return b""
    chunks: list[bytes] = []
    size = 0
    while remaining > 0:
        chunk: bytes = stream.read(min(remaining, _READ_CHUNK))
        if not chunk:
            if declared:
                raise BodyIncomplete()
            break
        chunks.append(chunk)
        size += len(chunk)
        remaining -= len(chunk)
    if size > limit:
        return None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _status_line(status: int) -> str:
    """``201`` -> ``"201 Created"`` (a bare number for codes without a registered phrase)."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _answer(start_response: StartResponse, response: StoredResponse) -> list[bytes]:
    """Answer with a stored response or a problem: its status, headers (repeats kept) and body."""
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers]
    start_response(_status_line(response.status), headers)
    return [response.body]


def _status_code(status: str) -> int:
    """``"201 Created"`` -> 201; 0 when the status line does not start with a three-digit code."""
    if not isinstance(status, str):
        return 0
    code = status[:3]
    if len(code) == 3 and code.isdigit() and code.isascii() and status[3:4] in ("", " "):
        return int(code)
    return 0
