"""Django: a middleware configured from settings, and view decorators.

``settings.py``::

    MIDDLEWARE = [
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "idempo.django.IdempotencyMiddleware",
        ...
    ]
    IDEMPO = {
        "STORE": "sqlite:///idempo.db",          # or a Store instance
        "POLICY": {"record_ttl": 3600},          # Policy arguments, or a Policy
        "ROUTES": {"/webhooks/*": None},         # path patterns: Policy, dict of arguments, or None
        "PRINCIPAL": "myapp.idem.principal",     # dotted path or callable: HttpRequest -> str | None
        "KEY_HEADER": "Idempotency-Key",
        "SECRET": os.environ["IDEMPO_SECRET"],   # keys every stored/logged digest (default: the same variable)
        "DATABASE": "default",                   # the alias holding the records: transactional views' atomic block
    }

``views.py``::

    from idempo.django import idempotency, idempotency_exempt, idempotency_required

    @idempotency_required(record_ttl=3600)   # a key is mandatory on this view
    def pay(request): ...

    @idempotency_exempt
    def webhook(request): ...

The middleware decides per view: Django resolves the URL, then calls the
middleware's ``process_view`` with the view, whose decorator options win
over the ``ROUTES`` patterns, which win over ``POLICY``. Replays, 400, 409,
422 and 503 are answered from ``process_view`` without running the view;
middleware listed after this one does not run for them either. Put it after
``CsrfViewMiddleware`` (a forged request is refused before anything is
replayed) and ``AuthenticationMiddleware`` (the default principal is the
authenticated user).

The HTTP behaviour is the ASGI and WSGI middlewares' (``process_view``
admits a request with the steps every front shares,
:mod:`idempo._http.admission`, and the view runs in the WSGI front's
:class:`~idempo._http.wsgi.Exchange`). What is particular to Django:

- The default principal (:func:`idempo.principals.default`) is
  ``request.user`` when authenticated, else a digest of ``Authorization``
  and the session cookie (``sessionid``), else the client address.
- The body is read through ``request.body`` (so the view and ``request.POST``
  still work); Django's ``DATA_UPLOAD_MAX_MEMORY_SIZE`` also bounds it, and a
  larger body is answered with 413.
- Streaming responses and ``FileResponse`` are captured while the server
  iterates them; the record is settled when the body ends, and a client that
  leaves early does not lose the record (the rest is consumed on ``close()``).
- A view's exception is seen through ``process_exception`` (Django answers
  500 itself), so ``Policy.exception_verdicts`` apply as on ASGI.
- Django's header mapping holds one value per name; replays keep repeated
  header lines (two ``Link`` lines) all the same, and a response class whose
  ``items()`` lists repeats is captured line by line.

Sync Django (WSGI) only: the middleware uses a blocking store.

A view marked ``transactional=True`` (``@idempotency_required(transactional=True)``)
runs inside ``transaction.atomic()`` on the ``DATABASES`` alias that holds
idempo's records (``IDEMPO["DATABASE"]``, default ``"default"``; the store
must be that database: an SQLite store on its file, or a PostgreSQL store on
its database, whose table ``idempo migrate`` creates). The record's
completion runs on Django's own connection as the block's last statement, so
the view's writes on that alias commit if and only if its answer is stored
(DESIGN "transactional route"); the answer leaves only after COMMIT.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload
from urllib.parse import unquote_to_bytes

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, RequestDataTooBig
from django.db import DatabaseError, InterfaceError, connections, transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.urls import URLResolver, get_resolver
from django.utils.module_loading import import_string

from . import _config
from ._core.http import (
    declared_length,
    identity_path,
    invalid_content_length_answer,
    store_unavailable_answer,
    takes_part,
)
from ._core.keys import split_folded
from ._core.policy import Policy
from ._core.records import StoredResponse
from ._core.routes import RouteOptions, RouteTable
from ._engine._sync.drivers import TransactionalExecution, drive_sync
from ._engine.execution import Execution
from ._http.admission import BodyIncomplete, Bypass, Execute, admission
from ._http.wsgi import BYPASSED_HEADER_TEXT, BypassedBody, CapturedBody, Exchange, header_bytes, raw_target
from .exceptions import ConfigurationError, StoreUnavailable
from .observability._observation import Outcome, logger, observe_request
from .principals import default as default_principal
from .principals import legacy_principal
from .secrets import SecretSource
from .stores._base import open_at_startup
from .typing import Store

__all__ = [
    "IdempotencyMiddleware",
    "StoredHttpResponse",
    "default_principal",
    "idempotency",
    "idempotency_exempt",
    "idempotency_required",
]

View = TypeVar("View", bound=Callable[..., Any])
PrincipalResolver = Callable[[HttpRequest], "str | None"]

_CONFIG_KEYS = frozenset({"STORE", "POLICY", "ROUTES", "PRINCIPAL", "KEY_HEADER", "SECRET", "DATABASE"})
# Per-request state, kept on the request between process_view and __call__.
_EXCHANGE = "_idempo_exchange"
_BYPASSED = "_idempo_bypassed"
_BODY_TOO_LARGE = "_idempo_body_too_large"


# --- view decorators -----------------------------------------------------------------


def _decorate(view: View, options: RouteOptions, transactional: bool = False) -> View:
    # asgiref's test, as Django's: it also knows the views Django marks async (an async
    # class-based view's as_view()), which inspect's does not before Python 3.12.
    is_async = iscoroutinefunction(view)
    if transactional and is_async:
        name = getattr(view, "__qualname__", repr(view))
        raise ConfigurationError(
            f"{name}: a transactional view must be a sync view (def): Django's transactions do not work in "
            "async mode (transaction.atomic() in an async view raises SynchronousOnlyOperation), so the view's "
            "writes could not commit with its record. Write the view with def"
        )
    if is_async:

        async def async_view(*args: Any, **kwargs: Any) -> Any:
            return await view(*args, **kwargs)

        wrapper: Any = markcoroutinefunction(functools.wraps(view)(async_view))
    else:

        def sync_view(*args: Any, **kwargs: Any) -> Any:
            return view(*args, **kwargs)

        wrapper = functools.wraps(view)(sync_view)
    wrapper.idempo_route_options = options
    if transactional:
        wrapper.idempo_transactional = True
    decorated: View = wrapper
    return decorated


def idempotency(policy: Policy | None = None, *, transactional: bool = False, **changes: Any) -> Callable[[View], View]:
    """Set a view's idempotency options: ``@idempotency(record_ttl=3600)``.

    Args:
        policy: a whole :class:`~idempo.Policy` for the view; None derives the
            view's policy from the middleware's (``ROUTES``, else ``POLICY``)
            with ``changes``.
        transactional: run the view inside ``transaction.atomic()`` on the
            database alias that holds idempo's records (``IDEMPO["DATABASE"]``,
            default ``"default"``); the record's completion is the last
            statement of that atomic block, through Django's own connection
            (DESIGN "transactional route"). The view's writes on that alias
            commit if and only if its answer is stored. A sync view only:
            Django's transactions do not work in async mode.
        **changes: :class:`~idempo.Policy` arguments, e.g. ``record_ttl``,
            ``lease_ttl``, ``require_key``, ``methods``.

    Raises:
        ConfigurationError: a change is not a valid Policy argument value, or
            a transactional view is an async one (``async def``, or an async
            class-based view's ``as_view()``).
        TypeError: a change is not a Policy argument.
    """
    options = RouteOptions(policy=policy, changes=changes)
    return lambda view: _decorate(view, options, transactional)


@overload
def idempotency_required(view: View, /) -> View: ...
@overload
def idempotency_required(
    *, policy: Policy | None = None, transactional: bool = False, **changes: Any
) -> Callable[[View], View]: ...
def idempotency_required(
    view: View | None = None, /, *, policy: Policy | None = None, transactional: bool = False, **changes: Any
) -> View | Callable[[View], View]:
    """Require an ``Idempotency-Key`` on a view (400 without one): ``@idempotency_required``.

    Takes the same arguments as :func:`idempotency`, with ``require_key=True``:
    ``@idempotency_required(record_ttl=3600)``, ``@idempotency_required(transactional=True)``.
    """
    decorator = idempotency(policy, transactional=transactional, **{**changes, "require_key": True})
    return decorator if view is None else decorator(view)


def idempotency_exempt(view: View) -> View:
    """Exempt a view from idempotency: its requests pass through untouched (like ``csrf_exempt``)."""
    return _decorate(view, RouteOptions(exempt=True))


# --- responses -----------------------------------------------------------------------


class StoredHttpResponse(HttpResponse):
    """An HttpResponse built from a stored response or problem: status, headers (repeats kept), body.

    Django's header mapping holds one value per name, so repeated lines
    (``Link``, ``Set-Cookie`` when stored) are kept aside and listed by
    :meth:`items`, which is what Django's WSGI handler sends.
    """

    def __init__(self, stored: StoredResponse) -> None:
        super().__init__(stored.body, status=stored.status)
        del self.headers["Content-Type"]  # never invent one (shared/cases B14b)
        self.repeated_headers: list[tuple[str, str]] = []
        for raw_name, raw_value in stored.headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            if name in self.headers:
                self.repeated_headers.append((name, value))
            else:
                self.headers[name] = value

    def items(self) -> Any:
        """Every header line, repeats included, in the order stored (repeats after the first)."""
        return [*self.headers.items(), *self.repeated_headers]


# --- transactional views: the record's completion joins the view's atomic block ------


class _AtomicHandle:
    """One transactional view's ``transaction.atomic()`` block on its alias, entered by :meth:`open`."""

    __slots__ = ("atomic", "connection", "exited", "factory", "guarded")

    def __init__(self, atomic: Any, connection: Any) -> None:
        self.atomic = atomic
        self.connection = connection
        self.exited = False
        #: The psycopg connection whose cursor factory the guard stands in for, and that factory.
        self.guarded: Any = None
        self.factory: Any = None

    def unguard(self) -> str | None:
        """Take the statement guard off (PostgreSQL); why it refused a statement, or None."""
        if self.guarded is None:
            return None
        from .stores._psycopg import unguard

        guarded, self.guarded = self.guarded, None
        return unguard(guarded, self.factory)

    def exit(self) -> None:
        """Leave the outermost atomic block: Django commits, or rolls back when marked so (raises on failure)."""
        if not self.exited:
            self.exited = True
            self.atomic.__exit__(None, None, None)


#: Django SQLite ``transaction_mode`` values whose BEGIN takes the write lock itself.
_LOCKING_MODES = frozenset({"IMMEDIATE", "EXCLUSIVE"})

# The savepoint idempo makes as the atomic block's first statement: it exists only inside idempo's own
# transaction, so RELEASE or ROLLBACK TO it fails once the view ended that transaction (a raw COMMIT or
# ROLLBACK through the connection), even after a new one began (psycopg begins one at the next statement).
_MARK = "SAVEPOINT idempo_transaction"
_RELEASE_MARK = "RELEASE SAVEPOINT idempo_transaction"
_ROLLBACK_TO_MARK = "ROLLBACK TO SAVEPOINT idempo_transaction"
# What the driver raises for the missing savepoint: 3B001 (no such savepoint) and 25P01 (no transaction).
_NO_MARK_SQLSTATES = frozenset({"3B001", "25P01"})


def _raw_execute(dbapi_connection: Any, statement: str) -> None:
    """Run one statement on the DB-API connection under Django's, past Django's cursor wrappers."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(statement)
    finally:
        cursor.close()


def _driver_idle(dbapi_connection: Any) -> bool:
    """Whether the DB-API connection is in no transaction (psycopg 3 and 2: ``info.transaction_status``
    IDLE, 0; sqlite3: ``in_transaction`` false)."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        return not dbapi_connection.in_transaction
    status = getattr(getattr(dbapi_connection, "info", None), "transaction_status", None)
    return status is not None and int(status) == 0


def _mark_missing(exc: BaseException) -> bool:
    """Whether a failed RELEASE / ROLLBACK TO of idempo's savepoint says the savepoint is not there."""
    if isinstance(exc, sqlite3.OperationalError):
        return "no such savepoint" in str(exc)
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return code in _NO_MARK_SQLSTATES


class _DjangoTransactor:
    """Drives a transactional view's transaction on Django's own connection (see idempo.transactional.Transactor).

    :meth:`open` enters ``transaction.atomic(using=alias)``; the view's ORM
    writes on that alias join it. The record's ``complete`` (or ``release``
    after a rollback) runs on the same DB-API connection through the store's
    :meth:`settle_on`, so it is the atomic block's last statement; leaving the
    block commits. Reading the record after a lost COMMIT goes through the
    store's own connection.

    Args:
        alias: the ``DATABASES`` alias that holds idempo's records table.
        store: the blocking SQLite or PostgreSQL store on that database (it has ``settle_on``).
    """

    def __init__(self, alias: str, store: Any) -> None:
        self.alias = alias
        self.store = store

    def open(self) -> _AtomicHandle:
        """Enter ``transaction.atomic(using=alias)``; on SQLite, take the write lock at once.

        Django's SQLite transactions are deferred unless the alias sets
        ``"OPTIONS": {"transaction_mode": "IMMEDIATE"}`` (Django 5.1+): a view
        that reads, then writes, upgrades to the write lock mid-transaction, and
        SQLite answers that upgrade ``SQLITE_BUSY`` at once, without waiting
        ``busy_timeout``, whenever another writer went first (a 500 per
        concurrent request). A write statement that matches no row, as the
        block's first, takes the lock the way ``BEGIN IMMEDIATE`` does,
        waiting up to the connection's timeout, on any Django version.

        Raises:
            StoreUnavailable: Django cannot connect, or the write lock stays
                held by another writer past the timeout.
        """
        atomic = transaction.atomic(using=self.alias)
        try:
            atomic.__enter__()
        except DatabaseError as exc:
            raise StoreUnavailable(f"transaction.atomic(using={self.alias!r}) failed: {exc}") from exc
        connection = connections[self.alias]
        if connection.vendor == "sqlite" and getattr(connection, "transaction_mode", None) not in _LOCKING_MODES:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("DELETE FROM idempo_records WHERE 0")
            except DatabaseError as exc:
                transaction.set_rollback(True, using=self.alias)
                with contextlib.suppress(Exception):
                    atomic.__exit__(None, None, None)
                raise StoreUnavailable(f"SQLite's write lock on {self.alias!r} was not free: {exc}") from exc
        try:
            connection.ensure_connection()
            _raw_execute(connection.connection, _MARK)  # on PostgreSQL it also begins the transaction
        except Exception as exc:
            with contextlib.suppress(Exception):
                transaction.set_rollback(True, using=self.alias)
                atomic.__exit__(None, None, None)
            raise StoreUnavailable(f"the transaction on {self.alias!r} could not begin: {exc}") from exc
        handle = _AtomicHandle(atomic, connection)
        raw = connection.connection
        if connection.vendor == "postgresql" and hasattr(raw, "pgconn"):  # psycopg 3, not psycopg2
            # psycopg 3 (Django's "postgresql" backend on it): the view's cursors refuse a statement
            # that would end the block's transaction before it is sent (stores._psycopg).
            from .stores._psycopg import guard

            handle.factory = guard(raw)
            handle.guarded = raw
        return handle

    def connection(self, h: _AtomicHandle) -> Any:
        """Django's connection of the alias (``tx.connection.cursor()`` joins the atomic block)."""
        return h.connection

    def session(self, h: _AtomicHandle) -> Any:
        """None: Django's ORM is the session."""
        return None

    def fault_connection(self, h: _AtomicHandle) -> Any:
        """The DB-API connection under Django's (what a ``drop-connection`` fault cuts)."""
        return h.connection.connection

    def kind(self, exc: BaseException) -> str:
        """Classify a failure by the driver's error Django wraps (its ``__cause__``)."""
        cause = exc.__cause__ if isinstance(exc, DatabaseError) and exc.__cause__ is not None else exc
        return _driver_kind(cause)

    def ended(self, h: _AtomicHandle, committing: bool) -> str | None:
        """Why the atomic block's transaction is no longer idempo's (the view ended it), or None.

        A view cannot end the block through Django (``transaction.commit()``
        inside ``atomic()`` raises), but a raw ``COMMIT`` or ``ROLLBACK``
        through ``connection.cursor()`` (or the DB-API connection) does, leaving
        Django unaware: its writes until then may be committed, so the key
        must be held rather than released for a retry to run again. The driver
        tells a transaction that is over (psycopg idle; sqlite3 not in one:
        Django's SQLite connection autocommits between its transactions, so
        writes after such a COMMIT committed at once); then idempo's savepoint
        is released (committing) or rolled back to (a release or hold follows),
        which fails when the transaction open is not idempo's (psycopg began a
        new one at the next statement).
        """
        refused = h.unguard()
        if refused is not None:
            return refused
        if h.exited:
            return None
        try:
            raw = h.connection.connection
            if raw is None:
                return None  # closed: lost, not ended (the commit path decides)
            if _driver_idle(raw):
                return "a COMMIT or ROLLBACK ran through the connection; it is in no transaction"
            _raw_execute(raw, _RELEASE_MARK if committing else _ROLLBACK_TO_MARK)
        except Exception as exc:
            if _mark_missing(exc):
                return f"a COMMIT or ROLLBACK ran through the connection ({type(exc).__name__} on idempo's savepoint)"
            if self.kind(exc) == "lost":
                raise  # the commit path resolves a lost connection
            # Another failure (the transaction aborted by the view's own failed statement, 25P02): still
            # idempo's transaction; the commit path meets the same failure and decides.
            return None
        return None

    def run(self, h: _AtomicHandle, command: Any, *, in_transaction: bool) -> None:
        """The store's statement on the alias's DB-API connection (after a rollback Django autocommits it)."""
        h.unguard()
        h.connection.ensure_connection()
        self.store.settle_on(h.connection.connection, command)

    def marked_for_rollback(self, h: _AtomicHandle) -> bool:
        """Whether the view marked the block for rollback (``transaction.set_rollback(True)``, or an error
        Django caught inside it): leaving it then rolls back without raising."""
        if h.exited:
            return False
        try:
            return bool(transaction.get_rollback(using=self.alias))
        except Exception:  # not in an atomic block any more: nothing is marked
            return False

    def commit(self, h: _AtomicHandle) -> None:
        """Leave the atomic block: COMMIT.

        Raises:
            TransactionManagementError: the block is marked for rollback; leaving
                it would roll back silently, so the caller must not count it as
                committed (it rolls back and releases the record).
        """
        h.unguard()
        if self.marked_for_rollback(h):
            raise transaction.TransactionManagementError(
                f"the atomic block on {self.alias!r} is marked for rollback: nothing was committed"
            )
        h.exit()

    def rollback(self, h: _AtomicHandle) -> None:
        """Mark the atomic block for rollback and leave it."""
        h.unguard()
        if not h.exited:
            transaction.set_rollback(True, using=self.alias)
            h.exit()

    def close(self, h: _AtomicHandle, *, broken: bool) -> None:
        """Leave the block if still open (rolled back); a broken connection is closed for Django to reopen."""
        try:
            self.rollback(h)
        except Exception:
            logger.debug("idempo: rolling back the atomic block of %r failed", self.alias, exc_info=True)
        if broken:
            with contextlib.suppress(Exception):
                h.connection.close()

    def resolve(self, record_key: str) -> Any:
        """The record, read on the store's own connection."""
        return self.store.get(record_key)


def _driver_kind(exc: BaseException) -> str:
    """``conflict`` (40001, 40P01, 55P03; SQLite busy), ``lost`` (the connection is gone) or ``failed``."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return "conflict"
        if isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc):
            return "lost"
        return "failed"
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate in ("40001", "40P01", "55P03"):
        return "conflict"
    if type(exc).__module__.startswith("psycopg") and (
        (sqlstate is None and type(exc).__name__ in ("OperationalError", "InterfaceError"))
        or (sqlstate or "").startswith("08")
    ):
        return "lost"
    if isinstance(exc, InterfaceError):  # Django's "connection already closed"
        return "lost"
    return "failed"


def _check_database(store: Any, alias: str) -> _DjangoTransactor:
    """The transactor of ``alias``, after checking that ``store`` keeps its records in that database.

    Raises:
        ImproperlyConfigured: the store cannot settle a record on a connection
            of the app's (Redis, memory, an async store), the alias is unknown,
            or it names another database than the store's.
    """
    settle_on = getattr(store, "settle_on", None)
    if settle_on is None or inspect.iscoroutinefunction(settle_on):
        raise ImproperlyConfigured(
            f"settings.IDEMPO: a transactional view needs a STORE in the database of DATABASES[{alias!r}] "
            f"(sqlite:///<its NAME>, or postgresql://...), not a {type(store).__name__}"
        )
    databases: Mapping[str, Any] = getattr(settings, "DATABASES", {})
    if alias not in databases:
        raise ImproperlyConfigured(f"settings.IDEMPO DATABASE {alias!r} is not in settings.DATABASES")
    vendor = connections[alias].vendor
    path = getattr(store, "path", None)
    if path is not None:
        name = str(databases[alias].get("NAME", ""))
        if vendor != "sqlite" or os.path.realpath(name) != os.path.realpath(path):
            raise ImproperlyConfigured(
                f"settings.IDEMPO: the SQLite store {path!r} must be the file of DATABASES[{alias!r}] "
                f"({name!r}): SQLite commits atomically one file at a time"
            )
    elif vendor != "postgresql":
        raise ImproperlyConfigured(
            f"settings.IDEMPO: a PostgreSQL store needs DATABASES[{alias!r}] on the same PostgreSQL database, "
            f"not {vendor}"
        )
    return _DjangoTransactor(alias, store)


def _transactional_view_paths() -> list[str]:
    """The URL patterns of the ROOT_URLCONF whose view is marked transactional."""
    found: list[str] = []

    def walk(patterns: Any, prefix: str) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif getattr(getattr(pattern, "callback", None), "idempo_transactional", False):
                found.append(prefix + str(pattern.pattern))

    walk(get_resolver().url_patterns, "")
    return found


# --- the middleware ------------------------------------------------------------------


class IdempotencyMiddleware:
    """Make POST/PATCH requests with an ``Idempotency-Key`` execute at most once (Django).

    Configured from ``settings.IDEMPO`` (see the module docstring); a view's
    decorator (:func:`idempotency_required`, :func:`idempotency`,
    :func:`idempotency_exempt`) wins over ``ROUTES``, which wins over ``POLICY``.

    Raises:
        ImproperlyConfigured: ``IDEMPO`` is missing, has an unknown key, no
            ``STORE``, or a value idempo cannot use.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        config: Mapping[str, Any] | None = getattr(settings, "IDEMPO", None)
        if not isinstance(config, Mapping) or "STORE" not in config:
            raise ImproperlyConfigured('idempo needs settings.IDEMPO = {"STORE": "sqlite:///idempo.db", ...}')
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            raise ImproperlyConfigured(f"unknown IDEMPO settings {sorted(unknown)}; known: {sorted(_CONFIG_KEYS)}")
        try:
            store = config["STORE"]
            self.store: Store = _config.sync_store(store) if isinstance(store, str) else store
            open_at_startup(self.store)  # a misconfigured store fails the start-up; an unreachable one is a warning
            self.policy = _policy(config.get("POLICY"), "POLICY") or Policy()
            routes = config.get("ROUTES") or {}
            self._routes = RouteTable({p: _policy(v, f"ROUTES[{p!r}]") for p, v in routes.items()})
            principal = config.get("PRINCIPAL", default_principal)
            self.principal: PrincipalResolver = import_string(principal) if isinstance(principal, str) else principal
            self._secret = SecretSource(config.get("SECRET"))
        except (ConfigurationError, ImportError, TypeError) as exc:
            raise ImproperlyConfigured(f"settings.IDEMPO: {exc}") from exc
        self.key_header: str = config.get("KEY_HEADER", "Idempotency-Key")
        self._meta_key = "HTTP_" + self.key_header.upper().replace("-", "_")
        #: The ``DATABASES`` alias holding idempo's records: transactional views run in its atomic block.
        self.database: str = config.get("DATABASE", "default")
        self._transactor: _DjangoTransactor | None = None
        transactional = _transactional_view_paths()
        if transactional:
            # At start-up, not per request: a transactional view on a store that cannot join it.
            self._transactor = _check_database(self.store, self.database)

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if self._meta_key in request.META:
            declared = declared_length(request.META.get("CONTENT_LENGTH"))
            if declared is None:
                # Django's own request.body would raise ValueError (a 500) on
                # it; with a key, it is idempo's request to answer, on any route
                # (not resolved yet: the route label is "*").
                refused = invalid_content_length_answer()
                observe_request("django", _sent_method(request), "*", request.path).finish(
                    Outcome.INVALID_CONTENT_LENGTH, refused.status
                )
                return StoredHttpResponse(refused)
            if declared <= self.policy.max_request_body:
                # Read the body before any process_view (CSRF's reads request.POST,
                # which would consume a multipart stream); Django keeps it for the view.
                try:
                    request.body  # noqa: B018
                except RequestDataTooBig:
                    setattr(request, _BODY_TOO_LARGE, True)
        try:
            response = self.get_response(request)
        except BaseException as exc:
            exchange = request.__dict__.pop(_EXCHANGE, None)
            if exchange is not None:
                if isinstance(exc, Exception):
                    exchange.settle(exc)
                else:  # a crash (SystemExit, KeyboardInterrupt): settle nothing
                    exchange.abandon(exc)
            _finish_bypass(request, None)
            raise
        exchange = request.__dict__.pop(_EXCHANGE, None)
        if exchange is not None and exchange.transactional:
            return _capture_transactional(exchange, response)
        if exchange is not None:
            try:
                return _capture(exchange, response)
            except Exception as exc:  # idempo's own failure: settled, and the view's answer goes out as it is
                exchange.broke(exc)
                return response
        bypass: Bypass | None = request.__dict__.pop(_BYPASSED, None)
        if bypass is not None:
            _mark_bypassed(bypass, response)
        return response

    def policy_for_view(self, path: str, view: Callable[..., Any]) -> Policy | None:
        """The policy for a request to ``view`` at ``path`` (None: exempt).

        The view's decorator options over the ``ROUTES`` patterns over
        ``POLICY``; a view's policy is derived once, then cached.
        """
        base = self._routes.policy_for(path, self.policy) if self._routes else self.policy
        options: RouteOptions | None = getattr(view, "idempo_route_options", None)
        return base if options is None else options.apply(base, self.policy)

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        """Decide for the resolved view: answer now (replay, 400, 409, 422, 413, 503) or take the lease."""
        method = _sent_method(request)
        policy = self.policy_for_view(request.path, view_func)
        if policy is None or not takes_part(policy, method):
            return None
        if getattr(view_func, "idempo_transactional", False) and self._transactor is None:
            # A view of a per-request urlconf (the ROOT_URLCONF's were checked at start-up).
            self._transactor = _check_database(self.store, self.database)
        meta = request.META
        raw_key = meta.get(self._meta_key)
        raw_content_type = meta.get("CONTENT_TYPE")
        resolve = self.principal
        steps = admission(
            self.store,
            policy,
            self._secret,
            front="django",
            route=getattr(request.resolver_match, "route", None) or "*",
            method=method,
            path=request.path,
            identity_path=_identity_path(request),
            query=meta.get("QUERY_STRING", ""),
            key_values=[] if raw_key is None else split_folded(header_bytes(raw_key)),
            content_types=[header_bytes(raw_content_type)] if raw_content_type else [],
            principal=lambda: resolve(request),
            legacy_principal=lambda who: legacy_principal(request, resolve, who),
            read_body=lambda: _read_body(request, policy),
        )
        admitted = drive_sync(steps, self.store, decided=False)
        if admitted is None:
            return None
        if isinstance(admitted, Execute):
            assert isinstance(admitted.execution, Execution)
            exchange = Exchange(admitted.execution, admitted.observation, policy)
            if getattr(view_func, "idempo_transactional", False):
                problem = self._begin_transaction(exchange)
                if problem is not None:
                    return StoredHttpResponse(problem)
            setattr(request, _EXCHANGE, exchange)
            return None
        if isinstance(admitted, StoredResponse):
            return StoredHttpResponse(admitted)
        # The store failed and the policy fails open: the view runs
        # unprotected; __call__ marks its answer and finishes the observation.
        assert isinstance(admitted, Bypass)  # GONE is ASGI's alone
        admitted.observation.handler_started()
        setattr(request, _BYPASSED, admitted)
        return None

    def _begin_transaction(self, exchange: Exchange) -> StoredResponse | None:
        """Enter the view's ``transaction.atomic()`` on the records' alias; a 503 problem when it cannot."""
        assert self._transactor is not None
        execution = exchange.execution
        assert isinstance(execution, TransactionalExecution)
        try:
            execution.transaction(self._transactor)
        except Exception as exc:
            logger.warning("idempo: opening the transaction of record %s failed: %s", execution.record_key, exc)
            exchange.settle(exc)  # released: a retry executes
            return store_unavailable_answer(execution.policy)
        return None

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        """Note the view's exception: Django answers 500 itself, and the exception's verdict decides."""
        exchange = getattr(request, _EXCHANGE, None)
        if exchange is not None:
            exchange.reported = exception


def _sent_method(request: HttpRequest) -> str:
    """The method as the client sent it: Django upper-cases ``request.method`` (a ``post`` runs as POST).

    Under WSGI ``REQUEST_METHOD`` keeps the server's value; under ASGI the
    scope does (Django's META copy is upper-cased too).
    """
    scope: dict[str, Any] | None = getattr(request, "scope", None)
    if scope is not None and isinstance(scope.get("method"), str):
        return str(scope["method"])
    return str(request.META.get("REQUEST_METHOD") or request.method or "")


def _identity_path(request: HttpRequest) -> str:
    """The path record keys and fingerprints are made of: the WSGI or ASGI front's for the same request.

    Not ``request.path``: Django re-escapes path bytes that are not UTF-8 (a
    raw ``/a%FF`` is ``"/a%FF"``, as is a raw ``/a%25FF``) and decodes an
    encoded slash (``/a%2Fb`` is ``/a/b``), so two resources would share it.
    """
    scope: dict[str, Any] | None = getattr(request, "scope", None)
    if scope is not None and isinstance(scope.get("path"), str):
        return identity_path(scope["path"], scope.get("raw_path"))
    # Django replaced META's PATH_INFO with its own re-escaped text; the raw
    # target, where the server passes it, is the WSGI front's source.
    target = raw_target(request.META)
    if target is None:
        return identity_path(request.path, None)
    return identity_path(unquote_to_bytes(target).decode("utf-8", "surrogateescape"), target)


def _declared_length(request: HttpRequest) -> int:
    # __call__ answered a malformed length already; 0 keeps this total.
    return declared_length(request.META.get("CONTENT_LENGTH")) or 0


def _finish_bypass(request: HttpRequest, status: int | None) -> None:
    """Finish a bypassed request's observation (``bypassed``, with ``status``); nothing if it was not bypassed."""
    bypass: Bypass | None = request.__dict__.pop(_BYPASSED, None)
    if bypass is not None:
        bypass.finish(status)


def _mark_bypassed(bypass: Bypass, response: HttpResponseBase) -> None:
    """Mark the view's answer bypassed; finish the observation now, or when a streamed body ends.

    A streamed body runs the view's generator as the server iterates it, so
    the handler's time runs until it ends (:class:`idempo._http.wsgi.BypassedBody`).
    A file response (whose file the server may send itself) and an async
    stream, which Django iterates on its own terms, finish now.
    """
    name, value = BYPASSED_HEADER_TEXT
    response.headers[name] = value
    if (
        not response.streaming
        or getattr(response, "file_to_stream", None) is not None
        or getattr(response, "is_async", False)
    ):
        bypass.finish(response.status_code)
        return
    status = response.status_code
    # The setter keeps the body's close() among the response's closers, which
    # Django calls when the server closes the response (the client left too).
    response.streaming_content = BypassedBody(bypass, response.streaming_content, lambda: status)


def _read_body(request: HttpRequest, policy: Policy) -> bytes | None:
    """The body Django read (``request.body``); None when it exceeds ``policy.max_request_body``.

    Raises:
        BodyIncomplete: the body is shorter than its declared length.
    """
    limit = policy.max_request_body
    declared = _declared_length(request)
    if getattr(request, _BODY_TOO_LARGE, False) or declared > limit:
        return None
    body: bytes = request.body
    if len(body) > limit:
        return None
    if len(body) < declared:
        raise BodyIncomplete()
    return body


def _policy(value: Any, where: str) -> Policy | None:
    if value is None or isinstance(value, Policy):
        return value
    if isinstance(value, Mapping):
        return Policy(**value)
    raise ImproperlyConfigured(f"settings.IDEMPO {where} must be a Policy, a dict of Policy arguments or None")


def _capture_transactional(exchange: Exchange, response: HttpResponseBase) -> HttpResponseBase:
    """Capture the whole answer, then COMMIT (or roll back); send it only after COMMIT returned.

    A streamed body is read to its end first (a transactional view cannot
    stream what may yet roll back). When the transaction did not commit as
    the answer says, a problem goes out instead (see
    :meth:`idempo._http.wsgi.Exchange.settle_transaction`).
    """
    exchange.started = True
    body = b""
    with exchange.guard():
        lines = [
            *response.items(),
            *(("Set-Cookie", cookie.OutputString()) for cookie in response.cookies.values()),
        ]
        exchange.start(response.status_code, lines)
        if response.streaming:
            body = b"".join(response.streaming_content)
            response.streaming_content = [body]
        else:
            assert isinstance(response, HttpResponse)
            body = response.content
        exchange.capture.add(body)
    execution = exchange.execution
    assert isinstance(execution, TransactionalExecution)
    transactor = execution.used
    # The view rolled its own block back (transaction.set_rollback(True)): nothing
    # of it commits, so the record cannot complete with it. It is released (after
    # the ROLLBACK, on the same connection) and the view's answer goes out unstored:
    # the answer the view chose, and a retry runs the view again.
    rolled_back = isinstance(transactor, _DjangoTransactor) and transactor.marked_for_rollback(execution.handle)
    if rolled_back:
        logger.info(
            "idempo: the view rolled back its transaction (record %s): the key is released, the answer not stored",
            execution.record_key,
        )
    problem = exchange.settle_transaction(rolled_back=rolled_back)
    if problem is not None:
        response.close()
        return StoredHttpResponse(problem)
    execution.before_send()
    return response


def _capture(exchange: Exchange, response: HttpResponseBase) -> HttpResponseBase:
    """Capture the view's response for the record; settle now, or when a streamed body ends."""
    exchange.started = True
    with exchange.guard():
        lines = [
            *response.items(),
            *(("Set-Cookie", cookie.OutputString()) for cookie in response.cookies.values()),
        ]
        exchange.start(response.status_code, lines)
        if not response.streaming:
            assert isinstance(response, HttpResponse)
            exchange.capture.add(response.content)
    if not response.streaming or exchange.settled:
        # Settled by a failure above (the answer then passes through as it is), or now.
        exchange.settle()
        return response
    body = CapturedBody(exchange, response.streaming_content)
    response.streaming_content = body
    close = response.close

    def close_after_capture() -> None:
        # First finish the body the server stopped reading (the client left),
        # then let Django close the view's iterator and files.
        try:
            body.close()
        finally:
            close()

    response.close = close_after_capture
    return response
