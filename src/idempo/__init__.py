"""idempo: make APIs safe to retry.

A request that carries an ``Idempotency-Key`` executes at most once per key;
every repeat gets the stored answer. The server adapters: ``idempo.asgi``
(any ASGI app, Starlette), ``idempo.fastapi`` (route options, OpenAPI),
``idempo.litestar``, ``idempo.wsgi`` (any WSGI app), ``idempo.flask`` and
``idempo.django``; ``idempo.stores`` is where records live.

This module imports no optional dependency.
"""

from ._core.fingerprint import fingerprint
from ._core.keys import MAX_KEY_LENGTH, make_record_key, parse_key
from ._core.policy import DEFAULT_EXCLUDED_HEADERS, DEFAULT_METHODS, Policy, Verdict
from ._core.records import Acquired, BeginResult, Existing, Marker, Record, RecordState, StoreStats, StoredResponse
from ._version import __version__
from .decorator import idempotent
from .exceptions import (
    ConfigurationError,
    FingerprintMismatch,
    IdempoError,
    InvalidKey,
    KeyHeld,
    KeyInProgress,
    KeyRejected,
    LeaseLost,
    MissingKey,
    ResultNotReplayable,
    StoreError,
    StoreUnavailable,
)
from .stores import async_store_from_url, store_from_url
from .typing import AsyncStore, Clock, Store, SupportsStats

__all__ = [
    "Acquired",
    "AsyncStore",
    "BeginResult",
    "Clock",
    "ConfigurationError",
    "DEFAULT_EXCLUDED_HEADERS",
    "DEFAULT_METHODS",
    "Existing",
    "FingerprintMismatch",
    "IdempoError",
    "InvalidKey",
    "KeyHeld",
    "KeyInProgress",
    "KeyRejected",
    "LeaseLost",
    "MAX_KEY_LENGTH",
    "Marker",
    "MissingKey",
    "Policy",
    "Record",
    "RecordState",
    "ResultNotReplayable",
    "Store",
    "StoreError",
    "StoreStats",
    "StoreUnavailable",
    "StoredResponse",
    "SupportsStats",
    "Verdict",
    "__version__",
    "async_store_from_url",
    "fingerprint",
    "idempotent",
    "make_record_key",
    "parse_key",
    "store_from_url",
]
