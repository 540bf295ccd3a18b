"""The proxy's forwarder over aiohttp's connector (``[upstream] client = "aiohttp"``, the default).

It forwards 4-7 times as many requests a second as the httpx forwarder on the
same core (the figures and why: :mod:`idempo.proxy.forwarder`).
:class:`AiohttpForwarder` keeps the promises of
:class:`~idempo.proxy.forwarder.HttpxForwarder` (read its module's docstring)
on aiohttp's ``ClientSession``, configured to be a reverse proxy's client and
nothing more:

- no cookie jar (``DummyCookieJar``): one user's ``Set-Cookie`` never reaches
  the next user's request (gradio GHSA-2mr9-9r47-px2g);
- ``trust_env=False``: no ``HTTP_PROXY``, no ``.netrc`` from the environment;
- no redirects followed, no status raised, ``auto_decompress=False``: the
  answer's body comes as the upstream sent it (a gzip body replays byte for byte);
- nothing added to the request: aiohttp's ``Accept``, ``Accept-Encoding``,
  ``User-Agent`` and ``Content-Type`` are skipped, and a request without a body
  gets no ``Content-Length: 0`` (:class:`_Request`). Two differences on the
  wire: aiohttp writes ``Host`` first, and a streamed body's
  ``Transfer-Encoding: chunked`` last (aiohttp sets it itself);
- nothing changed in it: aiohttp writes the request line and fields as UTF-8
  of ``str`` values, so each is given as its bytes decoded from UTF-8 (the
  same bytes go out). A request whose target or fields are not UTF-8 (a lone
  obs-text byte, RFC 9110 section 5.5) cannot go through aiohttp unchanged and
  goes through an :class:`~idempo.proxy.forwarder.HttpxForwarder` of its own,
  which writes bytes as they are (opened on the first such request);
- never a request sent twice: aiohttp resends a GET, PUT or DELETE on its own
  after ``ServerDisconnectedError`` or ``ClientOSError`` (``_request`` in
  ``aiohttp/client.py``, RFC 9112 section 9.3.1.1); here every failure leaves
  aiohttp's retry loop as an :class:`~idempo.proxy.forwarder.UpstreamFailure`
  (a client middleware), which it does not retry;
- the failure classified as precisely as httpx's: an exchange that failed
  before the connector handed out a connection is ``connect-error`` (or
  ``pool-timeout`` when no connection was free within ``pool_timeout``): never
  sent; after that, ``write-error`` (the request line and headers did not go
  out whole), ``read-error`` (a socket error or ``sock_read`` timeout while
  reading), ``protocol-error`` (the upstream closed before answering, or sent
  something that is not HTTP, or a body shorter than its length);
- a connection that carried a 5xx is never reused (:class:`_Response`), and
  a pooled connection is looked at again when the connector hands it out: one
  the upstream has closed (its FIN already in the kernel, not yet seen by the
  event loop), or that has unread bytes, is closed and another taken, before
  any byte of the request was written (:class:`_GuardedConnector`);
- keep-alive: idle connections are closed after ``keepalive_expiry``
  (aiohttp's ``keepalive_timeout``). aiohttp has no cap on idle connections
  below ``max_connections``: ``max_keepalive_connections`` is only applied
  when it is 0 (no keep-alive: every connection is closed after its answer,
  with ``Connection: close`` sent).

Timeouts: ``connect_timeout`` is aiohttp's ``sock_connect``, ``deadline`` its
``sock_read`` (and the proxy enforces ``deadline`` as a total itself);
``pool_timeout`` bounds the wait for one of ``max_connections`` slots.
"""

from __future__ import annotations

import asyncio
import select
import weakref
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import hdrs
from aiohttp.client_proto import ResponseHandler
from yarl import URL

from .config import UpstreamSettings, UpstreamTarget
from .forwarder import (
    Headers,
    HttpxForwarder,
    UpstreamFailure,
    UpstreamResponse,
    failure_class,
    note_unsent,
    ssl_context,
)

__all__ = ["AiohttpForwarder"]

#: The request headers aiohttp adds when they are missing; the proxy sends the client's as they came.
_AUTO_HEADERS = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)
#: httpcore's limit on a response's header block (h11's max_incomplete_event_size there), per line here.
_MAX_HEADER_BYTES = 100 * 1024
_MAX_HEADERS = 1000


class _Request(aiohttp.ClientRequest):
    """aiohttp's request, which adds no ``Content-Length: 0`` to a request without a body.

    Attributes:
        connected: True once the connector handed out a connection for it
            (before that, nothing of it was sent).
    """

    connected = False

    def update_body_from_data(self, body: Any, *args: Any, **kwargs: Any) -> None:
        if body is None:  # no body: no framing header (aiohttp adds Content-Length: 0 to a POST)
            self._body = None
            return
        super().update_body_from_data(body, *args, **kwargs)


class _Response(aiohttp.ClientResponse):
    """aiohttp's response, whose connection is not reused when it carried a 5xx.

    An upstream that failed may close the connection right after its answer
    (uvicorn does, when a Starlette app raised): a keyed request written to it
    next would become an unknown outcome. ``force_close`` makes aiohttp close it
    when it is released; one already released (an answer with an empty body is
    released inside ``start``) is refused by :class:`_GuardedConnector`.
    """

    async def start(self, connection: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
        protocol = connection.protocol
        await super().start(connection)
        if self.status >= 500 and protocol is not None:
            protocol.force_close()
        return self


def _stale(protocol: ResponseHandler) -> bool:
    """True when a pooled connection must carry no request: closing, marked, or readable while idle."""
    if protocol.should_close:
        return True
    transport = protocol.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    # Readable while idle: the upstream's FIN (or bytes nobody asked for) arrived, and the
    # event loop has not run since. poll, not select: descriptors above 1023 are fine.
    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class _GuardedConnector(aiohttp.BaseConnector):
    """A connector that never hands out a pooled connection the upstream has closed (see :func:`_stale`).

    A connection seen for the first time is fresh: whatever happens to it is
    the request's. One handed out before is checked; a stale one is closed and
    the next one taken (or a new one opened), before a byte of the request went.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._carried: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> aiohttp.connector.Connection:
        while True:
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            if protocol is not None:
                if protocol in self._carried:
                    if _stale(protocol):
                        connection.close()
                        continue
                else:
                    self._carried.add(protocol)
            if isinstance(req, _Request):
                req.connected = True
            note_unsent(None)
            return connection


class _TCPConnector(_GuardedConnector, aiohttp.TCPConnector):
    """aiohttp's TCP connector, guarded."""


class _UnixConnector(_GuardedConnector, aiohttp.UnixConnector):
    """aiohttp's Unix socket connector, guarded."""


def _failure(request: aiohttp.ClientRequest, exc: Exception) -> UpstreamFailure:
    """The failure an exception of ``session.request`` stands for (see the module docstring)."""
    message = f"{type(exc).__name__}: {exc}"
    if not (isinstance(request, _Request) and request.connected):
        return failure_class("connect-error")(message)
    if request.response is None:  # the request line and headers were being written
        return failure_class("write-error")(message)
    return _read_failure(exc, message)


def _read_failure(exc: BaseException, message: str) -> UpstreamFailure:
    """The failure of an exchange whose request was written (or being written) and whose answer was awaited."""
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's SocketTimeoutError: sock_read
        return failure_class("read-error")(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return failure_class("protocol-error")(message)
    if isinstance(exc, aiohttp.ClientConnectionError):
        # aiohttp's body writer sets its own failure on the connection, read back here.
        writing = "request body" in str(exc) or "send bytes" in str(exc)
        if writing or isinstance(exc, aiohttp.ClientConnectionResetError):
            return failure_class("write-error")(message)
        if isinstance(exc, OSError):
            return failure_class("read-error")(message)
    return failure_class("protocol-error")(message)


async def _classify(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """aiohttp client middleware: every failure of an exchange leaves as an :class:`UpstreamFailure`.

    Which also keeps aiohttp from resending the request: its retry loop catches
    only its own connection errors.
    """
    try:
        return await handler(request)
    except UpstreamFailure:
        raise
    except Exception as exc:
        raise _failure(request, exc) from exc


class _AiohttpResponse:
    """An aiohttp response as an :class:`~idempo.proxy.forwarder.UpstreamResponse`."""

    __slots__ = ("_release", "_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, release: asyncio.Semaphore) -> None:
        self._response = response
        self._release: asyncio.Semaphore | None = release
        self.status: int = response.status
        self.headers: Headers = [(name.lower(), value) for name, value in response.raw_headers]

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except Exception as exc:
            raise _read_failure(exc, f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        # A body read to its end has already given the connection back; one that
        # was not is closed (aiohttp: a connection whose payload is unread is not reused).
        self._response.release()
        if self._release is not None:
            self._release.release()
            self._release = None


class AiohttpForwarder:
    """A :class:`~idempo.proxy.forwarder.Forwarder` over an aiohttp connector (HTTP/1.1, pooled).

    Args:
        target: the upstream (``http``, ``https`` or ``unix:``).
        settings: the ``[upstream]`` table (see the module docstring for what
            each setting is in aiohttp's terms).

    The session is opened on the first request (aiohttp binds it to the running
    event loop), and closed by :meth:`aclose`.
    """

    def __init__(self, target: UpstreamTarget, settings: UpstreamSettings) -> None:
        self._target = target
        self._settings = settings
        self._base = target.base_url
        self._host = URL(target.base_url).raw_authority.encode("latin-1")
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._bytes_forwarder: HttpxForwarder | None = None  # for requests that are not UTF-8

    @property
    def host(self) -> bytes:
        """The upstream's ``host[:port]``, the ``Host`` of a request that came without one."""
        return self._host

    def _open(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        settings = self._settings
        pool: dict[str, Any] = {"limit": settings.max_connections}
        if settings.keepalive_expiry <= 0 or settings.max_keepalive_connections == 0:
            pool["force_close"] = True
        else:
            pool["keepalive_timeout"] = settings.keepalive_expiry
        connector: aiohttp.BaseConnector
        if self._target.uds is not None:
            connector = _UnixConnector(path=self._target.uds, **pool)
        else:
            tls = ssl_context(settings.verify) if self._base.startswith("https:") else True
            connector = _TCPConnector(ssl=tls, **pool)
        session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            raise_for_status=False,
            requote_redirect_url=False,
            skip_auto_headers=_AUTO_HEADERS,
            request_class=_Request,
            response_class=_Response,
            timeout=aiohttp.ClientTimeout(
                total=None,
                # The pool's wait is bounded by the slots below (pool-timeout); this is a backstop.
                connect=settings.pool_timeout + settings.connect_timeout,
                sock_connect=settings.connect_timeout,
                sock_read=settings.deadline,
            ),
            max_line_size=_MAX_HEADER_BYTES,
            max_field_size=_MAX_HEADER_BYTES,
            max_headers=_MAX_HEADERS,
            middlewares=(_classify,),
        )
        self._session = session
        self._slots = asyncio.Semaphore(settings.max_connections)
        return session, self._slots

    async def send(
        self, method: str, target: bytes, headers: Headers, body: bytes | AsyncIterator[bytes]
    ) -> UpstreamResponse:
        """See :meth:`~idempo.proxy.forwarder.Forwarder.send`."""
        try:
            # aiohttp writes the head as UTF-8: fields decoded from UTF-8 go out as the client's bytes.
            fields = [(name.decode(), value.decode()) for name, value in headers if name != b"transfer-encoding"]
            path = target.decode()
        except UnicodeDecodeError:  # bytes aiohttp cannot write unchanged (module docstring)
            if self._bytes_forwarder is None:
                self._bytes_forwarder = HttpxForwarder(self._target, self._settings)
            return await self._bytes_forwarder.send(method, target, headers, body)
        if self._session is None or self._slots is None:
            session, slots = self._open()
        else:
            session, slots = self._session, self._slots
        note_unsent("pool-timeout")
        if slots.locked():
            try:
                async with asyncio.timeout(self._settings.pool_timeout):
                    await slots.acquire()
            except TimeoutError:
                raise failure_class("pool-timeout")(
                    f"no connection to the upstream free within {self._settings.pool_timeout} s"
                ) from None
        else:
            await slots.acquire()
        note_unsent("connect-error")
        try:
            # Transfer-Encoding is left out above: aiohttp frames a body of unknown length
            # itself (and refuses the field beside it).
            data = None if body == b"" else body
            url = URL(self._base + path, encoded=True)
            try:
                response = await session.request(method, url, headers=fields, data=data, allow_redirects=False)
            except UpstreamFailure:
                raise
            except Exception as exc:  # refused before the middleware (a bad URL or header): nothing was sent
                raise failure_class("protocol-error")(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            slots.release()
            raise
        return _AiohttpResponse(response, slots)

    async def aclose(self) -> None:
        """See :meth:`~idempo.proxy.forwarder.Forwarder.aclose`."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._bytes_forwarder is not None:
            await self._bytes_forwarder.aclose()
            self._bytes_forwarder = None
