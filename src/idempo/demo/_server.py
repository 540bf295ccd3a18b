"""Serve the payments API on a listening socket handed over by the parent process.

``python -m idempo.demo._server --fd N --database PATH [--store URL]``

``idempo demo`` binds 127.0.0.1 on an ephemeral port itself, so it knows the
port before the server starts, and passes the socket to this process; the
storm client and the server then run in two processes and do not share a GIL.
The store URL comes from ``--store``, else from the ``IDEMPO_DEMO_STORE``
environment variable (how ``idempo demo`` passes it: a command line is
visible to every user in ``ps``, a password in the URL included; a process's
environment is not). With neither, the app runs without idempo. SIGTERM or
SIGINT stops it gracefully.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import uvicorn

from .payments import create_app

#: The environment variable that carries the store URL when ``--store`` is not given.
STORE_ENV = "IDEMPO_DEMO_STORE"


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
    args = parser.parse_args(argv)

    app = create_app(args.database, store=args.store or os.environ.get(STORE_ENV) or None)
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
