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

import importlib
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..exceptions import ConfigurationError
from ..typing import AsyncStore, Store
from .memory import AsyncMemoryStore, MemoryStore

__all__ = [
    "AsyncMemoryStore",
    "MemoryStore",
    "async_store_from_url",
    "store_from_url",
]

# scheme -> (module, sync class, async class, extra to install)
_SCHEMES: dict[str, tuple[str, str, str, str]] = {
    "memory": ("idempo.stores.memory", "MemoryStore", "AsyncMemoryStore", ""),
    "sqlite": ("idempo.stores.sqlite", "SQLiteStore", "AsyncSQLiteStore", ""),
    "postgresql": ("idempo.stores.postgres", "PostgresStore", "AsyncPostgresStore", "postgres"),
    "postgres": ("idempo.stores.postgres", "PostgresStore", "AsyncPostgresStore", "postgres"),
    "redis": ("idempo.stores.redis", "RedisStore", "AsyncRedisStore", "redis"),
    "rediss": ("idempo.stores.redis", "RedisStore", "AsyncRedisStore", "redis"),
    "unix": ("idempo.stores.redis", "RedisStore", "AsyncRedisStore", "redis"),
    "redis+cluster": ("idempo.stores.redis", "RedisStore", "AsyncRedisStore", "redis"),
    "rediss+cluster": ("idempo.stores.redis", "RedisStore", "AsyncRedisStore", "redis"),
}


def _resolve(url: str, kind: int) -> tuple[type[Any], dict[str, Any]]:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise ConfigurationError(f"unknown store URL scheme in {url!r}; expected one of {known}")
    module_name, sync_name, async_name, extra = _SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"the {scheme}:// store needs `pip install idempo[{extra}]` ({exc})") from exc
    cls = getattr(module, sync_name if kind == 0 else async_name)
    return cls, _arguments(scheme, url)


def _arguments(scheme: str, url: str) -> dict[str, Any]:
    if scheme == "memory":
        options: dict[str, Any] = {}
        for name, value in parse_qsl(urlsplit(url).query):
            try:
                if name == "max_records":
                    options[name] = int(value)
                elif name == "grace":
                    options[name] = float(value)
                else:
                    raise ConfigurationError(f"unknown memory URL option {name!r}; known: grace, max_records")
            except ValueError as exc:
                raise ConfigurationError(f"bad value for the memory URL option {name}: {value!r}") from exc
        return options
    if scheme == "sqlite":
        parts = urlsplit(url)
        if parts.netloc:
            raise ConfigurationError(
                f"an sqlite URL has no host: use sqlite:///relative.db or sqlite:////abs.db, got {url!r}"
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigurationError(f"an sqlite URL needs a file path, got {url!r}")
        args: dict[str, Any] = {"path": path}
        for name, value in parse_qsl(parts.query):
            if name == "busy_timeout":
                args["busy_timeout"] = float(value)
            elif name == "synchronous":
                args["synchronous"] = value.upper()
            else:
                raise ConfigurationError(f"unknown sqlite URL option {name!r}; known: busy_timeout, synchronous")
        return args
    return {"url": url}


def store_from_url(url: str, **options: Any) -> Store:
    """Return a blocking store for a URL (see the module docstring for schemes).

    Args:
        url: the store URL.
        **options: passed to the store's constructor (e.g. ``clock=``).

    Raises:
        ConfigurationError: the scheme is unknown, the URL is malformed, or the
            store's extra is not installed.
    """
    cls, args = _resolve(url, 0)
    store: Store = cls(**args, **options)
    return store


def async_store_from_url(url: str, **options: Any) -> AsyncStore:
    """Return an async store for a URL; see :func:`store_from_url`."""
    cls, args = _resolve(url, 1)
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
    _SCHEMES[scheme.lower()] = (module, sync_class, async_class, extra)
