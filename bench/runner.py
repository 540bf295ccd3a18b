"""Run the benchmark and write the report: ``./bench/run`` calls this in bench/.venv.

Steps: start every variant's server (one uvicorn worker each, pinned to one
CPU; for each scenario (f) run, a server of two workers, unpinned, started for it), check
correctness (scenarios c and d), seed the keys scenario (b) replays, run wrk
(pinned to the other CPU) against the variants in turn, round after round,
measure the store floor, the memory store's resident memory per 100,000
records, run the micro-benchmarks, evaluate issue 14's targets and write
``bench/results/<timestamp>.md`` (and ``.json``, and ``latest.md``).

Every store key the run makes carries a per-run prefix, the PostgreSQL
tables live in a per-run schema, and all of it is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import floor  # noqa: E402
import scenarios  # noqa: E402
from app import VARIANTS  # noqa: E402

# variant -> (store, label for the report)
INFO: dict[str, tuple[str, str]] = {
    "bare": ("-", "bare app (no idempotency)"),
    "raw-asgi": ("-", "raw ASGI app, no Starlette (uvicorn's floor)"),
    "idempo-memory": ("memory", "idempo"),
    "idempo-sqlite": ("SQLite", "idempo"),
    "idempo-redis": ("Redis", "idempo"),
    "idempo-postgres": ("PostgreSQL", "idempo"),
    "idempo-postgres-async-commit": ("PostgreSQL", "idempo, synchronous_commit=off (opt-in)"),
    "idempo-postgres-tx": ("PostgreSQL", "idempo, transactional route (the INSERT and the record commit together)"),
    "aih-memory": ("memory", "asgi-idempotency-header"),
    "aih-redis": ("Redis", "asgi-idempotency-header"),
    "powertools-redis": ("Redis", "Powertools idempotent_function"),
    "powertools-redis-validate": ("Redis", "Powertools idempotent_function + payload validation"),
    "fik-memory": ("memory", "fastapi-idempotency-key"),
    "fik-sqlite": ("SQLite", "fastapi-idempotency-key"),
    "fik-redis": ("Redis", "fastapi-idempotency-key"),
    "floor-memory": ("memory", "floor: a dict, no guarantees"),
    "pass-plain": ("-", "diagnostic: a middleware that passes through"),
    "pass-wrap": ("-", "diagnostic: a middleware that wraps send"),
    "floor-sqlite": ("SQLite", "floor: 1-2 statements, no guarantees"),
    "floor-redis": ("Redis", "floor: 1-2 round trips, no guarantees"),
    "floor-postgres": ("PostgreSQL", "floor: 1-2 round trips, no guarantees"),
}
assert set(INFO) == set(VARIANTS)
BEFORE = "@before"


def info(variant: str) -> tuple[str, str]:
    """(store, label) of a variant; ``<idempo variant>@before`` runs another idempo source (--compare-src)."""
    base, _, tag = variant.partition("@")
    store, label = INFO[base]
    return (store, f"{label}, before (--compare-src)") if tag else (store, label)


#: diagnostic variants, run only when named with --variants
DIAGNOSTIC = {"pass-plain", "pass-wrap"}
#: variants without an idempotency layer (references): only scenario (a) is checked
NOT_IDEMPOTENT = {"bare", "raw-asgi", *DIAGNOSTIC, "floor-memory", "floor-sqlite", "floor-redis", "floor-postgres"}

# Targets (issue 14), every one a ratio of two variants in the same rounds (median of per-round ratios).
#: idempo's req/s against the floor on the same store, scenarios (a) and (b)
FLOOR_TARGET = 0.85
#: idempo's req/s against every peer that passes the scenario's correctness check, same store
PEER_TARGET = 1.0
#: idempo's p99 against the bare app's p99, every idempo row
P99_TARGET = 2.0
#: scenario (e): idempo on PostgreSQL's p50 against the bare handler's (which does one INSERT itself)
E_P50_TARGET = 1.6
#: the store -> the variant-id suffix of idempo's and the floor's variants
STORE_IDS = {"memory": "memory", "SQLite": "sqlite", "Redis": "redis", "PostgreSQL": "postgres"}
SCENARIO_NAMES = {
    "a": "(a) unique keys",
    "b": "(b) replays",
    "e": "(e) a handler that commits one PostgreSQL INSERT, unique keys",
    "f": "(f) two uvicorn workers, unique keys",
}
SCENARIOS = tuple(SCENARIO_NAMES)
#: variants run in scenario (e): the bare handler, idempo on the memory store and on PostgreSQL, the floor
E_VARIANTS = {
    "bare",
    "idempo-memory",
    "idempo-postgres",
    "idempo-postgres-async-commit",
    "idempo-postgres-tx",
    "floor-postgres",
}
#: variants that only (e) loads (their handler differs on /orders only)
E_ONLY = {"idempo-postgres-tx"}
#: variants run in scenario (f): the bare app, idempo and the floor on every store
F_VARIANTS = {"bare", *(f"{kind}-{store}" for kind in ("idempo", "floor") for store in STORE_IDS.values())}
#: workers in scenario (f)
F_WORKERS = 2


def runs_in(variant: str, scenario: str) -> bool:
    """Whether ``variant`` (``@before`` included) runs in a load ``scenario``."""
    base = variant.partition("@")[0]
    if base in E_ONLY:
        return scenario == "e"
    if scenario == "e":
        return base in E_VARIANTS
    if scenario == "f":
        return base in F_VARIANTS
    return True


@dataclass
class Settings:
    rounds: int
    duration: int
    connections: int
    replay_keys: int
    c_keys: int
    d_keys: int
    floor_ops: int
    micro: bool
    variants: list[str]
    scenarios: list[str]
    server_cpu: int | None
    load_cpu: int | None
    redis_url: str
    pg_url: str
    command: str
    mode: str
    profile: str | None = None
    compare_src: str | None = None
    #: seconds of py-spy per unmet target's row after the rounds (0: none)
    profile_unmet: int = 0


@dataclass
class Server:
    variant: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    #: the other workers of a multi-worker server (scenario f), on the same listening socket
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid, *(p.pid for p in self.others)]


@dataclass
class Run:
    """One wrk run of one variant in one scenario."""

    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    executions: int
    other_cores: float


@dataclass
class Result:
    variant: str
    runs: dict[str, list[Run]] = field(default_factory=dict)
    checks: dict[str, tuple[bool | None, str]] = field(default_factory=dict)
    skipped: str = ""


# --- machine --------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
    }


def versions(redis_url: str, pg_url: str) -> dict[str, str]:
    out: dict[str, str] = {}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True, text=True)
    out["idempo"] = (
        f"{metadata.version('idempo')} (commit {commit.stdout.strip()}"
        f"{', src modified' if dirty.stdout.strip() else ''})"
    )
    for dist in (
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "redis",
        "hiredis",
        "psycopg",
        "psycopg-pool",
        "asgi-idempotency-header",
        "aws-lambda-powertools",
        "fastapi-idempotency-key",
        "aiosqlite",
        "pytest-benchmark",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    out["wrk"] = (wrk.stdout + wrk.stderr).split("[")[0].replace("wrk ", "").strip() or "?"
    out["SQLite"] = sqlite3.sqlite_version
    with contextlib.suppress(Exception):
        import redis

        out["Redis server"] = redis.Redis.from_url(redis_url, socket_timeout=2).info("server")["redis_version"]
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(pg_url, connect_timeout=2) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            out["PostgreSQL server"] = str(row[0]) if row else "?"
    return out


class CpuMeter:
    """Cores busy on the machine outside the given processes, over an interval (from /proc)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = self._sample()

    @staticmethod
    def _machine() -> tuple[float, float]:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    def _ours(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError, IndexError):
                parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += float(parts[11]) + float(parts[12]) + float(parts[13]) + float(parts[14])
        return total

    def _sample(self) -> tuple[float, float, float, float]:
        busy, total = self._machine()
        return busy, total, self._ours(), time.monotonic()

    def other_cores(self, extra_ticks: float = 0.0) -> float:
        busy1, _, ours1, t1 = self._sample()
        busy0, _, ours0, t0 = self.start
        hz = os.sysconf("SC_CLK_TCK")
        seconds = max(t1 - t0, 1e-6)
        other = (busy1 - busy0) - (ours1 - ours0) - extra_ticks
        return max(0.0, other / hz / seconds)


# --- servers ----------------------------------------------------------------------------


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if cpu is not None else cmd


def variant_env(
    variant: str, env: dict[str, str], settings: Settings, workdir: Path, nonce: str, schema: str
) -> dict[str, str]:
    """The server's environment; an ``@before`` variant gets the other source and stores of its own."""
    if not variant.endswith(BEFORE) or not settings.compare_src:
        return env
    before = workdir / "before"
    before.mkdir(exist_ok=True)
    return dict(
        env,
        PYTHONPATH=str(Path(settings.compare_src).resolve()),
        BENCH_NONCE=f"{nonce}:b",
        BENCH_PG_SCHEMA=schema + "_b",
        BENCH_DIR=str(before),
    )


def start_server(variant: str, env: dict[str, str], settings: Settings, logdir: Path, workers: int = 1) -> Server:
    """One server of ``variant``: one worker pinned to the server CPU, or ``workers`` unpinned processes.

    Several workers accept on one listening socket (as uvicorn's own
    ``--workers`` does) and keep their execution totals in one shared file.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    name = variant if workers == 1 else f"{variant}-x{workers}"
    log = logdir / f"{name}.log"
    base = variant.partition("@")[0]
    cmd = [sys.executable, str(HERE / "server.py"), "--fd", str(sock.fileno()), "--variant", base]
    procs = []
    counter = logdir / f"{name}.counter"
    counter.unlink(missing_ok=True)  # a fresh total: a previous run's workers left theirs in it
    with open(log, "wb") as out:
        for worker in range(workers):
            if workers == 1:
                worker_env, worker_cmd = env, pinned(cmd, settings.server_cpu)
            else:
                worker_env = dict(env, BENCH_COUNTER=str(counter), BENCH_WORKER=str(worker))
                worker_cmd = cmd
            procs.append(
                subprocess.Popen(
                    worker_cmd, pass_fds=[sock.fileno()], env=worker_env, stdout=out, stderr=subprocess.STDOUT
                )
            )
    sock.close()
    return Server(variant, port, procs[0], log, procs[1:])


async def wait_ready(server: Server, timeout: float = 30.0) -> str:  # noqa: ASYNC109
    """'' when the server answers GET /_stats; else why not (its log's last lines)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in (server.proc, *server.others)):
            break
        try:
            await scenarios.get_json(server.port, "/_stats")
            if server.others:
                await asyncio.sleep(1.0)  # every worker has started (each answers once its app is built)
            return ""
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await asyncio.sleep(0.1)
    tail = server.log.read_text(errors="replace").strip().splitlines()[-3:]
    return "server did not start: " + " | ".join(tail)


def stop_servers(servers: list[Server]) -> None:
    procs = [p for s in servers for p in (s.proc, *s.others)]
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def rss_bytes(pids: list[int]) -> int:
    """The resident set size of some processes, summed (from /proc)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


# --- stores --------------------------------------------------------------------------


def services(settings: Settings) -> dict[str, str]:
    """Which external stores are reachable: name -> '' (yes) or why not."""
    out = {}
    try:
        import redis

        redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2).ping()
        out["Redis"] = ""
    except Exception as exc:
        out["Redis"] = f"Redis unreachable at {settings.redis_url}: {type(exc).__name__}"
    try:
        import psycopg

        psycopg.connect(settings.pg_url, connect_timeout=2).close()
        out["PostgreSQL"] = ""
    except Exception as exc:
        out["PostgreSQL"] = f"PostgreSQL unreachable at {settings.pg_url}: {type(exc).__name__}"
    return out


def prepare_postgres(settings: Settings, schema: str) -> None:
    """idempo's schema in ``schema`` and ``<schema>_ac`` (the async-commit variant), the floor's and (e)'s tables."""
    import psycopg

    from idempo.stores.postgres import PostgresStore

    for name in (schema, schema + "_ac", schema + "_tx", schema + "_b", schema + "_b_ac", schema + "_b_tx"):
        store = PostgresStore(settings.pg_url, schema=name, check_schema=False, application_name="idempo-bench")
        try:
            store.create_schema()
        finally:
            store.close()
    with psycopg.connect(settings.pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".bench_floor (k text PRIMARY KEY, v bytea)')
        for name in (schema, schema + "_b"):  # scenario (e)'s handler inserts here (BENCH_PG_SCHEMA)
            conn.execute(
                f'CREATE TABLE "{name}".bench_orders (id bigserial PRIMARY KEY, serial bigint NOT NULL, '
                "amount bigint, currency text, created_at timestamptz NOT NULL DEFAULT now())"
            )


def cleanup_stores(settings: Settings, nonce: str, schema: str, reachable: dict[str, str]) -> None:
    if not reachable.get("Redis"):
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(settings.redis_url)
            batch = []
            for key in client.scan_iter(match=f"{nonce}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    client.unlink(*batch)
                    batch = []
            if batch:
                client.unlink(*batch)
            client.close()
    if not reachable.get("PostgreSQL"):
        with contextlib.suppress(Exception):
            import psycopg

            with psycopg.connect(settings.pg_url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                for suffix in ("_ac", "_tx", "_b", "_b_ac", "_b_tx"):
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}{suffix}" CASCADE')


# --- load ----------------------------------------------------------------------------


def run_wrk(port: int, script: str, args: list[str], duration: float, settings: Settings) -> dict[str, Any]:
    cmd = pinned(
        [
            "wrk",
            "-t1",
            f"-c{settings.connections}",
            f"-d{duration}s",
            "--timeout",
            "5s",
            "-s",
            str(HERE / "lua" / script),
            f"http://127.0.0.1:{port}/payments",
            "--",
            *args,
        ],
        settings.load_cpu,
    )
    env = dict(os.environ, BENCH_LUA_DIR=str(HERE / "lua"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60)
    match = re.search(r"BENCH_RESULT (\{.*\})", proc.stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no result: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    result: dict[str, Any] = json.loads(match.group(1))
    return result


def settle(max_wait: float = 1.5, quiet: float = 0.25) -> float:
    """Wait until the machine is quiet (under ``quiet`` cores busy over 200 ms), at most ``max_wait`` s.

    Store servers go on working after a run (PostgreSQL's WAL writer and
    checkpoints, Redis' expiry), which would land on the next variant's run.
    Returns the cores busy in the last window.
    """
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + max_wait
    while True:
        busy0, _ = CpuMeter._machine()
        time.sleep(0.2)
        busy1, _ = CpuMeter._machine()
        busy = (busy1 - busy0) / hz / 0.2
        if busy < quiet or time.monotonic() >= deadline:
            return busy


async def load_run(server: Server, scenario: str, nonce: str, rnd: int, duration: float, settings: Settings) -> Run:
    if rnd:  # measured runs only, not the warm-up
        settle()
    before = await scenarios.executions(server.port)
    meter = CpuMeter(server.pids)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    if scenario in ("a", "f"):
        out = run_wrk(server.port, "unique.lua", [f"{scenario}{rnd}-{nonce}"], duration, settings)
    elif scenario == "e":
        out = run_wrk(server.port, "unique.lua", [f"e{rnd}-{nonce}", "/orders"], duration, settings)
    else:
        out = run_wrk(server.port, "replay.lua", [f"r-{nonce}", str(settings.replay_keys)], duration, settings)
    # wrk has exited: its CPU time is in this process's reaped children
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_seconds = (done.ru_utime - children.ru_utime) + (done.ru_stime - children.ru_stime)
    other = meter.other_cores(wrk_seconds * os.sysconf("SC_CLK_TCK"))
    after = await scenarios.executions(server.port)
    seconds = out["duration_us"] / 1e6
    return Run(
        round=rnd,
        rps=out["requests"] / seconds,
        p50_ms=out["p50_us"] / 1000,
        p99_ms=out["p99_us"] / 1000,
        requests=out["requests"],
        non_2xx=out["status_errors"],
        socket_errors=out["connect_errors"] + out["read_errors"] + out["write_errors"] + out["timeouts"],
        executions=after - before,
        other_cores=other,
    )


async def checked(check: Any) -> tuple[bool, str]:
    """A correctness check's verdict; a server that broke the exchange (closed a connection mid-answer) fails it."""
    try:
        result: tuple[bool, str] = await check
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return False, f"the server broke the exchange: {type(exc).__name__}: {exc}"[:200]
    return result


def load_check(scenario: str, runs: list[Run], connections: int) -> tuple[bool, str]:
    """(a), (e), (f): every request executed once and answered 2xx; (b): nothing executed, all 2xx."""
    problems = []
    non_2xx = sum(r.non_2xx for r in runs)
    requests = sum(r.requests for r in runs)
    if non_2xx:
        problems.append(f"{non_2xx}/{requests} answers not 2xx")
    if sum(r.socket_errors for r in runs):
        problems.append(f"{sum(r.socket_errors for r in runs)} socket errors/timeouts")
    for r in runs:
        if scenario != "b" and not (r.requests <= r.executions <= r.requests + connections):
            problems.append(f"round {r.round}: {r.executions} executions for {r.requests} answers")
        if scenario == "b" and r.executions:
            problems.append(f"round {r.round}: {r.executions} executions for {r.requests} replays")
    return (not problems), "; ".join(problems[:3])


# --- the run ---------------------------------------------------------------------------


async def run(settings: Settings) -> Path:
    started = time.monotonic()
    nonce = "bench" + uuid.uuid4().hex[:10]
    schema = nonce
    workdir = Path(tempfile.mkdtemp(prefix="idempo-bench-"))
    logdir = workdir / "logs"
    logdir.mkdir()
    load_start = os.getloadavg()
    reachable = services(settings)
    results = {v: Result(v) for v in settings.variants}
    machine = machine_info()
    vers = versions(settings.redis_url, settings.pg_url)
    env = dict(
        os.environ,
        BENCH_NONCE=nonce,
        BENCH_REDIS_URL=settings.redis_url,
        BENCH_PG_URL=settings.pg_url,
        BENCH_PG_SCHEMA=schema,
        BENCH_DIR=str(workdir),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])),
    )
    servers: list[Server] = []
    #: scenario (f): variant -> its server of F_WORKERS processes
    groups: dict[str, Server] = {}
    floor_results: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    micro: dict[str, Any] | str = "not run (--no-micro)"
    try:
        if not reachable["PostgreSQL"]:
            prepare_postgres(settings, schema)
        elif "e" in settings.scenarios:  # (e)'s handler needs PostgreSQL
            settings.scenarios.remove("e")
        for v in settings.variants:
            store = info(v)[0]
            if reachable.get(store):
                results[v].skipped = reachable[store]
                continue
            servers.append(start_server(v, variant_env(v, env, settings, workdir, nonce, schema), settings, logdir))
        live: list[Server] = []
        for s in servers:
            why = await wait_ready(s)
            if why:
                results[s.variant].skipped = why
            else:
                live.append(s)
        log(f"{len(live)} servers up in {time.monotonic() - started:.1f}s")

        # --- correctness: (c) and (d), and seeding (b)'s keys ---------------------
        for s in live:
            res = results[s.variant]
            if s.variant in NOT_IDEMPOTENT:
                for c in ("c0", "c20", "d"):
                    res.checks[c] = (None, "not checked: no idempotency layer")
            else:
                for work in (0, 20):
                    res.checks[f"c{work}"] = await checked(
                        scenarios.concurrent_duplicates(s.port, f"c{work}-{nonce}", settings.c_keys, work)
                    )
                res.checks["d"] = await checked(scenarios.failed_then_retried(s.port, f"d-{nonce}", settings.d_keys))
            if "b" in settings.scenarios:
                ok, detail = await scenarios.seed(s.port, f"r-{nonce}", settings.replay_keys)
                if not ok:
                    res.checks["seed"] = (False, detail)
            log(
                f"  {s.variant}: "
                + ", ".join(
                    f"{k}={'OK' if ok else ('n/a' if ok is None else 'FAIL')}" for k, (ok, _) in res.checks.items()
                )
            )

        # --- load: warm-up, then rounds, variants alternating -------------------------
        async def load_run_in(s: Server, scenario: str, rnd: int, duration: float) -> Run | None:
            """One run of ``s``'s variant; (f) starts the variant's workers for it and stops them after
            (idle, their PostgreSQL pools would hold connections of the shared server)."""
            if not runs_in(s.variant, scenario):
                return None
            if scenario != "f":
                return await load_run(s, scenario, nonce, rnd, duration, settings)
            venv = variant_env(s.variant, env, settings, workdir, nonce, schema)
            group = groups[s.variant] = start_server(s.variant, venv, settings, logdir, workers=F_WORKERS)
            try:
                why = await wait_ready(group)
                if why:
                    results[s.variant].checks["f"] = (False, why)
                    return None
                await load_run(group, scenario, nonce, 0, 1, settings)  # warm-up
                return await load_run(group, scenario, nonce, rnd, duration, settings)
            finally:
                stop_servers([group])
                del groups[s.variant]

        log("warm-up")
        for scenario in settings.scenarios:
            if scenario == "f":
                continue  # (f) warms its workers up in each run
            for s in live:
                await load_run_in(s, scenario, 0, 1)
        # the memory store's servers: resident memory against the records they complete under load
        rss_start = {
            s.variant: (rss_bytes(s.pids), await scenarios.executions(s.port))
            for s in live
            if s.variant.startswith("idempo-memory")
        }
        for rnd in range(1, settings.rounds + 1):
            shift = (rnd - 1) % max(len(live), 1)
            order = live[shift:] + live[:shift]
            for scenario in settings.scenarios:
                for s in order:
                    r = await load_run_in(s, scenario, rnd, settings.duration)
                    if r is not None:
                        results[s.variant].runs.setdefault(scenario, []).append(r)
            log(
                f"round {rnd}/{settings.rounds} done ({time.monotonic() - started:.0f}s, load {os.getloadavg()[0]:.2f})"
            )
        for s in live:
            if s.variant in rss_start:
                rss0, exec0 = rss_start[s.variant]
                rss1, exec1 = rss_bytes(s.pids), await scenarios.executions(s.port)
                memory[s.variant] = {"rss_bytes": rss1 - rss0, "records": exec1 - exec0, "rss_end": rss1}
        for s in live:
            for scenario in settings.scenarios:
                if scenario not in results[s.variant].runs:
                    continue
                if scenario == "b" and s.variant in ("bare", "raw-asgi"):
                    results[s.variant].checks[scenario] = (None, "executes every request: no idempotency layer")
                else:
                    check = load_check(scenario, results[s.variant].runs[scenario], settings.connections)
                    results[s.variant].checks[scenario] = check
    except BaseException:  # interrupted or failed: leave nothing behind
        stop_servers([*servers, *groups.values()])
        cleanup_stores(settings, nonce, schema, reachable)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    stop_servers([*servers, *groups.values()])

    # --- the memory store's records, in a fresh process ------------------------------------
    log("memory store: resident memory per 100,000 records")
    memory["store"] = measure_memory_store(env)

    # --- the store floor -----------------------------------------------------------------
    log("store floor")
    if settings.load_cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {settings.load_cpu})
    try:
        floor_results = await floor.measure_all(
            settings.redis_url if not reachable["Redis"] else None,
            settings.pg_url if not reachable["PostgreSQL"] else None,
            schema,
            f"{nonce}:probe:",
            workdir,
            settings.floor_ops,
        )
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        cleanup_stores(settings, nonce, schema, reachable)

    if settings.micro:
        log("micro-benchmarks")
        micro = run_micro(settings, workdir)
    targets = evaluate_targets(settings, results)
    profiles: dict[tuple[str, str], Profile] = {}
    run_stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if settings.profile_unmet:
        # The issue asks a target that is not met to show why: each unmet row's idempo variant is
        # profiled under the same scenario's load, after the measured rounds so it cannot skew them.
        for t in targets:
            key = (t.variant, t.scenario)
            if t.met is False and t.variant and key not in profiles:
                log(f"profile of an unmet row: {t.variant}, scenario {t.scenario}")
                # stamped, so a later run does not overwrite the profiles a report links to
                profiles[key] = await profile(
                    settings, f"{t.variant}:{t.scenario}:{settings.profile_unmet}", f"{run_stamp}-profile"
                )
    load_end = os.getloadavg()
    elapsed = time.monotonic() - started
    report = render(
        settings,
        machine,
        vers,
        results,
        floor_results,
        micro,
        load_start,
        load_end,
        elapsed,
        reachable,
        targets,
        memory,
        profiles,
    )
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{stamp}-{settings.mode}.md"
    path.write_text(report)
    (out_dir / "latest.md").write_text(report)
    raw = {
        "settings": settings.__dict__,
        "machine": machine,
        "versions": vers,
        "floor": floor_results,
        "memory": memory,
        "targets": [t.__dict__ for t in targets],
        "profiles": {f"{v}:{sc}": str(p.path.relative_to(ROOT)) for (v, sc), p in profiles.items()},
        "micro": micro,
        "results": {
            v: {
                "skipped": r.skipped,
                "checks": r.checks,
                "runs": {k: [x.__dict__ for x in runs] for k, runs in r.runs.items()},
            }
            for v, r in results.items()
        },
    }
    path.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    shutil.rmtree(workdir, ignore_errors=True)
    log(f"report: {path.relative_to(ROOT)} ({elapsed:.0f}s)")
    print("\n".join(render_targets(targets)), flush=True)
    return path


def measure_memory_store(env: dict[str, str]) -> dict[str, Any]:
    """``bench/memory_store.py --json``: RSS added by 100,000 completed records, in a fresh process."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "memory_store.py"), "100000", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-500:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run_micro(settings: Settings, workdir: Path) -> dict[str, Any] | str:
    out = workdir / "micro.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE / "micro"),
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-only",
        f"--benchmark-json={out}",
        "--benchmark-min-rounds=20",
        "--benchmark-warmup=on",
        "--benchmark-max-time=" + ("0.3" if settings.mode == "quick" else "1.0"),
        "-o",
        "addopts=",
        "-W",
        "ignore",
    ]
    proc = subprocess.run(pinned(cmd, settings.load_cpu), capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        return "failed: " + (proc.stdout + proc.stderr)[-800:]
    data = json.loads(out.read_text())
    return {
        b["name"]: {"median_us": b["stats"]["median"] * 1e6, "iqr_us": b["stats"]["iqr"] * 1e6}
        for b in data["benchmarks"]
    }


# --- the targets (issue 14) --------------------------------------------------------------


@dataclass
class Target:
    """One target of issue 14 on one row: the figure (a median of per-round ratios) against its bound."""

    what: str
    figure: str
    bound: str
    met: bool | None  # None: not measured (a variant skipped or not run)
    #: the idempo variant and scenario the figure is about: what --profile-unmet profiles when it is not met
    variant: str = ""
    scenario: str = ""


def ratio_field(a: list[Run], b: list[Run], name: str) -> list[float]:
    """Per-round ratios of a Run field (``p50_ms``, ``p99_ms``), a over b."""
    by_round = {r.round: getattr(r, name) for r in b}
    return [getattr(r, name) / by_round[r.round] for r in a if by_round.get(r.round)]


def evaluate_targets(settings: Settings, results: dict[str, Result]) -> list[Target]:
    """Issue 14's targets, each met or not, from the runs of one ./bench/run."""
    out: list[Target] = []

    def runs(variant: str, scenario: str) -> list[Run]:
        res = results.get(variant)
        return [] if res is None or res.skipped else res.runs.get(scenario, [])

    def add(what: str, ratios: list[float], bound: float, at_least: bool, variant: str, scenario: str) -> None:
        if not ratios:
            out.append(
                Target(what, "not measured", f"{'>=' if at_least else '<='} {bound:.2f}", None, variant, scenario)
            )
            return
        m = med(ratios)
        out.append(
            Target(
                what,
                fmt_range(ratios),
                f"{'>=' if at_least else '<='} {bound:.2f}",
                m >= bound if at_least else m <= bound,
                variant,
                scenario,
            )
        )

    for scenario in ("a", "b"):
        if scenario not in settings.scenarios:
            continue
        for store, sid in STORE_IDS.items():
            idempo = f"idempo-{sid}"
            if idempo not in results:
                continue
            mine = runs(idempo, scenario)
            name = SCENARIO_NAMES[scenario]
            add(
                f"{store} {name}: idempo / floor req/s",
                ratio_runs(mine, runs(f"floor-{sid}", scenario)),
                FLOOR_TARGET,
                True,
                idempo,
                scenario,
            )
            for peer, pres in results.items():
                if info(peer)[0] != store or peer.startswith(("idempo-", "floor-")) or pres.skipped:
                    continue
                ok = pres.checks.get(scenario, (None, ""))[0]
                if ok:
                    add(
                        f"{store} {name}: idempo / {peer} req/s",
                        ratio_runs(mine, runs(peer, scenario)),
                        PEER_TARGET,
                        True,
                        idempo,
                        scenario,
                    )
            add(
                f"{store} {name}: idempo p99 / bare p99",
                ratio_field(mine, runs("bare", scenario), "p99_ms"),
                P99_TARGET,
                False,
                idempo,
                scenario,
            )
    if "e" in settings.scenarios:
        add(
            f"{SCENARIO_NAMES['e']}: idempo on PostgreSQL p50 / bare p50",
            ratio_field(runs("idempo-postgres", "e"), runs("bare", "e"), "p50_ms"),
            E_P50_TARGET,
            False,
            "idempo-postgres",
            "e",
        )
        add(
            f"{SCENARIO_NAMES['e']}: idempo on PostgreSQL, transactional route, p50 / bare p50",
            ratio_field(runs("idempo-postgres-tx", "e"), runs("bare", "e"), "p50_ms"),
            E_P50_TARGET,
            False,
            "idempo-postgres-tx",
            "e",
        )
    return out


def render_targets(targets: list[Target]) -> list[str]:
    met = sum(t.met is True for t in targets)
    lines = [
        f"## Targets (issue 14): {met} of {len(targets)} met",
        "",
        "Each figure is a median of per-round ratios [min-max] of two variants in the same rounds.",
        "",
        "| target | figure | bound | met |",
        "|---|---|---|---|",
    ]
    for t in targets:
        verdict = "not measured" if t.met is None else "met" if t.met else "NOT met"
        lines.append(f"| {t.what} | {t.figure} | {t.bound} | {verdict} |")
    return lines


def render_profiles(targets: list[Target], profiles: dict[tuple[str, str], Profile]) -> list[str]:
    """The report's answer to "why not met": each unmet row's profile, components by self time."""
    lines = [
        "## Why the unmet targets are not met: profiles",
        "",
        "Each idempo row with a target not met, profiled with py-spy under the same scenario's load after the "
        "measured rounds (`--profile-unmet`): self time by component, % of the server's busy samples. Where "
        "idempo's own share (middleware, core, store) is small, the row is bound by what idempo cannot "
        "change (the HTTP server, the store's client library, the event loop); where it is large, by idempo's "
        "Python per request. Function-level tables in each linked file.",
        "",
        "| row | unmet targets | req/s while profiled | idempo: middleware and core | idempo: store | top components |",
        "|---|---|---|---|---|---|",
    ]
    for (variant, scenario), prof in profiles.items():
        parts = prof.components
        unmet = [
            t.what.split(": ", 1)[-1]
            for t in targets
            if (t.variant, t.scenario) == (variant, scenario) and t.met is False
        ]
        others = [(name, pct) for name, pct in sorted(parts.items(), key=lambda i: -i[1]) if "idempo" not in name]
        top = ", ".join(f"{name} {pct:.1f}" for name, pct in others[:3])
        lines.append(
            f"| [`{variant}` ({scenario})]({prof.path.name}) | {'; '.join(unmet)} | {prof.rps:.0f} | "
            f"{parts.get('idempo: middleware and core', 0.0):.1f} | {parts.get('idempo: store', 0.0):.1f} | {top} |"
        )
    return lines


# --- the report ------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio_runs(a: list[Run], b: list[Run]) -> list[float]:
    """Per-round ratios a/b (runs of the same round share the machine's state)."""
    by_round = {r.round: r.rps for r in b}
    return [r.rps / by_round[r.round] for r in a if by_round.get(r.round)]


def fmt_range(xs: list[float], digits: int = 2, scale: float = 1.0) -> str:
    if not xs:
        return "-"
    m = med(xs) * scale
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{min(xs) * scale:.{digits}f}-{max(xs) * scale:.{digits}f}]"


def check_cell(check: tuple[bool | None, str] | None) -> str:
    if check is None:
        return "-"
    ok, detail = check
    if ok is None:
        return "n/a"
    if ok:
        return f"OK ({detail})" if detail else "OK"
    return f"FAIL: {detail}"


def render(
    settings: Settings,
    machine: dict[str, str],
    vers: dict[str, str],
    results: dict[str, Result],
    floor_results: dict[str, Any],
    micro: dict[str, Any] | str,
    load_start: tuple[float, float, float],
    load_end: tuple[float, float, float],
    elapsed: float,
    reachable: dict[str, str],
    targets: list[Target],
    memory: dict[str, Any],
    profiles: dict[tuple[str, str], Profile] | None = None,
) -> str:
    lines: list[str] = []
    w = lines.append
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    w(f"# idempo bench: {now} ({settings.mode})")
    w("")
    w(f"Command: `{settings.command}` ({elapsed / 60:.1f} min). ")
    w(
        f"Load: wrk 1 thread, {settings.connections} connections, {settings.rounds} round(s) x {settings.duration} s "
        f"per variant "
        f"and scenario, variants alternating within each round (start rotated per round), after a 1 s warm-up each; "
        f"server pinned to CPU {settings.server_cpu}, wrk to CPU {settings.load_cpu}; Redis and PostgreSQL unpinned."
    )
    w("")
    w(f"Machine: {machine['cpu']}, {machine['cores']} cores, Linux {machine['kernel']}, Python {machine['python']}. ")
    all_other = [r.other_cores for res in results.values() for runs in res.runs.values() for r in runs]
    w(
        f"Load average at start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, at end "
        f"{load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}. CPU busy outside the server under test "
        f"and wrk (Redis/PostgreSQL, other users) during runs: median {med(all_other):.2f} cores, max "
        f"{max(all_other, default=float('nan')):.2f}."
    )
    w("")
    w("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".")
    w("")
    lines.extend(render_targets(targets))
    w("")
    if profiles:
        lines.extend(render_profiles(targets, profiles))
        w("")
    bare = results.get("bare")
    for scenario in settings.scenarios:
        w(f"## {SCENARIO_NAMES[scenario]}")
        w("")
        if scenario == "e":
            w(
                "`POST /orders`: the handler commits one INSERT into PostgreSQL (its own pool of 1-4 connections) "
                "before answering; a new key per request. p50 x bare is the target's figure. `idempo-postgres-tx` "
                "is transactional mode: the store on the handler's pool (`AsyncPostgresStore.from_pool`), the "
                "INSERT through the request's transaction, the record's completion pipelined with its COMMIT."
            )
            w("")
        if scenario == "f":
            w(
                f"Each variant served by {F_WORKERS} uvicorn workers accepting on one socket, unpinned (wrk on CPU "
                f"{settings.load_cpu}), a new key per request. x 1 worker: against the same variant's (a) run in the "
                "same round (one worker pinned to a CPU of its own). The memory store is per process: with two "
                "workers it is not one store (unique keys never repeat, so the scenario still holds)."
            )
            w("")
        w(
            "req/s, p50 and p99 latency: median over rounds [min-max]. x bare, x floor, p50/p99 x bare: median of "
            "per-round ratios [min-max]; the floor is the same store's."
        )
        w("")
        extra = "x 1 worker" if scenario == "f" else "p50 x bare"
        w(f"| variant | store | req/s | p50 ms | p99 ms | x bare | x floor | {extra} | p99 x bare | correct |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        bare_runs = bare.runs.get(scenario, []) if bare else []
        for v, res in results.items():
            if not res.skipped and scenario not in res.runs:
                continue
            store, label = info(v)
            name = f"{label} (`{v}`)"
            if res.skipped:
                w(f"| {name} | {store} | skipped: {res.skipped} | | | | | | | |")
                continue
            runs = res.runs.get(scenario, [])
            ratios = ratio_runs(runs, bare_runs) if v != "bare" else []
            floor_v = f"floor-{STORE_IDS.get(store, '')}"
            floor_runs = results[floor_v].runs.get(scenario, []) if floor_v in results and floor_v != v else []
            if scenario == "f":
                extra_cell = fmt_range(ratio_runs(runs, res.runs.get("a", [])))
            else:
                extra_cell = fmt_range(ratio_field(runs, bare_runs, "p50_ms")) if v != "bare" else "1.00"
            w(
                f"| {name} | {store} | {fmt_range([r.rps for r in runs], 0)} | {fmt_range([r.p50_ms for r in runs])} | "
                f"{fmt_range([r.p99_ms for r in runs])} | "
                f"{fmt_range(ratios) if ratios else '1.00' if v == 'bare' else '-'} | "
                f"{fmt_range(ratio_runs(runs, floor_runs))} | {extra_cell} | "
                f"{fmt_range(ratio_field(runs, bare_runs, 'p99_ms')) if v != 'bare' else '1.00'} | "
                f"{check_cell(res.checks.get(scenario))} |"
            )
        w("")
    w("## Resident memory of the memory store")
    w("")
    store_mem = memory.get("store", {})
    if "mib_per_100k" in store_mem:
        w(
            f"`bench/memory_store.py 100000 --json` (a fresh process, 100,000 records completed through `MemoryStore`, "
            f"each a 201 with a ~60-byte JSON body and two headers): **{store_mem['mib_per_100k']:.1f} MiB per 100,000 "
            f"completed records** ({store_mem['rss_bytes'] / store_mem['records']:.0f} bytes a record)."
        )
    else:
        w(f"`bench/memory_store.py` failed: {store_mem.get('error', 'not run')}")
    for v, m in memory.items():
        if v == "store" or not m.get("records"):
            continue
        w("")
        w(
            f"The `{v}` server under the load: RSS +{m['rss_bytes'] / 2**20:.1f} MiB for {m['records']:,} records "
            f"completed after the warm-up = {m['rss_bytes'] / 2**20 * 100_000 / m['records']:.1f} MiB per 100,000 "
            f"(RSS at the end {m['rss_end'] / 2**20:.0f} MiB; includes the allocator's growth for the load itself)."
        )
    w("")
    # idempo against each peer on the same store
    w("## idempo against the peers and the floor on the same store")
    w("")
    w("idempo's req/s divided by the other's, median of per-round ratios [min-max]. A ratio against a variant that")
    w("fails the scenario's correctness check compares unlike work (e.g. a 422 answered instead of a replay).")
    w("")
    w("| store | scenario | idempo | against | idempo / other | other correct |")
    w("|---|---|---|---|---|---|")
    for v, res in results.items():
        if not v.startswith("idempo-") or BEFORE in v or res.skipped:
            continue
        store = info(v)[0]
        for scenario in settings.scenarios:
            for other, ores in results.items():
                comparable = other == v + BEFORE or not other.startswith("idempo-")
                if other == v or not comparable or info(other)[0] != store or ores.skipped:
                    continue
                ratios = ratio_runs(res.runs.get(scenario, []), ores.runs.get(scenario, []))
                if not ratios:
                    continue
                w(
                    f"| {store} | {SCENARIO_NAMES[scenario]} | `{v}` | `{other}` | {fmt_range(ratios)} | "
                    f"{check_cell(ores.checks.get(scenario))} |"
                )
    w("")
    w("## Correctness")
    w("")
    w(
        f"(a)/(b)/(e)/(f): every load answer 2xx; (a), (e), (f) one execution per request, (b) none. "
        f"(c): 16 clients send one key at the "
        f"same instant, {settings.c_keys} keys, with 0 and 20 ms of handler work: exactly one execution per key, "
        f"every answer "
        f"that execution's 201 or a 409, and a follow-up gets the 201 replayed. (d): the first attempt fails with 500 "
        f"(the handler raises; or it answers 500), {settings.d_keys} keys each: the retry executes once (201), "
        f"the next "
        f"retry replays it."
    )
    w("")
    w("| variant | (a) | (b) | (c) 0 ms | (c) 20 ms | (d) | (e) | (f) |")
    w("|---|---|---|---|---|---|---|---|")
    for v, res in results.items():
        if res.skipped:
            w(f"| `{v}` | skipped: {res.skipped} | | | | | | |")
            continue
        cells = [check_cell(res.checks.get(k)) for k in ("a", "b", "c0", "c20", "d", "e", "f")]
        if "seed" in res.checks:
            cells[1] = check_cell(res.checks["seed"]) + "; " + cells[1]
        w(f"| `{v}` | " + " | ".join(cells) + " |")
    w("")
    w("## Store floor")
    w("")
    w(
        "One operation at a time (median latency) and 32 concurrent callers on one event loop (throughput), with the "
        "client libraries and pool settings of idempo's stores. An execution costs idempo two round trips (begin, "
        "complete), a replay one."
    )
    w("")
    w("| store | operation | latency us | ops/s (32 concurrent) |")
    w("|---|---|---|---|")
    for store, ops in floor_results.items():
        if isinstance(ops, str):
            w(f"| {store} | {ops} | | |")
            continue
        for op, m in ops.items():
            w(f"| {store} | {op} | {m['latency_us']:.0f} | {m['ops_per_s']:.0f} |")
    w("")
    w("## Micro-benchmarks (pytest-benchmark, `bench/micro/`)")
    w("")
    if isinstance(micro, str):
        w(micro)
    else:
        w("| benchmark | median us | IQR us |")
        w("|---|---|---|")
        for name, m in micro.items():
            w(f"| `{name}` | {m['median_us']:.2f} | {m['iqr_us']:.2f} |")
    w("")
    if any(reachable.values()):
        w("Skipped stores: " + "; ".join(v for v in reachable.values() if v))
        w("")
    return "\n".join(lines)


@dataclass
class Profile:
    """What :func:`profile` wrote and measured: the file, req/s while sampled, self % by component."""

    path: Path
    rps: float
    components: dict[str, float]


async def profile(settings: Settings, spec: str, prefix: str = "profile") -> Profile:
    """Profile one variant under one load scenario with py-spy; write the top entries.

    ``spec`` is ``VARIANT:SCENARIO[:SECONDS]``. py-spy samples the server at
    250 Hz while wrk runs (each sample pauses it for microseconds); the
    collapsed stacks are summed into self and inclusive time per function.
    """
    variant, scenario, *rest = spec.split(":")
    seconds = int(rest[0]) if rest else 10
    nonce = "bench" + uuid.uuid4().hex[:10]
    workdir = Path(tempfile.mkdtemp(prefix="idempo-bench-"))
    reachable = services(settings)
    env = dict(
        os.environ,
        BENCH_NONCE=nonce,
        BENCH_REDIS_URL=settings.redis_url,
        BENCH_PG_URL=settings.pg_url,
        BENCH_PG_SCHEMA=nonce,
        BENCH_DIR=str(workdir),
    )
    raw = workdir / "stacks.txt"
    server: Server | None = None
    try:
        if INFO[variant][0] == "PostgreSQL":
            prepare_postgres(settings, nonce)
        server = start_server(variant, env, settings, workdir)
        why = await wait_ready(server)
        if why:
            raise SystemExit(why)
        if scenario == "b":
            await scenarios.seed(server.port, f"r-{nonce}", settings.replay_keys)
        await load_run(server, scenario, nonce, 0, 2, settings)  # warm-up
        spy = subprocess.Popen(  # noqa: ASYNC220 (a driver script: nothing else runs on this loop)
            pinned(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(server.proc.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "400",
                    "--nonblocking",
                    "--duration",
                    str(seconds + 1),
                    "--output",
                    str(raw),
                ],
                settings.load_cpu,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # noqa: ASYNC251
        r = await load_run(server, scenario, nonce, 1, seconds, settings)
        spy.wait(timeout=seconds + 30)
    finally:
        stop_servers([server] if server is not None else [])
        cleanup_stores(settings, nonce, nonce, reachable)
    selfs: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [re.sub(r" \(.*/(site-packages|src|lib/python3[.0-9]+)/", " (", f) for f in stack.split(";")]
        total += count
        selfs[frames[-1]] = selfs.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    components: dict[str, int] = {}
    for frame, n in selfs.items():
        part = _component(frame)
        components[part] = components.get(part, 0) + n
    lines = [
        f"# py-spy profile: `{variant}`, scenario {scenario}, {seconds} s",
        "",
        f"{r.rps:.0f} req/s under load; {total} samples of the server's busy time (function-level, 250 Hz).",
        "",
        "| self % | component |",
        "|---|---|",
    ]
    lines += [f"| {100 * n / total:.1f} | {part} |" for part, n in sorted(components.items(), key=lambda i: -i[1])]
    lines += ["", "| self % | function |", "|---|---|"]
    lines += [f"| {100 * n / total:.1f} | `{f}` |" for f, n in sorted(selfs.items(), key=lambda i: -i[1])[:30]]
    lines += ["", "| inclusive % | function |", "|---|---|"]
    lines += [f"| {100 * n / total:.1f} | `{f}` |" for f, n in sorted(incl.items(), key=lambda i: -i[1])[:45]]
    out = HERE / "results" / f"{prefix}-{variant}-{scenario}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    shutil.copy(raw, out.with_suffix(".stacks.txt"))
    shutil.rmtree(workdir, ignore_errors=True)
    log(f"profile: {out.relative_to(ROOT)}")
    return Profile(out, r.rps, {part: 100 * n / total for part, n in components.items()})


_COMPONENTS = (
    ("idempo/stores/", "idempo: store"),
    ("idempo/", "idempo: middleware and core"),
    ("redis/", "redis-py"),
    ("psycopg_pool/", "psycopg (pool)"),
    ("psycopg/", "psycopg"),
    ("uvicorn/", "uvicorn (HTTP, httptools)"),
    ("starlette/", "Starlette (app, routing, request, response)"),
    ("app.py", "the bench handler"),
    ("json/", "json (stdlib)"),
    ("asyncio/", "event loop (uvloop, asyncio; I/O syscalls)"),
)


def _component(frame: str) -> str:
    for marker, name in _COMPONENTS:
        if marker in frame:
            return name
    return "other"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="bench/run", description="idempo against the bare app and the Python peers.")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s, fewer keys: a smoke run (~3 min)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--duration", type=int, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--variants", help="comma-separated variant ids (default: all)")
    parser.add_argument(
        "--scenarios", default="a,b,e,f", help="load scenarios to run, comma-separated: a, b, e, f (default: all)"
    )
    parser.add_argument("--no-micro", action="store_true", help="skip the pytest-benchmark micro-benchmarks")
    parser.add_argument("--server-cpu", default="0", help="CPU for the servers ('none': unpinned)")
    parser.add_argument("--load-cpu", default="1", help="CPU for wrk ('none': unpinned)")
    parser.add_argument(
        "--compare-src",
        metavar="DIR",
        help="also run each idempo variant on another idempo source tree (DIR holds the idempo package), "
        "as <variant>@before, alternating in the same rounds",
    )
    parser.add_argument("--profile", metavar="VARIANT:SCENARIO[:SECONDS]", help="py-spy one variant under load instead")
    parser.add_argument(
        "--profile-unmet",
        type=int,
        metavar="SECONDS",
        help="after the rounds, py-spy each unmet target's idempo row for SECONDS and put the profiles in the report "
        "(default: 8 in a full run, 0 (none) with --quick)",
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args(argv)
    quick = args.quick
    variants = args.variants.split(",") if args.variants else [v for v in VARIANTS if v not in DIAGNOSTIC]
    unknown = [v for v in variants if v.partition("@")[0] not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if "bare" not in variants:
        variants.insert(0, "bare")
    if args.compare_src:
        variants = [x for v in variants for x in ((v, v + BEFORE) if v.startswith("idempo-") else (v,))]
    ncpu = os.cpu_count() or 1
    server_cpu = None if args.server_cpu == "none" or ncpu < 2 or not shutil.which("taskset") else int(args.server_cpu)
    load_cpu = None if args.load_cpu == "none" or ncpu < 2 or not shutil.which("taskset") else int(args.load_cpu)
    return Settings(
        rounds=args.rounds or (1 if quick else 4),
        duration=args.duration or (2 if quick else 3),
        connections=args.connections,
        replay_keys=200 if quick else 1000,
        c_keys=20 if quick else 100,
        d_keys=5 if quick else 20,
        floor_ops=500 if quick else 2000,
        micro=not args.no_micro,
        variants=variants,
        scenarios=[s for s in args.scenarios.split(",") if s in SCENARIOS],
        server_cpu=server_cpu,
        load_cpu=load_cpu,
        redis_url=args.redis_url,
        pg_url=args.pg_url,
        command=os.environ.get(
            "BENCH_COMMAND", "./bench/run " + " ".join(argv if argv is not None else sys.argv[1:])
        ).strip(),
        mode="quick" if quick else "full",
        profile=args.profile,
        compare_src=args.compare_src,
        profile_unmet=(0 if quick else 8) if args.profile_unmet is None else args.profile_unmet,
    )


def main() -> None:
    settings = parse()
    if settings.profile:
        asyncio.run(profile(settings, settings.profile))
    else:
        asyncio.run(run(settings))


if __name__ == "__main__":
    main()
