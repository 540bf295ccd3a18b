"""The JWT principal of a route: only a verified token's claim, and a clear refusal otherwise.

Key pairs are generated here; the JWK Set comes from a file, a key file or a
URL served on loopback.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from idempo.proxy.config import JWTScope, ProxyConfigError, load_config
from idempo.proxy.principal import JWTPrincipalResolver, KeysUnavailable, PrincipalRejected, load_keys
from tests.support.servers import free_port

AUDIENCE = "payments"
ISSUER = "https://idp.example/"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """The issuer's RSA signing key (generated once for the module)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    """A forger's RSA key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks_of(*pairs: tuple[str, rsa.RSAPrivateKey]) -> dict[str, Any]:
    """A JWK Set of these keys' public halves, by kid."""
    keys = []
    for kid, key in pairs:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "use": "sig"})
    return {"keys": keys}


def token(key: Any, *, kid: str | None = "k1", algorithm: str = "RS256", **claims: Any) -> str:
    """A signed token: sub user-1, aud payments, an hour to live, unless overridden (None removes a claim)."""
    payload = {"sub": "user-1", "aud": AUDIENCE, "exp": int(time.time()) + 3600, **claims}
    payload = {name: value for name, value in payload.items() if value is not None}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def scope_of(tmp_path: Path, scope_toml: str, files: dict[str, str | bytes] | None = None) -> JWTScope:
    """Load a configuration with this JWT scope on a route (files written beside it) and return the scope."""
    for name, content in (files or {}).items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    config_path = tmp_path / "idempo-proxy.toml"
    config_path.write_text(
        f'[proxy]\nupstream = "http://127.0.0.1:8000"\n[[route]]\npath = "/v1/payments"\nscope = {scope_toml}\n'
    )
    settings = load_config(config_path, environ={}).routes[0].settings
    assert settings is not None
    assert isinstance(settings.scope, JWTScope)
    return settings.scope


@pytest.fixture
def resolver(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> JWTPrincipalResolver:
    """A resolver over a JWK Set file with the issuer's key as k1, audience payments."""
    scope = scope_of(
        tmp_path,
        '{ from = "jwt", claim = "sub", jwks_file = "jwks.json", audience = "payments" }',
        {"jwks.json": json.dumps(jwks_of(("k1", rsa_key)))},
    )
    return JWTPrincipalResolver(scope)


def rejected(resolve: Callable[[], object]) -> PrincipalRejected:
    """The PrincipalRejected ``resolve()`` raises."""
    with pytest.raises(PrincipalRejected) as info:
        resolve()
    assert info.value.status_code == 401
    return info.value


def test_a_verified_token_gives_its_claim(resolver: JWTPrincipalResolver, rsa_key: rsa.RSAPrivateKey) -> None:
    """A token signed by a configured key, for our audience and unexpired, gives its sub."""
    assert resolver.resolve("Bearer " + token(rsa_key)) == "user-1"
    assert resolver.resolve("bearer  " + token(rsa_key, sub="user-2")) == "user-2"


def test_the_sample_jwks_loads_and_refuses_a_forged_token(rsa_key: rsa.RSAPrivateKey) -> None:
    """The shipped example's JWK Set loads; a token from another key is refused, not read."""
    config = load_config(Path(__file__).resolve().parents[2] / "examples" / "proxy" / "idempo-proxy.toml", environ={})
    settings = config.routes[0].settings
    assert settings is not None
    assert isinstance(settings.scope, JWTScope)
    resolver = JWTPrincipalResolver(settings.scope)
    forged = token(rsa_key, kid="example-2026")
    error = rejected(lambda: resolver.resolve("Bearer " + forged))
    assert error.reason in ("bad-algorithm", "bad-signature")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda key, other: None, "missing-token", id="no-header"),
        pytest.param(lambda key, other: "Basic dXNlcjpwdw==", "not-bearer", id="basic"),
        pytest.param(lambda key, other: "Bearer", "not-bearer", id="empty-bearer"),
        pytest.param(lambda key, other: "Bearer not.a.jwt", "malformed", id="garbage"),
        pytest.param(lambda key, other: "Bearer " + token(key, exp=int(time.time()) - 60), "expired", id="expired"),
        pytest.param(
            lambda key, other: "Bearer " + token(key, nbf=int(time.time()) + 600), "not-yet-valid", id="not-yet"
        ),
        pytest.param(lambda key, other: "Bearer " + token(key, aud="refunds"), "wrong-audience", id="audience"),
        pytest.param(lambda key, other: "Bearer " + token(key, aud=None), "missing-claim", id="no-audience"),
        pytest.param(lambda key, other: "Bearer " + token(key, exp=None), "missing-claim", id="no-exp"),
        pytest.param(lambda key, other: "Bearer " + token(key, sub=None), "missing-claim", id="no-sub"),
        pytest.param(lambda key, other: "Bearer " + token(key, sub=""), "bad-claim", id="empty-sub"),
        pytest.param(lambda key, other: "Bearer " + token(key, sub=["a"]), "bad-claim", id="list-sub"),
        pytest.param(lambda key, other: "Bearer " + token(other), "bad-signature", id="forged-same-kid"),
        pytest.param(lambda key, other: "Bearer " + token(key, kid="k9"), "unknown-key", id="unknown-kid"),
        pytest.param(lambda key, other: "Bearer " + token(None, algorithm="none"), "bad-algorithm", id="alg-none"),
        pytest.param(
            lambda key, other: "Bearer " + token(b"x" * 32, algorithm="HS256"), "bad-algorithm", id="hmac-confusion"
        ),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(
    resolver: JWTPrincipalResolver,
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
    make: Callable[[Any, Any], str | None],
    reason: str,
) -> None:
    """Each way a token can fail is a PrincipalRejected (401) with a stable reason, never the token in the message."""
    authorization = make(rsa_key, other_rsa_key)
    error = rejected(lambda: resolver.resolve(authorization))
    assert error.reason == reason
    if authorization and " " in authorization:
        assert authorization.split(" ", 1)[1] not in str(error)


def test_leeway_allows_clock_skew(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """leeway accepts a token expired by less than it."""
    scope = scope_of(
        tmp_path,
        '{ from = "jwt", jwks_file = "jwks.json", audience = "payments", leeway = "2m" }',
        {"jwks.json": json.dumps(jwks_of(("k1", rsa_key)))},
    )
    assert JWTPrincipalResolver(scope).resolve_token(token(rsa_key, exp=int(time.time()) - 60)) == "user-1"


def test_issuer_and_audience_lists(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """An audience list accepts any of its values; an issuer is required when configured."""
    scope = scope_of(
        tmp_path,
        f'{{ from = "jwt", jwks_file = "jwks.json", audience = ["a", "payments"], issuer = "{ISSUER}" }}',
        {"jwks.json": json.dumps(jwks_of(("k1", rsa_key)))},
    )
    resolver = JWTPrincipalResolver(scope)
    assert resolver.resolve_token(token(rsa_key, iss=ISSUER)) == "user-1"
    assert rejected(lambda: resolver.resolve_token(token(rsa_key, iss="https://evil/"))).reason == "wrong-issuer"
    assert rejected(lambda: resolver.resolve_token(token(rsa_key))).reason == "missing-claim"


def test_issuer_only_accepts_tokens_that_carry_an_audience(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """With an issuer and no audience configured, a token's aud is not held against it."""
    scope = scope_of(
        tmp_path,
        f'{{ from = "jwt", claim = "tenant", jwks_file = "jwks.json", issuer = "{ISSUER}" }}',
        {"jwks.json": json.dumps(jwks_of(("k1", rsa_key)))},
    )
    assert JWTPrincipalResolver(scope).resolve_token(token(rsa_key, iss=ISSUER, tenant=42)) == "42"


def test_jwks_picks_the_key_by_kid(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    """With several keys, the token's kid picks one; a token without kid is refused."""
    scope = scope_of(
        tmp_path,
        '{ from = "jwt", jwks_file = "jwks.json", audience = "payments" }',
        {"jwks.json": json.dumps(jwks_of(("k1", rsa_key), ("k2", other_rsa_key)))},
    )
    resolver = JWTPrincipalResolver(scope)
    assert resolver.resolve_token(token(other_rsa_key, kid="k2", sub="two")) == "two"
    assert rejected(lambda: resolver.resolve_token(token(rsa_key, kid=None))).reason == "unknown-key"
    assert set(load_keys(scope)) == {"k1", "k2"}


def test_key_file_with_an_ec_public_key(tmp_path: Path) -> None:
    """key_file takes a PEM public key; the algorithms that fit it (ES256) verify, whatever the kid."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    scope = scope_of(tmp_path, '{ from = "jwt", key_file = "issuer.pem", audience = "payments" }', {"issuer.pem": pem})
    assert load_keys(scope)[None].algorithms == ("ES256",)
    assert JWTPrincipalResolver(scope).resolve_token(token(key, kid="any", algorithm="ES256")) == "user-1"


def test_key_file_with_an_hmac_secret(tmp_path: Path) -> None:
    """HS256 takes the secret's bytes from key_file (a trailing newline dropped)."""
    secret = b"s" * 32
    scope = scope_of(
        tmp_path,
        '{ from = "jwt", key_file = "secret", audience = "payments", algorithms = ["HS256"] }',
        {"secret": secret + b"\n"},
    )
    assert JWTPrincipalResolver(scope).resolve_token(token(secret, algorithm="HS256")) == "user-1"


@pytest.mark.parametrize(
    ("scope", "files", "message"),
    [
        pytest.param(
            '{ from = "jwt", key_file = "secret", audience = "a", algorithms = ["HS256"] }',
            {"secret": b"short\n"},
            "the HMAC secret is 5 bytes; HS256 needs 32 or more",
            id="short-secret",
        ),
        pytest.param(
            '{ from = "jwt", key_file = "issuer.pem", audience = "a" }',
            {"issuer.pem": "PRIVATE"},
            "this file holds a private key: give the proxy the public key only",
            id="private-key",
        ),
        pytest.param(
            '{ from = "jwt", key_file = "issuer.pem", audience = "a", algorithms = ["HS256", "RS256"] }',
            {"issuer.pem": "x"},
            "expected HMAC (HS*) or asymmetric algorithms, not both",
            id="mixed-algorithms",
        ),
        pytest.param(
            '{ from = "jwt", jwks_file = "jwks.json", audience = "a", algorithms = ["HS256"] }',
            {"jwks.json": "{}"},
            "HMAC (HS*) algorithms need key_file",
            id="hmac-with-jwks",
        ),
        pytest.param(
            '{ from = "jwt", jwks_file = "jwks.json", audience = "a" }',
            {"jwks.json": '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'},
            "the JWK Set holds no signing key",
            id="jwks-only-secrets",
        ),
        pytest.param(
            '{ from = "jwt", jwks_file = "jwks.json", audience = "a" }',
            {"jwks.json": "not json"},
            "expected a JWK Set (JSON)",
            id="jwks-not-json",
        ),
        pytest.param(
            '{ from = "jwt", jwks_file = "jwks.json", key_file = "k.pem", audience = "a" }',
            {"jwks.json": "{}", "k.pem": "x"},
            "expected one key source",
            id="two-sources",
        ),
        pytest.param(
            '{ from = "jwt", jwks_file = "jwks.json", audience = "a", algorithms = ["none"] }',
            {"jwks.json": "{}"},
            'algorithms[0] = "none": expected one of',
            id="alg-none",
        ),
    ],
)
def test_unusable_keys_are_load_errors(tmp_path: Path, scope: str, files: dict[str, str | bytes], message: str) -> None:
    """A key file that cannot verify the configured algorithms stops the load, naming the key."""
    if files.get("issuer.pem") == "PRIVATE":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        files = {
            "issuer.pem": private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        }
    with pytest.raises(ProxyConfigError) as info:
        scope_of(tmp_path, scope, files)
    assert info.value.key.startswith("route[0].scope")
    assert message in str(info.value)


class _JWKSHandler(http.server.BaseHTTPRequestHandler):
    body = b"{}"
    fetches = 0

    def do_GET(self) -> None:
        type(self).fetches += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def jwks_server(rsa_key: rsa.RSAPrivateKey) -> Iterator[tuple[str, type[_JWKSHandler]]]:
    """A JWK Set served on loopback: (its URL, its handler class, which counts fetches)."""
    handler = type("Handler", (_JWKSHandler,), {"body": json.dumps(jwks_of(("k1", rsa_key))).encode(), "fetches": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_jwks_url_is_fetched_once_and_cached(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, jwks_server: tuple[str, type[_JWKSHandler]]
) -> None:
    """A jwks_url scope fetches the JWK Set, then verifies from the cache; aresolve works from async code."""
    url, handler = jwks_server
    scope = scope_of(tmp_path, f'{{ from = "jwt", jwks_url = "{url}", audience = "payments" }}')
    resolver = JWTPrincipalResolver(scope)
    assert resolver.resolve("Bearer " + token(rsa_key)) == "user-1"
    assert anyio.run(resolver.aresolve, "Bearer " + token(rsa_key, sub="user-3")) == "user-3"
    assert handler.fetches == 1


def test_jwks_url_down_is_unavailable_not_rejected(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """When the JWK Set URL cannot be fetched, the answer is KeysUnavailable (503), not a 401 for the client."""
    url = f"http://127.0.0.1:{free_port()}/jwks.json"
    scope = scope_of(tmp_path, f'{{ from = "jwt", jwks_url = "{url}", audience = "payments", jwks_timeout = 2 }}')
    with pytest.raises(KeysUnavailable) as info:
        JWTPrincipalResolver(scope).resolve("Bearer " + token(rsa_key))
    assert info.value.status_code == 503
    assert url in str(info.value)
