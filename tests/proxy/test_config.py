"""idempo proxy's configuration: the sample, units, defaults, precedence, load errors and the TOML dump."""

from __future__ import annotations

import ipaddress
import json
import textwrap
from pathlib import Path

import pytest

from idempo import Policy, Verdict
from idempo.proxy.config import (
    ENVIRONMENT,
    FAILURES_NOT_SENT,
    FAILURES_SENT,
    AuthorizationScope,
    HeaderScope,
    JWTScope,
    ListenAddress,
    ProxyConfig,
    ProxyConfigError,
    dump_config,
    load_config,
    parse_duration,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "proxy" / "idempo-proxy.toml"
NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str, name: str = "idempo-proxy.toml") -> Path:
    """Write a configuration file (dedented) and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str, **kwargs: object) -> ProxyConfig:
    """Load a configuration from text, with no environment unless given."""
    kwargs.setdefault("environ", NO_ENV)
    return load_config(write(tmp_path, text), **kwargs)  # type: ignore[arg-type]


def error_of(tmp_path: Path, text: str, **kwargs: object) -> ProxyConfigError:
    """The ProxyConfigError loading this text raises."""
    with pytest.raises(ProxyConfigError) as info:
        load_text(tmp_path, text, **kwargs)
    return info.value


MINIMAL = '[proxy]\nupstream = "http://127.0.0.1:8000"\n'


# --- The sample -------------------------------------------------------------------------------


def test_the_sample_loads_as_the_issue_describes() -> None:
    """The shipped sample loads: every value of the issue's sample, and its routes in order."""
    config = load_config(SAMPLE, environ=NO_ENV)
    proxy = config.proxy
    assert proxy.listen == ListenAddress("127.0.0.1", 8080)
    assert proxy.upstream.base_url == "http://127.0.0.1:8000"
    assert proxy.upstream.uds is None
    assert proxy.store == "sqlite:///idempo.db"
    assert proxy.admin_listen == ListenAddress("127.0.0.1", 9090)
    assert proxy.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"),)
    assert proxy.max_request_body == 10 * 1024 * 1024
    assert (config.upstream.connect_timeout, config.upstream.deadline, config.upstream.keepalive_expiry) == (2, 60, 1)

    defaults = config.defaults
    assert defaults.methods == ("POST", "PATCH")
    assert (defaults.record_ttl, defaults.lease_ttl) == (86400, 90)
    assert defaults.scope == AuthorizationScope()
    assert defaults.outcomes.hold_ttl == 86400
    assert defaults.outcomes.on_takeover == "hold"
    assert {f: defaults.outcomes.verdict_for_failure(f) for f in FAILURES_SENT} == dict.fromkeys(
        FAILURES_SENT, Verdict.HOLD
    )

    payments, uploads = config.routes
    assert payments.name == "payments"
    assert payments.settings is not None
    assert payments.settings.methods == ("POST",)
    assert payments.settings.require_key is True
    assert payments.settings.fingerprint_body == "json-canonical"
    assert payments.settings.lease_ttl == 90  # inherited from [defaults]
    scope = payments.settings.scope
    assert isinstance(scope, JWTScope)
    assert (scope.claim, scope.audience, scope.jwks_file) == ("sub", ("payments",), SAMPLE.parent / "jwks.json")
    assert uploads.passthrough is True
    assert uploads.settings is None

    assert config.route_for("/v1/payments").name == "payments"
    assert config.route_for("/v1/files/a/b.pdf").name == "uploads"
    assert config.route_for("/v1/payments/extra").name == "default"
    assert config.route_for("/v1/refunds") is config.default_route
    assert config.default_route.settings == config.defaults


def test_a_file_with_only_the_upstream_gets_every_default(tmp_path: Path) -> None:
    """Defaults: keepalive_expiry 1 s, lease = deadline + 30 s, hold_ttl = record_ttl, on_takeover hold."""
    config = load_text(tmp_path, MINIMAL)
    assert config.proxy.listen == ListenAddress("127.0.0.1", 8080)
    assert config.proxy.store == "sqlite:///idempo.db"
    assert config.proxy.admin_listen is None
    assert config.proxy.workers == 1
    assert config.proxy.graceful_timeout == 30
    assert config.upstream.keepalive_expiry == 1
    assert config.upstream.deadline == 60
    assert config.defaults.lease_ttl == 90
    assert config.defaults.outcomes.hold_ttl == config.defaults.record_ttl == 86400
    assert config.defaults.outcomes.on_takeover == "hold"
    assert {f: config.defaults.outcomes.verdict_for_failure(f) for f in FAILURES_NOT_SENT} == dict.fromkeys(
        FAILURES_NOT_SENT, Verdict.RELEASE
    )
    assert config.routes == ()


def test_default_lease_follows_the_deadline_and_hold_ttl_the_route_record_ttl(tmp_path: Path) -> None:
    """A longer deadline moves the default lease above it; a route's record_ttl moves its default hold_ttl."""
    config = load_text(
        tmp_path,
        MINIMAL + '[upstream]\ndeadline = "5m"\n[[route]]\npath = "/a"\nrecord_ttl = "1h"\n',
    )
    assert config.defaults.lease_ttl == 330
    (route,) = config.routes
    assert route.name == "/a"
    assert route.settings is not None
    assert route.settings.outcomes.hold_ttl == 3600


# --- Units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        *[(90, 90.0), (0.5, 0.5), ("90", 90.0), ("500ms", 0.5), ("90s", 90.0), ("15m", 900.0), ("24h", 86400.0)],
        *[("7d", 604800.0), ("1h30m", 5400.0), ("1.5s", 1.5), (0, 0.0)],
    ],
)
def test_durations(given: object, seconds: float) -> None:
    """Durations are seconds, or numbers with ms/s/m/h/d units."""
    assert parse_duration(given) == seconds


@pytest.mark.parametrize("given", [True, -1, "1 hour", "90 s", "h", "", "1y", float("inf"), None, [1]])
def test_bad_durations(given: object) -> None:
    """A bool, a negative, an unknown unit or a spaced unit is no duration."""
    with pytest.raises(ValueError, match=r"expected|cannot|not a boolean"):
        parse_duration(given)


@pytest.mark.parametrize(
    ("given", "size"),
    [
        *[(0, 0), (1024, 1024), ("512B", 512), ("64KiB", 65536), ("10MiB", 10485760), ("1GiB", 1073741824)],
        *[("10kB", 10000), ("10KB", 10000), ("10MB", 10_000_000), ("1GB", 10**9), ("1.5MiB", 1572864)],
        ("10 MiB", 10485760),
    ],
)
def test_sizes(given: object, size: int) -> None:
    """Sizes are bytes, or numbers with binary (KiB) or decimal (kB) units."""
    assert parse_size(given) == size


@pytest.mark.parametrize("given", [True, -1, "10MiBs", "10mib", "ten", 1.5, "", None])
def test_bad_sizes(given: object) -> None:
    """A bool, a negative, a fraction of a byte or an unknown unit is no size."""
    with pytest.raises(ValueError, match=r"expected|cannot|not a boolean"):
        parse_size(given)


# --- Routes -----------------------------------------------------------------------------------


def test_routes_match_first_wins_in_starlette_syntax(tmp_path: Path) -> None:
    """The first route whose Starlette path matches wins; convertors constrain the match."""
    config = load_text(
        tmp_path,
        MINIMAL
        + """
        [[route]]
        name = "order"
        path = "/v1/orders/{id:int}"
        [[route]]
        name = "orders-any"
        path = "/v1/orders/{rest:path}"
        [[route]]
        name = "never"
        path = "/v1/orders/1"
        """,
    )
    assert config.route_for("/v1/orders/1").name == "order"
    assert config.route_for("/v1/orders/abc").name == "orders-any"
    assert config.route_for("/v1/orders/1/items").name == "orders-any"
    assert config.route_for("/v1/order").name == "default"


def test_route_settings_override_defaults_and_outcomes_merge(tmp_path: Path) -> None:
    """A route overrides [defaults] key by key; its outcome lists add to [defaults]' and win on the same status."""
    config = load_text(
        tmp_path,
        MINIMAL
        + """
        [defaults]
        require_key = true
        wait = "2s"
        outcomes = { release = [404], hold = [504, "unknown"], hold_ttl = "1h" }
        fingerprint = { body = "bytes" }
        [[route]]
        path = "/v1/payouts"
        methods = ["post", "PUT", "POST"]
        scope = { from = "header", name = "X-Tenant-Id" }
        outcomes = { hold = [404], store = ["5xx"], on_takeover = "execute" }
        """,
    )
    (route,) = config.routes
    settings = route.settings
    assert settings is not None
    assert settings.methods == ("POST", "PUT")
    assert settings.require_key is True
    assert settings.wait == 2
    assert settings.fingerprint_body == "bytes"
    assert settings.scope == HeaderScope("x-tenant-id")
    outcomes = settings.outcomes
    assert outcomes.verdict_for_status(404) is Verdict.HOLD  # the route wins over [defaults]
    assert outcomes.verdict_for_status(504) is Verdict.HOLD  # an exact status beats the route's class
    assert outcomes.verdict_for_status(503) is Verdict.STORE
    assert outcomes.verdict_for_status(201) is Verdict.STORE
    assert outcomes.verdict_for_status(429) is Verdict.RELEASE  # idempo's default
    assert outcomes.verdict_for_failure("deadline") is Verdict.HOLD
    assert outcomes.hold_ttl == 3600
    assert outcomes.on_takeover == "execute"
    assert config.defaults.outcomes.verdict_for_status(404) is Verdict.RELEASE
    assert config.defaults.outcomes.on_takeover == "hold"


def test_route_settings_give_the_engine_a_policy(tmp_path: Path) -> None:
    """RouteSettings.policy() builds the idempo Policy of the route (status classes expanded)."""
    config = load_text(
        tmp_path,
        MINIMAL
        + """
        [[route]]
        path = "/p"
        methods = ["POST"]
        require_key = true
        record_ttl = "1h"
        lease_ttl = "2m"
        max_request_body = "1MiB"
        store_set_cookie = true
        fingerprint = { body = "bytes" }
        outcomes = { hold = ["5xx"], release = [503], hold_ttl = "10m" }
        """,
    )
    settings = config.routes[0].settings
    assert settings is not None
    policy = settings.policy()
    assert isinstance(policy, Policy)
    assert (policy.record_ttl, policy.lease_ttl, policy.hold_ttl) == (3600, 120, 600)
    assert policy.methods == frozenset({"POST"})
    assert policy.require_key is True
    assert policy.canonical_json is False
    assert policy.max_request_body == 1024 * 1024
    assert policy.store_set_cookie is True
    assert policy.verdict_for_status(500) is Verdict.HOLD
    assert policy.verdict_for_status(503) is Verdict.RELEASE
    assert policy.verdict_for_status(201) is Verdict.STORE


def test_upstream_forms(tmp_path: Path) -> None:
    """The upstream is http(s)://host[:port] or unix:/path; IPv6 and unix listen addresses work."""
    https = load_text(tmp_path, '[proxy]\nupstream = "https://api.example.com"\nlisten = "[::1]:8443"\n')
    assert https.proxy.upstream.base_url == "https://api.example.com"
    assert https.proxy.listen == ListenAddress("::1", 8443)
    assert str(https.proxy.listen) == "[::1]:8443"
    unix = load_text(tmp_path, '[proxy]\nupstream = "unix:/run/app.sock"\nlisten = "unix:/run/idempo.sock"\n')
    assert (unix.proxy.upstream.base_url, unix.proxy.upstream.uds) == ("http://localhost", "/run/app.sock")
    assert unix.proxy.listen == ListenAddress(None, None, "/run/idempo.sock")


# --- Precedence: file < flags < environment ----------------------------------------------------


def test_flags_override_the_file_and_the_environment_overrides_both(tmp_path: Path) -> None:
    """A flag beats the file; an IDEMPO_PROXY_* variable beats the flag; None flags and empty variables are unset."""
    path = write(tmp_path, MINIMAL + 'workers = 1\nlisten = "127.0.0.1:1"\nstore = "sqlite:///a.db"\n')
    flags = {"workers": 2, "listen": "127.0.0.1:2", "store": None, "disable": True}
    environ = {"IDEMPO_PROXY_WORKERS": "3", "IDEMPO_PROXY_LISTEN": "", "PATH": "/bin"}
    config = load_config(path, flags=flags, environ=environ)
    assert config.proxy.workers == 3
    assert config.proxy.listen == ListenAddress("127.0.0.1", 2)
    assert config.proxy.store == "sqlite:///a.db"
    assert config.proxy.disable is True
    assert dict(config.overridden) == {
        "proxy.workers": "IDEMPO_PROXY_WORKERS",
        "proxy.listen": "--listen",
        "proxy.disable": "--disable",
    }


def test_every_proxy_key_has_a_variable(tmp_path: Path) -> None:
    """Each IDEMPO_PROXY_* variable sets its [proxy] key from text (lists comma-separated, booleans as words)."""
    environ = {
        "IDEMPO_PROXY_LISTEN": "0.0.0.0:80",
        "IDEMPO_PROXY_UPSTREAM": "http://10.0.0.2:3000",
        "IDEMPO_PROXY_STORE": "redis://127.0.0.1:6379/0",
        "IDEMPO_PROXY_ADMIN_LISTEN": "127.0.0.1:9",
        "IDEMPO_PROXY_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1",
        "IDEMPO_PROXY_MAX_REQUEST_BODY": "1MiB",
        "IDEMPO_PROXY_MAX_RESPONSE_BODY": "2MiB",
        "IDEMPO_PROXY_WORKERS": "4",
        "IDEMPO_PROXY_GRACEFUL_TIMEOUT": "10s",
        "IDEMPO_PROXY_DISABLE": "yes",
    }
    assert set(environ) | {"IDEMPO_PROXY_CONFIG"} == set(ENVIRONMENT)
    proxy = load_config(None, environ=environ).proxy
    assert str(proxy.listen) == "0.0.0.0:80"
    assert proxy.upstream.url == "http://10.0.0.2:3000"
    assert proxy.store == "redis://127.0.0.1:6379/0"
    assert str(proxy.admin_listen) == "127.0.0.1:9"
    assert proxy.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.1/32"))
    assert (proxy.max_request_body, proxy.max_response_body) == (1024**2, 2 * 1024**2)
    assert (proxy.workers, proxy.graceful_timeout, proxy.disable) == (4, 10, True)

    path = write(tmp_path, MINIMAL.replace("8000", "9999"), "other.toml")
    assert load_config(tmp_path / "nope.toml", environ={"IDEMPO_PROXY_CONFIG": str(path)}).source == str(path)


def test_a_variable_error_names_the_variable(tmp_path: Path) -> None:
    """A bad value from the environment names the variable, not the file."""
    error = error_of(tmp_path, MINIMAL, environ={"IDEMPO_PROXY_WORKERS": "two"})
    assert str(error) == (
        'IDEMPO_PROXY_WORKERS: proxy.workers = "two": expected a number of worker processes, '
        "a whole number of 1 or more"
    )
    assert (error.source, error.key, error.value) == ("IDEMPO_PROXY_WORKERS", "proxy.workers", "two")
    flag = error_of(tmp_path, MINIMAL, flags={"listen": "nowhere"})
    assert str(flag).startswith('--listen: proxy.listen = "nowhere": expected host:port')


def test_an_unknown_variable_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    """A misspelt IDEMPO_PROXY_ variable is an error, never silently ignored."""
    error = error_of(tmp_path, MINIMAL, environ={"IDEMPO_PROXY_WORKER": "2"})
    assert str(error).startswith("IDEMPO_PROXY_WORKER: unknown variable; did you mean IDEMPO_PROXY_WORKERS?")


def test_without_a_file_the_upstream_is_required() -> None:
    """With no file and no --upstream, the error says where the upstream can be given."""
    with pytest.raises(ProxyConfigError) as info:
        load_config(None, environ=NO_ENV)
    assert str(info.value) == (
        "(no config file): proxy.upstream: required: the upstream's URL (http://host:port, https://host or "
        "unix:/path.sock), in [proxy], with --upstream or IDEMPO_PROXY_UPSTREAM"
    )
    assert load_config(None, flags={"upstream": "http://127.0.0.1:1"}, environ=NO_ENV).source is None


# --- Load errors: the file, the key path, the value, what is expected --------------------------


BAD = [
    pytest.param('[proxy]\nupstream = "http://127.0.0.1:8000"\nworkers = \n', "", "not valid TOML: ", id="bad-toml"),
    pytest.param(
        MINIMAL + '[defaults]\nlease_ttl = "30s"\n',
        "defaults.lease_ttl",
        'defaults.lease_ttl = "30s": expected more than upstream.deadline ("60s"): a lease that ends while the '
        "upstream may still answer lets a retry take the key over and send the request again",
        id="lease-below-deadline",
    ),
    pytest.param(
        MINIMAL + '[upstream]\ndeadline = "2m"\n[[route]]\npath = "/a"\nlease_ttl = 120\n',
        "route[0].lease_ttl",
        "route[0].lease_ttl = 120: expected more than upstream.deadline",
        id="lease-equal-to-deadline",
    ),
    pytest.param(
        '[proxy]\nupstream = "http://127.0.0.1:8000"\nstore = "memory://"\nworkers = 2\n',
        "proxy.workers",
        "proxy.workers = 2: memory:// keeps records inside one process",
        id="memory-with-workers",
    ),
    pytest.param(
        MINIMAL + '[[route]]\npath = "/a"\nscope = { from = "jwt", claim = "sub", audience = "a" }\n',
        "route[0].scope",
        "a JWT scope must be verified: a replay never reaches the upstream, so an unverified claim would let a "
        "forged token read another user's replay; set jwks_file, jwks_url or key_file",
        id="jwt-without-keys",
    ),
    pytest.param(
        MINIMAL + '[[route]]\npath = "/a"\nscope = { from = "jwt", jwks_url = "https://idp.example/jwks" }\n',
        "route[0].scope",
        "set audience (or issuer), so a token issued for another service is refused",
        id="jwt-without-audience",
    ),
    pytest.param(
        MINIMAL + '[defaults]\nscope = { from = "jwt", verify = false }\n',
        "defaults.scope.verify",
        "defaults.scope.verify = false: a JWT scope is always verified",
        id="jwt-verify-false",
    ),
    pytest.param(
        MINIMAL
        + '[[route]]\npath = "/a"\nscope = { from = "jwt", claim = 42, jwks_url = "https://i/j", issuer = "i" }\n',
        "route[0].scope.claim",
        'route[0].scope.claim = 42: expected a claim name such as "sub"',
        id="jwt-claim-not-a-string",
    ),
    pytest.param(
        MINIMAL + '[[route]]\npath = "/a"\nscope = { from = "jwt", jwks_url = "http://idp.example/j", issuer = "i" }\n',
        "route[0].scope.jwks_url",
        "expected an https:// URL (http:// only on loopback)",
        id="jwks-url-plain-http",
    ),
    pytest.param(
        MINIMAL + '[[route]]\npath = "/a"\nscope = { from = "jwt", jwks_file = "missing.json", issuer = "i" }\n',
        "route[0].scope.jwks_file",
        'route[0].scope.jwks_file = "missing.json": expected the path of a JWK Set (JSON); no such file',
        id="jwks-file-missing",
    ),
    pytest.param(
        MINIMAL + '[upstream]\nclient = "requests"\n',
        "upstream.client",
        'upstream.client = "requests": expected one of "aiohttp", "httpx"',
        id="bad-client",
    ),
    pytest.param(
        MINIMAL + "[upstream]\nkeepalive_expiri = 1\n",
        "upstream.keepalive_expiri",
        "upstream.keepalive_expiri = 1: unknown key; did you mean 'keepalive_expiry'? expected one of: ",
        id="unknown-key",
    ),
    pytest.param(
        MINIMAL + 'max_request_body = "10 MiBs"\n',
        "proxy.max_request_body",
        "proxy.max_request_body = \"10 MiBs\": expected bytes, or a string such as '512KiB'",
        id="bad-size",
    ),
    pytest.param(
        MINIMAL + '[defaults]\nrecord_ttl = "1 day"\n',
        "defaults.record_ttl",
        'defaults.record_ttl = "1 day": expected seconds, or a string such as',
        id="bad-duration",
    ),
    pytest.param(
        MINIMAL + "[defaults]\nrecord_ttl = 0\n", "defaults.record_ttl", "expected a duration above zero", id="zero-ttl"
    ),
    pytest.param(
        MINIMAL + "[defaults]\noutcomes = { hold = [700] }\n",
        "defaults.outcomes.hold[0]",
        "defaults.outcomes.hold[0] = 700: expected a final status, 200 to 599",
        id="bad-status",
    ),
    pytest.param(
        MINIMAL + '[defaults]\noutcomes = { store = ["unknown"] }\n',
        "defaults.outcomes.store[0]",
        "a failure has no answer to store",
        id="store-a-failure",
    ),
    pytest.param(
        MINIMAL + '[defaults]\noutcomes = { hold = ["unknown"], release = ["read-error"] }\n',
        "defaults.outcomes.hold[0]",
        'defaults.outcomes.hold[0] = "unknown": already listed in defaults.outcomes.release',
        id="outcome-twice",
    ),
    pytest.param(
        MINIMAL + '[defaults]\noutcomes = { on_takeover = "retry" }\n',
        "defaults.outcomes.on_takeover",
        'defaults.outcomes.on_takeover = "retry": expected one of "hold", "execute"',
        id="bad-on-takeover",
    ),
    pytest.param(
        MINIMAL + '[[route]]\npath = "/v1/{id:uuidx}"\n',
        "route[0].path",
        "route[0].path = \"/v1/{id:uuidx}\": expected a Starlette path: Unknown path convertor 'uuidx'",
        id="unknown-convertor",
    ),
    pytest.param(
        MINIMAL + '[[route]]\npath = "v1"\n', "route[0].path", "expected a path starting with /", id="relative-path"
    ),
    pytest.param(
        MINIMAL + '[[route]]\nname = "x"\npath = "/a"\n[[route]]\nname = "x"\npath = "/b"\n',
        "route[1].name",
        "route[1].name = \"x\": expected a unique name; 'x' already names route[0]",
        id="duplicate-name",
    ),
    pytest.param(
        MINIMAL + '[[route]]\nname = "default"\npath = "/a"\n',
        "route[0].name",
        "already names the routes no path matches",
        id="reserved-name",
    ),
    pytest.param(
        MINIMAL + '[[route]]\npath = "/a"\npassthrough = true\nmethods = ["POST"]\n',
        "route[0].methods",
        "has no effect on a passthrough route",
        id="passthrough-with-settings",
    ),
    pytest.param(
        '[proxy]\nupstream = "http://127.0.0.1:8000/api"\n',
        "proxy.upstream",
        "expected a URL without a path or query",
        id="upstream-path",
    ),
    pytest.param(
        '[proxy]\nupstream = "ftp://host"\n', "proxy.upstream", "expected the upstream's URL", id="upstream-scheme"
    ),
    pytest.param(
        '[proxy]\nupstream = "http://user:secret@127.0.0.1:8000"\n',
        "proxy.upstream",
        'proxy.upstream = "http://...@127.0.0.1:8000": expected a URL without user:password@',
        id="upstream-userinfo",
    ),
    pytest.param(
        MINIMAL + 'listen = "localhost"\n', "proxy.listen", "expected host:port (127.0.0.1:8080)", id="bad-listen"
    ),
    pytest.param(
        MINIMAL + 'trusted_proxies = ["10.0.0.1/8"]\n',
        "proxy.trusted_proxies[0]",
        'proxy.trusted_proxies[0] = "10.0.0.1/8": expected a network such as "10.0.0.0/8" '
        "(10.0.0.1/8 has host bits set)",
        id="network-host-bits",
    ),
    pytest.param(
        MINIMAL + "workers = 0\n", "proxy.workers", "expected a number of worker processes", id="zero-workers"
    ),
    pytest.param(MINIMAL + "disable = 1\n", "proxy.disable", "expected true or false", id="disable-not-bool"),
    pytest.param(
        MINIMAL + "[upstream]\nmax_connections = 10\nmax_keepalive_connections = 11\n",
        "upstream.max_keepalive_connections",
        "expected at most upstream.max_connections (10)",
        id="keepalive-above-max",
    ),
    pytest.param(
        MINIMAL + '[defaults]\nscope = { from = "cookie" }\n',
        "defaults.scope.from",
        'defaults.scope.from = "cookie": expected one of "authorization", "header", "jwt"',
        id="bad-scope-kind",
    ),
    pytest.param('[proxi]\nupstream = "x"\n', "proxi", "unknown key; did you mean 'proxy'?", id="bad-table"),
    pytest.param(
        MINIMAL + '[[route]]\nmethods = ["POST"]\n', "route[0].path", "route[0].path: required", id="route-no-path"
    ),
]


@pytest.mark.parametrize(("text", "key", "message"), BAD)
def test_load_errors_name_the_file_the_key_and_the_value(tmp_path: Path, text: str, key: str, message: str) -> None:
    """Every refused file gives one line: the file, the key path, the value and what is expected."""
    error = error_of(tmp_path, text)
    path = str(tmp_path / "idempo-proxy.toml")
    assert error.source == path
    assert error.key == key
    assert str(error).startswith(f"{path}: ")
    assert message in str(error)


def test_bad_toml_gives_the_line(tmp_path: Path) -> None:
    """A TOML syntax error names the file and the line and column."""
    error = error_of(tmp_path, "[proxy]\nupstream = \n")
    assert "line 2" in str(error)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    """A missing file is one line naming it."""
    with pytest.raises(ProxyConfigError, match=r"nope\.toml: cannot read the configuration: No such file"):
        load_config(tmp_path / "nope.toml", environ=NO_ENV)


def test_the_documented_error_lines_are_the_real_ones(tmp_path: Path) -> None:
    """docs/proxy.md quotes three load errors; each is what the loader says."""
    docs = (ROOT / "docs" / "proxy.md").read_text()
    lease = error_of(tmp_path, MINIMAL + '[defaults]\nlease_ttl = "30s"\n')
    claim = error_of(
        tmp_path,
        MINIMAL
        + '[[route]]\npath = "/a"\nscope = { from = "jwt", claim = 42, jwks_url = "https://i/j", audience = "a" }\n',
    )
    workers = error_of(tmp_path, MINIMAL, environ={"IDEMPO_PROXY_WORKERS": "two"})
    for error in (lease, claim, workers):
        shown = str(error).replace(str(tmp_path) + "/", "")
        assert shown in docs


# --- The effective configuration as TOML -------------------------------------------------------


FULL = """
[proxy]
listen = "[::1]:8080"
upstream = "https://api.example.com:8443"
store = "redis://:s3cret@127.0.0.1:6379/0?prefix=p:"
admin_listen = "unix:/run/idempo-admin.sock"
trusted_proxies = ["10.0.0.0/8", "::1"]
max_request_body = 1000
max_response_body = "1.5MiB"
graceful_timeout = 0.25
disable = true

[upstream]
connect_timeout = "750ms"
pool_timeout = 1
deadline = "1h30m"
keepalive_expiry = 0
max_connections = 7
max_keepalive_connections = 0
verify = false
client = "httpx"

[defaults]
methods = ["POST", "DELETE"]
record_ttl = "7d"
wait = 1.5
retry_after = 0
fail_open = true
scope = { from = "header", name = "X-Tenant" }
outcomes = { release = [404, "deadline"], hold = ["5xx", "connect-error"], store = [503], hold_ttl = "2h" }

[[route]]
name = "pay \\"quoted\\"\\t"
path = "/v1/pay/{id:int}"
scope = { from = "jwt", claim = "tenant", jwks_url = "https://user:pw@idp.example/jwks", audience = ["a", "b"], \
issuer = "https://idp.example/", algorithms = ["ES256"], leeway = 2, jwks_cache_ttl = 60, jwks_timeout = 1 }
outcomes = { on_takeover = "execute" }

[[route]]
path = "/v1/files/{rest:path}"
passthrough = true
"""


@pytest.mark.parametrize("text", [FULL, MINIMAL], ids=["full", "minimal"])
def test_dump_loads_back_to_an_equal_configuration(tmp_path: Path, text: str) -> None:
    """dump_config writes every setting; loading its text gives an equal configuration."""
    config = load_text(tmp_path, text)
    dumped = dump_config(config, reveal_secrets=True)
    again = load_config(write(tmp_path, dumped, "dumped.toml"), environ=NO_ENV)
    assert again == config
    settings = [line for line in dumped.splitlines() if not line.startswith("#")]
    assert [
        line for line in dump_config(again, reveal_secrets=True).splitlines() if not line.startswith("#")
    ] == settings


def test_the_sample_dumps_and_loads_back(tmp_path: Path) -> None:
    """The sample's effective configuration (JWKS path made absolute) loads back equal."""
    config = load_config(SAMPLE, environ=NO_ENV)
    dumped = dump_config(config)
    assert "# read from" in dumped
    assert str(SAMPLE.parent / "jwks.json") in dumped
    assert load_config(write(tmp_path, dumped), environ=NO_ENV) == config


def test_dump_masks_url_passwords_unless_revealed(tmp_path: Path) -> None:
    """--print-config shows no store or JWKS URL password unless asked to."""
    config = load_text(tmp_path, FULL)
    masked = dump_config(config)
    assert "s3cret" not in masked
    assert "user:pw@" not in masked
    assert 'store = "redis://:***@127.0.0.1:6379/0?prefix=p:"' in masked
    assert "s3cret" in dump_config(config, reveal_secrets=True)


def test_dump_says_what_flags_and_variables_set(tmp_path: Path) -> None:
    """The dump's header comments name the file and every override's origin."""
    config = load_text(tmp_path, MINIMAL, flags={"workers": 2}, environ={"IDEMPO_PROXY_DISABLE": "1"})
    dumped = dump_config(config)
    assert "# proxy.workers set by --workers" in dumped
    assert "# proxy.disable set by IDEMPO_PROXY_DISABLE" in dumped
    assert json.dumps(str(tmp_path / "idempo-proxy.toml"))[1:-1] in dumped
