"""CPU time of ``idempo proxy`` per request, over N sequential requests: a figure the machine's load moves little.

Starts a minimal upstream (a raw asyncio server answering ``201`` with a small
JSON body) and ``idempo proxy`` on the memory store, sends ``--warmup``
requests, then ``--n`` sequential requests on one keep-alive connection, and
reads the proxy process's CPU time (``/proc/<pid>/stat``: user + system)
before and after. The figure is that difference over ``--n``, in
microseconds, the best of ``--rounds`` runs (the least disturbed by other
processes' cache and scheduling). ``--src DIR`` runs another checkout's
``src`` (e.g. ``git archive <commit> src | tar -x -C /tmp/x``), so two trees
compare in one invocation::

    .venv/bin/python bench/proxy_cpu.py                  # keyed POSTs (a): unique keys
    .venv/bin/python bench/proxy_cpu.py --kind replay    # (b): one key, replayed
    .venv/bin/python bench/proxy_cpu.py --kind unkeyed   # no key: the plain forwarder
    .venv/bin/python bench/proxy_cpu.py --src /tmp/before/src --src src
    .venv/bin/python bench/proxy_cpu.py --valgrind --n 500 --src /tmp/before/src --src src

``--valgrind`` counts instructions instead (callgrind, the whole proxy process,
a run with ``--n`` requests less one with none): a count does not move with
the machine's load (but cache misses are not in it).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

UPSTREAM = r"""
import asyncio, sys
BODY = b'{"id": "p_1", "amount": 5}'
ANSWER = (b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
class P(asyncio.Protocol):
    def connection_made(self, t): self.t, self.buf = t, b""
    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0: return
            head = self.buf[:end].lower()
            n = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"): n = int(line.split(b":")[1])
            if len(self.buf) < end + 4 + n: return
            self.buf = self.buf[end + 4 + n:]
            self.t.write(ANSWER)
async def main():
    server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, in seconds (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request(sock: socket.socket, kind: str, k: str) -> None:
    """One request on the keep-alive connection; its whole answer read."""
    body = b'{"amount": 5}'
    key = b"" if kind == "unkeyed" else b"Idempotency-Key: " + k.encode() + b"\r\n"
    sock.sendall(
        b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + key
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    status = head.split(b" ", 2)[1]
    if status not in (b"200", b"201"):
        raise RuntimeError(f"unexpected answer: {data[:300]!r}")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(rest) < length:
        rest += sock.recv(65536)


def measure(src: str, kind: str, n: int, warmup: int, upstream: int, client: str, valgrind: bool = False) -> float:
    """Microseconds of the proxy's CPU per request over ``n`` sequential requests.

    With ``valgrind``: the instructions the whole proxy process executed under
    callgrind (start-up, the warm-up and the ``n`` requests, and shut-down).
    """
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "proxy.toml"
        config.write_text(f'[upstream]\nclient = "{client}"\n')
        log = Path(work) / "proxy.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPO_PROXY_")}
        env.update(PYTHONPATH=str(Path(src).resolve()), PYTHONUNBUFFERED="1", IDEMPO_PROXY_STORE="memory://")
        args = ["--config", str(config), "--upstream", f"http://127.0.0.1:{upstream}", "--listen", "127.0.0.1:0"]
        command = [sys.executable, "-m", "idempo", "proxy", *args]
        if valgrind:
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/callgrind.out", *command]
        with log.open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            found = None
            deadline = time.monotonic() + (900 if valgrind else 60)
            while found is None and time.monotonic() < deadline and proc.poll() is None:
                found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
                time.sleep(0.05)
            if found is None:
                raise RuntimeError(f"the proxy did not start: {log.read_text(errors='replace')[-800:]}")
            with socket.create_connection(("127.0.0.1", int(found.group(1)))) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                fixed = uuid.uuid4().hex
                for i in range(warmup):
                    request(sock, kind, fixed if kind == "replay" else f"w{i}-{fixed}")
                before = cpu_seconds(proc.pid)
                for i in range(n):
                    request(sock, kind, fixed if kind == "replay" else f"m{i}-{fixed}")
                after = cpu_seconds(proc.pid)
            if not valgrind:
                return (after - before) / n * 1e6
            proc.terminate()  # uvicorn's graceful exit: valgrind then writes its totals
            proc.wait(300)
            collected = re.search(r"Collected : (\d+)", log.read_text(errors="replace"))
            if collected is None:
                raise RuntimeError(f"no callgrind totals: {log.read_text(errors='replace')[-800:]}")
            return float(collected.group(1))
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", action="append", help="a checkout's src directory (repeatable; default ./src)")
    parser.add_argument("--kind", choices=("keyed", "replay", "unkeyed"), default="keyed")
    parser.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--valgrind",
        action="store_true",
        help="count instructions under callgrind instead (a run with --n requests less one with none; slow)",
    )
    options = parser.parse_args()
    sources = options.src or [str(Path(__file__).resolve().parent.parent / "src")]
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM], stdout=subprocess.PIPE, text=True)
    try:
        assert upstream.stdout is not None
        port = int(upstream.stdout.readline())
        best: dict[str, float] = {}
        if options.valgrind:
            for src in sources:
                runs = [
                    measure(src, options.kind, n, options.warmup, port, options.client, valgrind=True)
                    for n in (options.n, 0)
                ]
                each = (runs[0] - runs[1]) / options.n
                print(f"{src}: {each:.0f} instructions per {options.kind} request ({options.n} under callgrind)")
            return
        for _ in range(options.rounds):  # interleaved, so a busy spell hits every source alike
            for src in sources:
                figure = measure(src, options.kind, options.n, options.warmup, port, options.client)
                best[src] = min(best.get(src, figure), figure)
        for src in sources:
            print(f"{src}: {best[src]:.0f} us CPU per {options.kind} request (best of {options.rounds} x {options.n})")
    finally:
        upstream.terminate()
        upstream.wait(10)


if __name__ == "__main__":
    main()
