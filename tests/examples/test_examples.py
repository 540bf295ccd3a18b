"""Every example starts with the command docs/frameworks.md gives, and replays a keyed request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

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
