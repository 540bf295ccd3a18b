"""Stores, and choosing one by URL.

=====================================  =========================================
URL                                    store
=====================================  =========================================
``memory://``                          :class:`MemoryStore` (one process;
                                       ``?max_records=``, ``?grace=``)
``sqlite:///relative/path.db``         :class:`~idempo.stores.sqlite.SQLiteStore` (SQLAlchemy-style:
``sqlite:////absolute/path.db``        three slashes relative, four absolute)
``postgresql://user@host:5432/db``     :class:`~idempo.stores.postgres.PostgresStore`
``postgres://...``                     (extra ``idempo[postgres]``; ``?schema=``)
``redis://host:6379/0``                :class:`~idempo.stores.redis.RedisStore`
``rediss://...`` (TLS)                 (extra ``idempo[redis]``; ``?prefix=``;
``unix:///path/redis.sock``            Valkey too)
``redis+cluster://h1:p1,h2:p2``        the same store on a Redis Cluster
``rediss+cluster://...`` (TLS)
=====================================  =========================================

Further schemes can be added with :func:`register_scheme`. The store modules
import their client libraries only when their scheme is used, so ``import
idempo`` needs neither psycopg nor redis-py.
"""

from __future__ import annotations

from typing import Any

from ..typing import AsyncStore, Store
from ._url import SCHEMES, resolve
from .memory import AsyncMemoryStore, MemoryStore

__all__ = [
    "AsyncMemoryStore",
    "MemoryStore",
    "async_store_from_url",
    "store_from_url",
]


def store_from_url(url: str, **options: Any) -> Store:
    """Return a blocking store for a URL (see the module docstring for schemes).

    Args:
        url: the store URL.
        **options: passed to the store's constructor (e.g. ``clock=``).

    Raises:
        ConfigurationError: the scheme is unknown, the URL is malformed, or the
            store's extra is not installed.
    """
    cls, args = resolve(url, 0)
    store: Store = cls(**args, **options)
    return store


def async_store_from_url(url: str, **options: Any) -> AsyncStore:
    """Return an async store for a URL; see :func:`store_from_url`."""
    cls, args = resolve(url, 1)
    store: AsyncStore = cls(**args, **options)
    return store


def register_scheme(scheme: str, module: str, sync_class: str, async_class: str, extra: str = "") -> None:
    """Make ``scheme://`` URLs build the named classes (for stores shipped as extras).

    Args:
        scheme: the URL scheme, lower-case, without ``://``.
        module: the importable module holding both classes.
        sync_class: the :class:`~idempo.typing.Store` class name; its
            constructor takes ``url=`` plus options.
        async_class: the :class:`~idempo.typing.AsyncStore` class name.
        extra: the pip extra that installs the module's dependencies.
    """
    SCHEMES[scheme.lower()] = (module, sync_class, async_class, extra)
