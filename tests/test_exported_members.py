"""The public API is exactly what __all__ says (httpx's tests/test_exported_members.py)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import FunctionType, ModuleType

import pytest

import idempo

#: Every public module's __all__, pinned: a name added to or taken from a module's public API is a
#: change of this list too (the top level is pinned by test_all_is_sorted_and_complete).
PUBLIC_API: dict[str, list[str]] = {
    "idempo.asgi": [
        "EXCHANGE_SCOPE_KEY",
        "IdempotencyMiddleware",
        "PrincipalResolver",
        "default_principal",
        "report_exception",
    ],
    "idempo.cli": ["main"],
    "idempo.client": [
        "DEFAULT_KEY_METHODS",
        "DEFAULT_RETRY_STATUSES",
        "FINAL_PROBLEMS",
        "IDEMPOTENT_METHODS",
        "KEY_EXTENSION",
        "AsyncIdempotentTransport",
        "Attempt",
        "IdempotentTransport",
        "KeyFactory",
        "OnAttempt",
        "RetryPolicy",
        "new_key",
        "parse_retry_after",
    ],
    "idempo.celery": ["IdempotentTask", "OnDuplicate", "check_broker", "idempotent_task"],
    "idempo.consumer": [
        "AsyncIdempotentConsumer",
        "IdempotentConsumer",
        "MessageId",
        "Outcome",
        "RedisStreamConsumer",
        "StreamMessage",
    ],
    "idempo.decorator": ["Arguments", "KeyFunction", "idempotent", "record_key"],
    "idempo.demo": [],
    "idempo.demo.command": ["demo"],
    "idempo.demo.payments": [
        "DEMO_POLICY",
        "MAX_PROVIDER_DELAY",
        "PROVIDER_DELAY_HEADER",
        "Ledger",
        "Payment",
        "PaymentRequest",
        "SimulatedProvider",
        "create_app",
        "read_ledger",
    ],
    "idempo.demo.storm": [
        "AttemptOutcome",
        "FinalAnswer",
        "PaymentOutcome",
        "PlannedPayment",
        "RunReport",
        "Share",
        "Shares",
        "StormResult",
        "StormSettings",
        "Tally",
        "plan_payments",
        "run_storm",
        "summarize",
    ],
    "idempo.django": [
        "IdempotencyMiddleware",
        "StoredHttpResponse",
        "default_principal",
        "idempotency",
        "idempotency_exempt",
        "idempotency_required",
    ],
    "idempo.exceptions": [
        "CommitFailed",
        "CommitUnknown",
        "ConfigurationError",
        "FingerprintMismatch",
        "IdempoError",
        "InvalidKey",
        "KeyHeld",
        "KeyInProgress",
        "KeyRejected",
        "LeaseLost",
        "MissingKey",
        "ResultNotReplayable",
        "StoreError",
        "StoreUnavailable",
        "TransactionClosed",
        "TransactionConflict",
        "TransactionControlled",
        "TransactionError",
    ],
    "idempo.fastapi": [
        "Idempotency",
        "Session",
        "Transaction",
        "document",
        "idempotency",
        "idempotency_exempt",
        "install",
    ],
    "idempo.faults": [
        "DROP_ANSWER",
        "PASS",
        "RESET_BEFORE_BODY",
        "Fault",
        "FaultKind",
        "FaultPlan",
        "FaultProxy",
        "RequestHead",
        "SeenRequest",
        "random_faults",
        "scripted",
        "serve_app",
    ],
    "idempo.flask": ["Idempotency", "idempotency", "idempotency_exempt"],
    "idempo.litestar": ["IdempotencyMiddleware", "IdempotencyPlugin", "idempotency", "idempotency_exempt"],
    "idempo.metrics": [
        "HANDLER_BUCKETS",
        "STORE_BUCKETS",
        "PrometheusMetrics",
        "make_asgi_app",
        "make_wsgi_app",
        "mount",
    ],
    "idempo.observability": ["LEVELS", "Outcome", "instrument", "uninstrument"],
    "idempo.principals": [
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
    ],
    "idempo.proxy": ["ProxyConfig", "ProxyConfigError", "app_factory", "create_app", "dump_config", "load_config"],
    "idempo.proxy.app": [
        "HOP_BY_HOP",
        "ProxyApp",
        "ProxyMiddleware",
        "app_factory",
        "create_app",
        "create_forwarder",
        "failure_answer",
    ],
    "idempo.proxy.aiohttp_forwarder": ["AiohttpForwarder"],
    "idempo.proxy.forwarder": [
        "Attempt",
        "Forwarder",
        "HttpxForwarder",
        "UpstreamFailure",
        "UpstreamResponse",
        "failure_class",
        "note_unsent",
        "ssl_context",
    ],
    "idempo.proxy.config": [
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
    ],
    "idempo.proxy.principal": [
        "JWTPrincipalResolver",
        "KeysUnavailable",
        "PrincipalRejected",
        "VerificationKey",
        "load_keys",
    ],
    "idempo.requests_adapter": [
        "DEFAULT_KEY_METHODS",
        "DEFAULT_RETRY_STATUSES",
        "IDEMPOTENT_METHODS",
        "Attempt",
        "IdempotentAdapter",
        "KeyFactory",
        "OnAttempt",
        "RetryPolicy",
        "new_key",
    ],
    "idempo.secrets": [
        "ENV_VAR",
        "LEGACY_RECORD_KEY",
        "SECRET_RECORD_KEY",
        "SecretSource",
        "async_store_secret",
        "configured_secret",
        "is_reserved",
        "open_legacy_window",
        "store_secret",
    ],
    "idempo.serializers": [
        "JSONSerializer",
        "PickleSerializer",
        "Serializer",
        "check_return_type",
        "fingerprint_form",
        "from_json_form",
        "json_form",
    ],
    "idempo.stores": ["AsyncMemoryStore", "MemoryStore", "async_store_from_url", "store_from_url"],
    "idempo.stores.memory": ["SWEEP_PER_CALL", "AsyncMemoryStore", "MemoryStore"],
    "idempo.stores.postgres": ["SCHEMA_VERSION", "AsyncPostgresStore", "PostgresStore", "migrations"],
    "idempo.stores.redis": ["AsyncRedisStore", "RedisStore"],
    "idempo.stores.sqlite": ["AsyncSQLiteStore", "SQLiteConnection", "SQLiteStore"],
    "idempo.starlette": ["transaction"],
    "idempo.transactional": [
        "FINALIZE_TIMEOUT",
        "AsyncTransaction",
        "AsyncTransactor",
        "Outcome",
        "SQLiteConnection",
        "Transaction",
        "Transactor",
    ],
    "idempo.testing": [
        "FAULT_POINTS",
        "LONG_MS",
        "SECRET",
        "BlockingStore",
        "FakeClock",
        "InjectedFault",
        "RawRecord",
        "StoreContract",
        "StoreSubject",
        "arm_faults",
        "armed_faults",
        "current_store",
        "is_testing",
        "record_fields",
        "set_testing",
        "skewed_clock",
    ],
    "idempo.tracing": ["REQUEST_SPAN", "STORE_SPAN_PREFIX", "Tracing"],
    "idempo.typing": ["AsyncStore", "Clock", "Store", "SupportsStats"],
    "idempo.wsgi": [
        "EXCHANGE_ENVIRON_KEY",
        "IdempotencyMiddleware",
        "PrincipalResolver",
        "default_principal",
        "report_exception",
    ],
}

#: Public modules whose __all__ is checked here, beside the top level.
MODULES = sorted(PUBLIC_API)


def _isort_style(name: str) -> tuple[int, str]:
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


# Names a module defines and leaves out of __all__ on purpose, until their owner decides.
UNEXPORTED = {"idempo.stores": {"register_scheme"}}


def test_all_is_sorted_and_complete() -> None:
    """Every name in __all__ exists, and every public attribute is in __all__."""
    exported = set(idempo.__all__)
    assert all(hasattr(idempo, name) for name in exported)
    # Submodules (idempo.asgi, idempo.stores, ...) are imported by path, not re-exported.
    public = {
        name for name in dir(idempo) if not name.startswith("_") and not isinstance(getattr(idempo, name), ModuleType)
    }
    assert public == exported - {"__version__"}
    assert idempo.__all__ == sorted(idempo.__all__)


def test_importing_idempo_needs_no_optional_dependency() -> None:
    """`import idempo` works with only the core dependencies (checked in a clean interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, idempo\n"
        "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'httpx', 'click', 'rich', 'redis', 'psycopg',"
        " 'flask', 'werkzeug', 'django', 'litestar', 'waitress', 'jwt', 'cryptography', 'prometheus_client')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", MODULES)
def test_module_all_is_sorted_and_complete(name: str) -> None:
    """A public module's __all__ is sorted, every name in it exists, and every class or function it defines is in it."""
    module = importlib.import_module(name)
    exported = module.__all__
    # Sorted plainly, or as ruff's RUF022 sorts (constants, then classes, then the rest).
    assert exported in (sorted(exported), sorted(exported, key=_isort_style))
    assert all(hasattr(module, attribute) for attribute in exported)
    defined = {
        attribute
        for attribute, value in vars(module).items()
        if not attribute.startswith("_")
        # type(): never wake a lazy object (Django's settings)
        and (issubclass(type(value), type) or type(value) is FunctionType)
        and value.__module__ == name
    }
    assert defined - UNEXPORTED.get(name, set()) <= set(exported)


def test_every_public_module_is_pinned() -> None:
    """Each public module of src/idempo (no part of its name private) is in PUBLIC_API, beside the top level;
    the packages that ship the SQL and Lua files (stores.sql, stores.lua) are data, not API."""
    src = Path(idempo.__file__).resolve().parent.parent
    public = set()
    for path in (src / "idempo").rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        data = parts[1:3] in (("stores", "sql"), ("stores", "lua"))
        if not data and not any(part.startswith("_") for part in parts):
            public.add(".".join(parts))
    assert sorted(public - {"idempo"}) == MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_all_is_pinned(name: str) -> None:
    """A public module exports exactly the names pinned in PUBLIC_API."""
    assert importlib.import_module(name).__all__ == PUBLIC_API[name]


def test_importing_the_proxy_modules_needs_no_optional_dependency() -> None:
    """idempo.proxy, its config and principal modules import with only the core (Starlette, PyJWT, httpx lazily)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import idempo.proxy, idempo.proxy.config, idempo.proxy.principal\n"
        "bad = [m for m in ('starlette', 'httpx', 'uvicorn', 'jwt', 'cryptography', 'prometheus_client', 'click')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
