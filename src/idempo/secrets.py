"""The server secret every digest at rest and in logs is keyed with (DESIGN "digest at rest", guarantee 7).

Where the secret comes from, first found wins:

1. ``secret=`` on the front (the middlewares, ``install``, the Flask
   extension, the Litestar plugin, ``settings.IDEMPO["SECRET"]`` on Django,
   ``@idempotent``, the consumers);
2. the ``IDEMPO_SECRET`` environment variable;
3. a random secret the store keeps: the first process that needs one writes
   32 random bytes into the store (with ``begin`` on the reserved record key
   :data:`SECRET_RECORD_KEY`, so every process sharing the store agrees on
   it, atomically, on any store), and every process reads it from there.
   idempo logs a warning once per process: the logs cannot be checked
   against guesses, but whoever reads the store reads the secret too, so
   the store's digests are only as safe as the store itself.

Give every process that shares a store the same secret (at least 16 bytes;
``python -c "import secrets; print(secrets.token_urlsafe(32))"``). Changing
it changes every record key: records made under the old secret are no longer
found (their retries execute again) and expire on their own.
"""

from __future__ import annotations

import logging
import os
import secrets as _random
import threading
from typing import Any

from ._core.digests import MIN_SECRET_BYTES, Digests
from ._core.records import SECRET_RECORD_KEY, Acquired, Record
from .exceptions import ConfigurationError, StoreError
from .typing import AsyncStore, Store

__all__ = [
    "ENV_VAR",
    "SECRET_RECORD_KEY",
    "SecretSource",
    "async_store_secret",
    "configured_secret",
    "store_secret",
]

#: The environment variable holding the server secret.
ENV_VAR = "IDEMPO_SECRET"

# The generated secret's record is an in-progress lease that lasts a century:
# never taken over, never purged.
_SECRET_LEASE_MS = 100 * 365 * 24 * 3600 * 1000
_PREFIX = "secret:v1:"

logger = logging.getLogger("idempo")
_warned = threading.Event()


def configured_secret(secret: str | bytes | None = None) -> bytes | None:
    """The configured server secret: ``secret`` if given, else ``$IDEMPO_SECRET``; None when neither is set.

    Args:
        secret: the secret (a str is encoded as UTF-8), or None.

    Raises:
        ConfigurationError: the secret is shorter than 16 bytes.
    """
    if secret is None:
        secret = os.environ.get(ENV_VAR) or None
        where = f"${ENV_VAR}"
    else:
        where = "secret="
    if secret is None:
        return None
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"{where} must be at least {MIN_SECRET_BYTES} bytes; make one with "
            '`python -c "import secrets; print(secrets.token_urlsafe(32))"`'
        )
    return raw


def _candidate() -> str:
    return _PREFIX + _random.token_hex(32)


def _kept(result: Any, candidate: str) -> bytes:
    """The secret from ``begin``'s answer on the secret's record: ours when we wrote it, else the one there."""
    text = candidate if isinstance(result, Acquired) else result.record.fingerprint
    if not text.startswith(_PREFIX):
        raise StoreError(f"the store's {SECRET_RECORD_KEY!r} record does not hold an idempo secret")
    try:
        return bytes.fromhex(text[len(_PREFIX) :])
    except ValueError:
        raise StoreError(f"the store's {SECRET_RECORD_KEY!r} record does not hold an idempo secret") from None


def _warn() -> None:
    if not _warned.is_set():
        _warned.set()
        logger.warning(
            "idempo: no secret configured (secret= or $%s): the digests in the store and the logs are keyed "
            "with a random secret kept in the store itself, so they are only as safe as the store; "
            "set %s to the same value in every process (see the README, Security)",
            ENV_VAR,
            ENV_VAR,
        )


def store_secret(store: Store) -> bytes:
    """The secret ``store`` keeps, written there first (32 random bytes) if it holds none.

    Raises:
        StoreError: the store failed (StoreUnavailable when unreachable), or
            its secret record holds something else.
    """
    candidate = _candidate()
    return _kept(store.begin(SECRET_RECORD_KEY, candidate, _SECRET_LEASE_MS), candidate)


async def async_store_secret(store: AsyncStore) -> bytes:
    """The async twin of :func:`store_secret`."""
    candidate = _candidate()
    return _kept(await store.begin(SECRET_RECORD_KEY, candidate, _SECRET_LEASE_MS), candidate)


def is_secret_record(record: Record) -> bool:
    """True for the record a store keeps its generated secret in (not a request's record)."""
    return record.record_key == SECRET_RECORD_KEY


class SecretSource:
    """The :class:`~idempo._core.digests.Digests` of one front: from the configured secret, or the store's.

    A configured secret is read at construction; the store's is read on first
    use and kept for the life of the front.

    Args:
        secret: the front's ``secret=`` argument (None: ``$IDEMPO_SECRET``,
            else the store's).

    Raises:
        ConfigurationError: the configured secret is shorter than 16 bytes.
    """

    __slots__ = ("digests",)

    def __init__(self, secret: str | bytes | None = None) -> None:
        configured = configured_secret(secret)
        #: The digests, once known (None until the store's secret is read).
        self.digests: Digests | None = Digests(configured) if configured is not None else None

    def load(self, store: Store) -> Digests:
        """The digests, reading the store's secret the first time.

        Raises:
            StoreError: the store failed.
        """
        digests = self.digests
        if digests is None:
            digests = self.digests = Digests(store_secret(store))
            _warn()
        return digests

    async def aload(self, store: AsyncStore) -> Digests:
        """The async twin of :meth:`load`."""
        digests = self.digests
        if digests is None:
            digests = self.digests = Digests(await async_store_secret(store))
            _warn()
        return digests
