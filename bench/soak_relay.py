"""A TCP relay between the soak's workers and the store, which the soak cuts at will.

    python bench/soak_relay.py --upstream 127.0.0.1:5432

It listens on a free 127.0.0.1 port, prints ``listening PORT`` on stdout,
then reads one command a line on stdin and answers each with
``ok MODE T`` (``T``: ``time.monotonic()`` when the mode took effect, the
clock every process of the soak shares on Linux):

- ``pass``: forward bytes both ways (the store is reachable).
- ``blackhole``: a network that drops everything: open connections stay
  open and pass nothing (bytes already read are held, not lost, and go
  through once the relay passes again, as TCP would deliver them after a
  partition heals); new connections are accepted and pass nothing either.
- ``refuse``: the store is down: open connections are reset (TCP RST on
  both sides) and the listening socket is closed, so new connections are
  refused (ECONNREFUSED). ``pass`` listens again on the same port.

EOF on stdin (or ``quit``) stops the relay. Only the relay's own port is
cut: the shared PostgreSQL or Redis server is never touched.

What a relay cannot do: a real partition drops packets, so the sender's
kernel sees no ACK (TCP_USER_TIMEOUT and keepalives can notice it). Here the
relay's kernel acknowledges what it receives; a driver must notice the
silence with its own timers, which is what a store deadline is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import sys
import time

PASS = "pass"
BLACKHOLE = "blackhole"
REFUSE = "refuse"
MODES = (PASS, BLACKHOLE, REFUSE)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and, once the relay passes, its upstream connection."""

    __slots__ = ("client", "dead", "upstream")

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.dead = False

    def reset(self) -> None:
        self.dead = True
        _reset(self.client)
        _reset(self.upstream)


class Relay:
    """A TCP relay from a 127.0.0.1 port to ``upstream``, switched between PASS, BLACKHOLE and REFUSE.

    Args:
        upstream: ``(host, port)`` of the store.
        port: the port to listen on (0: a free one, kept across REFUSE).
    """

    def __init__(self, upstream: tuple[str, int], port: int = 0) -> None:
        self.upstream = upstream
        self.port = port
        self.mode = PASS
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    async def start(self) -> int:
        """Listen; return the port."""
        await self._listen()
        return self.port

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]

    async def set_mode(self, mode: str) -> None:
        """Switch to ``mode`` (PASS, BLACKHOLE or REFUSE).

        Raises:
            ValueError: an unknown mode.
        """
        if mode not in MODES:
            raise ValueError(f"unknown relay mode {mode!r}; known: {', '.join(MODES)}")
        self.mode = mode
        if mode == PASS:
            if self._server is None:
                await self._listen()
            self._open.set()
        elif mode == BLACKHOLE:
            self._open.clear()
            if self._server is None:
                await self._listen()
        else:
            self._open.clear()
            if self._server is not None:
                self._server.close()
                self._server = None
            for link in list(self._links):
                link.reset()

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.reset()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Waiting for the gate before reading leaves the bytes in the kernel's
        # buffers during a blackhole; waiting again before writing holds bytes
        # a read returned just as the blackhole began.
        while True:
            await self._open.wait()
            data = await reader.read(65536)
            if not data:
                return
            await self._open.wait()
            writer.write(data)
            await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        pumps: list[asyncio.Task[None]] = []
        try:
            # A connection accepted during a blackhole waits here, silent.
            await self._open.wait()
            if link.dead:  # reset by a refuse while it waited
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            link.upstream = up_writer
            if link.dead:  # reset while connecting upstream
                link.reset()
                return
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer)),
                asyncio.ensure_future(self._pump(up_reader, writer)),
            ]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            for task in pumps:
                task.cancel()
            for task in pumps:
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
            for side in (link.upstream, writer):
                if side is not None and not side.transport.is_closing():
                    side.close()
            self._links.discard(link)


async def _main(upstream: tuple[str, int], port: int) -> None:
    relay = Relay(upstream, port)
    print(f"listening {await relay.start()}", flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        while line := (await stdin.readline()).decode().strip():
            if line == "quit":
                break
            try:
                await relay.set_mode(line)
            except ValueError as exc:
                print(f"error {exc}", flush=True)
                continue
            print(f"ok {line} {time.monotonic():.6f}", flush=True)
    finally:
        await relay.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the store")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main((host.strip("[]"), int(port)), args.port))
    else:
        uvloop.run(_main((host.strip("[]"), int(port)), args.port))


if __name__ == "__main__":
    main()
