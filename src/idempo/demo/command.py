"""``idempo demo``: a retry storm against a payments API, with and without idempo.

The command makes idempo's store at ``--store`` ready (a PostgreSQL schema is
created or upgraded first, as ``idempo migrate`` does: the middleware never
alters it), starts the payments API (:mod:`idempo.demo.payments`) under
uvicorn in a subprocess on 127.0.0.1 (an ephemeral port) with that store,
and drives the storm (:mod:`idempo.demo.storm`) at it over real HTTP with a
progress bar; then runs the same storm against the same API without idempo,
and prints both side by side. It exits 1 when the run with
idempo charged an order twice, lost a payment, told a charged client that its
payment failed, or accepted a key reused for another amount.

``idempo demo --proxy`` runs the storm against the same API *without* idempo,
with ``idempo proxy`` in front of it (a subprocess, the store from ``--store``;
:mod:`idempo.demo._proxy`): the same guarantee from outside the app, for an
API that cannot be changed. The other column is the API alone, as before.

``idempo demo --kill-workers`` serves the API from several uvicorn workers on
one socket under a small supervisor (:mod:`idempo.demo._workers`) that
SIGKILLs a random worker every few hundred milliseconds and starts another,
with a lease of :data:`KILL_LEASE` seconds, so that a client's retry after a
kill meets an expired lease. The storm runs twice: on a transactional route
(:mod:`idempo.demo._transactional`: the charge and payment rows commit with
the record, in the store's database), then on the plain middleware, where a
worker killed after the charge and before the record completed leaves a
retry that charges again. It exits 1 when the transactional run charged an
order twice, lost a payment, told a charged client that its payment failed,
or accepted a reused key; the plain run is there to compare.

``idempo demo --serve`` leaves the API with idempo up for curl instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

try:
    import anyio
    import click
    import httpx
    import uvicorn
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Column, Table

    from ..metrics import mount as mount_metrics
    from ._proxy import proxy_server
    from ._server import STORE_ENV
    from ._transactional import Tables, read_transactional_ledger
    from ._workers import WorkerPool, stop_process
    from .payments import PROVIDER_DELAY_HEADER, Ledger, create_app, read_ledger
    from .storm import (
        AttemptOutcome,
        PaymentOutcome,
        PlannedPayment,
        RunReport,
        Share,
        StormSettings,
        Tally,
        plan_payments,
        run_storm,
        summarize,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise SystemExit(f"idempo demo needs the demo extra: pip install 'idempo[demo]' ({exc})") from exc

from ..exceptions import ConfigurationError, StoreError
from ..stores import async_store_from_url
from ..stores._base import cannot_use
from ..stores._url import resolve as resolve_url

__all__ = ["demo"]

_T = TypeVar("_T")

# The live counts beside the progress bar.
_LIVE_COUNTS = "{task.fields[requests]} requests, {task.fields[replays]} replays, {task.fields[conflicts]} 409s"
# Seconds the API subprocess may take to start answering (imports included).
_STARTUP_TIMEOUT = 60.0

#: The lease TTL (seconds) of ``--kill-workers``: a retry after a worker was
#: killed waits this long for the dead holder's lease; longer than the slowest
#: charge of that storm (:data:`_KILL_STORM`'s ``slow_charge``).
KILL_LEASE = 2.0

# The storm of --kill-workers: the client-timeout share's charge stays below
# the lease, and a client retries through many kills (a worker lives about a
# second) for up to two minutes before it gives up.
_KILL_STORM = StormSettings(short_timeout=0.3, slow_charge=0.8, max_attempts=500, deadline=120.0)
# Payments of --kill-workers when --payments is not given: each kill costs
# its in-flight payments a lease of waiting, so the run is kept short.
_KILL_PAYMENTS = 300


def _seconds_span(text: str) -> tuple[float, float]:
    """Parse ``LOW-HIGH`` (or one number) seconds for ``--kill-every``."""
    if isinstance(text, tuple):  # click passes a default through the converter too
        return text
    low, _, high = text.partition("-")
    try:
        span = float(low), float(high or low)
    except ValueError:
        raise click.BadParameter(f"expected SECONDS or LOW-HIGH seconds, got {text!r}") from None
    if span[0] <= 0 or span[1] < span[0]:
        raise click.BadParameter(f"expected 0 < LOW <= HIGH seconds, got {text!r}")
    return span


@click.command()
@click.option(
    "--payments",
    type=click.IntRange(1),
    default=None,
    help=f"Logical payments in the storm.  [default: 1000; {_KILL_PAYMENTS} with --kill-workers]",
)
@click.option(
    "--concurrency", type=click.IntRange(1), default=64, show_default=True, help="Logical payments in flight at once."
)
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    default=None,
    envvar="IDEMPO_DEMO_STORE",
    show_envvar=True,
    help=(
        "idempo's store: sqlite:////var/tmp/idempo.db, postgresql://user@host/db?schema=idempo_demo "
        "(its schema is created or upgraded first, as idempo migrate does), redis://host:6379/0?prefix=demo: "
        "(see docs/stores.md). Give it in the environment to keep a password in it out of ps.  "
        "[default: sqlite:///<temp dir>/idempo.db]"
    ),
)
@click.option("--seed", type=int, default=None, help="Seed for the shares of the storm (printed when drawn).")
@click.option("--bare/--no-bare", default=True, show_default=True, help="Also run the storm without idempo.")
@click.option(
    "--proxy",
    "use_proxy",
    is_flag=True,
    help="Put idempo in front as `idempo proxy` (a subprocess, store from --store) instead of in the app.",
)
@click.option("--serve", is_flag=True, help="Leave the API with idempo up for curl instead of running the storm.")
@click.option(
    "--kill-workers",
    is_flag=True,
    help="Serve from several uvicorn workers and SIGKILL a random one every few hundred ms during the storm.",
)
@click.option(
    "--workers",
    type=click.IntRange(2),
    default=3,
    show_default=True,
    help="Worker processes with --kill-workers (the last one serving is never killed).",
)
@click.option(
    "--kill-every",
    type=_seconds_span,
    default="0.2-0.5",
    show_default=True,
    metavar="LOW-HIGH",
    help="Seconds between two kills with --kill-workers, drawn uniformly.",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port for --serve (0: any free)."
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also write the report's numbers to this file as JSON.",
)
def demo(
    payments: int | None,
    concurrency: int,
    store_url: str | None,
    seed: int | None,
    bare: bool,
    use_proxy: bool,
    serve: bool,
    kill_workers: bool,
    workers: int,
    kill_every: tuple[float, float],
    port: int,
    json_path: Path | None,
) -> None:
    """Show what idempo changes: a retry storm against a payments API, with and without it.

    Each logical payment is sent until it gets a final answer, retries reusing
    its Idempotency-Key. Some are double clicks (the same request 2-3 times at
    once), some outlive their client's timeout (the retry arrives while the
    first still runs), some reuse their key for another amount (must get 422).
    Exits 1 if, with idempo, any order was charged twice or any payment lost.
    With --proxy, idempo is `idempo proxy` in front of the API without idempo.

    With --kill-workers, the API runs in several uvicorn workers and one is
    SIGKILLed every few hundred milliseconds (and restarted) while the storm
    runs, first on a transactional route (the charge row commits with the
    record), then on the plain middleware; exits 1 if the transactional run
    charged an order twice or lost a payment.
    """
    if serve and use_proxy:
        raise click.UsageError("--serve and --proxy cannot be combined: --serve runs idempo in the app")
    if kill_workers and use_proxy:
        raise click.UsageError("--kill-workers and --proxy cannot be combined: the kills are the app's workers'")
    if payments is None:
        payments = _KILL_PAYMENTS if kill_workers else 1000
    console = Console(highlight=False)
    with tempfile.TemporaryDirectory(prefix="idempo-demo-") as tmp:
        workdir = Path(tmp)
        store_url = store_url or f"sqlite:///{workdir / 'idempo.db'}"
        if kill_workers and not store_url.lower().startswith(("sqlite:", "postgresql:", "postgres:")):
            raise click.BadParameter(
                "--kill-workers needs an SQLite or PostgreSQL store: its transactional column writes the payments "
                "in the store's database",
                param_hint="--store",
            )
        schema_note = _prepare_store(store_url)
        if schema_note is not None:
            console.print(schema_note, markup=False)
        if serve:
            _serve(console, workdir, store_url, port)
            return
        seed = seed if seed is not None else random.randrange(1_000_000)
        plan = plan_payments(payments, seed=seed)
        settings = replace(_KILL_STORM if kill_workers else StormSettings(), concurrency=concurrency)
        shares = Counter(planned.share for planned in plan)
        console.print(
            f"[bold]idempo demo[/]: {payments} payments (seed {seed}): "
            + ", ".join(f"{shares[share]} {share.value}" for share in Share)
            + f"; {concurrency} at a time; store {_redacted(store_url)}"
            + ("; idempo as `idempo proxy` in front of the API" if use_proxy else "")
        )
        if kill_workers:
            console.print(
                f"{workers} uvicorn workers on one socket, one SIGKILLed every {kill_every[0]:g}-{kill_every[1]:g} s "
                f"and restarted; lease {KILL_LEASE:g} s"
            )
        titles = _TITLES_KILL if kill_workers else _TITLES_PROXY if use_proxy else _TITLES
        reports: dict[str, RunReport] = {}
        if kill_workers:
            rng = random.Random(seed)
            tables = Tables.for_run(store_url)
            tables.create()
            try:
                options = ["--transactional"] + ([] if tables.schema is None else ["--tables-schema", tables.schema])
                pool = functools.partial(_worker_pool, workers=workers, kill_every=kill_every, rng=rng, options=options)
                ledger = functools.partial(read_transactional_ledger, tables)
                reports["transactional"] = _run(
                    console, titles["transactional"], workdir, store_url, plan, settings, pool, ledger
                )
            finally:
                tables.drop()
            pool = functools.partial(_worker_pool, workers=workers, kill_every=kill_every, rng=rng)
            reports["plain"] = _run(console, titles["plain"], workdir, store_url, plan, settings, pool)
        else:
            reports["idempo"] = _run(console, titles["idempo"], workdir, store_url, plan, settings, use_proxy=use_proxy)
            if bare:
                reports["bare"] = _run(console, titles["bare"], workdir, None, plan, settings)
    _print_report(console, reports, titles)
    # The run whose promise decides the exit status: with idempo (in the app or
    # in front of it), or on the transactional route; the other is there to compare.
    judged_name = "transactional" if kill_workers else "idempo"
    failures = reports[judged_name].check()
    if json_path is not None:
        document = {
            "payments": payments,
            "seed": seed,
            "concurrency": concurrency,
            "store": _redacted(store_url),
            "proxy": use_proxy,
            "runs": {name: asdict(report) for name, report in reports.items()},
            "failures": failures,
        }
        json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if failures:
        for failure in failures:
            console.print(f"[red]{titles[judged_name]}: {failure}[/]")
        raise click.exceptions.Exit(1)


def _prepare_store(store_url: str) -> str | None:
    """Make the store ready before the API starts: create its schema if it has one, then reach it once.

    A store with a schema (PostgreSQL) gets it created or upgraded here, as
    ``idempo migrate`` does, because the middleware never alters a schema at
    request time. A bad URL or an unreachable store fails here, with a clear
    message, rather than as 503s in the middle of the storm.

    Returns:
        What was done to the schema, for the output; None for a store without one.

    Raises:
        click.BadParameter: the URL is unknown or malformed (exit 2).
        click.ClickException: the store cannot be used (exit 1): unreachable, or
            misconfigured, or it refused the schema; one line, as every command says it.
    """
    try:
        resolve_url(store_url, 1)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from exc
    try:
        return anyio.run(_prepare_async_store, store_url)
    except (ConfigurationError, StoreError) as exc:
        raise click.ClickException(cannot_use(store_url, exc)) from exc


async def _prepare_async_store(store_url: str) -> str | None:
    # The async store, as the API will use: its constructor does no I/O and
    # checks no schema, so create_schema() can run first. It is closed in this
    # event loop, the one its connections belong to.
    store = async_store_from_url(store_url)
    try:
        message = None
        create_schema = getattr(store, "create_schema", None)
        if create_schema is not None:
            applied = await create_schema()
            schema = getattr(store, "schema", None)
            where = "store schema" + ("" if schema is None else f" {schema!r}")
            if applied:
                versions = ", ".join(str(version) for version in applied)
                message = f"{where}: applied version(s) {versions}, as `idempo migrate` does"
            else:
                message = f"{where}: up to date, nothing to migrate"
        # One read of a record that cannot exist: the store is reachable and its schema usable.
        await store.get(f"idempo-demo-probe:{uuid.uuid4()}")
    finally:
        await store.aclose()
    return message


def _redacted(url: str) -> str:
    """The store URL without its password, for the output and the JSON report."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


# --- one run: the API in a subprocess, the storm in this process ----------------------------


# A server for one run: given the app's database, the store URL and a log path,
# a context manager yielding the base URL and a probe that names why the API
# stopped serving (None while it serves) and counts the workers killed.
_Serve = Callable[[Path, str | None, Path], contextlib.AbstractContextManager[tuple[str, "_Probe"]]]


class _Probe:
    """What the storm's watcher asks a server during a run."""

    def __init__(self, failure: Callable[[], str | None], killed: Callable[[], int] = lambda: 0) -> None:
        self.failure = failure
        self.killed = killed


def _progress_columns() -> tuple[ProgressColumn, ...]:
    """The columns of a run's progress line: its title, the bar, payments done, the live counts, the time.

    Only the bar gives way on a narrow terminal (down to nothing): the texts
    never wrap, so at 80 columns a 17-character title ("with idempo proxy")
    and 4-digit counts still read whole, where they were cut ("500/10…").
    The titles of every kind of run get one width, so two runs' bars line up.
    """
    title_width = max(len(title) for titles in (_TITLES, _TITLES_PROXY, _TITLES_KILL) for title in titles.values())
    return (
        TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=title_width)),
        BarColumn(bar_width=40),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        TextColumn(_LIVE_COUNTS, table_column=Column(no_wrap=True)),
        TimeElapsedColumn(table_column=Column(no_wrap=True)),
    )


def _run(
    console: Console,
    label: str,
    workdir: Path,
    store_url: str | None,
    plan: list[PlannedPayment],
    settings: StormSettings,
    serve: _Serve | None = None,
    ledger: Callable[[Path], Ledger] = read_ledger,
    *,
    use_proxy: bool = False,
) -> RunReport:
    """One storm against the API: with idempo in the app (a store URL), in front of it (``use_proxy``), or none;
    ``serve`` starts the API otherwise (the workers of --kill-workers)."""
    name = label.replace(" ", "-") if serve is not None else "idempo" if store_url is not None else "bare"
    database = workdir / f"payments-{name}.db"
    log_path = workdir / f"server-{name}.log"
    start = serve or functools.partial(_one_server, workdir=workdir, use_proxy=use_proxy)
    with start(database, store_url, log_path) as (base_url, probe):
        with Progress(*_progress_columns(), console=console) as progress:
            task = progress.add_task(label, total=len(plan), requests=0, replays=0, conflicts=0)
            tally = Tally()

            def on_attempt(attempt: AttemptOutcome) -> None:
                tally.count(attempt)
                progress.update(task, requests=tally.requests, replays=tally.replays, conflicts=tally.conflicts)

            def on_payment(outcome: PaymentOutcome) -> None:
                progress.advance(task)

            storm = functools.partial(run_storm, base_url, plan, settings, on_payment=on_payment, on_attempt=on_attempt)
            result = anyio.run(_unless_exited, probe, storm, backend_options=_backend_options())
        if result is None:
            raise click.ClickException(f"{probe.failure()} during the storm")
        killed = probe.killed()
    return replace(summarize(result, ledger(database)), workers_killed=killed)


async def _unless_exited(probe: _Probe, storm: Callable[[], Awaitable[_T]]) -> _T | None:
    """Run the storm; None as soon as the API stops serving, rather than retrying against nothing."""
    result: _T | None = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            # A Popen has no awaitable exit; a poll every 0.2 s costs nothing here.
            while probe.failure() is None:  # noqa: ASYNC110
                await anyio.sleep(0.2)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        result = await storm()
        group.cancel_scope.cancel()
    return result


def _backend_options() -> dict[str, Any]:
    # uvloop (installed with uvicorn[standard]) makes the client cheaper; plain asyncio otherwise.
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


@contextlib.contextmanager
def _one_server(
    database: Path, store_url: str | None, log_path: Path, *, workdir: Path, use_proxy: bool = False
) -> Iterator[tuple[str, _Probe]]:
    """The API in one subprocess (:func:`_api_server`), behind ``idempo proxy`` with ``use_proxy``.

    Behind the proxy the app runs without idempo and the proxy holds the
    store. The probe names the first process that exited.
    """
    with contextlib.ExitStack() as servers:
        app_store = None if use_proxy else store_url
        base_url, process = servers.enter_context(_api_server(database, app_store, log_path))
        processes = {"the payments API": (process, log_path)}
        if use_proxy:
            assert store_url is not None
            proxy_log = workdir / "proxy.log"
            base_url, proxy = servers.enter_context(proxy_server(base_url, store_url, workdir, proxy_log))
            processes["idempo proxy"] = (proxy, proxy_log)

        def failure() -> str | None:
            for what, (child, log) in processes.items():
                if child.poll() is not None:
                    text = log.read_text(encoding="utf-8", errors="replace")
                    return f"{what} exited with {child.returncode}:\n{text}"
            return None

        yield base_url, _Probe(failure)


@contextlib.contextmanager
def _worker_pool(
    database: Path,
    store_url: str | None,
    log_path: Path,
    *,
    workers: int,
    kill_every: tuple[float, float],
    rng: random.Random,
    options: Sequence[str] = (),
) -> Iterator[tuple[str, _Probe]]:
    """The API in ``workers`` uvicorn processes on one socket, one SIGKILLed every ``kill_every`` s while in use.

    ``options`` are added to each worker's command line (``--transactional``).
    The kill storm starts once every worker serves and stops when the block
    ends, before the workers are stopped (SIGTERM), so the ledger is read
    after the last write. The store URL goes in the workers' environment,
    never on their command lines (see :func:`_api_server`).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    command = [sys.executable, "-m", "idempo.demo._server", "--database", str(database), "--lease", str(KILL_LEASE)]
    command += options
    env = {name: value for name, value in os.environ.items() if name != STORE_ENV}
    if store_url is not None:
        env[STORE_ENV] = store_url
    log_dir = log_path.with_suffix("")
    log_dir.mkdir(exist_ok=True)
    pool = WorkerPool(sock, command, env, log_dir, count=workers, rng=rng)
    done = False
    try:
        try:
            pool.start(within=_STARTUP_TIMEOUT)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
        storm = pool.kill_storm(kill_every, until=lambda: done)
        try:
            yield base_url, _Probe(lambda: pool.failure, lambda: pool.killed)
        finally:
            done = True
            storm.join()
    finally:
        pool.stop()
        sock.close()


@contextlib.contextmanager
def _api_server(database: Path, store_url: str | None, log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start the payments API in a subprocess on 127.0.0.1; yield its base URL and process; stop it.

    The socket is bound here, on an ephemeral port, and handed to the child,
    so the port is known before the server starts and nothing else can take it.
    The store URL goes in the child's environment, never on its command line,
    which any user can read with ``ps`` (a password in the URL included).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    command = [sys.executable, "-m", "idempo.demo._server", "--fd", str(sock.fileno()), "--database", str(database)]
    # Set or removed, so a variable in the user's own environment never puts idempo in the bare run.
    env = {name: value for name, value in os.environ.items() if name != STORE_ENV}
    if store_url is not None:
        env[STORE_ENV] = store_url
    with log_path.open("wb") as log:
        try:
            process = subprocess.Popen(
                command,
                pass_fds=(sock.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            sock.close()
        try:
            _wait_ready(process, base_url, log_path)
            yield base_url, process
        finally:
            stop_process(process)


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    with httpx.Client(base_url=base_url, timeout=1.0, trust_env=False) as client:
        while True:
            if process.poll() is not None:
                log = log_path.read_text(encoding="utf-8", errors="replace")
                raise click.ClickException(f"the payments API exited with {process.returncode}:\n{log}")
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise click.ClickException(f"the payments API did not answer within {_STARTUP_TIMEOUT:.0f} s")
            time.sleep(0.05)


# --- the report ------------------------------------------------------------------------------

_ROWS: tuple[tuple[str, str], ...] = (
    ("logical payments", "payments"),
    ("requests sent", "requests"),
    ("handler executions", "handler_executions"),
    ("replays", "replays"),
    ("409 in progress", "conflicts"),
    ("422 key reused", "mismatches"),
    ("client timeouts", "timeouts"),
    ("other errors", "other_errors"),
    ("payment rows", "payment_rows"),
    ("provider charges", "provider_charges"),
    ("double charges", "double_charges"),
    ("lost payments", "lost"),
    ('told "failed" but charged', "told_failed_but_charged"),
)
_BAD_WHEN_POSITIVE = frozenset({"double_charges", "lost", "told_failed_but_charged"})


#: The report's column titles, by run: idempo in the app, idempo as ``idempo proxy`` in front of it,
#: and the two runs of --kill-workers.
_TITLES = {"idempo": "with idempo", "bare": "without idempo"}
_TITLES_PROXY = {"idempo": "with idempo proxy", "bare": "without idempo"}
_TITLES_KILL = {"transactional": "transactional", "plain": "plain middleware"}


def _print_report(console: Console, reports: dict[str, RunReport], titles: dict[str, str]) -> None:
    kills = "plain" in reports or "transactional" in reports
    table = Table(title="retry storm" + (" while workers are killed" if kills else ""), title_justify="left")
    table.add_column("")
    for name in reports:
        table.add_column(titles[name], justify="right")
    rows = (("workers killed", "workers_killed"), *_ROWS) if kills else _ROWS
    for label, attribute in rows:
        cells = []
        for report in reports.values():
            value = getattr(report, attribute)
            bad = attribute in _BAD_WHEN_POSITIVE and value > 0
            cells.append(f"[red]{value}[/]" if bad else str(value))
        table.add_row(label, *cells)
    table.add_row("wall time", *(f"{report.wall_time:.1f} s" for report in reports.values()))
    console.print(table)
    for name, report in reports.items():
        if report.other_kinds:
            kinds = ", ".join(f"{count} x {kind}" for kind, count in report.other_kinds.items())
            console.print(f"other errors {titles[name]}: {kinds}", markup=False)

    if kills:
        _print_kill_summary(console, reports)
        return
    with_idempo = reports["idempo"]
    console.print(f"double charges: {with_idempo.double_charges}", markup=False)
    if not with_idempo.check():
        console.print(
            f"[green]{titles['idempo'].capitalize()}: {with_idempo.payments} payments, each charged once, none lost, "
            f"every reused key refused.[/]"
        )
    bare = reports.get("bare")
    if bare is not None:
        console.print(
            f"Without idempo: {bare.double_charges} orders charged more than once, "
            f'{bare.told_failed_but_charged} clients told "failed" although charged, '
            f"{bare.key_reuses - bare.key_reuses_refused} reused keys accepted for another amount."
        )


def _print_kill_summary(console: Console, reports: dict[str, RunReport]) -> None:
    transactional = reports.get("transactional")
    if transactional is not None:
        console.print(f"double charges: {transactional.double_charges}", markup=False)
        if not transactional.check():
            console.print(
                f"[green]Transactional: {transactional.workers_killed} workers killed, {transactional.payments} "
                f"payments, each charged once, none lost: a kill left both rows and the record, or none.[/]"
            )
    plain = reports.get("plain")
    if plain is not None:
        console.print(
            f"Plain middleware: {plain.workers_killed} workers killed, {plain.double_charges} orders charged more "
            f"than once (a worker killed between the charge and the record's completion: its retry, after the "
            f"lease, charged again)."
        )


# --- --serve ---------------------------------------------------------------------------------


def _serve(console: Console, workdir: Path, store_url: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on 127.0.0.1:{port} ({exc}); pick another --port") from exc
    sock.listen(128)  # connections from the moment the URL is printed wait for uvicorn, not refused
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(workdir / "payments.db", store=store_url)
    mount_metrics(app)  # GET /metrics: idempo's Prometheus metrics (docs/operating.md)
    click.echo(_curl_examples(base_url, store_url))
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level="info", lifespan="on", timeout_graceful_shutdown=5)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the
    # signal to the handler that was there before it. These handlers turn it
    # into an exception, so the temp folder is removed and the exit is clean.
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except _Stopped:
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sock.close()
    console.print("Stopped.")


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived while serving."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped()


def _curl_examples(base_url: str, store_url: str) -> str:
    key = str(uuid.uuid4())
    slow_key = str(uuid.uuid4())

    def post(body: dict[str, Any], *headers: str) -> str:
        parts = ["curl", "-i", f"{base_url}/payments", "-H", "Content-Type: application/json"]
        for header in headers:
            parts += ["-H", header]
        parts += ["-d", json.dumps(body, separators=(",", ":"))]
        return shlex.join(parts)

    payment = {"order_id": "order-1", "amount": 1999, "currency": "EUR"}
    lines = [
        f"The payments API with idempo is up at {base_url} (store {_redacted(store_url)}); Ctrl-C stops it.",
        "",
        "# 1. A payment: 201 Created, Location: /payments/pay_...",
        post(payment, f"Idempotency-Key: {key}"),
        "# 2. The same again: the stored answer with Idempotent-Replayed: true; no second charge",
        post(payment, f"Idempotency-Key: {key}"),
        "# 3. The same key with another amount: 422",
        post({**payment, "amount": 2999}, f"Idempotency-Key: {key}"),
        "# 4. No Idempotency-Key: 400",
        post({**payment, "order_id": "order-2"}),
        "# 5. A charge that takes 5 s: run this, and again in another terminal before it answers: 409",
        post({**payment, "order_id": "order-3"}, f"Idempotency-Key: {slow_key}", f"{PROVIDER_DELAY_HEADER}: 5"),
        "# The provider's charges for order-1 (1, however often you repeat 1 and 2), and the payment",
        shlex.join(["curl", "-s", f"{base_url}/provider/charges?order_id=order-1"]),
        f"curl -s {base_url}/payments/pay_...   # the id from the Location header",
        f"curl -s {base_url}/metrics | grep ^idempo_   # idempo's Prometheus metrics",
        "",
    ]
    return "\n".join(lines)
