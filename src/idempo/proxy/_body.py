"""A keyed request's body, spooled: kept in memory while small, in a temporary file beyond.

The proxy reads a keyed request's body before it forwards it (the
fingerprint covers it, and it is sent upstream with a ``Content-Length``);
:class:`SpooledBody` keeps it in memory up to :data:`MEMORY_BYTES`, then in an
anonymous temporary file (``tempfile.SpooledTemporaryFile``), so a large upload
does not stay in the process's memory while the upstream works. The
fingerprint reads it back in chunks (:meth:`SpooledBody.chunks`), and so does
the forwarder.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator

from .._http.admission import ClientGone
from .._http.asgi import Receive

__all__ = ["CHUNK_BYTES", "MEMORY_BYTES", "SpooledBody", "read_spooled"]

#: Bytes of a body kept in memory; beyond, the body moves to a temporary file.
MEMORY_BYTES = 256 * 1024
#: Bytes read back at a time.
CHUNK_BYTES = 64 * 1024


class SpooledBody:
    """A request body held in a spooled temporary file (see the module docstring).

    Satisfies :class:`idempo._core.fingerprint.BodySource`: ``len()``,
    :meth:`chunks` and :meth:`read`.
    """

    __slots__ = ("_file", "_size")

    def __init__(self) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=MEMORY_BYTES)  # noqa: SIM115 (closed by close())
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def write(self, chunk: bytes) -> None:
        """Append a chunk (the body is being received)."""
        self._file.write(chunk)
        self._size += len(chunk)

    def chunks(self) -> Iterator[bytes]:
        """The body from its start, :data:`CHUNK_BYTES` at a time."""
        self._file.seek(0)
        while chunk := self._file.read(CHUNK_BYTES):
            yield chunk

    async def achunks(self) -> AsyncIterator[bytes]:
        """:meth:`chunks`, as an async iterator (the forwarder's request stream)."""
        for chunk in self.chunks():
            yield chunk

    def read(self) -> bytes:
        """The whole body, in memory (a JSON body's canonical form needs it whole)."""
        self._file.seek(0)
        return self._file.read()

    def close(self) -> None:
        """Drop the body (the temporary file, if any, is deleted)."""
        self._file.close()


async def read_spooled(receive: Receive, limit: int) -> SpooledBody | None:
    """Read a request's body into a :class:`SpooledBody`; None (and nothing kept) when it exceeds ``limit`` bytes.

    Raises:
        ClientGone: the client left mid-upload (nothing may run on a partial body).
    """
    body = SpooledBody()
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientGone()
            chunk: bytes = message.get("body", b"")
            if len(body) + len(chunk) > limit:
                body.close()
                return None
            if chunk:
                body.write(chunk)
            if not message.get("more_body", False):
                return body
    except BaseException:
        body.close()
        raise
