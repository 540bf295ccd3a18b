"""``@idempotent``: run a function at most once per idempotency key, for sync and async code.

::

    from idempo import idempotent

    @idempotent(store="sqlite:///idempo.db", key="payment_id")
    def charge(payment_id: str, account: str, cents: int) -> Receipt:
        ...                                   # runs once per payment_id

    charge("pay_1", "acct_9", 1999)           # executes, stores the Receipt
    charge("pay_1", "acct_9", 1999)           # replays: an equal Receipt, not executed
    charge("pay_1", "acct_9", 5000)           # FingerprintMismatch: same key, other arguments

The key comes from an argument (its name) or from a callable of the bound
arguments. The other arguments make up the **fingerprint**: their canonical
form (:func:`idempo.serializers.fingerprint_form`: one form per equal value,
sets in a canonical order, binary values included) as RFC 8785 canonical JSON,
hashed with HMAC-SHA256 under the server secret (:mod:`idempo.secrets`), so a
key reused for a different call is refused (as the IETF draft
draft-ietf-httpapi-idempotency-key-header asks of HTTP APIs, section 2.7).

The protocol is the one every idempo front shares, the sans-I/O flow of
:mod:`idempo._core.flow` driven against the store: a call takes the lease on
its record, runs, and completes the record with its serialised result; a
repeat replays that result; a concurrent repeat raises :class:`KeyInProgress`
or, with ``wait``, waits for the result. The result is stored as a response
(status 200, ``content-type`` naming the serialiser, the bytes as the body),
so every store holds it unchanged; the default JSON serialiser keeps its types
(:class:`~idempo.serializers.JSONSerializer`), so a replay returns what the
first call returned, with or without a return annotation.

One decorator serves sync and async functions: it inspects the function
(``inspect.iscoroutinefunction``, as stamina does). A sync function needs a
:class:`~idempo.typing.Store`, an async one an :class:`~idempo.typing.AsyncStore`;
a store URL gives the right one.
"""

from __future__ import annotations

import functools
import inspect
import random
import time
import types
import typing
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Literal, ParamSpec, TypeVar, cast
from uuid import UUID

import anyio

from ._core.policy import Policy, Verdict
from ._engine.calls import Engine, async_store, canonical_form, key_text, record_key, scope_of, sync_store
from ._engine.transaction import require_transactor, transactor_of
from .exceptions import ConfigurationError, MissingKey, TransactionConflict
from .observability._observation import logger
from .secrets import SecretSource
from .serializers import JSONSerializer, PickleSerializer, Serializer, check_return_type, fingerprint_form
from .typing import AsyncStore, Store

__all__ = ["Arguments", "KeyFunction", "idempotent", "record_key"]

P = ParamSpec("P")
T = TypeVar("T")

#: The bound arguments of a call, by parameter name, defaults applied; the
#: items of a ``**kwargs`` parameter appear under their own names.
Arguments = Mapping[str, Any]

#: Returns the idempotency key of a call from its :data:`Arguments`
#: (a str, an int or a UUID), or None when the call has none.
KeyFunction = Callable[[Arguments], "str | int | UUID | None"]

# Parameters that stand for the instance or class of a method: never part of the fingerprint.
_RECEIVERS = ("self", "cls")


def _serializer(value: Serializer | str) -> Serializer:
    if value == "json":
        return JSONSerializer()
    if value == "pickle":
        return PickleSerializer()
    if isinstance(value, str) or not isinstance(value, Serializer):
        raise ConfigurationError(f"serializer must be 'json', 'pickle' or a Serializer, got {value!r}")
    return value


class _Binder:
    """Reads a call's idempotency key and fingerprint from its arguments."""

    def __init__(
        self,
        fn: Callable[..., Any],
        scope: str,
        key: str | KeyFunction,
        fingerprint: Collection[str] | Callable[[Arguments], Any] | None,
        exclude: Collection[str],
        require_key: bool,
    ) -> None:
        self.scope = scope
        self.signature = inspect.signature(fn)
        params = self.signature.parameters
        self._var_keyword = next((p.name for p in params.values() if p.kind is p.VAR_KEYWORD), None)
        names = set(params) - ({self._var_keyword} if self._var_keyword else set())

        def check(name: str, what: str) -> None:
            if name not in names and self._var_keyword is None:
                raise ConfigurationError(f"{scope}: {what} {name!r} is not a parameter of the function")

        if isinstance(key, str):
            check(key, "key")
        elif not callable(key):
            raise ConfigurationError(f"{scope}: key must be a parameter name or a callable, got {key!r}")
        if isinstance(fingerprint, str):
            raise ConfigurationError(f"{scope}: fingerprint must be a collection of names, not one string")
        if isinstance(exclude, str):
            raise ConfigurationError(f"{scope}: exclude must be a collection of names, not one string")
        for name in exclude:
            check(name, "excluded argument")
        if fingerprint is not None and not callable(fingerprint):
            for name in fingerprint:
                check(name, "fingerprint argument")
        self.key = key
        self.fingerprint = fingerprint
        skipped = set(exclude)
        if isinstance(key, str):
            skipped.add(key)
        first = next(iter(params.values()), None)
        if first is not None and first.name in _RECEIVERS and first.kind is first.POSITIONAL_OR_KEYWORD:
            skipped.add(first.name)
        self.skipped = frozenset(skipped)
        self.require_key = require_key

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        if self._var_keyword is not None:
            arguments.update(arguments.pop(self._var_keyword))
        return arguments

    def identify(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, bytes] | None:
        """Return (key, canonical form of the fingerprinted arguments) of a call; None without a key.

        None when the call has no key and none is required; the engine keys
        the form's digest with the server secret.

        Raises:
            MissingKey: no key, and ``require_key``.
            InvalidKey: the key is blank or of another type than str, int or UUID.
            ConfigurationError: an argument of the fingerprint has no canonical form.
            TypeError: the arguments do not fit the function's signature.
        """
        arguments = self.arguments(args, kwargs)
        view = MappingProxyType(arguments)
        raw = arguments.get(self.key) if isinstance(self.key, str) else self.key(view)
        key = key_text(raw, self.scope)
        if key is None:
            if self.require_key:
                raise MissingKey(f"{self.scope} was called without an idempotency key")
            return None
        return key, self._fingerprint(arguments, view)

    def _fingerprint(self, arguments: dict[str, Any], view: Arguments) -> bytes:
        if callable(self.fingerprint):
            try:
                return canonical_form(fingerprint_form(self.fingerprint(view)))
            except TypeError as exc:
                raise ConfigurationError(f"{self.scope}: the fingerprint callable returned {exc}") from exc
        if self.fingerprint is not None:
            chosen = {name: arguments.get(name) for name in self.fingerprint}
        else:
            chosen = {name: value for name, value in arguments.items() if name not in self.skipped}
        form = {}
        for name, value in chosen.items():
            try:
                form[name] = fingerprint_form(value)
            except TypeError as exc:
                raise ConfigurationError(
                    f"{self.scope}: argument {name!r} cannot be part of the fingerprint ({exc}); "
                    f"leave it out with exclude=[{name!r}], or choose the arguments with fingerprint=[...]"
                ) from exc
        return canonical_form(form)


def _return_annotation(fn: Callable[..., Any], scope: str, serializer: Serializer) -> Callable[[], Any]:
    """The function's return annotation, checked by a JSON serialiser; resolved now, or on the first call.

    A JSON serialiser refuses an annotation naming a type it cannot rebuild
    (:func:`~idempo.serializers.check_return_type`): at decoration when the
    annotation resolves then, else (a forward reference to a class defined
    later) when the first call asks for it, before the function runs.

    Raises:
        ConfigurationError: from the returned callable, or at once.
    """

    def check(hint: Any) -> Any:
        if isinstance(serializer, JSONSerializer):
            try:
                check_return_type(hint)
            except TypeError as exc:
                raise ConfigurationError(
                    f"{scope}: {exc}; return the types docs/decorator.md lists, or choose serializer='pickle'"
                ) from exc
        return hint

    @functools.cache
    def annotation() -> Any:
        try:
            hint = _resolve_return(fn)
        except Exception:
            logger.warning("idempo: cannot resolve the return annotation of %r; replays are checked against Any", fn)
            return Any
        return check(hint)

    try:
        hint = _resolve_return(fn)
    except Exception:
        pass  # a forward reference, resolved on the first call
    else:
        check(hint)
    return annotation


_NO_CODE = (lambda: None).__code__


def _resolve_return(fn: Callable[..., Any]) -> Any:
    """The return annotation alone, evaluated in the function's module.

    Alone, so a parameter annotated with a name only a type checker imports
    (``if TYPE_CHECKING:``) does not hide the return type.

    Raises:
        NameError: the annotation names something not (yet) defined there.
    """
    target = inspect.unwrap(fn)
    annotations = getattr(target, "__annotations__", None) or {}
    if "return" not in annotations:
        return Any
    shim = types.FunctionType(_NO_CODE, getattr(target, "__globals__", {}))
    shim.__annotations__ = {"return": annotations["return"]}
    return typing.get_type_hints(shim)["return"]


def idempotent(
    *,
    store: Store | AsyncStore | str,
    key: str | KeyFunction,
    scope: str | None = None,
    record_ttl: float | timedelta = 86400.0,
    lease_ttl: float | timedelta = 30.0,
    wait: float | timedelta = 0.0,
    fingerprint: Collection[str] | Callable[[Arguments], Any] | None = None,
    exclude: Collection[str] = (),
    serializer: Serializer | Literal["json", "pickle"] = "json",
    require_key: bool = False,
    exception_verdicts: Mapping[type[BaseException], Verdict] | None = None,
    hold_ttl: float | timedelta | None = None,
    fail_open: bool = False,
    on_takeover: Literal["execute", "hold"] = "execute",
    secret: str | bytes | None = None,
    transactional: bool = False,
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Make a sync or async function run at most once per idempotency key.

    The decorated function keeps its signature and type. The first call with
    a key runs it and stores its result; every later call with that key (and
    the same other arguments) returns an equal result without running it,
    until ``record_ttl`` has passed.

    Args:
        store: a :class:`~idempo.typing.Store` for a sync function, an
            :class:`~idempo.typing.AsyncStore` for an async one, or a store
            URL (``"sqlite:///idempo.db"``, ``"redis://..."``, ...) that
            builds the right one. Share one store object among functions to
            share its connections.
        key: the name of the parameter holding the idempotency key, or a
            callable receiving the call's :data:`Arguments` and returning the
            key. A key is a str (not blank), an int or a UUID.
        scope: what keys are unique within; default the function's
            ``module.qualname``. Two scopes never share records. Set it to
            keep records across a rename or move of the function.
        record_ttl: seconds (or a timedelta) a result is kept and replayed
            (default 24 h).
        lease_ttl: seconds (or a timedelta) of the lease a running call holds
            on its key: a crashed call delays a retry by at most this long.
            The lease is renewed every third of it while the call runs
            (asyncio, trio or a blocking call), so a slower call keeps its
            key. Default 30 s; zero or less is refused
            (shared/cases B03).
        wait: seconds a concurrent call with the same key waits for the first
            one's result before raising :class:`~idempo.KeyInProgress`
            (default 0: raise at once).
        fingerprint: the names of the arguments that make up the fingerprint,
            or a callable of the :data:`Arguments` returning a value with a
            canonical form (:func:`~idempo.serializers.fingerprint_form`);
            default every argument except the key, a method's
            ``self``/``cls`` and ``exclude``. ``()`` disables the check.
        exclude: arguments left out of the default fingerprint (connections,
            clients, loggers: anything without a canonical form).
        serializer: ``"json"`` (default: typed JSON, a replay returns the
            types the first call returned; see
            :class:`~idempo.serializers.JSONSerializer`), ``"pickle"`` (any
            picklable value; for stores only you can write to) or a
            :class:`~idempo.serializers.Serializer`.
        require_key: raise :class:`~idempo.MissingKey` when the key is None;
            by default such a call runs without idempotency and stores nothing.
        exception_verdicts: what an exception raised by the function does to
            its key, by class (matched along the MRO): ``Verdict.RELEASE``
            (default: a retry runs again) or ``Verdict.HOLD`` (the key is held:
            retries raise :class:`~idempo.KeyHeld` for ``hold_ttl``; for
            outcomes that are unknown, such as a timeout talking to a payment
            provider). The exception always propagates unchanged.
        hold_ttl: seconds a HOLD keeps the key (default ``record_ttl``).
        on_takeover: what a call does when it finds the expired lease of a
            call that died mid-way (:class:`~idempo.Policy` ``on_takeover``):
            ``"execute"`` (default) runs the function again; ``"hold"`` raises
            :class:`~idempo.KeyHeld` instead, until ``hold_ttl`` passes or an
            operator resolves the key (``idempo resolve``).
        fail_open: when the store fails before the call, run the function
            without idempotency (logged) instead of raising
            :class:`~idempo.StoreError` (default: fail closed, shared/cases B18).
        secret: the server secret the record keys and fingerprints are keyed
            with (HMAC-SHA256, at least 16 bytes); default ``$IDEMPO_SECRET``,
            else a random one kept in the store (see :mod:`idempo.secrets`).
        transactional: run the function inside a transaction on the store's
            own database (a store built by ``PostgresStore.from_pool`` /
            ``from_engine``, or an SQLite store on the app's file): it gets the
            transaction as the keyword argument ``tx``
            (:class:`~idempo.transactional.Transaction`, or
            :class:`~idempo.transactional.AsyncTransaction` for an async
            function), not part of the fingerprint; the record completes as
            that transaction's last statement, so its writes commit if and
            only if the result is stored (DESIGN guarantee 6). A transaction
            the database aborts to resolve a conflict (40001, 40P01, 55P03) is
            run again in process up to 3 more times, jittered, then raises
            :class:`~idempo.exceptions.TransactionConflict`.

    Returns:
        A decorator; the decorated function raises, besides what the
        function raises:

        - :class:`~idempo.KeyInProgress` (``.retry_after`` seconds): a call
          with the same key is running, or its result is being saved.
        - :class:`~idempo.KeyHeld`: the key is held (its first outcome is
          unknown: a HOLD verdict, or a takeover under ``on_takeover="hold"``).
        - :class:`~idempo.ResultNotReplayable`: the first call ran but its
          result could not be saved within ``save_retry_for``.
        - :class:`~idempo.FingerprintMismatch`: the key was used with other
          arguments.
        - :class:`~idempo.MissingKey`, :class:`~idempo.InvalidKey`: no key
          (with ``require_key``), or a blank key or one of another type.
        - :class:`~idempo.StoreError` / :class:`~idempo.StoreUnavailable`:
          the store failed before the call, so it did not run. A store failure
          after the call is logged; the result is still returned, and the save
          is retried in the background while the lease is kept (duplicates
          get KeyInProgress, never a second run).
        - :class:`~idempo.ConfigurationError`: an argument of the fingerprint
          has no canonical form (the call did not run), or the result cannot
          be stored with its type or does not fit the return annotation (the
          call ran; nothing is stored and its key is held, so it does not run
          twice).

    Raises:
        ConfigurationError: at decoration: a TTL that is not positive, a key
            or argument name that is not a parameter, a generator function,
            a sync store for an async function (or the reverse), an unknown
            store URL or serialiser, a return annotation the JSON serialiser
            cannot rebuild (:func:`~idempo.serializers.check_return_type`;
            one naming a class defined later is checked on the first call,
            before the function runs), a secret shorter than 16 bytes.
    """
    policy = Policy(
        record_ttl=record_ttl,
        lease_ttl=lease_ttl,
        wait=wait,
        exception_verdicts=exception_verdicts,
        hold_ttl=hold_ttl,
        fail_open=fail_open,
        require_key=require_key,
        on_takeover=on_takeover,
    )
    chosen_serializer = _serializer(serializer)
    secrets = SecretSource(secret)

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        name = scope if scope is not None else scope_of(fn)
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise ConfigurationError(f"{name}: @idempotent cannot store a generator's results")
        if transactional:
            wrapped: Callable[P, T] = _transactional(
                fn, name, store, key, fingerprint, exclude, policy, chosen_serializer, secrets
            )
            return wrapped
        binder = _Binder(fn, name, key, fingerprint, exclude, policy.require_key)
        return_type = _return_annotation(fn, name, chosen_serializer)
        engine = Engine(name, policy, chosen_serializer, return_type, secrets)

        if inspect.iscoroutinefunction(fn):
            a_store = async_store(store, name)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                identity = binder.identify(args, kwargs)
                return_type()  # a return type it cannot store is refused before the first call runs
                call = cast(Callable[[], Awaitable[Any]], functools.partial(fn, *args, **kwargs))
                if identity is None:
                    return await call()
                result, _ = await engine.run_async(a_store, *identity, call)
                return result

            return cast(Callable[P, T], async_wrapper)

        s_store = sync_store(store, name)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            identity = binder.identify(args, kwargs)
            return_type()  # a return type it cannot store is refused before the first call runs
            call = functools.partial(fn, *args, **kwargs)
            if identity is None:
                return call()
            result, _ = engine.run_sync(s_store, *identity, call)
            return result

        return wrapper

    return decorate


# A transaction the database aborted to resolve a conflict is run again this many more times.
_CONFLICT_RETRIES = 3
# Seconds of the first retry's delay (doubled each time, full jitter).
_CONFLICT_DELAY = 0.02


def _conflict_delay(attempt: int) -> float:
    return random.uniform(0, _CONFLICT_DELAY * (2**attempt))


def _transactional(
    fn: Callable[..., Any],
    name: str,
    store: Store | AsyncStore | str,
    key: str | KeyFunction,
    fingerprint: Collection[str] | Callable[[Arguments], Any] | None,
    exclude: Collection[str],
    policy: Policy,
    serializer: Serializer,
    secrets: SecretSource,
) -> Any:
    """``@idempotent(transactional=True)``: the function gets ``tx`` and its record completes inside it."""
    if "tx" not in inspect.signature(fn).parameters:
        raise ConfigurationError(f"{name}: a transactional function takes the transaction as a parameter named tx")
    binder = _Binder(fn, name, key, fingerprint, (*exclude, "tx"), policy.require_key)
    return_type = _return_annotation(fn, name, serializer)
    engine = Engine(name, policy, serializer, return_type, secrets)

    def identify(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, bytes]:
        if "tx" in kwargs:
            raise TypeError(f"{name}: tx is given by idempo, not by the caller")
        identity = binder.identify(args, {**kwargs, "tx": None})
        if identity is None:
            raise MissingKey(f"{name} is transactional: every call needs an idempotency key")
        return_type()
        return identity

    if inspect.iscoroutinefunction(fn):
        a_store = async_store(store, name)
        require_transactor(a_store, name)

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            identity = identify(args, kwargs)

            async def call(tx: Any) -> Any:
                return await fn(*args, **kwargs, tx=tx)

            for attempt in range(_CONFLICT_RETRIES + 1):
                try:
                    result, _ = await engine.run_async(a_store, *identity, call, transactional=True)
                except Exception as exc:
                    if not _conflict(a_store, exc):
                        raise
                    if attempt == _CONFLICT_RETRIES:
                        if isinstance(exc, TransactionConflict):
                            raise
                        raise _gave_up(name, exc) from exc
                    await anyio.sleep(_conflict_delay(attempt))
                else:
                    return result
            raise AssertionError("unreachable")  # pragma: no cover

        return async_wrapper

    s_store = sync_store(store, name)
    require_transactor(s_store, name)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        identity = identify(args, kwargs)

        def call(tx: Any) -> Any:
            return fn(*args, **kwargs, tx=tx)

        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                result, _ = engine.run_sync(s_store, *identity, call, transactional=True)
            except Exception as exc:
                if not _conflict(s_store, exc):
                    raise
                if attempt == _CONFLICT_RETRIES:
                    if isinstance(exc, TransactionConflict):
                        raise
                    raise _gave_up(name, exc) from exc
                time.sleep(_conflict_delay(attempt))
            else:
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


def _gave_up(name: str, exc: Exception) -> TransactionConflict:
    return TransactionConflict(f"{name}: the transaction conflicted {_CONFLICT_RETRIES + 1} times: {exc}")


def _conflict(store: object, exc: Exception) -> bool:
    """Whether a call's failure is its transaction aborted to resolve a conflict: safe to run again.

    At COMMIT (TransactionConflict), or at one of the function's own
    statements (the database's 40001, 40P01, 55P03, raised out of the function).
    """
    if isinstance(exc, TransactionConflict):
        return True
    try:
        return bool(transactor_of(store).kind(exc) == "conflict")
    except Exception:
        return False
