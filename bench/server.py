"""Serve one variant of ``bench/app.py``: ``python bench/server.py --fd N --variant NAME``.

One uvicorn worker on uvloop with httptools, access log off, on a listening
socket the runner bound (127.0.0.1, ephemeral port) and passed as ``--fd``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from app import create_app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--variant", required=True)
    args = parser.parse_args()
    os.environ["BENCH_VARIANT"] = args.variant
    if os.environ.get("BENCH_GC_DISABLE"):  # diagnostics only: never set by the runner
        import gc

        gc.disable()
    config = uvicorn.Config(
        create_app(args.variant),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        # Only the transactional variant needs the lifespan: its pool (the app's) opens there, before idempo's store.
        lifespan="on" if args.variant == "idempo-postgres-tx" else "off",
        workers=1,
    )
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=args.fd)])


if __name__ == "__main__":
    main()
