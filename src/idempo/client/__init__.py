"""httpx transports that make POST and PATCH safe to retry (needs ``idempo[client]``).

::

    import httpx
    from idempo.client import IdempotentTransport, RetryPolicy

    client = httpx.Client(transport=IdempotentTransport(retry=RetryPolicy(attempts=5)))
    response = client.post("https://api.example.com/payments", json={"amount": 100})
    key = response.request.headers["Idempotency-Key"]

Every POST or PATCH gets one ``Idempotency-Key`` (a UUIDv4 unless the caller
gave one), kept across all its retries, so a server that honours the IETF
draft draft-ietf-httpapi-idempotency-key-header (idempo's middleware, Stripe)
executes it at most once however many attempts it takes. The retry rules,
written once for httpx and requests, are in :class:`RetryPolicy`; in short:
transport failures, timeouts, 409, 429, 500, 502, 503 and 504 are retried with
exponential backoff and full jitter, honouring ``Retry-After``; 400 and 422 and
every other status are final, and so is a 409 ``outcome-unknown`` or a 410
``response-not-replayable`` problem (:data:`FINAL_PROBLEMS`: the key is held,
or its first answer was not kept, for the record's life); a request without a key is retried only if its
method is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE).

The key used is on the request (``response.request.headers["Idempotency-Key"]``),
in ``response.extensions["idempotency_key"]``, and on an exception raised
after the last attempt (``exc.idempotency_key``, plus a note in the traceback).
A key for one call can be given as a request extension::

    client.post(url, json=body, extensions={"idempotency_key": "order-42"})

or as a header (any case); it is then used as is and no second header is added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._retry import (
    DEFAULT_KEY_METHODS,
    DEFAULT_RETRY_STATUSES,
    FINAL_PROBLEMS,
    IDEMPOTENT_METHODS,
    Attempt,
    KeyFactory,
    OnAttempt,
    RetryPolicy,
    new_key,
    parse_retry_after,
)

if TYPE_CHECKING:
    from ._httpx import KEY_EXTENSION, AsyncIdempotentTransport, IdempotentTransport

__all__ = [
    "DEFAULT_KEY_METHODS",
    "DEFAULT_RETRY_STATUSES",
    "FINAL_PROBLEMS",
    "IDEMPOTENT_METHODS",
    "KEY_EXTENSION",
    "AsyncIdempotentTransport",
    "Attempt",
    "IdempotentTransport",
    "KeyFactory",
    "OnAttempt",
    "RetryPolicy",
    "new_key",
    "parse_retry_after",
]

# The httpx transports are imported when first used, so that the requests
# adapter (idempo.requests_adapter, in this package) works without httpx.
_HTTPX_NAMES = frozenset({"KEY_EXTENSION", "AsyncIdempotentTransport", "IdempotentTransport"})


def __getattr__(name: str) -> Any:
    """The httpx transports (PEP 562), imported on first use.

    Raises:
        ModuleNotFoundError: httpx is not installed (``pip install 'idempo[client]'``).
        AttributeError: no such name.
    """
    if name in _HTTPX_NAMES:
        from . import _httpx

        return getattr(_httpx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
