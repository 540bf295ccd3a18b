"""A minimal HTTP/1.1 client on asyncio streams, for the correctness scenarios.

Raw sockets rather than httpx, so that sixteen duplicates leave within
microseconds of each other: every connection is opened first, then each
request is written without awaiting in between (scenario c).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Answer:
    """One HTTP response: status, lower-case header names, body bytes."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def encode_request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One keep-alive connection; reconnects when the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    def write(self, raw: bytes) -> None:
        assert self.writer is not None
        self.writer.write(raw)

    async def read(self) -> Answer:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        else:
            body = b""
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Answer(status, headers, body)

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Answer:
        """Send one request and read its answer; one reconnect when the connection was closed."""
        for attempt in (1, 2):
            if self.writer is None or self.writer.is_closing():
                await self.open()
            try:
                self.write(encode_request(method, path, headers, body))
                return await self.read()
            except (asyncio.IncompleteReadError, ConnectionError):
                await self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def get_json(port: int, path: str) -> Any:
    conn = Connection(port)
    try:
        return (await conn.request("GET", path, {})).json()
    finally:
        await conn.close()


def payment(key: str, body: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """Headers and body of a POST /payments with this key."""
    return {"Content-Type": "application/json", "Idempotency-Key": key}, json.dumps(body).encode()
