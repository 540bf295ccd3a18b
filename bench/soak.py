"""The kill and outage soak (issue 10): real uvicorn workers, a real store, real SIGKILLs, a store relay we cut.

    .venv/bin/python bench/soak.py --store postgres      # or redis, sqlite, or a full store URL
    .venv/bin/python bench/soak.py --store redis --duration 60 --seed 7 --json /tmp/soak.json

N uvicorn worker processes (default 3) serve a small Starlette app behind
idempo's middleware (the app mode, ``--app``: ``bench/soak_app_<name>.py``),
all on one store. Clients send ``POST /payments`` with an idempotency key,
30 % of the keys twice, and retry each with the same key through idempo's
own client transport, round-robin over the workers' ports. The handler writes
every execution to a ledger that survives a SIGKILL. Meanwhile:

- kills: a supervisor SIGKILLs a random worker every 1-2 s and starts a new
  one on its port;
- outages: for a network store, a TCP relay of the soak's own between the
  workers and the store is cut for a few seconds at a time, as a blackhole
  (passes nothing) and as a refusal (resets connections, refuses new ones).

By default the two come in phases (kills, a calm of one lease, outages, a
calm), so that a key executed twice can be told apart: a takeover after a
holder was killed is allowed; a second execution while the first holder
lived on is not, and a kill shortly after an outage would hide it
(``--faults together`` runs both at once; see bench/README.md).

At the end it prints the figures (bench/README.md explains each) and the
checks of issue 10's "Done when"; ``--json PATH`` writes them too. Exit
status: 0 when every check passed, 1 when one failed, 2 when the soak could
not run. The store is isolated: a PostgreSQL schema or a Redis key prefix of
the run's own (removed at the end), an SQLite file in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import logging
import os
import random
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import httpx  # noqa: E402
from soak_figures import (  # noqa: E402
    AttemptRecord,
    ClientAnswer,
    Execution,
    Outage,
    Recorded,
    Settings,
    WorkerLife,
    checks,
    compute,
    render,
)

from idempo.client import AsyncIdempotentTransport, RetryPolicy  # noqa: E402

SHORTCUTS = {
    "postgres": "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql": "postgresql://postgres@127.0.0.1:5432/test",
    "redis": "redis://127.0.0.1:6379/0",
    "sqlite": "sqlite",
}


def _say(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def _with_query(url: str, **options: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in options]
    return urlunsplit(parts._replace(query=urlencode([*query, *options.items()])))


# --- the store, isolated for the run --------------------------------------------------------


@dataclass
class StoreTarget:
    """The run's store: the URL with the run's own schema, prefix or file, and where the relay points.

    Attributes:
        kind: ``postgresql``, ``redis`` or ``sqlite``.
        url: the store URL the soak itself uses (setup, counting, cleanup).
        upstream: ``(host, port)`` the relay forwards to; None for SQLite.
        label: what the report calls the store (password masked).
    """

    kind: str
    url: str
    upstream: tuple[str, int] | None
    label: str
    prefix: str = ""

    @classmethod
    def resolve(cls, given: str, nonce: str, workdir: Path) -> StoreTarget:
        """Build the target from ``--store`` (a shortcut or a URL).

        Raises:
            SystemExit: an unsupported store.
        """
        url = SHORTCUTS.get(given, given)
        if url == "sqlite" or url.startswith("sqlite:"):
            path = workdir / "idempo.db"
            return cls("sqlite", f"sqlite:///{path}", None, "sqlite (a file of the run's own)")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in ("postgresql", "postgres"):
            schema = f"idempo_soak_{nonce}"
            upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
            return cls("postgresql", _with_query(url, schema=schema), upstream, _redacted(url) + f" (schema {schema})")
        if scheme in ("redis", "rediss"):
            prefix = f"idempo-soak-{nonce}:"
            upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
            target = cls("redis", _with_query(url, prefix=prefix), upstream, _redacted(url) + f" (prefix {prefix})")
            target.prefix = prefix
            return target
        raise SystemExit(
            f"soak: --store must be postgres, redis, sqlite or a postgresql://, redis:// URL; got {given!r}"
        )

    def via(self, port: int | None) -> str:
        """The URL the workers use: through the relay on ``port`` (a network store), else :attr:`url`."""
        if port is None:
            return self.url
        parts = urlsplit(self.url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def setup(self) -> None:
        """Create the run's schema (PostgreSQL) or tables (SQLite); check Redis answers."""
        from idempo.stores import store_from_url

        if self.kind == "postgresql":
            from idempo.stores.postgres import PostgresStore

            pg = PostgresStore(self.url, check_schema=False)
            try:
                pg.create_schema()
            finally:
                pg.close()
            return
        store = store_from_url(self.url)
        try:
            store.get("soak-setup")
        finally:
            store.close()

    def left_in_progress(self) -> int | None:
        """Records still in progress after the run (live or with a lapsed lease); None if it cannot count."""
        from idempo.stores import store_from_url
        from idempo.typing import SupportsStats

        store = store_from_url(self.url)
        try:
            if not isinstance(store, SupportsStats):
                return None
            counted = store.stats()
        finally:
            store.close()
        # Records live 24 h: an expired one is an in-progress record whose lease lapsed.
        return counted.in_progress + counted.expired

    def cleanup(self) -> None:
        """Drop the run's schema (PostgreSQL) or delete its keys (Redis); an SQLite file goes with the work dir."""
        if self.kind == "postgresql":
            import psycopg

            base = urlsplit(self.url)
            query = [(k, v) for k, v in parse_qsl(base.query) if k not in ("schema", "min_size", "max_size", "timeout")]
            with psycopg.connect(urlunsplit(base._replace(query=urlencode(query))), autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {dict(parse_qsl(base.query))['schema']} CASCADE")
        elif self.kind == "redis":
            import redis

            parts = urlsplit(self.url)
            query = [(k, v) for k, v in parse_qsl(parts.query) if k != "prefix"]
            client = redis.Redis.from_url(urlunsplit(parts._replace(query=urlencode(query))))
            try:
                for key in list(client.scan_iter(match=self.prefix + "*", count=1000)):
                    client.delete(key)
            finally:
                client.close()


# --- the relay, in a process of its own ----------------------------------------------------


class RelayProcess:
    """``bench/soak_relay.py`` in a child process, switched by a line on its stdin."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> int:
        """Start the relay; return its port."""
        host, port = self.upstream
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH / "soak_relay.py"),
            "--upstream",
            f"{host}:{port}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), 30)
        if not line.startswith(b"listening "):
            raise RuntimeError(f"the relay did not start: {line!r}")
        self.port = int(line.split()[1])
        return self.port

    async def set(self, mode: str) -> float:
        """Switch the relay to ``mode``; return the monotonic time it took effect."""
        assert self._process is not None
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.write(f"{mode}\n".encode())
        await self._process.stdin.drain()
        line = (await asyncio.wait_for(self._process.stdout.readline(), 30)).decode().split()
        if len(line) != 3 or line[0] != "ok":
            raise RuntimeError(f"the relay refused {mode!r}: {' '.join(line)}")
        return float(line[2])

    async def stop(self) -> None:
        """Stop the relay (EOF on its stdin, then SIGKILL after 5 s)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


# --- the workers and the supervisor that kills them -----------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Life:
    name: str
    process: asyncio.subprocess.Process
    started: float
    ready: float | None = None
    ended: float | None = None
    killed: bool = False

    def record(self) -> WorkerLife:
        return WorkerLife(self.name, self.process.pid, self.started, self.ready, self.ended, self.killed)


@dataclass
class _Slot:
    index: int
    port: int
    life: _Life | None = None
    ready: bool = False
    generation: int = 0


def _log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # a child's stdout and stderr: the child writes, not this event loop


class Supervisor:
    """Keeps ``count`` uvicorn workers running, each on a port of its own; kills one at random when asked.

    A worker killed (or exited) is started again on the same port (uvicorn
    binds it with SO_REUSEADDR); until the new one listens, connections to
    the port are refused and the clients' round-robin moves on to the next.
    """

    def __init__(self, count: int, factory: str, env: dict[str, str], logs: Path, rng: random.Random) -> None:
        self.slots = [_Slot(index, _free_port()) for index in range(1, count + 1)]
        self._factory = factory
        self._env = {**os.environ, **env}
        self._logs = logs
        self._rng = rng
        self._lives: list[_Life] = []
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def lives(self) -> list[WorkerLife]:
        """Every worker process of the run."""
        return [life.record() for life in self._lives]

    def ready_ports(self) -> list[int]:
        """Ports of the workers that accept connections now (all ports when none does)."""
        ports = [slot.port for slot in self.slots if slot.ready]
        return ports or [slot.port for slot in self.slots]

    async def start(self, within: float = 90.0) -> None:
        """Start every worker; return once each accepts connections.

        Raises:
            RuntimeError: a worker was not ready within ``within`` seconds.
        """
        self._tasks = [asyncio.ensure_future(self._keep(slot)) for slot in self.slots]
        deadline = time.monotonic() + within
        while not all(slot.ready for slot in self.slots):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not start within {within:g} s; see {self._logs}")
            await asyncio.sleep(0.05)

    def kill_one(self) -> str | None:
        """SIGKILL a random ready worker, never the last one ready; return its name (None when none was killed)."""
        ready = [slot for slot in self.slots if slot.ready and slot.life is not None]
        if len(ready) < 2:
            return None
        slot = self._rng.choice(ready)
        life = slot.life
        assert life is not None
        slot.ready = False
        life.ended = time.monotonic()
        life.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(life.process.pid, signal.SIGKILL)
        return life.name

    async def stop(self) -> None:
        """Stop every worker: SIGTERM, then SIGKILL after 10 s."""
        self._stopping = True
        live = [life for life in self._lives if life.process.returncode is None]
        for life in live:
            with contextlib.suppress(ProcessLookupError):
                life.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(life.process.wait() for life in live)), 10)
        for life in live:
            if life.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    life.process.kill()
                await life.process.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _spawn(self, slot: _Slot) -> _Life:
        slot.generation += 1
        name = f"w{slot.index}.{slot.generation}"
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            self._factory,
            "--factory",
            "--app-dir",
            str(BENCH),
            "--host",
            "127.0.0.1",
            "--port",
            str(slot.port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--lifespan",
            "on",
            "--timeout-graceful-shutdown",
            "2",
        ]
        with _log_file(self._logs / f"{name}.log") as log:
            process = await asyncio.create_subprocess_exec(
                *command,
                env={**self._env, "SOAK_WORKER": name},
                stdout=log,
                stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
            )
        life = _Life(name, process, time.monotonic())
        self._lives.append(life)
        slot.life = life
        return life

    async def _until_ready(self, slot: _Slot, life: _Life) -> None:
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", slot.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if life.ended is None:
                life.ready = time.monotonic()
                slot.ready = True
            return

    async def _keep(self, slot: _Slot) -> None:
        failures = 0
        while not self._stopping:
            life = await self._spawn(slot)
            ready = asyncio.ensure_future(self._until_ready(slot, life))
            await life.process.wait()
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
            slot.ready = False
            if self._stopping:
                return  # stopped at the end of the run: it lived to the end
            if life.ended is None:
                life.ended = time.monotonic()
            if life.killed:
                failures = 0
                continue
            # Exited on its own (a start-up that failed, usually): back off, and
            # after two failures that never listened, take another port.
            failures += 1
            if failures >= 2 and life.ready is None:
                slot.port = _free_port()
            await asyncio.sleep(min(0.25 * failures, 2.0))


# --- the load --------------------------------------------------------------------------------


class RoundRobin(httpx.AsyncBaseTransport):
    """Sends each attempt to the next ready worker's port, at most ``in_flight`` at once; records every attempt.

    A connection refused (a worker just killed) is sent to the next port at
    once, within the same attempt: nothing reached a server, as a load
    balancer's connect retry.
    """

    def __init__(self, ports: Callable[[], list[int]], in_flight: int, attempts: list[AttemptRecord]) -> None:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
        self._http = httpx.AsyncHTTPTransport(limits=limits)
        self._ports = ports
        self._slots = asyncio.Semaphore(in_flight)
        self._turn = itertools.count()
        self._attempts = attempts
        self.rerouted = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        key = request.headers.get("idempotency-key", "")
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
        async with self._slots:
            ports = self._ports()
            first = next(self._turn)
            start = time.monotonic()
            for turn in range(first, first + len(ports)):
                port = ports[turn % len(ports)]
                routed = httpx.Request(
                    request.method,
                    request.url.copy_with(port=port),
                    headers=headers,
                    content=request.content,
                    extensions=request.extensions,
                )
                start = time.monotonic()
                try:
                    response = await self._http.handle_async_request(routed)
                    content = await response.aread()
                except httpx.ConnectError:
                    self.rerouted += 1
                    continue
                except httpx.TransportError as exc:
                    self._attempts.append(AttemptRecord(key, start, time.monotonic(), None, error=type(exc).__name__))
                    raise
                replayed = response.headers.get("idempotent-replayed") == "true"
                self._attempts.append(AttemptRecord(key, start, time.monotonic(), response.status_code, replayed))
                return httpx.Response(response.status_code, headers=response.headers, content=content, request=request)
            self._attempts.append(AttemptRecord(key, start, time.monotonic(), None, error="ConnectError"))
            raise httpx.ConnectError("no worker accepts connections", request=request)

    async def aclose(self) -> None:
        await self._http.aclose()


@dataclass(frozen=True, slots=True)
class Planned:
    """One key's request: its body, and how its duplicate is sent (None: no duplicate)."""

    key: str
    body: bytes
    duplicate: str | None


class Plan:
    """The requests, drawn from a seeded RNG in order: the same seed gives the same keys, bodies and duplicates.

    Args:
        seed: the RNG seed.
        duplicates: the fraction of keys sent twice; two thirds of them at
            the same instant (a double click), one third after the first
            client's final answer (a retry of a request that succeeded).
        work_ms: the handler's mean work, milliseconds (uniform 0 to twice it).
    """

    def __init__(self, seed: int, duplicates: float, work_ms: int) -> None:
        self._rng = random.Random(seed)
        self._duplicates = duplicates
        self._work_ms = work_ms
        self._serial = itertools.count(1)

    def next(self) -> Planned:
        rng = self._rng
        serial = next(self._serial)
        key = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        draw = rng.random()
        duplicate = "concurrent" if draw < self._duplicates * 2 / 3 else "later" if draw < self._duplicates else None
        body = {
            "order_id": f"order-{serial:07d}",
            "amount": rng.randrange(100, 100_000),
            "currency": rng.choice(("EUR", "USD", "GBP", "CHF")),
            "work_ms": rng.randint(0, 2 * self._work_ms),
        }
        return Planned(key, json.dumps(body, separators=(",", ":")).encode(), duplicate)


class Load:
    """``clients`` clients sending planned requests until stopped; each retries its key with idempo's transport."""

    def __init__(self, supervisor: Supervisor, plan: Plan, *, clients: int, in_flight: int, budget: float) -> None:
        self.attempts: list[AttemptRecord] = []
        self.answers: list[ClientAnswer] = []
        self.sent: dict[str, Planned] = {}
        self._plan = plan
        self._clients = clients
        self.transport = RoundRobin(supervisor.ready_ports, in_flight, self.attempts)
        retry = RetryPolicy(attempts=100_000, timeout=budget, wait_initial=0.05, wait_max=1.0)
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{supervisor.slots[0].port}",
            transport=AsyncIdempotentTransport(self.transport, retry=retry),
            timeout=30.0,
            trust_env=False,
        )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._client()) for _ in range(self._clients)]

    async def stop(self, within: float) -> int:
        """Send no new key; wait up to ``within`` s for the clients to finish theirs; return how many were cut off."""
        self._stop.set()
        _, pending = await asyncio.wait(self._tasks, timeout=within) if self._tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return len(pending)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _client(self) -> None:
        while not self._stop.is_set():
            planned = self._plan.next()
            self.sent[planned.key] = planned
            if planned.duplicate == "concurrent":
                await asyncio.gather(self.send(planned, "first"), self.send(planned, "concurrent"))
            else:
                await self.send(planned, "first")
                if planned.duplicate == "later":
                    await self.send(planned, "later")

    async def send(self, planned: Planned, role: str, record: bool = True) -> ClientAnswer:
        """Send one key's request until a final answer (or the budget runs out); record what the client got."""
        headers = {"Idempotency-Key": planned.key, "Content-Type": "application/json"}
        start = time.monotonic()
        try:
            response = await self.client.post("/payments", content=planned.body, headers=headers)
        except httpx.TransportError as exc:
            answer = ClientAnswer(planned.key, role, None, b"", start, time.monotonic(), type(exc).__name__)
        else:
            answer = ClientAnswer(planned.key, role, response.status_code, response.content, start, time.monotonic())
        if record:
            self.answers.append(answer)
        return answer


# --- the faults ------------------------------------------------------------------------------


def _span(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    a, b = float(low), float(high or low)
    if a < 0 or b < a:
        raise argparse.ArgumentTypeError(f"expected SECONDS or LOW-HIGH seconds, got {text!r}")
    return a, b


@dataclass
class Faults:
    """The fault schedule and what it did."""

    supervisor: Supervisor
    relay: RelayProcess | None
    rng: random.Random
    kill_every: tuple[float, float]
    outage: tuple[float, float]
    gap: tuple[float, float]
    kinds: tuple[str, ...]
    outages: list[Outage] = field(default_factory=list)
    kills: int = 0

    async def kill_storm(self, until: float) -> None:
        """SIGKILL a random worker every ``kill_every`` seconds until ``until``."""
        while True:
            wait = self.rng.uniform(*self.kill_every)
            if time.monotonic() + wait >= until:
                return
            await asyncio.sleep(wait)
            if self.supervisor.kill_one() is not None:
                self.kills += 1

    async def cuts(self, until: float) -> None:
        """Cut the relay for ``outage`` seconds every ``gap`` seconds, the kinds in turn, until ``until``."""
        assert self.relay is not None
        for kind in itertools.cycle(self.kinds):
            length = self.rng.uniform(*self.outage)
            pause = self.rng.uniform(*self.gap)
            if time.monotonic() + length >= until:
                return
            start = await self.relay.set(kind)
            _say(f"store cut: {kind} for {length:.1f} s")
            try:
                await asyncio.sleep(length)
            finally:
                end = await self.relay.set("pass")
                self.outages.append(Outage(kind, start, end))
            if time.monotonic() + pause >= until:
                return
            await asyncio.sleep(pause)


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    """What an app mode gets: the work directory and the store URL the soak uses (not through the relay)."""

    workdir: Path
    store_url: str


def _app_mode(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"soak_app_{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"soak_app_{name}":
            raise
        known = sorted(p.stem.removeprefix("soak_app_") for p in BENCH.glob("soak_app_*.py"))
        raise SystemExit(f"soak: no app mode {name!r} (bench/soak_app_{name}.py); known: {', '.join(known)}") from None


def _timeline(args: argparse.Namespace, outages: bool) -> list[tuple[str, float]]:
    """The phases as (name, seconds): warm-up, then faults, then a calm of one lease (+2 s) after each."""
    calm = args.lease + 2.0
    warm_up = min(2.0, args.duration / 10)
    kills = args.kill_every[1] > 0
    if args.faults == "together" or not (kills and outages):
        busy = args.duration - warm_up - calm
        if busy < 2:
            raise SystemExit(f"soak: --duration must be at least {4 + calm:g} s with a lease of {args.lease:g} s")
        name = "kills+outages" if kills and outages else "kills" if kills else "outages" if outages else "no faults"
        return [("warm-up", warm_up), (name, busy), ("calm", calm)]
    busy = args.duration - warm_up - 2 * calm
    if busy < 4:
        raise SystemExit(f"soak: --duration must be at least {6 + 2 * calm:g} s with a lease of {args.lease:g} s")
    # Outages get two thirds: the Done-when figures come from them; a kill every 1-2 s adds up fast.
    return [("warm-up", warm_up), ("kills", busy / 3), ("calm", calm), ("outages", busy * 2 / 3), ("calm", calm)]


async def _progress(load: Load, faults: Faults, started: float) -> None:
    while True:
        await asyncio.sleep(10)
        statuses = Counter(a.status for a in load.attempts)
        _say(
            f"{time.monotonic() - started:5.0f} s: {len(load.attempts):,} requests ({statuses.get(201, 0):,} 201, "
            f"{statuses.get(409, 0):,} 409, {statuses.get(503, 0):,} 503, {statuses.get(None, 0):,} no answer), "
            f"{faults.kills} kills, {len(faults.outages)} outages"
        )


async def _verify(load: Load, at_risk: set[str], sample: int, rng: random.Random, in_flight: int) -> dict[str, int]:
    """Send again the request of every ``at_risk`` key and of ``sample`` others whose clients got a 2xx.

    Each must replay the bytes its first client got. It runs after the last
    calm, so a record a failed save left in progress has a lapsed lease: a
    key whose result was lost executes again here, as it would for a client
    retrying late, and the ledger shows it.
    """
    first_ok: dict[str, ClientAnswer] = {}
    for answer in load.answers:
        if answer.ok:
            first_ok.setdefault(answer.key, answer)
    risky = sorted(at_risk & first_ok.keys())
    others = sorted(first_ok.keys() - at_risk)
    chosen = risky + rng.sample(others, min(sample, len(others)))
    outcome: Counter[str] = Counter()
    limit = asyncio.Semaphore(in_flight)

    async def one(key: str) -> None:
        async with limit:
            answer = await load.send(load.sent[key], "verify", record=False)
        if not answer.ok:
            outcome[f"no 2xx ({answer.status or answer.error})"] += 1
        elif answer.body == first_ok[key].body:
            outcome["identical"] += 1
        else:
            outcome["different"] += 1

    await asyncio.gather(*(one(key) for key in chosen))
    return {"keys": len(chosen), "ended_in_an_outage": len(risky), **outcome}


def _ended_in_outages(executions: list[Execution], outages: list[Outage]) -> set[str]:
    """Keys with an execution whose handler returned while the store was cut (or in the second before a cut)."""
    return {e.key for e in executions if e.end is not None and any(o.start - 1.0 <= e.end <= o.end for o in outages)}


async def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the soak; return its report (None when the store cannot be used)."""
    logging.getLogger("idempo").setLevel(logging.CRITICAL)  # the client's retry log, on every 409 and 503
    nonce = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="idempo-soak-"))
    (workdir / "logs").mkdir()
    target = StoreTarget.resolve(args.store, nonce, workdir)
    mode = _app_mode(args.app)
    context = RunContext(workdir, target.url)
    rng = random.Random(args.seed)
    relay = RelayProcess(target.upstream) if target.upstream is not None and args.outage[1] > 0 else None
    timeline = _timeline(args, outages=relay is not None)
    try:
        target.setup()
    except Exception as exc:  # any driver's error: the store is not there to soak
        print(f"soak: cannot use the store {target.label}: {exc}", file=sys.stderr)
        return None
    supervisor: Supervisor | None = None
    load: Load | None = None
    try:
        env = dict(mode.prepare(context))
        relay_port = await relay.start() if relay is not None else None
        env.update({"SOAK_STORE": target.via(relay_port), "SOAK_LEASE": str(args.lease)})
        supervisor = Supervisor(args.workers, mode.FACTORY, env, workdir / "logs", random.Random(rng.random()))
        _say(f"starting {args.workers} workers ({args.app} app) on {target.label}")
        await supervisor.start()
        plan = Plan(args.seed, args.duplicates, args.work_ms)
        load = Load(supervisor, plan, clients=args.clients, in_flight=args.concurrency, budget=args.budget)
        faults = Faults(
            supervisor,
            relay,
            random.Random(rng.random()),
            args.kill_every,
            args.outage,
            args.outage_gap,
            tuple(args.outage_kinds.split(",")),
        )
        started = time.monotonic()
        load.start()
        progress = asyncio.ensure_future(_progress(load, faults, started))
        try:
            for name, seconds in timeline:
                until = time.monotonic() + seconds
                _say(f"{name} for {seconds:.0f} s")
                jobs = []
                if "kills" in name:
                    jobs.append(faults.kill_storm(until))
                if "outages" in name:
                    jobs.append(faults.cuts(until))
                await asyncio.gather(*jobs)
                await asyncio.sleep(max(0.0, until - time.monotonic()))
            _say("stopping the load; waiting for the clients' last answers")
            cut_off = await load.stop(args.budget + 15)
            load_seconds = time.monotonic() - started
        finally:
            progress.cancel()
        grace = args.deadline + 2.0
        at_risk = _ended_in_outages(mode.read_executions(context), faults.outages)
        verify = await _verify(load, at_risk, args.verify, random.Random(rng.random()), args.concurrency)
        if cut_off:
            verify["clients cut off at the end"] = cut_off
        await supervisor.stop()
        lives = supervisor.lives
        if relay is not None:
            await relay.stop()
        left = target.left_in_progress()
        executions = mode.read_executions(context)
        settings = Settings(deadline=args.deadline, lease=args.lease, save_grace=grace)
        recorded = Recorded(
            settings,
            executions,
            lives,
            faults.outages,
            load.attempts,
            load.answers,
            rerouted=load.transport.rerouted,
            load_seconds=load_seconds,
            t0=started,
            left_in_progress=left,
            verify=verify,
        )
        figures = compute(recorded)
    finally:
        if load is not None:
            await load.aclose()
        if supervisor is not None:
            await supervisor.stop()
        if relay is not None:
            await relay.stop()
        with contextlib.suppress(Exception):
            mode.cleanup(context)
        try:
            target.cleanup()
        except Exception as exc:  # report, never hide the figures behind it
            _say(f"could not clean the store up: {exc}")
        if args.keep:
            _say(f"kept {workdir} (ledger, worker logs)")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

    return {
        "command": " ".join(["bench/soak.py", *sys.argv[1:]]),
        "header": _header(args, target, timeline, getattr(mode, "COUNTS", None)),
        "store": target.label,
        "app": args.app,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "timeline": timeline,
        "figures": figures,
        "checks": [
            {"passed": passed, "check": text}
            for passed, text in checks(figures, committed=getattr(mode, "COUNTS", None) is not None)
        ],
    }


def _header(
    args: argparse.Namespace, target: StoreTarget, timeline: list[tuple[str, float]], counts: str | None = None
) -> str:
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timeline)
    faults = (
        f"SIGKILL a worker every {args.kill_every[0]:g}-{args.kill_every[1]:g} s" if args.kill_every[1] else "no kills"
    )
    if target.upstream is not None and args.outage[1] > 0:
        faults += (
            f"; cut the store {args.outage[0]:g}-{args.outage[1]:g} s every {args.outage_gap[0]:g}-"
            f"{args.outage_gap[1]:g} s ({args.outage_kinds.replace(',', ', ')})"
        )
    else:
        faults += "; no outages" + (" (SQLite has no network to cut)" if target.kind == "sqlite" else "")
    return "\n".join(
        [
            f"idempo soak: {target.label}, app {args.app}, {args.workers} uvicorn workers, seed {args.seed}",
            f"  load    {args.clients} clients, at most {args.concurrency} requests in flight, "
            f"{args.duplicates:.0%} of keys sent twice; handler 0-{2 * args.work_ms} ms; lease {args.lease:g} s",
            f"  faults  {faults}; phases: {phases}",
            f"  judged  against a store deadline of {args.deadline:g} s (+1 s)",
            f"  counted executions are {counts or 'handler entries in the ledger'}",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/soak.py", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--store",
        default="postgres",
        help="postgres, redis, sqlite, or a postgresql:// or redis:// URL (default: postgres on 127.0.0.1)",
    )
    parser.add_argument("--app", default="plain", help="app mode: bench/soak_app_<APP>.py (default: plain)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default: 120)")
    parser.add_argument("--seed", type=int, default=1, help="seeds the keys, bodies, kills and cuts (default: 1)")
    parser.add_argument("--workers", type=int, default=3, help="uvicorn worker processes (default: 3)")
    parser.add_argument("--clients", type=int, default=128, help="concurrent clients (default: 128)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at most (default: 16)")
    parser.add_argument("--duplicates", type=float, default=0.3, help="fraction of keys sent twice (default: 0.3)")
    parser.add_argument("--work-ms", type=int, default=20, help="mean handler work, ms (uniform 0-2x; default: 20)")
    parser.add_argument("--lease", type=float, default=15.0, help="lease TTL, seconds (default: 15)")
    parser.add_argument(
        "--kill-every", type=_span, default=(1.0, 2.0), help="SIGKILL a worker every LOW-HIGH s (default: 1-2; 0: none)"
    )
    parser.add_argument(
        "--outage", type=_span, default=(4.0, 6.0), help="store cut length, LOW-HIGH s (default: 4-6; 0: none)"
    )
    parser.add_argument("--outage-gap", type=_span, default=(4.0, 8.0), help="between cuts, LOW-HIGH s (default: 4-8)")
    parser.add_argument(
        "--outage-kinds", default="blackhole,refuse", help="cut kinds, in turn (default: blackhole,refuse)"
    )
    parser.add_argument(
        "--faults",
        choices=("phased", "together"),
        default="phased",
        help="kills and cuts in phases (default) or at the same time",
    )
    parser.add_argument("--deadline", type=float, default=2.0, help="the store deadline to judge by, s (default: 2)")
    parser.add_argument("--budget", type=float, default=60.0, help="a client's retry budget per key, s (default: 60)")
    parser.add_argument("--verify", type=int, default=300, help="keys replayed after the run (default: 300)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (ledger, worker logs)")
    args = parser.parse_args(argv)
    for kind in args.outage_kinds.split(","):
        if kind not in ("blackhole", "refuse"):
            parser.error(f"--outage-kinds: unknown kind {kind!r} (blackhole, refuse)")
    if args.kill_every[1] > 0 and args.workers < 2:
        parser.error("--workers must be at least 2 to kill one (the last ready worker is never killed)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the soak, print its report (and write it as JSON with ``--json``); return the exit status."""
    args = parse_args(argv)
    report = asyncio.run(run(args))
    if report is None:
        return 2
    print(report["header"])
    print()
    print(render(report["figures"]))
    print()
    print("checks")
    for check in report["checks"]:
        print(f"  {'ok  ' if check['passed'] else 'FAIL'}  {check['check']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if all(check["passed"] for check in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
