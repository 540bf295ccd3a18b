"""Process-wide settings: the testing mode (:func:`idempo.testing.set_testing`), and the store a URL names.

The fronts resolve a store URL through :func:`sync_store` / :func:`async_store`,
the secret source and the lease keepers read :data:`TESTING`, so the testing
mode is one switch read where it matters, as stamina's ``set_testing``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .stores import async_store_from_url, store_from_url
from .stores.memory import AsyncMemoryStore, MemoryStore
from .typing import AsyncStore, Store

__all__ = ["TESTING", "Testing", "async_store", "sync_store", "use"]


@dataclass(frozen=True, slots=True)
class Testing:
    """The testing mode's state (see :func:`idempo.testing.set_testing`).

    Attributes:
        secret: the server secret of every front given none.
        store: the blocking store every store URL names.
        async_store: the async store every store URL names (the same records).
    """

    secret: bytes
    store: MemoryStore
    async_store: AsyncMemoryStore


#: The testing mode, or None (the default). Read it as ``_config.TESTING`` where it is needed,
#: never copied by ``from ... import``: :func:`use` replaces it.
TESTING: Testing | None = None


def use(testing: Testing | None) -> Testing | None:
    """Turn the testing mode on (its state) or off (None); return the mode it replaces."""
    global TESTING
    previous, TESTING = TESTING, testing
    return previous


def sync_store(url: str) -> Store:
    """The blocking store ``url`` names: the testing mode's memory store while it is on.

    Raises:
        ConfigurationError: the URL's scheme is unknown or the URL malformed (see
            :func:`idempo.stores.store_from_url`).
    """
    testing = TESTING
    return testing.store if testing is not None else store_from_url(url)


def async_store(url: str) -> AsyncStore:
    """The async store ``url`` names: the testing mode's memory store while it is on (see :func:`sync_store`)."""
    testing = TESTING
    return testing.async_store if testing is not None else async_store_from_url(url)
