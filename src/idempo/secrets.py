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

Records of idempo versions before keyed digests (plain SHA-256 record keys
and fingerprints) are found only while the legacy window is open
(:func:`open_legacy_window`, ``idempo migrate --legacy-digests``); outside it
they are treated as absent.
"""

from __future__ import annotations

import os
import secrets as _random
import threading
import time
from typing import Any

from . import _config
from ._core.digests import MIN_SECRET_BYTES, Digests
from ._core.records import LEGACY_RECORD_KEY, RESERVED_PREFIX, SECRET_RECORD_KEY, Acquired, Existing, Record
from .exceptions import ConfigurationError, StoreError
from .observability._observation import logger
from .typing import AsyncStore, Store

__all__ = [
    "ENV_VAR",
    "LEGACY_RECORD_KEY",
    "SECRET_RECORD_KEY",
    "SecretSource",
    "async_store_secret",
    "configured_secret",
    "is_reserved",
    "open_legacy_window",
    "store_secret",
]

#: The environment variable holding the server secret.
ENV_VAR = "IDEMPO_SECRET"

# The generated secret's record is an in-progress lease that lasts a century:
# never taken over, never purged.
_SECRET_LEASE_MS = 100 * 365 * 24 * 3600 * 1000
_PREFIX = "secret:v1:"

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


def is_reserved(record_key: str) -> bool:
    """True for a record key idempo keeps for itself (the store's secret, the legacy window), not a request's."""
    return record_key.startswith(RESERVED_PREFIX)


def open_legacy_window(store: Store, seconds: float) -> int:
    """Open the legacy window for ``seconds`` from now (or move its end there): ``idempo migrate --legacy-digests``.

    While it is open, every front that starts also looks up the records of
    idempo versions before keyed digests (plain SHA-256 record keys and
    fingerprints) for a request that finds no record of its own: such a
    record replays, or answers 422 or 409, as it did before the upgrade.
    The window is one reserved record whose lease ends with it.

    Returns:
        The window's end, milliseconds since the epoch by the store's clock.

    Raises:
        StoreError: the store failed.
    """
    ms = max(1, int(seconds * 1000))
    result = store.begin(LEGACY_RECORD_KEY, "legacy-digests:v0", ms)
    if isinstance(result, Existing):
        store.extend(LEGACY_RECORD_KEY, result.record.token, ms)
    marker = store.get(LEGACY_RECORD_KEY)
    return marker.expires_at_ms if marker is not None else 0


class SecretSource:
    """The :class:`~idempo._core.digests.Digests` of one front: from the configured secret, or the store's.

    A configured secret is checked at construction and keys the digests
    from then on; the store's secret is read on first use. Whether the legacy
    window (:func:`open_legacy_window`) is open, and until when, is read from
    the store once, by the first request that looks for a record.
    Both are kept for the life of the front.

    In the testing mode (:func:`idempo.testing.set_testing`) a front given
    no ``secret=`` uses the mode's fixed secret (:data:`idempo.testing.SECRET`),
    and the legacy window is never looked up.

    Args:
        secret: the front's ``secret=`` argument (None: ``$IDEMPO_SECRET``,
            else the store's).

    Raises:
        ConfigurationError: the configured secret is shorter than 16 bytes.
    """

    __slots__ = ("_legacy_read", "digests", "legacy_until_ms")

    def __init__(self, secret: str | bytes | None = None) -> None:
        testing = _config.TESTING
        configured = testing.secret if secret is None and testing is not None else configured_secret(secret)
        #: The digests, once known (None until the store's secret is read).
        self.digests: Digests | None = Digests(configured) if configured is not None else None
        #: The end of the legacy window (ms since the epoch, the store's clock); 0: closed.
        self.legacy_until_ms = 0
        self._legacy_read = False

    def load(self, store: Store) -> Digests:
        """The digests, reading the store's secret the first time.

        Raises:
            StoreError: the store failed.
        """
        return self.digests or self._testing() or self._stored(store_secret(store))

    async def aload(self, store: AsyncStore) -> Digests:
        """The async twin of :meth:`load`."""
        return self.digests or self._testing() or self._stored(await async_store_secret(store))

    def _testing(self) -> Digests | None:
        """The testing mode's digests while it is on (kept from then on), else None."""
        testing = _config.TESTING
        if testing is None:
            return None
        self.digests = Digests(testing.secret)
        return self.digests

    def _stored(self, secret: bytes) -> Digests:
        """Keep the store's secret's digests, and warn (once per process) that it is the store's."""
        self.digests = Digests(secret)
        _warn()
        return self.digests

    def legacy_open(self, store: Store) -> bool:
        """True while the legacy window is open (by this machine's clock); reads it from ``store`` the first time.

        Raises:
            StoreError: the store failed.
        """
        if not self._legacy_read:
            self._read_window(store.get(LEGACY_RECORD_KEY))
        return self._open()

    async def alegacy_open(self, store: AsyncStore) -> bool:
        """The async twin of :meth:`legacy_open`."""
        if not self._legacy_read:
            self._read_window(await store.get(LEGACY_RECORD_KEY))
        return self._open()

    def _read_window(self, marker: Record | None) -> None:
        self.legacy_until_ms = marker.expires_at_ms if marker is not None else 0
        self._legacy_read = True

    def legacy_possible(self) -> bool:
        """False once the window was read and is closed, or in the testing mode: no legacy lookup, not even the read."""
        return (not self._legacy_read or (self.legacy_until_ms > 0 and self._open())) and _config.TESTING is None

    def _open(self) -> bool:
        until = self.legacy_until_ms
        return until > 0 and time.time() * 1000 < until
