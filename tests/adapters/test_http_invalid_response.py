"""HTTP behaviour: a response no server may send is never stored (RFC 9110 section 5.5; issue 11, item 6).

The contract app reflects a header line the test chooses (``X-Test-Header``)
into its 201. The server then does what it does with it (uvicorn answers 500
in its place; waitress sends it, or raises for CR and LF; Flask and Django
refuse CR and LF in the view, which then raises); whatever it does, idempo
stores nothing, logs why, and the retry runs the handler again rather than
replaying an answer that cannot be delivered.
"""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.adapters.conftest import ServeFactory

# name=value as the contract's X-Test-Header takes them (percent-decoded to latin-1).
BAD_LINES = {
    "crlf": "X-Echo=a%0D%0ASet-Cookie:%20sid=attacker",
    "nul": "X-Echo=a%00b",
    "control": "X-Echo=a%01b",
    "name": "Bad%20Name=v",
}


def send(s: object, header: str) -> httpx.Response | None:
    """The contract request with the header to reflect; None when the client refused what came back."""
    try:
        return s.post(headers={"X-Test-Header": header})  # type: ignore[attr-defined,no-any-return]
    except httpx.HTTPError:
        return None  # h11 refuses a NUL or a bad name in a response the server did send


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "idempo_outcome", None) == "invalid_response"]


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_a_response_with_an_invalid_header_is_not_stored(
    serve: ServeFactory, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """CR/LF, NUL, another control character or a name that is no token: released, logged, the retry runs again."""
    caplog.set_level(logging.WARNING, logger="idempo")
    s = serve()
    first = send(s, BAD_LINES[kind])
    assert first is None or "idempotent-replayed" not in first.headers
    assert s.record() is None
    second = send(s, BAD_LINES[kind])
    assert second is None or "idempotent-replayed" not in second.headers
    assert s.orders.calls == 2
    assert s.record() is None
    if kind == "crlf" and s.framework.name in ("flask", "django"):
        # werkzeug and Django raise for CR and LF: the handler's exception released the key.
        assert refusals(caplog) == []
    else:
        logged = refusals(caplog)
        assert len(logged) == 2
        assert logged[0].levelno == logging.WARNING
        name = "bad name" if kind == "name" else "x-echo"
        assert name in logged[0].idempo_detail.lower()  # type: ignore[attr-defined]
        assert "not stored" in logged[0].getMessage()


def test_a_valid_reflected_header_is_stored(serve: ServeFactory) -> None:
    """The same reflection with a valid value (HTAB and obs-text allowed) is stored and replayed with it."""
    s = serve()
    first = s.post(headers={"X-Test-Header": "X-Echo=a%09b%E9"})
    assert first.status_code == 201
    replay = s.post(headers={"X-Test-Header": "X-Echo=a%09b%E9"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1
    record = s.record()
    assert record is not None
    assert record.response is not None
    assert (b"x-echo", b"a\tb\xe9") in record.response.headers
