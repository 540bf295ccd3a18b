"""The soak's ``plain`` app: a Starlette ``POST /payments`` behind idempo's middleware, its executions in a ledger.

Each worker runs ``uvicorn soak_app_plain:create_app --factory --app-dir bench``,
configured from the environment the soak sets:

- ``SOAK_STORE``: the store URL (through the soak's relay for a network store);
  the middleware gets the URL itself, as an app would, so it opens the store
  at start-up and closes it at shutdown.
- ``SOAK_LEASE``: the lease TTL, seconds.
- ``SOAK_WORKER``: this worker's name (``w<slot>.<n>``).
- ``SOAK_LEDGER``: the ledger file.

The ledger is one file every worker appends to: a line when the handler
starts (``S``) and one when it returns its answer (``E``), each with the
execution's id, the key, the pid and ``time.monotonic()``. Each line is one
``write(2)`` on a descriptor opened with ``O_APPEND``: once the call returns
the line is in the kernel's page cache, so it survives a SIGKILL of the
worker an instant later, and lines of concurrent workers never interleave.

An app mode is a module ``bench/soak_app_<name>.py`` offering what this one
does: ``FACTORY`` (the uvicorn factory), ``prepare(run)`` (set up what the
workers need; returns their extra environment), ``read_executions(run)``
(every execution, from whatever the mode counts them in) and
``cleanup(run)``. The transactional mode (issue 12) counts executions from
its business table instead of a ledger.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path
from typing import Any, Protocol

from soak_figures import Execution
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from idempo import Policy
from idempo.asgi import IdempotencyMiddleware

FACTORY = "soak_app_plain:create_app"


class Run(Protocol):
    """What an app mode gets from the soak (see ``soak.py``'s ``RunContext``)."""

    @property
    def workdir(self) -> Path: ...

    @property
    def store_url(self) -> str: ...


class Ledger:
    """Appends one line per handler start and end to a file shared by every worker (see the module docstring)."""

    def __init__(self, path: Path, worker: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._worker = worker
        self._pid = os.getpid()
        self._serial = itertools.count(1)

    def start(self, key: str) -> str:
        """Record a handler start; return the execution's id."""
        execution = f"{self._worker}-{next(self._serial)}"
        os.write(self._fd, f"S {execution} {key} {self._pid} {time.monotonic():.6f}\n".encode())
        return execution

    def end(self, key: str, execution: str) -> None:
        """Record that the handler returned its answer."""
        os.write(self._fd, f"E {execution} {key} {self._pid} {time.monotonic():.6f}\n".encode())


def create_app() -> Any:
    """The worker's ASGI app, from the ``SOAK_*`` environment (see the module docstring)."""
    ledger = Ledger(Path(os.environ["SOAK_LEDGER"]), os.environ["SOAK_WORKER"])

    async def payments(request: Request) -> Response:
        payment = await request.json()
        key = request.headers.get("idempotency-key", "-")
        execution = ledger.start(key)
        work_ms = payment.get("work_ms", 0)
        if work_ms:
            await asyncio.sleep(work_ms / 1000)
        ledger.end(key, execution)
        answer = {"id": execution, "order_id": payment.get("order_id"), "amount": payment.get("amount")}
        return JSONResponse({**answer, "status": "succeeded"}, status_code=201)

    app = Starlette(routes=[Route("/payments", payments, methods=["POST"])])
    policy = Policy(lease_ttl=float(os.environ["SOAK_LEASE"]))
    return IdempotencyMiddleware(app, os.environ["SOAK_STORE"], policy=policy)


def prepare(run: Run) -> dict[str, str]:
    """Create nothing: the ledger file is created by the first worker. Returns the workers' extra environment."""
    return {"SOAK_LEDGER": str(run.workdir / "ledger.txt")}


def read_executions(run: Run) -> list[Execution]:
    """Every execution in the ledger, its end filled in when the handler returned."""
    path = run.workdir / "ledger.txt"
    if not path.exists():
        return []
    starts: dict[str, tuple[str, str, float]] = {}
    ends: dict[str, float] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 5:
            continue  # cannot happen with O_APPEND writes; skip rather than guess
        kind, execution, key, _pid, at = parts
        if kind == "S":
            starts[execution] = (key, execution.rpartition("-")[0], float(at))
        elif kind == "E":
            ends[execution] = float(at)
    return [
        Execution(key=key, id=execution, worker=worker, start=start, end=ends.get(execution))
        for execution, (key, worker, start) in starts.items()
    ]


def cleanup(run: Run) -> None:
    """Nothing beyond the work directory, which the soak removes."""
