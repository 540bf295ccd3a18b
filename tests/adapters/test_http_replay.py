"""HTTP behaviour: replays are the first answer, byte for byte (DESIGN guarantee 3; shared/cases B13, B14)."""

from __future__ import annotations

import pytest

from idempo import Policy, RecordState
from tests.adapters.conftest import K1, K2, ServeFactory
from tests.support.clock import eventually
from tests.support.orders import BINARY_BODY, STREAM_CHUNKS


def test_replay_is_byte_identical_with_marker(serve: ServeFactory) -> None:
    """B14(a)(g)(h): 201, same body bytes, Content-Type and Location; the marker only on the replay."""
    s = serve()
    first = s.post()
    replay = s.post()
    assert first.status_code == replay.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content == b'{"order_id":1}'
    assert replay.headers["content-type"] == first.headers["content-type"] == "application/json"
    assert replay.headers["location"] == first.headers["location"] == "/orders/1"
    assert s.orders.calls == 1


def test_replay_of_204_has_no_body_and_no_invented_content_type(serve: ServeFactory) -> None:
    """B14(b): a 204 replays as 204, empty body, no Content-Type, no non-zero Content-Length."""
    s = serve()
    first = s.post(headers={"x-test-response": "empty"})
    replay = s.post(headers={"x-test-response": "empty"})
    assert first.status_code == replay.status_code == 204
    assert replay.content == b""
    assert "content-type" not in replay.headers
    assert replay.headers.get("content-length", "0") == "0"
    assert replay.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


def test_replay_of_text_stays_text(serve: ServeFactory) -> None:
    """B14(c): a text/plain body `queued` replays as the same bytes, not a JSON string."""
    s = serve()
    s.post(headers={"x-test-response": "text"})
    replay = s.post(headers={"x-test-response": "text"})
    assert replay.status_code == 202
    assert replay.content == b"queued"
    assert replay.headers["content-type"].startswith("text/plain")
    assert s.orders.calls == 1


@pytest.mark.parametrize("literal", ["[1,2]", "null", "0", '""', "{}"])
def test_replay_of_json_literals_is_exact(serve: ServeFactory, literal: str) -> None:
    """B14(d): JSON bodies [1,2], null, 0, "" and {} replay as the same bytes, never null or empty."""
    s = serve()
    first = s.post(headers={"x-test-response": f"raw:{literal}"})
    replay = s.post(headers={"x-test-response": f"raw:{literal}"})
    assert first.content == replay.content == literal.encode()
    assert replay.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


def test_replay_of_streamed_body_is_byte_identical(serve: ServeFactory) -> None:
    """A streamed response is captured while it streams and replays byte for byte (B04c)."""
    s = serve()
    first = s.post(headers={"x-test-response": "stream"})
    replay = s.post(headers={"x-test-response": "stream"})
    assert first.content == b"".join(STREAM_CHUNKS)
    assert replay.content == first.content
    assert replay.status_code == first.status_code == 201
    assert replay.headers["content-type"] == first.headers["content-type"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


def test_replay_of_binary_body_is_byte_identical(serve: ServeFactory) -> None:
    """A body holding every byte value replays unchanged."""
    s = serve()
    first = s.post(headers={"x-test-response": "binary"})
    replay = s.post(headers={"x-test-response": "binary"})
    assert first.content == replay.content == BINARY_BODY
    assert replay.headers["content-type"] == "application/octet-stream"
    assert s.orders.calls == 1


def test_replay_engages_through_the_stores_own_lookup(serve: ServeFactory) -> None:
    """B14(e): after R1 the store holds a completed record under the scope's record key."""
    s = serve()
    first = s.post()
    record = s.record(K1)
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.response is not None
    assert record.response.body == first.content
    assert s.post().headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 1


def test_background_task_runs_once_and_not_on_replay(serve: ServeFactory) -> None:
    """B14(f): the first answer's background task runs once; the replay runs none."""
    s = serve()
    s.post(headers={"x-test-response": "background"})
    assert eventually(lambda: s.orders.background == 1)
    replay = s.post(headers={"x-test-response": "background"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert not eventually(lambda: s.orders.background > 1, timeout=0.3)
    assert s.orders.calls == 1


def test_set_cookie_and_per_exchange_headers_are_not_replayed(serve: ServeFactory) -> None:
    """B13: the first answer has every header; the replay drops Set-Cookie and per-exchange headers."""
    s = serve()
    first = s.post(headers={"x-test-response": "headers"})
    first_items = first.headers.multi_items()
    assert [v for k, v in first_items if k == "set-cookie"] == ["sid=abc; HttpOnly", "csrf=xyz"]
    assert [v for k, v in first_items if k == "link"] == ['<a>; rel="x"', '<b>; rel="y"']

    # The retry of a lost answer never got its session cookie (sid=abc); one
    # that sends it is another principal (idempo.principals).
    s.client.cookies.clear()
    replay = s.post(headers={"x-test-response": "headers"})
    items = replay.headers.multi_items()
    names = [k for k, _ in items]
    assert replay.headers["location"] == "/orders/1"
    assert replay.headers["etag"] == '"v1"'
    assert replay.headers["content-type"] == "application/json"
    assert [v for k, v in items if k == "link"] == ['<a>; rel="x"', '<b>; rel="y"']
    assert "set-cookie" not in names
    assert "x-request-id" not in names
    assert "x-ratelimit-remaining" not in names
    assert replay.headers["idempotent-replayed"] == "true"
    # Date and Server are the replaying server's own, never the stored ones.
    assert names.count("date") <= 1
    assert s.orders.calls == 1

    record = s.record(K1)
    assert record is not None
    assert record.response is not None
    stored = b"".join(n + b":" + v for n, v in record.response.headers) + record.response.body
    assert b"abc" not in stored
    assert b"xyz" not in stored


def test_set_cookie_is_replayed_when_configured(serve: ServeFactory) -> None:
    """Policy(store_set_cookie=True) keeps both Set-Cookie lines for replay."""
    s = serve(policy=Policy(store_set_cookie=True))
    s.post(headers={"x-test-response": "headers"})
    s.client.cookies.clear()
    replay = s.post(headers={"x-test-response": "headers"})
    assert [v for k, v in replay.headers.multi_items() if k == "set-cookie"] == ["sid=abc; HttpOnly", "csrf=xyz"]


def test_stored_client_error_replays_with_marker(serve: ServeFactory) -> None:
    """B06: a deterministic 400 is stored and replayed, marked so clients know it is not fresh."""
    s = serve()
    first = s.post(headers={"x-test-status": "400"})
    replay = s.post()
    assert first.status_code == replay.status_code == 400
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert s.orders.calls == 1


def test_distinct_keys_execute_separately(serve: ServeFactory) -> None:
    """Two keys are two executions; each replays its own answer."""
    s = serve()
    assert s.post(key=K1).json() == {"order_id": 1}
    assert s.post(key=K2).json() == {"order_id": 2}
    assert s.post(key=K1).json() == {"order_id": 1}
    assert s.post(key=K2).json() == {"order_id": 2}
    assert s.orders.calls == 2


def test_patch_is_idempotent_and_scoped_apart_from_post(serve: ServeFactory) -> None:
    """PATCH takes part by default; the same key on POST and PATCH is two records (method is in the scope)."""
    s = serve()
    assert s.post(method="PATCH").json() == {"order_id": 1}
    assert s.post(method="POST").json() == {"order_id": 2}
    assert s.post(method="PATCH").headers["idempotent-replayed"] == "true"
    assert s.orders.calls == 2


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_idempotent_methods_pass_through(serve: ServeFactory, method: str) -> None:
    """GET, PUT and DELETE are idempotent by method: a key on them changes nothing."""
    s = serve()
    first = s.post(method=method, body=b"")
    second = s.post(method=method, body=b"")
    assert first.status_code == second.status_code == 200
    assert "idempotent-replayed" not in second.headers
    assert s.orders.calls == 2


def test_routes_can_exempt_a_path_or_tighten_its_policy(serve: ServeFactory) -> None:
    """routes= maps glob patterns to a Policy (here: key required) or None (exempt)."""
    s = serve(routes={"/orders": Policy(require_key=True), "/health*": None})
    assert s.post(key=None).status_code == 400
    assert s.orders.calls == 0
    assert s.client.post("/health").status_code in (200, 405)
