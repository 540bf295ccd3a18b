"""Serve the payments API on a listening socket handed over by the parent process.

``python -m idempo.demo._server --fd N --database PATH [--store URL] [--lease SECONDS] [--ready-fd N]
[--transactional [--tables-schema NAME]]``

``idempo demo`` binds 127.0.0.1 on an ephemeral port itself, so it knows the
port before the server starts, and passes the socket to this process; the
storm client and the server then run in two processes and do not share a GIL.
The store URL comes from ``--store``, else from the ``IDEMPO_DEMO_STORE``
environment variable (how ``idempo demo`` passes it: a command line is
visible to every user in ``ps``, a password in the URL included; a process's
environment is not). With neither, the app runs without idempo. SIGTERM or
SIGINT stops it gracefully.

``idempo demo --kill-workers`` runs several of these on one socket under a
supervisor (:mod:`idempo.demo._workers`): ``--ready-fd`` names a pipe this
process writes one byte to once uvicorn serves, and ``--lease`` shortens the
lease, so a retry after a SIGKILL waits seconds, not the demo's 30 s.
``--transactional`` serves :mod:`idempo.demo._transactional` instead: its
rows in the store's database (``--tables-schema`` on PostgreSQL), its
handler executions counted in ``--database``.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import Any

import uvicorn

from .payments import DEMO_POLICY, create_app

#: The environment variable that carries the store URL when ``--store`` is not given.
STORE_ENV = "IDEMPO_DEMO_STORE"


class _Server(uvicorn.Server):
    """A uvicorn server that tells its supervisor, through a pipe, once it serves."""

    def __init__(self, config: uvicorn.Config, ready_fd: int | None) -> None:
        super().__init__(config)
        self._ready_fd = ready_fd

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._ready_fd is not None and self.started:
            os.write(self._ready_fd, b"r")
            os.close(self._ready_fd)
            self._ready_fd = None


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and serve until a signal stops the server."""
    parser = argparse.ArgumentParser(prog="python -m idempo.demo._server")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of a listening TCP socket")
    parser.add_argument("--database", type=Path, required=True, help="the app's SQLite file")
    parser.add_argument(
        "--store",
        default=None,
        help=f"idempo's store URL (default: ${STORE_ENV}); without either, the app runs without idempo",
    )
    parser.add_argument("--lease", type=float, default=None, help="the lease TTL, seconds (default: the demo policy's)")
    parser.add_argument("--ready-fd", type=int, default=None, help="a pipe to write one byte to once the server serves")
    parser.add_argument(
        "--transactional",
        action="store_true",
        help="serve the transactional payments app (its rows in the store's database; --database counts executions)",
    )
    parser.add_argument(
        "--tables-schema", default=None, help="with --transactional on PostgreSQL: the schema of the app's tables"
    )
    args = parser.parse_args(argv)

    policy = DEMO_POLICY if args.lease is None else DEMO_POLICY.replace(lease_ttl=args.lease)
    store = args.store or os.environ.get(STORE_ENV) or None
    app: Any
    if args.transactional:
        if store is None:
            parser.error(f"--transactional needs a store (--store or ${STORE_ENV})")
        from ._transactional import Tables, create_transactional_app

        app = create_transactional_app(Tables(store, args.tables_schema), args.database, policy=policy)
    else:
        app = create_app(args.database, store=store, policy=policy)
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    _Server(config, args.ready_fd).run(sockets=[sock])


if __name__ == "__main__":
    main()
