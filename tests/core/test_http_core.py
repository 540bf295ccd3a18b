"""The shared HTTP rules: key checks, answers and response capture."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idempo import Existing, Marker, Policy, Record, RecordState, StoredResponse, Verdict
from idempo._core.capture import ResponseCapture, header_refusal
from idempo._core.digests import Digests
from idempo._core.flow import InProgress, Mismatch, Replay
from idempo._core.http import (
    REPLAYED_HEADER,
    body_too_large_answer,
    check_key,
    content_type_of,
    decision_answer,
    identity_path,
    request_identity,
    store_unavailable_answer,
)
from idempo._http.wsgi import identity_path_of


def problem(response: StoredResponse) -> dict[str, object]:
    headers = dict(response.headers)
    assert headers[b"content-type"] == b"application/problem+json"
    assert int(headers[b"content-length"]) == len(response.body)
    body = json.loads(response.body)
    assert body["status"] == response.status
    return dict(body)


def test_check_key() -> None:
    """A key passes; none passes through unless required (400); a bad one is 400 invalid-key."""
    policy = Policy()
    assert check_key(policy, "POST", "/x", [b"k"]) == "k"
    assert check_key(policy, "POST", "/x", []) is None
    missing = check_key(policy.replace(require_key=True), "POST", "/x", [])
    assert isinstance(missing, StoredResponse)
    assert missing.status == 400
    assert problem(missing)["type"] == "https://idempo.dev/problems/missing-key"
    invalid = check_key(policy, "POST", "/x", [b""])
    assert isinstance(invalid, StoredResponse)
    assert problem(invalid)["type"] == "https://idempo.dev/problems/invalid-key"


def test_decision_answers() -> None:
    """Replay adds the marker to the stored answer; 409 carries Retry-After; mismatch is 422."""
    stored = StoredResponse(201, ((b"location", b"/o/1"),), b"{}")
    replay = decision_answer(Replay(stored))
    assert replay.status == 201
    assert replay.body == b"{}"
    assert replay.headers == ((b"location", b"/o/1"), REPLAYED_HEADER)
    conflict = decision_answer(InProgress(3))
    assert conflict.status == 409
    assert dict(conflict.headers)[b"retry-after"] == b"3"
    assert problem(conflict)["type"] == "https://idempo.dev/problems/key-in-progress"
    mismatch = decision_answer(Mismatch())
    assert mismatch.status == 422
    assert problem(mismatch)["type"] == "https://idempo.dev/problems/fingerprint-mismatch"


def test_error_answers() -> None:
    """503 says retry later; 413 names the limit."""
    unavailable = store_unavailable_answer(Policy(retry_after=7))
    assert unavailable.status == 503
    assert dict(unavailable.headers)[b"retry-after"] == b"7"
    too_large = body_too_large_answer(Policy(max_request_body=10))
    assert too_large.status == 413
    assert "10 bytes" in str(problem(too_large)["detail"])


def test_request_identity_scopes_and_fingerprints() -> None:
    """The record key depends on the principal, the fingerprint on the request."""
    policy = Policy()
    digests = Digests(b"http core test secret")
    a = request_identity(policy, digests, "p1", "POST", "/o", b"", b"application/json", b'{"a":1}', "k")
    b = request_identity(policy, digests, "p2", "POST", "/o", b"", b"application/json", b'{ "a" : 1 }', "k")
    assert a.record_key != b.record_key
    assert a.fingerprint == b.fingerprint


def test_capture_keeps_allowed_headers_in_order_and_lower_case() -> None:
    """Stored headers: lower-case names, order and repeats kept, excluded names dropped."""
    capture = ResponseCapture(Policy())
    headers = [
        (b"Location", b"/o/1"),
        (b"Set-Cookie", b"a=1"),
        (b"Link", b"<a>"),
        (b"Connection", b"close"),
        (b"link", b"<b>"),
        (b"Date", b"now"),
    ]
    assert capture.start(201, headers) is Verdict.STORE
    capture.add(b"ab")
    capture.add(b"")
    capture.add(b"c")
    response = capture.response()
    assert response == StoredResponse(201, ((b"location", b"/o/1"), (b"link", b"<a>"), (b"link", b"<b>")), b"abc")


def test_capture_releases_unstored_statuses_and_marks_oversized_bodies_not_replayable() -> None:
    """A 5xx is not captured; a body over max_response_body is stored as a not-replayable marker (status, size)."""
    capture = ResponseCapture(Policy())
    assert capture.start(503, []) is Verdict.RELEASE
    capture.add(b"x")
    assert capture.response() is None
    small = ResponseCapture(Policy(max_response_body=3))
    small.start(201, [(b"location", b"/orders/1")])
    small.add(b"ab")
    small.add(b"cd")
    small.add(b"ef")
    assert small.verdict is Verdict.STORE
    assert small.too_large
    response = small.response()
    assert response is not None
    assert Marker.of(response) == Marker(Marker.NOT_REPLAYABLE, "too_large", 201, 6)


def test_decisions_on_marker_records_answer_410_and_409_with_their_own_types() -> None:
    """A not-replayable record answers 410 response-not-replayable; a held one 409 outcome-unknown, no Retry-After."""
    from idempo._core.flow import Held, NotReplayable, decide
    from idempo._core.http import decision_answer

    def completed(marker: Marker) -> Existing:
        record = Record("rk", RecordState.COMPLETED, "fp", 1, 0, 0, 10, marker.response())
        return Existing(record, 5)

    too_large = decide(completed(Marker(Marker.NOT_REPLAYABLE, "too_large", 201, 6)), "fp")
    assert too_large == NotReplayable(201, "too_large")
    assert isinstance(too_large, NotReplayable)
    answer = decision_answer(too_large)
    body = json.loads(answer.body)
    assert (answer.status, body["type"], body["first_status"]) == (
        410,
        "https://idempo.dev/problems/response-not-replayable",
        201,
    )
    held = decide(completed(Marker(Marker.HELD, "takeover")), "fp")
    assert held == Held("takeover")
    assert isinstance(held, Held)
    answer = decision_answer(held)
    assert answer.status == 409
    assert json.loads(answer.body)["type"] == "https://idempo.dev/problems/outcome-unknown"
    assert b"retry-after" not in dict(answer.headers)
    assert decide(completed(Marker(Marker.HELD, "takeover")), "other") == Mismatch()
    unreadable = Existing(Record("rk", RecordState.COMPLETED, "fp", 1, 0, 0, 10, StoredResponse(0, (), b"?")), 5)
    assert decide(unreadable, "fp") == Held("unreadable marker")


def test_route_table_first_match_wins_and_rejects_non_policies() -> None:
    """Glob patterns map to a Policy or None (exempt); the first match wins; anything else is refused."""
    import pytest

    from idempo import ConfigurationError
    from idempo._core.routes import RouteTable

    strict = Policy(require_key=True)
    default = Policy()
    table = RouteTable({"/payments/*": strict, "/payments*": None})
    assert table
    assert table.policy_for("/payments/1", default) is strict
    assert table.policy_for("/payments", default) is None
    assert table.policy_for("/orders", default) is default
    assert not RouteTable(None)
    with pytest.raises(ConfigurationError):
        RouteTable({"/x": {"require_key": True}})  # type: ignore[dict-item]


def test_route_options_derive_replace_or_exempt() -> None:
    """RouteOptions change the path's policy, replace it, or exempt the route; derived policies are cached."""
    import pytest

    from idempo._core.routes import RouteOptions

    default = Policy()
    path_policy = Policy(lease_ttl=5)
    longer = RouteOptions(changes={"record_ttl": 60})
    derived = longer.apply(path_policy, default)
    assert derived == Policy(lease_ttl=5, record_ttl=60)
    assert longer.apply(path_policy, default) is derived
    assert longer.apply(None, default) == Policy(record_ttl=60)
    whole = Policy(require_key=True)
    assert RouteOptions(policy=whole).apply(path_policy, default) is whole
    assert RouteOptions().apply(path_policy, default) is path_policy
    assert RouteOptions(exempt=True).apply(path_policy, default) is None
    with pytest.raises(TypeError):
        RouteOptions(changes={"record_tll": 60})


def test_capture_start_again_starts_over() -> None:
    """A second start (WSGI exc_info) drops what was captured under the first status."""
    capture = ResponseCapture(Policy())
    capture.start(201, [(b"x-first", b"1")])
    capture.add(b"partial")
    capture.start(200, [(b"x-second", b"2")])
    capture.add(b"whole")
    response = capture.response()
    assert response == StoredResponse(200, ((b"x-second", b"2"),), b"whole")


# --- issue 11, item 5: what the fingerprint and the record key are made of ---


def test_content_type_of_one_media_type() -> None:
    """One line is taken as it is; identical repeats (lines, or a WSGI server's fold) count as one; none is None."""
    assert content_type_of([]) is None
    assert content_type_of([b"application/json"]) == b"application/json"
    assert content_type_of([b"application/json", b"application/json"]) == b"application/json"
    assert content_type_of([b"application/json, application/json"]) == b"application/json"
    assert content_type_of([b'multipart/form-data; boundary="a,b"']) == b'multipart/form-data; boundary="a,b"'


@pytest.mark.parametrize(
    "lines",
    [
        [b"application/json", b"text/plain"],
        [b"application/json, text/plain"],
        [b"application/json,"],
        [b"text/plain", b"text/plain, application/json"],
    ],
)
def test_content_type_of_two_media_types_is_a_400(lines: list[bytes]) -> None:
    """Two different values (two lines, or one line a WSGI server folded) are 400 content-type-ambiguous."""
    answer = content_type_of(lines)
    assert isinstance(answer, StoredResponse)
    assert answer.status == 400
    assert problem(answer)["type"] == "https://idempo.dev/problems/content-type-ambiguous"


def test_identity_path_gives_back_bytes_that_are_not_utf8() -> None:
    """ASGI: /x/%FF and /x/%FE (both /x/U+FFFD in path) keep their bytes; a UTF-8 path is left as it is."""
    assert identity_path("/x/\ufffd", b"/x/%FF") == "/x/\udcff"
    assert identity_path("/x/\ufffd", b"/x/%FE") == "/x/\udcfe"
    assert identity_path("/x/\u00e9", b"/x/%C3%A9") == "/x/\u00e9"
    assert identity_path("/x/\ufffd", b"/x/%EF%BF%BD") == "/x/\ufffd"  # a real U+FFFD stays one
    assert identity_path("/api/x/\ufffd", b"/x/%FF") == "/api/x/\udcff"  # a root_path before path only
    assert identity_path("/x/\ufffd", None) == "/x/\ufffd"  # no raw_path: nothing to give back
    assert identity_path("/y/\ufffd", b"/x/%FF") == "/y/\ufffd"  # a raw_path that does not match


def test_identity_path_keeps_an_encoded_slash() -> None:
    """/a%2Fb (path /a/b) is not /a/b; a literal %2F (raw %252F) is neither; other paths keep their identity."""
    assert identity_path("/a/b", b"/a%2Fb") == "/a%2Fb"
    assert identity_path("/a/b", b"/a%2fb") == "/a%2Fb"
    assert identity_path("/a/b", b"/a/b") == "/a/b"
    assert identity_path("/a%2Fb", b"/a%252Fb") == "/a%252Fb"
    assert identity_path("/a%b", b"/a%25b") == "/a%25b"  # a literal % is escaped too
    assert identity_path("/a/\ufffd", b"/a%2F%FF") == "/a%2F\udcff"
    assert identity_path("/api/a/b", b"/a%2Fb") == "/api/a%2Fb"  # a root_path before path only
    assert identity_path("/a%2Fb", None) == "/a%252Fb"  # no raw_path: a literal %2F still escaped
    # No two distinct raw paths share an identity.
    raws = [b"/a%2Fb", b"/a/b", b"/a%252Fb", b"/a%25252Fb", b"/a%2F%2Fb", b"/a%2F/b", b"/a//b", b"/a%25%2Fb"]
    identities = {identity_path(unquote_to_bytes(raw).decode("utf-8", "replace"), raw) for raw in raws}
    assert len(identities) == len(raws)


def _identities(raw: bytes) -> tuple[str, str, str]:
    """One raw path's identity on ASGI, on WSGI, and on WSGI from a server that gives no ``REQUEST_URI``."""
    decoded = unquote_to_bytes(raw)
    asgi = identity_path(decoded.decode("utf-8", "replace"), raw)  # uvicorn's path and raw_path
    environ = {"PATH_INFO": decoded.decode("latin-1"), "REQUEST_URI": raw.decode("ascii")}  # PEP 3333, waitress
    bare = {"PATH_INFO": decoded.decode("latin-1")}
    return asgi, identity_path_of(environ), identity_path_of(bare)


def _segments(raw: bytes) -> list[bytes]:
    """What a raw path means (RFC 3986 section 2.2): segments at real slashes, each decoded (%2F is no slash)."""
    return [unquote_to_bytes(segment) for segment in raw.split(b"/")]


_PARTS = st.lists(
    st.sampled_from([b"a", b"/", b"%2F", b"%2f", b"%25", b"%FF", b"%C3%A9", b"2F", b"%", b"%61"]), max_size=6
)


@given(_PARTS, _PARTS)
def test_asgi_and_wsgi_identity_paths_agree_and_tell_raw_paths_apart(a: list[bytes], b: list[bytes]) -> None:
    """Both fronts make one identity of a raw path, and two raw paths share one exactly when they mean the same."""
    raw_a, raw_b = b"/f/" + b"".join(a), b"/f/" + b"".join(b)
    asgi_a, wsgi_a, bare_a = _identities(raw_a)
    asgi_b = _identities(raw_b)[0]
    assert asgi_a == wsgi_a
    if b"%2F" not in raw_a.upper():
        assert bare_a == wsgi_a  # without the raw target, only an encoded slash is lost
    assert (asgi_a == asgi_b) is (_segments(raw_a) == _segments(raw_b))


def test_header_refusal() -> None:
    """Names must be tokens, values free of CR, LF, NUL and other controls but HTAB (RFC 9110 5.1, 5.5); bytes only."""
    assert header_refusal([(b"content-type", b"application/json"), (b"x-a", b"a\tb \xe9"), (b"x-e", b"")]) is None
    refused: list[Any] = [
        [(b"x-a", b"a\r\nset-cookie: x=1")],
        [(b"x-a", b"a\x00")],
        [(b"x-a", b"a\x01")],
        [(b"x-a", b"a\x7f")],
        [(b"bad name", b"v")],
        [(b"", b"v")],
        [(b"x-a:", b"v")],
        [("x-a", b"v")],
        [(b"x-a", "v")],
    ]
    for headers in refused:
        reason = header_refusal(headers)
        assert reason is not None
        assert "a\r" not in reason
        assert "set-cookie" not in reason


def test_capture_refuses_a_response_no_server_may_send() -> None:
    """A header line that is not a valid field: RELEASE, with the reason, nothing kept; a 5xx is released anyway."""
    capture = ResponseCapture(Policy())
    assert capture.start(201, [(b"x-echo", b"a\r\nb")]) is Verdict.RELEASE
    capture.add(b"{}")
    assert capture.response() is None
    assert capture.refusal is not None
    assert "x-echo" in capture.refusal
    assert capture.start(201, [(b"x-echo", b"ab")]) is Verdict.STORE  # starting over forgets the refusal
    assert capture.refusal is None
    capture.add(bytearray(b"{"))
    capture.add(memoryview(b"}"))
    stored = capture.response()
    assert stored is not None
    assert stored.body == b"{}"
    capture.start(201, [])
    capture.add("text")  # type: ignore[arg-type]  # an app that yields str
    assert capture.response() is None
    assert capture.refusal == "a body chunk is str, not bytes"
    unstored = ResponseCapture(Policy())
    assert unstored.start(500, [(b"x-echo", b"a\r\nb")]) is Verdict.RELEASE
    assert unstored.refusal is None
