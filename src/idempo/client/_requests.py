"""The requests adapter, public as :mod:`idempo.requests_adapter` (which describes it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.exceptions import (
    ChunkedEncodingError,
    ConnectionError,
    InvalidHeader,
    ProxyError,
    SSLError,
    Timeout,
)

from ._retry import KeyFactory, OnAttempt, RetryPolicy, RetryRun, new_key, resolve_key, tag_exception

# Public names: idempo.requests_adapter re-exports them (its __all__).


def _retryable_error(exc: BaseException) -> bool:
    # ConnectionError covers refused, reset and closed connections and connect
    # timeouts; ChunkedEncodingError an answer cut off half-way. A TLS failure,
    # a proxy refusing us or a malformed header will fail the same way again.
    if isinstance(exc, SSLError | ProxyError | InvalidHeader):
        return False
    return isinstance(exc, ConnectionError | Timeout | ChunkedEncodingError)


def _replayable(request: requests.PreparedRequest) -> None:
    """Read a file or generator body into bytes, so every attempt sends the same bytes."""
    body = request.body
    if body is None or isinstance(body, bytes | str):
        return
    if hasattr(body, "read"):
        data = body.read()
        data = data.encode("utf-8") if isinstance(data, str) else data
    else:
        data = b"".join(chunk.encode("utf-8") if isinstance(chunk, str) else chunk for chunk in body)
    request.body = data
    request.headers.pop("Transfer-Encoding", None)
    request.headers["Content-Length"] = str(len(data))


class IdempotentAdapter(HTTPAdapter):
    """A ``requests`` transport adapter that adds an idempotency key and retries safely.

    Args:
        retry: the :class:`RetryPolicy`. Default ``RetryPolicy()``.
        key_factory: returns a fresh key per logical request; default
            :func:`new_key` (a UUIDv4).
        on_attempt: called with an :class:`Attempt` after every attempt.
        sleep: sleeps that many seconds between attempts; default ``time.sleep``.
        clock: monotonic seconds, for the ``timeout`` bound.
        **kwargs: passed to ``HTTPAdapter`` (``pool_connections``,
            ``pool_maxsize``, ``pool_block``); ``max_retries`` is refused.

    The per-attempt timeout is the ``timeout=`` given to the request, as usual;
    :attr:`RetryPolicy.timeout` bounds all attempts together. Unless the call
    streams (``stream=True``), the answer's body is read inside the adapter, so
    an answer lost half-way is retried too.

    Raises:
        TypeError: ``max_retries`` was given.
    """

    # Pickling keeps what HTTPAdapter keeps, plus the retry settings.
    __attrs__ = [  # noqa: RUF012 - the same kind of attribute as HTTPAdapter.__attrs__
        *HTTPAdapter.__attrs__,
        "retry",
        "_key_factory",
        "_on_attempt",
        "_sleep",
        "_clock",
    ]

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        key_factory: KeyFactory = new_key,
        on_attempt: OnAttempt | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        if "max_retries" in kwargs:
            raise TypeError("IdempotentAdapter does its own retries; set them with retry=RetryPolicy(...)")
        super().__init__(max_retries=0, **kwargs)
        self.retry = retry if retry is not None else RetryPolicy()
        self._key_factory = key_factory
        self._on_attempt = on_attempt
        self._sleep = sleep
        self._clock = clock

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """Send the request, retrying it under one key as :class:`RetryPolicy` allows.

        Returns:
            The last answer: a final status, or a retryable one when attempts
            or time ran out.

        Raises:
            InvalidKey: the key in the headers is malformed; nothing was sent.
            requests.RequestException: the last attempt failed; for a request
                with a key, ``exc.idempotency_key`` holds it.
        """
        policy = self.retry
        method = (request.method or "GET").upper()
        header = request.headers.get(policy.key_header)
        key, value = resolve_key(policy, method, [] if header is None else [header], None, self._key_factory)
        if value is not None:
            request.headers[policy.key_header] = value
        run: RetryRun[requests.Response] = RetryRun(
            policy,
            method=method,
            url=request.url or "",
            key=key,
            retryable_error=_retryable_error,
            clock=self._clock,
            on_attempt=self._on_attempt,
            # attempt() below has read the body of any answer the policy would retry.
            body_of=lambda response: response.content,
        )
        if run.may_retry:
            _replayable(request)

        def attempt() -> requests.Response:
            response = super(IdempotentAdapter, self).send(
                request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies
            )
            if not stream or run.retry_status(response.status_code):
                # Reading here, not in Session.send, makes a cut-off body a retryable
                # failure, and returns a discarded answer's connection to the pool.
                response.content  # noqa: B018
            return response

        try:
            response: requests.Response = run.retrying(self._sleep)(attempt)
        except Exception as exc:
            if key is not None:
                tag_exception(exc, key)
            raise
        return response
