"""The proxy's connection to the upstream: a small interface, and its httpx implementation.

:class:`Forwarder` is what the proxy's engine (:mod:`idempo.proxy.app`) asks
of an HTTP client: send one request, give back the answer's status, headers
and raw body, and say precisely how an exchange failed. :class:`HttpxForwarder`
drives httpx's ``AsyncHTTPTransport`` directly, not ``AsyncClient``: the client
keeps a cookie jar that would carry one user's ``Set-Cookie`` into the next
user's request (gradio GHSA-2mr9-9r47-px2g), reads ``HTTP_PROXY`` from the
environment and follows redirects on request; a reverse proxy wants none of
that. :class:`~idempo.proxy.aiohttp_forwarder.AiohttpForwarder` (an aiohttp
connector, httpx#3215) keeps the same promises behind the same interface;
``[upstream] client`` picks one (:func:`idempo.proxy.app.create_forwarder`).

**aiohttp is the default, httpx the alternative.** In the proxy bench (one
core for the proxy, wrk's 32 connections; bench/README.md, results
``20261206-013127-proxy``), with idempotency off the httpx forwarder did 351
GET and 385 POST req/s, aiohttp's 1590 and 2774 (4.6x and 7.2x); with the
memory store, (a) unique keys 328 against 808 req/s. httpcore's pool walks
every pooled connection on each request and each answer, asking each whether
it expired (a socket readability check through anyio's attributes): 52 % of
the proxy's samples under load, its cost growing with the pool. aiohttp's pool
takes the oldest idle connection and checks only that one.

Every failure is an :class:`UpstreamFailure` naming one of
:data:`~idempo.proxy.config.FAILURES`. ``connect-error`` and ``pool-timeout``
mean the request was never sent, so a retry may safely send it; every other
failure may have reached the upstream, whose outcome the proxy cannot know.

A pooled connection carries a keyed request only while the upstream can still
read it. httpcore already closes a connection whose answer said
``Connection: close`` (h11 leaves it ``MUST_CLOSE``) and, when it picks an idle
one, drops it if the socket is readable (the upstream's FIN arrived:
``has_expired()`` in ``httpcore/_async/http11.py``). Two cases slip past that
check, and each turned a retry into an unknown outcome (a held key):

- the upstream answers a 5xx whole and then closes, a moment later: uvicorn
  does so when a Starlette or FastAPI app raises (``ServerErrorMiddleware``
  sends the 500, then re-raises, and uvicorn closes the connection). A
  connection that carried a 5xx is therefore never reused;
- the upstream closes an idle connection after the pool picked it but before
  the request's first byte was written. The proxy looks again at that
  moment, and a first write that fails means the same: nothing of the request
  went out, so httpcore's pool is told the connection is not available
  (``ConnectionNotAvailable``) and sends the request on another one. A
  connection that breaks after the first byte was written is never retried:
  that outcome is unknown.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from contextvars import ContextVar
from typing import Any, Protocol

import httpcore
import httpx

from .config import FAILURES_NOT_SENT, UpstreamSettings, UpstreamTarget

__all__ = [
    "Attempt",
    "Forwarder",
    "HttpxForwarder",
    "UpstreamFailure",
    "UpstreamResponse",
    "failure_class",
    "note_unsent",
    "ssl_context",
]

Headers = list[tuple[bytes, bytes]]


class UpstreamFailure(Exception):
    """An exchange with the upstream failed; :attr:`kind` says how.

    One subclass per failure name (:func:`failure_class`), so that a route's
    ``outcomes`` become :class:`~idempo.Policy` exception verdicts.

    Attributes:
        kind: the failure's name (:data:`~idempo.proxy.config.FAILURES`):
            ``connect-error``, ``pool-timeout``, ``write-error``, ``read-error``,
            ``protocol-error`` or ``deadline``.
        sent: False for the failures whose request was never sent
            (``connect-error``, ``pool-timeout``).
    """

    kind = "protocol-error"

    @property
    def sent(self) -> bool:
        """True when the request may have reached the upstream (its outcome is unknown)."""
        return self.kind not in FAILURES_NOT_SENT


def _make_failure_classes() -> dict[str, type[UpstreamFailure]]:
    classes: dict[str, type[UpstreamFailure]] = {}
    for kind in ("connect-error", "pool-timeout", "write-error", "read-error", "protocol-error", "deadline"):
        name = "Upstream" + "".join(part.capitalize() for part in kind.split("-"))
        classes[kind] = type(name, (UpstreamFailure,), {"kind": kind, "__doc__": f"The ``{kind}`` failure."})
    return classes


_FAILURE_CLASSES = _make_failure_classes()


def failure_class(kind: str) -> type[UpstreamFailure]:
    """The :class:`UpstreamFailure` subclass of a failure name.

    Raises:
        KeyError: ``kind`` is not one of :data:`~idempo.proxy.config.FAILURES`.
    """
    return _FAILURE_CLASSES[kind]


class Attempt:
    """How far one exchange got, as its forwarder tells the proxy: what the proxy's deadline ended.

    The proxy's total deadline (``upstream.deadline``) cancels an exchange
    wherever it is. While the forwarder still waits for a pool slot or a
    connection, nothing of the request was written: the exchange is then a
    ``pool-timeout`` or ``connect-error`` (released), not a ``deadline`` (held).

    Attributes:
        unsent: the failure to name while nothing of the request was written
            (``pool-timeout``, ``connect-error``); None once a connection
            carries it, and for a forwarder that tells nothing (the outcome is
            then unknown).
    """

    __slots__ = ("unsent",)

    def __init__(self) -> None:
        self.unsent: str | None = None


#: The :class:`Attempt` of the exchange the current task runs (set by the proxy around ``send``).
ATTEMPT: ContextVar[Attempt | None] = ContextVar("idempo_proxy_attempt", default=None)


def note_unsent(kind: str | None) -> None:
    """Tell the proxy how the current exchange would fail if it ended now: ``kind``, or None (it may be sent)."""
    attempt = ATTEMPT.get()
    if attempt is not None:
        attempt.unsent = kind


class UpstreamResponse(Protocol):
    """An upstream's answer whose body has not been read yet."""

    @property
    def status(self) -> int:
        """The status code."""

    @property
    def headers(self) -> Headers:
        """The header fields as sent (lower-case names, repeats kept, hop-by-hop ones included)."""

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it came, still content-coded (a gzip body stays gzip).

        Raises:
            UpstreamFailure: the body broke off (``read-error``, ``protocol-error``).
        """

    async def aclose(self) -> None:
        """Give the connection back to the pool (or close it, when the body was not read to its end)."""


class Forwarder(Protocol):
    """Sends requests to one upstream over a pool of connections."""

    async def send(
        self, method: str, target: bytes, headers: Headers, body: bytes | AsyncIterator[bytes]
    ) -> UpstreamResponse:
        """Send one request; return once the answer's status line and headers arrived.

        Args:
            method: the request method.
            target: the request target: the raw path and ``?query``, as the client sent it.
            headers: the header fields to send, already cleaned (the caller sets
                ``Content-Length`` or ``Transfer-Encoding`` to match ``body``).
            body: the whole body, or its chunks as they arrive from the client.

        Raises:
            UpstreamFailure: the request could not be sent, or no answer came.
        """

    async def aclose(self) -> None:
        """Close every pooled connection."""


class _HttpxResponse:
    """An httpx transport's response as an :class:`UpstreamResponse`."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: object) -> None:
        assert isinstance(response, httpx.Response)
        self._response = response
        self.status: int = response.status_code
        self.headers: Headers = [(name.lower(), value) for name, value in response.headers.raw]

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class _Stream(httpx.AsyncByteStream):
    """A request body streamed from the client, as httpx's ``AsyncByteStream``."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        pass


class _GuardedStream(httpcore.AsyncNetworkStream):
    """One upstream connection, which refuses to start a request once the upstream closed it (module docstring).

    A write that follows a read (or is the first) starts a request: HTTP/1.1
    without pipelining writes a whole request, then reads its answer.

    Attributes:
        reusable: False once the connection must carry no further request (it
            carried a 5xx); httpcore's pool then sees it as expired and closes it.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._requests = 0
        self._starts_request = True
        self.reusable = True

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 (httpcore's)
        data = await self._inner.read(max_bytes, timeout)
        self._starts_request = True
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not self._starts_request:
            await self._inner.write(buffer, timeout)
            return
        self._starts_request = False
        self._requests += 1
        if self._requests == 1:  # a fresh connection: whatever breaks now is the request's
            note_unsent(None)
            await self._inner.write(buffer, timeout)
            return
        if not self.reusable or self._inner.get_extra_info("is_readable"):
            # The upstream closed it (or said something unasked) before this request: nothing was sent.
            raise httpcore.ConnectionNotAvailable()
        note_unsent(None)
        try:
            await self._inner.write(buffer, timeout)
        except httpcore.WriteError as exc:
            # The first write of the request failed: the upstream had closed, not one byte went out.
            raise httpcore.ConnectionNotAvailable() from exc

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        return _GuardedStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and not self.reusable:
            return True  # httpcore's has_expired(): closed instead of reused
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, handing out :class:`_GuardedStream` connections."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        note_unsent("connect-error")
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        return _GuardedStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        note_unsent("connect-error")
        stream = await self._inner.connect_unix_socket(path, timeout=timeout, socket_options=socket_options)
        return _GuardedStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _translate(exc: BaseException) -> UpstreamFailure:
    """The failure an httpx exception stands for (httpx's exception hierarchy, 0.27 and later)."""
    kinds: Sequence[tuple[type[BaseException], str]] = (
        (httpx.ConnectError, "connect-error"),
        (httpx.ConnectTimeout, "connect-error"),
        (httpx.PoolTimeout, "pool-timeout"),
        (httpx.WriteError, "write-error"),
        (httpx.WriteTimeout, "write-error"),
        (httpx.ReadError, "read-error"),
        (httpx.ReadTimeout, "read-error"),
        (httpx.ProtocolError, "protocol-error"),
    )
    for cls, kind in kinds:
        if isinstance(exc, cls):
            return failure_class(kind)(str(exc) or type(exc).__name__)
    return failure_class("protocol-error")(f"{type(exc).__name__}: {exc}")


def ssl_context(verify: bool | str | os.PathLike[str]) -> ssl.SSLContext:
    """The TLS context of an ``https`` upstream, the one httpx makes for the same ``[upstream] verify``.

    Args:
        verify: True (certifi's CA bundle, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``),
            False (no verification), or a CA bundle's path.
    """
    if not isinstance(verify, bool):
        return ssl.create_default_context(cafile=os.fspath(verify))
    return httpx.create_ssl_context(verify=verify)


class HttpxForwarder:
    """A :class:`Forwarder` over httpx's ``AsyncHTTPTransport`` (HTTP/1.1, pooled).

    Args:
        target: the upstream (``http``, ``https`` or ``unix:``).
        settings: the ``[upstream]`` table: connect and pool timeouts, pool
            sizes, ``keepalive_expiry`` (seconds; keep it below the upstream's
            idle timeout, 5 s in Node and uvicorn, so a connection the upstream
            is closing is never picked for a keyed request), TLS verification.

    No total timeout is set here (httpx has none): the proxy enforces
    ``upstream.deadline`` itself. Read and write timeouts equal the deadline.
    """

    def __init__(self, target: UpstreamTarget, settings: UpstreamSettings) -> None:
        # A CA bundle becomes a context of its own (httpx deprecates verify=<path>).
        verify = (
            settings.verify
            if isinstance(settings.verify, bool)
            else ssl.create_default_context(cafile=str(settings.verify))
        )
        self._transport = httpx.AsyncHTTPTransport(
            verify=verify,
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_keepalive_connections,
                keepalive_expiry=settings.keepalive_expiry,
            ),
            uds=target.uds,
            retries=0,  # a connect retry is safe, but the verdict must name what happened
        )
        # httpx has no parameter for the network backend; its transport's pool
        # (httpcore's AsyncConnectionPool) keeps it in _network_backend.
        pool = self._transport._pool
        pool._network_backend = _GuardedBackend(pool._network_backend)
        self._base = httpx.URL(target.base_url)
        self._host = self._base.netloc
        self._timeout = {
            "connect": settings.connect_timeout,
            "pool": settings.pool_timeout,
            "read": settings.deadline,
            "write": settings.deadline,
        }

    @property
    def host(self) -> bytes:
        """The upstream's ``host[:port]``, the ``Host`` of a request that came without one."""
        return self._host

    async def send(
        self, method: str, target: bytes, headers: Headers, body: bytes | AsyncIterator[bytes]
    ) -> UpstreamResponse:
        """See :meth:`Forwarder.send`."""
        stream: httpx.AsyncByteStream = httpx.ByteStream(body) if isinstance(body, bytes) else _Stream(body)
        request = httpx.Request(
            method,
            self._base.copy_with(raw_path=target),
            headers=headers,
            stream=stream,
            extensions={"timeout": self._timeout},
        )
        note_unsent("pool-timeout")  # until a connection is opened, or a pooled one written to
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc
        if response.status_code >= 500:
            # An upstream that failed may close the connection right after its
            # answer (uvicorn, when the app raised): never reuse it.
            connection = response.extensions.get("network_stream")
            if isinstance(connection, _GuardedStream):
                connection.reusable = False
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        """See :meth:`Forwarder.aclose`."""
        await self._transport.aclose()
