"""Store URLs: the scheme each store class is named by, and a URL's constructor arguments.

:func:`idempo.stores.store_from_url` builds a store from them; the ``idempo``
commands resolve a URL first to check it (``--store``) before opening anything.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..exceptions import ConfigurationError

__all__ = ["SCHEMES", "resolve"]

# scheme -> (module, sync class, async class, extra to install)
SCHEMES: dict[str, tuple[str, str, str, str]] = {
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


def resolve(url: str, kind: int) -> tuple[type[Any], dict[str, Any]]:
    """The store class a URL names (``kind`` 0: the blocking one, 1: the async one) and its constructor's
    arguments from the URL.

    Raises:
        ConfigurationError: the scheme is unknown, the URL is malformed, or the store's extra is not installed.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in sorted(SCHEMES))
        raise ConfigurationError(f"unknown store URL scheme in {url!r}; expected one of {known}")
    module_name, sync_name, async_name, extra = SCHEMES[scheme]
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
