"""The Redis store: records in Redis, Valkey or a Redis Cluster (extra ``idempo[redis]``).

Each record is one hash, ``<prefix>{<record key>}``. The braces make the record
key the hash tag, so a record lives in one slot of a Redis Cluster whatever
the prefix. Each transition is one Lua script (``idempo/stores/lua/*.lua``,
each with a KEYS/ARGV/return header), registered with redis-py's
``register_script``: run by SHA (``EVALSHA``), loaded again on ``NOSCRIPT``
after a server restart or failover. A first execution costs two round trips
(``begin``, ``complete``), a replay one.

Clock: the scripts read the server's clock (``TIME``); the application's
clock is never used, so servers with skewed clocks agree on leases and TTLs.

Expiry: a completed record's hash expires (``PEXPIREAT``) when the record
does, so Redis deletes it itself. An in-progress hash expires ``grace``
seconds after its lease: until then a ``begin`` that takes over the expired
lease still sees the crashed holder's record (``Acquired.takeover``). The
scripts compare times themselves, so an expired hash that Redis has not yet
deleted behaves as absent. :meth:`RedisStore.purge_expired` is rarely needed.

Valkey: the scripts use commands common to Redis 6.2+ and Valkey 7.2+
(``TIME``, ``HMGET``, ``HSET``, ``PEXPIREAT``); the store runs against Valkey
unchanged, with redis-py as the client.

Retries: a command that fails on a broken connection is sent once more on a
fresh one (``retries``; a cluster client also retries timeouts). ``begin``,
``complete`` and ``release`` carry a random attempt id, so a script whose
reply was lost after it ran recognises its own first run: the caller gets its
lease, or its stored record, never a 409 from itself. A release leaves an
expired tombstone holding the token for a few seconds, so the next lease's
token is greater even within the same millisecond.

The async store needs asyncio (redis-py's asyncio client); it does not run on trio.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from datetime import timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.retry import Retry

from .._core.records import Acquired, BeginResult, Existing, Record, StoreStats, StoredResponse, encode_headers
from ..exceptions import ConfigurationError, LeaseLost, StoreUnavailable
from ._base import ErrorMap, map_errors, record_from_row

__all__ = ["AsyncRedisStore", "RedisStore"]

_SCRIPTS = ("begin", "complete", "release", "extend", "get", "purge")
_RECORD_FIELDS = (
    "state",
    "fingerprint",
    "token",
    "lease_expires_at",
    "created_at",
    "expires_at",
    "status",
    "headers",
    "body",
)
# Keys read per pipeline round trip by stats().
_STATS_BATCH = 500
_LUA = {name: resources.files("idempo.stores.lua").joinpath(f"{name}.lua").read_text("utf-8") for name in _SCRIPTS}

# Options idempo reads from a store URL's query; the rest go to redis-py.
_OPTIONS = ("prefix", "grace")
_CLUSTER_OPTIONS = {"max_connections": int, "socket_timeout": float, "socket_connect_timeout": float}
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")

Client = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


# Unreachable: refused/reset/timed-out connections, a cluster without a
# master for the slot (failover under way), a write that reached a replica.
_REDIS_ERRORS = map_errors(
    (redis.ConnectionError, redis.TimeoutError, ClusterError, TryAgainError, ReadOnlyError, SlotNotCoveredError),
    (RedisError, RedisClusterException),
)


def _redis_errors() -> ErrorMap:
    return _REDIS_ERRORS


def _seconds_to_ms(value: float | timedelta, name: str) -> int:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds >= 0:
        raise ConfigurationError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return int(seconds * 1000)


class _Codec:
    """What both fronts share: key names, script arguments, reply decoding."""

    def __init__(self, prefix: str, grace: float | timedelta) -> None:
        if "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"the Redis key prefix must not contain braces (the hash tag), got {prefix!r}")
        self.prefix = prefix
        self.grace_ms = _seconds_to_ms(grace, "grace")
        # SCAN pattern matching this store's records and nothing else's.
        self.pattern = _GLOB_SPECIAL.sub(r"\\\1", prefix) + "{*}"

    def key(self, record_key: str) -> str:
        """The record's hash: the record key is the hash tag, so one record is one slot."""
        return f"{self.prefix}{{{record_key}}}"

    @staticmethod
    def record(record_key: str, fields: Sequence[Any]) -> Record:
        """Decode the nine record fields as the scripts return them."""
        return record_from_row(record_key, fields)

    def begin_args(self, fingerprint: str, lease_ttl_ms: int) -> list[Any]:
        # The attempt id lets begin.lua tell its own earlier run (whose reply a
        # dropped connection lost before redis-py sent the script again) from
        # another caller's lease.
        return [fingerprint, int(lease_ttl_ms), self.grace_ms, _attempt_id()]

    def begin_result(self, record_key: str, reply: Sequence[Any]) -> BeginResult:
        if reply[0] == 1:
            return Acquired(int(reply[2]), takeover=reply[3] == 1)
        return Existing(self.record(record_key, reply[2:]), int(reply[1]))

    @staticmethod
    def complete_args(token: int, response: StoredResponse, record_ttl_ms: int) -> list[Any]:
        headers = encode_headers(response.headers)
        return [str(token), int(record_ttl_ms), response.status, headers, response.body, _attempt_id()]

    @staticmethod
    def release_args(token: int) -> list[Any]:
        return [str(token), _attempt_id(), _TOMBSTONE_MS]

    def get_result(self, record_key: str, reply: Sequence[Any] | None) -> Record | None:
        return None if reply is None else self.record(record_key, reply[1:])


#: Milliseconds a released record's tombstone stays (release.lua): past any
#: retry of the release script, and past the few milliseconds a fencing token
#: can run ahead of the clock, after which a new token is greater anyway.
_TOMBSTONE_MS = 5000


def _attempt_id() -> str:
    """A random id for one begin or complete call, resent unchanged if redis-py retries it."""
    return os.urandom(8).hex()


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """Remove idempo's own options from a URL's query; return the URL and those options."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _OPTIONS:
            ours[name] = value
        else:
            theirs.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


def _cluster_arguments(url: str) -> dict[str, Any]:
    """Constructor arguments of a RedisCluster for ``redis+cluster://[user:password@]host:port,host:port``."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for node in hosts.split(","):
        host, _, port = node.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigurationError(f"a redis+cluster URL lists host:port pairs separated by commas, got {url!r}")
        nodes.append((host.strip("[]"), int(port)))
    args: dict[str, Any] = {"nodes": nodes, "ssl": parts.scheme.lower().startswith("rediss")}
    if userinfo:
        username, _, password = userinfo.partition(":")
        args["username"] = unquote(username) or None
        args["password"] = unquote(password) or None
    for name, value in parse_qsl(parts.query):
        if name not in _CLUSTER_OPTIONS:
            known = ", ".join(sorted((*_CLUSTER_OPTIONS, *_OPTIONS)))
            raise ConfigurationError(f"unknown redis+cluster URL option {name!r}; known: {known}")
        args[name] = _CLUSTER_OPTIONS[name](value)
    return args


def _is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in ("redis+cluster", "rediss+cluster")


def _retry(retries: int) -> Retry:
    # A stale pooled connection (the server restarted) fails before the
    # script ran, so one quick retry on a fresh connection recovers without a
    # 503. A connection that drops after the script ran is retried too:
    # begin, complete and release recognise their own first run by its
    # attempt id, and extend is idempotent. Timeouts are not retried here
    # (a cluster client retries them on its own; the attempt id covers that).
    return Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries, supported_errors=(redis.ConnectionError,))


def _async_retry(retries: int) -> AsyncRetry:
    # redis.asyncio needs its own Retry: given the blocking one, it gets a
    # coroutine back from call_with_retry and never retries at all.
    return AsyncRetry(
        ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries, supported_errors=(redis.ConnectionError,)
    )


class _Options:
    """Parsed constructor arguments, shared by both fronts."""

    def __init__(self, url: str | None, prefix: str, grace: float | timedelta, **kwargs: Any) -> None:
        self.url = url
        self.kwargs = kwargs
        options: dict[str, str] = {}
        if url is not None:
            self.url, options = _split_url(url)
        self.codec = _Codec(options.get("prefix", prefix), float(options["grace"]) if "grace" in options else grace)


class RedisStore:
    """A store in Redis, Valkey or a Redis Cluster, for blocking code (WSGI, sync functions).

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...``
            (TLS), ``unix:///path.sock`` or ``redis+cluster://host:port,host:port``
            (``rediss+cluster://`` for TLS). Query options: ``prefix``, ``grace``
            and, for ``redis://``, any redis-py connection option
            (``socket_timeout``, ``max_connections``, ...). Omit when passing ``client``.
        client: a ready ``redis.Redis`` or ``redis.cluster.RedisCluster`` (created
            with ``decode_responses=False``, the default); the store does not close it.
        prefix: prepended to every record's hash name (default ``"idempo:"``);
            must not contain braces.
        grace: seconds (or a timedelta) an in-progress record's hash outlives its
            lease, so a takeover can report the crashed holder (default 60).
        max_connections: the connection pool's size (per cluster node). With
            one Redis server, a command beyond it waits up to ``socket_timeout``
            for a free connection.
        socket_timeout: seconds to wait for a reply before StoreUnavailable.
        socket_connect_timeout: seconds to wait for a connection.
        retries: times a command is retried on a broken connection (default 1).

    Raises:
        ConfigurationError: neither or both of ``url`` and ``client`` given, a
            malformed URL, or a prefix with braces.
        StoreUnavailable: a Redis Cluster could not be reached to read its slots.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Client | None = None,
        prefix: str = "idempo:",
        grace: float | timedelta = 60.0,
        max_connections: int = 50,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 2.0,
        retries: int = 1,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError("RedisStore takes either url= or client=")
        options = _Options(url, prefix, grace)
        self._codec = options.codec
        self._owned = client is None
        if client is None:
            assert options.url is not None
            common: dict[str, Any] = {
                "max_connections": max_connections,
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_connect_timeout,
                "retry": _retry(retries),
            }
            if _is_cluster_url(options.url):
                args = _cluster_arguments(options.url)
                nodes = [redis.cluster.ClusterNode(host, port) for host, port in args.pop("nodes")]  # type: ignore[no-untyped-call]
                try:
                    # Reads the slot map now: every listed node unreachable is an outage.
                    client = redis.cluster.RedisCluster(startup_nodes=nodes, **{**common, **args})
                except (RedisError, RedisClusterException) as exc:
                    raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
            else:
                # A blocking pool: a command beyond max_connections waits (up to
                # socket_timeout) for a free connection, where redis-py's default
                # pool raises "Too many connections" at once, which is a 503.
                pool = redis.BlockingConnectionPool.from_url(options.url, timeout=socket_timeout, **common)
                client = redis.Redis.from_pool(pool)
        self.client: Client = client
        self._scripts = {name: client.register_script(_LUA[name]) for name in _SCRIPTS}

    def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        codec = self._codec
        with _redis_errors():
            args = codec.begin_args(fingerprint, lease_ttl_ms)
            reply = self._scripts["begin"](keys=[codec.key(record_key)], args=args)
        return codec.begin_result(record_key, reply)

    def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        args = self._codec.complete_args(token, response, record_ttl_ms)
        with _redis_errors():
            done = self._scripts["complete"](keys=[self._codec.key(record_key)], args=args)
        if done != 1:
            raise LeaseLost()

    def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        with _redis_errors():
            args = self._codec.release_args(token)
            done = self._scripts["release"](keys=[self._codec.key(record_key)], args=args)
        if done != 1:
            raise LeaseLost()

    def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        args: list[str | int] = [str(token), int(lease_ttl_ms), self._codec.grace_ms]
        with _redis_errors():
            done = self._scripts["extend"](keys=[self._codec.key(record_key)], args=args)
        if done != 1:
            raise LeaseLost()

    def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        with _redis_errors():
            reply = self._scripts["get"](keys=[self._codec.key(record_key)])
        return self._codec.get_result(record_key, reply)

    def purge_expired(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records still present; return how many.

        Redis deletes records itself (see the module docstring), so this finds
        only in-progress records within their grace period. It scans the
        store's keys (``SCAN``, every master of a cluster), one script call per
        record found: maintenance, not for the request path.
        """
        deleted = 0
        with _redis_errors():
            for key in self.client.scan_iter(match=self._codec.pattern, count=1000, _type="hash"):
                if deleted >= limit:
                    break
                deleted += int(self._scripts["purge"](keys=[key]))
        return deleted

    def stats(self) -> StoreStats:
        """See :meth:`idempo.typing.SupportsStats.stats`.

        Scans the store's keys (``SCAN``, every master of a cluster) and reads
        three fields of each, a batch per round trip; the clock is the
        server's ``TIME`` (on a cluster, one node's). Completed records leave
        Redis at their expiry, so ``expired`` counts in-progress records
        within their grace period. Released records' tombstones are no records.
        """
        in_progress = completed = expired = 0
        oldest_key: bytes | None = None
        oldest_created = 0
        with _redis_errors():
            seconds, microseconds = self.client.time()
            now = int(seconds) * 1000 + int(microseconds) // 1000
            batch: list[bytes] = []
            keys = self.client.scan_iter(match=self._codec.pattern, count=1000, _type="hash")
            while True:
                key = next(keys, None)
                if key is not None:
                    batch.append(key)
                if batch and (key is None or len(batch) >= _STATS_BATCH):
                    pipe = self.client.pipeline(transaction=False)
                    for name in batch:
                        pipe.hmget(name, "state", "created_at", "expires_at")
                    for name, (state, created, expires) in zip(batch, pipe.execute(), strict=True):
                        if state is None or state == b"released":
                            continue  # deleted since the scan saw it, or a released record's tombstone
                        if int(expires) <= now:
                            expired += 1
                        elif state == b"in_progress":
                            in_progress += 1
                            if oldest_key is None or int(created) < oldest_created:
                                oldest_key, oldest_created = name, int(created)
                        else:
                            completed += 1
                    batch = []
                if key is None:
                    break
            oldest = None
            if oldest_key is not None:
                fields = self.client.hmget(oldest_key, list(_RECORD_FIELDS))
                record_key = oldest_key.decode("utf-8")[len(self._codec.prefix) + 1 : -1]
                if fields[0] is not None:
                    oldest = self._codec.record(record_key, fields)
        return StoreStats(now, in_progress, completed, expired, oldest)

    def close(self) -> None:
        """Close the connection pool (unless the client was passed in)."""
        if self._owned:
            self.client.close()


class AsyncRedisStore:
    """A store in Redis, Valkey or a Redis Cluster, for asyncio (ASGI, async functions).

    Connections are made on first use, so constructing the store does no I/O.

    Args: as :class:`RedisStore`; ``client`` is a ``redis.asyncio.Redis`` or
        ``redis.asyncio.cluster.RedisCluster``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: AsyncClient | None = None,
        prefix: str = "idempo:",
        grace: float | timedelta = 60.0,
        max_connections: int = 50,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 2.0,
        retries: int = 1,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError("AsyncRedisStore takes either url= or client=")
        options = _Options(url, prefix, grace)
        self._codec = options.codec
        self._owned = client is None
        if client is None:
            assert options.url is not None
            common: dict[str, Any] = {
                "max_connections": max_connections,
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_connect_timeout,
                "retry": _async_retry(retries),
            }
            if _is_cluster_url(options.url):
                args = _cluster_arguments(options.url)
                nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in args.pop("nodes")]
                client = redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, **{**common, **args})
            else:
                # See RedisStore: wait for a free connection rather than fail.
                pool = redis.asyncio.BlockingConnectionPool.from_url(options.url, timeout=socket_timeout, **common)
                client = redis.asyncio.Redis.from_pool(pool)
        self.client: AsyncClient = client
        self._scripts = {name: client.register_script(_LUA[name]) for name in _SCRIPTS}
        # A cluster client reads the slot map on first use; redis-py races when
        # several tasks make that first use at once (commands interleave on
        # one connection), so the first use is serialised by open().
        self._ready = not isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._open_lock: asyncio.Lock | None = None

    async def open(self) -> None:
        """Connect now rather than on first use; for a Redis Cluster, read its slot map.

        Called by the first operation if not called before; call it at startup
        to find an unreachable cluster before the first request does.

        Raises:
            StoreUnavailable: the cluster could not be reached.
        """
        if self._ready:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if not self._ready:
                assert isinstance(self.client, redis.asyncio.cluster.RedisCluster)
                with _redis_errors():
                    await self.client.initialize()
                self._ready = True

    async def _script(self, name: str, key: str, args: Sequence[str | int] = ()) -> Any:
        if not self._ready:
            await self.open()
        with _redis_errors():
            return await self._scripts[name](keys=[key], args=args)

    async def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        codec = self._codec
        reply = await self._script("begin", codec.key(record_key), codec.begin_args(fingerprint, lease_ttl_ms))
        return codec.begin_result(record_key, reply)

    async def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        args = self._codec.complete_args(token, response, record_ttl_ms)
        if await self._script("complete", self._codec.key(record_key), args) != 1:
            raise LeaseLost()

    async def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        if await self._script("release", self._codec.key(record_key), self._codec.release_args(token)) != 1:
            raise LeaseLost()

    async def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        args: list[str | int] = [str(token), int(lease_ttl_ms), self._codec.grace_ms]
        if await self._script("extend", self._codec.key(record_key), args) != 1:
            raise LeaseLost()

    async def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        reply = await self._script("get", self._codec.key(record_key))
        return self._codec.get_result(record_key, reply)

    async def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`RedisStore.purge_expired`."""
        if not self._ready:
            await self.open()
        deleted = 0
        with _redis_errors():
            async for key in self.client.scan_iter(match=self._codec.pattern, count=1000, _type="hash"):
                if deleted >= limit:
                    break
                deleted += int(await self._scripts["purge"](keys=[key]))
        return deleted

    async def aclose(self) -> None:
        """Close the connection pool (unless the client was passed in)."""
        if self._owned:
            await self.client.aclose()
