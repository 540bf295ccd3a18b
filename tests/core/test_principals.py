"""The principal rule (idempo.principals): one rule for every front, read from a scope, an environ or a request."""

from __future__ import annotations

from types import SimpleNamespace
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
