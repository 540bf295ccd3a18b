"""Who sent a request: the principal an idempotency key is scoped to (DESIGN "principal", guarantee 4).

A key is unique per principal, method and route, and a response is never
replayed to another principal. Every front (ASGI, Starlette, FastAPI,
Litestar, WSGI, Flask, Django) resolves the principal here, by one rule,
unless the app passes a resolver of its own (``principal=``):

1. **The user the framework already authenticated**: Django's
   ``request.user``; ``scope["user"]`` on ASGI (Starlette's and FastAPI's
   ``AuthenticationMiddleware``, Litestar's authentication middleware), when
   it is authenticated; Flask-Login's user (the ``_user_id`` it keeps in
   Flask's session); ``REMOTE_USER`` on WSGI (set by the server, CGI's rule).
   ``"user:<id>"``. The same user with a refreshed token or a new session is
   the same principal.
2. **A digest of the credentials**: every request header whose name matches
   :data:`DEFAULT_CREDENTIAL_HEADERS` (``Authorization``, ``X-API-Key``,
   ``X-Auth-Token``, ...; the auth scheme case-insensitive, RFC 9110
   section 11.1) and every cookie whose name matches
   :data:`DEFAULT_SESSION_COOKIES` (``sessionid``, ``session``, ``token``,
   ``access-token``, ``koa.sess``, ...), less the names that match
   :data:`DEFAULT_NOT_CREDENTIALS` (CSRF tokens, analytics), all together:
   two callers who differ in any of them are two principals, whatever their
   address. A value that is a known placeholder
   (:data:`DEFAULT_PLACEHOLDERS`: ``Authorization: Bearer null``, an empty
   bearer, ``X-API-Key: undefined``, what a logged-out browser app sends)
   carries no identity and counts as absent, so two anonymous callers who
   both send one are still told apart by their address. ``"cred:<32
   hex>"``. The digest only ever feeds the record key and the log hashes,
   which are keyed with the server secret (DESIGN "digest at rest"); it is
   never stored or logged itself. It changes when a token or a session
   cookie changes: see "Token refresh" below. All four lists can be changed
   with :func:`standard`.
3. **The client address** as the server reports it (``"addr:<host>"``; behind
   a proxy, have the server report the real client's).
4. ``"anonymous"``: no identity at all (uvicorn on a unix socket with a
   credential-less client).

Other headers and cookies (analytics, CSRF tokens, load-balancer stickiness,
tracing) are left out: they change without the user changing, and a retry
would then be a new principal and execute again.

Ready resolvers, for ``principal=`` on any front (each takes whatever the
front passes: an ASGI scope, a WSGI environ or a Django ``HttpRequest``):

- :func:`from_user`: only the framework's authenticated user; a request
  without one is answered 400 (``principal-required``).
- :func:`from_claim`: a claim (``sub``) of a bearer token that the app's own
  verifier has checked, e.g. a JWT: the principal of an API authenticated by
  tokens, stable across token refresh.
- :func:`from_header`: a header set by a trusted gateway that authenticated
  the caller (``X-User-Id``); only where the gateway strips client copies.
- :func:`standard`: the default rule with other lists of credential headers,
  session cookies, names that are not credentials, or placeholders.
- :func:`first`: the first of several resolvers that finds an identity.

Token refresh: where the framework does not tell who the user is, the
principal is the credentials' digest, so a client that retries with a
refreshed token (or a rotated session cookie) is a new principal and its
retry executes again. A cookie-session app should let the framework's
authentication run before idempo (the default then uses its user) or pass
:func:`from_user`; a JWT app should pass :func:`from_claim` with its verifier.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_CREDENTIAL_HEADERS",
    "DEFAULT_NOT_CREDENTIALS",
    "DEFAULT_PLACEHOLDERS",
    "DEFAULT_SESSION_COOKIES",
    "USER_ENVIRON_KEY",
    "Resolver",
    "client_address",
    "credentials",
    "default",
    "first",
    "flask_login_user",
    "framework_user",
    "from_claim",
    "from_header",
    "from_user",
    "header_values",
    "legacy_principal",
    "standard",
]

#: A principal resolver: takes the request as the front passes it (an ASGI
#: scope, a WSGI environ or a Django ``HttpRequest``) and returns the
#: principal, or None when the request carries no identity (answered 400).
Resolver = Callable[[Any], "str | None"]

#: Request header names (``fnmatch`` patterns, case-insensitive; ``_`` and
#: ``-`` are one character, as WSGI servers and Django fold them) that carry
#: a credential, part of the credentials' digest: ``Authorization`` and
#: ``Proxy-Authorization`` (RFC 9110 section 11), API keys (``X-API-Key``,
#: FastAPI's ``APIKeyHeader``; ``Api-Key``, ``X-Goog-Api-Key``, ``apikey``),
#: tokens (``X-Auth-Token``, ``X-Access-Token``, ``X-Amz-Security-Token``),
#: anything naming auth (``X-Authenticated-User``) or a session
#: (``X-Session-Id``), and secrets (``X-Client-Secret``).
DEFAULT_CREDENTIAL_HEADERS: tuple[str, ...] = (
    "authorization",
    "proxy-authorization",
    "*api-key*",
    "*apikey*",
    "*token*",
    "*auth*",
    "*session*",
    "*secret*",
)

#: Cookie names (``fnmatch`` patterns, case-insensitive) that carry a login,
#: part of the credentials' digest: ``sessionid`` (Django), ``session``
#: (Flask, Starlette's ``SessionMiddleware``, Litestar's cookie sessions),
#: ``remember_token`` (Flask-Login), ``token`` (Litestar's JWT cookie
#: authentication), ``*token*`` (fastapi-login's ``access-token``,
#: ``access_token``, ``id_token``, NextAuth's ``next-auth.session-token``),
#: ``*sess*`` (Koa's ``koa.sess``, Rails' ``_app_session``, Java's
#: ``JSESSIONID``, ``laravel_session``, ASP.NET's ``ASP.NET_SessionId``,
#: PHP's ``PHPSESSID``), ``sid`` and ``*.sid`` (Express's ``connect.sid``),
#: ``*auth*`` (``.AspNetCore.Auth``-style cookies) and ``*jwt*``.
DEFAULT_SESSION_COOKIES: tuple[str, ...] = (
    "sessionid",
    "session",
    "remember_token",
    "token",
    "*token*",
    "*sess*",
    "*session*",
    "*sessid*",
    "sid",
    "*.sid",
    "*auth*",
    "*jwt*",
    "access_token",
    "id_token",
)

#: Header and cookie names (``fnmatch`` patterns, case-insensitive) that are
#: never credentials although a pattern above matches them: CSRF tokens
#: (Django's ``csrftoken`` cookie and ``X-CSRFToken`` header, Angular's
#: ``XSRF-TOKEN`` and ``X-XSRF-TOKEN``), which a page may renew between a
#: request and its retry, and analytics cookies named like sessions
#: (Hotjar's ``_hjSession*``, Application Insights' ``ai_session``).
DEFAULT_NOT_CREDENTIALS: tuple[str, ...] = ("*csrf*", "*xsrf*", "_hj*", "ai_session")

#: Credential values (case-insensitive, after the auth scheme for an
#: ``Authorization``-like header) that carry no identity: what a browser app
#: sends when it has no token (``Bearer null``, ``Bearer undefined``, an empty
#: bearer, ``String(false)``, ``[object Object]``). They count as absent.
DEFAULT_PLACEHOLDERS: tuple[str, ...] = ("", "null", "undefined", "none", "nil", "false", "nan", "[object object]")

#: The WSGI environ key under which a front hands over the framework's user
#: (a str, or a callable returning one or None); the Flask extension puts the
#: Flask app's Flask-Login user there.
USER_ENVIRON_KEY = "idempo.user"

# The auth schemes a client sends alone when it has no token (an empty bearer).
_SCHEMES = frozenset((b"bearer", b"basic", b"token", b"jwt", b"digest"))

# RFC 9110 section 5.6.2 token characters: an auth scheme.
_SCHEME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


# --- reading a request, whichever front passes it -------------------------------------


def _kind(request: Any) -> str:
    """``"asgi"`` (a scope), ``"wsgi"`` (an environ) or ``"django"`` (an HttpRequest)."""
    if type(request) is dict or isinstance(request, Mapping):  # a dict first: an ABC check costs a call
        return "asgi" if "type" in request and "headers" in request else "wsgi"
    if hasattr(request, "META"):
        return "django"
    raise TypeError(f"idempo.principals: cannot read a request of type {type(request).__qualname__}")


def _environ(request: Any, kind: str) -> Mapping[str, Any]:
    environ: Mapping[str, Any] = request if kind == "wsgi" else request.META
    return environ


def header_values(request: Any, name: str) -> list[bytes]:
    """Every value of a request header, latin-1 bytes, in the order received.

    WSGI servers and Django fold repeated lines into one value (``Cookie``
    lines with ``"; "``, others with ``", "``), which then comes back as one.
    """
    kind = _kind(request)
    if kind == "asgi":
        raw = name.lower().encode("latin-1")
        return [value for header, value in request["headers"] if header == raw]
    environ = _environ(request, kind)
    meta = name.upper().replace("-", "_")
    value = environ.get(meta if meta in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + meta)
    return [] if value is None else [value.encode("latin-1")]


def client_address(request: Any) -> str | None:
    """The client's address as the server reports it (ASGI ``client``, WSGI ``REMOTE_ADDR``), or None."""
    kind = _kind(request)
    if kind == "asgi":
        client = request.get("client")
        return str(client[0]) if client else None
    return _environ(request, kind).get("REMOTE_ADDR") or None


def framework_user(request: Any) -> str | None:
    """The identity the framework already authenticated, ``"user:<id>"``, or None.

    - Django: ``request.user`` when ``is_authenticated`` (its ``pk``).
    - ASGI (Starlette, FastAPI, Litestar): ``scope["user"]`` when an
      authentication middleware set it and, where it says so,
      ``is_authenticated``. Its id is the first of the attributes that
      identify a user that it has: ``identity`` (Starlette's ``BaseUser``,
      ``SimpleUser``'s username), ``get_id()`` (Flask-Login's ``UserMixin``,
      documented as unique), ``id``, ``pk`` (an ORM's primary key),
      ``username`` (a login name: unique on Django's ``AbstractUser``); a str
      user is its own id; a mapping's ``id`` or ``sub``. Never a name meant
      for display (``display_name``, ``name``, ``email``): two users may
      share one.
    - WSGI: what a front handed over under :data:`USER_ENVIRON_KEY` (Flask:
      Flask-Login's user), else ``REMOTE_USER``.

    A user whose id cannot be read is no user here: the credentials decide
    (two users whose only difference is their session are two principals).
    """
    kind = _kind(request)
    if kind == "django":
        user = getattr(request, "user", None)
        if user is not None and getattr(user, "is_authenticated", False):
            return f"user:{user.pk}"
        return None
    if kind == "asgi":
        user = request.get("user")
        if user is None or not _authenticated(user):
            return None
        identity = _identity(user)
        return None if identity is None else "user:" + identity
    environ = request
    handed = environ.get(USER_ENVIRON_KEY)
    if callable(handed):
        handed = handed()
    if handed:
        return "user:" + str(handed)
    remote_user = environ.get("REMOTE_USER")
    return "user:" + remote_user if remote_user else None


def _authenticated(user: Any) -> bool:
    try:
        return bool(getattr(user, "is_authenticated", True))
    except Exception:  # a user class whose property raises (Starlette's BaseUser)
        return False


#: The attributes that identify a user, in order (see :func:`framework_user`).
_IDENTIFYING = ("identity", "get_id", "id", "pk", "username")


def _identity(user: Any) -> str | None:
    if isinstance(user, str):
        return user or None
    if isinstance(user, Mapping):
        value = user.get("id", user.get("sub"))
        return None if value is None or value == "" else str(value)
    for name in _IDENTIFYING:
        try:
            value = getattr(user, name, None)
            if name == "get_id" and callable(value):
                value = value()
        except Exception:  # NotImplementedError from an abstract property or get_id()
            continue
        if value is not None and not callable(value) and str(value):
            return str(value)
    return None


def _matcher(patterns: Iterable[str], *, header: bool = False) -> Callable[[str], bool]:
    """A test of a name against ``fnmatch`` patterns, case-insensitive (for headers, ``_`` is ``-``)."""

    def fold(name: str) -> str:
        name = name.lower()
        return name.replace("_", "-") if header else name

    compiled = re.compile("|".join(fnmatch.translate(fold(p)) for p in patterns) or "(?!)")
    return lambda name: compiled.match(fold(name)) is not None


def _cookies(lines: list[bytes], wanted: Callable[[bytes], bool]) -> list[tuple[bytes, bytes]]:
    """The (name, value) pairs of the cookies ``wanted`` picks, sorted, from every ``Cookie`` line."""
    pairs: list[tuple[bytes, bytes]] = []
    for line in lines:
        for item in line.split(b";"):
            name, sep, value = item.strip().partition(b"=")
            if sep and name and wanted(name):
                pairs.append((name, value.strip()))
    pairs.sort()
    return pairs


def _authorization(value: bytes) -> bytes:
    """``bearer  abc`` -> ``bearer abc``: the scheme is case-insensitive (RFC 9110 section 11.1), the rest is not."""
    value = value.strip(b" \t")
    scheme, sep, rest = value.partition(b" ")
    if not sep or _SCHEME.fullmatch(scheme) is None:
        return value
    return scheme.lower() + b" " + rest.lstrip(b" \t")


#: The most header and cookie names a rule remembers the verdict of: the names
#: clients send are few, and a client sending endless new ones only makes
#: them be matched again, never grows the memory past this.
_NAMES_REMEMBERED = 512


class _Rule:
    """Which headers and cookies are credentials, and which values are placeholders (see :func:`standard`).

    The verdict on a name is a pure function of the name, so it is
    remembered (per rule, at most :data:`_NAMES_REMEMBERED` names of each
    kind): a request's header names are matched against the patterns once,
    not on every request.
    """

    __slots__ = ("_cookie_names", "_header_names", "cookie", "header", "placeholders")

    def __init__(
        self,
        credential_headers: Sequence[str],
        session_cookies: Sequence[str],
        not_credentials: Sequence[str],
        placeholders: Sequence[str],
    ) -> None:
        for name, value in (
            ("credential_headers", credential_headers),
            ("session_cookies", session_cookies),
            ("not_credentials", not_credentials),
            ("placeholders", placeholders),
        ):
            if isinstance(value, str | bytes):
                raise TypeError(f"{name} must be a sequence of names, not one string")
        header = _matcher(credential_headers, header=True)
        cookie = _matcher(session_cookies)
        excluded_header = _matcher(not_credentials, header=True)
        excluded_cookie = _matcher(not_credentials)
        self.header: Callable[[str], bool] = lambda name: (
            name != "cookie" and header(name) and not excluded_header(name)
        )
        self.cookie: Callable[[str], bool] = lambda name: cookie(name) and not excluded_cookie(name)
        self.placeholders = frozenset(p.lower().encode("latin-1") for p in placeholders)
        # raw ASGI header name -> its lower-case str when a credential, else None
        self._header_names: dict[bytes, str | None] = {}
        # raw cookie name -> a credential or not
        self._cookie_names: dict[bytes, bool] = {}

    def header_name(self, raw: bytes) -> str | None:
        """An ASGI header name's lower-case str when it names a credential, else None (remembered)."""
        try:
            return self._header_names[raw]
        except KeyError:
            pass
        name = raw.decode("latin-1")
        verdict = name.lower() if self.header(name) else None
        if len(self._header_names) < _NAMES_REMEMBERED:
            self._header_names[raw] = verdict
        return verdict

    def cookie_name(self, raw: bytes) -> bool:
        """Whether a cookie name names a credential (remembered)."""
        try:
            return self._cookie_names[raw]
        except KeyError:
            pass
        verdict = self.cookie(raw.decode("latin-1"))
        if len(self._cookie_names) < _NAMES_REMEMBERED:
            self._cookie_names[raw] = verdict
        return verdict

    def placeholder(self, value: bytes) -> bool:
        """True for a value that carries no identity (``null``, an empty bearer, ...)."""
        value = value.strip(b" \t")
        if len(value) >= 2 and value[:1] == value[-1:] == b'"':
            value = value[1:-1].strip(b" \t")  # a quoted cookie value
        return value.lower() in self.placeholders


def _scope_pairs(scope: Any, rule: _Rule) -> tuple[list[tuple[str, bytes]], list[bytes]]:
    """:func:`_header_pairs` of an ASGI scope: one pass over its headers, each name's verdict remembered."""
    pairs: list[tuple[str, bytes]] = []
    cookies: list[bytes] = []
    known = rule._header_names
    for raw, value in scope["headers"]:
        if raw == b"cookie":
            cookies.append(value)
            continue
        name = known[raw] if raw in known else rule.header_name(raw)
        if name is not None:
            pairs.append((name, value))
    return pairs, cookies


def _header_pairs(request: Any, rule: _Rule) -> tuple[list[tuple[str, bytes]], list[bytes]]:
    """The (lower-case name, value) of every credential header, in the order received (latin-1 bytes),
    and the ``Cookie`` lines (one pass over an ASGI scope's headers)."""
    kind = _kind(request)
    if kind == "asgi":
        return _scope_pairs(request, rule)
    pairs: list[tuple[str, bytes]] = []
    wanted = rule.header
    for meta, value in _environ(request, kind).items():
        if isinstance(meta, str) and meta.startswith("HTTP_") and isinstance(value, str):
            name = meta[5:].lower().replace("_", "-")
            if wanted(name):
                pairs.append((name, value.encode("latin-1", "replace")))
    return pairs, header_values(request, "cookie")


def _credential_parts(request: Any, rule: _Rule) -> list[bytes]:
    """The credentials of a request, each tagged, placeholders left out (see :func:`credentials`).

    ``Authorization`` values keep the input the digest had before other
    headers counted (``a`` + value, first), so a caller with only a bearer
    token or only a session cookie keeps its principal across that change.
    """
    return _parts(*_header_pairs(request, rule), rule)


def _parts(headers: list[tuple[str, bytes]], cookie_lines: list[bytes], rule: _Rule) -> list[bytes]:
    """:func:`_credential_parts` from the credential headers and ``Cookie`` lines :func:`_header_pairs` found."""
    authorization: list[bytes] = []
    others: list[bytes] = []
    for name, value in headers:
        if name in ("authorization", "proxy-authorization"):
            value = _authorization(value)
            scheme, sep, token = value.partition(b" ")
            if rule.placeholder(token) if sep else (scheme.lower() in _SCHEMES or rule.placeholder(value)):
                continue
        else:
            value = value.strip(b" \t")
            if rule.placeholder(value):
                continue
        if name == "authorization":
            authorization.append(b"a" + value)
        else:
            others.append(b"h" + name.encode("latin-1") + b"=" + value)
    others.sort()
    cookies = [b"c" + n + b"=" + v for n, v in _cookies(cookie_lines, rule.cookie_name) if not rule.placeholder(v)]
    return authorization + others + cookies


def _digest(parts: list[bytes]) -> str | None:
    if not parts:
        return None
    digest = hashlib.sha256()
    for part in parts:
        digest.update(b"%d:" % len(part))
        digest.update(part)
    return "cred:" + digest.hexdigest()[:32]


def credentials(
    request: Any,
    session_cookies: Sequence[str] = DEFAULT_SESSION_COOKIES,
    *,
    credential_headers: Sequence[str] = DEFAULT_CREDENTIAL_HEADERS,
    not_credentials: Sequence[str] = DEFAULT_NOT_CREDENTIALS,
    placeholders: Sequence[str] = DEFAULT_PLACEHOLDERS,
) -> str | None:
    """The digest of a request's credentials, ``"cred:<32 hex>"``, or None when it carries none.

    The credentials are the headers whose names match ``credential_headers``
    (``Authorization``-like ones with their scheme lower-cased) and the
    cookies whose names match ``session_cookies`` (``fnmatch`` patterns,
    case-insensitive), less the names matching ``not_credentials`` and the
    values in ``placeholders``; each is length-prefixed so no two different
    sets share an input. The digest is an unkeyed SHA-256 because it never
    leaves the process: the record key and the log hashes it feeds are keyed
    with the server secret.

    Raises:
        TypeError: one of the lists is a single string.
    """
    rule = _Rule(credential_headers, session_cookies, not_credentials, placeholders)
    return _digest(_credential_parts(request, rule))


# --- resolvers ------------------------------------------------------------------------


def standard(
    *,
    session_cookies: Sequence[str] = DEFAULT_SESSION_COOKIES,
    credential_headers: Sequence[str] = DEFAULT_CREDENTIAL_HEADERS,
    not_credentials: Sequence[str] = DEFAULT_NOT_CREDENTIALS,
    placeholders: Sequence[str] = DEFAULT_PLACEHOLDERS,
) -> Resolver:
    """The default rule (see the module docstring) with other lists of credentials.

    Args:
        session_cookies: cookie names (``fnmatch`` patterns, case-insensitive)
            that carry a login; default :data:`DEFAULT_SESSION_COOKIES`. Add
            yours: ``standard(session_cookies=(*DEFAULT_SESSION_COOKIES, "login"))``.
        credential_headers: header names (``fnmatch`` patterns,
            case-insensitive) that carry a credential; default
            :data:`DEFAULT_CREDENTIAL_HEADERS`.
        not_credentials: header and cookie names that never count although
            a pattern above matches them; default :data:`DEFAULT_NOT_CREDENTIALS`.
            Add a header that changes between a request and its retry but
            says nothing of who sends it (a per-request signature or nonce).
        placeholders: values that carry no identity and count as absent;
            default :data:`DEFAULT_PLACEHOLDERS`.

    Returns:
        A resolver that never returns None: the framework's user, else the
        credentials' digest, else ``"addr:<host>"``, else ``"anonymous"``.

    Raises:
        TypeError: one of the lists is a single string.
    """
    rule = _Rule(credential_headers, session_cookies, not_credentials, placeholders)

    def resolve(request: Any) -> str:
        if type(request) is dict and "type" in request and "headers" in request:
            # An ASGI scope (every request of the ASGI fronts): the same rule, read in one pass.
            return _scope_principal(request, rule)
        user = framework_user(request)
        if user is not None:
            return user
        digest = _digest(_credential_parts(request, rule))
        if digest is not None:
            return digest
        address = client_address(request)
        return "addr:" + address if address else "anonymous"

    resolve.__doc__ = "The default principal: the framework's user, the credentials' digest, the address."
    return resolve


def _scope_principal(scope: dict[str, Any], rule: _Rule) -> str:
    """:func:`standard`'s rule on an ASGI scope (``framework_user``, ``credentials``, ``client_address`` inlined)."""
    user = scope.get("user")
    if user is not None and _authenticated(user):
        identity = _identity(user)
        if identity is not None:
            return "user:" + identity
    pairs, cookie_lines = _scope_pairs(scope, rule)
    if pairs or cookie_lines:
        digest = _digest(_parts(pairs, cookie_lines, rule))
        if digest is not None:
            return digest
    client = scope.get("client")
    address = str(client[0]) if client else None
    return "addr:" + address if address else "anonymous"


#: The default resolver of every front: :func:`standard` with the default lists.
default: Resolver = standard()


def from_user() -> Resolver:
    """Only the user the framework authenticated (see :func:`framework_user`); None (400) without one.

    For a cookie-session app whose idempotent routes need a login: the
    principal is the user, whatever session or device the retry comes from.
    Put the framework's authentication before idempo (Django's
    ``AuthenticationMiddleware`` above it in ``MIDDLEWARE``; Starlette's
    ``AuthenticationMiddleware`` added after idempo, so it runs first).
    """
    return framework_user


def from_header(name: str, *, prefix: str = "hdr") -> Resolver:
    """The value of a request header set by a trusted gateway; None (400) without it.

    Only safe where the gateway that authenticated the caller sets the header
    and strips any copy the client sent: otherwise a client can name anyone.

    Args:
        name: the header, e.g. ``"X-User-Id"`` (case-insensitive).
        prefix: put before the value (``"hdr:<value>"``), so a header value
            never equals a principal of another kind.
    """
    if not name:
        raise ValueError("from_header needs a header name")

    def resolve(request: Any) -> str | None:
        values = header_values(request, name)
        if not values:
            return None
        value = values[0].strip().decode("latin-1")
        return f"{prefix}:{value}" if value else None

    return resolve


def from_claim(
    verify: Callable[[str], Mapping[str, Any] | None],
    claim: str = "sub",
    *,
    scheme: str = "bearer",
) -> Resolver:
    """A claim of the request's bearer token, verified by the app's own verifier; None (400) without one.

    The principal of an API authenticated by tokens (JWT): ``"claim:<sub>"``
    is the same for the original token and a refreshed one, so a retry with
    a refreshed token replays instead of executing again. idempo runs before
    the app's routes, so it verifies the token itself, with the function the
    app hands over; an unverified claim is never used.

    ::

        import jwt  # PyJWT

        def verify(token: str) -> dict:
            return jwt.decode(token, PUBLIC_KEY, algorithms=["RS256"], audience="api")

        app.add_middleware(IdempotencyMiddleware, store=..., principal=principals.from_claim(verify))

    Args:
        verify: takes the token (the ``Authorization`` value after the scheme)
            and returns its verified claims; raising or returning None means
            the token is not valid.
        claim: the claim that names the caller (default ``"sub"``).
        scheme: the auth scheme carrying the token (case-insensitive).

    Returns:
        A resolver returning ``"claim:<value>"``, or None (answered 400, nothing
        run) for a request without a valid token. To let such requests through
        under the default rule instead: ``first(from_claim(verify), default)``.
    """
    expected = scheme.lower().encode("latin-1")

    def resolve(request: Any) -> str | None:
        for value in header_values(request, "authorization"):
            normalised = _authorization(value)
            found, sep, token = normalised.partition(b" ")
            if not sep or found != expected or not token:
                continue
            try:
                claims = verify(token.decode("latin-1"))
            except Exception:
                return None
            if not claims:
                return None
            subject = claims.get(claim)
            return None if subject is None or subject == "" else f"claim:{subject}"
        return None

    return resolve


def first(*resolvers: Resolver) -> Resolver:
    """The first principal any of ``resolvers`` finds (in order); None when none does."""
    if not resolvers:
        raise ValueError("first needs at least one resolver")

    def resolve(request: Any) -> str | None:
        for resolver in resolvers:
            principal = resolver(request)
            if principal is not None:
                return principal
        return None

    return resolve


# --- the records of versions before keyed digests -------------------------------------

_DEFAULT_RULE = _Rule(
    DEFAULT_CREDENTIAL_HEADERS, DEFAULT_SESSION_COOKIES, DEFAULT_NOT_CREDENTIALS, DEFAULT_PLACEHOLDERS
)
_ANY_VALUE = _Rule(DEFAULT_CREDENTIAL_HEADERS, DEFAULT_SESSION_COOKIES, DEFAULT_NOT_CREDENTIALS, ())


def legacy_principal(request: Any, resolver: Resolver, principal: str) -> str | None:
    """The principal versions before keyed digests gave this request, to find their records; None: do not look.

    The app's own resolver gave the principal it gives now. The default rule
    was then: Django's authenticated user; else a SHA-256 of the (first)
    ``Authorization`` value; else the address. A record is looked up only
    where that rule told callers apart at least as well as today's, so an
    old record is never another user's:

    - a Django user: ``user:<pk>``, as then;
    - a request whose only credential (by today's rule, placeholders
      included) is one ``Authorization`` value that is no placeholder: that
      value's old digest;
    - a request with no credential at all and no framework user: its address.

    Any other request (a user another framework authenticated, whom the old
    rule scoped by address; an API key, a session or token cookie, a
    placeholder bearer, which the old rule ignored or shared between users)
    is not looked up: its retry executes once more instead of risking
    another caller's answer.
    """
    if resolver is not default:
        return principal
    kind = _kind(request)
    if kind == "django":
        user = getattr(request, "user", None)
        if user is not None and getattr(user, "is_authenticated", False):
            return f"user:{user.pk}"
    elif framework_user(request) is not None:
        return None
    every = _credential_parts(request, _ANY_VALUE)
    if not every:
        address = client_address(request)
        return "addr:" + address if address else "anonymous"
    if len(every) == 1 and every[0][:1] == b"a" and _credential_parts(request, _DEFAULT_RULE) == every:
        values = header_values(request, "authorization")
        if len(values) == 1:
            return "cred:" + hashlib.sha256(values[0]).hexdigest()[:32]
    return None


# --- Flask-Login ----------------------------------------------------------------------


def flask_login_user(app: Any, environ: Mapping[str, Any]) -> str | None:
    """The id Flask-Login keeps in the Flask app's session (``_user_id``), or None.

    The session is opened with the app's own session interface (a signed
    cookie by default: a forged one opens empty), outside any request
    context, so no ``before_request`` or teardown handler runs twice. None
    when Flask-Login is not in use or the session holds no user.
    """
    if "flask_login" not in sys.modules or getattr(app, "login_manager", None) is None:
        return None
    try:
        request = app.request_class(environ)
        session = app.session_interface.open_session(app, request)
    except Exception:
        return None
    user_id = session.get("_user_id") if session is not None else None
    return None if user_id is None or user_id == "" else str(user_id)
