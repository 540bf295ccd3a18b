"""Fuzz idempo's HTTP fronts in process: ASGI (Starlette), WSGI (Flask) and Django, with hostile requests.

    .venv/bin/python bench/fuzz.py                      # 1,000,000 ASGI + 100,000 WSGI + 100,000 Django
    .venv/bin/python bench/fuzz.py --asgi 20000 --wsgi 2000 --django 2000 --seed 7
    nice -n 10 .venv/bin/python bench/fuzz.py ...       # on a shared machine

Run from a checkout with ``pip install -e '.[test]'`` (Starlette, Flask,
Django and hypothesis come with the test extra). Not part of the test suite.

Each front gets its own app behind idempo, as its users add it:
``idempo.asgi.IdempotencyMiddleware`` around a Starlette app, driven as an
ASGI server would (``scope``, ``receive``, ``send``) on one asyncio loop;
``idempo.flask.Idempotency`` on a Flask app and ``idempo.django``'s middleware
in a Django ``WSGIHandler``, driven as a WSGI server would (environ,
``start_response``, the body iterated and closed). All three use a memory
store on a clock that moves 0-0.4 s per request, so records expire (TTL 30 s)
while keys repeat: replays, 409s, 422s and takeovers all happen.

Generation: hypothesis strategies fill pools (JSON values of every shape,
unicode text, bytes, tokens, number literals) through hypothesis' own runner,
seeded (``--seed``); a fast loop driven by ``random.Random(seed)`` then builds
each request from the pools and from hostile shapes of its own: keys in both
forms (bare and sf-string), malformed keys (control characters, non-ASCII,
lists, 300 characters, unbalanced quotes) and repeated key lines; methods;
paths with percent escapes that are not UTF-8; query strings (escapes that
are not UTF-8, raw bytes, broken escapes, 20 KB); header names in odd cases
(WSGI), repeated lines, binary and 64 KB values, 200 headers; ``Content-Type``
with parameters, multipart boundaries in other cases, two lines, garbage;
bodies: JSON (respelled, every number spelling, 100,000 levels deep),
invalid JSON, binary, multipart, forms, empty, over ``max_request_body``;
``Content-Length`` values the body does not have (WSGI), clients that leave mid-body or
mid-response. hypothesis' runner alone costs about a millisecond per example,
too slow for a million requests; the loop costs tens of microseconds.

The app answers what the request's ``X-Fuzz-*`` headers ask (a status, a
streamed, empty, binary or oversized body, an exception, or a header that
reflects a value, CR/LF and NUL included). What it was asked is what may
come back: a 5xx or an exception the app was not asked for is a finding, and
so is a replay that does not match its execution (another principal, method,
path or key; other bytes; a response no server may send). The fake servers
refuse what uvicorn and waitress refuse (control characters in headers).

Prints, per front: requests, time, requests per second, the count of each
status, unexpected 5xx, exceptions raised out of idempo (by type, with the
innermost frame and the request number), hangs (5 s), replay anomalies and
idempo's log records by outcome. Exit status 1 when any front has a finding.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import fnmatch
import io
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_from_bytes, unquote, unquote_to_bytes

from idempo import Policy
from idempo.stores import AsyncMemoryStore, MemoryStore
from idempo.stores.sqlite import AsyncSQLiteStore, SQLiteStore

METHODS = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "post", "FUZZ"]  # besides POST and PATCH
KEYS = 40  # distinct valid keys: small enough that keys repeat within a record's TTL
PRINCIPALS = ["Bearer alice", "Bearer bob", "bearer alice", "Basic aHVudGVyMg==", "Bearer " + "x" * 300]
POLICY = Policy(record_ttl=30, lease_ttl=10, max_request_body=64 * 1024, max_response_body=16 * 1024)
ROUTES: dict[str, Policy | None] = {"/strict/*": POLICY.replace(require_key=True), "/exempt/*": None}
ASKED_5XX = (500, 502, 503)
SECRET = "idempo-fuzz-secret-0123456789"  # a fixed server secret: runs are reproducible, and no warning
TIMEOUT = 5.0


class FuzzAppError(Exception):
    """The exception the app raises when a request asks it to (X-Fuzz-Raise)."""


class ServerRefused(RuntimeError):
    """What the fake server raises for a response it cannot send (uvicorn's httptools protocol does the same)."""


# --- hypothesis pools ------------------------------------------------------------------------------------


@dataclass
class Pools:
    json: list[Any] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    binary: list[bytes] = field(default_factory=list)
    token: list[str] = field(default_factory=list)
    number: list[str] = field(default_factory=list)


def fill_pools(seed: int, size: int) -> Pools:
    """Draw ``size`` values of each kind with hypothesis' own runner, seeded, generation phase only."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    leaf = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    json_values = st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
        max_leaves=25,
    )
    numbers = (
        st.integers().map(str)
        | st.floats(allow_nan=False, allow_infinity=False).map(repr)
        | st.decimals(allow_nan=False, allow_infinity=False).map(str)
        | st.builds(lambda m, e: f"{m}e{e}", st.integers(-(10**25), 10**25), st.integers(-500, 500))
    )
    strategies = {
        "json": json_values,
        "text": st.text(max_size=40),
        "binary": st.binary(max_size=80),
        "token": st.from_regex(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}", fullmatch=True),
        "number": numbers,
    }
    pools = Pools()

    @hypothesis_seed(seed)
    @settings(
        max_examples=size,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        for name, strategy in strategies.items():
            getattr(pools, name).append(data.draw(strategy))

    collect()
    return pools


# --- one generated request ----------------------------------------------------------------------------------


@dataclass
class Request:
    """One request, front-neutral: bytes everywhere, header names lower-case as ASGI servers give them."""

    index: int
    method: str
    raw_path: bytes  # the request target's path, percent escapes as sent (ASCII)
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunks: list[bytes]
    leave_mid_body: bool = False  # the client disconnects before the body is complete
    leave_mid_response: bool = False  # the client disconnects once the response has started
    content_length: str | None = None  # WSGI: the declared length, when it lies
    root: str = ""  # ASGI root_path / WSGI SCRIPT_NAME
    client: bool = True  # ASGI: scope["client"] present
    raw_path_known: bool = True  # ASGI: scope["raw_path"] present
    asked_5xx: bool = False  # the app was asked for a 5xx, an exception or an invalid response
    asked_raise: bool = False
    asked_invalid: bool = False
    differs: str = ""  # a retry changed in a way the app can tell apart: it must not be a replay
    wsgi: bool = False

    def path_bytes(self) -> bytes:
        """The path the record key is made of: the bytes sent (ASGI without raw_path: what the server left of them)."""
        if not self.wsgi and not self.raw_path_known:
            # Without raw_path, bytes that are not UTF-8 are lost to the server's U+FFFD, for idempo and app alike.
            return (self.root + unquote(self.raw_path.decode("ascii"))).encode("utf-8", "surrogatepass")
        return self.root.encode() + unquote_to_bytes(self.raw_path)

    scope: tuple[bytes, str, bytes, str | None] = (b"", "", b"", None)  # (authorization, method, path bytes, key)


class Generator:
    """Builds hostile requests from the pools with a seeded ``random.Random``."""

    def __init__(self, pools: Pools, seed: int) -> None:
        self.pools = pools
        self.rng = random.Random(seed)
        self.recent: collections.deque[Request] = collections.deque(maxlen=64)

    # -- parts --

    def key_lines(self) -> list[bytes]:
        """The Idempotency-Key lines: none, a key in either form, two lines, or a malformed value."""
        rng = self.rng
        roll = rng.random()
        key = f"k{rng.randrange(KEYS)}"
        if roll < 0.08:
            return []
        if roll < 0.62:
            return [key.encode()]
        if roll < 0.72:
            return [b'"' + key.encode() + b'"']  # the draft's sf-string: the same key
        if roll < 0.75:
            quoted = 'a "quoted" \\ key ' + key
            return [b'"' + quoted.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"']
        if roll < 0.80:
            return [key.encode(), key.encode() if rng.random() < 0.5 else b"other-" + key.encode()]
        malformed = rng.choice(
            [
                b"",
                b"   ",
                b"a,b",
                b'"unterminated',
                b'"a";p=1',
                b"k\x00ey",
                b"k\x7fey",
                b"\xffkey",
                "clé".encode(),
                b"x" * 300,
                b'"' + b"x" * 254 + b'"',
                b'"' + b"\\" * 300 + b'"',
                b"with space",
                rng.choice(self.pools.binary),
                rng.choice(self.pools.text).encode("utf-8", "surrogatepass"),
            ]
        )
        return [malformed]

    def content_type(self, boundary: str) -> list[bytes]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.12:
            return []
        if roll < 0.55:
            return [
                rng.choice(
                    [b"application/json", b"application/json; charset=utf-8", b"Application/JSON; Charset=UTF-8"]
                )
            ]
        if roll < 0.62:
            return [rng.choice([b"application/merge-patch+json", b"application/vnd.api+json; ext=x"])]
        if roll < 0.72:
            spelled = rng.choice([boundary, boundary.swapcase(), f'"{boundary}"'])
            return [f"multipart/form-data; boundary={spelled}".encode("utf-8", "surrogatepass")]
        if roll < 0.80:
            return [rng.choice([b"application/x-www-form-urlencoded", b"text/plain", b"application/octet-stream"])]
        if roll < 0.85:
            first = b"application/json"
            return [first, rng.choice([first, b"text/plain"])]
        if roll < 0.88:
            return [rng.choice([b"application/json, text/plain", b"application/json,", b'text/plain; a="x,y"'])]
        if roll < 0.91:
            return [b"text/plain; " + b"; ".join(b"p%d=%d" % (i, i) for i in range(rng.randrange(1, 800)))]
        if roll < 0.95:
            return [rng.choice(self.pools.binary)]
        return [
            rng.choice(
                [
                    b"",
                    b"/",
                    b"json",
                    b"application/json; charset",
                    b'text/plain; a="\\',
                    b"text/plain; a=\xe9",
                    b"a/b;;;",
                ]
            )
        ]

    def body(self, kind: str, boundary: str) -> bytes:
        rng = self.rng
        pools = self.pools
        if kind == "json":
            value = rng.choice(pools.json)
            return json.dumps(
                value,
                ensure_ascii=rng.random() < 0.5,
                indent=rng.choice([None, None, 2]),
                sort_keys=rng.random() < 0.3,
            ).encode("utf-8", "surrogatepass")
        if kind == "numbers":
            numbers = [rng.choice(pools.number) for _ in range(rng.randrange(1, 6))]
            return ("[" + ",".join(numbers) + "]").encode()
        if kind == "invalid":
            text = json.dumps(rng.choice(pools.json)).encode("utf-8", "surrogatepass")
            cut = rng.randrange(len(text) + 1)
            return rng.choice([text[:cut], text + b"}", b"{" + text, b'{"a": NaN}', b"[1,]", b"\xff\xfe{}"])
        if kind == "deep":
            depth = rng.choice([100, 5000, 100_000])
            return b"[" * depth + b"]" * depth
        if kind == "binary":
            return rng.choice(pools.binary) + rng.randbytes(rng.randrange(0, 200))
        if kind == "multipart":
            parts = b""
            for _ in range(rng.randrange(0, 3)):
                name = rng.choice(pools.text).encode("utf-8", "surrogatepass")
                value = rng.choice(pools.binary)
                parts += b"--" + boundary.encode("utf-8", "surrogatepass") + b"\r\n"
                parts += b'Content-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value + b"\r\n"
            return parts + b"--" + boundary.encode("utf-8", "surrogatepass") + b"--\r\n"
        if kind == "form":
            pairs = [(rng.choice(pools.text), rng.choice(pools.text)) for _ in range(rng.randrange(0, 4))]
            return "&".join(quote(a, safe="") + "=" + quote(b, safe="") for a, b in pairs).encode()
        if kind == "huge":
            return rng.randbytes(POLICY.max_request_body + rng.randrange(1, 10_000))
        return b""

    def path(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.55:
            return b"/orders"
        if roll < 0.80:
            if rng.random() < 0.5:
                segment = quote(rng.choice(self.pools.text), safe="", errors="surrogatepass")
            else:
                segment = quote_from_bytes(rng.choice(self.pools.binary), safe="")
            return b"/orders/" + segment.encode("ascii")
        if roll < 0.86:
            return rng.choice([b"/orders/%FF", b"/orders/%FE", b"/orders/%ff", b"/orders/%C3%A9", b"/orders/%EF%BF%BD"])
        if roll < 0.91:
            return b"/strict/" + quote(rng.choice(self.pools.token), safe="").encode()
        if roll < 0.94:
            return b"/exempt/x"
        return rng.choice(
            [b"/other", b"//orders", b"/orders/..%2F..", b"/orders%00", b"/%ff%fe", b"/orders/" + b"a" * 5000]
        )

    def query(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.5:
            return b""
        if roll < 0.8:
            pairs = []
            for _ in range(rng.randrange(1, 5)):
                name = quote(rng.choice(self.pools.text), errors="surrogatepass")
                if rng.random() < 0.3:
                    value = quote_from_bytes(rng.choice(self.pools.binary))
                else:
                    value = quote(rng.choice(self.pools.text), errors="surrogatepass")
                pairs.append(name + "=" + value)
            return "&".join(pairs).encode("ascii")
        if roll < 0.9:
            return rng.choice(
                [b"sig=%FF", b"sig=%FE", b"sig=%ff", b"a&&b", b"=", b"%", b"%zz", b"a=%G1", b";", b"a=1;b=2"]
            )
        if roll < 0.95:
            return rng.choice(self.pools.binary)  # raw bytes, as a lenient server passes them
        return b"q=" + b"x" * 20_000

    # -- the request --

    def request(self, index: int, *, wsgi: bool) -> Request:
        """A new request, or (35%) a retry of a recent one: as it was, or respelled, re-keyed or changed."""
        if self.recent and self.rng.random() < 0.35:
            return self.retry(index, self.rng.choice(self.recent))
        request = self.fresh(index, wsgi=wsgi)
        self.recent.append(request)
        return request

    def retry(self, index: int, base: Request) -> Request:
        rng = self.rng
        request = dataclasses.replace(base, index=index, headers=list(base.headers))
        request.headers = [(n, str(index).encode() if n == b"x-fuzz-id" else v) for n, v in request.headers]
        roll = rng.random()
        if roll < 0.15 and any(n == b"content-type" and b"json" in v for n, v in request.headers):
            try:
                value = json.loads(base.body)
            except (ValueError, RecursionError):
                pass
            else:  # the same JSON, spelled otherwise: a replay
                request.body = json.dumps(value, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5).encode(
                    "utf-8", "surrogatepass"
                )
                request.chunks = [request.body]
        elif roll < 0.25:  # the key in its other form: the same key
            request.headers = [
                (n, v[1:-1] if v[:1] == b'"' and v[-1:] == b'"' and b"\\" not in v else b'"' + v + b'"')
                if n == b"idempotency-key" and _BARE.fullmatch(v.strip(b'"'))
                else (n, v)
                for n, v in request.headers
            ]
        elif roll < 0.35:  # another body with the same key: a mismatch
            request.body = base.body + b" "
            request.chunks = [request.body]
        elif roll < 0.45:  # other instructions for the app (not part of the fingerprint)
            request.headers = [(n, v) for n, v in request.headers if not n.startswith(b"x-fuzz-") or n == b"x-fuzz-id"]
            request.asked_5xx = request.asked_raise = request.asked_invalid = False
            self.steer(request)
        elif roll < 0.60:
            self.near(request)
        return request

    def near(self, request: Request) -> None:
        """Change the retry where a careless fingerprint would not see it: it must not get the first answer.

        One byte of the path or query that is not UTF-8 (%FF for %FE), the
        case of a multipart boundary, or a big integer one up (one IEEE
        double holds both).
        """
        rng = self.rng
        choice = rng.random()
        toggled = {b"%FF": b"%FE", b"%FE": b"%FF", b"%ff": b"%FE"}
        if choice < 0.3:
            for old, new in toggled.items():
                if old in request.raw_path:
                    request.raw_path = request.raw_path.replace(old, new, 1)
                    who, method, _, key = request.scope
                    request.scope = (who, method, request.path_bytes(), key)
                    return  # another record: the scope check catches a replay
            request.raw_path = b"/orders/%FE" if request.raw_path != b"/orders/%FE" else b"/orders/%FF"
            who, method, _, key = request.scope
            request.scope = (who, method, request.path_bytes(), key)
        elif choice < 0.55:
            for old, new in toggled.items():
                if old in request.query:
                    request.query = request.query.replace(old, new, 1)
                    request.differs = "a query byte"
                    return
            request.query = b"sig=%FE" if request.query != b"sig=%FE" else b"sig=%FF"
            request.differs = "a query byte"
        elif choice < 0.8:
            for index, (name, value) in enumerate(request.headers):
                if name == b"content-type" and b"boundary=" in value:
                    head, _, boundary = value.partition(b"boundary=")
                    if boundary.swapcase() != boundary:
                        request.headers[index] = (name, head + b"boundary=" + boundary.swapcase())
                        request.differs = "the boundary's case"
                    return
        else:
            match = re.search(rb"(?<![\d.eE+-])-?[1-9]\d{16,}(?![\d.eE])", request.body)
            if match is not None and json_type(request) and int(match.group()) + 1 == float(int(match.group()) + 1):
                bumped = str(int(match.group()) + 1).encode()
                request.body = request.body[: match.start()] + bumped + request.body[match.end() :]
                request.chunks = [request.body]
                request.differs = "a big integer (the same double)"

    def fresh(self, index: int, *, wsgi: bool) -> Request:
        rng = self.rng
        pools = self.pools
        roll = rng.random()
        method = "POST" if roll < 0.75 else "PATCH" if roll < 0.85 else rng.choice(METHODS)
        boundary = rng.choice(pools.token) if rng.random() < 0.8 else rng.choice(pools.text)
        key_lines = self.key_lines()
        content_types = self.content_type(boundary)
        kind = rng.choices(
            ["json", "numbers", "invalid", "deep", "binary", "multipart", "form", "huge", "empty"],
            weights=[40, 10, 10, 2, 8, 10, 6, 2, 12],
        )[0]
        body = self.body(kind, boundary)
        headers: list[tuple[bytes, bytes]] = [(b"host", b"testserver")]
        headers += [(b"idempotency-key", line) for line in key_lines]
        headers += [(b"content-type", line) for line in content_types]
        authorization = b""
        if rng.random() < 0.6:
            authorization = rng.choice(PRINCIPALS).encode() if rng.random() < 0.95 else rng.choice(pools.binary)
            headers.append((b"authorization", authorization))
        cookie = b""
        if rng.random() < 0.2:
            cookie = rng.choice(
                [
                    b"sessionid=abc",
                    b"sessionid=abd",
                    b"csrftoken=x; sessionid=abc",
                    b"sessionid=abc; csrftoken=y",
                    b"session=1; session=2",
                    b"connect.sid=s%3Aa.b; _ga=GA1",
                    b"AUTH_TOKEN=t; theme=dark",
                    b"theme=light",
                    b"=;;; =x; sid",
                    b"sid=" + b"v" * 5000,
                    rng.choice(pools.binary),
                ]
            )
            headers.append((b"cookie", cookie))
        headers.append((b"x-fuzz-id", str(index).encode()))
        request = Request(index, method, self.path(), self.query(), headers, body, [body])
        self.steer(request)
        for _ in range(rng.choice([0, 0, 0, 1, 2, 3])):
            name = rng.choice(pools.token).lower().encode()
            value = (
                rng.choice(pools.text).encode("utf-8", "surrogatepass")
                if rng.random() < 0.7
                else rng.choice(pools.binary)
            )
            headers.append((name, value))
        roll = rng.random()
        if roll < 0.01:
            headers.append((b"x-huge", b"v" * 65_536))
        elif roll < 0.02:
            headers += [(b"x-many-%d" % i, b"v") for i in range(200)]
        if len(body) > 1 and rng.random() < 0.3:
            cut = sorted(rng.sample(range(1, len(body)), min(2, len(body) - 1)))
            request.chunks = [body[: cut[0]], *([body[cut[0] : cut[-1]]] if len(cut) > 1 else []), body[cut[-1] :]]
        request.leave_mid_body = rng.random() < 0.01
        request.leave_mid_response = rng.random() < 0.01
        if wsgi and rng.random() < 0.05:
            # What a WSGI server passes on (waitress and gunicorn answer 400 to a length that is not a number):
            # none, or a length the body does not have (the client left early, or sent more).
            request.content_length = rng.choice(["", "absent", str(len(body) + 10), str(max(len(body) - 1, 0))])
        request.root = "/api" if rng.random() < 0.05 else ""
        request.client = rng.random() > 0.03
        request.raw_path_known = rng.random() > 0.03
        request.wsgi = wsgi
        who = principal_of(authorization, cookie) or (b"address" if request.client else b"anonymous")
        request.scope = (who, method, request.path_bytes(), logical_key(key_lines))
        return request

    def steer(self, request: Request) -> None:
        """X-Fuzz-* headers: what the app is asked to answer."""
        rng = self.rng
        headers = request.headers
        roll = rng.random()
        if roll < 0.01:
            headers.append((b"x-fuzz-raise", b"1"))
            request.asked_raise = request.asked_5xx = True
            return
        if roll < 0.12:
            status = rng.choice([200, 201, 202, 204, 301, 400, 401, 403, 404, 408, 409, 422, 425, 429, *ASKED_5XX])
            headers.append((b"x-fuzz-status", str(status).encode()))
            request.asked_5xx = status >= 500
        kind = rng.choices(
            ["json", "stream", "empty", "binary", "big", "echo", "bad-name"], weights=[70, 6, 5, 5, 4, 8, 2]
        )[0]
        headers.append((b"x-fuzz-response", kind.encode()))
        if kind == "echo":
            value = rng.choice(
                [
                    "plain",
                    "a%0D%0ASet-Cookie:%20sid=x",
                    "a%00b",
                    "a%01b",
                    "a%09b%E9",
                    "%0A",
                    quote(rng.choice(self.pools.text), errors="surrogatepass"),
                    quote_from_bytes(rng.choice(self.pools.binary)),
                ]
            )
            headers.append((b"x-fuzz-echo", value.encode("ascii")))
            echoed = unquote_to_bytes(value)
            if any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in echoed):
                request.asked_invalid = request.asked_5xx = True
        elif kind == "bad-name":
            request.asked_invalid = request.asked_5xx = True


_BARE = re.compile(rb"[\x21\x23-\x2b\x2d-\x7e]+")
_QUOTED = re.compile(rb'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')


_SCHEME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


SESSION_COOKIES = ("sessionid", "session", "remember_token", "*session*", "*sessid*", "sid", "*.sid", "*auth*")
SESSION_COOKIES += ("*jwt*", "access_token", "id_token")  # the README's default session cookie names
_SESSION = re.compile("|".join(fnmatch.translate(name) for name in SESSION_COOKIES))


def principal_of(authorization: bytes, cookie: bytes) -> bytes:
    """The credentials as the README's principal rule compares them, written apart from idempo's resolver.

    ``Authorization`` with its scheme's case folded, and the session cookies
    (the README's default names, any case), sorted; other cookies do not count.
    """
    value = authorization.strip(b" \t")
    scheme, sep, rest = value.partition(b" ")
    if sep and _SCHEME.fullmatch(scheme) is not None:
        value = scheme.lower() + b" " + rest.lstrip(b" \t")
    sessions = []
    for item in cookie.split(b";"):
        name, sep, session = item.strip().partition(b"=")
        if sep and name and _SESSION.match(name.decode("latin-1").lower()):
            sessions.append((name, session.strip()))
    if not authorization and not sessions:
        return b""
    return repr((value if authorization else None, sorted(sessions))).encode()


def logical_key(lines: list[bytes]) -> str | None:
    """The key the lines carry by the README's rules, written apart from idempo's parser; None: none or a 400."""
    if not lines or any(line != lines[0] for line in lines):
        return None
    value = lines[0].strip(b" \t")
    if _BARE.fullmatch(value):
        key = value
    elif (quoted := _QUOTED.fullmatch(value)) is not None:
        key = re.sub(rb'\\(["\\])', rb"\1", quoted.group(1))
    else:
        return None
    if not key.strip(b" ") or len(key) > 255:
        return None
    return key.decode("ascii")


def json_type(request: Request) -> bool:
    """True when the request's one Content-Type is JSON (the fingerprint canonicalises the body)."""
    lines = [v for n, v in request.headers if n == b"content-type"]
    return len(set(lines)) == 1 and b"json" in lines[0].lower() and b"," not in lines[0]


# --- the apps ----------------------------------------------------------------------------------------------


class Executions:
    """What each execution answered, by its number (kept for the last 20,000), to check replays against."""

    def __init__(self) -> None:
        self.count = 0
        self.by_number: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()

    def enter(self, request_index: int) -> int:
        self.count += 1
        self.by_number[self.count] = {"request": request_index}
        if len(self.by_number) > 20_000:
            self.by_number.popitem(last=False)
        return self.count


def answer(
    executions: Executions, headers: dict[str, str], method: str, path: str
) -> tuple[int, list[tuple[str, bytes]], list[bytes]]:
    """What the app answers: (status, header lines, body chunks), as the X-Fuzz-* headers ask."""
    headers = {name.lower(): value for name, value in headers.items()}
    if headers.get("x-fuzz-raise"):
        raise FuzzAppError("asked to raise")
    try:
        index = int(headers.get("x-fuzz-id", "-1"))
    except ValueError:
        index = -1
    number = executions.enter(index)
    status = int(headers.get("x-fuzz-status", "201"))
    kind = headers.get("x-fuzz-response", "json")
    lines: list[tuple[str, bytes]] = [("x-fuzz-exec", str(number).encode())]
    if kind == "empty":
        return (204 if status < 300 else status), lines, []
    if kind == "binary":
        return status, [*lines, ("content-type", b"application/octet-stream")], [bytes(range(256))]
    if kind == "big":
        return status, [*lines, ("content-type", b"text/plain")], [b"x" * (POLICY.max_response_body + 1)]
    if kind == "echo":
        lines.append(("x-echo", unquote_to_bytes(headers.get("x-fuzz-echo", ""))))
    if kind == "bad-name":
        lines.append(("bad name", b"v"))
    body = json.dumps({"exec": number, "method": method, "path": path}).encode()
    if kind == "stream":
        return status, [*lines, ("content-type", b"application/x-ndjson")], [body[:5], body[5:], b"\n"]
    return status, [*lines, ("content-type", b"application/json")], [body]


def starlette_app(executions: Executions) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def endpoint(request: StarletteRequest) -> Response:
        await request.body()
        status, lines, chunks = answer(executions, dict(request.headers), request.method, request.scope["path"])
        if len(chunks) > 1:

            async def stream() -> Any:
                for chunk in chunks:
                    yield chunk

            response: Response = StreamingResponse(stream(), status_code=status)
        else:
            response = Response(b"".join(chunks), status_code=status)
        response.raw_headers += [(name.encode("latin-1"), value) for name, value in lines]
        return response

    methods = ["POST", "PATCH", *METHODS]
    routes = [
        Route(path, endpoint, methods=methods)
        for path in ("/orders", "/orders/{rest:path}", "/strict/{rest:path}", "/exempt/{rest:path}")
    ]
    return Starlette(routes=routes)


def flask_app(executions: Executions) -> Any:
    from flask import Flask, Response
    from flask import request as flask_request

    app = Flask("fuzz")
    methods = ["POST", "PATCH", *METHODS]

    @app.route("/orders", methods=methods)
    @app.route("/orders/<path:rest>", methods=methods)
    @app.route("/strict/<path:rest>", methods=methods)
    @app.route("/exempt/<path:rest>", methods=methods)
    def endpoint(rest: str = "") -> Any:
        flask_request.get_data()
        status, lines, chunks = answer(
            executions, dict(flask_request.headers), flask_request.method, flask_request.path
        )
        body: Iterable[bytes] = iter(chunks) if len(chunks) > 1 else b"".join(chunks)
        response = Response(body, status=status)
        for name, value in lines:
            response.headers.add(name, value.decode("latin-1"))  # werkzeug raises for CR and LF
        return response

    return app


def django_handler(executions: Executions, store: MemoryStore) -> Any:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="idempo-fuzz",
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=["idempo.django.IdempotencyMiddleware"],
            INSTALLED_APPS=[],
            DATABASES={},
            USE_TZ=True,
            LOGGING_CONFIG=None,
            IDEMPO={"STORE": store, "POLICY": POLICY, "ROUTES": ROUTES, "SECRET": SECRET},
        )
        django.setup()
    from django.core.handlers.wsgi import WSGIHandler
    from django.http import HttpResponse, StreamingHttpResponse
    from django.urls import re_path

    def view(request: Any, rest: str = "") -> Any:
        request.body  # noqa: B018
        status, lines, chunks = answer(executions, dict(request.headers), request.method, request.path)
        response: Any
        if len(chunks) > 1:
            response = StreamingHttpResponse(iter(chunks), status=status)
        else:
            response = HttpResponse(b"".join(chunks), status=status)
        for name, value in lines:
            response.headers[name] = value.decode("latin-1")  # Django raises BadHeaderError for CR and LF
        return response

    urlpatterns[:] = [re_path(r"^(?:orders|strict|exempt)(?:/(?P<rest>.*))?$", view)]
    return WSGIHandler()


urlpatterns: list[Any] = []


# --- the fake servers --------------------------------------------------------------------------------------


def check_header(name: bytes, value: bytes) -> None:
    """Refuse what uvicorn's httptools protocol refuses: a name that is no token, a control character in a value."""
    if not name or any(byte <= 0x20 or byte >= 0x7F or chr(byte) in '()<>@,;:\\"/[]?={}' for byte in name):
        raise ServerRefused(f"invalid header name {name[:40]!r}")
    if any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in value):
        raise ServerRefused("invalid header value")


@dataclass
class Outcome:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    error: BaseException | None = None
    hung: bool = False
    errors: str = ""  # what the app wrote to wsgi.errors (Flask logs its 500s there)


async def drive_asgi(app: Any, request: Request) -> Outcome:
    outcome = Outcome()
    path_text = unquote(request.raw_path.decode("ascii"))  # as uvicorn decodes it (errors replaced)
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.root + path_text,
        "query_string": request.query,
        "root_path": request.root,
        "headers": request.headers,
        "client": ("127.0.0.1", 50000) if request.client else None,
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    if request.raw_path_known:
        scope["raw_path"] = request.root.encode() + request.raw_path
    chunks = list(request.chunks)
    if request.leave_mid_body:
        chunks = chunks[:1]
    pending = collections.deque(chunks)
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.popleft()
            more = bool(pending) or request.leave_mid_body
            return {"type": "http.request", "body": chunk, "more_body": more}
        if not request.leave_mid_body:
            await done.wait()  # a client that stays until its answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            for name, value in message.get("headers", ()):
                check_header(name, value)
            outcome.status = message["status"]
            outcome.headers = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            if request.leave_mid_response:
                done.set()
                raise OSError("client gone")  # ASGI 2.4: send raises once the client has left
            outcome.body += message.get("body", b"")
            if not message.get("more_body", False):
                outcome.complete = True
                done.set()

    try:
        async with asyncio.timeout(TIMEOUT):
            await app(scope, receive, send)
    except TimeoutError:
        outcome.hung = True
    except Exception as exc:
        outcome.error = exc
    done.set()
    return outcome


def wsgi_environ(request: Request) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": request.root,
        "PATH_INFO": unquote_to_bytes(request.raw_path).decode("latin-1"),  # PEP 3333
        "QUERY_STRING": request.query.decode("latin-1"),
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(request.body[: len(request.chunks[0])] if request.leave_mid_body else request.body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "CONTENT_LENGTH": request.content_length if request.content_length is not None else str(len(request.body)),
    }
    if request.content_length == "absent":
        del environ["CONTENT_LENGTH"]
        environ["wsgi.input_terminated"] = True
    if request.client:
        environ["REMOTE_ADDR"] = "127.0.0.1"
    folded: dict[str, str] = {}
    for name, value in request.headers:
        text = value.decode("latin-1")
        if name == b"content-type":
            key = "CONTENT_TYPE"
        elif name == b"content-length":
            continue
        else:
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        folded[key] = folded[key] + ", " + text if key in folded else text  # waitress joins repeated lines
    environ.update(folded)
    return environ


def drive_wsgi(app: Any, request: Request) -> Outcome:
    outcome = Outcome()
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None and started:
            raise exc_info[1].with_traceback(exc_info[2])
        for name, value in headers:
            if not isinstance(name, str) or not isinstance(value, str):
                raise ServerRefused("header is not str")
            check_header(name.encode("latin-1"), value.encode("latin-1"))
        outcome.status = int(status.split(" ", 1)[0])
        outcome.headers = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        started.append(True)
        return lambda data: None

    environ = wsgi_environ(request)
    DJANGO_ERRORS.text = ""
    try:
        body = app(environ, start_response)
        try:
            for index, chunk in enumerate(body):
                if request.leave_mid_response and index == 0:
                    break
                outcome.body += chunk
            else:
                outcome.complete = True
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
    except Exception as exc:
        outcome.error = exc
    outcome.errors = environ["wsgi.errors"].getvalue() + DJANGO_ERRORS.text
    return outcome


class LastError(logging.Handler):
    """Keeps the traceback of the last record logged with an exception (Django logs its 500s, prints none)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.text = "".join(traceback.format_exception(*record.exc_info))


DJANGO_ERRORS = LastError()


# --- checking and reporting ----------------------------------------------------------------------------------


@dataclass
class Report:
    front: str
    requests: int = 0
    seconds: float = 0.0
    statuses: collections.Counter[int | str] = field(default_factory=collections.Counter)
    unexpected_5xx: list[str] = field(default_factory=list)
    framework_5xx: list[str] = field(default_factory=list)
    exceptions: collections.Counter[str] = field(default_factory=collections.Counter)
    exception_examples: dict[str, str] = field(default_factory=dict)
    expected_exceptions: collections.Counter[str] = field(default_factory=collections.Counter)
    hangs: list[int] = field(default_factory=list)
    replay_anomalies: list[str] = field(default_factory=list)
    replays: int = 0
    log_outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    shown: list[int] = field(default_factory=list)

    def findings(self) -> int:
        return len(self.unexpected_5xx) + sum(self.exceptions.values()) + len(self.hangs) + len(self.replay_anomalies)


class CountingHandler(logging.Handler):
    """Counts idempo's log records by outcome (or level), printing none of them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        outcome = getattr(record, "idempo_outcome", None)
        self.counts[outcome or f"{record.levelname.lower()}: {record.getMessage()[:60]}"] += 1


def idempo_raised(exc: BaseException) -> bool:
    """True when the innermost frame of the traceback is idempo's own code."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and "/idempo/" in frames[-1].filename


def innermost(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    idempo = [f for f in frames if "/idempo/" in f.filename]
    frame = (idempo or frames)[-1] if frames else None
    where = f"{'/'.join(frame.filename.rsplit('/', 2)[-2:])}:{frame.lineno}" if frame else "?"
    return f"{type(exc).__name__} at {where}: {str(exc)[:120]}"


def check(report: Report, request: Request, outcome: Outcome, executions: Executions, invalid: set[int]) -> None:
    status = outcome.status
    report.statuses[status if status is not None else "none"] += 1
    if outcome.hung:
        report.hangs.append(request.index)
        return
    if outcome.error is not None:
        exc = outcome.error
        if isinstance(exc, FuzzAppError) and request.asked_raise:
            report.expected_exceptions["FuzzAppError (asked)"] += 1
        elif isinstance(exc, ServerRefused) and request.asked_invalid:
            report.expected_exceptions["ServerRefused (asked invalid header)"] += 1
        elif (
            type(exc).__name__ == "ClientDisconnect"
            and (request.leave_mid_body or request.leave_mid_response)
            and not idempo_raised(exc)
        ):
            report.expected_exceptions["Starlette's ClientDisconnect (the client left)"] += 1
        elif isinstance(exc, OSError) and request.leave_mid_response and str(exc) == "client gone":
            report.expected_exceptions["the server's OSError (client left mid-response)"] += 1
        else:
            label = innermost(exc)
            report.exceptions[label] += 1
            report.exception_examples.setdefault(
                label, f"request {request.index}: {''.join(traceback.format_exception(exc))}"
            )
        return
    if status is not None and status >= 500 and not request.asked_5xx:
        line = f"request {request.index}: {status} {outcome.body[:80]!r}\n{outcome.errors[-1500:]}"
        if "Traceback" in outcome.errors and "/idempo/" not in outcome.errors:
            report.framework_5xx.append(line)  # the framework's own 500, no idempo frame in its traceback
        else:
            report.unexpected_5xx.append(line)
    headers = dict(outcome.headers)
    number_text = headers.get(b"x-fuzz-exec")
    if number_text is None:
        return
    number = int(number_text)
    execution = executions.by_number.get(number)
    if headers.get(b"idempotent-replayed") != b"true":
        if execution is not None and execution["request"] == request.index:
            execution["scope"] = request.scope
            execution["sent"] = sent(request)
            if outcome.complete and not request.leave_mid_response:
                execution["answer"] = (status, outcome.body)
            if request.asked_invalid:
                invalid.add(number)
        return
    report.replays += 1
    if request.differs and (execution is None or execution.get("sent") != sent(request)):
        # Another retry changed the same way may have run first: only a replay of other bytes is wrong.
        report.replay_anomalies.append(
            f"request {request.index}: replays execution {number} (request {execution and execution['request']})"
            f" though {request.differs} differs"
        )
    if execution is None or "scope" not in execution:
        report.replay_anomalies.append(
            f"request {request.index}: replays execution {number}, which it never saw answered"
        )
        return
    if execution["scope"] != request.scope:
        report.replay_anomalies.append(
            f"request {request.index}: replays execution {number} of another scope:"
            f" {execution['scope']!r} != {request.scope!r}"
        )
    if number in invalid:
        report.replay_anomalies.append(f"request {request.index}: replays execution {number}, an invalid response")
    if "answer" in execution and outcome.complete and execution["answer"] != (status, outcome.body):
        report.replay_anomalies.append(f"request {request.index}: replay of {number} differs from its answer")


def sent(request: Request) -> tuple[bytes, tuple[bytes, ...], bytes]:
    """What a near retry may change, as sent: the query, the Content-Type lines and the body."""
    return request.query, tuple(v for n, v in request.headers if n == b"content-type"), request.body


def print_report(report: Report) -> None:
    rate = report.requests / report.seconds if report.seconds else 0.0
    print(f"== {report.front}: {report.requests:,} requests in {report.seconds:.0f} s ({rate:,.0f}/s)")
    statuses = sorted(report.statuses.items(), key=lambda item: (isinstance(item[0], str), item[0]))
    print("   statuses: " + ", ".join(f"{status}: {count:,}" for status, count in statuses))
    print(f"   replays checked: {report.replays:,}; replay anomalies: {len(report.replay_anomalies)}")
    for anomaly in report.replay_anomalies[:5]:
        print(f"     {anomaly}")
    print(f"   5xx not asked for: {len(report.unexpected_5xx)}")
    for line in report.unexpected_5xx[:5]:
        print(f"     {line}")
    if report.framework_5xx:
        print(f"   5xx the framework raised itself, no idempo frame in the traceback: {len(report.framework_5xx)}")
        for line in report.framework_5xx[:2]:
            last = line.strip().splitlines()[-1]
            print(f"     {line.splitlines()[0]} ... {last}")
    print(f"   exceptions raised out of idempo: {sum(report.exceptions.values())}")
    for label, count in report.exceptions.most_common():
        print(f"     {count:,} x {label}")
    expected = ", ".join(f"{label}: {count:,}" for label, count in report.expected_exceptions.items()) or "none"
    print(f"   exceptions the app was asked for: {expected}")
    print(f"   hangs (> {TIMEOUT:.0f} s): {len(report.hangs)}")
    logged = ", ".join(f"{name}: {count:,}" for name, count in report.log_outcomes.most_common()) or "none"
    print(f"   idempo log records at INFO and above, by outcome: {logged}")


def show(request: Request, outcome: Outcome) -> None:
    """Print one request and its answer (``--show``), to study a finding."""
    print(f"--- request {request.index}: {request.method} {request.root} {request.raw_path[:200]!r}", file=sys.stderr)
    print(f"    query {request.query[:300]!r}; differs: {request.differs or '-'}", file=sys.stderr)
    for name, value in request.headers:
        print(f"    {name.decode('latin-1')}: {value[:300]!r}", file=sys.stderr)
    print(f"    body ({len(request.body)} bytes) {request.body[:500]!r}", file=sys.stderr)
    print(f"    -> {outcome.status} {outcome.headers} {outcome.body[:300]!r} {outcome.error!r}", file=sys.stderr)


def run(
    front: str, count: int, pools: Pools, seed: int, progress: int, store_kind: str, shown: frozenset[int] = frozenset()
) -> Report:
    report = Report(front)
    generator = Generator(pools, seed * 1000 + {"asgi": 1, "wsgi": 2, "django": 3}[front])
    clock = Clock()
    executions = Executions()
    invalid: set[int] = set()
    handler = CountingHandler()
    idempo_logger = logging.getLogger("idempo")
    idempo_logger.addHandler(handler)
    idempo_logger.setLevel(logging.INFO)
    idempo_logger.propagate = False
    directory = tempfile.TemporaryDirectory(prefix="idempo-fuzz-")
    closers: list[Callable[[], None]] = []
    started = time.perf_counter()

    history: collections.OrderedDict[int, tuple[Request, Outcome]] = collections.OrderedDict()

    def observe(request: Request, outcome: Outcome) -> None:
        """Check one answer; on a finding, print the request and (for a replay) the one it replays."""
        before = report.findings()
        check(report, request, outcome, executions, invalid)
        history[request.index] = (request, outcome)
        if len(history) > 20_000:
            history.popitem(last=False)
        if report.findings() > before and len(report.shown) < 10:
            report.shown.append(request.index)
            number = dict(outcome.headers).get(b"x-fuzz-exec")
            execution = executions.by_number.get(int(number)) if number is not None else None
            if execution is not None and execution["request"] in history:
                show(*history[execution["request"]])
            show(request, outcome)

    def tick(index: int) -> None:
        clock.advance(generator.rng.random() * 0.4)
        if progress and index and index % progress == 0:
            elapsed = time.perf_counter() - started
            print(
                f"   {front}: {index:,} requests, {elapsed:.0f} s, findings so far: {report.findings()}",
                file=sys.stderr,
            )

    try:
        if front == "asgi":
            from idempo.asgi import IdempotencyMiddleware as AsgiMiddleware

            async_store: Any = AsyncMemoryStore(clock=clock)
            if store_kind == "sqlite":
                async_store = AsyncSQLiteStore(directory.name + "/asgi.db", clock=clock)
            app = AsgiMiddleware(starlette_app(executions), async_store, policy=POLICY, routes=ROUTES, secret=SECRET)

            async def loop() -> None:
                try:
                    for index in range(count):
                        request = generator.request(index, wsgi=False)
                        outcome = await drive_asgi(app, request)
                        if index in shown:
                            show(request, outcome)
                        observe(request, outcome)
                        tick(index)
                finally:
                    await async_store.aclose()

            asyncio.run(loop())
        else:
            store: Any = MemoryStore(clock=clock)
            if store_kind == "sqlite":
                store = SQLiteStore(f"{directory.name}/{front}.db", clock=clock)
            closers.append(store.close)
            if front == "wsgi":
                from idempo.flask import Idempotency

                flask = flask_app(executions)
                Idempotency(flask, store, policy=POLICY, routes=ROUTES, secret=SECRET)
                wsgi_app: Any = flask
            else:
                from django.utils.encoding import repercent_broken_unicode

                wsgi_app = django_handler(executions, store)
            for index in range(count):
                request = generator.request(index, wsgi=True)
                if front == "django":
                    # Django re-escapes path bytes that are not UTF-8 (b"\xff" -> "%FF"): its scope is that path.
                    who, method, path_bytes, key = request.scope
                    request.scope = (who, method, repercent_broken_unicode(path_bytes), key)
                outcome = drive_wsgi(wsgi_app, request)
                if index in shown:
                    show(request, outcome)
                observe(request, outcome)
                tick(index)
    finally:
        idempo_logger.removeHandler(handler)
        for close in closers:
            close()
        directory.cleanup()
    report.requests = count
    report.seconds = time.perf_counter() - started
    report.log_outcomes = handler.counts
    return report


class Clock:
    """The stores' clock: seconds since the epoch, moved only by :meth:`advance`."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--asgi", type=int, default=1_000_000, help="ASGI (Starlette) requests (default 1,000,000)")
    parser.add_argument("--wsgi", type=int, default=100_000, help="WSGI (Flask) requests (default 100,000)")
    parser.add_argument("--django", type=int, default=100_000, help="Django requests (default 100,000)")
    parser.add_argument("--seed", type=int, default=11, help="seeds the hypothesis pools and the request loop")
    parser.add_argument("--pool", type=int, default=2000, help="values drawn with hypothesis per kind (default 2000)")
    parser.add_argument("--progress", type=int, default=100_000, help="print progress every N requests (0: never)")
    parser.add_argument(
        "--store", choices=["memory", "sqlite"], default="memory", help="the store behind every front (default memory)"
    )
    parser.add_argument("--show", type=int, nargs="*", default=[], help="print these requests and their answers")
    args = parser.parse_args(argv)
    if argv is None and os.environ.get("PYTHONHASHSEED") != str(args.seed):
        # Set and dict orders of str keys follow the hash seed: pin it, so a seed replays the same run.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": str(args.seed)})
    django_logger = logging.getLogger("django")  # Django's 500s: kept to tell whose they are, not printed
    django_logger.addHandler(DJANGO_ERRORS)
    django_logger.propagate = False
    started = time.perf_counter()
    pools = fill_pools(args.seed, args.pool)
    print(
        f"fuzz: seed {args.seed}, {args.pool:,} hypothesis values per kind ({time.perf_counter() - started:.0f} s),"
        f" {args.store} store"
    )
    findings = 0
    for front in ("asgi", "wsgi", "django"):
        count = getattr(args, front)
        if count:
            report = run(front, count, pools, args.seed, args.progress, args.store, frozenset(args.show))
            print_report(report)
            findings += report.findings()
            for label, example in list(report.exception_examples.items())[:3]:
                print(f"--- first {label}\n{example}", file=sys.stderr)
    print(f"fuzz: {findings} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
