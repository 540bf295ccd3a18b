"""What of the handler's response is stored, and the verdict that settles the record after the handler ran.

:class:`ResponseCapture` collects the response as a front sees it go out;
:meth:`ResponseCapture.settlement` is the one rule every HTTP front follows
once the handler is done: what to store (or release, or hold), and why.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .flow import exception_verdict
from .frozen import fast_init
from .policy import Policy, Verdict
from .records import Headers, Marker, StoredResponse

__all__ = ["ResponseCapture", "Settlement", "header_refusal"]


# RFC 9110 section 5.1: a field name is a token. Section 5.5: a field value
# holds no CR, LF or NUL, nor any other control character but HTAB (uvicorn's
# httptools protocol refuses exactly these; h11 and waitress refuse part of them).
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_NOT_FIELD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Names already checked: an app sends few distinct ones; bounded.
_FIELD_NAMES: set[bytes] = set()


def header_refusal(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """Why no server may send these response header lines, or None when each is valid.

    A name must be a token (RFC 9110 section 5.1) and a value must hold no
    CR, LF, NUL or other control character but HTAB (section 5.5), both as
    bytes. The reason names the header, never its value.
    """
    for name, value in headers:
        if type(name) is not bytes:
            return f"the response header name {_shown(name)} is not bytes"
        if name not in _FIELD_NAMES:
            if _FIELD_NAME.fullmatch(name) is None:
                return f"the response header name {_shown(name)} is not a token (RFC 9110 section 5.1)"
            if len(_FIELD_NAMES) < 1024:
                _FIELD_NAMES.add(name)
        if type(value) is not bytes:
            return f"the value of the response header {_shown(name)} is not bytes"
        if _NOT_FIELD_VALUE.search(value) is not None:
            return (
                f"the value of the response header {_shown(name)} holds a control character "
                "(CR, LF, NUL, ...; RFC 9110 section 5.5)"
            )
    return None


def _without_nominated(kept: list[tuple[bytes, bytes]], connection: list[bytes]) -> list[tuple[bytes, bytes]]:
    """``kept`` less the fields the ``Connection`` lines name: hop-by-hop too (RFC 9110 section 7.6.1).

    ``Connection: keep-alive, X-Hop`` makes ``X-Hop`` a field of this one
    connection, which a recipient forwarding the message must remove; a
    replay is such a forwarding, so it is never stored (DESIGN: hop-by-hop
    headers are never replayed).
    """
    named = {option.strip(b" \t").lower() for value in connection for option in value.split(b",")}
    return [(name, value) for name, value in kept if name not in named]


def _shown(name: object) -> str:
    return repr(name[:64] if isinstance(name, (bytes, str)) else name)


class ResponseCapture:
    """Collects what of the handler's response will be stored.

    Call :meth:`start` with the status and headers, :meth:`add` with each
    body chunk, then :meth:`response`. The verdict comes from the status
    (``Policy.verdict_for_status``); only a STORE verdict captures the body.
    A body over ``policy.max_response_body`` is no longer kept (it still
    reaches the client whole): the response to store becomes a
    not-replayable :class:`~idempo._core.records.Marker`, so a retry gets
    410 and the handler never runs twice. A response no server may send
    (:func:`header_refusal`) is never stored: its verdict becomes RELEASE,
    and :attr:`refusal` says why.

    Attributes:
        verdict: what to do with the record once the response is complete.
        refusal: why the response is not stored although its status would
            be, or None.
    """

    __slots__ = ("_chunks", "_headers", "_policy", "_size", "_status", "_too_large", "refusal", "verdict")

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._status = 0
        self._headers: Headers = ()
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_large = False
        self.verdict = Verdict.RELEASE
        self.refusal: str | None = None

    def start(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> Verdict:
        """Record the status line and headers; return the verdict for the status.

        Calling it again (a WSGI app's ``start_response`` with ``exc_info``)
        starts the capture over.
        """
        policy = self._policy
        self._status = status
        self._headers = ()
        self._chunks = []
        self._size = 0
        self._too_large = False
        self.refusal = None
        self.verdict = verdict = policy.verdict_for_status(status)
        if verdict is Verdict.STORE:
            stored_name = policy.stored_name
            checked = False
            kept = []
            connection: list[bytes] | None = None
            for name, value in headers:
                if not checked and (
                    type(name) is not bytes
                    or name not in _FIELD_NAMES
                    or type(value) is not bytes
                    or _NOT_FIELD_VALUE.search(value) is not None
                ):
                    # A name not seen yet, or a value that may be invalid: every line checked, the reason named.
                    refusal = header_refusal(headers)
                    if refusal is not None:
                        self.refuse(refusal)
                        return self.verdict
                    checked = True
                lower = stored_name(name)
                if lower is not None:
                    kept.append((lower, value))
                elif name.lower() == b"connection":  # only names never stored get here: no cost to the others
                    connection = [value] if connection is None else [*connection, value]
            if connection is not None:
                kept = _without_nominated(kept, connection)
            self._headers = tuple(kept)
        return verdict

    def refuse(self, reason: str) -> None:
        """Never store this response (the server cannot send it): RELEASE, with ``reason`` as :attr:`refusal`.

        A no-op unless the verdict is STORE: only a response that would be
        stored needs refusing.
        """
        if self.verdict is Verdict.STORE:
            self.verdict = Verdict.RELEASE
            self.refusal = reason
            self._headers = ()
            self._chunks = []

    def add(self, chunk: bytes) -> None:
        """Add a body chunk (ignored unless the verdict is STORE); a chunk that is not bytes refuses the response."""
        if self.verdict is not Verdict.STORE or not chunk:
            return
        if type(chunk) is not bytes:
            if not isinstance(chunk, (bytearray, memoryview)):
                self.refuse(f"a body chunk is {type(chunk).__name__}, not bytes")
                return
            chunk = bytes(chunk)
        self._size += len(chunk)
        if self._too_large:
            return
        if self._size > self._policy.max_response_body:
            self._too_large = True
            self._chunks = []
        else:
            self._chunks.append(chunk)

    @property
    def status(self) -> int:
        """The status passed to :meth:`start` (0 before)."""
        return self._status

    @property
    def too_large(self) -> bool:
        """True once the body exceeded ``max_response_body`` (it is no longer kept)."""
        return self._too_large

    def response(self) -> StoredResponse | None:
        """The response to store (a not-replayable marker when too large), or None when the verdict is not STORE."""
        if self.verdict is not Verdict.STORE:
            return None
        if self._too_large:
            return Marker(Marker.NOT_REPLAYABLE, "too_large", self._status, self._size).response()
        return StoredResponse(self._status, self._headers, b"".join(self._chunks))

    def settles_when_whole(self) -> bool:
        """Whether the record may be settled as soon as the body ends, before the handler returns.

        Yes for an answer to store, and for any answer when no exception
        verdicts are configured. Otherwise the settle waits for the handler
        to finish: frameworks send their 500 before re-raising (or reporting)
        the exception, and the exception's verdict decides.
        """
        return self.verdict is Verdict.STORE or not self._policy.exception_verdicts

    def settlement(self, *, complete: bool, reported: BaseException | None = None) -> Settlement:
        """How the record is settled once the handler answered: the rule every HTTP front follows.

        - A response no server may send (:attr:`refusal`): RELEASE, never stored.
        - No whole response (no status line, or the body never ended): RELEASE,
          nothing whole to store.
        - An answer that is not stored, for an exception the framework reported
          (``report_exception``): that exception's verdict
          (``Policy.exception_verdicts``; DESIGN "outcome policy").
        - Otherwise the status's verdict, with the response when it is STORE.

        Args:
            complete: the handler sent a status line and its body ended.
            reported: the exception the framework reported for the handler, if any.
        """
        if self.refusal is not None or not complete:
            return Settlement(None, Verdict.RELEASE, None)
        if reported is not None and self.verdict is not Verdict.STORE:
            return Settlement(None, exception_verdict(self._policy, reported), f"exception {type(reported).__name__}")
        if self.verdict is Verdict.STORE and not self._too_large:
            # self.response(), inlined for the common answer.
            response: StoredResponse | None = StoredResponse(self._status, self._headers, b"".join(self._chunks))
        else:
            response = self.response()
        # The reason only names a hold (finish() reads it for HOLD alone): not formatted for the others.
        reason = f"status {self._status}" if self.verdict is Verdict.HOLD else None
        return Settlement(response, self.verdict, reason)


@fast_init
@dataclass(frozen=True, slots=True)
class Settlement:
    """How a record is settled after the handler: arguments of :func:`idempo._core.flow.finish`.

    Attributes:
        response: the response to store (STORE), else None.
        verdict: store, release or hold.
        reason: why a HOLD holds (``idempo inspect`` shows it).
    """

    response: StoredResponse | None
    verdict: Verdict
    reason: str | None
