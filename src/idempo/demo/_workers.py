"""A small supervisor for ``idempo demo --kill-workers``: uvicorn workers on one socket, one SIGKILLed at a time.

:class:`WorkerPool` starts ``count`` worker processes (``python -m
idempo.demo._server``), all serving one listening socket that this process
binds and keeps open for the whole run: the kernel hands each new connection
to one of the workers that accept on it, as with ``uvicorn --workers``, so a
worker killed costs the connections it had accepted, never a refused one.
Each worker writes one byte to a pipe once uvicorn serves (its ``--ready-fd``);
until then it does not count as ready.

:meth:`WorkerPool.kill_storm` SIGKILLs a random ready worker every few hundred
milliseconds (never the last one ready, so the storm always has a server) and
the pool starts a new one in its place. A worker that exits on its own is
started again too; one that fails to start three times in a row stops the
run (:attr:`WorkerPool.failure`).

The pool is driven by threads of its own (one per worker slot, one for the
kills), so the storm's event loop in the same process is never blocked by a
``fork`` or a ``wait``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WorkerPool", "stop_process"]

# Failed start-ups in a row (exits before the worker served) after which the run stops.
_MAX_START_FAILURES = 3


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    generation: int = 0
    killed: set[int] = field(default_factory=set)


class WorkerPool:
    """Keeps ``count`` workers serving ``sock``; kills and restarts them on request.

    Args:
        sock: the listening socket every worker accepts on (this process keeps it open).
        command: the worker's command line, without ``--fd`` and ``--ready-fd``
            (appended here).
        env: the workers' environment.
        log_dir: where each worker's output goes (``<log_dir>/worker-<slot>.<n>.log``).
        count: worker processes (at least 2: the last ready one is never killed).
        rng: the random source of the kills (which worker, and when).

    Raises:
        ValueError: ``count`` is below 2.
    """

    def __init__(
        self,
        sock: socket.socket,
        command: Sequence[str],
        env: Mapping[str, str],
        log_dir: Path,
        *,
        count: int,
        rng: random.Random,
    ) -> None:
        if count < 2:
            raise ValueError(f"a kill storm needs at least 2 workers, got {count}")
        self._sock = sock
        self._command = list(command)
        self._env = dict(env)
        self._log_dir = log_dir
        self._rng = rng
        self._slots = [_Slot(index) for index in range(1, count + 1)]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Workers SIGKILLed so far.
        self.killed = 0
        #: Worker processes started so far (the first ``count`` included).
        self.started = 0
        #: Why the pool cannot serve (a worker failed to start repeatedly); None while it can.
        self.failure: str | None = None

    # --- life cycle --------------------------------------------------------------------------

    def start(self, within: float = 60.0) -> None:
        """Start every worker; return once each serves.

        Args:
            within: seconds to wait for all of them.

        Raises:
            RuntimeError: a worker failed to start, or not all served within ``within`` seconds.
        """
        for slot in self._slots:
            thread = threading.Thread(target=self._keep, args=(slot,), name=f"demo-worker-{slot.index}", daemon=True)
            self._threads.append(thread)
            thread.start()
        deadline = time.monotonic() + within
        while not all(slot.ready for slot in self._slots):
            if self.failure is not None:
                raise RuntimeError(self.failure)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not start within {within:g} s; see {self._log_dir}")
            time.sleep(0.02)

    def stop(self, within: float = 10.0) -> None:
        """Stop every worker: SIGTERM (uvicorn shuts down gracefully), SIGKILL after ``within`` seconds."""
        self._stopping.set()
        with self._lock:
            processes = [slot.process for slot in self._slots if slot.process is not None]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        deadline = time.monotonic() + within
        for process in processes:
            _reap(process, max(0.0, deadline - time.monotonic()))
        for thread in self._threads:
            thread.join(timeout=within)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- the kills ---------------------------------------------------------------------------

    def kill_one(self) -> bool:
        """SIGKILL a random ready worker, never the last one ready; return whether one was killed."""
        with self._lock:
            ready = [slot for slot in self._slots if slot.ready and slot.process is not None]
            if len(ready) < 2 or self._stopping.is_set():
                return False
            slot = self._rng.choice(ready)
            process = slot.process
            assert process is not None
            slot.ready = False
            slot.killed.add(process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            self.killed += 1
            return True

    def kill_storm(self, every: tuple[float, float], until: Callable[[], bool]) -> threading.Thread:
        """Start a thread that kills a worker every ``every`` (low, high) seconds until ``until()`` is true.

        Returns:
            The thread; join it after ``until()`` turned true.
        """

        def storm() -> None:
            while not until() and not self._stopping.is_set():
                time.sleep(self._rng.uniform(*every))
                if not until():
                    self.kill_one()

        thread = threading.Thread(target=storm, name="demo-kill-storm", daemon=True)
        thread.start()
        return thread

    # --- one slot ----------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> tuple[subprocess.Popen[bytes], int]:
        slot.generation += 1
        read_end, write_end = os.pipe()
        fd = self._sock.fileno()
        command = [*self._command, "--fd", str(fd), "--ready-fd", str(write_end)]
        log_path = self._log_dir / f"worker-{slot.index}.{slot.generation}.log"
        try:
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    command,
                    pass_fds=(fd, write_end),
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the child holds its copy: EOF here once it exits
        self.started += 1
        return process, read_end

    def _keep(self, slot: _Slot) -> None:
        failures = 0
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                process, ready_pipe = self._spawn(slot)
                slot.process = process
            try:
                # One byte once the worker serves; EOF (b"") if it exits first.
                served = os.read(ready_pipe, 1) != b""
            finally:
                os.close(ready_pipe)
            with self._lock:
                slot.ready = served and process.pid not in slot.killed and not self._stopping.is_set()
            process.wait()
            with self._lock:
                slot.ready = False
                killed = process.pid in slot.killed
            if self._stopping.is_set():
                return
            if killed or served:
                failures = 0
                continue
            failures += 1
            if failures >= _MAX_START_FAILURES:
                log = self._log_dir / f"worker-{slot.index}.{slot.generation}.log"
                tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
                self.failure = (
                    f"a payments API worker failed to start {failures} times (exit {process.returncode}):\n{tail}"
                )
                return
            time.sleep(0.2 * failures)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop a child of the demo (the API, the proxy): SIGTERM, then SIGKILL after ``timeout`` seconds."""
    process.terminate()
    _reap(process, timeout)


def _reap(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``process`` to exit, then SIGKILL it (and reap it)."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
