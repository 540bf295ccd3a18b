"""Instructions per request of a variant's in-process request path, counted by valgrind: steady under load.

    bench/.venv/bin/python bench/instructions.py [VARIANT ...] [--n 1500] [--src DIR] [--modes unique,replay]
    bench/.venv/bin/python bench/instructions.py VARIANT --where [--top 40]        # Python: where, by function
    bench/.venv/bin/python bench/instructions.py VARIANT --annotate [--top 40]     # C and Python: by function

Runs ``bench/inprocess.py``'s request loop under ``valgrind --tool=callgrind``
twice, with ``--n`` requests and with none (the same start-up, imports and
warm-up), and prints the difference divided by ``--n``: the instructions one
request costs, unique keys (every request executes) and replays. Instruction
counts do not depend on what else the machine runs, so two sources compare
(``--src``: another checkout's ``src``, e.g. ``git archive main src``) on a
busy machine where CPU time wanders by 10 %. A count is not a time (cache
misses and branch mispredictions are not in it), but the code a change
removes is.

The network stores' variants (``idempo-redis``, ``idempo-postgres``,
``floor-redis``, ``floor-postgres``, ...) run each child on records of its
own: a fresh ``BENCH_NONCE`` (the Redis key prefix) and, for PostgreSQL, a
fresh schema (idempo's tables and the floor's), dropped afterwards; so no
run replays another run's records and a replay run's first request executes.
The servers are ``--redis-url`` / ``--pg-url`` (``$BENCH_REDIS_URL`` /
``$BENCH_PG_URL``, else the local defaults).

``--where``: no valgrind; the measured requests run under ``sys.settrace``
with opcode events, and the bytecodes each Python function executes per
request are printed (self, by function and by package): also
load-independent, and it names the Python code a C-level count cannot.
``--annotate``: the valgrind runs' outputs are kept and
``callgrind_annotate`` is read for both; the difference per request is
printed by function (self instructions: the interpreter's own functions,
hiredis, libpq, uvloop, the kernel-call wrappers).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
    {gc_off}
    {start}
    for _ in range({n}):
        await inprocess.request(app, b"k%d" % next(keys) if unique else b"replayed")
    {stop}

uvloop.run(main())
"""

# --where: a tally of opcode events per code object, printed as JSON lines by the child.
_TRACE_START = """
    import collections, json
    tally = collections.Counter()
    def local(frame, event, arg):
        if event == "opcode":
            tally[frame.f_code] += 1
        return local
    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        return local
    sys.settrace(tracer)"""
_TRACE_STOP = """sys.settrace(None)
    for code, count in tally.items():
        print("TALLY " + json.dumps([code.co_filename, code.co_firstlineno, code.co_qualname, count]))"""


def _store_of(variant: str) -> str | None:
    """The network store a variant needs (None: memory, SQLite, the bare app)."""
    if "postgres" in variant:
        return "postgres"
    if "redis" in variant:
        return "redis"
    return None


@contextmanager
def records_of_its_own(variant: str, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The child's environment with a key prefix and (PostgreSQL) a schema of its own, removed after."""
    store = _store_of(variant)
    if store is None:
        yield env
        return
    nonce = "instr" + uuid.uuid4().hex[:12]
    child = dict(env, BENCH_NONCE=nonce, BENCH_PG_SCHEMA=nonce)
    schemas = (nonce, nonce + "_ac")
    if store == "postgres":
        import psycopg

        from idempo.stores.postgres import PostgresStore

        for name in schemas:
            made = PostgresStore(env["BENCH_PG_URL"], schema=name, check_schema=False, application_name="idempo-bench")
            try:
                made.create_schema()
            finally:
                made.close()
        with psycopg.connect(env["BENCH_PG_URL"], autocommit=True) as conn:
            conn.execute(f'CREATE TABLE "{nonce}".bench_floor (k text PRIMARY KEY, v bytea)')
    try:
        yield child
    finally:
        if store == "postgres":
            import psycopg

            with psycopg.connect(env["BENCH_PG_URL"], autocommit=True) as conn:
                for name in schemas:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        else:
            import redis

            client = redis.Redis.from_url(env["BENCH_REDIS_URL"])
            try:
                keys = list(client.scan_iter(match=f"{nonce}:*", count=1000))
                for at in range(0, len(keys), 1000):
                    client.unlink(*keys[at : at + 1000])
            finally:
                client.close()


#: --gc-off: the collector frozen and off after the warm-up, so two trees' counts do not differ by
#: where its generations happen to fire (steadier for a small step).
GC_OFF = False


def _child(variant: str, unique: bool, n: int, trace: bool = False) -> str:
    start, stop = (_TRACE_START, _TRACE_STOP) if trace else ("", "")
    gc_off = "import gc; gc.collect(); gc.freeze(); gc.disable()" if GC_OFF else ""
    return _CHILD.format(here=str(HERE), variant=variant, unique=unique, n=n, start=start, stop=stop, gc_off=gc_off)


def count(variant: str, unique: bool, n: int, env: dict[str, str], keep: Path | None = None) -> int:
    """Instructions of one child run (the whole process); ``keep``: where to leave callgrind's output."""
    with tempfile.TemporaryDirectory() as tmp, records_of_its_own(variant, env) as child_env:
        out = keep or Path(tmp) / "callgrind.out"
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                _child(variant, unique, n),
            ],
            capture_output=True,
            text=True,
            env=child_env,
        )
        match = re.search(r"Collected : (\d+)", proc.stderr)
        if proc.returncode != 0 or match is None:
            raise SystemExit(f"valgrind failed: {proc.stderr[-1500:]}")
        return int(match.group(1))


_ANNOTATED = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(.+?)\s*$")


def _by_function(out: Path) -> dict[str, int]:
    """Self instructions by function in one callgrind output."""
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(out)], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, int] = {}
    for line in text.splitlines():
        match = _ANNOTATED.match(line)
        if match and ":" in match.group(2) and not match.group(2).startswith("PROGRAM TOTALS"):
            name = match.group(2)
            found[name] = found.get(name, 0) + int(match.group(1).replace(",", ""))
    return found


def annotate(variant: str, unique: bool, n: int, env: dict[str, str], top: int) -> None:
    """Print the per-request difference of self instructions by function (callgrind_annotate)."""
    with tempfile.TemporaryDirectory() as tmp:
        base_out, total_out = Path(tmp) / "base.out", Path(tmp) / "total.out"
        base = count(variant, unique, 0, env, base_out)
        total = count(variant, unique, n, env, total_out)
        before, after = _by_function(base_out), _by_function(total_out)
    per = {name: (after.get(name, 0) - before.get(name, 0)) / n for name in set(before) | set(after)}
    print(f"{variant} {'unique' if unique else 'replay'}: {(total - base) / n:,.0f} instructions/request")
    for name, value in sorted(per.items(), key=lambda item: -item[1])[:top]:
        print(f"{value:12,.0f}  {name}")


def _package(filename: str) -> str:
    """A short name for where a code object lives: the package under site-packages, idempo's module, ..."""
    path = filename.replace("\\", "/")
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/idempo/" in path:
        return "idempo/" + path.split("/idempo/", 1)[1]
    if "/lib/python" in path:
        rest = path.split("/lib/python", 1)[1].split("/", 1)[1]
        return "stdlib/" + rest.split("/", 1)[0].removesuffix(".py")
    return Path(path).name


def where(variant: str, unique: bool, n: int, env: dict[str, str], top: int) -> None:
    """Print the bytecodes executed per request by Python function and by package (sys.settrace)."""
    import json

    with records_of_its_own(variant, env) as child_env:
        proc = subprocess.run(
            [sys.executable, "-c", _child(variant, unique, n, trace=True)],
            capture_output=True,
            text=True,
            env=child_env,
        )
    if proc.returncode != 0:
        raise SystemExit(f"the traced run failed: {proc.stderr[-1500:]}")
    rows = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("TALLY ")]
    by_package: dict[str, int] = {}
    for filename, _, _, tally in rows:
        by_package[_package(filename)] = by_package.get(_package(filename), 0) + tally
    total = sum(row[3] for row in rows)
    print(f"{variant} {'unique' if unique else 'replay'}: {total / n:,.0f} bytecodes/request")
    for name, tally in sorted(by_package.items(), key=lambda item: -item[1])[:top]:
        print(f"{tally / n:9,.1f}  {name}")
    print("by function:")
    for filename, line, qualname, tally in sorted(rows, key=lambda row: -row[3])[:top]:
        print(f"{tally / n:9,.1f}  {_package(filename)}:{line} {qualname}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*", default=["idempo-memory"])
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--src", help="run another idempo source tree (the directory holding the idempo package)")
    parser.add_argument("--modes", default="unique,replay", help="unique, replay or both (comma-separated)")
    parser.add_argument("--where", action="store_true", help="bytecodes per request by Python function, no valgrind")
    parser.add_argument("--annotate", action="store_true", help="instructions per request by function (valgrind)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--gc-off", action="store_true", help="the collector frozen and off after the warm-up")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    global GC_OFF
    GC_OFF = args.gc_off
    env = dict(
        os.environ,
        BENCH_NONCE="instructions",
        PYTHONHASHSEED="0",
        BENCH_REDIS_URL=args.redis_url,
        BENCH_PG_URL=args.pg_url,
    )
    env.setdefault("IDEMPO_SECRET", "instructions-secret-0123456789")
    env.setdefault("BENCH_DIR", tempfile.mkdtemp(prefix="idempo-instructions-"))
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    modes = [mode.strip() for mode in args.modes.split(",")]
    for variant in args.variants:
        for unique in (True, False):
            if ("unique" if unique else "replay") not in modes:
                continue
            if args.where:
                where(variant, unique, args.n, env, args.top)
            elif args.annotate:
                annotate(variant, unique, args.n, env, args.top)
            else:
                base = count(variant, unique, 0, env)
                total = count(variant, unique, args.n, env)
                per = (total - base) / args.n
                print(
                    f"{variant:16} {'unique' if unique else 'replay':7} {per:10,.0f} instructions/request", flush=True
                )


if __name__ == "__main__":
    main()
