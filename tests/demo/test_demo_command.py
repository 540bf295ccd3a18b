"""``idempo demo`` as a user runs it: a subprocess, real HTTP, its exit code and report."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from rich.progress import Progress

from idempo.demo.command import _TITLES, _TITLES_KILL, _TITLES_PROXY, _api_server, _progress_columns
from idempo.demo.storm import RunReport, Share, plan_payments

PAYMENTS = 60


def idempo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m idempo ARGS`` and capture its output."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "idempo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    """One small demo run (both columns), shared by the tests that read its report."""
    report = tmp_path_factory.mktemp("demo") / "report.json"
    done = idempo("demo", "--payments", str(PAYMENTS), "--concurrency", "16", "--seed", "7", "--json", str(report))
    return done, json.loads(report.read_text()) if report.exists() else {}


@pytest.mark.slow
def test_demo_exits_zero_and_prints_no_double_charges(
    demo_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    """`idempo demo` exits 0 and prints the exact line `double charges: 0`."""
    done, _ = demo_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert "double charges: 0" in done.stdout.splitlines()
    assert "with idempo" in done.stdout
    assert "without idempo" in done.stdout


@pytest.mark.slow
def test_demo_numbers_with_idempo_are_consistent(
    demo_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    """With idempo: one row, one charge and one handler execution per payment; every reused key got 422."""
    _, document = demo_run
    runs = document["runs"]
    assert isinstance(runs, dict)
    run = runs["idempo"]
    assert run["payments"] == PAYMENTS
    assert run["payment_rows"] == PAYMENTS
    assert run["provider_charges"] == PAYMENTS
    assert run["handler_executions"] == PAYMENTS
    assert run["double_charges"] == run["lost"] == run["told_failed_but_charged"] == 0
    assert run["mismatches"] == run["key_reuses"] == run["key_reuses_refused"] > 0
    assert run["replays"] > 0
    assert run["requests"] > PAYMENTS
    assert document["failures"] == []


@pytest.mark.slow
def test_demo_numbers_without_idempo_show_the_race(
    demo_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    """Without idempo the same storm charges orders more than once and never answers 422 or replays."""
    _, document = demo_run
    runs = document["runs"]
    assert isinstance(runs, dict)
    bare = runs["bare"]
    assert bare["payments"] == PAYMENTS
    assert bare["payment_rows"] == PAYMENTS  # the UNIQUE index holds; the charges do not
    assert bare["provider_charges"] > PAYMENTS
    assert bare["double_charges"] > 0
    assert bare["replays"] == bare["mismatches"] == bare["conflicts"] == 0
    assert bare["handler_executions"] > PAYMENTS  # every click and every retry runs the handler
    assert sum(bare["other_kinds"].values()) == bare["other_errors"]


def test_demo_rejects_an_unknown_store_url() -> None:
    """An unknown --store scheme is a usage error (exit 2) naming the scheme, before anything starts."""
    done = idempo("demo", "--store", "nosuch://x", "--payments", "1")
    assert done.returncode == 2
    assert "nosuch" in done.stderr


def command_line(process: subprocess.Popen[bytes]) -> str:
    """The process's command line as ``ps`` shows it (from /proc where there is one)."""
    proc = Path(f"/proc/{process.pid}/cmdline")
    if proc.exists():
        return proc.read_bytes().replace(b"\0", b" ").decode()
    return " ".join(map(str, process.args))  # type: ignore[arg-type]


def test_api_subprocess_gets_the_store_url_in_its_environment_not_on_its_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store URL (a password in it included) is not in the API's command line, yet the API uses that store.

    The run without idempo ignores an IDEMPO_DEMO_STORE left in the user's environment.
    """
    store_url = f"sqlite:///{tmp_path / 'idempo-secret.db'}"
    monkeypatch.setenv("IDEMPO_DEMO_STORE", store_url)
    body = {"order_id": "order-1", "amount": 1999, "currency": "EUR"}
    with _api_server(tmp_path / "payments.db", store_url, tmp_path / "api.log") as (base_url, process):
        seen = command_line(process)
        with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
            keyless = client.post("/payments", json=body)
    with (
        _api_server(tmp_path / "bare.db", None, tmp_path / "bare.log") as (base_url, _),
        httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client,
    ):
        bare = client.post("/payments", json=body)
    assert "idempo.demo._server" in seen
    assert store_url not in seen
    assert "idempo-secret" not in seen
    assert keyless.status_code == 400  # the demo policy requires a key: idempo is in front, with that store
    assert (tmp_path / "idempo-secret.db").exists()
    assert bare.status_code == 201


def test_server_takes_the_store_from_its_option_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m idempo.demo._server``: ``--store`` wins, else IDEMPO_DEMO_STORE; with neither, no idempo."""
    from idempo.demo import _server

    stores: list[str | None] = []

    class Stop(Exception):
        pass

    def create_app(database: Path, *, store: str | None, **options: object) -> None:
        stores.append(store)
        raise Stop

    monkeypatch.setattr(_server, "create_app", create_app)
    monkeypatch.setenv("IDEMPO_DEMO_STORE", "memory://from-env")
    with pytest.raises(Stop):
        _server.main(["--fd", "9", "--database", "app.db", "--store", "memory://from-option"])
    with pytest.raises(Stop):
        _server.main(["--fd", "9", "--database", "app.db"])
    monkeypatch.delenv("IDEMPO_DEMO_STORE")
    with pytest.raises(Stop):
        _server.main(["--fd", "9", "--database", "app.db"])
    assert stores == ["memory://from-option", "memory://from-env", None]


def test_plan_is_reproducible_and_has_every_share() -> None:
    """The same seed draws the same plan; each share gets its fraction of the payments."""
    plan = plan_payments(100, seed=42)
    assert plan == plan_payments(100, seed=42)
    assert plan != plan_payments(100, seed=43)
    shares = Counter(planned.share for planned in plan)
    assert shares == {Share.PLAIN: 60, Share.DOUBLE_CLICK: 20, Share.CLIENT_TIMEOUT: 10, Share.KEY_REUSE: 10}
    assert all(planned.clicks in (2, 3) for planned in plan if planned.share is Share.DOUBLE_CLICK)
    assert len({planned.order_id for planned in plan}) == 100


def test_report_check_names_each_broken_promise() -> None:
    """RunReport.check flags double charges, lost payments, wrongly failed clients and accepted key reuse."""
    numbers = dict.fromkeys(RunReport.__dataclass_fields__, 0)
    assert RunReport(**{**numbers, "key_reuses": 2, "key_reuses_refused": 2}).check() == []
    broken = RunReport(**{**numbers, "double_charges": 1, "lost": 2, "told_failed_but_charged": 3, "key_reuses": 1})
    problems = broken.check()
    assert len(problems) == 4
    assert "1 orders were charged more than once" in problems


@pytest.mark.slow
def test_serve_answers_curl_like_requests_until_terminated() -> None:
    """`idempo demo --serve --port 0` prints its URL and curl lines, serves payments with idempo, exits 0 on SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "idempo", "demo", "--serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or ()], daemon=True)
    reader.start()
    try:
        banner = ""
        while (match := re.search(r"up at (http://127\.0\.0\.1:\d+) \(store (\S+)\)", banner)) is None:
            banner = lines.get(timeout=60)
        base_url, store_url = match.group(1), match.group(2)
        curl_lines = [lines.get(timeout=10) for _ in range(12)]
        assert any(line.startswith("curl -i " + base_url + "/payments") for line in curl_lines)
        body = {"order_id": "order-1", "amount": 1999, "currency": "EUR"}
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
            first = client.post("/payments", json=body, headers=headers)
            again = client.post("/payments", json=body, headers=headers)
            charges = client.get("/provider/charges", params={"order_id": "order-1"}).json()
        assert first.status_code == 201
        assert again.headers["idempotent-replayed"] == "true"
        assert charges["charges"] == 1
    finally:
        process.terminate()
        process.wait(timeout=30)
        reader.join(timeout=10)
        process.stdout.close()
    assert process.returncode == 0
    # The temp folder that held the store and the app's database is gone.
    assert not Path(store_url.removeprefix("sqlite:///")).parent.exists()


def test_demo_reads_its_store_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``IDEMPO_DEMO_STORE`` gives ``idempo demo`` its store (so a password stays out of ps); ``--store`` wins."""
    from idempo.demo.command import demo

    monkeypatch.setenv("IDEMPO_DEMO_STORE", "redis://:secret@127.0.0.1:6379/0")
    from_env = demo.make_context("demo", [])
    from_option = demo.make_context("demo", ["--store", "memory://"])
    assert from_env.params["store_url"] == "redis://:secret@127.0.0.1:6379/0"
    assert from_option.params["store_url"] == "memory://"


@pytest.mark.parametrize("title", [*_TITLES.values(), *_TITLES_PROXY.values(), *_TITLES_KILL.values()])
def test_the_progress_line_fits_80_columns(title: str) -> None:
    """At 80 columns (``COLUMNS=80``) every run's progress line reads whole, with 5-digit counts: its title,
    payments done and the live counts are never cut, only the bar gives way. Before, ``--proxy``'s title
    (17 characters, "with idempo proxy") left "500/1000" cut to "500/10…"."""
    console = Console(width=80, record=True, file=io.StringIO())
    progress = Progress(*_progress_columns(), console=console, auto_refresh=False)
    task = progress.add_task(title, total=1000, requests=12345, replays=1000, conflicts=1000)
    progress.update(task, completed=500)
    console.print(progress.make_tasks_table(progress.tasks))
    (line,) = console.export_text().splitlines()
    assert len(line) <= 80, line
    assert "…" not in line, line
    assert line.startswith(f"{title} "), line
    assert " 500/1000 12345 requests, 1000 replays, 1000 409s 0:00:00" in line, line
