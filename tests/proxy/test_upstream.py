"""The Node upstream the proxy tests stand on: its ledger, its control paths and every X-Fault.

These talk to ``server.mjs`` directly with httpx (no proxy), so a later proxy
test can trust what the upstream says it did. Nothing here waits for an assumed
time: a test polls the ledger or ``/_stats``, or lets the server go with
``/_release``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.conftest import REQUIRE_SERVICES
from tests.proxy.upstream import NodeUpstream, find_node

K1 = "8e03978e-40d5-43e8-bc93-6894a57f9324"
K2 = "clkyoesmbgybucifusbbtdsbohtyuuwz"
BODY = b'{"sku":"A","qty":1}'


@pytest.fixture
def client(node_upstream: NodeUpstream) -> Iterator[httpx.Client]:
    """An httpx client on the upstream (keep-alive, one connection at a time)."""
    with httpx.Client(base_url=node_upstream.url, timeout=15) as client:
        yield client


@contextmanager
def in_background(client: httpx.Client, *args: object, **kwargs: object) -> Iterator[Future[httpx.Response]]:
    """Send ``client.request(*args, **kwargs)`` from a thread; yield its future."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(client.request, *args, **kwargs)  # type: ignore[arg-type]


def test_node_missing_skips_or_fails_by_require_services(tmp_path: Path) -> None:
    """Without node on PATH the reason names the install; it skips, or fails under IDEMPO_REQUIRE_SERVICES=1."""
    node, reason = find_node(path=str(tmp_path))
    assert node is None
    assert "node is not installed" in reason
    assert "apt-get install nodejs" in reason
    from tests.conftest import service_missing

    expected = pytest.fail.Exception if REQUIRE_SERVICES else pytest.skip.Exception
    with pytest.raises(expected, match="node is not installed"):
        service_missing(reason)


def test_execution_is_in_the_ledger_and_answered_201_with_a_fresh_id(
    node_upstream: NodeUpstream, client: httpx.Client
) -> None:
    """Each POST is one ledger line (key, attempt, method, path, pid, time, body digest) and a 201 with a new id."""
    headers = {"Idempotency-Key": K1, "Idempo-Attempt": "1", "Content-Type": "application/json"}
    first = client.post("/v1/payments?x=1", content=BODY, headers=headers)
    second = client.post("/v1/payments?x=1", content=BODY, headers={**headers, "Idempo-Attempt": "2"})

    assert first.status_code == second.status_code == 201
    assert first.headers["content-type"] == "application/json"
    assert first.json()["id"] != second.json()["id"]  # the upstream itself is not idempotent
    assert first.headers["x-execution-id"] == first.json()["id"]
    ledger = node_upstream.ledger()
    assert [entry["id"] for entry in ledger] == [first.json()["id"], second.json()["id"]]
    entry = ledger[0]
    assert entry["key"] == K1
    assert [e["attempt"] for e in ledger] == ["1", "2"]
    assert entry["method"] == "POST"
    assert entry["path"] == "/v1/payments?x=1"
    assert entry["pid"] == node_upstream.pid
    assert entry["body_bytes"] == len(BODY)
    assert entry["body_sha256"] == hashlib.sha256(BODY).hexdigest()
    assert entry["content_length"] == str(len(BODY))
    assert entry["transfer_encoding"] is None
    assert entry["faults"] is None
    assert ["Idempotency-Key", K1] in entry["headers"]
    datetime.fromisoformat(entry["time"])
    assert first.json() == {
        "id": entry["id"],
        "key": K1,
        "attempt": "1",
        "method": "POST",
        "path": "/v1/payments?x=1",
        "body_bytes": len(BODY),
        "body_sha256": entry["body_sha256"],
    }


def test_ledger_records_a_chunked_body_and_a_keyless_request(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """A body sent chunked is recorded with its Transfer-Encoding (a proxy must send a Content-Length instead)."""
    response = client.post("/v1/files", content=iter([b"ab", b"cd"]))
    assert response.status_code == 201
    (entry,) = node_upstream.ledger()
    assert entry["key"] is None
    assert entry["attempt"] is None
    assert entry["transfer_encoding"] == "chunked"
    assert entry["content_length"] is None
    assert entry["body_sha256"] == hashlib.sha256(b"abcd").hexdigest()


def test_stats_count_executions_per_key_and_connections(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """/_stats counts executions per key, keyless ones, and the TCP connections accepted."""
    for key in (K1, K1, K2):
        client.post("/v1/payments", headers={"Idempotency-Key": key})
    client.post("/v1/payments")
    with httpx.Client(base_url=node_upstream.url) as other:
        other.post("/v1/payments", headers={"Idempotency-Key": K2})

    stats = node_upstream.stats()
    assert stats["executions"] == {K1: 2, K2: 2}
    assert stats["unkeyed"] == 1
    assert stats["total"] == 5
    # Two clients carried the executions; the stats helper has a connection of its own.
    assert stats["api_connections"] == 2
    assert stats["connections"] == 3
    assert stats["pid"] == node_upstream.pid
    assert node_upstream.executions(K1) == 2
    assert node_upstream.executions() == 5


def test_keep_alive_is_nodes_default(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """Connections are kept alive with Node's default 5 s idle timeout, and reused."""
    responses = [client.post("/v1/payments") for _ in range(3)]
    assert {r.headers["keep-alive"] for r in responses} == {"timeout=5"}
    assert node_upstream.stats()["keep_alive_timeout_ms"] == 5000
    assert node_upstream.stats()["api_connections"] == 1


def test_echo_headers_keeps_order_and_repeats(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """/_echo-headers answers the request headers in order, repeated ones kept; it is no execution."""
    sent = [("X-B", "2"), ("X-Dup", "one"), ("X-A", "1"), ("X-Dup", "two")]
    response = client.post("/_echo-headers", headers=sent, content=b"ignored")
    assert response.status_code == 200
    echoed = [(name.lower(), value) for name, value in response.json()["headers"]]
    ours = [pair for pair in echoed if pair[0].startswith("x-")]
    assert ours == [(name.lower(), value) for name, value in sent]
    assert response.json()["method"] == "POST"
    assert node_upstream.ledger() == []


def test_unknown_fault_is_refused_and_not_executed(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """A misspelt X-Fault is a 400 naming it, never an execution without the fault."""
    response = client.post("/v1/payments", headers={"X-Fault": "crash-after-comit"})
    assert response.status_code == 400
    assert "crash-after-comit" in response.json()["error"]
    bad_number = client.post("/v1/payments", headers={"X-Fault": "status=abc"})
    assert bad_number.status_code == 400
    assert node_upstream.ledger() == []


def test_status_fault(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """status=N answers N after the execution; 204 has no body."""
    failed = client.post("/v1/payments", headers={"X-Fault": "status=503"})
    empty = client.post("/v1/payments", headers={"X-Fault": "status=204"})
    assert failed.status_code == 503
    assert failed.json()["id"] == failed.headers["x-execution-id"]
    assert empty.status_code == 204
    assert empty.content == b""
    assert node_upstream.executions() == 2


def test_gzip_fault(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """gzip: the body on the wire is gzip, with Content-Encoding: gzip and its Content-Length."""
    with client.stream("POST", "/v1/payments", headers={"X-Fault": "gzip"}) as response:
        on_wire = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) == len(on_wire)
    assert on_wire[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(on_wire))["id"] == response.headers["x-execution-id"]
    decoded = client.post("/v1/payments", headers={"X-Fault": "gzip"})
    assert decoded.json()["id"] == decoded.headers["x-execution-id"]
    assert node_upstream.executions() == 2


def test_set_cookie_fault(client: httpx.Client) -> None:
    """set-cookie: each answer sets a cookie value of its own."""
    first = client.post("/v1/payments", headers={"X-Fault": "set-cookie"})
    second = client.post("/v1/payments", headers={"X-Fault": "set-cookie"})
    cookies = [r.headers["set-cookie"] for r in (first, second)]
    assert all(c.startswith("session=") for c in cookies)
    assert cookies[0] != cookies[1]
    assert "set-cookie" not in client.post("/v1/payments").headers


def test_binary_fault(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """binary=N: N random bytes as application/octet-stream, different at each execution; combinable with gzip."""
    first = client.post("/v1/payments", headers={"X-Fault": "binary=4096"})
    second = client.post("/v1/payments", headers={"X-Fault": "binary=4096"})
    zipped = client.post("/v1/payments", headers={"X-Fault": "binary=1000,gzip"})
    assert first.headers["content-type"] == "application/octet-stream"
    assert len(first.content) == len(second.content) == 4096
    assert first.content != second.content
    with pytest.raises(UnicodeDecodeError):
        first.content.decode()
    assert zipped.headers["content-encoding"] == "gzip"
    assert len(zipped.content) == 1000
    assert node_upstream.executions() == 3


def test_crash_after_commit_kills_the_process_after_the_ledger_line(
    node_upstream: NodeUpstream, client: httpx.Client
) -> None:
    """crash-after-commit: the ledger has the execution, the client no answer, the process died of SIGKILL."""
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/v1/payments", content=BODY, headers={"Idempotency-Key": K1, "X-Fault": "crash-after-commit"})
    assert node_upstream.wait_exit() == -signal.SIGKILL
    assert node_upstream.executions(K1) == 1

    # Restarted on the same port, it appends to the same ledger.
    port, pid = node_upstream.port, node_upstream.pid
    node_upstream.start()
    assert (node_upstream.port, node_upstream.pid != pid) == (port, True)
    with httpx.Client(base_url=node_upstream.url) as again:
        assert again.post("/v1/payments", headers={"Idempotency-Key": K1}).status_code == 201
    assert [entry["pid"] for entry in node_upstream.ledger()] == [pid, node_upstream.pid]
    assert node_upstream.stats()["executions"] == {K1: 1}  # counters are this process's


def test_drop_after_commit_closes_without_an_answer(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """drop-after-commit: the ledger has the execution, the connection closes unanswered, the server lives on."""
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/v1/payments", headers={"Idempotency-Key": K1, "X-Fault": "drop-after-commit"})
    assert node_upstream.executions(K1) == 1
    assert node_upstream.running
    assert client.post("/v1/payments").status_code == 201


def test_reset_before_read_is_no_execution(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """reset-before-read: the connection is reset before the body is read; nothing is executed."""
    with pytest.raises(httpx.TransportError):
        client.post("/v1/payments", content=BODY * 1000, headers={"X-Fault": "reset-before-read"})
    assert node_upstream.ledger() == []
    assert node_upstream.stats()["total"] == 0
    assert client.post("/v1/payments").status_code == 201


def test_delay_fault_commits_first_then_waits(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """delay=MS: the execution is in the ledger while its answer is still delayed."""
    assert client.post("/v1/payments", headers={"X-Fault": "delay=1"}).status_code == 201
    headers = {"Idempotency-Key": K1, "X-Fault": "delay=600000"}
    with in_background(client, "POST", "/v1/payments", headers=headers) as sent:
        node_upstream.wait_executions(1, K1)
        assert not sent.done()
        node_upstream.kill()  # ends the wait; the delayed answer is never sent
        with pytest.raises(httpx.RemoteProtocolError):
            sent.result()
    assert node_upstream.executions() == 2


def test_await_release_holds_the_answer_until_released(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """await-release: executed at once, answered only after a /_release; a release ahead of time is kept."""
    headers = {"Idempotency-Key": K1, "X-Fault": "await-release"}
    with in_background(client, "POST", "/v1/payments", headers=headers) as sent:
        node_upstream.wait_waiting(1)
        assert node_upstream.executions(K1) == 1
        assert not sent.done()
        assert node_upstream.release()["released"] == 1
        assert sent.result().status_code == 201

    node_upstream.release()  # nobody waits: kept as a credit
    assert client.post("/v1/payments", headers={"X-Fault": "await-release"}).status_code == 201
    assert node_upstream.stats()["waiting"] == 0


def test_release_by_key_lets_only_that_key_go(node_upstream: NodeUpstream) -> None:
    """/_release?key=K releases K's answer and leaves another key's waiting."""
    with (
        httpx.Client(base_url=node_upstream.url, timeout=15) as a,
        httpx.Client(base_url=node_upstream.url, timeout=15) as b,
        in_background(a, "POST", "/v1/payments", headers={"Idempotency-Key": K1, "X-Fault": "await-release"}) as first,
        in_background(b, "POST", "/v1/payments", headers={"Idempotency-Key": K2, "X-Fault": "await-release"}) as second,
    ):
        node_upstream.wait_waiting(2)
        node_upstream.release(key=K2)
        assert second.result().json()["key"] == K2
        assert not first.done()
        assert node_upstream.stats()["waiting"] == 1
        node_upstream.release()
        assert first.result().json()["key"] == K1


def read_line(chunks: Iterator[bytes], buffer: bytearray) -> bytes:
    """Read from ``chunks`` into ``buffer`` until it holds a whole line; take that line out."""
    while b"\n" not in buffer:
        buffer += next(chunks)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def test_stream_sends_each_chunk_only_after_a_release(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """stream=N: headers at once, chunk i only after release i (read before release i+1: it streams)."""
    with client.stream("POST", "/v1/payments", headers={"Idempotency-Key": K1, "X-Fault": "stream=3"}) as response:
        assert response.status_code == 201  # the headers came before any release
        assert response.headers["transfer-encoding"] == "chunked"
        chunks = response.iter_raw()
        buffer = bytearray()
        lines = []
        for index in range(1, 4):
            node_upstream.wait_waiting(1)
            node_upstream.release(key=K1)
            lines.append(json.loads(read_line(chunks, buffer)))
            assert lines[-1]["chunk"] == index
        assert b"".join(chunks) == b""
    assert [line["of"] for line in lines] == [3, 3, 3]
    assert {line["id"] for line in lines} == {response.headers["x-execution-id"]}
    assert node_upstream.executions(K1) == 1


def test_gzip_stream_decodes_chunk_by_chunk_as_one_gzip_member(
    node_upstream: NodeUpstream, client: httpx.Client
) -> None:
    """stream=N with gzip: each chunk decodes on arrival, and the whole body is one gzip stream."""
    wire = bytearray()
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with client.stream("POST", "/v1/payments", headers={"X-Fault": "stream=2,gzip"}) as response:
        assert response.headers["content-encoding"] == "gzip"
        chunks = response.iter_raw()
        text = b""
        for index in (1, 2):
            node_upstream.wait_waiting(1)
            node_upstream.release()
            while text.count(b"\n") < index:
                data = next(chunks)
                wire += data
                text += decoder.decompress(data)
        wire += b"".join(chunks)
    lines = [json.loads(line) for line in gzip.decompress(bytes(wire)).splitlines()]
    assert [line["chunk"] for line in lines] == [1, 2]


def test_binary_stream_splits_the_bytes(node_upstream: NodeUpstream, client: httpx.Client) -> None:
    """stream=N with binary=M: M random bytes in N chunks (released up front: credits are kept)."""
    node_upstream.release(3)
    response = client.post("/v1/payments", headers={"X-Fault": "binary=3000,stream=3"})
    assert response.headers["content-type"] == "application/octet-stream"
    assert len(response.content) == 3000
    assert node_upstream.stats()["waiting"] == 0


def test_a_stream_whose_client_left_stops_waiting(node_upstream: NodeUpstream) -> None:
    """A stream whose connection closed stops waiting, so it does not swallow a later release."""
    with (
        httpx.Client(base_url=node_upstream.url, timeout=15) as gone,
        gone.stream("POST", "/v1/payments", headers={"X-Fault": "stream=2"}) as response,
    ):
        assert response.status_code == 201
        node_upstream.wait_waiting(1)
    node_upstream.wait_for("the stream stopped waiting", lambda: node_upstream.stats()["waiting"] == 0)
    with httpx.Client(base_url=node_upstream.url, timeout=15) as client:
        node_upstream.release()
        assert client.post("/v1/payments", headers={"X-Fault": "await-release"}).status_code == 201
