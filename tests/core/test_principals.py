"""The principal rule (idempo.principals): one rule for every front, read from a scope, an environ or a request."""

from __future__ import annotations

from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest

from idempo import principals
from idempo.principals import DEFAULT_SESSION_COOKIES, default


def scope(
    headers: dict[str, str] | list[tuple[str, str]] | None = None, client: Any = ("10.0.0.1", 5000), **extra: Any
) -> dict[str, Any]:
    """An ASGI HTTP scope."""
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in items]
    return {"type": "http", "method": "POST", "path": "/orders", "headers": raw, "client": client, **extra}


def environ(headers: dict[str, str] | None = None, remote: str | None = "10.0.0.1", **extra: Any) -> dict[str, Any]:
    """A WSGI environ (what Django's request.META is too)."""
    env: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/orders", **extra}
    if remote is not None:
        env["REMOTE_ADDR"] = remote
    for name, value in (headers or {}).items():
        env["HTTP_" + name.upper().replace("-", "_")] = value
    return env


def django_request(headers: dict[str, str] | None = None, user: Any = None) -> Any:
    """A stand-in for Django's HttpRequest: META and user."""
    return SimpleNamespace(META=environ(headers), user=user)


FRONTS = [
    pytest.param(lambda h: scope(h), id="asgi"),
    pytest.param(lambda h: environ(h), id="wsgi"),
    pytest.param(lambda h: django_request(h), id="django"),
]


@pytest.mark.parametrize("make", FRONTS)
def test_different_session_cookies_are_different_principals(make: Any) -> None:
    """B11: two users behind one address, told apart by their session cookie, whatever the front."""
    alice = default(make({"cookie": "sessionid=alice-session"}))
    bob = default(make({"cookie": "sessionid=bob-session"}))
    assert alice.startswith("cred:")
    assert bob.startswith("cred:")
    assert alice != bob
    assert "alice" not in alice


@pytest.mark.parametrize("make", FRONTS)
def test_placeholder_authorization_with_different_cookies_are_different_principals(make: Any) -> None:
    """``Authorization: Bearer null`` from two users with different session cookies: two principals."""
    a = default(make({"authorization": "Bearer null", "cookie": "session=a"}))
    b = default(make({"authorization": "Bearer null", "cookie": "session=b"}))
    assert a != b
    assert a != default(make({"authorization": "Bearer null"}))


@pytest.mark.parametrize("make", FRONTS)
def test_auth_scheme_is_case_insensitive_the_token_is_not(make: Any) -> None:
    """RFC 9110 section 11.1: ``bearer`` and ``Bearer`` are one scheme; the token itself keeps its case."""
    upper = default(make({"authorization": "Bearer Tok"}))
    assert default(make({"authorization": "bearer Tok"})) == upper
    assert default(make({"authorization": "BEARER   Tok"})) == upper
    assert default(make({"authorization": "Bearer tok"})) != upper


@pytest.mark.parametrize("make", FRONTS)
def test_other_cookies_do_not_change_the_principal(make: Any) -> None:
    """Analytics, CSRF and stickiness cookies change without the user changing: they are left out."""
    base = default(make({"cookie": "sessionid=s1"}))
    assert default(make({"cookie": "_ga=GA1.2.3; sessionid=s1; csrftoken=x; AWSALB=y"})) == base
    assert default(make({"cookie": "csrftoken=x"})) == default(make({}))


def test_default_session_cookie_names_cover_the_frameworks() -> None:
    """Django's sessionid, Flask/Starlette/Litestar's session, Flask-Login's remember_token, and other stacks'."""
    for name in ["sessionid", "session", "remember_token", "JSESSIONID", "PHPSESSID", "connect.sid", "_app_session"]:
        with_cookie = default(environ({"cookie": f"{name}=v"}))
        assert with_cookie.startswith("cred:"), name
    assert "sessionid" in DEFAULT_SESSION_COOKIES


def test_cookie_lines_and_order_do_not_matter_on_asgi() -> None:
    """HTTP/2 sends one Cookie line per cookie; the order of the cookies does not change the principal."""
    one_line = default(scope({"cookie": "session=a; remember_token=b"}))
    two_lines = default(scope([("cookie", "remember_token=b"), ("cookie", "session=a")]))
    assert one_line == two_lines


def test_without_credentials_the_address_then_anonymous() -> None:
    """B11: no credentials: the client's address; no address either (a unix socket): ``anonymous``."""
    assert default(scope()) == "addr:10.0.0.1"
    assert default(environ()) == "addr:10.0.0.1"
    assert default(scope(client=None)) == "anonymous"
    assert default(environ(remote=None)) == "anonymous"
    # With a session cookie, a unix-socket client is still told apart from another.
    assert default(scope({"cookie": "session=a"}, client=None)) != default(scope({"cookie": "session=b"}, client=None))


def test_framework_user_wins_over_credentials() -> None:
    """The user the framework authenticated is the principal, whatever token or cookie the retry carries."""
    user = SimpleNamespace(is_authenticated=True, identity="42")
    first = default(scope({"authorization": "Bearer old"}, user=user))
    refreshed = default(scope({"authorization": "Bearer new", "cookie": "session=x"}, user=user))
    assert first == refreshed == "user:42"
    django_user = SimpleNamespace(is_authenticated=True, pk=7)
    assert default(django_request({"authorization": "Bearer t"}, user=django_user)) == "user:7"
    assert default(environ({"authorization": "Bearer t"}, REMOTE_USER="carol")) == "user:carol"


def test_unauthenticated_or_unreadable_users_fall_back_to_credentials() -> None:
    """Starlette's UnauthenticatedUser, a user without an id: the credentials decide, never one shared bucket."""
    from starlette.authentication import SimpleUser, UnauthenticatedUser

    anonymous = default(scope({"cookie": "session=a"}, user=UnauthenticatedUser()))
    assert anonymous.startswith("cred:")
    assert default(scope(user=SimpleUser("alice"))) == "user:alice"
    assert default(scope({"cookie": "session=a"}, user=object())).startswith("cred:")
    assert default(scope(user={"id": 5})) == "user:5"
    assert default(scope(user="bob")) == "user:bob"
    assert default(django_request({"cookie": "sessionid=s"}, user=SimpleNamespace(is_authenticated=False))).startswith(
        "cred:"
    )


def test_handed_over_user_on_wsgi() -> None:
    """A front hands over the framework's user (Flask-Login) as a str or a callable, read only when asked."""
    calls: list[int] = []

    def lookup() -> str | None:
        calls.append(1)
        return "9"

    assert default(environ(**{principals.USER_ENVIRON_KEY: lookup})) == "user:9"
    assert calls == [1]
    assert default(environ(**{principals.USER_ENVIRON_KEY: lambda: None})) == "addr:10.0.0.1"


def test_standard_takes_other_cookie_names() -> None:
    """``standard(session_cookies=...)``: the app's own login cookie counts; the defaults can be dropped."""
    mine = principals.standard(session_cookies=(*DEFAULT_SESSION_COOKIES, "login"))
    assert mine(environ({"cookie": "login=a"})) != mine(environ({"cookie": "login=b"}))
    assert default(environ({"cookie": "login=a"})) == default(environ({"cookie": "login=b"}))
    only_mine = principals.standard(session_cookies=["login"])
    assert only_mine(environ({"cookie": "sessionid=a"})) == "addr:10.0.0.1"
    with pytest.raises(TypeError):
        principals.standard(session_cookies="login")


def test_from_header() -> None:
    """A gateway's identity header; None (400) without it."""
    resolve = principals.from_header("X-User-Id")
    assert resolve(scope({"x-user-id": "u1"})) == "hdr:u1"
    assert resolve(environ({"x-user-id": "u1"})) == "hdr:u1"
    assert resolve(django_request({"x-user-id": "u1"})) == "hdr:u1"
    assert resolve(scope()) is None
    assert resolve(scope({"x-user-id": " "})) is None


def test_from_claim_uses_only_verified_claims() -> None:
    """A JWT app: the verified ``sub`` is the principal across token refresh; an invalid token gets None (400)."""
    tokens = {"t1": {"sub": "alice"}, "t2": {"sub": "alice"}, "t3": {"sub": "bob"}}

    def verify(token: str) -> dict[str, str]:
        return tokens[token]  # KeyError: not a valid token

    resolve = principals.from_claim(verify)
    assert resolve(scope({"authorization": "Bearer t1"})) == "claim:alice"
    assert resolve(environ({"authorization": "bearer t2"})) == "claim:alice"
    assert resolve(django_request({"authorization": "Bearer t3"})) == "claim:bob"
    assert resolve(scope({"authorization": "Bearer forged"})) is None
    assert resolve(scope({"authorization": "Basic dTpw"})) is None
    assert resolve(scope()) is None
    assert principals.from_claim(lambda token: {"sub": ""})(scope({"authorization": "Bearer x"})) is None
    assert principals.from_claim(lambda token: None)(scope({"authorization": "Bearer x"})) is None


def test_from_user_and_first() -> None:
    """``from_user``: only a framework user (None without); ``first``: the first resolver that finds one."""
    user = SimpleNamespace(is_authenticated=True, id=3)
    assert principals.from_user()(scope(user=user)) == "user:3"
    assert principals.from_user()(scope({"cookie": "session=a"})) is None
    either = principals.first(principals.from_user(), default)
    assert either(scope(user=user)) == "user:3"
    assert either(scope()) == "addr:10.0.0.1"
    with pytest.raises(ValueError, match="at least one"):
        principals.first()


def test_credentials_never_show_the_credentials() -> None:
    """The digest hides the token; the same credentials give the same digest."""
    digest = principals.credentials(environ({"authorization": "Basic aHVudGVyMg=="}))
    assert digest is not None
    assert "aHVudGVyMg" not in digest
    assert digest == principals.credentials(scope({"authorization": "Basic aHVudGVyMg=="}))
    assert principals.credentials(environ()) is None


def test_an_unknown_request_type_is_a_type_error() -> None:
    """A resolver handed something that is no request says so."""
    with pytest.raises(TypeError):
        default(42)


# --- review findings: credentials beyond Authorization, placeholders, identifying attributes, legacy lookups ---


@pytest.mark.parametrize("make", FRONTS)
@pytest.mark.parametrize(
    "header", ["X-API-Key", "Api-Key", "X-Auth-Token", "X-Access-Token", "apikey", "X-Goog-Api-Key", "X-Session-Id"]
)
def test_api_key_and_token_headers_are_credentials(make: Any, header: str) -> None:
    """Review r01: two API clients at one address who differ only in an API-key or token header are two principals."""
    alice = default(make({header: "key-alice-7f3a"}))
    bob = default(make({header: "key-bob-19c2"}))
    assert alice.startswith("cred:")
    assert alice != bob
    assert default(make({header: "key-alice-7f3a"})) == alice


@pytest.mark.parametrize("make", FRONTS)
@pytest.mark.parametrize(
    "placeholder", ["Bearer null", "Bearer undefined", "Bearer", "bearer ", "null", "Bearer [object Object]"]
)
def test_a_placeholder_authorization_carries_no_identity(make: Any, placeholder: str) -> None:
    """Review r01: ``Bearer null`` is no credential: alone it is the address; beside an API key, the key decides."""
    assert default(make({"authorization": placeholder})) == "addr:10.0.0.1"
    with_key = default(make({"authorization": placeholder, "x-api-key": "key-alice"}))
    assert with_key == default(make({"x-api-key": "key-alice"}))
    assert with_key != default(make({"authorization": placeholder, "x-api-key": "key-bob"}))
    assert default(make({"x-api-key": "undefined"})) == "addr:10.0.0.1"


def test_a_placeholder_is_never_shared_across_addresses() -> None:
    """Two anonymous callers who both send ``Bearer null`` from two addresses are two principals (their addresses)."""
    one = default(scope({"authorization": "Bearer null"}, client=("10.0.0.1", 1)))
    two = default(scope({"authorization": "Bearer null"}, client=("10.0.0.2", 1)))
    assert (one, two) == ("addr:10.0.0.1", "addr:10.0.0.2")


@pytest.mark.parametrize("make", FRONTS)
@pytest.mark.parametrize("cookie", ["token", "access-token", "koa.sess", "next-auth.session-token", "auth_jwt"])
def test_token_and_session_cookies_are_credentials(make: Any, cookie: str) -> None:
    """Litestar's JWT cookie ``token``, fastapi-login's ``access-token``, ``koa.sess``: two users, two principals."""
    assert default(make({"cookie": f"{cookie}=alice"})) != default(make({"cookie": f"{cookie}=bob"}))
    assert default(make({"cookie": f"{cookie}=null"})) == "addr:10.0.0.1"


@pytest.mark.parametrize("make", FRONTS)
def test_csrf_tracing_and_analytics_do_not_change_the_principal(make: Any) -> None:
    """A retry whose CSRF token, trace id or analytics cookie changed is the same caller."""
    base = default(make({"x-api-key": "k1", "cookie": "sessionid=s"}))
    retry = default(
        make(
            {
                "x-api-key": "k1",
                "cookie": "sessionid=s; csrftoken=new; XSRF-TOKEN=new; _hjSession_1=x; ai_session=y",
                "x-csrftoken": "new",
                "x-xsrf-token": "new",
                "traceparent": "00-1-2-01",
                "x-request-id": "r2",
            }
        )
    )
    assert retry == base


def test_credential_lists_can_be_changed() -> None:
    """``standard(credential_headers=..., not_credentials=..., placeholders=...)``; a lone string is refused."""
    mine = principals.standard(credential_headers=["x-tenant-key"])
    assert mine(environ({"x-tenant-key": "a"})) != mine(environ({"x-tenant-key": "b"}))
    assert mine(environ({"x-api-key": "a"})) == "addr:10.0.0.1"
    nonce_free = principals.standard(not_credentials=(*principals.DEFAULT_NOT_CREDENTIALS, "x-auth-nonce"))
    assert nonce_free(scope({"x-auth-nonce": "1"})) == nonce_free(scope({"x-auth-nonce": "2"}))
    strict = principals.standard(placeholders=())
    assert strict(scope({"authorization": "Bearer null"})).startswith("cred:")
    for name in ("credential_headers", "not_credentials", "placeholders"):
        with pytest.raises(TypeError):
            principals.standard(**{name: "x"})


def test_bearer_and_session_cookie_principals_are_those_of_before_api_keys_counted() -> None:
    """A bearer token or a session cookie alone has the digest input it had: a retry across the upgrade replays."""
    import hashlib

    def old(parts: list[bytes]) -> str:
        digest = hashlib.sha256()
        for part in parts:
            digest.update(b"%d:" % len(part) + part)
        return "cred:" + digest.hexdigest()[:32]

    assert default(scope({"authorization": "Bearer T"})) == old([b"abearer T"])
    assert default(scope({"cookie": "sessionid=s"})) == old([b"csessionid=s"])


def test_a_user_is_identified_only_by_identifying_attributes() -> None:
    """Review r23: two users named "Alex Smith" whose ids idempo cannot read are told apart by their credentials."""
    from starlette.authentication import BaseUser

    class NamedOnly(BaseUser):
        def __init__(self, name: str) -> None:
            self.name = name

        @property
        def is_authenticated(self) -> bool:
            return True

        @property
        def display_name(self) -> str:
            return self.name

    one = default(scope({"cookie": "sessionid=tok-1"}, user=NamedOnly("Alex Smith")))
    two = default(scope({"cookie": "sessionid=tok-2"}, user=NamedOnly("Alex Smith")))
    assert one.startswith("cred:")
    assert one != two
    assert default(scope(user=SimpleNamespace(is_authenticated=True, display_name="Alex"))) == "addr:10.0.0.1"
    assert default(scope(user=SimpleNamespace(is_authenticated=True, name="Alex", email="a@x"))) == "addr:10.0.0.1"


def test_identifying_attributes_in_order() -> None:
    """``identity`` (Starlette), ``get_id()`` (Flask-Login), ``id``, ``pk``, ``username``; a raising one is skipped."""
    flask_login = pytest.importorskip("flask_login")

    class LoginUser(flask_login.UserMixin):  # type: ignore[misc]
        def __init__(self, user_id: int) -> None:
            self.id = user_id

    assert default(scope(user=LoginUser(12))) == "user:12"

    class Custom:
        is_authenticated = True

        def get_id(self) -> str:
            return "g-1"

    assert default(scope(user=Custom())) == "user:g-1"
    assert default(scope(user=SimpleNamespace(is_authenticated=True, pk=4, username="x"))) == "user:4"
    assert default(scope(user=SimpleNamespace(is_authenticated=True, username="ann"))) == "user:ann"

    class Broken:
        is_authenticated = True

        def get_id(self) -> str:
            raise NotImplementedError

    assert default(scope({"cookie": "session=a"}, user=Broken())).startswith("cred:")


LEGACY_CASES = [
    pytest.param({}, None, "addr:10.0.0.1", id="anonymous: the address, as then"),
    pytest.param({"authorization": "Bearer T"}, None, "bearer", id="one bearer token: its old digest"),
    pytest.param({"authorization": "Bearer null"}, None, None, id="a placeholder bearer, shared then"),
    pytest.param({"authorization": "Bearer null", "x-api-key": "k"}, None, None, id="an API key, ignored then"),
    pytest.param({"x-api-key": "k"}, None, None, id="an API key alone, scoped by address then"),
    pytest.param({"authorization": "Bearer T", "x-api-key": "k"}, None, None, id="bearer and API key"),
    pytest.param({"cookie": "token=t"}, None, None, id="a token cookie"),
    pytest.param({"x-api-key": "k"}, "alice", None, id="a framework user, scoped by address then"),
    pytest.param({}, "alice", None, id="a framework user without credentials"),
]


@pytest.mark.parametrize(("headers", "user", "expected"), LEGACY_CASES)
def test_legacy_lookups_only_where_the_old_rule_kept_callers_apart(
    headers: dict[str, str], user: str | None, expected: str | None
) -> None:
    """Review r19: the legacy window looks an old record up only where the old principal was no coarser than today's."""
    import hashlib

    request = scope(headers, user=SimpleNamespace(is_authenticated=True, identity=user) if user else None)
    if expected == "bearer":
        expected = "cred:" + hashlib.sha256(b"Bearer T").hexdigest()[:32]
    assert principals.legacy_principal(request, default, default(request)) == expected
    wsgi = environ(headers, **({"REMOTE_USER": user} if user else {}))
    assert principals.legacy_principal(wsgi, default, default(wsgi)) == expected


def test_legacy_lookup_of_a_django_user_is_its_user() -> None:
    """Django's user was the principal then too: ``user:<pk>``, whatever credentials it carries."""
    request = django_request({"x-api-key": "k"}, user=SimpleNamespace(is_authenticated=True, pk=7))
    assert principals.legacy_principal(request, default, default(request)) == "user:7"


@pytest.mark.parametrize(
    "request_scope",
    [
        pytest.param(scope(), id="address"),
        pytest.param(scope(client=None), id="anonymous"),
        pytest.param(scope({"authorization": "Bearer abc"}), id="bearer"),
        pytest.param(scope({"authorization": "Bearer null", "cookie": "session=a; theme=dark"}), id="placeholder"),
        pytest.param(scope({"X-API-Key": "k1", "Cookie": "sessionid=s"}), id="api-key-and-cookie"),
        pytest.param(scope({"x-csrf-token": "t"}), id="not-a-credential"),
        pytest.param(scope(user=SimpleNamespace(identity="alice", is_authenticated=True)), id="user"),
        pytest.param(
            scope({"authorization": "Bearer a"}, user=SimpleNamespace(is_authenticated=False)), id="anon-user"
        ),
    ],
)
def test_a_scope_read_in_one_pass_gives_the_principal_of_the_generic_rule(request_scope: dict[str, Any]) -> None:
    """An ASGI scope (a dict) takes the resolver's one-pass reading; any other mapping the generic one: one rule."""
    generic = MappingProxyType(request_scope)
    assert default(request_scope) == default(generic)
    assert default(request_scope) == principals.standard()(generic)
