"""The principal of a request on a route whose scope is a verified JWT claim (idempo proxy).

A replay never reaches the upstream, so the upstream's own token check never
runs for it: the proxy must know who is asking before it looks a record up.
:class:`JWTPrincipalResolver` takes the ``Authorization: Bearer`` token, checks
its signature against the configured keys (a JWK Set file or URL, or one key
file; RFC 7515, RFC 7517), its expiry (``exp`` is required), ``nbf``, audience
and issuer (RFC 7519 section 4.1), and returns the configured claim's value. A
token that fails raises :class:`PrincipalRejected` (the proxy answers 401
problem+json); keys that cannot be fetched raise :class:`KeysUnavailable` (503).
Neither message holds the token.

Needs PyJWT with its ``crypto`` extra (``pip install idempo[proxy]``), imported
when a resolver or key set is made, not when this module is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..exceptions import IdempoError
from ._keys import VerificationKey, load_keys

if TYPE_CHECKING:
    import jwt

    from .config import JWTScope

__all__ = [
    "JWTPrincipalResolver",
    "KeysUnavailable",
    "PrincipalRejected",
    "VerificationKey",
    "load_keys",
]


class PrincipalRejected(IdempoError):
    """The request's bearer token was refused, so it has no principal.

    Attributes:
        status_code: 401 (RFC 9110 section 15.5.2).
        reason: a stable name for why: ``missing-token``, ``not-bearer``,
            ``malformed``, ``unknown-key``, ``bad-algorithm``, ``bad-signature``,
            ``expired``, ``not-yet-valid``, ``wrong-audience``, ``wrong-issuer``,
            ``missing-claim``, ``bad-claim`` or ``invalid``.
    """

    status_code = 401

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"the bearer token was refused ({reason}): {detail}")
        self.reason = reason


class KeysUnavailable(IdempoError):
    """The JWK Set URL could not be fetched, so no token can be checked (the proxy answers 503).

    Attributes:
        status_code: 503.
    """

    status_code = 503


class JWTPrincipalResolver:
    """Verifies bearer tokens for one ``jwt`` scope and returns the principal claim.

    Args:
        scope: the route's scope (:class:`~idempo.proxy.config.JWTScope`,
            from :func:`~idempo.proxy.config.load_config`).

    Raises:
        ValueError: the scope's key file cannot be used (see :func:`load_keys`).
        ImportError: PyJWT is not installed (``pip install idempo[proxy]``).
    """

    def __init__(self, scope: JWTScope) -> None:
        import jwt

        self.scope = scope
        self._keys = load_keys(scope)
        self._client: jwt.PyJWKClient | None = None
        if scope.jwks_url is not None:
            self._client = jwt.PyJWKClient(
                scope.jwks_url, cache_jwk_set=True, lifespan=scope.jwks_cache_ttl, timeout=scope.jwks_timeout
            )
        self._options: dict[str, Any] = {
            "require": ["exp", scope.claim, *(["aud"] if scope.audience else []), *(["iss"] if scope.issuer else [])],
            # Without a configured audience PyJWT would refuse every token that has one.
            "verify_aud": bool(scope.audience),
        }

    def resolve(self, authorization: str | None) -> str:
        """The principal of a request with this ``Authorization`` header value.

        Blocks only to fetch a ``jwks_url`` (at most every ``jwks_cache_ttl``
        seconds, or for a key id not yet seen); async code calls :meth:`aresolve`.

        Raises:
            PrincipalRejected: no bearer token, or one that fails verification.
            KeysUnavailable: the JWK Set URL could not be fetched.
        """
        if authorization is None or not authorization.strip():
            raise PrincipalRejected("missing-token", "this route needs Authorization: Bearer <token>")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise PrincipalRejected("not-bearer", "expected Authorization: Bearer <token>")
        return self.resolve_token(token.strip())

    async def aresolve(self, authorization: str | None) -> str:
        """:meth:`resolve`, from async code: in a worker thread when the keys come from a URL."""
        if self._client is None:
            return self.resolve(authorization)
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.resolve, authorization)

    def resolve_token(self, token: str) -> str:
        """The principal claim of a bearer token (the part after ``Bearer``).

        Raises:
            PrincipalRejected: the token fails verification.
            KeysUnavailable: the JWK Set URL could not be fetched.
        """
        import jwt

        key, algorithms = self._key_for(token)
        scope = self.scope
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(algorithms),
                audience=list(scope.audience) or None,
                issuer=scope.issuer,
                leeway=scope.leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.PyJWTError as exc:
            raise PrincipalRejected(_reason(exc), str(exc)) from None
        value = claims[scope.claim]
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            raise PrincipalRejected("bad-claim", f"the {scope.claim!r} claim is not a non-empty string")
        return str(value)

    def _key_for(self, token: str) -> tuple[Any, tuple[str, ...]]:
        import jwt

        if self._client is not None:
            try:
                signing = self._client.get_signing_key_from_jwt(token)
            except jwt.PyJWKClientConnectionError as exc:
                raise KeysUnavailable(f"the JWK Set at {self.scope.jwks_url} could not be fetched: {exc}") from None
            except jwt.PyJWKClientError as exc:
                raise PrincipalRejected("unknown-key", str(exc)) from None
            except jwt.PyJWTError as exc:
                raise PrincipalRejected("malformed", str(exc)) from None
            return signing.key, self.scope.algorithms
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise PrincipalRejected("malformed", str(exc)) from None
        kid = header.get("kid")
        keys = self._keys
        if self.scope.key_file is not None:
            found = keys[None]  # one key, whatever id the issuer gives it
        elif isinstance(kid, str) and kid in keys:
            found = keys[kid]
        elif None in keys:
            found = keys[None]  # a key without an id may sign any token
        elif kid is None and len(keys) == 1:
            found = next(iter(keys.values()))
        else:
            raise PrincipalRejected("unknown-key", f"no configured key has the token's key id {kid!r}")
        return found.key, found.algorithms


def _reason(exc: jwt.PyJWTError) -> str:
    import jwt

    reasons: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
        (jwt.ExpiredSignatureError, "expired"),
        (jwt.ImmatureSignatureError, "not-yet-valid"),
        (jwt.InvalidAudienceError, "wrong-audience"),
        (jwt.InvalidIssuerError, "wrong-issuer"),
        (jwt.MissingRequiredClaimError, "missing-claim"),
        (jwt.InvalidSignatureError, "bad-signature"),
        (jwt.InvalidAlgorithmError, "bad-algorithm"),
        (jwt.DecodeError, "malformed"),
    )
    for cls, reason in reasons:
        if isinstance(exc, cls):
            return reason
    # PyJWT 2.10 checks that sub (and jti) are strings itself.
    subject_error = getattr(jwt.exceptions, "InvalidSubjectError", None)
    if subject_error is not None and isinstance(exc, subject_error):
        return "bad-claim"
    return "invalid"
