"""A requests adapter that makes POST and PATCH safe to retry (needs ``idempo[requests]``).

::

    import requests
    from idempo.requests_adapter import IdempotentAdapter, RetryPolicy

    session = requests.Session()
    adapter = IdempotentAdapter(retry=RetryPolicy(attempts=5))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    response = session.post("https://api.example.com/payments", json={"amount": 100}, timeout=10)
    key = response.request.headers["Idempotency-Key"]

The same rules as the httpx transport (:mod:`idempo.client`), from the same
code (:class:`RetryPolicy`): one ``Idempotency-Key`` per logical POST or
PATCH, kept across its retries; transport failures, timeouts, 409, 429, 500,
502, 503 and 504 retried with full-jitter backoff, honouring ``Retry-After``; 400,
422 and every other status final; a request without a key retried only if
its method is idempotent. A key the caller puts in the headers (any case) is
used as is. urllib3's own retries are turned off (``max_retries=0``): one
retry loop, not two multiplying each other.

The module is not called ``idempo.requests`` so that tracebacks and imports
never leave a doubt about which ``requests`` is meant.
"""

from __future__ import annotations

from .client._requests import IdempotentAdapter
from .client._retry import (
    DEFAULT_KEY_METHODS,
    DEFAULT_RETRY_STATUSES,
    IDEMPOTENT_METHODS,
    Attempt,
    KeyFactory,
    OnAttempt,
    RetryPolicy,
    new_key,
)

__all__ = [
    "DEFAULT_KEY_METHODS",
    "DEFAULT_RETRY_STATUSES",
    "IDEMPOTENT_METHODS",
    "Attempt",
    "IdempotentAdapter",
    "KeyFactory",
    "OnAttempt",
    "RetryPolicy",
    "new_key",
]
