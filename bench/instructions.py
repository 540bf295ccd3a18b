"""Instructions per request of a variant's in-process request path, counted by valgrind: steady under load.

    bench/.venv/bin/python bench/instructions.py [VARIANT ...] [--n 1500] [--src DIR]

Runs ``bench/inprocess.py``'s request loop under ``valgrind --tool=callgrind``
twice, with ``--n`` requests and with none (the same start-up, imports and
warm-up), and prints the difference divided by ``--n``: the instructions one
request costs, unique keys (every request executes) and replays. Instruction
counts do not depend on what else the machine runs, so two sources compare
(``--src``: another checkout's ``src``, e.g. ``git archive main src``) on a
busy machine where CPU time wanders by 10 %. A count is not a time (cache
misses and branch mispredictions are not in it), but the code a change
removes is.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

_CHILD = """
import asyncio, itertools, os, sys
sys.path.insert(0, {here!r})
import uvloop, inprocess
from app import create_app
app = create_app({variant!r})
keys = itertools.count()
unique = {unique!r}

async def main() -> None:
    for _ in range(300):  # warm-up: imports, memos, the first record
        await inprocess.request(app, b"w%d" % next(keys) if unique else b"replayed")
    for _ in range({n}):
        await inprocess.request(app, b"k%d" % next(keys) if unique else b"replayed")

uvloop.run(main())
"""


def count(variant: str, unique: bool, n: int, env: dict[str, str]) -> int:
    """Instructions of one child run (the whole process)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        code = _CHILD.format(here=str(HERE), variant=variant, unique=unique, n=n)
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
        )
        match = re.search(r"Collected : (\d+)", proc.stderr)
        if proc.returncode != 0 or match is None:
            raise SystemExit(f"valgrind failed: {proc.stderr[-1500:]}")
        return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*", default=["idempo-memory"])
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--src", help="run another idempo source tree (the directory holding the idempo package)")
    args = parser.parse_args()
    env = dict(os.environ, BENCH_NONCE="instructions", PYTHONHASHSEED="0")
    env.setdefault("IDEMPO_SECRET", "instructions-secret-0123456789")
    env.setdefault("BENCH_DIR", tempfile.mkdtemp(prefix="idempo-instructions-"))
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    for variant in args.variants:
        for unique in (True, False):
            base = count(variant, unique, 0, env)
            total = count(variant, unique, args.n, env)
            per = (total - base) / args.n
            print(f"{variant:16} {'unique' if unique else 'replay':7} {per:10,.0f} instructions/request", flush=True)


if __name__ == "__main__":
    main()
