"""idempo proxy's configuration: a TOML file, command-line flags and ``IDEMPO_PROXY_*`` variables.

:func:`load_config` reads the file with the standard library's ``tomllib``,
applies the flags and then the environment (each overrides what came before:
file < flags < environment), checks every value and the rules that tie values
together, and returns a :class:`ProxyConfig` of frozen dataclasses. A value it
cannot use raises :class:`ProxyConfigError`, whose message names where the value
came from (the file, ``--flag`` or ``IDEMPO_PROXY_X``), its key path
(``route[0].scope.claim``), the value, and what is expected. :func:`dump_config`
writes a configuration back as TOML (``idempo proxy --print-config``); loading
that text gives an equal configuration. ``config.schema.json`` beside this
module is a JSON Schema of the file for editors; docs/proxy.md is the reference.

A file looks like this (``examples/proxy/idempo-proxy.toml``)::

    [proxy]                         # the proxy process
    listen = "127.0.0.1:8080"
    upstream = "http://127.0.0.1:8000"
    store = "sqlite:///idempo.db"
    [upstream]                      # the connection to the upstream
    deadline = 60
    [defaults]                      # every route's settings, unless the route says otherwise
    methods = ["POST", "PATCH"]
    lease_ttl = "90s"
    [[route]]                       # routes, matched first-wins in Starlette path syntax
    name = "payments"
    path = "/v1/payments"
    scope = { from = "jwt", claim = "sub", jwks_file = "jwks.json", audience = "payments" }

Units: a duration is a number of seconds or a string of numbers with units
(``"500ms"``, ``"90s"``, ``"15m"``, ``"24h"``, ``"7d"``, ``"1h30m"``); a size is
a number of bytes or a string with a unit (``"512B"``, ``"64KiB"``, ``"10MiB"``,
``"1GiB"``, or decimal ``"10kB"``/``"10KB"``, ``"10MB"``, ``"1GB"``). Relative
file paths are relative to the configuration file's directory.

Rules checked at load time, beyond each value's own type and range:

- ``lease_ttl`` must exceed ``upstream.deadline``: a lease that ends while the
  upstream may still answer lets a retry take the key over and send the
  request a second time.
- A ``jwt`` scope must be verified: a key source (``jwks_file``, ``jwks_url``
  or ``key_file``) and an ``audience`` or ``issuer``. A replay never reaches the
  upstream, so the upstream's own token check never runs for it: an unverified
  ``sub`` would let a forged token read another user's replay.
- ``memory://`` with ``workers`` above 1 is refused: each worker process would
  keep records of its own, so a duplicate reaching another worker executes
  again.
- Route names are unique (they label metrics); ``default`` names the settings
  used when no route matches.

Importing this module needs only the core; route paths need Starlette and a
``jwt`` scope PyJWT, both imported when a file uses them (``idempo[proxy]``).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeAlias
from urllib.parse import urlsplit, urlunsplit

from .._core.policy import DEFAULT_METHODS, Policy, Verdict, default_verdict
from ..exceptions import ConfigurationError
from ._keys import load_keys

__all__ = [
    "AuthorizationScope",
    "ENVIRONMENT",
    "FAILURES",
    "FAILURES_NOT_SENT",
    "FAILURES_SENT",
    "HeaderScope",
    "JWTScope",
    "ListenAddress",
    "Outcomes",
    "ProxyConfig",
    "ProxyConfigError",
    "ProxySettings",
    "Route",
    "RouteSettings",
    "Scope",
    "UpstreamSettings",
    "UpstreamTarget",
    "dump_config",
    "load_config",
    "parse_duration",
    "parse_size",
]

# --- Names --------------------------------------------------------------------------------

#: Failures of an exchange whose request was never sent (httpx ``ConnectError``,
#: ``ConnectTimeout``; ``PoolTimeout``): a retry can safely send it. Default verdict: release.
FAILURES_NOT_SENT: tuple[str, ...] = ("connect-error", "pool-timeout")
#: Failures after the request was (perhaps partly) sent: a write error or timeout, a read
#: error or timeout, a protocol error, or the proxy's own total ``deadline``. The upstream
#: may have executed it; the proxy cannot know. ``"unknown"`` in an outcome list names
#: them all. Default verdict: hold.
FAILURES_SENT: tuple[str, ...] = ("write-error", "read-error", "protocol-error", "deadline")
#: Every failure name an outcome list accepts (besides ``"unknown"`` and statuses).
FAILURES: tuple[str, ...] = FAILURES_NOT_SENT + FAILURES_SENT

#: The environment variables, by the ``[proxy]`` key each overrides (``None``: the file).
#: Every one overrides both the file and the flags; an empty value counts as unset.
ENVIRONMENT: Mapping[str, str | None] = MappingProxyType(
    {
        "IDEMPO_PROXY_CONFIG": None,
        "IDEMPO_PROXY_LISTEN": "listen",
        "IDEMPO_PROXY_UPSTREAM": "upstream",
        "IDEMPO_PROXY_STORE": "store",
        "IDEMPO_PROXY_ADMIN_LISTEN": "admin_listen",
        "IDEMPO_PROXY_TRUSTED_PROXIES": "trusted_proxies",
        "IDEMPO_PROXY_MAX_REQUEST_BODY": "max_request_body",
        "IDEMPO_PROXY_MAX_RESPONSE_BODY": "max_response_body",
        "IDEMPO_PROXY_WORKERS": "workers",
        "IDEMPO_PROXY_GRACEFUL_TIMEOUT": "graceful_timeout",
        "IDEMPO_PROXY_DISABLE": "disable",
    }
)

_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MISSING: Any = object()


class ProxyConfigError(ConfigurationError):
    """A proxy setting cannot be used.

    The message reads ``<source>: <key> = <value>: <what is expected>``, e.g.
    ``idempo-proxy.toml: route[0].scope.claim = 42: expected a claim name``.

    Attributes:
        source: where the value came from: the file's path, ``--flag``, an
            ``IDEMPO_PROXY_*`` variable, or ``(no config file)`` for a
            required key nothing set.
        key: the key path (``proxy.workers``, ``route[1].outcomes.hold[0]``);
            empty for an error about the whole file (it is not valid TOML).
        value: the value as given (absent when the key is missing).
        expected: what would be accepted, and why.
    """

    def __init__(self, source: str, key: str, value: object, expected: str) -> None:
        self.source = source
        self.key = key
        self.value = None if value is _MISSING else value
        self.expected = expected
        where = f"{key} = {_display(value)}" if value is not _MISSING else key
        super().__init__(f"{source}: {where}: {expected}" if where else f"{source}: {expected}")


# --- Units --------------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SIZE_UNITS = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|KiB|MiB|GiB)?")


def parse_duration(value: object) -> float:
    """Seconds from a duration: a number of seconds (``90``, ``0.5``), or a string.

    A string is a number of seconds (``"90"``) or numbers with units, largest
    first or not (``"500ms"``, ``"90s"``, ``"15m"``, ``"24h"``, ``"7d"``, ``"1h30m"``).

    Raises:
        ValueError: anything else (a bool, a negative or non-finite number, an
            unknown unit).
    """
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as '90s', not a boolean")
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value)):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION.fullmatch(value):
        seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(value))
    else:
        raise ValueError("expected seconds, or a string such as '500ms', '90s', '15m', '24h', '7d', '1h30m'")
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from a size: a whole number of bytes, or a string with a unit.

    Units: ``B``; binary ``KiB``, ``MiB``, ``GiB`` (powers of 1024); decimal
    ``kB``/``KB``, ``MB``, ``GB`` (powers of 1000). ``"10MiB"`` is 10485760.

    Raises:
        ValueError: anything else (a bool, a negative number, a fraction of a byte).
    """
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string such as '10MiB', not a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        number, unit = match.groups()
        size = int(float(number) * _SIZE_UNITS[unit or "B"])
    else:
        raise ValueError("expected bytes, or a string such as '512KiB', '10MiB', '1GiB', '10MB'")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def _format_duration(seconds: float) -> str | int | float:
    if seconds == 0:
        return 0
    # The largest whole unit, except that one day reads better as 24h and one minute as 60s.
    for unit, factor, least in (("d", 86400, 2), ("h", 3600, 1), ("m", 60, 2), ("s", 1, 1)):
        if seconds >= factor * least and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    milliseconds = seconds * 1000
    if milliseconds.is_integer():
        return f"{int(milliseconds)}ms"
    return seconds


def _format_size(size: int) -> str | int:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return size


# --- The configuration ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where a server listens: a TCP ``host:port`` (``[::1]:8080`` for IPv6) or ``unix:/path``.

    Attributes:
        host: the address to bind (``None`` for a Unix socket).
        port: the TCP port, 0 for any free one (``None`` for a Unix socket).
        uds: the Unix socket's path, or ``None``.
    """

    host: str | None
    port: int | None
    uds: str | None = None

    def __str__(self) -> str:
        if self.uds is not None:
            return f"unix:{self.uds}"
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """The upstream's address.

    Attributes:
        url: as configured: ``http://host:port``, ``https://host[:port]`` or
            ``unix:/path/to.sock`` (plain HTTP over a Unix socket).
        base_url: the URL forwarded requests are sent to (for a Unix socket,
            ``http://localhost``, whose host the socket's server sees).
        uds: the Unix socket's path, or ``None``.
    """

    url: str
    base_url: str
    uds: str | None = None

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The ``[proxy]`` table: the proxy process.

    Attributes:
        listen: where the proxy serves clients; default ``127.0.0.1:8080``.
        upstream: the API behind the proxy (required; no path: requests are
            forwarded with their own path and query).
        store: the store URL (see :mod:`idempo.stores`); default
            ``sqlite:///idempo.db`` (a file in the working directory).
        admin_listen: where ``/healthz``, ``/readyz`` and ``/metrics`` are
            served; default ``None``: no admin port.
        trusted_proxies: peers (CIDR networks; a bare address is one host) whose
            ``X-Forwarded-*`` and ``Forwarded`` headers are appended to rather than replaced;
            default none.
        max_request_body: bytes of a keyed request's body the proxy accepts
            (413 above); default 10 MiB. A route may set its own.
        max_response_body: bytes of an answer the proxy stores for replay (a
            larger one is passed through, not replayable); default 10 MiB. A
            route may set its own.
        workers: server processes; default 1. Above 1, the store must be
            shared across processes (not ``memory://``).
        graceful_timeout: seconds in-flight and detached exchanges are awaited
            on SIGTERM before the proxy exits (one cut off keeps its lease);
            default 30.
        disable: forward everything untouched, with no idempotency (the
            operator's kill switch, and the benchmarks' baseline); default false.
    """

    listen: ListenAddress
    upstream: UpstreamTarget
    store: str = "sqlite:///idempo.db"
    admin_listen: ListenAddress | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_request_body: int = 10 * 1024 * 1024
    max_response_body: int = 10 * 1024 * 1024
    workers: int = 1
    graceful_timeout: float = 30.0
    disable: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """The ``[upstream]`` table: the connection pool to the upstream.

    Attributes:
        connect_timeout: seconds to open a connection (a failure is
            ``connect-error``: never sent); default 2.
        pool_timeout: seconds to wait for a free connection from the pool (a
            failure is ``pool-timeout``: never sent); default 5.
        deadline: seconds one exchange may take, from sending the request to
            the answer's last byte, enforced by the proxy itself (httpx has no
            total timeout); past it the outcome is unknown (``deadline``),
            unless the request was still waiting for a pool slot or a
            connection (then ``pool-timeout`` or ``connect-error``: never sent).
            It runs on when the client disconnects. Default 60.
        keepalive_expiry: seconds an idle pooled connection is kept. Keep it
            below the upstream's own idle timeout (5 s in Node and uvicorn), or
            the upstream may close a connection just as a keyed request is
            written to it, which makes that request's outcome unknown. Default 1.
        max_connections: connections to the upstream at most; default 100.
        max_keepalive_connections: idle connections kept at most; default 20.
        verify: for an ``https`` upstream, verify its certificate (true), or
            against this CA bundle (a PEM file's path); false turns verification
            off. Default true.
        client: the HTTP client that forwards requests: ``"aiohttp"`` (an
            aiohttp connector, :mod:`idempo.proxy.aiohttp_forwarder`) or
            ``"httpx"`` (httpx's ``AsyncHTTPTransport``, :mod:`idempo.proxy.forwarder`);
            both keep the same guarantees. Default ``"aiohttp"``: 4-7 times
            httpx's throughput in the proxy bench (bench/README.md).
    """

    connect_timeout: float = 2.0
    pool_timeout: float = 5.0
    deadline: float = 60.0
    keepalive_expiry: float = 1.0
    max_connections: int = 100
    max_keepalive_connections: int = 20
    verify: bool | Path = True
    client: Literal["httpx", "aiohttp"] = "aiohttp"


@dataclass(frozen=True, slots=True)
class AuthorizationScope:
    """``scope = { from = "authorization" }``: the principal is the ``Authorization`` header.

    Records are partitioned by a keyed digest of the header's value (DESIGN:
    principal), so two callers with different credentials never share a
    record, and the credentials are never stored. The default scope.
    """

    kind: Literal["authorization"] = "authorization"


@dataclass(frozen=True, slots=True)
class HeaderScope:
    """``scope = { from = "header", name = "X-Tenant" }``: the principal is a request header's value.

    Only safe when a gateway in front of the proxy sets that header and removes
    any the client sent: the proxy trusts it as given.

    Attributes:
        name: the header's name (lower case).
    """

    name: str
    kind: Literal["header"] = "header"


@dataclass(frozen=True, slots=True)
class JWTScope:
    """``scope = { from = "jwt", ... }``: the principal is a claim of a verified bearer token.

    The token is taken from ``Authorization: Bearer <token>``, its signature
    checked against the keys, its ``exp`` (required), ``nbf``, ``aud`` and
    ``iss`` checked, and the claim's value is the principal. A request whose
    token fails is refused (401), never forwarded nor replayed.

    Attributes:
        claim: the claim naming the principal; default ``sub``.
        jwks_file: a JWK Set (RFC 7517) file, read at start; or
        jwks_url: a JWK Set URL (https, or http on loopback), fetched when a
            token names a key not yet seen and at most every ``jwks_cache_ttl``; or
        key_file: one key: a PEM public key (RS*, PS*, ES*, EdDSA) or, for
            HS256/384/512 only, the shared secret's bytes (a trailing newline
            dropped; at least as many bytes as the hash, RFC 7518 section 3.2).
        audience: accepted ``aud`` values (one must match); default none.
        issuer: the required ``iss``; default none. One of audience and issuer
            is required.
        algorithms: accepted ``alg`` values; default every asymmetric one
            (RS*, PS*, ES*, EdDSA). HMAC (HS*) only with ``key_file``, never
            mixed with asymmetric ones; ``none`` never.
        leeway: seconds of clock skew allowed on ``exp`` and ``nbf``; default 0.
        jwks_cache_ttl: seconds a fetched JWK Set is used; default 300.
        jwks_timeout: seconds to fetch the JWK Set; default 5.
    """

    claim: str = "sub"
    jwks_file: Path | None = None
    jwks_url: str | None = None
    key_file: Path | None = None
    audience: tuple[str, ...] = ()
    issuer: str | None = None
    algorithms: tuple[str, ...] = _ASYMMETRIC
    leeway: float = 0.0
    jwks_cache_ttl: float = 300.0
    jwks_timeout: float = 5.0
    kind: Literal["jwt"] = "jwt"


#: What a route's records are partitioned by (the principal; DESIGN: scope).
Scope: TypeAlias = AuthorizationScope | HeaderScope | JWTScope


@dataclass(frozen=True, slots=True)
class Outcomes:
    """``outcomes = { ... }``: what each answer or failure does to the record (DESIGN: outcome policy).

    In the file, ``store``, ``release`` and ``hold`` each list statuses
    (``504``), status classes (``"5xx"``) and failure names (:data:`FAILURES`,
    or ``"unknown"`` for every failure after the request was sent). A status not
    listed gets idempo's default (store 2xx-4xx except 408, 409, 425 and 429;
    release 5xx); an exact status wins over its class.

    Attributes:
        statuses: verdicts for single statuses.
        status_classes: verdicts for classes, by first digit (``5`` for ``"5xx"``).
        failures: the verdict of every failure name; default release for
            :data:`FAILURES_NOT_SENT`, hold for :data:`FAILURES_SENT`.
        hold_ttl: seconds a held key answers 409 before a retry may execute
            again; default the route's ``record_ttl``.
        on_takeover: what a request that finds an expired lease with no result
            does (the proxy crashed mid-exchange): ``"hold"`` answers 409 until
            the record expires, because the upstream may have executed it;
            ``"execute"`` forwards it again (with the next ``Idempo-Attempt``).
            Default ``"hold"``.
    """

    statuses: Mapping[int, Verdict] = field(default_factory=lambda: MappingProxyType({}))
    status_classes: Mapping[int, Verdict] = field(default_factory=lambda: MappingProxyType({}))
    failures: Mapping[str, Verdict] = field(
        default_factory=lambda: MappingProxyType(
            {**dict.fromkeys(FAILURES_NOT_SENT, Verdict.RELEASE), **dict.fromkeys(FAILURES_SENT, Verdict.HOLD)}
        )
    )
    hold_ttl: float = 86400.0
    on_takeover: Literal["hold", "execute"] = "hold"

    def verdict_for_status(self, status: int) -> Verdict:
        """The verdict for an upstream answer of this status."""
        verdict = self.statuses.get(status)
        if verdict is None:
            verdict = self.status_classes.get(status // 100)
        return default_verdict(status) if verdict is None else verdict

    def verdict_for_failure(self, failure: str) -> Verdict:
        """The verdict for a failure named in :data:`FAILURES`.

        Raises:
            KeyError: an unknown failure name.
        """
        return self.failures[failure]

    def status_verdicts(self) -> dict[int, Verdict]:
        """Every status this configuration decides, as :class:`~idempo.Policy`'s ``status_verdicts``."""
        verdicts: dict[int, Verdict] = {}
        for digit, verdict in self.status_classes.items():
            verdicts.update(dict.fromkeys(range(digit * 100, digit * 100 + 100), verdict))
        verdicts.update(self.statuses)
        return verdicts


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """The settings of one route (``[defaults]``, and each ``[[route]]`` over them).

    Attributes:
        methods: methods made idempotent (others are forwarded untouched);
            default ``["POST", "PATCH"]``.
        require_key: answer 400 to such a request without ``Idempotency-Key``
            (else it is forwarded untouched); default false.
        record_ttl: seconds a completed record is kept and replayed; default 24 h.
        lease_ttl: seconds a request holds its key while the upstream works;
            must exceed ``upstream.deadline``; default ``upstream.deadline`` + 30.
        wait: seconds a duplicate of a running request waits for its result
            before 409; default 0.
        retry_after: the ``Retry-After`` seconds sent with 409 and 503; default 1.
        fail_open: forward without idempotency when the store is unreachable,
            instead of 503; default false (an outage must not cause a second
            execution).
        store_set_cookie: store and replay ``Set-Cookie``; default false
            (credentials do not belong at rest, nor in another client's replay).
        max_request_body: bytes; default ``proxy.max_request_body``.
        max_response_body: bytes; default ``proxy.max_response_body``.
        fingerprint_body: ``"json-canonical"`` (JSON bodies compared in
            canonical form, numbers by exact decimal value: see
            :mod:`idempo._core.fingerprint`) or ``"bytes"``; ``fingerprint = { body = ... }`` in
            the file; default ``"json-canonical"``.
        scope: the principal records are partitioned by; default
            :class:`AuthorizationScope`.
        outcomes: the verdicts of answers and failures.
    """

    methods: tuple[str, ...] = tuple(sorted(DEFAULT_METHODS, reverse=True))
    require_key: bool = False
    record_ttl: float = 86400.0
    lease_ttl: float = 90.0
    wait: float = 0.0
    retry_after: int = 1
    fail_open: bool = False
    store_set_cookie: bool = False
    max_request_body: int = 10 * 1024 * 1024
    max_response_body: int = 10 * 1024 * 1024
    fingerprint_body: Literal["json-canonical", "bytes"] = "json-canonical"
    scope: Scope = field(default_factory=AuthorizationScope)
    outcomes: Outcomes = field(default_factory=Outcomes)

    def policy(self) -> Policy:
        """The :class:`~idempo.Policy` for these settings (scope and failures are the proxy's own)."""
        return Policy(
            record_ttl=self.record_ttl,
            lease_ttl=self.lease_ttl,
            methods=self.methods,
            require_key=self.require_key,
            wait=self.wait,
            retry_after=self.retry_after,
            fail_open=self.fail_open,
            canonical_json=self.fingerprint_body == "json-canonical",
            max_request_body=self.max_request_body,
            max_response_body=self.max_response_body,
            store_set_cookie=self.store_set_cookie,
            status_verdicts=self.outcomes.status_verdicts(),
            hold_ttl=self.outcomes.hold_ttl,
        )


@dataclass(frozen=True, slots=True)
class Route:
    """One ``[[route]]``, or the ``default`` route used when none matches.

    Attributes:
        name: a unique name (metrics label it); default the path.
        path: a Starlette path (``/v1/payments``, ``/v1/files/{rest:path}``,
            ``/v1/orders/{id:int}``); ``None`` for the default route.
        passthrough: forward everything untouched (no key, no record).
        settings: the route's settings; ``None`` for a passthrough route.
        regex: ``path`` compiled by Starlette's ``compile_path``.
    """

    name: str
    path: str | None
    passthrough: bool = False
    settings: RouteSettings | None = None
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, path: str) -> bool:
        """True when a request path (``scope["path"]``) is this route's."""
        return self.regex is None or self.regex.match(path) is not None


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """A whole, checked configuration (:func:`load_config`).

    Attributes:
        proxy: the ``[proxy]`` table.
        upstream: the ``[upstream]`` table.
        defaults: the ``[defaults]`` table, resolved.
        routes: the ``[[route]]`` tables in order, each resolved over ``defaults``.
        default_route: the route for a path no route matches (``defaults``).
        source: the file read, or ``None``.
        overridden: the keys set by flags or the environment, with where from
            (``{"proxy.workers": "IDEMPO_PROXY_WORKERS"}``).
    """

    proxy: ProxySettings
    upstream: UpstreamSettings
    defaults: RouteSettings
    routes: tuple[Route, ...] = ()
    default_route: Route = field(default_factory=lambda: Route("default", None, settings=RouteSettings()))
    source: str | None = field(default=None, compare=False)
    overridden: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def route_for(self, path: str) -> Route:
        """The first route whose path matches ``path``, else :attr:`default_route`."""
        for route in self.routes:
            if route.matches(path):
                return route
        return self.default_route


# --- Loading ------------------------------------------------------------------------------


class _Reader:
    """Reads values out of the raw tables, naming the source and key path of anything wrong."""

    def __init__(self, file: str | None, base: Path, origins: Mapping[str, str]) -> None:
        self.file = file
        self.base = base
        self.origins = origins

    def error(self, key: str, value: object, expected: str) -> ProxyConfigError:
        source = self.origins.get(key) or self.file or "(no config file)"
        return ProxyConfigError(source, key, value, expected)

    def table(self, key: str, value: object, known: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, value, "expected a table")
        for name in value:
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
                raise self.error(
                    _join(key, name), value[name], f"unknown key; {did_you_mean}expected one of: {', '.join(known)}"
                )
        return value

    def parse(self, key: str, value: object, parser: Callable[[object], Any]) -> Any:
        try:
            return parser(value)
        except ValueError as exc:
            raise self.error(key, value, str(exc)) from None

    def duration(self, key: str, value: object, *, positive: bool = True) -> float:
        seconds: float = self.parse(key, value, parse_duration)
        if positive and seconds <= 0:
            raise self.error(key, value, "expected a duration above zero")
        return seconds

    def size(self, key: str, value: object) -> int:
        size: int = self.parse(key, value, parse_size)
        return size

    def boolean(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, value, "expected true or false")
        return value

    def integer(self, key: str, value: object, minimum: int, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, value, f"expected {what}, a whole number of {minimum} or more")
        return value

    def string(self, key: str, value: object, what: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(key, value, f"expected {what}")
        return value

    def strings(self, key: str, value: object, what: str) -> tuple[str, ...]:
        if isinstance(value, str):
            return (self.string(key, value, what),)
        if not isinstance(value, list):
            raise self.error(key, value, f"expected {what}, or a list of them")
        return tuple(self.string(f"{key}[{i}]", item, what) for i, item in enumerate(value))

    def path(self, key: str, value: object, what: str) -> Path:
        path = self.base / self.string(key, value, f"the path of {what}")
        if not path.is_file():
            raise self.error(key, value, f"expected the path of {what}; no such file: {path}")
        return path

    def choice(self, key: str, value: object, choices: Sequence[str]) -> str:
        if value not in choices:
            raise self.error(key, value, "expected one of " + ", ".join(json.dumps(c) for c in choices))
        assert isinstance(value, str)
        return value


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


_PROXY_KEYS = (
    "listen",
    "upstream",
    "store",
    "admin_listen",
    "trusted_proxies",
    "max_request_body",
    "max_response_body",
    "workers",
    "graceful_timeout",
    "disable",
)
_UPSTREAM_KEYS = (
    "connect_timeout",
    "pool_timeout",
    "deadline",
    "keepalive_expiry",
    "max_connections",
    "max_keepalive_connections",
    "verify",
    "client",
)
_SETTING_KEYS = (
    "methods",
    "require_key",
    "record_ttl",
    "lease_ttl",
    "wait",
    "retry_after",
    "fail_open",
    "store_set_cookie",
    "max_request_body",
    "max_response_body",
    "fingerprint",
    "scope",
    "outcomes",
)
_ROUTE_KEYS = ("name", "path", "passthrough", *_SETTING_KEYS)
_SCOPE_KEYS = {
    "authorization": ("from",),
    "header": ("from", "name"),
    "jwt": (
        "from",
        "claim",
        "jwks_file",
        "jwks_url",
        "key_file",
        "audience",
        "issuer",
        "algorithms",
        "leeway",
        "jwks_cache_ttl",
        "jwks_timeout",
    ),
}
_OUTCOME_KEYS = ("store", "release", "hold", "hold_ttl", "on_takeover")
_FINGERPRINT_KEYS = ("body",)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2
_LISTEN = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<v6port>\d{1,5})|(?P<host>[A-Za-z0-9.-]+):(?P<port>\d{1,5})")
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _listen(reader: _Reader, key: str, value: object) -> ListenAddress:
    text = reader.string(key, value, "host:port, [IPv6]:port or unix:/path")
    if text.startswith("unix:"):
        if not text[5:].startswith("/") or len(text) < 7:
            raise reader.error(key, value, "expected unix:/absolute/path.sock")
        return ListenAddress(None, None, text[5:])
    match = _LISTEN.fullmatch(text)
    port = int((match.group("port") or match.group("v6port")) if match else -1)
    if match is None or port > 65535:
        raise reader.error(key, value, "expected host:port (127.0.0.1:8080), [IPv6]:port or unix:/path.sock")
    return ListenAddress(match.group("host") or match.group("v6"), port)


def _upstream(reader: _Reader, key: str, value: object) -> UpstreamTarget:
    text = reader.string(key, value, "the upstream's URL: http://host:port, https://host or unix:/path.sock")
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/") or len(path) < 2:
            raise reader.error(key, value, "expected unix:/absolute/path.sock")
        return UpstreamTarget(text, "http://localhost", path)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise reader.error(key, value, "expected the upstream's URL: http://host:port, https://host or unix:/path.sock")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise reader.error(key, value, "expected a URL without a path or query: requests keep their own")
    if "@" in parts.netloc:
        # The upstream's Host (and X-Forwarded-Host) would carry user:password, and aiohttp
        # would add an Authorization of its own. Shown without them: a credential is not printed.
        shown = text.replace(parts.netloc, "...@" + parts.netloc.rpartition("@")[2], 1)
        raise reader.error(key, shown, "expected a URL without user:password@: requests keep their own credentials")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise reader.error(key, value, "expected a port between 0 and 65535") from None
    base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    return UpstreamTarget(text, base)


def _store(reader: _Reader, key: str, value: object) -> str:
    text = reader.string(key, value, "a store URL")
    if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise reader.error(
            key, value, "expected a store URL: memory://, sqlite:///path.db, postgresql://..., redis://..."
        )
    return text


def _networks(reader: _Reader, key: str, value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list):
        raise reader.error(key, value, 'expected a list of networks such as ["10.0.0.0/8", "127.0.0.1"]')
    networks = []
    for i, item in enumerate(value):
        text = reader.string(f"{key}[{i}]", item, 'a network such as "10.0.0.0/8" or an address')
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as exc:
            raise reader.error(f"{key}[{i}]", item, f'expected a network such as "10.0.0.0/8" ({exc})') from None
    return tuple(networks)


def _proxy(reader: _Reader, raw: dict[str, Any]) -> ProxySettings:
    table = reader.table("proxy", raw.get("proxy", {}), _PROXY_KEYS)
    if "upstream" not in table:
        raise reader.error(
            "proxy.upstream",
            _MISSING,
            "required: the upstream's URL (http://host:port, https://host or unix:/path.sock), "
            "in [proxy], with --upstream or IDEMPO_PROXY_UPSTREAM",
        )
    defaults = ProxySettings(ListenAddress("127.0.0.1", 8080), UpstreamTarget("", ""))
    get = table.get
    settings = ProxySettings(
        listen=_listen(reader, "proxy.listen", get("listen", "127.0.0.1:8080")),
        upstream=_upstream(reader, "proxy.upstream", table["upstream"]),
        store=_store(reader, "proxy.store", get("store", defaults.store)),
        admin_listen=_listen(reader, "proxy.admin_listen", table["admin_listen"]) if "admin_listen" in table else None,
        trusted_proxies=_networks(reader, "proxy.trusted_proxies", get("trusted_proxies", [])),
        max_request_body=reader.size("proxy.max_request_body", get("max_request_body", defaults.max_request_body)),
        max_response_body=reader.size("proxy.max_response_body", get("max_response_body", defaults.max_response_body)),
        workers=reader.integer("proxy.workers", get("workers", 1), 1, "a number of worker processes"),
        graceful_timeout=reader.duration(
            "proxy.graceful_timeout", get("graceful_timeout", defaults.graceful_timeout), positive=False
        ),
        disable=reader.boolean("proxy.disable", get("disable", False)),
    )
    if settings.workers > 1 and settings.store.lower().startswith("memory:"):
        raise reader.error(
            "proxy.workers",
            settings.workers,
            "memory:// keeps records inside one process: with several workers a duplicate reaching another "
            "worker executes again; use one worker, or a shared store (sqlite:///file.db, redis://, postgresql://)",
        )
    return settings


def _upstream_settings(reader: _Reader, raw: dict[str, Any]) -> UpstreamSettings:
    table = reader.table("upstream", raw.get("upstream", {}), _UPSTREAM_KEYS)
    defaults = UpstreamSettings()
    get = table.get
    verify: bool | Path = True
    if "verify" in table:
        value = table["verify"]
        verify = value if isinstance(value, bool) else reader.path("upstream.verify", value, "a CA bundle (PEM)")
    settings = UpstreamSettings(
        connect_timeout=reader.duration("upstream.connect_timeout", get("connect_timeout", defaults.connect_timeout)),
        pool_timeout=reader.duration("upstream.pool_timeout", get("pool_timeout", defaults.pool_timeout)),
        deadline=reader.duration("upstream.deadline", get("deadline", defaults.deadline)),
        keepalive_expiry=reader.duration(
            "upstream.keepalive_expiry", get("keepalive_expiry", defaults.keepalive_expiry), positive=False
        ),
        max_connections=reader.integer(
            "upstream.max_connections", get("max_connections", defaults.max_connections), 1, "a number of connections"
        ),
        max_keepalive_connections=reader.integer(
            "upstream.max_keepalive_connections",
            get("max_keepalive_connections", defaults.max_keepalive_connections),
            0,
            "a number of connections",
        ),
        verify=verify,
        client="httpx"
        if reader.choice("upstream.client", get("client", defaults.client), ("aiohttp", "httpx")) == "httpx"
        else "aiohttp",
    )
    if settings.max_keepalive_connections > settings.max_connections:
        raise reader.error(
            "upstream.max_keepalive_connections",
            settings.max_keepalive_connections,
            f"expected at most upstream.max_connections ({settings.max_connections})",
        )
    return settings


class _Layers:
    """A route's settings: the route's table over ``[defaults]``; the last layer that has a key wins."""

    def __init__(self, layers: list[tuple[str, dict[str, Any]]]) -> None:
        self.layers = layers

    def get(self, key: str) -> tuple[Any, str]:
        """The value and its key path, or ``(_MISSING, "")``."""
        for prefix, table in reversed(self.layers):
            if key in table:
                return table[key], f"{prefix}.{key}"
        return _MISSING, ""

    def sub(self, key: str) -> list[tuple[str, dict[str, Any]]]:
        """Each layer's inline table ``key`` (e.g. ``outcomes``), as (key path, table), oldest first."""
        return [(f"{prefix}.{key}", table[key]) for prefix, table in self.layers if key in table]


def _methods(reader: _Reader, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise reader.error(key, value, 'expected a list of methods such as ["POST", "PATCH"]')
    methods: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _TOKEN.fullmatch(item):
            raise reader.error(f"{key}[{i}]", item, 'expected a method name such as "POST"')
        if item.upper() not in methods:
            methods.append(item.upper())
    return tuple(methods)


def _scope(reader: _Reader, key: str, value: object) -> Scope:
    if not isinstance(value, dict):
        raise reader.error(key, value, 'expected a table such as { from = "authorization" }')
    kind = reader.choice(_join(key, "from"), value.get("from", _MISSING), tuple(_SCOPE_KEYS))
    if kind == "jwt" and value.get("verify", True) is False:
        raise reader.error(
            _join(key, "verify"),
            False,
            "a JWT scope is always verified: a replay never reaches the upstream, so an unverified claim "
            "would let a forged token read another user's replay",
        )
    table = reader.table(key, value, _SCOPE_KEYS[kind])
    if kind == "authorization":
        return AuthorizationScope()
    if kind == "header":
        name = table.get("name", _MISSING)
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise reader.error(_join(key, "name"), name, 'expected a header name such as "X-Tenant-Id"')
        return HeaderScope(name.lower())
    return _jwt_scope(reader, key, table)


def _jwt_scope(reader: _Reader, key: str, table: dict[str, Any]) -> JWTScope:
    sources = [name for name in ("jwks_file", "jwks_url", "key_file") if name in table]
    why = (
        "a JWT scope must be verified: a replay never reaches the upstream, so an unverified claim would let "
        "a forged token read another user's replay"
    )
    if not sources:
        raise reader.error(key, table, f"{why}; set jwks_file, jwks_url or key_file")
    if len(sources) > 1:
        raise reader.error(_join(key, sources[1]), table[sources[1]], f"expected one key source, not {sources}")
    if "audience" not in table and "issuer" not in table:
        raise reader.error(
            key, table, f"{why}; set audience (or issuer), so a token issued for another service is refused"
        )
    claim = reader.string(_join(key, "claim"), table.get("claim", "sub"), 'a claim name such as "sub"')
    audience = reader.strings(_join(key, "audience"), table["audience"], "an audience") if "audience" in table else ()
    issuer = reader.string(_join(key, "issuer"), table["issuer"], "an issuer") if "issuer" in table else None
    algorithms = _algorithms(reader, key, table, hmac_allowed="key_file" in table)
    defaults = JWTScope()
    scope = JWTScope(
        claim=claim,
        audience=audience,
        issuer=issuer,
        algorithms=algorithms,
        leeway=reader.duration(_join(key, "leeway"), table.get("leeway", defaults.leeway), positive=False),
        jwks_cache_ttl=reader.duration(
            _join(key, "jwks_cache_ttl"), table.get("jwks_cache_ttl", defaults.jwks_cache_ttl)
        ),
        jwks_timeout=reader.duration(_join(key, "jwks_timeout"), table.get("jwks_timeout", defaults.jwks_timeout)),
    )
    source = sources[0]
    value = table[source]
    name = _join(key, source)
    if source == "jwks_url":
        text = reader.string(name, value, "a JWK Set URL")
        parts = urlsplit(text)
        if not (parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS)):
            raise reader.error(name, value, "expected an https:// URL (http:// only on loopback)")
        return replace(scope, jwks_url=text)
    path = reader.path(name, value, "a JWK Set (JSON)" if source == "jwks_file" else "a key (PEM) or secret")
    scope = replace(scope, jwks_file=path) if source == "jwks_file" else replace(scope, key_file=path)
    try:
        load_keys(scope)
    except ImportError as exc:
        raise reader.error(name, value, f"a jwt scope needs `pip install idempo[proxy]` ({exc})") from None
    except (OSError, ValueError) as exc:
        raise reader.error(name, value, str(exc)) from None
    return scope


def _algorithms(reader: _Reader, key: str, table: dict[str, Any], *, hmac_allowed: bool) -> tuple[str, ...]:
    name = _join(key, "algorithms")
    if "algorithms" not in table:
        return _ASYMMETRIC
    value = table["algorithms"]
    known = (*_ASYMMETRIC, *_HMAC_MIN_BYTES)
    algorithms = reader.strings(name, value, 'an algorithm name such as "RS256"')
    for i, algorithm in enumerate(algorithms):
        if algorithm not in known:
            raise reader.error(f"{name}[{i}]", algorithm, "expected one of " + ", ".join(known))
    hmac = [a for a in algorithms if a in _HMAC_MIN_BYTES]
    if hmac and len(hmac) != len(algorithms):
        raise reader.error(
            name, value, "expected HMAC (HS*) or asymmetric algorithms, not both: one key must not serve both kinds"
        )
    if hmac and not hmac_allowed:
        raise reader.error(name, value, "HMAC (HS*) algorithms need key_file holding the shared secret")
    return algorithms


def _outcomes(reader: _Reader, layers: _Layers, record_ttl: float) -> Outcomes:
    statuses: dict[int, Verdict] = {}
    classes: dict[int, Verdict] = {}
    failures = dict(Outcomes().failures)
    hold_ttl: float | None = None
    on_takeover: Literal["hold", "execute"] = "hold"
    for prefix, table in layers.sub("outcomes"):
        table = reader.table(prefix, table, _OUTCOME_KEYS)
        seen: dict[object, str] = {}  # within one table, an outcome named twice must agree
        for verdict in (Verdict.STORE, Verdict.RELEASE, Verdict.HOLD):
            name = f"{prefix}.{verdict.value}"
            items = table.get(verdict.value, [])
            if not isinstance(items, list):
                raise reader.error(name, items, 'expected a list of statuses (504), classes ("5xx") or failures')
            for i, item in enumerate(items):
                item_key = f"{name}[{i}]"
                targets = _outcome_targets(reader, item_key, item, verdict)
                for target in targets:
                    if target in seen and seen[target] != verdict.value:
                        raise reader.error(item_key, item, f"already listed in {prefix}.{seen[target]}")
                    seen[target] = verdict.value
                    if isinstance(target, int):
                        statuses[target] = verdict
                    elif target.endswith("xx"):
                        classes[int(target[0])] = verdict
                    else:
                        failures[target] = verdict
        if "hold_ttl" in table:
            hold_ttl = reader.duration(f"{prefix}.hold_ttl", table["hold_ttl"])
        if "on_takeover" in table:
            choice = reader.choice(f"{prefix}.on_takeover", table["on_takeover"], ("hold", "execute"))
            on_takeover = "execute" if choice == "execute" else "hold"
    return Outcomes(
        statuses=MappingProxyType(dict(sorted(statuses.items()))),
        status_classes=MappingProxyType(dict(sorted(classes.items()))),
        failures=MappingProxyType(failures),
        hold_ttl=record_ttl if hold_ttl is None else hold_ttl,
        on_takeover=on_takeover,
    )


def _outcome_targets(reader: _Reader, key: str, item: object, verdict: Verdict) -> tuple[int | str, ...]:
    if isinstance(item, int) and not isinstance(item, bool):
        if not 200 <= item <= 599:
            raise reader.error(key, item, "expected a final status, 200 to 599")
        return (item,)
    if isinstance(item, str) and re.fullmatch(r"[2-5]xx", item):
        return (item,)
    if item == "unknown" or item in FAILURES:
        assert isinstance(item, str)
        if verdict is Verdict.STORE:
            raise reader.error(key, item, "a failure has no answer to store: expected it in hold or release")
        return FAILURES_SENT if item == "unknown" else (item,)
    raise reader.error(
        key,
        item,
        'expected a status (504), a class ("5xx"), "unknown" or a failure: ' + ", ".join(FAILURES),
    )


def _settings(reader: _Reader, layers: _Layers, proxy: ProxySettings, upstream: UpstreamSettings) -> RouteSettings:
    def get(name: str, default: object) -> tuple[str, Any]:
        """(key path, value) of a setting: the route's, else [defaults]', else ``default``."""
        value, key = layers.get(name)
        return (f"{layers.layers[-1][0]}.{name}", default) if value is _MISSING else (key, value)

    methods = _methods(reader, *get("methods", ["POST", "PATCH"]))
    record_ttl = reader.duration(*get("record_ttl", 86400.0))
    key, value = get("lease_ttl", upstream.deadline + 30)
    lease_ttl = reader.duration(key, value)
    if lease_ttl <= upstream.deadline:
        raise reader.error(
            key,
            value,
            f"expected more than upstream.deadline ({_display(_format_duration(upstream.deadline))}): a lease that "
            "ends while the upstream may still answer lets a retry take the key over and send the request again",
        )
    fingerprint: Literal["json-canonical", "bytes"] = "json-canonical"
    for prefix, table in layers.sub("fingerprint"):
        table = reader.table(prefix, table, _FINGERPRINT_KEYS)
        if "body" in table:
            body = reader.choice(f"{prefix}.body", table["body"], ("json-canonical", "bytes"))
            fingerprint = "bytes" if body == "bytes" else "json-canonical"
    return RouteSettings(
        methods=methods,
        require_key=reader.boolean(*get("require_key", False)),
        record_ttl=record_ttl,
        lease_ttl=lease_ttl,
        wait=reader.duration(*get("wait", 0.0), positive=False),
        retry_after=reader.integer(*get("retry_after", 1), 0, "seconds"),
        fail_open=reader.boolean(*get("fail_open", False)),
        store_set_cookie=reader.boolean(*get("store_set_cookie", False)),
        max_request_body=reader.size(*get("max_request_body", proxy.max_request_body)),
        max_response_body=reader.size(*get("max_response_body", proxy.max_response_body)),
        fingerprint_body=fingerprint,
        scope=_scope(reader, *get("scope", {"from": "authorization"})),
        outcomes=_outcomes(reader, layers, record_ttl),
    )


def _routes(
    reader: _Reader, raw: dict[str, Any], defaults: dict[str, Any], proxy: ProxySettings, upstream: UpstreamSettings
) -> tuple[Route, ...]:
    tables = raw.get("route", [])
    if not isinstance(tables, list):
        raise reader.error("route", tables, "expected [[route]] tables")
    routes: list[Route] = []
    names: dict[str, str] = {}
    for index, value in enumerate(tables):
        prefix = f"route[{index}]"
        table = reader.table(prefix, value, _ROUTE_KEYS)
        if "path" not in table:
            raise reader.error(f"{prefix}.path", _MISSING, 'required: a Starlette path such as "/v1/payments"')
        path = reader.string(f"{prefix}.path", table["path"], "a path starting with /")
        if not path.startswith("/"):
            raise reader.error(f"{prefix}.path", path, "expected a path starting with /")
        regex = _compile(reader, f"{prefix}.path", path)
        name = reader.string(f"{prefix}.name", table.get("name", path), "a route name")
        if name == "default" or name in names:
            where = "the routes no path matches" if name == "default" else names[name]
            raise reader.error(f"{prefix}.name", name, f"expected a unique name; {name!r} already names {where}")
        names[name] = prefix
        passthrough = reader.boolean(f"{prefix}.passthrough", table.get("passthrough", False))
        if passthrough:
            for other in table:
                if other in _SETTING_KEYS:
                    raise reader.error(
                        f"{prefix}.{other}", table[other], "has no effect on a passthrough route (remove it)"
                    )
            routes.append(Route(name, path, passthrough=True, regex=regex))
            continue
        settings = _settings(reader, _Layers([("defaults", defaults), (prefix, table)]), proxy, upstream)
        routes.append(Route(name, path, settings=settings, regex=regex))
    return tuple(routes)


def _compile(reader: _Reader, key: str, path: str) -> re.Pattern[str]:
    try:
        from starlette.routing import compile_path
    except ImportError as exc:
        raise reader.error(key, path, f"route paths need Starlette: `pip install idempo[proxy]` ({exc})") from None
    try:
        regex, _, _ = compile_path(path)
    except (AssertionError, ValueError) as exc:
        raise reader.error(key, path, f"expected a Starlette path: {exc}") from None
    return regex


# --- Overrides: flags and the environment ---------------------------------------------------


def _from_environment(key: str, text: str) -> object:
    """A variable's text as the type its [proxy] key takes (the loader then checks it as any value)."""
    if key == "workers":
        return int(text) if text.strip().isdigit() else text
    if key == "disable":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        return text
    if key == "trusted_proxies":
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _apply_overrides(raw: dict[str, Any], flags: Mapping[str, object], environ: Mapping[str, str]) -> dict[str, str]:
    origins: dict[str, str] = {}
    table = raw.setdefault("proxy", {})
    if not isinstance(table, dict):
        return origins  # the reader reports the bad table
    for name, value in flags.items():
        if name not in _PROXY_KEYS:
            raise ProxyConfigError(
                f"--{name.replace('_', '-')}",
                "",
                _MISSING,
                "not a proxy setting; expected one of " + ", ".join(_PROXY_KEYS),
            )
        if value is not None:
            table[name] = value
            origins[f"proxy.{name}"] = f"--{name.replace('_', '-')}"
    for name, text in environ.items():
        if not name.startswith("IDEMPO_PROXY_") or not text:
            continue
        if name not in ENVIRONMENT:
            hint = difflib.get_close_matches(name, list(ENVIRONMENT), n=1)
            did_you_mean = f"did you mean {hint[0]}? " if hint else ""
            raise ProxyConfigError(
                name, "", _MISSING, f"unknown variable; {did_you_mean}expected one of: {', '.join(ENVIRONMENT)}"
            )
        key = ENVIRONMENT[name]
        if key is not None:
            table[key] = _from_environment(key, text)
            origins[f"proxy.{key}"] = name
    return origins


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProxyConfig:
    """Read, override and check a proxy configuration.

    Args:
        path: the TOML file; ``None`` for none (everything from flags, the
            environment and the defaults). ``IDEMPO_PROXY_CONFIG`` in
            ``environ`` replaces it.
        flags: ``[proxy]`` settings from the command line, by key (``workers``,
            ``admin_listen``, ...); ``None`` values are ignored. They override the file.
        environ: the environment (default ``os.environ``); its ``IDEMPO_PROXY_*``
            variables (:data:`ENVIRONMENT`) override the file and the flags.
            An unknown ``IDEMPO_PROXY_*`` variable is an error, so a misspelt one
            is never silently ignored.

    Returns:
        The checked configuration.

    Raises:
        ProxyConfigError: the file cannot be read or is not TOML, or a value or
            a rule between values is wrong (see the module's docstring).
    """
    environ = os.environ if environ is None else environ
    if environ.get("IDEMPO_PROXY_CONFIG"):
        path = environ["IDEMPO_PROXY_CONFIG"]
    raw: dict[str, Any] = {}
    file: str | None = None
    base = Path.cwd()
    if path is not None:
        file = os.fspath(path)
        base = Path(file).resolve().parent
        try:
            with open(file, "rb") as stream:
                raw = tomllib.load(stream)
        except OSError as exc:
            raise ProxyConfigError(
                file, "", _MISSING, f"cannot read the configuration: {exc.strerror or exc}"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ProxyConfigError(file, "", _MISSING, f"not valid TOML: {exc}") from None
    origins = _apply_overrides(raw, flags or {}, environ)
    reader = _Reader(file, base, origins)
    reader.table("", raw, ("proxy", "upstream", "defaults", "route"))
    proxy = _proxy(reader, raw)
    upstream = _upstream_settings(reader, raw)
    defaults_table = reader.table("defaults", raw.get("defaults", {}), _SETTING_KEYS)
    defaults = _settings(reader, _Layers([("defaults", defaults_table)]), proxy, upstream)
    routes = _routes(reader, raw, defaults_table, proxy, upstream)
    return ProxyConfig(
        proxy=proxy,
        upstream=upstream,
        defaults=defaults,
        routes=routes,
        default_route=Route("default", None, settings=defaults),
        source=file,
        overridden=MappingProxyType(origins),
    )


# --- Writing: the effective configuration as TOML --------------------------------------------


def _toml_string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_string(name)


def _display(value: object) -> str:
    try:
        return _toml(value)
    except TypeError:
        return repr(value)


def _mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _scope_table(scope: Scope, reveal: bool) -> dict[str, object]:
    if isinstance(scope, AuthorizationScope):
        return {"from": "authorization"}
    if isinstance(scope, HeaderScope):
        return {"from": "header", "name": scope.name}
    table: dict[str, object] = {"from": "jwt", "claim": scope.claim}
    if scope.jwks_file is not None:
        table["jwks_file"] = scope.jwks_file
    if scope.jwks_url is not None:
        table["jwks_url"] = scope.jwks_url if reveal else _mask(scope.jwks_url)
    if scope.key_file is not None:
        table["key_file"] = scope.key_file
    if scope.audience:
        table["audience"] = scope.audience[0] if len(scope.audience) == 1 else list(scope.audience)
    if scope.issuer is not None:
        table["issuer"] = scope.issuer
    table["algorithms"] = list(scope.algorithms)
    table["leeway"] = _format_duration(scope.leeway)
    if scope.jwks_url is not None:
        table["jwks_cache_ttl"] = _format_duration(scope.jwks_cache_ttl)
        table["jwks_timeout"] = _format_duration(scope.jwks_timeout)
    return table


def _outcomes_table(outcomes: Outcomes) -> dict[str, object]:
    lists: dict[str, list[object]] = {"store": [], "release": [], "hold": []}
    for verdict_name, verdict in (("store", Verdict.STORE), ("release", Verdict.RELEASE), ("hold", Verdict.HOLD)):
        sent = [f for f in FAILURES_SENT if outcomes.failures[f] is verdict]
        if len(sent) == len(FAILURES_SENT):
            sent = ["unknown"]
        not_sent = [f for f in FAILURES_NOT_SENT if outcomes.failures[f] is verdict]
        classes = [f"{digit}xx" for digit, v in outcomes.status_classes.items() if v is verdict]
        statuses = [status for status, v in outcomes.statuses.items() if v is verdict]
        lists[verdict_name] = [*sent, *not_sent, *classes, *statuses]
    table: dict[str, object] = {name: items for name, items in lists.items() if items}
    table["hold_ttl"] = _format_duration(outcomes.hold_ttl)
    table["on_takeover"] = outcomes.on_takeover
    return table


def _settings_lines(settings: RouteSettings, reveal: bool) -> list[str]:
    values: dict[str, object] = {
        "methods": list(settings.methods),
        "require_key": settings.require_key,
        "record_ttl": _format_duration(settings.record_ttl),
        "lease_ttl": _format_duration(settings.lease_ttl),
        "wait": _format_duration(settings.wait),
        "retry_after": settings.retry_after,
        "fail_open": settings.fail_open,
        "store_set_cookie": settings.store_set_cookie,
        "max_request_body": _format_size(settings.max_request_body),
        "max_response_body": _format_size(settings.max_response_body),
        "fingerprint": {"body": settings.fingerprint_body},
        "scope": _scope_table(settings.scope, reveal),
        "outcomes": _outcomes_table(settings.outcomes),
    }
    return [f"{name} = {_toml(value)}" for name, value in values.items()]


def dump_config(config: ProxyConfig, *, reveal_secrets: bool = False) -> str:
    """The effective configuration as TOML text (``idempo proxy --print-config``).

    Every setting is written out, each route with everything it inherits from
    ``[defaults]`` resolved, and file paths made absolute, so loading the text
    gives a configuration equal to ``config``.

    Args:
        config: the configuration.
        reveal_secrets: write URL passwords (the store's, a JWK Set URL's) as
            they are; by default they are written as ``***``, and the text no
            longer loads to an equal configuration.

    Returns:
        TOML text, ending with a newline.
    """
    proxy, upstream = config.proxy, config.upstream
    lines = ["# idempo proxy: the effective configuration (file < flags < IDEMPO_PROXY_* variables)"]
    if config.source is not None:
        lines.append(f"# read from {config.source}")
    for key, origin in config.overridden.items():
        lines.append(f"# {key} set by {origin}")
    proxy_values: dict[str, object] = {
        "listen": str(proxy.listen),
        "upstream": proxy.upstream.url,
        "store": proxy.store if reveal_secrets else _mask(proxy.store),
    }
    if proxy.admin_listen is not None:
        proxy_values["admin_listen"] = str(proxy.admin_listen)
    proxy_values.update(
        {
            "trusted_proxies": [str(network) for network in proxy.trusted_proxies],
            "max_request_body": _format_size(proxy.max_request_body),
            "max_response_body": _format_size(proxy.max_response_body),
            "workers": proxy.workers,
            "graceful_timeout": _format_duration(proxy.graceful_timeout),
            "disable": proxy.disable,
        }
    )
    lines += ["", "[proxy]", *(f"{name} = {_toml(value)}" for name, value in proxy_values.items())]
    upstream_values: dict[str, object] = {
        "connect_timeout": _format_duration(upstream.connect_timeout),
        "pool_timeout": _format_duration(upstream.pool_timeout),
        "deadline": _format_duration(upstream.deadline),
        "keepalive_expiry": _format_duration(upstream.keepalive_expiry),
        "max_connections": upstream.max_connections,
        "max_keepalive_connections": upstream.max_keepalive_connections,
        "verify": upstream.verify,
        "client": upstream.client,
    }
    lines += ["", "[upstream]", *(f"{name} = {_toml(value)}" for name, value in upstream_values.items())]
    lines += ["", "[defaults]", *_settings_lines(config.defaults, reveal_secrets)]
    for route in config.routes:
        lines += ["", "[[route]]", f"name = {_toml(route.name)}", f"path = {_toml(route.path)}"]
        if route.passthrough:
            lines.append("passthrough = true")
        else:
            assert route.settings is not None
            lines += _settings_lines(route.settings, reveal_secrets)
    return "\n".join(lines) + "\n"
