"""WSGI specifics (PEP 3333): raw WSGI apps, start_response and exc_info, iterables and close(), wsgi.input."""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from idempo import ConfigurationError, Policy, RecordState, StoreUnavailable, make_record_key
from idempo.secrets import store_secret
from idempo.stores import MemoryStore
from idempo.wsgi import IdempotencyMiddleware, read_body, request_path
from tests.adapters.conftest import B_PRIME, JSON, K1, LOCAL, B
from tests.support.clock import eventually
from tests.support.orders import header_set
from tests.support.servers import running_wsgi


def _record(store: MemoryStore) -> str:
    """The record key of K1 from the test client, under the secret the store keeps."""
    return make_record_key(LOCAL, "POST", "/orders", K1, secret=store_secret(store))


@contextmanager
def served(app: Any, store: MemoryStore | None = None, **options: Any) -> Iterator[httpx.Client]:
    """A raw WSGI app behind idempo (memory store) under waitress, with a client."""
    middleware = IdempotencyMiddleware(app, store if store is not None else MemoryStore(), **options)
    with running_wsgi(middleware) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


def post(client: httpx.Client, body: bytes = B, **headers: str) -> httpx.Response:
    return client.post("/orders", content=body, headers={**JSON, "Idempotency-Key": K1, **headers})


class Counter:
    """Counts executions and close() calls of the app's iterables."""

    def __init__(self) -> None:
        self.calls = 0
        self.closed = 0


def generator_app(counter: Counter, chunks: list[bytes], delay: float = 0.0) -> Any:
    """A WSGI app whose body is a generator (B04c); its close() is counted through ``finally``."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["wsgi.input"].read()
        counter.calls += 1
        start_response("201 Created", [("Content-Type", "application/x-ndjson"), ("Location", "/orders/1")])

        def body() -> Iterator[bytes]:
            try:
                for chunk in chunks:
                    if delay:
                        time.sleep(delay)
                    yield chunk
            finally:
                counter.closed += 1

        return body()

    return app


def call(middleware: IdempotencyMiddleware, body: bytes = B, **environ: Any) -> tuple[list[Any], Iterable[bytes]]:
    """Call the middleware as a WSGI server does; return the start_response calls and the body iterable."""
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append((status, list(headers), exc_info))
        return lambda data: None

    base = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/orders",
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_IDEMPOTENCY_KEY": K1,
        "wsgi.input": io.BytesIO(body),
    }
    return started, middleware({**base, **environ}, start_response)


def test_generator_app_is_completed_replayed_and_closed() -> None:
    """B04(c): a WSGI app returning a generator completes the record when it is exhausted; close() runs."""
    counter = Counter()
    with served(generator_app(counter, [b'{"part":1}\n', b'{"part":2}\n'])) as client:
        first = post(client)
        replay = post(client)
    assert first.content == replay.content == b'{"part":1}\n{"part":2}\n'
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["location"] == "/orders/1"
    assert counter.calls == 1
    assert counter.closed == 1


def test_start_response_header_list_keeps_repeated_lines() -> None:
    """B13 on WSGI: the first start_response has both Set-Cookie and both Link lines; the replay both Links only."""
    seen: list[list[tuple[str, str]]] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("201 Created", [("Content-Type", "application/json"), *header_set(1)])
        return [b'{"order_id":1}']

    middleware = IdempotencyMiddleware(app, MemoryStore())

    def spy(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        def recording(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen.append(list(headers))
            return start_response(status, headers, exc_info)

        return middleware(environ, recording)

    with running_wsgi(spy) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = post(client)
        client.cookies.clear()  # the answer's session cookie would make the retry another principal
        replay = post(client)
    first_lines, replay_lines = seen
    assert len(first_lines) == 1 + len(header_set(1))
    assert [v for k, v in first_lines if k == "Set-Cookie"] == ["sid=abc; HttpOnly", "csrf=xyz"]
    assert [v for k, v in first_lines if k == "Link"] == ['<a>; rel="x"', '<b>; rel="y"']
    assert [v for k, v in replay_lines if k == "link"] == ['<a>; rel="x"', '<b>; rel="y"']
    names = {k for k, _ in replay_lines}
    assert not names & {"set-cookie", "x-request-id", "x-ratelimit-remaining"}
    assert ("idempotent-replayed", "true") in replay_lines
    assert [v for k, v in first.headers.multi_items() if k == "set-cookie"] == ["sid=abc; HttpOnly", "csrf=xyz"]
    assert replay.content == first.content


def test_exc_info_restart_replaces_the_captured_answer() -> None:
    """PEP 3333 exc_info: an app that restarts its response as a 500 releases the key, whatever it started with."""
    counter = Counter()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        counter.calls += 1
        start_response("201 Created", [("Content-Type", "application/json")])
        if counter.calls == 1:
            try:
                raise RuntimeError("failed after start_response")
            except RuntimeError:
                start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
                return [b"failed"]
        return [b'{"order_id":2}']

    with served(app) as client:
        failed = post(client)
        retry = post(client)
    assert failed.status_code == 500
    assert retry.status_code == 201
    assert retry.content == b'{"order_id":2}'
    assert counter.calls == 2


def test_exception_mid_iteration_releases_the_key_and_closes() -> None:
    """B04(a) on WSGI: the body raising mid-iteration releases the key; the app's iterable is still closed."""
    counter = Counter()
    store = MemoryStore()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        counter.calls += 1
        start_response("201 Created", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            try:
                yield b"partial"
                if counter.calls == 1:
                    raise RuntimeError("broke mid-body")
                yield b" and whole"
            finally:
                counter.closed += 1

        return body()

    middleware = IdempotencyMiddleware(app, store)
    _, body = call(middleware)
    with pytest.raises(RuntimeError):
        list(body)
    body.close()  # type: ignore[attr-defined]
    assert store.get(_record(store)) is None
    _, body = call(middleware)
    assert b"".join(body) == b"partial and whole"
    body.close()  # type: ignore[attr-defined]
    assert store.get(_record(store)).state is RecordState.COMPLETED  # type: ignore[union-attr]
    assert counter.closed == 2


def test_close_before_the_end_finishes_the_body_and_completes_the_record() -> None:
    """B04(d) on WSGI: a server that stops iterating (client gone) and closes: the rest is consumed and recorded."""
    counter = Counter()
    store = MemoryStore()
    middleware = IdempotencyMiddleware(generator_app(counter, [b"a", b"b", b"c"]), store)
    _, body = call(middleware)
    first = next(iter(body))
    body.close()  # type: ignore[attr-defined]
    assert first == b"a"
    record = store.get(_record(store))
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.response is not None
    assert record.response.body == b"abc"
    assert counter.closed == 1


def test_client_leaving_mid_body_still_records_the_whole_body(caplog: pytest.LogCaptureFixture) -> None:
    """B04(d) under waitress: the client reads one chunk and hangs up; the record completes; the retry replays."""
    caplog.set_level(logging.INFO, logger="idempo")
    counter = Counter()
    chunks = [bytes([65 + i % 26]) * 65536 for i in range(40)]
    store = MemoryStore()
    with served(generator_app(counter, chunks, delay=0.01), store) as client:
        with client.stream("POST", "/orders", content=B, headers={**JSON, "Idempotency-Key": K1}) as response:
            assert next(response.iter_raw(1024))
        assert eventually(lambda: (r := store.get(_record(store))) is not None and r.state is RecordState.COMPLETED)
        replay = post(client)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == b"".join(chunks)
    assert counter.calls == 1
    assert eventually(lambda: counter.closed == 1)
    # waitress stopped iterating when the client left; idempo finished the body itself.
    assert any("stopped reading" in r.getMessage() for r in caplog.records)


def test_write_callable_output_is_captured() -> None:
    """The legacy write() callable of start_response is captured like the iterable's chunks."""
    counter = Counter()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        counter.calls += 1
        write = start_response("201 Created", [("Content-Type", "text/plain")])
        write(b"written, ")
        return [b"then returned"]

    with served(app) as client:
        first = post(client)
        replay = post(client)
    assert first.content == replay.content == b"written, then returned"
    assert counter.calls == 1


def test_app_gets_the_body_as_a_fresh_stream() -> None:
    """The app reads the same body the fingerprint was taken from, with a matching CONTENT_LENGTH."""
    seen: list[tuple[bytes, str]] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append((environ["wsgi.input"].read(), environ["CONTENT_LENGTH"]))
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"ok"]

    with served(app) as client:
        post(client)
    assert seen == [(B, str(len(B)))]


def test_declared_body_over_the_limit_is_413_before_reading() -> None:
    """A CONTENT_LENGTH over max_request_body is refused with 413 without reading wsgi.input or calling the app."""

    class Untouchable(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            raise AssertionError("the body was read")

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise AssertionError("the app ran")

    started, body = call(
        IdempotencyMiddleware(app, MemoryStore(), policy=Policy(max_request_body=10)),
        **{"CONTENT_LENGTH": "1000000", "wsgi.input": Untouchable()},
    )
    assert started[0][0] == "413 Request Entity Too Large"
    assert b"body-too-large" in b"".join(body)


def test_read_body_honours_content_length_and_termination() -> None:
    """read_body never reads past CONTENT_LENGTH; without one it reads only a terminated input."""
    stream = io.BytesIO(b"0123456789rest")
    assert read_body({"wsgi.input": stream, "CONTENT_LENGTH": "10"}, 100) == b"0123456789"
    assert stream.read() == b"rest"
    assert read_body({"wsgi.input": io.BytesIO(b"abc")}, 100) == b""
    assert read_body({"wsgi.input": io.BytesIO(b"abc"), "wsgi.input_terminated": True}, 100) == b"abc"
    assert read_body({"wsgi.input": io.BytesIO(b"abcdef"), "wsgi.input_terminated": True}, 5) is None


def test_chunked_request_body_is_fingerprinted() -> None:
    """A chunked request (no Content-Length) is read whole: the same bytes replay, other bytes are 422."""
    counter = Counter()
    with served(generator_app(counter, [b"made"])) as client:

        def chunked(body: bytes) -> httpx.Response:
            headers = {**JSON, "Idempotency-Key": K1}
            return client.post("/orders", content=iter([body[:5], body[5:]]), headers=headers)

        assert chunked(B).status_code == 201
        assert chunked(B).headers["idempotent-replayed"] == "true"
        assert chunked(B_PRIME).status_code == 422
    assert counter.calls == 1


def test_sf_string_with_a_comma_is_one_key() -> None:
    """A folded header is split on commas outside quotes only: the sf-string "a,b" is one key."""
    counter = Counter()
    with served(generator_app(counter, [b"made"])) as client:
        assert post(client, **{"Idempotency-Key": '"a,b"'}).status_code == 201
        assert post(client, **{"Idempotency-Key": '"a,b"'}).headers["idempotent-replayed"] == "true"
    assert counter.calls == 1


def test_request_path_is_decoded_like_asgi() -> None:
    """SCRIPT_NAME + PATH_INFO, latin-1 text of UTF-8 bytes, becomes the path an ASGI server reports."""
    environ = {"SCRIPT_NAME": "/api", "PATH_INFO": "/caf\u00c3\u00a9"}
    assert request_path(environ) == "/api/café"


def test_store_url_builds_a_blocking_store(tmp_path: Path) -> None:
    """A store URL string picks a blocking store: sqlite:/// makes an SQLite file."""
    path = tmp_path / "from-url.db"
    middleware = IdempotencyMiddleware(generator_app(Counter(), []), f"sqlite:///{path}")
    assert type(middleware.store).__name__ == "SQLiteStore"
    assert path.exists()


def test_routes_must_map_to_policies() -> None:
    """A routes value that is neither a Policy nor None is refused at construction."""
    with pytest.raises(ConfigurationError):
        IdempotencyMiddleware(generator_app(Counter(), []), MemoryStore(), routes={"/x": {"require_key": True}})  # type: ignore[dict-item]


def test_crash_leaves_the_lease(caplog: pytest.LogCaptureFixture) -> None:
    """B03 on WSGI: a BaseException out of the app (a crash) leaves the record in progress."""
    store = MemoryStore()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        call(IdempotencyMiddleware(app, store))
    record = store.get(_record(store))
    assert record is not None
    assert record.state is RecordState.IN_PROGRESS
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class DownStore(MemoryStore):
    """A store that cannot be reached: every ``begin`` raises StoreUnavailable."""

    def begin(self, record_key: str, fingerprint: str, lease_ttl_ms: int) -> Any:
        raise StoreUnavailable("store down (test)")


def bypassed(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The per-request records of bypassed requests on the idempo logger so far."""
    return [r for r in caplog.records if getattr(r, "idempo_outcome", None) == "bypassed"]


def lazy_app(counter: Counter, fail: bool = False) -> Any:
    """A WSGI app that works and answers on its body's first iteration: 50 ms, then start_response (PEP 3333)."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["wsgi.input"].read()
        counter.calls += 1

        def body() -> Iterator[bytes]:
            try:
                time.sleep(0.05)
                start_response("201 Created", [("Content-Type", "text/plain"), ("Location", "/orders/1")])
                yield b"made "
                if fail:
                    raise RuntimeError("broke mid-body")
                yield b"late"
            finally:
                counter.closed += 1

        return body()

    return app


def test_bypassed_lazy_app_is_logged_with_its_status_and_time(caplog: pytest.LogCaptureFixture) -> None:
    """B18(c) on WSGI: an app answering from its body's first iteration is logged bypassed with its status and time."""
    caplog.set_level(logging.DEBUG, logger="idempo")
    counter = Counter()
    with served(lazy_app(counter), DownStore(), policy=Policy(fail_open=True)) as client:
        answer = post(client)
    assert answer.status_code == 201
    assert answer.headers["idempotency-bypassed"] == "store-unavailable"
    assert answer.content == b"made late"
    assert counter.calls == 1
    assert eventually(lambda: len(bypassed(caplog)) == 1)
    (record,) = bypassed(caplog)
    assert record.idempo_status == 201  # type: ignore[attr-defined]
    assert record.idempo_handler_ms >= 50  # type: ignore[attr-defined]
    assert record.idempo_error.startswith("StoreUnavailable")  # type: ignore[attr-defined]
    assert counter.closed == 1


def test_bypassed_body_finishes_its_record_once_however_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    """A bypassed body closed early, raising mid-iteration, or an app raising before it returns: one record each."""
    caplog.set_level(logging.DEBUG, logger="idempo")
    counter = Counter()
    fail_open = Policy(fail_open=True)

    started, body = call(IdempotencyMiddleware(lazy_app(counter), DownStore(), policy=fail_open))
    assert next(iter(body)) == b"made "
    body.close()  # type: ignore[attr-defined]
    body.close()  # type: ignore[attr-defined]
    assert ("idempotency-bypassed", "store-unavailable") in started[0][1]

    _, body = call(IdempotencyMiddleware(lazy_app(counter, fail=True), DownStore(), policy=fail_open))
    with pytest.raises(RuntimeError):
        list(body)
    body.close()  # type: ignore[attr-defined]

    def refusing(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise RuntimeError("refused before answering")

    with pytest.raises(RuntimeError):
        call(IdempotencyMiddleware(refusing, DownStore(), policy=fail_open))

    closed, raised, refused = bypassed(caplog)
    assert [r.idempo_status for r in (closed, raised, refused)] == [201, 201, None]  # type: ignore[attr-defined]
    assert closed.idempo_handler_ms >= 50  # type: ignore[attr-defined]
    assert raised.idempo_handler_ms >= 50  # type: ignore[attr-defined]
    assert counter.closed == 2


def test_bypassed_body_keeps_the_length_of_a_sized_iterable(caplog: pytest.LogCaptureFixture) -> None:
    """A bypassed app's own iterable with a len() keeps it (a server sets Content-Length from it); one record."""
    caplog.set_level(logging.DEBUG, logger="idempo")

    class OneChunk:
        def __init__(self) -> None:
            self.closed = 0

        def __iter__(self) -> Iterator[bytes]:
            yield b"whole"

        def __len__(self) -> int:
            return 1

        def close(self) -> None:
            self.closed += 1

    answer = OneChunk()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("201 Created", [("Content-Type", "text/plain")])
        return answer

    _, body = call(IdempotencyMiddleware(app, DownStore(), policy=Policy(fail_open=True)))
    assert len(body) == 1  # type: ignore[arg-type]
    assert list(body) == [b"whole"]
    body.close()  # type: ignore[attr-defined]
    assert answer.closed == 1
    assert [r.idempo_status for r in bypassed(caplog)] == [201]  # type: ignore[attr-defined]


def test_an_over_long_folded_key_header_is_400_without_being_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 6 (B09): a 256 KiB folded Idempotency-Key (the same key repeated) is a 400
    problem+json before any split; the app never runs."""
    import idempo._core.keys

    counter = Counter()
    middleware = IdempotencyMiddleware(generator_app(counter, [b"{}"]), MemoryStore())
    scanned: list[int] = []
    real_enumerate = enumerate

    def counting_enumerate(value: Any, *args: Any) -> Any:
        scanned.append(len(value))
        return real_enumerate(value, *args)

    monkeypatch.setattr(idempo._core.keys, "enumerate", counting_enumerate, raising=False)
    folded = ", ".join(["a"] * (256 * 1024 // 3))
    started, body = call(middleware, HTTP_IDEMPOTENCY_KEY=folded)
    assert started[0][0].startswith("400")
    assert dict((name.lower(), value) for name, value in started[0][1])["content-type"] == "application/problem+json"
    assert b"longer than 255" in b"".join(body)
    assert counter.calls == 0
    assert scanned == [], "the header was scanned byte by byte"
    # A short folded header of one repeated key is still split and accepted, as before.
    started, body = call(middleware, HTTP_IDEMPOTENCY_KEY="k1, k1")
    assert started[0][0].startswith("201")
    b"".join(body)


@pytest.mark.parametrize(
    ("status", "headers", "chunks"),
    [
        ("201 Created", [("Content-Type", "application/json"), ("X-Price", "5 €")], [b"{}"]),
        ("Created", [("Content-Type", "application/json")], [b"{}"]),
        ("201 Created", [("Content-Type", "text/plain")], ["text, not bytes"]),
    ],
    ids=["header-not-latin1", "status-without-code", "str-body"],
)
def test_a_response_no_server_can_send_is_refused_not_raised(
    status: str, headers: list[tuple[str, str]], chunks: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """PEP 3333 violations by the app (non-latin-1 header, no status code, str body) release the key, never raise."""
    caplog.set_level(logging.WARNING, logger="idempo")
    calls = 0

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        nonlocal calls
        calls += 1
        start_response(status, headers)
        return chunks

    store = MemoryStore()
    middleware = IdempotencyMiddleware(app, store)
    for _ in range(2):
        _, body = call(middleware)
        list(body)
        getattr(body, "close", lambda: None)()
    assert calls == 2  # released, so the retry ran again
    assert store.get(_record(store)) is None
    outcomes = [getattr(r, "idempo_outcome", None) for r in caplog.records if hasattr(r, "idempo_outcome")]
    assert outcomes == ["invalid_response"] * 2
