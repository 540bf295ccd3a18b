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
seconds after its lease (default 24 h,
:data:`~idempo.stores._base.IN_PROGRESS_GRACE`): until then a ``begin`` that
takes over the expired lease still sees the crashed holder's record
(``Acquired.takeover``), and a holder whose save failed through an outage
longer than its lease still renews and saves under its token once Redis is
back, if nobody took over (``purge_expired`` keeps it too). The
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

Deadline: every call ends within ``deadline`` seconds (default 2), and a
retry is not started past it. The async store cancels the whole call at the
deadline (pool wait, connect, each reply and the retry together; a
maintenance call, ``stats`` or ``purge_expired``, each of its round trips),
so it leaves redis-py's wait for a pooled connection and for each reply
(``socket_timeout``) unbounded unless given: redis-py's asyncio connection
sends every command through ``asyncio.wait_for`` when it has a socket timeout,
on Python 3.11 a task of its own per command. A blocking call is bounded step
by step: the wait for a pooled connection, the connect and each reply
(``socket_connect_timeout``, ``socket_timeout``, each the deadline unless
given), so it can take up to twice the deadline in the worst case (a
connection that breaks just before it, retried). Past it a call raises
:class:`~idempo.exceptions.StoreUnavailable`.

Open and close: as every store (``idempo.stores._base``). Building a store
does no I/O (a blocking Redis Cluster client, which reads the slot map when
made, is made on first use). ``open()`` (the fronts call it at start-up)
sends one ``PING``: a wrong password, an unknown user, a database number the
server does not have or a host name that does not resolve raise
:class:`~idempo.exceptions.ConfigurationError` (one line, with the fix); a
server that cannot be reached raises StoreUnavailable (the fronts log one
warning and start).

Twins: :class:`RedisStore` and :class:`AsyncRedisStore` share everything but
the I/O call: the constructor and options (:class:`_RedisBase`), the Lua,
key names, script arguments and reply decoding (:class:`_Codec`), what
``stats()`` counts (:class:`_Tally`), and the error mapping.

The async store needs asyncio (redis-py's asyncio client); it does not run on trio.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from importlib import resources
from time import monotonic
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.retry import Retry

from .._core.records import (
    RESERVED_PREFIX,
    Acquired,
    BeginResult,
    Existing,
    Record,
    StoreStats,
    StoredResponse,
    encode_headers,
)
from ..exceptions import ConfigurationError, LeaseLost, StoreError, StoreUnavailable
from ._base import (
    DEFAULT_DEADLINE,
    IN_PROGRESS_GRACE,
    closed,
    deadline_seconds,
    map_errors,
    misconfigured,
    record_from_row,
    within_deadline,
)

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
_OPTIONS = ("prefix", "grace", "deadline")
_CLUSTER_OPTIONS = {"max_connections": int, "socket_timeout": float, "socket_connect_timeout": float}
_T = TypeVar("_T")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")

Client = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


# Unreachable: refused/reset/timed-out connections, a cluster without a
# master for the slot (failover under way), a write that reached a replica.
_REDIS_ERRORS = map_errors(
    (redis.ConnectionError, redis.TimeoutError, ClusterError, TryAgainError, ReadOnlyError, SlotNotCoveredError),
    (RedisError, RedisClusterException),
)


# Guards making and closing a blocking store's client (rare: once per store).
_CONNECT_LOCK = threading.Lock()


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

    def extend_args(self, token: int, lease_ttl_ms: int) -> list[Any]:
        return [str(token), int(lease_ttl_ms), self.grace_ms]

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


class _DeadlineRetry(Retry):
    """redis-py's Retry that starts no retry past the call's deadline.

    A stale pooled connection (the server restarted) fails before the
    script ran, so one quick retry on a fresh connection recovers without a
    503. A connection that drops after the script ran is retried too:
    begin, complete and release recognise their own first run by its
    attempt id, and extend is idempotent. Timeouts are not retried here
    (a cluster client retries them on its own; the attempt id covers that).
    """

    def __init__(self, retries: int, deadline: float) -> None:
        super().__init__(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries, (redis.ConnectionError,))
        self.deadline = deadline

    def call_with_retry(self, do: Callable[[], _T], fail: Any, *args: Any, **kwargs: Any) -> _T:
        """Call ``do``, retried on a broken connection while the deadline lasts."""
        ends = monotonic() + self.deadline
        tried = False

        def attempt() -> _T:
            nonlocal tried
            if tried and monotonic() >= ends:
                raise redis.TimeoutError(f"no answer within the {self.deadline:g} s deadline")
            tried = True
            return do()

        return super().call_with_retry(attempt, fail, *args, **kwargs)


class _AsyncDeadlineRetry(AsyncRetry):
    """The async twin of :class:`_DeadlineRetry`.

    redis.asyncio needs its own Retry: given the blocking one, it gets a
    coroutine back from call_with_retry and never retries at all.
    """

    def __init__(self, retries: int, deadline: float) -> None:
        super().__init__(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries, (redis.ConnectionError,))
        self.deadline = deadline

    async def call_with_retry(self, do: Callable[[], Awaitable[_T]], fail: Any, *args: Any, **kwargs: Any) -> _T:
        """Call ``do``, retried on a broken connection while the deadline lasts."""
        ends = monotonic() + self.deadline
        tried = False

        async def attempt() -> _T:
            nonlocal tried
            if tried and monotonic() >= ends:
                raise redis.TimeoutError(f"no answer within the {self.deadline:g} s deadline")
            tried = True
            return await do()

        return await super().call_with_retry(attempt, fail, *args, **kwargs)


def _misconfiguration(url: str, exc: BaseException) -> ConfigurationError | None:
    """Name what a start-up error says is wrong with the configuration (None: the server is unreachable)."""
    text = str(exc)
    if isinstance(exc, AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
        return misconfigured(url, text, "fix the user name or password in the store URL (or the server's ACL)")
    if isinstance(exc, ResponseError) and "DB index is out of range" in text:
        return misconfigured(url, text, "use a database number the server has (see its `databases` setting)")
    if "Name or service not known" in text or "nodename nor servname" in text:
        return misconfigured(url, text, "fix the host name in the store URL")
    return None


def _startup_failure(url: str, exc: BaseException) -> Exception:
    named = _misconfiguration(url, exc)
    if named is not None:
        return named
    if isinstance(exc, StoreError):
        return exc
    return StoreUnavailable(f"{type(exc).__name__}: {exc}")


class _Tally:
    """What stats() counts, written once: the keys a scan finds, read a batch per round trip."""

    def __init__(self, codec: _Codec, time_reply: Sequence[Any]) -> None:
        seconds, microseconds = time_reply
        self.now = int(seconds) * 1000 + int(microseconds) // 1000
        self.codec = codec
        # idempo's own records (its generated secret, the legacy window) are no requests' records.
        self.reserved = codec.key(RESERVED_PREFIX)[:-1].encode("utf-8")
        self.in_progress = self.completed = self.expired = 0
        self.oldest_key: bytes | None = None
        self.oldest_created = 0
        self.batch: list[bytes] = []

    def add(self, key: bytes) -> bool:
        """Take a key the scan found; True when a batch is full (read it, then :meth:`count` it)."""
        if not key.startswith(self.reserved):
            self.batch.append(key)
        return len(self.batch) >= _STATS_BATCH

    def read(self, pipe: Any) -> list[bytes]:
        """Queue the reads of the batch on a pipeline; return the batch (now taken)."""
        batch, self.batch = self.batch, []
        for name in batch:
            pipe.hmget(name, "state", "created_at", "expires_at")
        return batch

    def count(self, batch: list[bytes], replies: Sequence[Any]) -> None:
        """Count the batch from its replies (state, created_at, expires_at of each key)."""
        for name, (state, created, expires) in zip(batch, replies, strict=True):
            if state is None or state == b"released":
                continue  # deleted since the scan saw it, or a released record's tombstone
            if int(expires) <= self.now:
                self.expired += 1
            elif state == b"in_progress":
                self.in_progress += 1
                if self.oldest_key is None or int(created) < self.oldest_created:
                    self.oldest_key, self.oldest_created = name, int(created)
            else:
                self.completed += 1

    def result(self, oldest_fields: Sequence[Any] | None) -> StoreStats:
        """The counts, with the oldest lease's record from its fields (None: none, or gone since)."""
        oldest = None
        if self.oldest_key is not None and oldest_fields is not None and oldest_fields[0] is not None:
            record_key = self.oldest_key.decode("utf-8")[len(self.codec.prefix) + 1 : -1]
            oldest = self.codec.record(record_key, oldest_fields)
        return StoreStats(self.now, self.in_progress, self.completed, self.expired, oldest)


def _fenced(reply: Any) -> None:
    """complete, release and extend reply 1 when the token held the record."""
    if reply != 1:
        raise LeaseLost()


_C = TypeVar("_C", Client, AsyncClient)


class _RedisBase(Generic[_C]):
    """What the blocking and the async Redis stores share: the constructor, the options, the codec."""

    #: True when every call of the store is cancelled whole at its deadline
    #: (the async store), so redis-py's own waits need no bound of their own.
    _whole_call_deadline: ClassVar[bool] = False

    def __init__(
        self,
        url: str | None = None,
        *,
        client: _C | None = None,
        prefix: str = "idempo:",
        grace: float | timedelta = IN_PROGRESS_GRACE,
        max_connections: int = 50,
        deadline: float | timedelta = DEFAULT_DEADLINE,
        socket_timeout: float | None = None,
        socket_connect_timeout: float | None = None,
        retries: int = 1,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError(f"{type(self).__name__} takes either url= or client=")
        #: The store URL as given (messages show it with the password masked).
        self.url: str = url if url is not None else "(the client passed in)"
        options: dict[str, str] = {}
        if url is not None:
            url, options = _split_url(url)
            if _is_cluster_url(url):
                _cluster_arguments(url)  # a malformed node list is a ConfigurationError now
        self._client_url = url
        self._codec = _Codec(options.get("prefix", prefix), float(options["grace"]) if "grace" in options else grace)
        #: Seconds one call may take (see the module docstring).
        self.deadline = deadline_seconds(options.get("deadline", deadline))
        # Each reply's bound: the deadline, unless the store cancels whole calls at it (the async store).
        reply_bound = None if self._whole_call_deadline else self.deadline
        self._client_arguments: dict[str, Any] = {
            "max_connections": max_connections,
            "socket_timeout": reply_bound if socket_timeout is None else socket_timeout,
            "socket_connect_timeout": self.deadline if socket_connect_timeout is None else socket_connect_timeout,
        }
        self._retries = retries
        self._owned = client is None
        self._open = False  # open() succeeded
        self._closed = False
        self._scripts: dict[str, Any] = {}
        self._client: _C | None = None
        if client is not None:
            self._use(client)

    @property
    def client(self) -> _C:
        """The redis-py client, made on first use (a blocking Redis Cluster client reads its slot map then).

        Raises:
            StoreUnavailable: a blocking Redis Cluster client could not reach a node to read its slots.
            StoreError: the store was closed.
        """
        client = self._client
        if client is None:
            with _CONNECT_LOCK:  # made once, whichever thread comes first
                client = self._client
                if client is None:
                    client = self._connect()
                    self._use(client)
        return client

    def _connect(self) -> _C:
        raise NotImplementedError

    def _use(self, client: _C) -> None:
        # redis-py's Script objects keep each script's text and SHA; a call sends EVALSHA itself
        # (client.execute_command), without Script.__call__'s layers (two calls, tuple copies, an
        # import) on every call, and loads the script when the server answers NOSCRIPT (a restart,
        # a failover, the first call on a fresh server), as Script.__call__ does.
        self._scripts = {name: client.register_script(_LUA[name]) for name in _SCRIPTS}
        self._client = client

    def _arguments(self, retry: Retry | AsyncRetry) -> tuple[str, dict[str, Any], list[tuple[str, int]] | None]:
        """(URL, client arguments, cluster nodes or None) of the client a URL store makes."""
        if self._closed:
            raise closed(self.url)
        url = self._client_url
        assert url is not None  # a store given a client never makes one
        arguments = {**self._client_arguments, "retry": retry}
        if not _is_cluster_url(url):
            return url, arguments, None
        cluster = _cluster_arguments(url)
        nodes = cluster.pop("nodes")
        return url, {**arguments, **cluster}, nodes


class RedisStore(_RedisBase[Client]):
    """A store in Redis, Valkey or a Redis Cluster, for blocking code (WSGI, sync functions).

    Building it does no I/O: :meth:`open` (the blocking fronts call it when
    built) sends one ``PING``; otherwise the first call connects.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...``
            (TLS), ``unix:///path.sock`` or ``redis+cluster://host:port,host:port``
            (``rediss+cluster://`` for TLS). Query options: ``prefix``, ``grace``,
            ``deadline`` and, for ``redis://``, any redis-py connection option
            (``max_connections``, ``health_check_interval``, ...). Omit when passing ``client``.
        client: a ready ``redis.Redis`` or ``redis.cluster.RedisCluster`` (created
            with ``decode_responses=False``, the default); the store does not close it.
        prefix: prepended to every record's hash name (default ``"idempo:"``);
            must not contain braces.
        grace: seconds (or a timedelta) an in-progress record's hash outlives its
            lease, so a takeover can report the crashed holder and a holder
            whose save failed can still save (default 86400, 24 h; keep it at
            least the longest record_ttl).
        max_connections: the connection pool's size (per cluster node). With
            one Redis server, a command beyond it waits for a free connection
            within the deadline.
        deadline: seconds (or a timedelta) one call may take before
            StoreUnavailable (default 2; URL ``?deadline=``); see the module docstring.
        socket_timeout: seconds to wait for one reply (default: the deadline;
            for :class:`AsyncRedisStore`, none: the deadline bounds the whole call).
        socket_connect_timeout: seconds to wait for a connection (default: the deadline).
        retries: times a command is retried on a broken connection (default
            1), within the deadline.

    Raises:
        ConfigurationError: neither or both of ``url`` and ``client`` given, a
            malformed URL or deadline, a prefix with braces.
    """

    def _connect(self) -> Client:
        url, arguments, nodes = self._arguments(_DeadlineRetry(self._retries, self.deadline))
        if nodes is None:
            # A blocking pool: a command beyond max_connections waits (within
            # the deadline) for a free connection, where redis-py's default
            # pool raises "Too many connections" at once, which is a 503.
            pool = redis.BlockingConnectionPool.from_url(url, timeout=self.deadline, **arguments)
            return redis.Redis.from_pool(pool)
        startup = [redis.cluster.ClusterNode(host, port) for host, port in nodes]  # type: ignore[no-untyped-call]
        try:
            # Reads the slot map now: every listed node unreachable is an outage.
            return redis.cluster.RedisCluster(startup_nodes=startup, **arguments)
        except (RedisError, RedisClusterException) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def open(self) -> None:
        """Check the server now with one ``PING`` (for a Redis Cluster, after reading its slot map).

        Once it succeeded, calling it again does nothing. The blocking fronts
        call it when they are built; without it, the first call connects.

        Raises:
            ConfigurationError: the server refuses the configuration (a wrong
                password or user, a database number it lacks, an unknown host).
            StoreUnavailable: the server cannot be reached.
            StoreError: the store was closed.
        """
        if self._open:
            return
        try:
            self.client.ping()
        except (RedisError, RedisClusterException, StoreError) as exc:
            raise _startup_failure(self.url, exc) from exc
        self._open = True

    def _script(self, name: str, key: str | bytes, args: Sequence[str | int] = ()) -> Any:
        client = self._client or self.client
        script = self._scripts[name]
        with _REDIS_ERRORS:
            try:
                return client.execute_command("EVALSHA", script.sha, 1, key, *args)  # type: ignore[no-untyped-call]
            except NoScriptError:  # see _RedisBase._use
                script.sha = client.script_load(script.script)
                return client.execute_command("EVALSHA", script.sha, 1, key, *args)  # type: ignore[no-untyped-call]

    def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        codec = self._codec
        reply = self._script("begin", codec.key(record_key), codec.begin_args(fingerprint, lease_ttl_ms))
        return codec.begin_result(record_key, reply)

    def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        codec = self._codec
        _fenced(self._script("complete", codec.key(record_key), codec.complete_args(token, response, record_ttl_ms)))

    def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        _fenced(self._script("release", self._codec.key(record_key), self._codec.release_args(token)))

    def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        _fenced(self._script("extend", self._codec.key(record_key), self._codec.extend_args(token, lease_ttl_ms)))

    def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        return self._codec.get_result(record_key, self._script("get", self._codec.key(record_key)))

    def purge_expired(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records still present; return how many.

        Redis deletes records itself (see the module docstring), so this finds
        only in-progress records within their grace period. It scans the
        store's keys (``SCAN``, every master of a cluster), one script call per
        record found: maintenance, not for the request path.
        """
        deleted = 0
        client = self.client
        with _REDIS_ERRORS:
            for key in client.scan_iter(match=self._codec.pattern, count=1000, _type="hash"):
                if deleted >= limit:
                    break
                deleted += int(self._script("purge", key, [self._codec.grace_ms]))
        return deleted

    def stats(self) -> StoreStats:
        """See :meth:`idempo.typing.SupportsStats.stats`.

        Scans the store's keys (``SCAN``, every master of a cluster) and reads
        three fields of each, a batch per round trip; the clock is the
        server's ``TIME`` (on a cluster, one node's). Completed records leave
        Redis at their expiry, so ``expired`` counts in-progress records
        within their grace period. Released records' tombstones are no records.
        """
        client = self.client
        with _REDIS_ERRORS:
            tally = _Tally(self._codec, client.time())
            for key in client.scan_iter(match=self._codec.pattern, count=1000, _type="hash"):
                if tally.add(key):
                    pipe = client.pipeline(transaction=False)
                    tally.count(tally.read(pipe), pipe.execute())
            pipe = client.pipeline(transaction=False)
            tally.count(tally.read(pipe), pipe.execute())
            oldest = None if tally.oldest_key is None else client.hmget(tally.oldest_key, list(_RECORD_FIELDS))
        return tally.result(oldest)

    def close(self) -> None:
        """Close the connection pool (unless the client was passed in); any later call raises StoreError.

        Calling it again does nothing.
        """
        with _CONNECT_LOCK:
            self._closed, self._open = True, False
            client, self._client = self._client, None
        if self._owned and client is not None:
            client.close()


class AsyncRedisStore(_RedisBase[AsyncClient]):
    """A store in Redis, Valkey or a Redis Cluster, for asyncio (ASGI, async functions).

    Building it does no I/O: ``await store.open()`` (the ASGI middleware
    calls it at lifespan start-up) sends one ``PING``; otherwise the first
    call connects.

    It takes the arguments of :class:`RedisStore`; ``client`` is a
    ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``.
    """

    # The client is made on first use, and a cluster client reads its slot
    # map then; redis-py races when several tasks make that first use at once
    # (commands interleave on one connection), so it is serialised (_initialize).
    _ready = False
    _open_lock: asyncio.Lock | None = None
    # Every call runs within_deadline (a maintenance call, each round trip): a
    # reply or a pool wait past the deadline is cancelled with its call, and
    # redis-py closes a connection whose reply was cut off (never reused).
    _whole_call_deadline = True

    def _connect(self) -> AsyncClient:
        url, arguments, nodes = self._arguments(_AsyncDeadlineRetry(self._retries, self.deadline))
        if nodes is None:
            # See RedisStore: wait for a free connection rather than fail (for as long as the call's deadline).
            pool = redis.asyncio.BlockingConnectionPool.from_url(url, timeout=None, **arguments)
            return redis.asyncio.Redis.from_pool(pool)
        startup = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in nodes]
        return redis.asyncio.cluster.RedisCluster(startup_nodes=startup, **arguments)

    async def _initialize(self) -> None:
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if not self._ready:
                client = self.client
                if isinstance(client, redis.asyncio.cluster.RedisCluster):
                    await client.initialize()
                self._ready = True

    async def open(self) -> None:
        """See :meth:`RedisStore.open`."""
        if self._open:
            return
        try:
            await within_deadline(self.deadline, self._ping())
        except (RedisError, RedisClusterException, StoreError) as exc:
            raise _startup_failure(self.url, exc) from exc
        self._open = True

    async def _ping(self) -> None:
        if not self._ready:
            await self._initialize()
        await self.client.ping()

    async def _call(self, name: str, key: str | bytes, args: Sequence[str | int]) -> Any:
        if not self._ready:
            await self._initialize()
        client = self._client or self.client
        script = self._scripts[name]
        try:
            return await client.execute_command("EVALSHA", script.sha, 1, key, *args)
        except NoScriptError:  # see _RedisBase._use
            script.sha = await client.script_load(script.script)
            return await client.execute_command("EVALSHA", script.sha, 1, key, *args)

    async def _script(self, name: str, key: str, args: Sequence[str | int] = ()) -> Any:
        with _REDIS_ERRORS:
            return await within_deadline(self.deadline, self._call(name, key, args))

    async def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> BeginResult:
        """See :meth:`idempo.typing.Store.begin`."""
        codec = self._codec
        reply = await self._script("begin", codec.key(record_key), codec.begin_args(fingerprint, lease_ttl_ms))
        return codec.begin_result(record_key, reply)

    async def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.complete`."""
        args = self._codec.complete_args(token, response, record_ttl_ms)
        _fenced(await self._script("complete", self._codec.key(record_key), args))

    async def release(self, record_key: str, token: int) -> None:
        """See :meth:`idempo.typing.Store.release`."""
        _fenced(await self._script("release", self._codec.key(record_key), self._codec.release_args(token)))

    async def extend(self, record_key: str, token: int, lease_ttl_ms: int) -> None:
        """See :meth:`idempo.typing.Store.extend`."""
        args = self._codec.extend_args(token, lease_ttl_ms)
        _fenced(await self._script("extend", self._codec.key(record_key), args))

    async def get(self, record_key: str) -> Record | None:
        """See :meth:`idempo.typing.Store.get`."""
        return self._codec.get_result(record_key, await self._script("get", self._codec.key(record_key)))

    async def purge_expired(self, limit: int = 1000) -> int:
        """See :meth:`RedisStore.purge_expired`; each round trip ends within the deadline."""
        deleted = 0
        deadline = self.deadline
        with _REDIS_ERRORS:
            if not self._ready:
                await within_deadline(deadline, self._initialize())
            keys = self.client.scan_iter(match=self._codec.pattern, count=1000, _type="hash")
            while deleted < limit and (key := await within_deadline(deadline, anext(keys, None))) is not None:
                deleted += int(await within_deadline(deadline, self._call("purge", key, [self._codec.grace_ms])))
        return deleted

    async def stats(self) -> StoreStats:
        """See :meth:`RedisStore.stats`; each round trip ends within the deadline."""
        deadline = self.deadline
        with _REDIS_ERRORS:
            if not self._ready:
                await within_deadline(deadline, self._initialize())
            client = self.client
            tally = _Tally(self._codec, await within_deadline(deadline, client.time()))
            keys = client.scan_iter(match=self._codec.pattern, count=1000, _type="hash")
            while (key := await within_deadline(deadline, anext(keys, None))) is not None:
                if tally.add(key):
                    pipe = client.pipeline(transaction=False)
                    tally.count(tally.read(pipe), await within_deadline(deadline, pipe.execute()))
            pipe = client.pipeline(transaction=False)
            tally.count(tally.read(pipe), await within_deadline(deadline, pipe.execute()))
            oldest = None
            if tally.oldest_key is not None:
                oldest = await within_deadline(deadline, client.hmget(tally.oldest_key, list(_RECORD_FIELDS)))
        return tally.result(oldest)

    async def aclose(self) -> None:
        """See :meth:`RedisStore.close`."""
        self._closed, self._open, self._ready = True, False, False
        client, self._client = self._client, None
        if self._owned and client is not None:
            await client.aclose()
