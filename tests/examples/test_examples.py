"""Each example starts with the command docs/frameworks.md gives, replays a keyed request; so does the quick start."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.examples.codeblocks import all_blocks, first_block
from tests.support.servers import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
KEY = "8e03978e-40d5-43e8-bc93-6894a57f9324"

# The documented command, then what the test adds: a free port (and, for
# Django, --noreload so the server is one process the test can stop).
COMMANDS = {
    "starlette": (["-m", "uvicorn", "examples.starlette_app:app"], ["--port", "{port}"]),
    "fastapi": (["-m", "uvicorn", "examples.fastapi_app:app"], ["--port", "{port}"]),
    "litestar": (["-m", "uvicorn", "examples.litestar_app:app"], ["--port", "{port}"]),
    "flask": (["-m", "flask", "--app", "examples/flask_app", "run"], ["--port", "{port}"]),
    "django": (["examples/django_app.py", "runserver"], ["127.0.0.1:{port}", "--noreload"]),
}


def documented(framework: str) -> str:
    """The command as docs/frameworks.md writes it (``python`` for this interpreter)."""
    documented_args, _ = COMMANDS[framework]
    args = documented_args[1:] if documented_args[0] == "-m" else ["python", *documented_args]
    return " ".join(args)


@pytest.mark.parametrize("framework", list(COMMANDS))
def test_example_runs_and_replays(framework: str, tmp_path: Path) -> None:
    """The example starts with its documented command; the same keyed POST twice gives one payment, replayed."""
    assert documented(framework) in (ROOT / "docs" / "frameworks.md").read_text()
    port = free_port()
    documented_args, added = COMMANDS[framework]
    command = [sys.executable, *documented_args, *(a.format(port=port) for a in added)]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "IDEMPO_STORE": f"sqlite:///{tmp_path}/idempo.db",
    }
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        headers = {"Idempotency-Key": KEY, "Content-Type": "application/json"}
        first = httpx.post(url + "/payments", content=b'{"amount": 1999}', headers=headers, timeout=10)
        again = httpx.post(url + "/payments", content=b'{"amount": 1999}', headers=headers, timeout=10)
        missing = httpx.post(
            url + "/payments", content=b'{"amount": 1999}', headers={"Content-Type": "application/json"}
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert first.status_code == 201, first.text + log_path.read_text()
    assert first.json() == {"payment_id": 1, "amount": 1999}
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert missing.status_code == 400
    assert missing.headers["content-type"] == "application/problem+json"


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _answer(curl_output: str) -> tuple[str, dict[str, str], str]:
    """The status line, the headers (names in lower case) and the body of ``curl -i`` output."""
    head, _, body = curl_output.replace("\r\n", "\n").partition("\n\n")
    status, *lines = head.splitlines()
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, body


def test_quick_start(tmp_path: Path) -> None:
    """docs/quickstart.md as written: main.py under `uvicorn main:app`, its curl line twice, then `idempo inspect`.

    The curl line runs against the port the test chose; every other block marked as run by this
    test (the README's copy of the app, the same curl line in docs/frameworks.md) is one of these.
    """
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    page = "docs/quickstart.md"
    app, serve = first_block(page, "python"), first_block(page, "sh", "uvicorn")
    curl, inspect = first_block(page, "sh", "curl"), first_block(page, "sh", "idempo inspect")
    assert serve.text == "uvicorn main:app\n"
    ours = {block.text for block in (app, serve, curl, inspect)}
    for block in all_blocks():
        if block.argument == "tests/examples/test_examples.py::test_quick_start":
            assert block.text in ours, f"{block.id} is not the quick start's"
    (tmp_path / "main.py").write_text(app.text)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("IDEMPO_SECRET", "IDEMPO_STORE")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    request = curl.text.replace("localhost:8000", f"localhost:{port}")
    assert request != curl.text

    def run(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        wait_until_up(f"http://127.0.0.1:{port}", process)
        first, again = run(request), run(request)
        missing = httpx.post(f"http://127.0.0.1:{port}/payments", json={"amount": 1999}, timeout=10)
    finally:
        _stop(process)
    assert first.returncode == 0, first.stderr + log_path.read_text()
    status, headers, body = _answer(first.stdout)
    assert status.split()[1] == "201", first.stdout
    assert "idempotent-replayed" not in headers
    assert body == '{"charged":1999}'
    replayed_status, replayed_headers, replayed_body = _answer(again.stdout)
    assert (replayed_status.split()[1], replayed_body) == ("201", body)
    assert replayed_headers["idempotent-replayed"] == "true"
    assert missing.status_code == 400
    assert missing.headers["content-type"] == "application/problem+json"

    shown = run(inspect.text)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "completed" in shown.stdout
    assert "201" in shown.stdout
