"""The WSGI front's I/O, shared by the WSGI middleware and the Django middleware.

Reading ``wsgi.input`` (:func:`read_body`), the request path as ASGI servers
report it, answering through ``start_response``, running an app
unprotected when the store failed and the policy fails open
(:func:`run_bypassed`), and :class:`Exchange`: one request run under the
lease, its answer captured through ``start_response`` and while the server
iterates the body (:class:`CapturedBody`), and its record settled once.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from types import TracebackType
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from .._core.capture import ResponseCapture, Settlement
from .._core.http import BYPASSED_HEADER, identity_path
from .._core.policy import Policy, Verdict
from .._core.problems import (
    COMMIT_FAILED,
    TRANSACTIONAL_RESPONSE_TOO_LARGE,
    TRANSACTION_CONFLICT,
    problem_response,
)
from .._core.records import StoredResponse
from .._engine._sync.drivers import TransactionalExecution
from .._engine.execution import Execution
from ..observability._observation import RequestObservation, logger
from .admission import BodyIncomplete, Bypass

__all__ = [
    "BYPASSED_HEADER_TEXT",
    "EXCHANGE_ENVIRON_KEY",
    "BypassedBody",
    "CapturedBody",
    "Environ",
    "ExcInfo",
    "Exchange",
    "SizedBypassedBody",
    "StartResponse",
    "WSGIApp",
    "Write",
    "answer",
    "header_bytes",
    "identity_path_of",
    "is_file_wrapper",
    "read_body",
    "raw_target",
    "read_input",
    "report_exception",
    "request_path",
    "run_bypassed",
    "status_code",
    "status_line",
    "undecoded_path",
]

Environ = WSGIEnvironment
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
Write = Callable[[bytes], object]
WSGIApp = WSGIApplication

#: The environ key under which the middleware leaves the :class:`Exchange` of
#: a request it executes; :func:`report_exception` reads it.
EXCHANGE_ENVIRON_KEY = "idempo.exchange"

_READ_CHUNK = 64 * 1024
#: The Idempotency-Bypassed header line as WSGI (and Django) headers are: text.
BYPASSED_HEADER_TEXT = (BYPASSED_HEADER[0].decode("latin-1"), BYPASSED_HEADER[1].decode("latin-1"))


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
    if isinstance(exchange, Exchange):
        exchange.reported = exc


def request_path(environ: Environ) -> str:
    """The request path as ASGI servers report it: ``SCRIPT_NAME + PATH_INFO``, URL-decoded, UTF-8.

    PEP 3333 hands the path as latin-1 text of the raw bytes; decoding the
    bytes as UTF-8 gives the path an ASGI server would (bytes that are not
    UTF-8 become U+FFFD), for route patterns and logs. Record keys and
    fingerprints keep those bytes (:func:`undecoded_path`).
    """
    raw: str = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    try:
        return raw.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a server that already decoded it
        return raw


def undecoded_path(raw: str) -> str | None:
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


def identity_path_of(environ: Environ) -> str:
    """The path a record key and fingerprint are made of (WSGI).

    ``SCRIPT_NAME + PATH_INFO`` with bytes that are not UTF-8 kept
    (:func:`undecoded_path`), and an encoded slash (``/a%2Fb``, which
    ``PATH_INFO`` decodes to ``/a/b``) kept from the request target as sent
    (:func:`raw_target`), as the ASGI front keeps it from ``raw_path``
    (:func:`idempo._core.http.identity_path`). A server that passes no raw
    target leaves ``/a%2Fb`` and ``/a/b`` one resource: it cannot tell them apart.
    """
    raw: str = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return identity_path(undecoded_path(raw) or request_path(environ), raw_target(environ))


def raw_target(environ: Environ) -> bytes | None:
    """The path of the request target as the client sent it, escapes not decoded; None when the server gives none.

    From ``REQUEST_URI`` (waitress, Werkzeug) or ``RAW_URI`` (gunicorn,
    Werkzeug): its query is cut off, and an absolute-form target (RFC 9112
    section 3.2.2) gives its path.
    """
    target = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if not isinstance(target, str):
        return None
    target = target.split("?", 1)[0].split("#", 1)[0]
    if not target.startswith("/"):
        target = "/" + target.split("://", 1)[-1].partition("/")[2]
    return header_bytes(target)


def header_bytes(text: str) -> bytes:
    """A header's bytes from PEP 3333's latin-1 text (UTF-8 from a server that decoded it otherwise)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def read_input(environ: Environ, policy: Policy) -> bytes | None:
    """:func:`read_body` under the policy's limit; the body read is handed to the app as a fresh stream."""
    body = read_body(environ, policy.max_request_body)
    if body is not None:
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
    return body


def run_bypassed(bypass: Bypass, app: WSGIApp, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Run the app unprotected (the store failed, the policy fails open), its answer marked bypassed.

    The request's record says so: ``bypassed`` (WARNING), with the store's
    error, the handler's status and its time until the body ends
    (:class:`BypassedBody`).
    """
    status: int | None = None

    def marked_start_response(
        status_line: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None, /
    ) -> Write:
        nonlocal status
        write = start_response(status_line, [*headers, BYPASSED_HEADER_TEXT], exc_info)
        # After the server's call: with exc_info once the headers are sent, it
        # re-raises and the status already sent stands.
        status = status_code(status_line)
        return write

    bypass.observation.handler_started()
    try:
        body = app(environ, marked_start_response)
    except BaseException:
        bypass.finish(status)
        raise
    if isinstance(body, (list, tuple)) or is_file_wrapper(environ, body):
        # A body already whole (or the server's own file wrapper): the app has
        # answered and done its work. Handed back as it is, the server keeps
        # its Content-Length for one chunk and its sendfile for a file.
        bypass.finish(status)
        return body
    # A body with a length keeps it: a server sets Content-Length from a
    # one-chunk body's len() (PEP 3333).
    wrapper = SizedBypassedBody if hasattr(body, "__len__") else BypassedBody
    return wrapper(bypass, body, lambda: status)


def is_file_wrapper(environ: Environ, body: Iterable[bytes]) -> bool:
    """True when ``body`` is an instance of the server's ``wsgi.file_wrapper`` (PEP 3333's optional file handling)."""
    wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(wrapper, type) and isinstance(body, wrapper)


class BypassedBody:
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

    def __init__(self, bypass: Bypass, body: Iterable[bytes], status: Callable[[], int | None]) -> None:
        self._bypass = bypass
        self._body = body
        self._status = status
        self._iterator: Iterator[bytes] | None = None
        self._done = False

    def __iter__(self) -> BypassedBody:
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


class SizedBypassedBody(BypassedBody):
    """A :class:`BypassedBody` over an iterable with a length, which it reports as its own."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._body)  # type: ignore[arg-type]


class Exchange:
    """One request run under the lease: its :class:`Execution`, the capture of its answer, and its settling.

    Every step after the app started is run under :meth:`guard`: when
    idempo's own code fails (the capture, header encoding, the verdict, the
    settle, the observation), the record is released (or held, as the verdict
    says), renewals stop, the failure is logged, and the app's answer passes
    through untouched from there on. :meth:`commit` is the one point where
    the answer's verdict reaches the store.

    Args:
        execution: the request's lease.
        observation: the request's observation; told the handler started now,
            finished when the record is settled.
        policy: the route's policy.
    """

    __slots__ = ("capture", "execution", "observation", "reported", "started")

    def __init__(self, execution: Execution, observation: RequestObservation, policy: Policy) -> None:
        self.capture = ResponseCapture(policy)
        self.started = False
        #: The exception a framework reported for the handler (:func:`report_exception`).
        self.reported: BaseException | None = None
        self.observation = observation
        self.execution = execution
        observation.handler_started()

    @property
    def settled(self) -> bool:
        """True once the record is settled (or idempo gave up capturing the answer)."""
        return self.execution.settled

    @property
    def status(self) -> int | None:
        """The status the app answered, once it started answering."""
        return self.capture.status if self.started else None

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run idempo's own step of the exchange: a failure in it settles the record and is not raised."""
        try:
            yield
        except Exception as exc:
            self.broke(exc)

    def broke(self, exc: Exception) -> None:
        """idempo's own code failed after the app ran: log, settle by the failure, finish the observation."""
        if self.execution.settled:
            logger.debug("idempo: capturing the answer of record %s failed again: %r", self.execution.record_key, exc)
            return
        logger.error(
            "idempo: capturing the answer of record %s failed; the record is released",
            self.execution.record_key,
            exc_info=exc,
        )
        self.execution.fail(exc, self.status)
        self._finish(None)

    def start(self, status: int | str, headers: Iterable[tuple[str, str]]) -> None:
        """Capture the status (a WSGI status line, or Django's code) and header lines (text, PEP 3333).

        A line that is not latin-1 text, or a status line that does not start
        with a code, is a response no server can send: it is never stored.
        """
        self.started = True
        capture = self.capture
        code = status if isinstance(status, int) else status_code(status)
        try:
            lines = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        except (AttributeError, UnicodeEncodeError):
            capture.start(code, ())
            capture.refuse("a response header line is not latin-1 text (PEP 3333)")
        else:
            capture.start(code, lines)
        if code == 0:
            capture.refuse(f"the status line {str(status)[:64]!r} does not start with a status code")

    def abandon(self, crash: BaseException) -> None:
        """A crash (SystemExit, KeyboardInterrupt): settle nothing, stop renewing; the lease expires.

        An open transaction is given back broken (rolled back): ``fail`` with a crash.
        """
        self.execution.fail(crash)
        self._finish(None)

    def settle(self, raised: BaseException | None = None) -> None:
        """Settle the record once: by the exception the app raised, else by the captured answer.

        The answer is settled by :meth:`ResponseCapture.settlement`: a
        response that is not stored, answered for an exception the framework
        reported (:func:`report_exception`), is settled by that exception's
        verdict, as on ASGI. Never raises.
        """
        execution = self.execution
        if execution.settled:
            return
        if raised is not None:
            self.observation.error = raised
            self.fail(raised)
            self._finish(self.status)
            return
        try:
            settlement = self.capture.settlement(complete=self.started, reported=self.reported)
            self.observation.handler_finished(self.status)
            self.commit(settlement)
        except Exception as exc:
            logger.error("idempo: settling record %s failed", execution.record_key, exc_info=exc)
            execution.fail(exc, self.status)
        self._finish(None)

    def fail(self, exc: BaseException) -> None:
        """The app raised: settle by the exception's verdict (a response no server may send is released)."""
        if self.capture.refusal is not None:
            # The server refused the answer (it raised): never stored, as any refused one.
            self.commit(Settlement(None, Verdict.RELEASE, None))
        else:
            self.execution.fail(exc, self.status)

    def commit(self, settlement: Settlement) -> None:
        """Settle the record by ``settlement``: the one point the answer's verdict reaches the store."""
        if self.capture.refusal is not None:
            # No server may send it: never stored.
            self.observation.response_refused(self.capture.refusal)
        self.execution.settle(settlement.response, settlement.verdict, settlement.reason)

    @property
    def transactional(self) -> bool:
        """Whether the handler runs in the execution's transaction (the answer is held until COMMIT)."""
        execution = self.execution
        return isinstance(execution, TransactionalExecution) and execution.transactional_open

    def settle_transaction(self, rolled_back: bool = False) -> StoredResponse | None:
        """COMMIT or roll back the handler's transaction once its whole answer is captured.

        The WSGI twin of the ASGI exchange's commit path: the captured answer's
        verdict settles the record (a stored verdict completes it as the
        transaction's last statement, then COMMIT; release or hold roll back
        first). An answer over ``max_response_body`` cannot be held until
        COMMIT: rolled back, released. A conflict the handler's own statement
        raised (40001, 40P01, 55P03, SQLite busy) is rolled back and released.
        Never raises.

        Args:
            rolled_back: the handler marked its own transaction for rollback
                (Django's ``transaction.set_rollback(True)``): nothing of it can
                commit, so the record is released (after the ROLLBACK, on the
                same connection) and the answer goes out unstored.

        Returns:
            The problem to send instead of the app's answer (409 lease-lost,
            503 transaction-conflict or commit-unknown, 500 commit-failed or
            transactional-response-too-large); None to send the app's answer.
        """
        execution = self.execution
        assert isinstance(execution, TransactionalExecution)
        if execution.settled:
            # idempo's own step failed after the handler ran: rolled back and
            # released already, so the app's answer describes writes that are gone.
            return problem_response(COMMIT_FAILED, "The transaction was rolled back.")
        capture = self.capture
        problem: StoredResponse | None = None
        try:
            if capture.too_large:
                problem = problem_response(
                    TRANSACTIONAL_RESPONSE_TOO_LARGE,
                    f"The response exceeds {execution.policy.max_response_body} bytes.",
                )
                settlement = Settlement(None, Verdict.RELEASE, None)
            elif rolled_back:
                settlement = Settlement(None, Verdict.RELEASE, None)
            elif self.reported is not None and self._conflict(self.reported):
                problem = problem_response(
                    TRANSACTION_CONFLICT,
                    "The database rolled the transaction back to resolve a conflict.",
                    retry_after=1,
                )
                settlement = Settlement(None, Verdict.RELEASE, None)
            else:
                settlement = capture.settlement(complete=self.started, reported=self.reported)
            self.observation.handler_finished(self.status)
            self.commit(settlement)
        except Exception as exc:
            logger.error("idempo: settling the transaction of record %s failed", execution.record_key, exc_info=exc)
            execution.fail(exc, self.status)
            problem = problem_response(COMMIT_FAILED, "The transaction was rolled back.")
        problem = problem or execution.problem()
        if problem is not None:
            self.observation.answered_instead(problem.status)
        self._finish(None)
        return problem

    def _conflict(self, exc: BaseException) -> bool:
        execution = self.execution
        assert isinstance(execution, TransactionalExecution)
        try:
            return bool(execution.used.kind(exc) == "conflict")
        except Exception:
            return False

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

    def __init__(self, exchange: Exchange, body: Iterable[bytes]) -> None:
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
                    exchange.broke(exc)
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


def status_line(status: int) -> str:
    """``201`` -> ``"201 Created"`` (a bare number for codes without a registered phrase)."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def answer(start_response: StartResponse, response: StoredResponse) -> list[bytes]:
    """Answer with a stored response or a problem: its status, headers (repeats kept) and body."""
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers]
    start_response(status_line(response.status), headers)
    return [response.body]


def status_code(status: str) -> int:
    """``"201 Created"`` -> 201; 0 when the status line does not start with a three-digit code."""
    if not isinstance(status, str):
        return 0
    code = status[:3]
    if len(code) == 3 and code.isdigit() and code.isascii() and status[3:4] in ("", " "):
        return int(code)
    return 0
