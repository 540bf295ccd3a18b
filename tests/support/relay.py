"""A TCP relay between the application and a store, which a test can cut and heal (issue 10 item 4).

The shared PostgreSQL and Redis are never stopped: a test points its store at
a :class:`Relay` on a loopback port and cuts the relay instead.

- :meth:`Relay.blackhole`: the network drops everything silently. Connections
  (open ones and new ones) are accepted and held, and not one byte passes
  either way, so a client only learns of it from its own timeouts.
- :meth:`Relay.refuse`: the server is down. The port refuses connections and
  every open connection is reset.
- :meth:`Relay.heal`: back to passing bytes on the same port; connections held
  by a blackhole are closed (the peer forgot them during the partition).
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from contextlib import suppress

_POLL = 0.02


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a server that went away does."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with suppress(OSError):
        sock.close()


class Relay:
    """A relay on ``127.0.0.1:<port>`` to ``host:port``; see the module docstring.

    Attributes:
        port: the loopback port to point the store at.
        mode: ``"pass"``, ``"blackhole"`` or ``"refuse"``.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode = "pass"
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket | None]] = []
        self._closed = False
        self._listener: socket.socket | None = self._listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def url_for(self, url: str) -> str:
        """``url`` with its ``host:port`` replaced by the relay's."""
        host, port = self.target
        return url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}", 1)

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.settimeout(_POLL)
        return listener

    def blackhole(self) -> None:
        """Hold every connection, open or new, and pass nothing."""
        with self._lock:
            self.mode = "blackhole"

    def refuse(self) -> None:
        """Refuse new connections and reset the open ones."""
        with self._lock:
            self.mode = "refuse"
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is not None:
            listener.close()
        for client, upstream in pairs:
            _reset(client)
            if upstream is not None:
                _reset(upstream)

    def heal(self) -> None:
        """Pass bytes again, on the same port; connections a blackhole held are closed."""
        with self._lock:
            stale = list(self._pairs) if self.mode == "blackhole" else []
            if stale:
                self._pairs = []
            if self._listener is None:
                self._listener = self._listen(self.port)
            self.mode = "pass"
        for client, upstream in stale:
            _reset(client)
            if upstream is not None:
                _reset(upstream)

    def _accept(self) -> None:
        while not self._closed:
            listener = self._listener
            if listener is None:
                time.sleep(_POLL)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            client.setblocking(True)
            with self._lock:
                mode = self.mode
            if mode == "blackhole":
                with self._lock:
                    self._pairs.append((client, None))
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while not self._closed:
                if self.mode != "pass":
                    if self.mode == "refuse" or (client, upstream) not in self._pairs:
                        return
                    time.sleep(_POLL)  # blackhole: leave the bytes where they are
                    continue
                readable, _, _ = select.select([client, upstream], [], [], _POLL)
                for source in readable:
                    if self.mode != "pass":
                        break
                    data = source.recv(65536)
                    if not data:
                        return
                    peers[source].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                if (client, upstream) in self._pairs:
                    self._pairs.remove((client, upstream))
            for sock in (client, upstream):
                with suppress(OSError):
                    sock.close()

    def close(self) -> None:
        """Stop the relay and close every connection."""
        self._closed = True
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is not None:
            listener.close()
        for client, upstream in pairs:
            client.close()
            if upstream is not None:
                upstream.close()
        self._accepting.join(5)
