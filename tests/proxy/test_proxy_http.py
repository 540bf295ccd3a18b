"""``idempo proxy`` in front of the Node upstream: DESIGN's HTTP table, replays, hygiene (real processes).

Each test starts the Node upstream (tests/proxy/upstream/server.mjs) and the
proxy as processes of its own, on loopback, on SQLite and on Redis. Nothing
waits for an assumed time: streaming is driven by ``/_release``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest

from tests.proxy.proxy_process import ProxyProcess, poll
from tests.proxy.upstream import NodeUpstream

StartProxy = Callable[..., ProxyProcess]

ROUTES = """
[[route]]
name = "required"
path = "/v1/required"
require_key = true
max_request_body = "1KiB"

[[route]]
name = "files"
path = "/v1/files/{rest:path}"
passthrough = true
"""


def key() -> str:
    return str(uuid.uuid4())


def test_the_http_table_through_the_proxy(node_upstream: NodeUpstream, start_proxy: StartProxy, store_url: str) -> None:
    """Execute once, replay byte for byte; 422 for another body; 400 bad or missing key; 413; 409 while running."""
    proxy = start_proxy(node_upstream.url, store_url, ROUTES)
    with httpx.Client(base_url=proxy.url, timeout=15) as client:
        k = key()
        first = client.post("/v1/payments", json={"amount": 5}, headers={"Idempotency-Key": k})
        assert first.status_code == 201
        again = client.post("/v1/payments", json={"amount": 5}, headers={"Idempotency-Key": f'"{k}"'})
        assert again.status_code == 201
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        assert again.headers["x-execution-id"] == first.headers["x-execution-id"]
        assert node_upstream.executions(k) == 1
        # A replay is dated now, once: idempo stores no Date, the upstream's first one is not replayed.
        assert len(again.headers.get_list("date")) == 1
        assert parsedate_to_datetime(again.headers["date"]).tzinfo is not None
        entry = node_upstream.ledger()[-1]
        assert entry["key"] == k
        assert int(entry["attempt"]) > 0
        assert entry["content_length"] == str(entry["body_bytes"])
        assert entry["transfer_encoding"] is None

        other = client.post("/v1/payments", json={"amount": 6}, headers={"Idempotency-Key": k})
        assert other.status_code == 422
        assert other.headers["content-type"] == "application/problem+json"
        bad = client.post("/v1/payments", json={}, headers={"Idempotency-Key": "has space, comma"})
        assert bad.status_code == 400
        missing = client.post("/v1/required", json={})
        assert missing.status_code == 400
        assert parsedate_to_datetime(missing.headers["date"]).tzinfo is not None  # the proxy's own answer
        assert missing.json()["type"].endswith("/missing-key")
        large = client.post("/v1/required", content=b"x" * 2048, headers={"Idempotency-Key": key()})
        assert large.status_code == 413

        unkeyed = client.post("/v1/payments", json={"amount": 1})
        assert unkeyed.status_code == 201
        assert "idempotent-replayed" not in unkeyed.headers
        passthrough = client.post("/v1/files/a/b", content=b"data", headers={"Idempotency-Key": key()})
        assert passthrough.status_code == 201
        assert node_upstream.ledger()[-1]["path"] == "/v1/files/a/b"

        slow = key()
        with httpx.Client(base_url=proxy.url, timeout=15) as other_client:
            import threading

            answers: list[httpx.Response] = []
            thread = threading.Thread(
                target=lambda: answers.append(
                    other_client.post(
                        "/v1/payments", json={}, headers={"Idempotency-Key": slow, "X-Fault": "await-release"}
                    )
                )
            )
            thread.start()
            node_upstream.wait_waiting(1)
            running = client.post("/v1/payments", json={}, headers={"Idempotency-Key": slow})
            assert running.status_code == 409
            assert "retry-after" in running.headers
            node_upstream.release(1, key=slow)
            thread.join(15)
        assert answers[0].status_code == 201
        assert node_upstream.executions(slow) == 1


@pytest.mark.parametrize("fault", ["gzip", "binary=3000", "set-cookie"])
def test_replays_are_byte_identical(node_upstream: NodeUpstream, start_proxy: StartProxy, fault: str) -> None:
    """A gzip body replays as the compressed bytes the upstream sent; binary bodies too; Set-Cookie is not stored."""
    proxy = start_proxy(node_upstream.url, "sqlite:///" + str(node_upstream.directory / "i.db"))
    with httpx.Client(base_url=proxy.url, timeout=15) as client:
        k = key()
        request = client.build_request("POST", "/v1/x", content=b"{}", headers={"Idempotency-Key": k, "X-Fault": fault})
        first = client.send(request, stream=True)
        raw_first = b"".join(first.iter_raw())
        replay = client.send(
            client.build_request("POST", "/v1/x", content=b"{}", headers={"Idempotency-Key": k}), stream=True
        )
        raw_replay = b"".join(replay.iter_raw())
    assert replay.headers["idempotent-replayed"] == "true"
    assert raw_replay == raw_first
    assert replay.headers.get("content-encoding") == first.headers.get("content-encoding")
    if fault == "set-cookie":
        assert "set-cookie" in first.headers
        assert "set-cookie" not in replay.headers
    assert node_upstream.executions(k) == 1


def test_a_streamed_answer_streams_and_replays(node_upstream: NodeUpstream, start_proxy: StartProxy) -> None:
    """Each chunk reaches the client before the next is released upstream; the replay is the same bytes."""
    proxy = start_proxy(node_upstream.url, "sqlite:///" + str(node_upstream.directory / "i.db"))
    k = key()
    with httpx.Client(base_url=proxy.url, timeout=15) as client:
        headers = {"Idempotency-Key": k, "X-Fault": "stream=3"}
        node_upstream.release(1, key=k)  # the first chunk: the proxy sends the status line with it
        with client.stream("POST", "/v1/stream", content=b"{}", headers=headers) as response:
            chunks = response.iter_raw()
            received = [next(chunks)]
            for _ in range(2):
                node_upstream.release(1, key=k)  # only now may the next chunk come
                received.append(next(chunks))
            received.extend(chunks)
        replay = client.post("/v1/stream", content=b"{}", headers={"Idempotency-Key": k})
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == b"".join(received)
    assert replay.content.count(b"\n") == 3
    assert node_upstream.executions(k) == 1


def test_headers_hygiene(node_upstream: NodeUpstream, start_proxy: StartProxy, tmp_path: object) -> None:
    """Hop-by-hop and Connection-named fields never cross; (X-)Forwarded(-*) replaced or appended; Via; 508 loop."""
    store = "sqlite:///" + str(node_upstream.directory / "i.db")
    untrusted = start_proxy(node_upstream.url, store)
    trusted = start_proxy(node_upstream.url, store, trusted_proxies=["127.0.0.1/32"])
    sent = {
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "api.example",
        "Forwarded": 'for=203.0.113.9;proto=https;host="api.example"',
    }
    seen = {}
    for name, proxy in (("untrusted", untrusted), ("trusted", trusted)):
        echoed = httpx.get(proxy.url + "/_echo-headers", headers=sent, timeout=15).json()["headers"]
        seen[name] = {n.lower(): v for n, v in echoed}
    for headers in seen.values():
        for name in ("x-secret-hop", "keep-alive", "te", "proxy-authorization"):
            assert name not in headers
        assert headers["via"] == "1.1 idempo"
    assert seen["untrusted"]["x-forwarded-for"] == "127.0.0.1"
    assert seen["untrusted"]["x-forwarded-proto"] == "http"
    assert seen["untrusted"]["x-forwarded-host"] == seen["untrusted"]["host"]
    assert seen["trusted"]["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["trusted"]["x-forwarded-proto"] == "https"
    assert seen["trusted"]["x-forwarded-host"] == "api.example"
    # Forwarded (RFC 7239): the client's own believed only from a trusted peer; ours appended, its host quoted.
    ours = f'for=127.0.0.1;proto=http;host="{seen["untrusted"]["host"]}"'
    assert seen["untrusted"]["forwarded"] == ours
    ours = f'for=127.0.0.1;proto=http;host="{seen["trusted"]["host"]}"'
    assert seen["trusted"]["forwarded"] == f'for=203.0.113.9;proto=https;host="api.example", {ours}'

    # User A's Set-Cookie never reaches user B's request (no cookie jar between them).
    with httpx.Client(base_url=untrusted.url, timeout=15) as client:
        client.post("/v1/x", content=b"{}", headers={"X-Fault": "set-cookie", "Authorization": "Bearer a"})
        client.cookies.clear()
        echoed = client.get("/_echo-headers", headers={"Authorization": "Bearer b"}).json()["headers"]
    assert not [v for n, v in echoed if n.lower() == "cookie"]

    loop = httpx.get(untrusted.url + "/_echo-headers", headers={"Via": "1.1 other, 1.1 idempo"}, timeout=15)
    assert loop.status_code == 508


def test_connection_reuse(node_upstream: NodeUpstream, start_proxy: StartProxy) -> None:
    """1000 sequential requests open no more upstream connections than the pool holds."""
    extra = "[upstream]\nmax_connections = 4\nmax_keepalive_connections = 4\n"
    proxy = start_proxy(node_upstream.url, "sqlite:///" + str(node_upstream.directory / "i.db"), extra)
    with httpx.Client(base_url=proxy.url, timeout=15) as client:
        for _ in range(1000):
            assert client.get("/v1/things").status_code == 201
    assert 1 <= node_upstream.stats()["api_connections"] <= 4


def test_admin_port(node_upstream: NodeUpstream, start_proxy: StartProxy) -> None:
    """/healthz, /readyz (store and upstream) and /metrics with the proxy's counters."""
    proxy = start_proxy(node_upstream.url, "sqlite:///" + str(node_upstream.directory / "i.db"))
    httpx.post(proxy.url + "/v1/x", content=b"{}", headers={"Idempotency-Key": key()}, timeout=15)
    assert httpx.get(proxy.admin_url + "/healthz", timeout=15).status_code == 200
    assert proxy.ready().status_code == 200
    metrics = httpx.get(proxy.admin_url + "/metrics", timeout=15).text
    assert 'idempo_proxy_upstream_requests_total{route="default"} 1.0' in metrics
    assert "idempo_requests_total" in metrics
    node_upstream.stop()
    poll("readyz 503 with the upstream down", lambda: proxy.ready().status_code == 503)


def test_a_large_body_is_spooled_and_sent_with_its_length(node_upstream: NodeUpstream, start_proxy: StartProxy) -> None:
    """A 1 MiB body (past the in-memory part of the spool) reaches the upstream whole, with Content-Length."""
    import hashlib

    proxy = start_proxy(node_upstream.url, "sqlite:///" + str(node_upstream.directory / "i.db"))
    data = bytes(range(256)) * 4096
    k = key()
    headers = {"Idempotency-Key": k, "Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=proxy.url, timeout=15) as client:
        assert client.post("/v1/upload", content=data, headers=headers).status_code == 201
        assert client.post("/v1/upload", content=data, headers=headers).headers["idempotent-replayed"] == "true"
        assert client.post("/v1/upload", content=data[:-1] + b"!", headers=headers).status_code == 422
    entry = node_upstream.ledger()[-1]
    assert entry["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["content_length"] == str(len(data))
    assert node_upstream.executions(k) == 1


def _raw_exchange(url: str, request: bytes) -> dict[str, Any]:
    """Send ``request`` as raw bytes (no client adds a header of its own) and return the echo's JSON."""
    import json
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += sock.recv(65536)
    echoed: dict[str, Any] = json.loads(body)
    return echoed


#: What the proxy itself adds to every forwarded request.
PROXY_FIELDS = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "via"]


def test_nothing_is_added_to_a_request(node_upstream: NodeUpstream, start_proxy: StartProxy) -> None:
    """The upstream gets the client's fields and the proxy's own, nothing the HTTP client would add; the raw target.

    No User-Agent, Accept, Accept-Encoding or Content-Type of the client
    library, no Content-Length: 0 on a request without a body; the path and
    query as the client wrote them (no normalisation, no re-quoting).
    """
    proxy = start_proxy(node_upstream.url, "sqlite:///" + str(node_upstream.directory / "i.db"))
    target = "/_echo-headers?q=a%2Fb%20c&x=%7E&&y"
    cases = {
        "GET": (b"", ["host", "x-mine"]),
        "POST": (b"", ["host", "x-mine"]),
        "PUT": (b"Content-Length: 2\r\n\r\n{}", ["host", "x-mine", "content-length"]),
        "PATCH": (b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", ["host", "x-mine", "transfer-encoding"]),
    }
    for method, (rest, fields) in cases.items():
        request = f"{method} {target} HTTP/1.1\r\nHost: api.example\r\nX-Mine: 1\r\n".encode() + (rest or b"\r\n")
        echoed = _raw_exchange(proxy.url, request)
        assert echoed["url"] == target, method
        names = sorted(name.lower() for name, _ in echoed["headers"])
        assert names == sorted(fields + PROXY_FIELDS), method

    # A keyed request: its body's length and the key's attempt are added, nothing else.
    k = key()
    request = (
        f"POST {target} HTTP/1.1\r\nHost: api.example\r\nIdempotency-Key: {k}\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    echoed = _raw_exchange(proxy.url, request)
    names = sorted(name.lower() for name, _ in echoed["headers"])
    assert names == sorted(["host", "idempotency-key", "content-length", "idempo-attempt", *PROXY_FIELDS])


def test_header_bytes_beyond_ascii_reach_the_upstream_unchanged(
    node_upstream: NodeUpstream, start_proxy: StartProxy
) -> None:
    """A field value's bytes above 0x7f (UTF-8, or a lone obs-text byte) reach the upstream as the client sent them.

    aiohttp writes a request's head as UTF-8 of its ``str`` fields: a value
    decoded as latin-1 went out re-encoded (``José`` in UTF-8 arrived as
    ``JosÃ©``, a lone ``\\xe9`` as two bytes). RFC 9110 section 5.5: a
    recipient treats obs-text as opaque data; a proxy forwards it as it came.
    """
    proxy = start_proxy(node_upstream.url, "sqlite:///" + str(node_upstream.directory / "i.db"))
    values = {b"x-utf8": b"Jos\xc3\xa9 \xe2\x82\xac", b"x-latin": b"Jos\xe9"}
    fields = b"".join(name + b": " + value + b"\r\n" for name, value in values.items())
    for method, keyed in (("GET", b""), ("POST", f"Idempotency-Key: {key()}\r\n".encode())):
        request = f"{method} /_echo-headers HTTP/1.1\r\nHost: api.example\r\n".encode() + keyed + fields
        request += b"Content-Length: 2\r\n\r\n{}" if keyed else b"\r\n"
        echoed = _raw_exchange(proxy.url, request)
        # Node gives each byte of a field value as one character (latin-1).
        got = {name.lower().encode(): value.encode("latin-1") for name, value in echoed["headers"]}
        assert {name: got.get(name) for name in values} == values, method


@pytest.mark.parametrize("proxy_client", ["aiohttp"])  # the field is set before a forwarder sees it
def test_the_upstream_gets_one_form_of_a_key(node_upstream: NodeUpstream, start_proxy: StartProxy) -> None:
    """A key sent as an sf-string (``"k"``) and later bare (``k``) is one key (DESIGN "idempotency key"). The
    first attempt's answer is a 503, so the key is released and the retry in the other form runs again: both
    attempts reach the upstream with the same single field, in format_key's form (bare, as idempo's client
    sends a UUID). A key that cannot be bare (it holds a space) reaches it as an sf-string. Before, the
    upstream got each attempt's field as the client wrote it: two spellings, which an upstream deduplicating
    by the key takes for two keys."""
    proxy = start_proxy(node_upstream.url, "sqlite:///" + str(node_upstream.directory / "i.db"))
    k = key()
    spaced = f"order {key()}"
    with httpx.Client(base_url=proxy.url, timeout=15) as client:
        for value, fault in ((f'"{k}"', "status=503"), (k, None), (f'"{spaced}"', None)):
            headers = {"Idempotency-Key": value, **({"X-Fault": fault} if fault else {})}
            answer = client.post("/v1/payments", json={"amount": 5}, headers=headers)
            assert answer.status_code == (503 if fault else 201), answer.text
    ledger = node_upstream.ledger()
    assert [entry["key"] for entry in ledger] == [k, k, f'"{spaced}"']
    for entry in ledger:
        assert sum(1 for name, _ in entry["headers"] if name.lower() == "idempotency-key") == 1
