"""Round trips and statements per request of a PostgreSQL variant, counted on the wire by a relay.

    bench/.venv/bin/python bench/pg_wire.py [VARIANT ...] [--n 200] [--path /orders] [--show]

Runs ``bench/inprocess.py``'s request loop (no HTTP server) with the
variant's PostgreSQL connections going through a relay of this script's own
in front of ``$BENCH_PG_URL`` (default the test database on 127.0.0.1:5432),
and prints, per request after a warm-up: the round trips (a *flight*: the
client sending after the server answered, per connection), the protocol
messages the client sent (simple ``Query``; ``Parse``, ``Bind``,
``Execute``, ``Sync`` of the extended protocol), the statements (a Query's
text or an Execute), how many of them ran as server-side prepared
statements, and the pool checkouts that the requests made (connections the
relay saw carry traffic). ``--show`` prints the statements of one request.
The server's settings are untouched (``log_statement`` is shared); the
schemas the run makes are dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

SSL_REQUEST = 80877103


class Counts:
    """What the relay saw since the last reset."""

    def __init__(self) -> None:
        self.flights = 0
        self.messages: collections.Counter[str] = collections.Counter()
        self.statements: list[str] = []
        self.prepared = 0  # Bind of a named statement
        self.connections: set[int] = set()

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


COUNTS = Counts()


def _cstring(data: bytes, at: int) -> tuple[str, int]:
    end = data.index(b"\0", at)
    return data[at:end].decode("utf-8", "replace"), end + 1


async def _client_to_server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any], conn_id: int
) -> None:
    """Pump the client's bytes to the server, parsing the frontend messages."""
    buf = b""
    started = False
    parsed: dict[str, str] = {}  # statement name -> text (named Parse)
    unnamed = ""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        if state["answered"]:
            COUNTS.flights += 1
            COUNTS.connections.add(conn_id)
            state["answered"] = False
        writer.write(data)
        buf += data
        while True:
            if not started:
                if len(buf) < 8:
                    break
                (length,) = struct.unpack("!I", buf[:4])
                if len(buf) < length:
                    break
                code = struct.unpack("!I", buf[4:8])[0]
                buf = buf[length:]
                if code != SSL_REQUEST:
                    started = True
                continue
            if len(buf) < 5:
                break
            kind = chr(buf[0])
            (length,) = struct.unpack("!I", buf[1:5])
            if len(buf) < 1 + length:
                break
            body, buf = buf[5 : 1 + length], buf[1 + length :]
            if kind not in "QPBESD":  # authentication, Describe, Close, Terminate: not counted
                continue
            COUNTS.messages[kind] += 1
            if kind == "Q":
                text, _ = _cstring(body, 0)
                COUNTS.statements.append(f"Q  {text}")
            elif kind == "P":
                name, at = _cstring(body, 0)
                text, _ = _cstring(body, at)
                if name:
                    parsed[name] = text
                else:
                    unnamed = text
            elif kind == "B":
                _portal, at = _cstring(body, 0)
                name, _ = _cstring(body, at)
                state["bound"] = (name, parsed.get(name, "?") if name else unnamed)
            elif kind == "E":
                name, text = state.get("bound", ("", "?"))
                if name:
                    COUNTS.prepared += 1
                COUNTS.statements.append(f"{'E*' if name else 'E '} {text}")
    writer.close()


async def _server_to_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
    while True:
        data = await reader.read(65536)
        if not data:
            break
        state["answered"] = True
        writer.write(data)
    writer.close()


async def relay(target_host: str, target_port: int) -> tuple[asyncio.AbstractServer, int]:
    """A relay on a free local port in front of the server; returns it and its port."""
    ids = iter(range(10**9))

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(target_host, target_port)
        state: dict[str, Any] = {"answered": False}
        conn_id = next(ids)
        with contextlib.suppress(asyncio.CancelledError):  # the loop ends with connections still open
            await asyncio.gather(
                _client_to_server(client_reader, server_writer, state, conn_id),
                _server_to_client(server_reader, client_writer, state),
                return_exceptions=True,
            )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def prepare(url: str, schema: str) -> None:
    """idempo's tables in ``schema``, ``<schema>_ac`` and ``<schema>_tx``; the floor's and (e)'s in ``schema``."""
    import psycopg

    from idempo.stores.postgres import PostgresStore

    for name in (schema, schema + "_ac", schema + "_tx"):
        store = PostgresStore(url, schema=name, check_schema=False, application_name="idempo-bench")
        try:
            store.create_schema()
        finally:
            store.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".bench_floor (k text PRIMARY KEY, v bytea)')
        conn.execute(
            f'CREATE TABLE "{schema}".bench_orders (id bigserial PRIMARY KEY, serial bigint NOT NULL, '
            "amount bigint, currency text, created_at timestamptz NOT NULL DEFAULT now())"
        )


def drop(url: str, schema: str) -> None:
    """Drop the schemas :func:`prepare` made."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for suffix in ("", "_ac", "_tx"):
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}{suffix}" CASCADE')


async def measure(variant: str, n: int, path: str, show: bool, url: str) -> None:
    import inprocess
    from app import create_app

    parts = urlsplit(url)
    server, port = await relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    netloc = f"{parts.username or 'postgres'}@127.0.0.1:{port}"
    query = "sslmode=disable" + (f"&{parts.query}" if parts.query else "")
    os.environ["BENCH_PG_URL"] = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    inprocess.SCOPE["path"] = path
    inprocess.SCOPE["raw_path"] = path.encode()
    app = create_app(variant)
    keys = iter(range(10**9))
    async with Lifespan(app):
        for _ in range(30):  # warm-up: pools, the schema check, psycopg's prepare threshold
            await inprocess.request(app, b"w%d" % next(keys))
        await asyncio.sleep(0.2)
        if show:
            COUNTS.reset()
            await inprocess.request(app, b"s%d" % next(keys))
            await asyncio.sleep(0.05)
            print(f"{variant}: the statements of one request ({COUNTS.flights} round trips)")
            for line in COUNTS.statements:
                print("   ", " ".join(line.split())[:150])
        COUNTS.reset()
        for _ in range(n):
            await inprocess.request(app, b"k%d" % next(keys))
        await asyncio.sleep(0.05)
        counted = COUNTS
        m = counted.messages
        print(
            f"{variant:20} {path:9} per request: {counted.flights / n:.2f} round trips, "
            f"{len(counted.statements) / n:.2f} statements ({counted.prepared / n:.2f} prepared), "
            f"messages Q {m['Q'] / n:.2f} P {m['P'] / n:.2f} B {m['B'] / n:.2f} E {m['E'] / n:.2f} "
            f"S {m['S'] / n:.2f}; {len(counted.connections)} connection(s) used",
            flush=True,
        )
    server.close()


class Lifespan:
    """Run the app's lifespan (idempo opens its store, the tx variant its pool) around the requests."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def __aenter__(self) -> None:
        async def receive() -> dict[str, Any]:
            return await self.queue.get()

        async def send(message: dict[str, Any]) -> None:
            await self.sent.put(message)

        self.task = asyncio.ensure_future(self.app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
        await self.queue.put({"type": "lifespan.startup"})
        message = await self.sent.get()
        assert message["type"] == "lifespan.startup.complete", message

    async def __aexit__(self, *exc: object) -> None:
        await self.queue.put({"type": "lifespan.shutdown"})
        await self.sent.get()
        await self.task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "variants", nargs="*", default=["bare", "idempo-postgres", "idempo-postgres-tx", "floor-postgres"]
    )
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--path", default="/orders", help="/orders (scenario e) or /payments")
    parser.add_argument("--show", action="store_true", help="print the statements of one request")
    args = parser.parse_args()
    url = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
    schema = os.environ.setdefault("BENCH_PG_SCHEMA", "wire" + uuid.uuid4().hex[:10])
    os.environ.setdefault("BENCH_NONCE", schema)
    os.environ.setdefault("BENCH_DIR", tempfile.mkdtemp(prefix="idempo-wire-"))
    os.environ.setdefault("IDEMPO_SECRET", "wire-secret-0123456789abcdef")
    if os.environ.get("PG_WIRE_CHILD"):  # one variant per process: the app module keeps its pools in globals
        import uvloop

        uvloop.run(measure(args.variants[0], args.n, args.path, args.show, url))
        return
    prepare(url, schema)
    try:
        for variant in args.variants:
            flags = ["--n", str(args.n), "--path", args.path] + (["--show"] if args.show else [])
            env = dict(os.environ, PG_WIRE_CHILD="1")
            subprocess.run([sys.executable, __file__, variant, *flags], check=True, env=env)
    finally:
        drop(url, schema)


if __name__ == "__main__":
    main()
