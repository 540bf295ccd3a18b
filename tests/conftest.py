"""Shared fixtures: the real services (PostgreSQL, Redis, a Redis Cluster) every area may use.

Tests that need a service skip with the reason when it is down, unless
``IDEMPO_REQUIRE_SERVICES=1`` (CI), where they fail instead. Each session
isolates itself on the shared servers: a schema of its own in PostgreSQL,
a key prefix of its own in Redis, and Redis servers of its own on free
loopback ports for the cluster and for outage tests.

Fixtures:
    postgres_url: the server's base URL (``$IDEMPO_POSTGRES_URL``, default
        ``postgresql://postgres@127.0.0.1:5432/test``).
    postgres_store_url: ``postgres_url`` plus ``?schema=<this session's>``,
        migrated; the schema is dropped afterwards.
    redis_url: the shared Redis (``$IDEMPO_REDIS_URL``, default ``redis://127.0.0.1:6379/0``).
    redis_store_url: ``redis_url`` plus ``?prefix=<this session's>``; its keys
        are deleted afterwards.
    redis_cluster_urls: ``redis://127.0.0.1:<port>`` of each of three masters
        of a Redis Cluster started for the session.
    redis_cluster_store_url: ``redis+cluster://...`` for those, with a prefix.
    redis_server: a function starting a redis-server of the test's own
        (:class:`RedisServer`: ``stop()`` / ``start()`` on the same port).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("idempo.testing")

REQUIRE_SERVICES = os.environ.get("IDEMPO_REQUIRE_SERVICES") == "1"
SESSION = uuid.uuid4().hex[:10]


def service_missing(reason: str) -> None:
    """Skip the test, or fail it when IDEMPO_REQUIRE_SERVICES=1."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (IDEMPO_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def free_port(*, cluster_bus: bool = False) -> int:
    """A free loopback port (for a cluster node, also port + 10000, its bus port)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not cluster_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


# --- PostgreSQL -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL server's URL; skips (or fails) when it is down."""
    url = os.environ.get("IDEMPO_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        import psycopg
    except ImportError:
        service_missing("psycopg is not installed (pip install idempo[postgres])")
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.Error as exc:
        service_missing(f"PostgreSQL is not reachable at {url}: {exc}")
    return url


@pytest.fixture(scope="session")
def postgres_store_url(postgres_url: str) -> Iterator[str]:
    """A store URL on a schema of this session's own, migrated; dropped afterwards."""
    import psycopg

    from idempo.stores.postgres import PostgresStore

    schema = f"idempo_test_{SESSION}"
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={schema}"
    store = PostgresStore(url, check_schema=False)
    store.create_schema()
    store.close()
    yield url
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# --- Redis ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis server's URL; skips (or fails) when it is down."""
    url = os.environ.get("IDEMPO_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        import redis
    except ImportError:
        service_missing("redis-py is not installed (pip install idempo[redis])")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        service_missing(f"Redis is not reachable at {url}: {exc}")
    return url


def _delete_prefixed(client: object, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=1000))  # type: ignore[attr-defined]
    for key in keys:
        client.delete(key)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def redis_store_url(redis_url: str) -> Iterator[str]:
    """A store URL with a key prefix of this session's own; its keys are deleted afterwards."""
    import redis

    prefix = f"idempo-test-{SESSION}:"
    yield f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"
    client = redis.Redis.from_url(redis_url)
    _delete_prefixed(client, prefix)
    client.close()


class RedisServer:
    """A redis-server process of our own on a loopback port; stop and start it at will.

    Args:
        directory: where its files go.
        port: the port (default: a free one); kept across stop/start.
        extra: more redis-server arguments.
    """

    def __init__(self, directory: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.port = port if port is not None else free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until it answers PING."""
        import redis

        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.directory),
            *self.extra,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it to exit."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None


def _need_redis_binaries() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        service_missing("redis-server / redis-cli are not installed")
    try:
        import redis  # noqa: F401
    except ImportError:
        service_missing("redis-py is not installed (pip install idempo[redis])")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start redis-servers of the test's own; each is stopped afterwards."""
    _need_redis_binaries()
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}")
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


def _cluster_ok(info: object) -> bool:
    if isinstance(info, dict):
        return str(info.get("cluster_state")) == "ok"
    return isinstance(info, bytes | str) and "cluster_state:ok" in (info.decode() if isinstance(info, bytes) else info)


@pytest.fixture(scope="session")
def redis_cluster_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A Redis Cluster of three masters on free loopback ports, for the session."""
    _need_redis_binaries()
    import redis

    base = tmp_path_factory.mktemp("redis-cluster")
    nodes: list[RedisServer] = []
    try:
        for index in range(3):
            port = free_port(cluster_bus=True)
            node = RedisServer(
                base / f"node-{index}",
                port,
                ("--cluster-enabled", "yes", "--cluster-config-file", str(base / f"nodes-{port}.conf")),
            )
            nodes.append(node)
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        for node in nodes:
            client = redis.Redis(host="127.0.0.1", port=node.port)
            while not _cluster_ok(client.execute_command("CLUSTER INFO")):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.1)
            client.close()
        yield [f"redis://{address}" for address in addresses]
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster_store_url(redis_cluster_urls: list[str]) -> str:
    """A ``redis+cluster://`` store URL for the session's cluster, with a prefix."""
    hosts = ",".join(url.removeprefix("redis://") for url in redis_cluster_urls)
    return f"redis+cluster://{hosts}?prefix=idempo-test-{SESSION}:"
