"""The httpx transports, public as :mod:`idempo.client` (which describes them)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, ClassVar, Generic, TypeVar

import anyio
import httpx

from ..exceptions import InvalidKey
from ._retry import KeyFactory, OnAttempt, RetryPolicy, RetryRun, new_key, resolve_key, tag_exception

# Public names: idempo.client re-exports them (its __all__).

#: The request extension that gives one call its key, and the response
#: extension that tells the key used.
KEY_EXTENSION = "idempotency_key"

# Transport failures worth a retry: the connection could not be made or was
# lost, or an answer did not come in time. LocalProtocolError (our own bad
# request), UnsupportedProtocol and ProxyError will fail the same way again.
_RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def _retryable_error(exc: BaseException) -> bool:
    return isinstance(exc, _RETRYABLE_ERRORS)


# The wrapped transport and the sleep of each twin.
_Transport = TypeVar("_Transport", httpx.BaseTransport, httpx.AsyncBaseTransport)
_Sleep = TypeVar("_Sleep", Callable[[float], None], Callable[[float], Awaitable[Any]])


class _Base(Generic[_Transport, _Sleep]):
    """What the sync and async transports share: construction and the key of a request."""

    #: What the twins' constructors differ in: the transport built when none is given, the default sleep.
    _defaults: ClassVar[tuple[Callable[[], Any], Callable[[float], Any]]]

    def __init__(
        self,
        transport: _Transport | None = None,
        *,
        retry: RetryPolicy | None = None,
        key_factory: KeyFactory = new_key,
        on_attempt: OnAttempt | None = None,
        sleep: _Sleep | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        default_transport, default_sleep = self._defaults
        self.transport: _Transport = transport if transport is not None else default_transport()
        self.retry = retry if retry is not None else RetryPolicy()
        self._key_factory = key_factory
        self._on_attempt = on_attempt
        self._sleep: _Sleep = sleep if sleep is not None else default_sleep
        self._clock = clock

    def _begin(self, request: httpx.Request) -> RetryRun[httpx.Response]:
        """Give the request its key (adding the header when needed); return its retry run."""
        policy = self.retry
        given = request.extensions.get(KEY_EXTENSION)
        if given is not None and not isinstance(given, str):
            raise InvalidKey(f"The {KEY_EXTENSION!r} request extension must be a str, got {type(given).__name__}.")
        key, header = resolve_key(
            policy, request.method, request.headers.get_list(policy.key_header), given, self._key_factory
        )
        if header is not None:
            # In place, so the caller's request (response.request, exc.request) shows the key sent.
            request.headers[policy.key_header] = header
        return RetryRun(
            policy,
            method=request.method,
            url=str(request.url),
            key=key,
            retryable_error=_retryable_error,
            clock=self._clock,
            on_attempt=self._on_attempt,
            body_of=_body_of,
        )


def _body_of(response: httpx.Response) -> bytes | None:
    """The decoded body of an answer read inside the transport (a keyed request's); None when it streams."""
    if not _in_memory(response):
        return None
    return response.read()  # kept on the response: the Client's own read returns it


def _finish(response: httpx.Response, run: RetryRun[httpx.Response]) -> httpx.Response:
    if run.key is not None:
        response.extensions[KEY_EXTENSION] = run.key
    return response


def _failed(exc: Exception, request: httpx.Request, run: RetryRun[httpx.Response]) -> None:
    if run.key is None:
        return
    tag_exception(exc, run.key)
    if isinstance(exc, httpx.RequestError):
        try:
            exc.request  # noqa: B018 - the property raises when no request is attached
        except RuntimeError:
            exc.request = request


class _ReadBody(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body already read from the network, still encoded (the Client decodes it)."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def __iter__(self) -> Iterator[bytes]:
        yield self._raw

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._raw


def _in_memory(response: httpx.Response) -> bool:
    """True when the body cannot be lost any more (a mock's bytes, or already read)."""
    return isinstance(response.stream, (httpx.ByteStream, _ReadBody))


def _buffered(response: httpx.Response, raw: bytes) -> httpx.Response:
    """A copy of a transport response whose body is already read."""
    extensions = {k: v for k, v in response.extensions.items() if k != "network_stream"}
    return httpx.Response(response.status_code, headers=response.headers, stream=_ReadBody(raw), extensions=extensions)


class IdempotentTransport(_Base[httpx.BaseTransport, Callable[[float], None]], httpx.BaseTransport):
    """An httpx transport that adds an idempotency key and retries safely.

    Args:
        transport: the transport that sends each attempt; default
            ``httpx.HTTPTransport()``. Give your own to set TLS, limits, HTTP/2
            or a proxy: the Client's own such options configure only the
            transport it would have built, not this one.
        retry: the :class:`RetryPolicy` (attempts, total timeout, waits,
            statuses, which methods get a key). Default ``RetryPolicy()``.
        key_factory: returns a fresh key per logical request; default
            :func:`new_key` (a UUIDv4). Keys must be 1-255 printable ASCII.
        on_attempt: called with an :class:`Attempt` after every attempt
            (status or exception, and the delay asked for before the next one).
        sleep: sleeps that many seconds between attempts; default ``time.sleep``
            (inject one to test without waiting).
        clock: monotonic seconds, for the ``timeout`` bound; default ``time.monotonic``.

    The request body is read into memory before the first attempt when the
    request may be retried, so every attempt sends the same bytes. For a
    request with a key, the answer's body is read inside the transport, so an
    answer lost half-way is retried too.
    """

    _defaults = (httpx.HTTPTransport, time.sleep)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request, retrying it under one key as :class:`RetryPolicy` allows.

        Returns:
            The last answer: a final status, or a retryable one when attempts
            or time ran out.

        Raises:
            InvalidKey: the key given (header or extension) is malformed, or
                given both ways with different values; nothing was sent.
            httpx.TransportError: the last attempt failed; for a request with
                a key, ``exc.idempotency_key`` holds it.
        """
        run = self._begin(request)
        if run.may_retry:
            request.read()  # a streamed body could not be sent twice
        try:
            response: httpx.Response = run.retrying(self._sleep)(self._attempt, request, run)
        except Exception as exc:
            _failed(exc, request, run)
            raise
        return _finish(response, run)

    def _attempt(self, request: httpx.Request, run: RetryRun[httpx.Response]) -> httpx.Response:
        response = self.transport.handle_request(request)
        if (run.key is None and not run.retry_status(response.status_code)) or _in_memory(response):
            return response  # streamed to the caller as usual
        try:
            raw = b"".join(response.iter_raw())
        finally:
            response.close()
        return _buffered(response, raw)

    def close(self) -> None:
        """Close the wrapped transport."""
        self.transport.close()


class AsyncIdempotentTransport(
    _Base[httpx.AsyncBaseTransport, Callable[[float], Awaitable[Any]]], httpx.AsyncBaseTransport
):
    """The async twin of :class:`IdempotentTransport` (asyncio or trio).

    Args:
        transport: the async transport that sends each attempt; default
            ``httpx.AsyncHTTPTransport()``.
        retry: the :class:`RetryPolicy`. Default ``RetryPolicy()``.
        key_factory: returns a fresh key per logical request; default :func:`new_key`.
        on_attempt: called with an :class:`Attempt` after every attempt.
        sleep: awaited with the seconds to wait between attempts; default
            ``anyio.sleep``.
        clock: monotonic seconds, for the ``timeout`` bound.
    """

    _defaults = (httpx.AsyncHTTPTransport, anyio.sleep)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request, retrying it under one key; see :meth:`IdempotentTransport.handle_request`."""
        run = self._begin(request)
        if run.may_retry:
            await request.aread()
        try:
            response: httpx.Response = await run.async_retrying(self._sleep)(self._attempt, request, run)
        except Exception as exc:
            _failed(exc, request, run)
            raise
        return _finish(response, run)

    async def _attempt(self, request: httpx.Request, run: RetryRun[httpx.Response]) -> httpx.Response:
        response = await self.transport.handle_async_request(request)
        if (run.key is None and not run.retry_status(response.status_code)) or _in_memory(response):
            return response
        try:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
        finally:
            await response.aclose()
        return _buffered(response, raw)

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.transport.aclose()
