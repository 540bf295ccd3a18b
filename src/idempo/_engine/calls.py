"""What ``@idempotent`` and the idempotent consumers share: the engine that runs a call once per key.

:class:`Engine` drives the sans-I/O flow (:func:`idempo._core.flow.begin_flow`)
against a store with the drivers of :mod:`idempo._engine._async.drivers`, runs the
call when it holds the lease, and settles the record with
:func:`idempo._core.flow.finish`.
A call's result is stored as a response (status 200, ``content-type`` naming
the serialiser, the serialised bytes as the body), so every store keeps it
unchanged. Sync and async run the same steps (:meth:`Engine.steps`) and differ
only in the driver.
While the call runs its lease is renewed (:mod:`idempo._engine.lease`), so a call
slower than ``lease_ttl`` is not run twice; ``lease_ttl`` is how long a
crashed call blocks its key.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar, cast
from uuid import UUID

from .. import _config
from .._core.digests import Digests, as_digests, legacy_record_key, legacy_value
from .._core.fingerprint import canonical_json
from .._core.flow import Held, InProgress, LegacyIdentity, Mismatch, NotReplayable, Proceed, Replay
from .._core.policy import Policy, Verdict
from .._core.records import StoredResponse
from ..exceptions import (
    ConfigurationError,
    FingerprintMismatch,
    InvalidKey,
    KeyHeld,
    KeyInProgress,
    ResultNotReplayable,
    StoreError,
)
from ..observability._observation import Outcome, observe_request
from ..secrets import SecretSource
from ..serializers import JSONSerializer, Serializer
from ..stores._base import open_at_startup
from ..typing import AsyncStore, Store
from ._async.drivers import drive_async
from ._sync.drivers import drive_sync
from .admission import StoreFailed, admit
from .commands import Call, Command, Lease

__all__ = [
    "Engine",
    "async_store",
    "canonical_form",
    "key_text",
    "record_key",
    "scope_of",
    "sync_store",
]

T = TypeVar("T")

# The "method" part of a function's record key. "@" is not an HTTP token
# character (RFC 9110 section 5.6.2), so a function's records never share a
# record key with an HTTP route's even in one store.
_METHOD = "@idempotent"
_STATUS = 200
_CONTENT_TYPE = b"content-type"
_LEGACY_JSON = JSONSerializer.legacy_media_type.encode("latin-1")


def record_key(scope: str, key: str, *, secret: Digests | bytes | str) -> str:
    """Return the record key under which ``@idempotent(scope=scope)`` keeps ``key``.

    For inspecting records (``store.get(record_key(...))``). The default scope
    of a function is ``f"{fn.__module__}.{fn.__qualname__}"``.

    Args:
        scope: the function's scope.
        key: the idempotency key, as a str.
        secret: the server secret the decorator uses (``secret=``,
            ``$IDEMPO_SECRET``, or the store's: :func:`idempo.secrets.store_secret`).

    Raises:
        ValueError: the secret is shorter than 16 bytes.
    """
    return as_digests(secret).record_key("", _METHOD, scope, key)


def key_text(value: object, scope: str) -> str | None:
    """The key as a string; None when the call has none."""
    if value is None:
        return None
    if isinstance(value, str):
        # An empty or blank key is a bug in the caller, never a key
        # (shared/cases B09): refuse it rather than share one record.
        if not value.strip():
            raise InvalidKey(f"{scope}: the idempotency key is empty or blank")
        return value
    if isinstance(value, int | UUID) and not isinstance(value, bool):
        return str(value)
    raise InvalidKey(f"{scope}: the idempotency key must be a str, int or UUID, got {type(value).__qualname__}")


def canonical_form(value: Any) -> bytes:
    """The bytes a call's fingerprint is the keyed digest of: the canonical JSON of a JSON form.

    Two argument sets get one form exactly when their JSON has one
    canonical form: the request body's rules, numbers compared by exact
    decimal value (see :mod:`idempo._core.fingerprint`). NaN and infinities,
    which JSON cannot write, are written in Python's own sorted form instead
    (tagged, so the two forms never collide): still stable. The engine hashes
    it with HMAC-SHA256 under the server secret (:meth:`Digests.value`).
    """
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        return b"j:" + canonical_json(text.encode("utf-8", "surrogatepass"))
    except (ValueError, TypeError, RecursionError):
        return b"p:" + repr(_sorted(value)).encode("utf-8", "surrogatepass")


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return sorted((k, _sorted(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


class Engine:
    """The decorator's protocol for one scope, shared by ``@idempotent`` and the consumers.

    Its :meth:`steps` admit a call (:func:`idempo._engine.admission.admit`),
    run it when it holds the lease, and settle the record; :meth:`run_sync`
    and :meth:`run_async` drive those same steps against a blocking or an
    async store.
    """

    def __init__(
        self,
        scope: str,
        policy: Policy,
        serializer: Serializer,
        annotation: Callable[[], Any],
        secret: SecretSource | None = None,
    ) -> None:
        self.scope = scope
        self.policy = policy
        self.serializer = serializer
        self.secret = secret if secret is not None else SecretSource()
        self._annotation = annotation
        self._media_type = serializer.media_type.encode("latin-1")

    def identify(self, digests: Digests, key: str, form: bytes | None) -> tuple[str, str]:
        """The record key and fingerprint of a call: keyed digests of its key and canonical form.

        A call without a form (a consumer with no fingerprint function) has the
        empty fingerprint: never compared.
        """
        fingerprint = "" if form is None else digests.value(form)
        return digests.record_key("", _METHOD, self.scope, key), fingerprint

    def legacy(self, key: str, form: bytes | None) -> LegacyIdentity:
        """Where a version before keyed digests kept this call's record (looked up in the legacy window only)."""
        fingerprint = "" if form is None else legacy_value(form)
        return LegacyIdentity(legacy_record_key("", _METHOD, self.scope, key), fingerprint)

    def encode(self, result: Any) -> StoredResponse:
        try:
            if isinstance(self.serializer, JSONSerializer):
                # Checked against the return annotation too, so the replay is.
                body = self.serializer.dumps(result, self._annotation())
            else:
                body = self.serializer.dumps(result)
        except Exception as exc:  # whatever the serialiser raised: the result is not stored, the key is held
            raise ConfigurationError(
                f"{self.scope} returned a {type(result).__qualname__} that {self.serializer!r} cannot store ({exc}); "
                "return the types docs/decorator.md lists (dataclasses, pydantic models, ...), "
                "or choose serializer='pickle'"
            ) from exc
        return StoredResponse(_STATUS, ((_CONTENT_TYPE, self._media_type),), body)

    def decode(self, response: StoredResponse) -> Any:
        media_type = next((v for n, v in response.headers if n == _CONTENT_TYPE), b"")
        loads = self.serializer.loads
        if isinstance(self.serializer, JSONSerializer) and (response.status, media_type) == (_STATUS, _LEGACY_JSON):
            loads = self.serializer.loads_legacy  # written before typed results
        elif response.status != _STATUS or media_type != self._media_type:
            # Another serialiser (or an HTTP response) wrote this record: never
            # hand its bytes to ours, above all never unpickle them.
            raise StoreError(
                f"{self.scope}: the stored result is {media_type.decode('latin-1') or 'untyped'} "
                f"(status {response.status}), not {self.serializer.media_type}"
            )
        try:
            return loads(response.body, self._annotation())
        except Exception as exc:  # a malformed record, or what a class rebuilt from it raised
            raise StoreError(f"{self.scope}: the stored result cannot be replayed: {exc}") from exc

    def refusal(self, decision: InProgress | Mismatch | Held | NotReplayable) -> Exception:
        if isinstance(decision, InProgress):
            return KeyInProgress(
                f"{self.scope}: a call with this idempotency key is still running; retry in {decision.retry_after} s",
                retry_after=decision.retry_after,
            )
        if isinstance(decision, Held):
            return KeyHeld(
                f"{self.scope}: the first call with this idempotency key has an unknown outcome ({decision.reason}); "
                "the key is held until it expires or an operator resolves it (idempo resolve)",
                reason=decision.reason,
            )
        if isinstance(decision, NotReplayable):
            return ResultNotReplayable(
                f"{self.scope}: the first call with this idempotency key ran, but its result was not kept "
                f"({decision.reason}); it will not run again for this key"
            )
        return FingerprintMismatch(f"{self.scope}: the idempotency key was already used with other arguments")

    def settlement(self, result: Any) -> tuple[StoredResponse | None, Verdict | None, Exception | None]:
        """What settles the record for a result (response, verdict), and the error to raise once settled."""
        try:
            response = self.encode(result)
        except ConfigurationError as exc:
            # The call ran, so its side effects may have happened: neither
            # replaying nor running it again is safe. Hold the key.
            return None, Verdict.HOLD, exc
        return response, None, None

    def steps(
        self, store: object, key: str, form: bytes | None, call: Callable[..., Any], transactional: bool = False
    ) -> Generator[Command, Any, tuple[Any, bool]]:
        """Run ``call`` at most once for ``key``: the step generator behind :meth:`run_sync` and :meth:`run_async`.

        Yields the commands of :mod:`idempo._engine.commands`; ``call`` is
        carried out by the driver (``call()``, or ``await call()``).
        ``transactional``: ``call`` takes the execution's transaction
        (:mod:`idempo._engine.transaction`), opened before it runs; the record
        completes inside it and it commits before the result is returned.

        Raises:
            TransactionConflict, CommitFailed, CommitUnknown, TransactionError:
                (transactional) the transaction did not commit; nothing of the
                call remains and the record was released.
        """
        # The scope is the call's route label.
        observation = observe_request("decorator", "CALL", self.scope, self.scope)
        yield observation  # the driver times the store calls for it
        try:
            admission = yield from admit(
                store,
                self.policy,
                self.secret,
                observation,
                lambda digests: self.identify(digests, key, form),
                principal="",
                key=key,
                legacy=functools.partial(self.legacy, key, form),
            )
            if isinstance(admission, StoreFailed):
                if not admission.bypass:
                    observation.finish(Outcome.STORE_ERROR, error=admission.error)
                    raise admission.error
                observation.finish(Outcome.BYPASSED, error=admission.error)
                return (yield Call(call)), False
            decision = admission.decision
            if isinstance(decision, Replay):
                return self.decode(decision.response), True
            if not isinstance(decision, Proceed):
                raise self.refusal(decision)
            # The lease is renewed while the call runs, so a slow call is never run
            # twice; once this process dies the renewals stop and it lapses.
            execution = yield Lease(self.policy, admission.record_key, decision.token, observation)
            observation.handler_started()
            try:
                try:
                    if transactional:
                        tx = yield Call(execution.transaction)
                        call = functools.partial(call, tx)
                    result = yield Call(call)
                finally:
                    observation.handler_finished(None)
                response, verdict, error = self.settlement(result)
                reason = "unserialisable result" if error is not None else None
                yield Call(functools.partial(execution.settle, response, verdict, reason))
                if transactional and error is None:
                    error = execution.call_error()
                    if error is None:
                        # The result, committed, is about to reach the caller: a
                        # function's "before-send" (idempo._engine.faultpoints).
                        execution.before_send()
            except BaseException as exc:
                # The call's exception settles by its verdict; a crash (KeyboardInterrupt,
                # SystemExit, cancellation) settles nothing: the side effect may be half
                # done, so the lease is left to expire, but the renewals stop.
                if isinstance(exc, Exception):
                    observation.error = exc
                yield Call(functools.partial(execution.fail, exc))
                raise
            if error is not None:
                raise error
            return result, False
        finally:
            observation.finish()

    def run_sync(
        self, store: Store, key: str, form: bytes | None, call: Callable[..., T], transactional: bool = False
    ) -> tuple[T, bool]:
        """Run ``call`` at most once for ``key``; return (result, replayed).

        ``form`` is what the fingerprint is the keyed digest of (:func:`canonical_form`).

        Raises:
            KeyInProgress, KeyHeld, ResultNotReplayable, FingerprintMismatch: as the flow decided.
            StoreError: the store failed before the call (not raised with fail_open).
            ConfigurationError: the result cannot be serialised (the key is held).
            Whatever ``call`` raises, unchanged, after the record is released or held.
        """
        steps = self.steps(store, key, form, call, transactional)
        result: tuple[T, bool] = drive_sync(steps, store, decided=False)
        return result

    async def run_async(
        self,
        store: AsyncStore,
        key: str,
        form: bytes | None,
        call: Callable[..., Awaitable[T]],
        transactional: bool = False,
    ) -> tuple[T, bool]:
        """The async twin of :meth:`run_sync`: the same steps, driven against an async store."""
        steps = self.steps(store, key, form, call, transactional)
        result: tuple[T, bool] = await drive_async(steps, store, decided=False)
        return result


def scope_of(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', None) or repr(fn)}"


def sync_store(store: Store | AsyncStore | str, scope: str) -> Store:
    if isinstance(store, str):
        built = _config.sync_store(store)
    elif inspect.iscoroutinefunction(getattr(store, "begin", None)):
        raise ConfigurationError(f"{scope} is a sync function: it needs a Store, not {type(store).__name__}")
    else:
        built = cast(Store, store)
    open_at_startup(built)  # a misconfigured store fails at decoration; an unreachable one is a warning
    return built


def async_store(store: Store | AsyncStore | str, scope: str) -> AsyncStore:
    if isinstance(store, str):
        return _config.async_store(store)
    if not inspect.iscoroutinefunction(getattr(store, "begin", None)):
        raise ConfigurationError(
            f"{scope} is an async function: it needs an AsyncStore (e.g. AsyncSQLiteStore), not {type(store).__name__}"
        )
    return cast(AsyncStore, store)
