"""The fault-injecting HTTP/1.1 proxy, public as :mod:`idempo.faults` (which describes it)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import h11

# Public names: idempo.faults re-exports them (its __all__).

# Hop-by-hop headers (RFC 9110 section 7.6.1) and framing, which the proxy sets itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)


class FaultKind(enum.Enum):
    """What the proxy does with one request (see the module docstring)."""

    PASS = "pass"
    DROP_ANSWER = "drop_answer"
    STALL = "stall"
    RESPOND = "respond"
    RESET_BEFORE_BODY = "reset_before_body"


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: its kind and, for some kinds, its parameters.

    Attributes:
        kind: what the proxy does.
        seconds: STALL: how long the answer is held, seconds.
        status: RESPOND: the status the proxy answers with.
        headers: RESPOND: the answer's headers.
        body: RESPOND: the answer's body.
    """

    kind: FaultKind
    seconds: float = 0.0
    status: int = 503
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @classmethod
    def stall(cls, seconds: float) -> Fault:
        """Forward the request, then hold the answer ``seconds`` before sending it."""
        return cls(FaultKind.STALL, seconds=seconds)

    @classmethod
    def respond(
        cls,
        status: int = 503,
        *,
        retry_after: str | int | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Fault:
        """Answer ``status`` without forwarding (``Retry-After`` added when given)."""
        all_headers = tuple(headers)
        if retry_after is not None:
            all_headers += (("Retry-After", str(retry_after)),)
        return cls(FaultKind.RESPOND, status=status, headers=all_headers, body=body)


#: Forward the request and return the answer.
PASS = Fault(FaultKind.PASS)
#: Forward the request, then close the connection without answering.
DROP_ANSWER = Fault(FaultKind.DROP_ANSWER)
#: Reset the connection after the request head, before reading the body.
RESET_BEFORE_BODY = Fault(FaultKind.RESET_BEFORE_BODY)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request's method, target and headers as the proxy received them.

    Attributes:
        method: e.g. ``"POST"``.
        target: the request target, e.g. ``"/payments?x=1"``.
        headers: ``(name, value)`` pairs in the order and letter case sent.
    """

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.partition("?")[0]

    def header_values(self, name: str) -> list[str]:
        """Every value of a header (name matched in any case), in order."""
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request the proxy received, and what it did with it.

    Attributes:
        head: method, target and headers.
        body: the body read (empty for RESET_BEFORE_BODY).
        fault: the fault applied.
        connection: the client connection's number (1, 2, ... in accept order).
    """

    head: RequestHead
    body: bytes
    fault: Fault
    connection: int

    @property
    def method(self) -> str:
        """The request method."""
        return self.head.method

    @property
    def path(self) -> str:
        """The request path."""
        return self.head.path

    def header_values(self, name: str) -> list[str]:
        """Every value of a header, in order (see :meth:`RequestHead.header_values`)."""
        return self.head.header_values(name)


#: Decides the fault for each request, from its head. Called on the proxy's thread.
FaultPlan = Callable[[RequestHead], Fault]


def _pass(head: RequestHead) -> Fault:
    return PASS


def scripted(*faults: Fault, then: Fault = PASS) -> FaultPlan:
    """A plan that applies ``faults`` to the first requests in order, then ``then`` to every other."""
    pending = iter(faults)

    def plan(head: RequestHead) -> Fault:
        return next(pending, then)

    return plan


def random_faults(
    seed: int,
    *,
    drop_answer: float = 0.0,
    stall: float = 0.0,
    unavailable: float = 0.0,
    reset_before_body: float = 0.0,
    stall_seconds: float = 1.0,
    retry_after: str | int = 1,
    methods: Iterable[str] | None = None,
) -> FaultPlan:
    """A plan that draws each request's fault from a seeded RNG.

    Args:
        seed: the RNG seed (the same seed and order of requests give the same faults).
        drop_answer: fraction (0-1) of requests whose answer is dropped.
        stall: fraction whose answer is held ``stall_seconds``.
        unavailable: fraction answered ``503`` with ``Retry-After: retry_after``.
        reset_before_body: fraction reset before the body is read.
        stall_seconds: seconds a stalled answer is held.
        retry_after: the ``Retry-After`` of the 503s.
        methods: only requests with these methods get faults (default: all).

    Raises:
        ValueError: a fraction is negative, or the fractions add up to more than 1.
    """
    weights = [drop_answer, stall, unavailable, reset_before_body]
    if any(w < 0 for w in weights) or sum(weights) > 1:
        raise ValueError("fault fractions must be non-negative and add up to at most 1")
    faults = [DROP_ANSWER, Fault.stall(stall_seconds), Fault.respond(503, retry_after=retry_after), RESET_BEFORE_BODY]
    only = None if methods is None else frozenset(m.upper() for m in methods)
    rng = random.Random(seed)

    def plan(head: RequestHead) -> Fault:
        if only is not None and head.method not in only:
            return PASS
        draw = rng.random()
        for fault, weight in zip(faults, weights, strict=True):
            if draw < weight:
                return fault
            draw -= weight
        return PASS

    return plan


@dataclass
class _Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reason: bytes = b""


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(65536))


async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        else:
            return None  # the peer closed half-way


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Upstream:
    """One keep-alive connection to the upstream server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = h11.Connection(h11.CLIENT)
        self.closed = False

    async def exchange(self, request: h11.Request, body: bytes) -> _Answer:
        headers = [(n, v) for n, v in request.headers.raw_items() if n.lower() not in _HOP_BY_HOP]
        if body or request.method not in (b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"):
            headers.append((b"content-length", str(len(body)).encode()))
        conn = self._conn
        data = conn.send(h11.Request(method=request.method, target=request.target, headers=headers)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        self._writer.write(data)
        await self._writer.drain()
        event = await _next_event(conn, self._reader)
        while isinstance(event, h11.InformationalResponse):
            event = await _next_event(conn, self._reader)
        if not isinstance(event, h11.Response):
            raise ConnectionError("the upstream server closed the connection without answering")
        answer_body = await _read_body(conn, self._reader)
        if answer_body is None:
            raise ConnectionError("the upstream server closed the connection half-way through its answer")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self.close()
        return _Answer(event.status_code, list(event.headers.raw_items()), answer_body, bytes(event.reason))

    def close(self) -> None:
        self.closed = True
        self._writer.close()


def _answer_bytes(conn: h11.Connection, method: str, answer: _Answer) -> bytes:
    # A HEAD answer keeps the server's Content-Length: it describes the body a GET would get.
    keep = {b"content-length"} if method == "HEAD" else set()
    headers = [(n, v) for n, v in answer.headers if n.lower() not in _HOP_BY_HOP or n.lower() in keep]
    if method != "HEAD" and answer.status not in (204, 304):
        headers.append((b"content-length", str(len(answer.body)).encode()))
    data = conn.send(h11.Response(status_code=answer.status, headers=headers, reason=answer.reason)) or b""
    if answer.body and method != "HEAD" and answer.status not in (204, 304):
        data += conn.send(h11.Data(data=answer.body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


@dataclass
class _Stats:
    connections: int = 0
    faults: Counter[FaultKind] = field(default_factory=Counter)


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 that injects faults between a client and a server.

    Args:
        upstream: the server's base URL, ``http://host:port`` (plain HTTP).
        plan: decides each request's :class:`Fault`; default: no faults.
        host: the address to listen on (a free port is chosen).

    Use it as a context manager (or call :meth:`start` and :meth:`close`);
    :attr:`url` is the address to send requests to.

    Attributes:
        url: ``http://127.0.0.1:<port>`` once started.
        log: every request received, in order, as :class:`SeenRequest`.
    """

    def __init__(self, upstream: str, plan: FaultPlan = _pass, *, host: str = "127.0.0.1") -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"upstream must be an http://host:port URL, got {upstream!r}")
        self._upstream = (parts.hostname, parts.port or 80)
        self.plan = plan
        self.log: list[SeenRequest] = []
        self._host = host
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connection_ids = itertools.count(1)
        self.url = ""

    def start(self) -> FaultProxy:
        """Start listening on a free port, in a background thread; return self.

        Raises:
            RuntimeError: the proxy did not start within 10 seconds.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, 0))
        sock.listen(1024)
        self._sock = sock
        self.url = f"http://{self._host}:{sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._run, name="idempo-fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._failure is not None:
            raise RuntimeError("the fault proxy did not start") from self._failure
        return self

    def close(self) -> None:
        """Stop the proxy: close the listening socket and every open connection."""
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop already stopped
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        if self._sock is not None:
            self._sock.close()
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def fault_counts(self) -> Counter[FaultKind]:
        """How many requests got each kind of fault."""
        return Counter(seen.fault.kind for seen in self.log)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(), which raises
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, sock=self._sock)
        self._ready.set()
        await self._stop.wait()
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = next(self._connection_ids)
        conn = h11.Connection(h11.SERVER)
        upstream: _Upstream | None = None
        try:
            while True:
                event = await _next_event(conn, reader)
                if not isinstance(event, h11.Request):
                    return  # the client closed the connection
                head = RequestHead(
                    event.method.decode("ascii"),
                    event.target.decode("latin-1"),
                    tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()),
                )
                fault = self.plan(head)
                if fault.kind is FaultKind.RESET_BEFORE_BODY:
                    self.log.append(SeenRequest(head, b"", fault, number))
                    _reset(writer)
                    return
                body = await _read_body(conn, reader)
                if body is None:
                    return
                self.log.append(SeenRequest(head, body, fault, number))
                if fault.kind is FaultKind.RESPOND:
                    answer = _Answer(fault.status, [(n.encode(), v.encode()) for n, v in fault.headers], fault.body)
                else:
                    try:
                        if upstream is None or upstream.closed:
                            upstream = _Upstream(*await asyncio.open_connection(*self._upstream))
                        answer = await upstream.exchange(event, body)
                    except (OSError, h11.ProtocolError):
                        if upstream is not None:
                            upstream.close()
                        answer = _Answer(502, [(b"content-type", b"text/plain")], b"upstream failed")
                    if fault.kind is FaultKind.DROP_ANSWER:
                        return  # the handler ran; its answer is lost
                    if fault.kind is FaultKind.STALL:
                        await asyncio.sleep(fault.seconds)
                writer.write(_answer_bytes(conn, head.method, answer))
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError):
            pass  # the client went away or spoke nonsense: drop the connection
        except asyncio.CancelledError:
            # Only close() cancels these tasks. Ending normally keeps Python 3.11's
            # start_server callback from logging the cancelled task as an error.
            pass
        finally:
            if upstream is not None:
                upstream.close()
            if not writer.transport.is_closing():
                writer.close()
            self._tasks.discard(task)


@contextlib.contextmanager
def serve_app(app: Any, *, host: str = "127.0.0.1", **config: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a background thread, on a free port.

    Args:
        app: the ASGI app.
        host: the address to listen on.
        **config: more ``uvicorn.Config`` options.

    Yields:
        The server's base URL, ``http://127.0.0.1:<port>``.

    Raises:
        RuntimeError: the server did not start within 10 seconds.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    options: dict[str, Any] = {"lifespan": "off", "ws": "none", "log_level": "warning", "access_log": False}
    server = uvicorn.Server(uvicorn.Config(app, **{**options, **config}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="idempo-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
