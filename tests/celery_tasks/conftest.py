"""Fixtures for the Celery tests: real worker processes on a real Redis broker.

The broker and the result backend are Redis db 7 of the shared server, under a
key prefix of this session's own (deleted afterwards; the db is never
flushed); the idempo store is the session's Redis store. Workers are
``celery worker --pool=solo`` processes started and stopped here, each
logging to a file the test can read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import SESSION

pytest.importorskip("celery", reason="needs idempo[celery]")

ROOT = Path(__file__).resolve().parents[2]
#: The Redis db the broker and results use: not the shared db 0.
BROKER_DB = 7


class Worker:
    """One ``celery worker`` process consuming ``queues``, its output in ``log``.

    The solo pool by default; ``pool="prefork"`` runs one child process (time
    limits and ``revoke(terminate=True)`` need a child to kill).
    """

    def __init__(self, name: str, queues: str, env: dict[str, str], log: Path, pool: str = "solo") -> None:
        self.name = name
        self.log = log
        self._file = log.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.celery_tasks.tasks",
                "worker",
                f"--pool={pool}",
                "--concurrency=1",
                "-Q",
                queues,
                "-n",
                f"{name}@idempo-test",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "--loglevel=INFO",
            ],
            cwd=ROOT,
            # The worker's hand-off directory (tempfile) goes under the test's own, also when it is SIGKILLed.
            env={**env, "TMPDIR": str(log.parent)},
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text("utf-8", "replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for the worker's ``ready.`` line. The timeout bounds a hang, it times nothing."""
        deadline = time.monotonic() + timeout
        while " ready." not in self.output():
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited with {self.process.returncode}:\n{self.output()}")
            assert time.monotonic() < deadline, f"worker {self.name} not ready after {timeout} s:\n{self.output()}"
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, its unacknowledged message stays with the broker."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._file.close()


def _broker_url(redis_url: str) -> str:
    parts = urlsplit(redis_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{BROKER_DB}", "", ""))


@pytest.fixture(scope="session")
def celery_env(redis_url: str, redis_store_url: str) -> Iterator[dict[str, str]]:
    """The workers' (and this process's) environment: broker, prefix, store, visibility timeout."""
    import redis

    prefix = f"idempo-test-celery-{SESSION}:"
    broker = _broker_url(redis_url)
    env = {
        "IDEMPO_CELERY_BROKER": broker,
        "IDEMPO_CELERY_PREFIX": prefix,
        "IDEMPO_CELERY_STORE": redis_store_url,
        "IDEMPO_CELERY_VISIBILITY": "3",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # read by tests.celery_tasks.tasks when this process imports it
    yield {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    client = redis.Redis.from_url(broker)
    for key in list(client.scan_iter(match=prefix + "*", count=1000)):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def tasks(celery_env: dict[str, str]) -> Any:
    """The tests' task module, imported with the environment set."""
    from tests.celery_tasks import tasks

    return tasks


@pytest.fixture
def start_worker(celery_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Factory: start_worker(queue, pool="solo", env=None) -> a ready Worker; every worker is stopped afterwards.

    ``env``: variables added to that worker's environment (``IDEMPO_FAULTS``, the app's database).
    """
    started: list[Worker] = []

    def start(queue: str, name: str | None = None, pool: str = "solo", env: dict[str, str] | None = None) -> Worker:
        name = name or f"w{len(started)}-{uuid.uuid4().hex[:6]}"
        worker = Worker(name, queue, {**celery_env, **(env or {})}, tmp_path / f"{name}.log", pool)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def queue(celery_env: dict[str, str]) -> str:
    """A queue of this test's own, so a worker of another test never takes its messages."""
    return f"{celery_env['IDEMPO_CELERY_PREFIX']}q-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    """The file the tasks append ``start``/``done`` lines to."""
    path = tmp_path / "ledger.txt"
    path.touch()
    return path


def executions(ledger: Path, order_id: str) -> tuple[int, int]:
    """(started, done) counts of ``order_id`` in the ledger."""
    lines = ledger.read_text("utf-8").splitlines()
    started = sum(1 for line in lines if line.startswith(f"start {order_id} "))
    done = sum(1 for line in lines if line == f"done {order_id}")
    return started, done


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` until true. The timeout bounds a hang, it times nothing."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met after {timeout} s"
        time.sleep(0.05)
