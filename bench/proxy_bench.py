"""The proxy bench (issue 13): ``./bench/run --proxy [options]`` runs this in bench/.venv.

What sits between wrk and the bench's bare app (``bench/app.py``, variant
``bare``, one uvicorn worker) in each variant:

- ``direct``: nothing;
- ``nginx``: Debian's nginx, one worker, upstream keepalive (64 idle connections);
- ``proxy-disabled``: ``idempo proxy --disable``, a plain forwarder (the baseline of the targets);
- ``proxy-memory``, ``-sqlite``, ``-redis``, ``-postgres``: ``idempo proxy`` with that store;
- ``inproc-memory``, ``-sqlite``, ``-redis``, ``-postgres``: no proxy; the app with
  ``IdempotencyMiddleware`` on the same store (bench/app.py's ``idempo-<store>``),
  served where the upstream is served;
- ``proxy-disabled-httpx``, ``proxy-memory-aiohttp``, ...: a ``proxy-*`` variant
  with ``[upstream] client`` set (the plain ``proxy-*`` ones use the default);
  not run unless ``--variants`` names them. Their "x disabled" is against the
  ``proxy-disabled`` of the same client, and the report compares the two
  clients store by store.

Pinning (``taskset``): the upstream (or the in-process app) and wrk on CPU 1
in every variant; the proxy (nginx, ``idempo proxy``) on CPU 0.

Scenarios: ``get`` (GET passthrough, ``bench/lua/get.lua``), (a) unique keys,
(b) replays (keys completed beforehand), both load scenarios as bench/README.md
defines them, and the correctness checks (c) concurrent duplicates and (d) a
failure then retries (``bench/scenarios.py``), sent through the proxy and
counted at the upstream. Then each variant's unloaded p50 (one connection),
for GET and (a). The report (``bench/results/<stamp>-proxy.md`` and ``.json``)
gives req/s, p50/p99 per variant and scenario (median over rounds), the ratios
against ``proxy-disabled`` (median of per-round ratios) and the issue's targets
with met / NOT met.

``--profile VARIANT:SCENARIO[:SECONDS]`` serves one proxy variant under load
and samples the proxy process with py-spy; it writes the top functions (self
and inclusive time) to ``bench/results/profile-proxy-<variant>-<scenario>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import scenarios  # noqa: E402
from runner import (  # noqa: E402
    CpuMeter,
    Server,
    machine_info,
    pinned,
    services,
    settle,
    start_server,
    stop_servers,
    versions,
    wait_ready,
)

STORES = {"memory": "memory", "sqlite": "SQLite", "redis": "Redis", "postgres": "PostgreSQL"}
#: ``[upstream] client`` values: a ``proxy-<store>-<client>`` variant sets one (``proxy-<store>``: the default)
CLIENTS = ("httpx", "aiohttp")
#: the client of the plain ``proxy-<store>`` variants (idempo's default ``[upstream] client``)
DEFAULT_CLIENT = "aiohttp"
#: the variants a run has unless --variants says otherwise
VARIANTS = (
    "direct",
    "nginx",
    "proxy-disabled",
    *(f"proxy-{s}" for s in STORES),
    *(f"inproc-{s}" for s in STORES),
)
#: the proxy variants with a client of their own (run when --variants names them)
CLIENT_VARIANTS = tuple(f"proxy-{s}-{c}" for c in CLIENTS for s in ("disabled", *STORES))
ALL_VARIANTS = (*VARIANTS, *CLIENT_VARIANTS)
LABELS = {
    "direct": "wrk -> app",
    "nginx": "nginx (1 worker, keepalive 64) -> app",
    "proxy-disabled": "idempo proxy --disable -> app",
    **{f"proxy-{s}": f"idempo proxy, {name} store -> app" for s, name in STORES.items()},
    **{f"inproc-{s}": f"app with IdempotencyMiddleware, {name} store (no proxy)" for s, name in STORES.items()},
    **{f"proxy-disabled-{c}": f"idempo proxy --disable, client = {c} -> app" for c in CLIENTS},
    **{
        f"proxy-{s}-{c}": f"idempo proxy, {name} store, client = {c} -> app"
        for c in CLIENTS
        for s, name in STORES.items()
    },
}
#: variants that keep no record: (b) executes every request, (c) and (d) are not checked
NOT_IDEMPOTENT = {"direct", "nginx", "proxy-disabled", *(f"proxy-disabled-{c}" for c in CLIENTS)}
SCENARIOS = ("get", "a", "b")
SCENARIO_NAMES = {"get": "GET passthrough", "a": "(a) unique keys", "b": "(b) replays"}
#: the issue's targets against proxy-disabled, by scenario and store (first estimates)
TARGETS = {
    "get": dict.fromkeys(STORES, 0.95),
    "a": {"memory": 0.90, "sqlite": 0.80, "redis": 0.65, "postgres": 0.50},
    "b": {"memory": 2.0, "sqlite": 1.6, "redis": 1.3, "postgres": 1.1},
}
DISABLED_VS_DIRECT = 0.45
ADDED_P50_MS = 1.0
UPSTREAM_CPU = 1
PROXY_CPU = 0

#: idempo proxy's configuration in the bench: the defaults, with as many idle upstream
#: connections kept as wrk opens (nginx keeps 64), so neither closes a connection per request.
PROXY_CONFIG = """\
[upstream]
max_connections = 128
max_keepalive_connections = 64
"""


def split_variant(variant: str) -> tuple[str, str, str | None]:
    """``proxy-memory-aiohttp`` -> ``("proxy", "memory", "aiohttp")``; ``direct`` -> ``("direct", "", None)``."""
    kind, _, rest = variant.partition("-")
    store, _, client = rest.partition("-")
    return kind, store, client or None


def disabled_for(variant: str) -> str:
    """The ``proxy-disabled`` variant a variant's "x disabled" is against: the same client's."""
    kind, _, client = split_variant(variant)
    return f"proxy-disabled-{client}" if kind == "proxy" and client else "proxy-disabled"


NGINX_CONFIG = """\
worker_processes 1;
daemon off;
user root;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    upstream app {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""


@dataclass
class Settings:
    rounds: int
    duration: int
    warmup: int
    connections: int
    replay_keys: int
    c_keys: int
    d_keys: int
    unloaded: int
    variants: list[str]
    scenarios: list[str]
    redis_url: str
    pg_url: str
    command: str
    profile: str | None = None
    #: for runner.start_server: the upstream's CPU
    server_cpu: int | None = UPSTREAM_CPU
    load_cpu: int | None = UPSTREAM_CPU


@dataclass
class Run:
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
class Front:
    """What wrk talks to in one variant: a port, the processes to pin and measure, the upstream's port."""

    variant: str
    port: int
    upstream_port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log: Path | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def log(msg: str) -> None:
    print(f"[proxy-bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def store_url(store: str, settings: Settings, workdir: Path, nonce: str, schema: str) -> str:
    if store == "memory":
        return "memory://"
    if store == "sqlite":
        return f"sqlite:///{workdir / 'proxy-idempo.db'}"
    if store == "redis":
        sep = "&" if "?" in settings.redis_url else "?"
        return f"{settings.redis_url}{sep}prefix={nonce}:proxy:"
    sep = "&" if "?" in settings.pg_url else "?"
    return f"{settings.pg_url}{sep}schema={schema}_px"


def start_proxy(
    variant: str, upstream: int, url: str | None, workdir: Path, logdir: Path, client: str | None = None
) -> Front:
    """``idempo proxy`` pinned to the proxy's CPU; its port read from its first line."""
    config = workdir / f"{variant}.toml"
    config.write_text(PROXY_CONFIG + (f'client = "{client}"\n' if client else ""))
    args = ["--config", str(config), "--upstream", f"http://127.0.0.1:{upstream}", "--listen", "127.0.0.1:0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPO_PROXY_")}
    env["PYTHONUNBUFFERED"] = "1"
    if url is None:
        args.append("--disable")
    else:
        env["IDEMPO_PROXY_STORE"] = url
    out = logdir / f"{variant}.log"
    cmd = pinned([sys.executable, "-m", "idempo", "proxy", *args], PROXY_CPU)
    with out.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", out.read_text(errors="replace"))
        if found or proc.poll() is not None:
            break
        time.sleep(0.05)
    if not found:
        proc.kill()
        raise RuntimeError(f"{variant} did not start: {out.read_text(errors='replace')[-800:]}")
    return Front(variant, int(found.group(1)), upstream, [proc], out)


def start_nginx(upstream: int, workdir: Path, logdir: Path) -> Front:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONFIG.format(workdir=workdir, upstream=upstream, port=port))
    out = logdir / "nginx.log"
    with out.open("wb") as f:
        proc = subprocess.Popen(
            pinned([nginx, "-c", str(conf), "-p", str(workdir)], PROXY_CPU), stdout=f, stderr=subprocess.STDOUT
        )
    return Front("nginx", port, upstream, [proc], out)


async def ready(front: Front, timeout: float = 30.0) -> str:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in front.procs):
            break
        try:
            await scenarios.get_json(front.port, "/_stats")
            return ""
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await asyncio.sleep(0.1)
    tail = front.log.read_text(errors="replace").strip().splitlines()[-3:] if front.log else []
    return "did not start: " + " | ".join(tail)


def wrk(port: int, script: str, args: list[str], duration: float, connections: int) -> dict[str, Any]:
    cmd = pinned(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s", "-s", str(HERE / "lua" / script)]
        + [f"http://127.0.0.1:{port}/payments", "--", *args],
        UPSTREAM_CPU,
    )
    env = dict(os.environ, BENCH_LUA_DIR=str(HERE / "lua"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60)
    match = re.search(r"BENCH_RESULT (\{.*\})", proc.stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no result: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    result: dict[str, Any] = json.loads(match.group(1))
    return result


def script_for(scenario: str, variant: str, nonce: str, rnd: int, settings: Settings) -> tuple[str, list[str]]:
    if scenario == "get":
        return "get.lua", []
    if scenario == "a":
        return "unique.lua", [f"a{rnd}-{variant}-{nonce}"]
    return "replay.lua", [f"r-{variant}-{nonce}", str(settings.replay_keys)]


async def load_run(
    front: Front, scenario: str, nonce: str, rnd: int, duration: float, settings: Settings, connections: int
) -> Run:
    if rnd:
        settle()
    before = await scenarios.executions(front.port)
    meter = CpuMeter(front.pids)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    script, args = script_for(scenario, front.variant, nonce, rnd, settings)
    out = wrk(front.port, script, args, duration, connections)
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_seconds = (done.ru_utime - children.ru_utime) + (done.ru_stime - children.ru_stime)
    other = meter.other_cores(wrk_seconds * os.sysconf("SC_CLK_TCK"))
    after = await scenarios.executions(front.port)
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


def load_check(variant: str, scenario: str, runs: list[Run], connections: int) -> tuple[bool | None, str]:
    """GET: all 2xx, nothing executed; (a): one execution per answer; (b): none (idempotent variants)."""
    problems = []
    non_2xx = sum(r.non_2xx for r in runs)
    if non_2xx:
        problems.append(f"{non_2xx}/{sum(r.requests for r in runs)} answers not 2xx")
    if sum(r.socket_errors for r in runs):
        problems.append(f"{sum(r.socket_errors for r in runs)} socket errors/timeouts")
    for r in runs:
        if scenario == "get" and r.executions:
            problems.append(f"round {r.round}: {r.executions} executions for GETs")
        if scenario == "a" and not (r.requests <= r.executions <= r.requests + connections):
            problems.append(f"round {r.round}: {r.executions} executions for {r.requests} answers")
        if scenario == "b" and variant not in NOT_IDEMPOTENT and r.executions:
            problems.append(f"round {r.round}: {r.executions} executions for {r.requests} replays")
    return (not problems), "; ".join(problems[:3])


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratios(a: list[Run], b: list[Run]) -> list[float]:
    by_round = {r.round: r.rps for r in b}
    return [r.rps / by_round[r.round] for r in a if by_round.get(r.round)]


def prepare_postgres(settings: Settings, schema: str) -> None:
    from idempo.stores.postgres import PostgresStore

    for name in (schema, schema + "_px"):
        store = PostgresStore(settings.pg_url, schema=name, check_schema=False, application_name="idempo-proxy-bench")
        try:
            store.create_schema()
        finally:
            store.close()


def cleanup(settings: Settings, nonce: str, schema: str, reachable: dict[str, str]) -> None:
    if not reachable.get("Redis"):
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(settings.redis_url)
            keys = list(client.scan_iter(match=f"{nonce}:*", count=1000))
            for i in range(0, len(keys), 1000):
                client.unlink(*keys[i : i + 1000])
            client.close()
    if not reachable.get("PostgreSQL"):
        with contextlib.suppress(Exception):
            import psycopg

            with psycopg.connect(settings.pg_url, autocommit=True) as conn:
                for name in (schema, schema + "_px"):
                    conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@contextlib.contextmanager
def fronts(settings: Settings, workdir: Path, nonce: str, schema: str, reachable: dict[str, str]) -> Any:
    """Start the upstream and every variant's front; yield (fronts, skipped); stop them all."""
    logdir = workdir / "logs"
    logdir.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        BENCH_NONCE=nonce,
        BENCH_REDIS_URL=settings.redis_url,
        BENCH_PG_URL=settings.pg_url,
        BENCH_PG_SCHEMA=schema,
        BENCH_DIR=str(workdir),
    )
    servers: list[Server] = []
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Front] = {}
    skipped: dict[str, str] = {}
    try:
        upstream = start_server("bare", env, settings, logdir)  # type: ignore[arg-type]
        servers.append(upstream)
        for v in settings.variants:
            kind, store, client = split_variant(v)
            need = STORES.get(store, "")
            if reachable.get(need):
                skipped[v] = reachable[need]
                continue
            if v == "direct":
                out[v] = Front(v, upstream.port, upstream.port, [upstream.proc], upstream.log)
            elif v == "nginx":
                out[v] = start_nginx(upstream.port, workdir, logdir)
            elif kind == "proxy":
                url = None if store == "disabled" else store_url(store, settings, workdir, nonce, schema)
                out[v] = start_proxy(v, upstream.port, url, workdir, logdir, client)
            else:
                server = start_server(f"idempo-{store}", env, settings, logdir)  # type: ignore[arg-type]
                servers.append(server)
                out[v] = Front(v, server.port, server.port, [server.proc], server.log)
            if v not in ("direct",) and kind != "inproc":
                procs.extend(out[v].procs)
        yield upstream, out, skipped
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        stop_servers(servers)


async def run(settings: Settings) -> Path:
    started = time.monotonic()
    nonce = "pbench" + uuid.uuid4().hex[:8]
    schema = nonce
    workdir = Path(tempfile.mkdtemp(prefix="idempo-proxy-bench-"))
    load_start = os.getloadavg()
    reachable = services(settings)  # type: ignore[arg-type]
    machine = machine_info()
    vers = versions(settings.redis_url, settings.pg_url)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        vers["nginx"] = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    runs: dict[str, dict[str, list[Run]]] = {v: {} for v in settings.variants}
    checks: dict[str, dict[str, tuple[bool | None, str]]] = {v: {} for v in settings.variants}
    unloaded: dict[str, dict[str, float]] = {v: {} for v in settings.variants}
    loads: list[tuple[float, float, float]] = [load_start]
    if not reachable["PostgreSQL"]:
        prepare_postgres(settings, schema)
    try:
        with fronts(settings, workdir, nonce, schema, reachable) as (upstream, live, skipped):
            for v, why in skipped.items():
                checks[v]["skipped"] = (None, why)
            why = await wait_ready(upstream)
            if why:
                raise RuntimeError(f"the upstream {why}")
            for v, front in list(live.items()):
                why = await ready(front)
                if why:
                    checks[v]["skipped"] = (False, why)
                    del live[v]
            log(f"{len(live)} variants up in {time.monotonic() - started:.1f}s; load {os.getloadavg()}")

            for v, front in live.items():
                if v in NOT_IDEMPOTENT:
                    for c in ("c0", "c20", "d"):
                        checks[v][c] = (None, "not checked: no idempotency")
                else:
                    for work in (0, 20):
                        checks[v][f"c{work}"] = await scenarios.concurrent_duplicates(
                            front.port, f"c{work}-{v}-{nonce}", settings.c_keys, work
                        )
                    checks[v]["d"] = await scenarios.failed_then_retried(front.port, f"d-{v}-{nonce}", settings.d_keys)
                    if "b" in settings.scenarios:
                        ok, detail = await scenarios.seed(front.port, f"r-{v}-{nonce}", settings.replay_keys)
                        if not ok:
                            checks[v]["seed"] = (False, detail)
                log(f"  {v}: " + ", ".join(f"{k}={ok}" for k, (ok, _) in checks[v].items()))

            order = list(live.values())
            log("warm-up")
            for scenario in settings.scenarios:
                for front in order:
                    await load_run(front, scenario, nonce, 0, settings.warmup, settings, settings.connections)
            for rnd in range(1, settings.rounds + 1):
                shift = (rnd - 1) % max(len(order), 1)
                rotated = order[shift:] + order[:shift]
                for scenario in settings.scenarios:
                    for front in rotated:
                        r = await load_run(
                            front, scenario, nonce, rnd, settings.duration, settings, settings.connections
                        )
                        runs[front.variant].setdefault(scenario, []).append(r)
                        log(f"round {rnd} {scenario} {front.variant}: {r.rps:.0f} req/s p50 {r.p50_ms:.2f} ms")
                loads.append(os.getloadavg())
            for v, per in runs.items():
                for scenario, rs in per.items():
                    checks[v][scenario] = load_check(v, scenario, rs, settings.connections)
            log("unloaded p50 (1 connection)")
            for front in order:
                for scenario in ("get", "a"):
                    r = await load_run(front, scenario, nonce, 99, settings.unloaded, settings, 1)
                    unloaded[front.variant][scenario] = r.p50_ms
            loads.append(os.getloadavg())
    finally:
        cleanup(settings, nonce, schema, reachable)
        shutil.rmtree(workdir, ignore_errors=True)
    document = {
        "command": settings.command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": asdict(settings),
        "machine": machine,
        "versions": vers,
        "load_average": loads,
        "runs": {v: {s: [asdict(r) for r in rs] for s, rs in per.items()} for v, per in runs.items()},
        "checks": checks,
        "unloaded_p50_ms": unloaded,
        "seconds": time.monotonic() - started,
    }
    targets = evaluate(runs, unloaded)
    document["targets"] = targets
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    md = results / f"{stamp}-proxy.md"
    md.write_text(render(document, runs, checks, unloaded, targets))
    md.with_suffix(".json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    print("\n".join(render_targets(targets)))
    return md


def evaluate(runs: dict[str, dict[str, list[Run]]], unloaded: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The issue's targets: each a median of per-round ratios of two variants (or a p50 difference)."""
    out: list[dict[str, Any]] = []
    base = runs.get("proxy-disabled", {})
    for scenario, per_store in TARGETS.items():
        for store, bound in per_store.items():
            mine = runs.get(f"proxy-{store}", {}).get(scenario, [])
            rs = ratios(mine, base.get(scenario, []))
            value = med(rs) if rs else None
            out.append(
                {
                    "what": f"{SCENARIO_NAMES[scenario]}, proxy-{store} vs proxy-disabled",
                    "value": value,
                    "bound": f">= {bound:.2f}x",
                    "met": None if value is None else value >= bound,
                }
            )
    direct = runs.get("direct", {})
    for scenario in ("get", "a"):
        rs = ratios(base.get(scenario, []), direct.get(scenario, []))
        value = med(rs) if rs else None
        out.append(
            {
                "what": f"{SCENARIO_NAMES[scenario]}, proxy-disabled vs direct",
                "value": value,
                "bound": f">= {DISABLED_VS_DIRECT:.2f}x",
                "met": None if value is None else value >= DISABLED_VS_DIRECT,
            }
        )
    for store in STORES:
        for scenario in ("get", "a"):
            mine = unloaded.get(f"proxy-{store}", {}).get(scenario)
            ref = unloaded.get("direct", {}).get(scenario)
            value = None if mine is None or ref is None else mine - ref
            out.append(
                {
                    "what": f"unloaded p50 added, {SCENARIO_NAMES[scenario]}, proxy-{store} vs direct (ms)",
                    "value": value,
                    "bound": f"<= {ADDED_P50_MS:.1f} ms",
                    "met": None if value is None else value <= ADDED_P50_MS,
                }
            )
    return out


def render_targets(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | value | bound | met |", "|---|---|---|---|"]
    for t in targets:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"| {t['what']} | {value} | {t['bound']} | {met} |")
    return lines


def render(
    document: dict[str, Any],
    runs: dict[str, dict[str, list[Run]]],
    checks: dict[str, dict[str, tuple[bool | None, str]]],
    unloaded: dict[str, dict[str, float]],
    targets: list[dict[str, Any]],
) -> str:
    s = document["settings"]
    loads = document["load_average"]
    lines = [
        f"# idempo proxy bench, {document['date']}",
        "",
        f"Command: `{document['command']}` ({document['seconds']:.0f} s). {s['rounds']} rounds of {s['duration']} s,"
        f" wrk 1 thread {s['connections']} connections; upstream (bench/app.py `bare`, one uvicorn worker) and wrk"
        f" on CPU {UPSTREAM_CPU}, the proxy on CPU {PROXY_CPU} (taskset).",
        f"Load average (1/5/15 min) at the start {loads[0][0]:.2f}/{loads[0][1]:.2f}/{loads[0][2]:.2f},"
        f" after each round: " + ", ".join(f"{x[0]:.2f}" for x in loads[1:]),
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in document["machine"].items()),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in document["versions"].items()),
        "",
        "## Targets (issue 13; ratios are medians of per-round ratios in this run)",
        "",
        *render_targets(targets),
        "",
        "## Load",
        "",
        "req/s and wrk's p50/p99 (median over rounds [min-max]); x disabled: median of per-round ratios"
        " against `proxy-disabled`; x direct: against `direct`; other cores: CPU busy outside the variant's"
        " processes and wrk (other users' jobs, the store servers, the upstream).",
        "",
    ]
    direct = runs.get("direct", {})
    for scenario in SCENARIOS:
        if not any(scenario in per for per in runs.values()):
            continue
        lines += [
            f"### {SCENARIO_NAMES[scenario]}",
            "",
            "| variant | req/s | p50 ms | p99 ms | x disabled | x direct | other cores | check |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v in ALL_VARIANTS:
            rs = runs.get(v, {}).get(scenario)
            if not rs:
                continue
            rps = [r.rps for r in rs]
            xd = ratios(rs, runs.get(disabled_for(v), {}).get(scenario, []))
            xdir = ratios(rs, direct.get(scenario, []))
            ok, detail = checks[v].get(scenario, (None, ""))
            check = "OK" if ok else ("FAIL: " + detail if ok is False else "-")
            lines.append(
                f"| {v} | {med(rps):.0f} [{min(rps):.0f}-{max(rps):.0f}] | {med([r.p50_ms for r in rs]):.2f} |"
                f" {med([r.p99_ms for r in rs]):.2f} | {_ratio(xd)} | {_ratio(xdir)} |"
                f" {med([r.other_cores for r in rs]):.2f} | {check} |"
            )
        lines.append("")
    lines += render_clients(runs, unloaded)
    lines += [
        "## Unloaded p50 (1 connection, wrk)",
        "",
        "| variant | GET p50 ms | added vs direct | (a) p50 ms | added vs direct |",
        "|---|---|---|---|---|",
    ]
    ref = unloaded.get("direct", {})
    for v in ALL_VARIANTS:
        u = unloaded.get(v)
        if not u:
            continue
        cells = []
        for scenario in ("get", "a"):
            p = u.get(scenario)
            r = ref.get(scenario)
            cells += [f"{p:.3f}" if p is not None else "-", f"{p - r:+.3f}" if p is not None and r is not None else "-"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "## Correctness", "", "| variant | check | result |", "|---|---|---|"]
    for v in ALL_VARIANTS:
        for name, (ok, detail) in checks.get(v, {}).items():
            result = "OK" if ok else ("n/a" if ok is None else "FAIL")
            lines.append(f"| {v} | {name} | {result}{': ' + detail if detail else ''} |")
    lines += ["", "Variants:", ""]
    lines += [f"- `{v}`: {LABELS[v]}" for v in ALL_VARIANTS if v in runs]
    return "\n".join(lines) + "\n"


def _ratio(xs: list[float]) -> str:
    return f"{med(xs):.2f}" if xs else "-"


def render_clients(runs: dict[str, dict[str, list[Run]]], unloaded: dict[str, dict[str, float]]) -> list[str]:
    """aiohttp against httpx, store by store: req/s of each and the median of per-round ratios.

    A plain ``proxy-<store>`` variant stands for its :data:`DEFAULT_CLIENT` when that one did not run.
    """
    rows = []
    for store in ("disabled", *STORES):
        a, b = f"proxy-{store}-aiohttp", f"proxy-{store}-httpx"
        plain = f"proxy-{store}"
        if DEFAULT_CLIENT == "aiohttp" and a not in runs:
            a = plain
        elif DEFAULT_CLIENT == "httpx" and b not in runs:
            b = plain
        for scenario in SCENARIOS:
            ra, rb = runs.get(a, {}).get(scenario), runs.get(b, {}).get(scenario)
            if not ra or not rb:
                continue
            pa, pb = unloaded.get(a, {}).get(scenario), unloaded.get(b, {}).get(scenario)
            p50 = f"{pb:.3f} / {pa:.3f}" if pa is not None and pb is not None else "-"
            rows.append(
                f"| {store} | {SCENARIO_NAMES[scenario]} | {med([r.rps for r in rb]):.0f} |"
                f" {med([r.rps for r in ra]):.0f} | {_ratio(ratios(ra, rb))} | {p50} |"
            )
    if not rows:
        return []
    return [
        "## Clients: aiohttp against httpx (`[upstream] client`)",
        "",
        "| store | scenario | httpx req/s | aiohttp req/s | aiohttp / httpx | unloaded p50 ms, httpx / aiohttp |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


# --- profiling -------------------------------------------------------------------------


async def profile(settings: Settings, spec: str) -> Path:
    """Serve one proxy variant under wrk's load and sample the proxy with py-spy; write the top functions."""
    variant, scenario, *rest = spec.split(":")
    seconds = int(rest[0]) if rest else 8
    nonce = "pbench" + uuid.uuid4().hex[:8]
    schema = nonce
    workdir = Path(tempfile.mkdtemp(prefix="idempo-proxy-profile-"))
    reachable = services(settings)  # type: ignore[arg-type]
    settings.variants = [variant]
    if not reachable["PostgreSQL"]:
        prepare_postgres(settings, schema)
    pyspy = str(Path(sys.executable).parent / "py-spy")
    raw = workdir / "profile.txt"
    try:
        with fronts(settings, workdir, nonce, schema, reachable) as (upstream, live, skipped):
            if variant in skipped:
                raise RuntimeError(skipped[variant])
            await wait_ready(upstream)
            front = live[variant]
            if why := await ready(front):
                raise RuntimeError(why)
            if scenario == "b":
                await scenarios.seed(front.port, f"r-{variant}-{nonce}", settings.replay_keys)
            await load_run(front, scenario, nonce, 0, 2, settings, settings.connections)
            spy = subprocess.Popen(
                [pyspy, "record", "-p", str(front.procs[0].pid), "-d", str(seconds), "-r", "250"]
                + ["-f", "raw", "-o", str(raw), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await load_run(front, scenario, nonce, 1, seconds + 2, settings, settings.connections)
            spy.wait(timeout=60)
        self_time: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            self_time[_short(frames[-1])] += n
            for frame in set(map(_short, frames)):
                inclusive[frame] += n
    finally:
        cleanup(settings, nonce, schema, reachable)
        shutil.rmtree(workdir, ignore_errors=True)
    out = HERE / "results" / f"profile-proxy-{variant}-{scenario}.md"
    lines = [
        f"# py-spy: {variant}, {SCENARIO_NAMES[scenario]}, {seconds} s at 250 Hz, {total} samples",
        "",
        f"Command: `{settings.command}`; load average {os.getloadavg()[0]:.2f}",
        "",
        "## Self time (top 25)",
        "",
        "| % | function |",
        "|---|---|",
        *(f"| {100 * n / total:.1f} | `{f}` |" for f, n in self_time.most_common(25)),
        "",
        "## Inclusive time (top 40)",
        "",
        "| % | function |",
        "|---|---|",
        *(f"| {100 * n / total:.1f} | `{f}` |" for f, n in inclusive.most_common(40)),
    ]
    out.write_text("\n".join(lines) + "\n")
    return out


def _short(frame: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py)``."""
    found = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if found is None:
        return frame
    func, path = found.groups()
    for marker in ("site-packages/", "/src/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


def parse(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="./bench/run --proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=int, default=5, help="seconds per measured wrk run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of the warm-up run per variant and scenario")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--replay-keys", type=int, default=1000)
    p.add_argument("--c-keys", type=int, default=30)
    p.add_argument("--d-keys", type=int, default=10)
    p.add_argument("--unloaded", type=int, default=3, help="seconds of each one-connection run")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"of: {', '.join(ALL_VARIANTS)} (default: all but *-httpx, *-aiohttp)",
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--profile", metavar="VARIANT:SCENARIO[:SECONDS]")
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(ALL_VARIANTS)}")
    return Settings(
        rounds=a.rounds,
        duration=a.duration,
        warmup=a.warmup,
        connections=a.connections,
        replay_keys=a.replay_keys,
        c_keys=a.c_keys,
        d_keys=a.d_keys,
        unloaded=a.unloaded,
        variants=variants,
        scenarios=[s for s in a.scenarios.split(",") if s],
        redis_url=a.redis_url,
        pg_url=a.pg_url,
        command=os.environ.get("BENCH_COMMAND", "bench/proxy_bench.py " + " ".join(argv or sys.argv[1:])),
        profile=a.profile,
    )


def main() -> None:
    settings = parse()
    if settings.profile:
        path = asyncio.run(profile(settings, settings.profile))
    else:
        path = asyncio.run(run(settings))
    log(f"report: {path}")


if __name__ == "__main__":
    main()
