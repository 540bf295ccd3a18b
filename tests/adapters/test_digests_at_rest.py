"""Digests at rest and in logs are HMAC-SHA256 under the server secret (issue 11 item 3; DESIGN guarantee 7).

An attacker who has the store (an SQLite file, Redis hashes) or the logs, but
not the secret, cannot check a guess: neither the plain SHA-256 of the body,
of the ``Authorization`` value, of the key, nor the digests idempo stored and
logged before they were keyed appear anywhere. With the secret, the stored
fingerprint is reproducible (the control that the test looks at the right bytes).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from idempo import ConfigurationError, fingerprint, idempotent, store_from_url
from idempo._core.fingerprint import _head, canonical_json
from idempo.asgi import IdempotencyMiddleware as AsgiMiddleware
from idempo.secrets import ENV_VAR, SECRET_RECORD_KEY, store_secret
from idempo.stores import AsyncMemoryStore
from idempo.wsgi import IdempotencyMiddleware as WsgiMiddleware
from tests.support.servers import running_asgi, running_wsgi

PIN_BODY = b'{"pin":"4821"}'
OTHER_BODY = b'{"pin":"4822"}'
BASIC = "Basic aHVudGVyOmh1bnRlcjI="  # hunter:hunter2
KEY = "pin-change-" + "7f3a"
SECRET = "at rest test secret, 32 bytes!!"


def _len_prefixed(*parts: str) -> str:
    return "".join(f"{len(part)}:{part}" for part in parts)


def guesses(path: str) -> dict[str, str]:
    """What an attacker without the secret can compute from a guess: plain SHA-256 digests, old and obvious."""
    sha = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    head, _ = _head(("POST", path, b"", b"application/json"))
    old_principal = "cred:" + sha(BASIC.encode())[:32]
    for_path = {
        "body": sha(PIN_BODY),
        "canonical body": sha(canonical_json(PIN_BODY)),
        "authorization": sha(BASIC.encode()),
        "password": sha(b"hunter2"),
        "key": sha(KEY.encode()),
        # The digests of the unkeyed scheme (before issue 11): fingerprint, principal, record key, log hashes.
        "old fingerprint": sha(head + b"j:" + canonical_json(PIN_BODY)),
        "old principal": old_principal,
        "old record key": sha(_len_prefixed(old_principal, "POST", path, KEY).encode())[:32],
        "old scope hash": sha(_len_prefixed(old_principal, "POST", path).encode())[:16],
        "old key hash": sha(KEY.encode())[:16],
    }
    return for_path


def assert_no_guess_in(haystack: bytes | str, path: str, where: str) -> None:
    text = haystack.decode("latin-1") if isinstance(haystack, bytes) else haystack
    for name, digest in guesses(path).items():
        # Any 16 hex characters of it would do for an attacker; none may appear.
        for start in range(0, len(digest) - 15, 16):
            assert digest[start : start + 16] not in text, f"the {name} digest appears in {where}"


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every idempo log record: its message and every field it carries."""
    return "\n".join(f"{r.getMessage()} {vars(r)!r}" for r in caplog.records if r.name.startswith("idempo"))


def send_pin_changes(url: str) -> None:
    """The PIN change, its replay, and a 422 (same key, other body): an INFO line with a scope hash."""
    headers = {"content-type": "application/json", "authorization": BASIC, "idempotency-key": KEY}
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/pins", content=PIN_BODY, headers=headers).status_code == 201
        assert client.post("/pins", content=PIN_BODY, headers=headers).headers["idempotent-replayed"] == "true"
        assert client.post("/pins", content=OTHER_BODY, headers=headers).status_code == 422


def asgi_app() -> Starlette:
    async def pins(request: Request) -> Response:
        await request.body()
        return JSONResponse({"changed": True}, status_code=201)

    return Starlette(routes=[Route("/pins", pins, methods=["POST"])])


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    environ["wsgi.input"].read()
    start_response("201 Created", [("Content-Type", "application/json")])
    return [b'{"changed":true}']


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="idempo"):
        yield caplog


@pytest.mark.parametrize("front", ["asgi", "wsgi"])
@pytest.mark.parametrize("configured", [True, False], ids=["secret-set", "store-kept-secret"])
def test_nothing_in_the_sqlite_file_or_the_logs_matches_a_guess(
    front: str,
    configured: bool,
    tmp_path: Path,
    debug_logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The PIN body, the Basic password and the key cannot be checked against the file or the log lines."""
    if configured:
        monkeypatch.setenv(ENV_VAR, SECRET)
    else:
        monkeypatch.delenv(ENV_VAR, raising=False)
    url = f"sqlite:///{tmp_path / 'idempo.db'}"
    if front == "asgi":
        with running_asgi(AsgiMiddleware(asgi_app(), url)) as base:
            send_pin_changes(base)
    else:
        middleware = WsgiMiddleware(wsgi_app, url)
        try:
            with running_wsgi(middleware) as base:
                send_pin_changes(base)
        finally:
            middleware.store.close()

    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("idempo.db"))
    assert_no_guess_in(stored, "/pins", "the SQLite file")
    lines = log_text(debug_logs)
    assert "idempo_scope_hash" in lines
    assert_no_guess_in(lines, "/pins", "the log lines")

    # The control: with the secret, the stored fingerprint is the keyed digest of the request.
    store = store_from_url(url)
    try:
        secret = SECRET.encode() if configured else store_secret(store)
        expected = fingerprint("POST", "/pins", b"", "application/json", PIN_BODY, secret=secret)
        assert expected.encode() in stored
        assert (store.get(SECRET_RECORD_KEY) is None) is configured  # a configured secret is never written
    finally:
        store.close()


@pytest.mark.redis
def test_nothing_in_the_redis_hashes_matches_a_guess(redis_url: str, redis_store_url: str) -> None:
    """The same over Redis: every field of every hash the store wrote."""
    import redis

    session_prefix = dict(parse_qsl(urlsplit(redis_store_url).query))["prefix"]
    prefix = f"{session_prefix}rest-{uuid.uuid4().hex[:8]}:"
    url = redis_store_url.replace(f"prefix={session_prefix}", f"prefix={prefix}")
    # With the lifespan on, the middleware closes the store it built from the URL at shutdown.
    with running_asgi(AsgiMiddleware(asgi_app(), url, secret=SECRET), lifespan="on") as base:
        send_pin_changes(base)
    client = redis.Redis.from_url(redis_url)
    try:
        names = list(client.scan_iter(match=prefix + "*", count=1000))
        assert names
        dumped = b"".join(name + b"".join(k + v for k, v in client.hgetall(name).items()) for name in names)
    finally:
        client.close()
    assert_no_guess_in(dumped, "/pins", "the Redis hashes")


def test_decorator_fingerprints_are_keyed(tmp_path: Path) -> None:
    """@idempotent: the stored fingerprint is no plain digest of the arguments."""
    url = f"sqlite:///{tmp_path / 'calls.db'}"

    @idempotent(store=url, key="key", secret=SECRET)
    def change_pin(key: str, pin: str) -> bool:
        return True

    assert change_pin(KEY, "4821")
    form = b"j:" + canonical_json(b'{"pin":"4821"}')
    stored = (tmp_path / "calls.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("calls.db-")
    )
    assert hashlib.sha256(form).hexdigest().encode() not in stored


def test_a_short_secret_is_refused_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret under 16 bytes (secret= or $IDEMPO_SECRET) is a ConfigurationError, never a weak key."""
    with pytest.raises(ConfigurationError, match="16 bytes"):
        AsgiMiddleware(asgi_app(), AsyncMemoryStore(), secret="short")
    monkeypatch.setenv(ENV_VAR, "short")
    with pytest.raises(ConfigurationError, match="IDEMPO_SECRET"):
        WsgiMiddleware(wsgi_app, "memory://")


def test_the_environment_secret_and_an_explicit_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """$IDEMPO_SECRET keys the record keys; an explicit secret= wins over it."""
    from idempo import make_record_key
    from idempo.stores import MemoryStore

    monkeypatch.setenv(ENV_VAR, SECRET)
    store = MemoryStore()
    app = WsgiMiddleware(wsgi_app, store)
    explicit = WsgiMiddleware(wsgi_app, store, secret="another secret, long enough")
    with running_wsgi(app) as one, running_wsgi(explicit) as other:
        headers = {"content-type": "application/json", "idempotency-key": KEY}
        assert httpx.post(one + "/pins", content=PIN_BODY, headers=headers).status_code == 201
        # Another secret, another record key: the same request executes there.
        again = httpx.post(other + "/pins", content=PIN_BODY, headers=headers)
        assert "idempotent-replayed" not in again.headers
    assert store.get(make_record_key("addr:127.0.0.1", "POST", "/pins", KEY, secret=SECRET)) is not None
    assert store.get(SECRET_RECORD_KEY) is None


def test_a_store_kept_secret_is_shared_and_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a configured secret, two apps on one SQLite file agree on the store's secret; one warning."""
    import idempo.secrets

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(idempo.secrets, "_warned", type(idempo.secrets._warned)())
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first, second = WsgiMiddleware(wsgi_app, url), WsgiMiddleware(wsgi_app, url)
    headers = {"content-type": "application/json", "idempotency-key": KEY}
    try:
        with caplog.at_level(logging.WARNING, logger="idempo"), running_wsgi(first) as a, running_wsgi(second) as b:
            assert httpx.post(a + "/pins", content=PIN_BODY, headers=headers).status_code == 201
            replay = httpx.post(b + "/pins", content=PIN_BODY, headers=headers)
            assert replay.headers["idempotent-replayed"] == "true"
    finally:
        first.store.close()
        second.store.close()
    warnings = [r for r in caplog.records if "no secret configured" in r.getMessage()]
    assert len(warnings) == 1
    assert "IDEMPO_SECRET" in warnings[0].getMessage()


def test_records_of_the_unkeyed_scheme_are_treated_as_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record written before the upgrade (plain SHA-256 keys) is never matched: no 422, the request executes."""
    from idempo.stores import MemoryStore

    monkeypatch.setenv(ENV_VAR, SECRET)
    store = MemoryStore()
    old = guesses("/pins")
    # The old scheme's record for this very key and caller, made with another body: it would be a 422.
    legacy_key = hashlib.sha256(_len_prefixed("addr:127.0.0.1", "POST", "/pins", KEY).encode()).hexdigest()[:32]
    store.begin(legacy_key, old["old fingerprint"][::-1], 600_000)
    with running_wsgi(WsgiMiddleware(wsgi_app, store)) as url:
        answer = httpx.post(
            url + "/pins", content=PIN_BODY, headers={"content-type": "application/json", "idempotency-key": KEY}
        )
    assert answer.status_code == 201
    assert "idempotent-replayed" not in answer.headers
