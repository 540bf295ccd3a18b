"""Idempotent Celery tasks: a task runs at most once per idempotency key, however often it is delivered.

::

    from celery import Celery
    from idempo.celery import IdempotentTask

    app = Celery("shop", broker="redis://127.0.0.1:6379/0", backend="redis://127.0.0.1:6379/0")
    app.conf.idempo_store = "redis://127.0.0.1:6379/0"

    @app.task(base=IdempotentTask, idempotency_key="order_id")
    def charge(order_id: str, cents: int) -> dict:
        ...                                     # runs once per order_id

    charge.delay("ord_1", 1999)                 # runs
    charge.delay("ord_1", 1999).get()           # the first run's result, the task not run again

Celery delivers a task more than once: with ``acks_late`` a worker killed
mid-task leaves its message to be redelivered, a Redis or SQS broker
redelivers a message not acknowledged within its visibility timeout (also
while the first worker still runs it), and a client retries ``apply_async``
after a timeout. An :class:`IdempotentTask` runs through
:func:`idempo.idempotent`: the key comes from the task's arguments (an
argument's name, or a callable of the bound arguments), the scope is the
task's name, the other arguments are the fingerprint, and the result is kept
in the idempo store, so a duplicate returns it without running, and Celery
stores it in the result backend under the duplicate's own task id
(``AsyncResult.get()`` of the duplicate gets the first run's result).

A duplicate that arrives while the first run still holds the key is retried
with Celery's own :meth:`celery.app.task.Task.retry` (``on_duplicate="retry"``,
the default), or dropped with a log line (``on_duplicate="drop"``): see
:class:`IdempotentTask`. Either is counted as a ``conflict`` in
``idempo_requests_total`` (labels ``method="CALL"``, ``route`` = the task's name).

While a task runs its lease is renewed (every third of ``lease_ttl``), so a
long task is never run twice while its worker lives; a worker that dies
(SIGKILL, OOM, power loss) stops renewing, and its redelivered task runs once
the lease has lapsed, or is held when ``on_takeover="hold"`` (the first run's
outcome is unknown).

A run the worker kills itself (a hard time limit, ``revoke(terminate=True)``;
prefork pool) has its key settled by the worker's main process once the child
is gone: released by default, held by a HOLD verdict for
``TimeLimitExceeded`` or ``TaskRevokedError`` (see :class:`IdempotentTask`).

With ``transactional=True`` (``idempotency_transactional``) a task whose
effect is rows in the app's own PostgreSQL or SQLite database writes them
through ``tx``, the transaction idempo opened there; the record's completion
is that transaction's last statement, so a worker killed before COMMIT leaves
none of the writes and the redelivered task writes them once (see
:class:`IdempotentTask`).

At worker start, :func:`check_broker` warns (logger ``idempo``) when the
broker's visibility timeout is shorter than a task's lease or its time limit.
The module needs the ``celery`` extra (``pip install 'idempo[celery]'``).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal, cast
from urllib.parse import urlsplit

import celery
from celery import signals
from celery.exceptions import Ignore, TaskRevokedError, TimeLimitExceeded

from ._core.flow import failure_verdict, finish
from ._core.policy import Policy, Verdict
from ._core.records import RecordState
from ._engine._sync.store import settle_once_sync
from ._engine.calls import key_text, sync_store
from ._engine.transaction import Transaction, require_transactor
from .decorator import Arguments, KeyFunction, idempotent, record_key
from .exceptions import ConfigurationError, KeyInProgress
from .observability._observation import logger
from .secrets import SecretSource
from .serializers import Serializer
from .typing import AsyncStore, Store

__all__ = ["IdempotentTask", "OnDuplicate", "check_broker", "idempotent_task"]

#: What a task does with a duplicate that arrives while the first run holds the key.
OnDuplicate = Literal["retry", "drop"]

# Brokers that redeliver an unacknowledged message after a visibility timeout, by URL scheme,
# and the timeout when broker_transport_options sets none (kombu's defaults: Redis 1 h, SQS 30 min).
_DEFAULT_VISIBILITY = {
    "redis": 3600.0,
    "rediss": 3600.0,
    "redis+socket": 3600.0,
    "socket": 3600.0,
    "sentinel": 3600.0,
    "sqs": 1800.0,
}


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class _Local:
    """What one process keeps for one task: its store, the secret source, the signature, the idempotent call."""

    __slots__ = ("call", "pid", "secrets", "signature", "store")

    def __init__(self, pid: int, store: Store, secrets: SecretSource, signature: inspect.Signature) -> None:
        self.pid = pid
        self.store = store
        self.secrets = secrets
        self.signature = signature
        self.call: Callable[..., Any] = _unset


def _unset(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("idempo.celery: the task's call is not made yet")


# The worker's main process and its hand-off directory (set at worker_init, before the pool
# forks, so prefork children inherit them): a child writes there which lease its run holds.
_MAIN_PID: int | None = None
_HANDOFF_DIR: Path | None = None

# Held while this process builds a task's store and call, and while the worker's main process
# settles a killed run's key (on a thread of its own, see _ended_from_outside). The prefork pool
# forks a replacement child right then: a fork taken while another thread holds a lock (this one,
# the store's connection pool, a metric's) leaves that lock held forever in the child, whose first
# task then hangs until its hard time limit kills it, or for good without one. So a fork waits
# for the holder to finish (at most one store call, bounded by the store's deadline), and the child
# starts with a fresh lock.
_GUARD = threading.RLock()


def _before_fork() -> None:
    _GUARD.acquire()


def _after_fork_in_parent() -> None:
    _GUARD.release()


def _after_fork_in_child() -> None:
    global _GUARD
    _GUARD = threading.RLock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class IdempotentTask(celery.Task):  # type: ignore[misc]
    """A Celery task that runs at most once per idempotency key (``@app.task(base=IdempotentTask, ...)``).

    The options are task options (``@app.task(..., idempotency_lease_ttl=60)``,
    or class attributes of a subclass); each has the meaning of the
    :func:`idempo.idempotent` argument of the same name without the prefix:

    Attributes:
        idempotency_key: the name of the argument holding the idempotency key,
            or a callable receiving the call's :data:`~idempo.decorator.Arguments`
            and returning it (a str, an int or a UUID). Required.
        idempotency_store: a :class:`~idempo.typing.Store`, a store URL, or a
            callable with no arguments returning a Store, called once in each
            worker process on its first task (after the prefork pool's fork: a
            ``psycopg_pool`` pool must not cross a fork, so build it there);
            default the app's ``idempo_store`` setting (``app.conf.idempo_store``,
            the same three forms). Every worker must share the records
            (PostgreSQL, Redis, an SQLite file on one host).
        idempotency_scope: what keys are unique within; default the task's name.
        idempotency_record_ttl: seconds a result is kept and replayed (default 24 h).
        idempotency_lease_ttl: seconds of the lease a running task holds,
            renewed every third of it while it runs: a worker that dies delays the
            redelivered task by at most this long (default 30 s). Keep it shorter
            than the broker's visibility timeout (:func:`check_broker` warns).
        idempotency_fingerprint: the argument names (or a callable of the
            arguments) that make up the fingerprint; default every argument but
            the key and ``idempotency_exclude``.
        idempotency_exclude: arguments left out of the default fingerprint.
        idempotency_serializer: ``"json"`` (default, typed), ``"pickle"`` or a
            :class:`~idempo.serializers.Serializer`: how idempo keeps the result
            (Celery's own result serializer then sends it to the result backend).
        idempotency_require_key: fail a task whose key is None with
            :class:`~idempo.MissingKey`; by default it runs without idempotency.
        idempotency_exception_verdicts: per exception class, ``Verdict.RELEASE``
            (default: a retry of the task runs again) or ``Verdict.HOLD``.
        idempotency_hold_ttl: seconds a HOLD keeps the key (default the record TTL).
        idempotency_on_takeover: ``"execute"`` (default: the redelivered task of a
            worker that died runs again once its lease lapsed) or ``"hold"``
            (it fails with :class:`~idempo.KeyHeld` until the hold expires or
            an operator resolves the key: the first run's outcome is unknown).
        idempotency_on_duplicate: ``"retry"`` (default) or ``"drop"``: what a
            duplicate does when the first run still holds the key. ``"retry"``
            calls Celery's :meth:`~celery.app.task.Task.retry`, so the duplicate
            comes back after ``idempotency_duplicate_countdown`` and then returns
            the first run's result (its ``AsyncResult.get()`` gets it), or runs
            the task if the first run's worker died; it is the default because
            nothing is lost either way. ``"drop"`` acknowledges the duplicate
            without a result (Celery's :class:`~celery.exceptions.Ignore`),
            logged at WARNING: for redeliveries of one message (the same task id,
            whose first run stores the result) when no one waits on a
            duplicate's own task id; a duplicate with a task id of its own then
            stays PENDING in the result backend.
        idempotency_duplicate_countdown: seconds before a retried duplicate comes
            back; default the lease TTL (when a dead worker's lease has lapsed).
        idempotency_duplicate_retries: how many times a duplicate is retried
            before it fails with :class:`~idempo.KeyInProgress`; default None:
            until the first run settles its key. These retries count in
            ``task.request.retries`` like the task's own.
        idempotency_fail_open: run the task without idempotency when the store
            fails before it (default: fail the task; with ``acks_late`` and
            ``autoretry_for=(StoreError,)`` it is retried).
        idempotency_secret: the server secret (see :mod:`idempo.secrets`).
        idempotency_transactional: run the task inside a transaction on the
            store's own database, as ``@idempotent(transactional=True)``: the
            store is ``PostgresStore.from_pool(pool)`` (or ``from_engine``) or an
            :class:`~idempo.stores.sqlite.SQLiteStore` on the app's file; the
            task takes the transaction as the keyword argument ``tx``
            (:class:`~idempo.transactional.Transaction`, given by idempo, never
            by the caller: ``charge.delay(order_id, cents)``), and its record
            completes as that transaction's last statement, so its writes
            commit if and only if its result is stored: a worker killed before
            COMMIT leaves none of them, and the redelivered task runs again on a
            clean database (DESIGN guarantee 6). A conflict the database
            resolves by aborting the transaction is run again in process up to 3
            more times, then fails the task with
            :class:`~idempo.exceptions.TransactionConflict` (retry it with
            ``autoretry_for``). Default False.

    A run killed by its hard time limit or by ``revoke(terminate=True)``
    (prefork pool) has its key settled by the worker's main process, once the
    child is gone, by the verdict of ``TimeLimitExceeded`` or
    ``TaskRevokedError`` in ``idempotency_exception_verdicts`` (default
    RELEASE: the next delivery runs at once); the child hands its lease
    (record key and fencing token) to the main process in a file of the
    worker's own when the task starts, so the settle is fenced.

    The class also sets ``acks_late = True`` and ``reject_on_worker_lost = True``
    (override them per task): a task's message is acknowledged after it ran,
    so a worker that dies mid-task leaves it to be redelivered, and the
    redelivery is deduplicated here.

    A replay is the task's return value, so Celery stores it as the
    duplicate's result. A duplicate fails (its exception in the result
    backend) with :class:`~idempo.FingerprintMismatch` (the key was used
    with other arguments), :class:`~idempo.KeyHeld`,
    :class:`~idempo.ResultNotReplayable`, or :class:`~idempo.StoreError`.

    Raises:
        ConfigurationError: when Celery makes the task (on its first use,
            or the app's finalisation: a worker's start): no
            ``idempotency_key``, an unknown ``idempotency_on_duplicate``, a
            negative countdown or retry count, ``idempotency_transactional``
            without a ``tx`` parameter or with a store URL or a store object
            that cannot join the task's writes; on its first run: no store,
            or what :func:`idempo.idempotent` refuses (a transactional task
            whose callable builds a store that cannot join: Redis, memory).
    """

    idempotency_key: ClassVar[str | KeyFunction | None] = None
    idempotency_store: ClassVar[Store | str | Callable[[], Store] | None] = None
    idempotency_scope: ClassVar[str | None] = None
    idempotency_record_ttl: ClassVar[float | timedelta] = 86400.0
    idempotency_lease_ttl: ClassVar[float | timedelta] = 30.0
    idempotency_fingerprint: ClassVar[Collection[str] | Callable[[Arguments], Any] | None] = None
    idempotency_exclude: ClassVar[Collection[str]] = ()
    idempotency_serializer: ClassVar[Serializer | Literal["json", "pickle"]] = "json"
    idempotency_require_key: ClassVar[bool] = False
    idempotency_exception_verdicts: ClassVar[Mapping[type[BaseException], Verdict] | None] = None
    idempotency_hold_ttl: ClassVar[float | timedelta | None] = None
    idempotency_on_takeover: ClassVar[Literal["execute", "hold"]] = "execute"
    idempotency_on_duplicate: ClassVar[OnDuplicate] = "retry"
    idempotency_duplicate_countdown: ClassVar[float | timedelta | None] = None
    idempotency_duplicate_retries: ClassVar[int | None] = None
    idempotency_fail_open: ClassVar[bool] = False
    idempotency_secret: ClassVar[str | bytes | None] = None
    idempotency_transactional: ClassVar[bool] = False

    acks_late = True
    reject_on_worker_lost = True

    # What each process keeps (a prefork child opens its own store connections after the fork).
    _local: _Local | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run" not in cls.__dict__:
            return  # a base of the user's own, with defaults: checked in its tasks
        name = cls.__dict__.get("name") or cls.__name__
        if cls.idempotency_key is None:
            raise ConfigurationError(
                f"{name}: an IdempotentTask needs idempotency_key= (an argument name or a callable)"
            )
        if cls.idempotency_on_duplicate not in ("retry", "drop"):
            raise ConfigurationError(
                f"{name}: idempotency_on_duplicate must be 'retry' or 'drop', got {cls.idempotency_on_duplicate!r}"
            )
        countdown = cls.idempotency_duplicate_countdown
        if countdown is not None and _seconds(countdown) < 0:
            raise ConfigurationError(f"{name}: idempotency_duplicate_countdown cannot be negative")
        retries = cls.idempotency_duplicate_retries
        if retries is not None and retries < 0:
            raise ConfigurationError(f"{name}: idempotency_duplicate_retries cannot be negative")
        if cls.idempotency_transactional:
            cls._check_transactional(name)
        cls._policy()  # the TTLs, on_takeover and the verdicts, as @idempotent checks them

    @classmethod
    def _check_transactional(cls, name: str) -> None:
        """A transactional task takes ``tx`` (its callers do not: Celery's argument check leaves it out) and
        a store that can join its writes (a store object is checked here; a callable's, on the first run)."""
        store = cls.idempotency_store
        if isinstance(store, str):
            raise ConfigurationError(
                f"{name}: a transactional task needs a store on the application's own database "
                "(PostgresStore.from_pool(pool), an SQLiteStore on the app's file, or a callable returning one), "
                "not a store URL: a store built from a URL cannot commit with the handler's writes"
            )
        if store is not None and hasattr(store, "begin"):
            require_transactor(store, name)
        run = cls.__dict__["run"]
        bound = not isinstance(run, staticmethod)
        function = run if bound else run.__func__
        signature = inspect.signature(function)
        if "tx" not in signature.parameters:
            raise ConfigurationError(f"{name}: a transactional task takes the transaction as a parameter named tx")
        parameters = [parameter for parameter in signature.parameters.values() if parameter.name != "tx"]
        if bound:
            parameters = parameters[1:]  # the task itself (bind=True)
        callers = signature.replace(parameters=parameters)

        def check_arguments(*args: Any, **kwargs: Any) -> None:
            callers.bind(*args, **kwargs)  # TypeError, as Celery's own check raises

        cls.__header__ = staticmethod(check_arguments)

    @property
    def lease_ttl(self) -> float:
        """Seconds of this task's lease (``idempotency_lease_ttl``)."""
        return _seconds(self.idempotency_lease_ttl)

    def _store(self) -> Store | AsyncStore | str:
        """The task's store: built here by its factory, if it names one (called once per process)."""
        store = type(self).idempotency_store  # from the class: a function there would bind to the task
        if store is None:
            store = self.app.conf.get("idempo_store")
        if store is None:
            raise ConfigurationError(
                f"{self.name}: no idempo store: set idempotency_store= on the task or app.conf.idempo_store"
            )
        if callable(store) and not hasattr(store, "begin"):
            factory = cast("Callable[[], Store]", store)
            return factory()
        return cast("Store | AsyncStore | str", store)

    def _scope(self) -> str:
        return self.idempotency_scope if self.idempotency_scope is not None else str(self.name)

    def _process(self) -> _Local:
        """This process's store, secret source and idempotent call, made on first use in each process."""
        local = self._local
        pid = os.getpid()
        if local is not None and local.pid == pid:
            return local
        with _GUARD:
            local = self._local
            if local is not None and local.pid == pid:
                return local
            local = self._local = self._make_local(pid)
            return local

    def _make_local(self, pid: int) -> _Local:
        task = self
        run = self.run
        scope = self._scope()
        store = sync_store(self._store(), scope)
        # Read from the class: a function stored as a class attribute would bind to the task.
        cls = type(self)
        local = _Local(pid, store, SecretSource(self.idempotency_secret), inspect.signature(run))

        # Celery's own __call__ (the request stack when called directly), with the task's signature.
        @functools.wraps(run)
        def body(*args: Any, **kwargs: Any) -> Any:
            handoff = task._hand_off(local, args, kwargs, kwargs.get("tx"))
            try:
                result = celery.Task.__call__(task, *args, **kwargs)
            except Exception:
                if handoff is not None:  # the run settles its own key
                    handoff.unlink(missing_ok=True)
                raise
            # Not on SystemExit (the pool's SIGTERM): the run settles nothing, the main process does.
            if handoff is not None:
                handoff.unlink(missing_ok=True)
            return result

        local.call = idempotent(
            store=store,
            key=cls.idempotency_key,  # type: ignore[arg-type]
            scope=scope,
            record_ttl=self.idempotency_record_ttl,
            lease_ttl=self.idempotency_lease_ttl,
            fingerprint=cls.idempotency_fingerprint,
            exclude=self.idempotency_exclude,
            serializer=self.idempotency_serializer,
            require_key=self.idempotency_require_key,
            exception_verdicts=self.idempotency_exception_verdicts,
            hold_ttl=self.idempotency_hold_ttl,
            fail_open=self.idempotency_fail_open,
            on_takeover=self.idempotency_on_takeover,
            secret=self.idempotency_secret,
            transactional=self.idempotency_transactional,
        )(body)
        return local

    @classmethod
    def _policy(cls) -> Policy:
        """The task's policy: built when Celery makes the task (its check), and to settle a killed run's key."""
        return Policy(
            record_ttl=cls.idempotency_record_ttl,
            lease_ttl=cls.idempotency_lease_ttl,
            exception_verdicts=cls.idempotency_exception_verdicts,
            hold_ttl=cls.idempotency_hold_ttl,
            on_takeover=cls.idempotency_on_takeover,
        )

    def _hand_off(
        self, local: _Local, args: tuple[Any, ...], kwargs: dict[str, Any], tx: Transaction | None
    ) -> Path | None:
        """In a prefork child, under the lease: tell the worker's main process which lease this run holds.

        Writes ``[record key, fencing token, pid]`` to a file named by the
        task id in the worker's hand-off directory, so the main process can
        settle the lease itself when the pool kills this child (hard time
        limit, ``revoke(terminate=True)``); removed when the body returns.
        A transactional run names its lease from ``tx``, so it takes no
        second connection from the app's pool. Returns the file, or None (not
        a prefork child, no key, or any failure: logged, the task runs on, and
        a killed run's lease lapses).
        """
        directory = _HANDOFF_DIR
        task_id = self.request.id
        if directory is None or os.getpid() == _MAIN_PID or not task_id:
            return None
        try:
            if tx is not None:
                return self._write_handoff(directory, str(task_id), tx.record_key, tx.token)
            bound = local.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            for name, parameter in local.signature.parameters.items():
                if parameter.kind is parameter.VAR_KEYWORD:
                    arguments.update(arguments.pop(name, {}))
            key = type(self).idempotency_key
            raw = arguments.get(key) if isinstance(key, str) else key(MappingProxyType(arguments))  # type: ignore[misc]
            text = key_text(raw, self._scope())
            if text is None:
                return None
            key_of_record = record_key(self._scope(), text, secret=local.secrets.load(local.store))
            record = local.store.get(key_of_record)
            if record is None or record.state is not RecordState.IN_PROGRESS:
                return None
            return self._write_handoff(directory, str(task_id), key_of_record, record.token)
        except Exception:
            logger.exception("idempo: task %s[%s] cannot hand its lease to the worker", self.name, task_id)
            return None

    @staticmethod
    def _write_handoff(directory: Path, task_id: str, key_of_record: str, token: int) -> Path:
        path = directory / task_id
        path.write_text(json.dumps([key_of_record, token, os.getpid()]), "utf-8")
        return path

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Celery's failure handler; a hard time limit settles the killed run's lease (in the worker's main process)."""
        if isinstance(exc, TimeLimitExceeded):
            _ended_from_outside(self, task_id, exc, "exceeded its hard time limit")
        super().on_failure(exc, task_id, args, kwargs, einfo)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task at most once for its idempotency key; a duplicate returns the first run's result."""
        call = self._process().call
        try:
            return call(*args, **kwargs)
        except KeyInProgress as exc:
            return self._duplicate(exc)

    def _duplicate(self, exc: KeyInProgress) -> Any:
        """A duplicate of a running task: retry it later, or drop it (``idempotency_on_duplicate``).

        Raises:
            celery.exceptions.Retry: retried (Celery re-sends the task).
            celery.exceptions.Ignore: dropped (acknowledged, no result stored).
            KeyInProgress: called outside a worker, or out of retries.
        """
        request = self.request
        if request.called_directly or request.is_eager:
            raise exc
        if self.idempotency_on_duplicate == "drop":
            logger.warning(
                "idempo: task %s[%s] is a duplicate of a run still holding its idempotency key; "
                "dropped (on_duplicate='drop')",
                self.name,
                request.id,
            )
            raise Ignore() from exc
        countdown = self.idempotency_duplicate_countdown
        seconds = self.lease_ttl if countdown is None else _seconds(countdown)
        limit = self.idempotency_duplicate_retries
        logger.info(
            "idempo: task %s[%s] is a duplicate of a run still holding its idempotency key; retried in %.3g s",
            self.name,
            request.id,
            seconds,
        )
        try:
            # max_retries=None would mean the task's own limit: "until settled" is one more than done so far.
            raise self.retry(
                exc=exc, countdown=seconds, max_retries=request.retries + 1 if limit is None else limit, throw=True
            )
        finally:
            # retry() keeps the limit on the task object, where autoretry_for would read it later.
            self.__dict__.pop("override_max_retries", None)


def idempotent_task(
    app: celery.Celery,
    *,
    key: str | KeyFunction,
    store: Store | str | Callable[[], Store] | None = None,
    scope: str | None = None,
    record_ttl: float | timedelta = 86400.0,
    lease_ttl: float | timedelta = 30.0,
    fingerprint: Collection[str] | Callable[[Arguments], Any] | None = None,
    exclude: Collection[str] = (),
    serializer: Serializer | Literal["json", "pickle"] = "json",
    require_key: bool = False,
    exception_verdicts: Mapping[type[BaseException], Verdict] | None = None,
    hold_ttl: float | timedelta | None = None,
    on_takeover: Literal["execute", "hold"] = "execute",
    on_duplicate: OnDuplicate = "retry",
    duplicate_countdown: float | timedelta | None = None,
    duplicate_retries: int | None = None,
    fail_open: bool = False,
    secret: str | bytes | None = None,
    transactional: bool = False,
    base: type[IdempotentTask] = IdempotentTask,
    **options: Any,
) -> Callable[[Callable[..., Any]], Any]:
    """Make a function an idempotent Celery task of ``app``: ``@app.task(base=IdempotentTask, ...)`` with plain names.

    ::

        @idempotent_task(app, key="order_id", lease_ttl=60)
        def charge(order_id: str, cents: int) -> dict: ...

    Args:
        app: the Celery app the task is registered with.
        key, store, scope, record_ttl, lease_ttl, fingerprint, exclude,
            serializer, require_key, exception_verdicts, hold_ttl,
            on_takeover, on_duplicate, duplicate_countdown, duplicate_retries,
            fail_open, secret, transactional: the :class:`IdempotentTask`
            options of the same name, prefixed ``idempotency_``.
        base: the task class, :class:`IdempotentTask` or a subclass.
        **options: Celery's own task options (``name``, ``bind``,
            ``time_limit``, ``autoretry_for``, ...), passed to ``app.task``.

    Returns:
        A decorator returning the registered task.

    Raises:
        ConfigurationError: as :class:`IdempotentTask`.
    """
    settings = {
        "idempotency_key": key,
        "idempotency_store": store,
        "idempotency_scope": scope,
        "idempotency_record_ttl": record_ttl,
        "idempotency_lease_ttl": lease_ttl,
        "idempotency_fingerprint": fingerprint,
        "idempotency_exclude": exclude,
        "idempotency_serializer": serializer,
        "idempotency_require_key": require_key,
        "idempotency_exception_verdicts": exception_verdicts,
        "idempotency_hold_ttl": hold_ttl,
        "idempotency_on_takeover": on_takeover,
        "idempotency_on_duplicate": on_duplicate,
        "idempotency_duplicate_countdown": duplicate_countdown,
        "idempotency_duplicate_retries": duplicate_retries,
        "idempotency_fail_open": fail_open,
        "idempotency_secret": secret,
        "idempotency_transactional": transactional,
    }
    # The decorated function is wrapped by staticmethod (or bound with bind=True) by app.task.
    decorator: Callable[[Callable[..., Any]], Any] = app.task(base=base, **settings, **options)
    return decorator


# --- the broker's visibility timeout ----------------------------------------------------------


def check_broker(app: celery.Celery) -> list[str]:
    """Warn (logger ``idempo``) about idempotent tasks the broker will redeliver too early; return the warnings.

    A Redis or SQS broker redelivers a message that a worker has not
    acknowledged within its visibility timeout (``broker_transport_options
    = {"visibility_timeout": seconds}``, default 1 h on Redis, 30 min on SQS), to any worker, while
    the first may still run it. Shorter than a task's lease, a dead worker's
    task comes back while its lease still blocks it (it is then retried or
    dropped, see :class:`IdempotentTask`); shorter than a task's time limit,
    a running task is redelivered every visibility timeout until it ends
    (each redelivery a duplicate). Called at every worker's start
    (Celery's ``worker_ready`` signal).

    Args:
        app: the Celery app.

    Returns:
        One line per warning (empty when the broker has no visibility
        timeout, as AMQP brokers, or it is long enough).
    """
    scheme = urlsplit(str(app.conf.broker_url or "")).scheme.lower()
    if scheme not in _DEFAULT_VISIBILITY:
        return []
    options = app.conf.broker_transport_options or {}
    visibility = float(options.get("visibility_timeout", _DEFAULT_VISIBILITY[scheme]))
    warnings = []
    for name, task in sorted(app.tasks.items()):
        if not isinstance(task, IdempotentTask):
            continue
        if visibility < task.lease_ttl:
            warnings.append(
                f"idempo: the broker's visibility timeout ({visibility:g} s) is shorter than the lease of task "
                f"{name} ({task.lease_ttl:g} s): a dead worker's task is redelivered while its lease still blocks "
                "it; raise broker_transport_options['visibility_timeout'] or lower idempotency_lease_ttl"
            )
        limit = task.time_limit if task.time_limit is not None else app.conf.task_time_limit
        if limit is not None and visibility < float(limit):
            warnings.append(
                f"idempo: the broker's visibility timeout ({visibility:g} s) is shorter than the time limit of task "
                f"{name} ({float(limit):g} s): a running task is redelivered every {visibility:g} s "
                "(each a duplicate); raise broker_transport_options['visibility_timeout']"
            )
    for line in warnings:
        logger.warning("%s", line)
    return warnings


def _worker_ready(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        try:
            check_broker(app)
        except Exception:  # a warning must never stop a worker
            logger.exception("idempo: cannot check the broker's visibility timeout")


signals.worker_ready.connect(_worker_ready, weak=False)


# --- a run the worker ended from outside: a hard time limit, revoke(terminate=True) -------------


def _worker_init(sender: Any = None, **_: Any) -> None:
    global _MAIN_PID, _HANDOFF_DIR
    _MAIN_PID = os.getpid()
    _HANDOFF_DIR = Path(tempfile.mkdtemp(prefix="idempo-celery-"))


def _worker_shutdown(sender: Any = None, **_: Any) -> None:
    if _HANDOFF_DIR is not None and os.getpid() == _MAIN_PID:
        shutil.rmtree(_HANDOFF_DIR, ignore_errors=True)


def _task_revoked(sender: Any = None, request: Any = None, terminated: bool = False, **_: Any) -> None:
    if terminated and isinstance(sender, IdempotentTask) and request is not None and request.id:
        _ended_from_outside(sender, request.id, TaskRevokedError("revoked"), "was revoked and terminated")


signals.worker_init.connect(_worker_init, weak=False)
signals.worker_shutdown.connect(_worker_shutdown, weak=False)
signals.task_revoked.connect(_task_revoked, weak=False)


def _ended_from_outside(task: IdempotentTask, task_id: str, exc: Exception, why: str) -> None:
    """In the worker's main process: settle the lease of a run its pool killed, once the child is gone.

    The pool calls the failure handler before it kills the child (billiard's
    hard timeout), so a thread waits for the child's death (at most the
    lease TTL: a child that outlives it, say one that ignores the revoke's
    signal, settles its own key), then settles the lease the child handed
    off by the verdict of ``exc`` in ``idempotency_exception_verdicts``
    (default RELEASE: the next delivery runs at once; HOLD: it fails with
    KeyHeld). The settle is fenced by the token, so it never touches a lease
    taken since. Without a hand-off (solo pool, the run held no lease, or it
    settled first) nothing is done.
    """
    directory = _HANDOFF_DIR
    if directory is None or os.getpid() != _MAIN_PID:
        return
    path = directory / task_id
    thread = threading.Thread(
        target=_settle_killed_run, args=(task, task_id, path, exc, why), name="idempo-celery-settle", daemon=True
    )
    thread.start()


def _settle_killed_run(task: IdempotentTask, task_id: str, path: Path, exc: Exception, why: str) -> None:
    try:
        deadline = time.monotonic() + task.lease_ttl
        while True:
            try:
                record_key_text, token, pid = json.loads(path.read_text("utf-8"))
            except FileNotFoundError:
                return  # no lease held, or the run settled it
            if not _alive(int(pid)):
                break
            if time.monotonic() > deadline:
                logger.warning(
                    "idempo: task %s[%s] %s but its process lives on; it settles its key", task.name, task_id, why
                )
                return
            time.sleep(0.02)
        path.unlink(missing_ok=True)
        policy = task._policy()
        verdict = failure_verdict(policy, exc)
        command = finish(policy, str(record_key_text), int(token), None, verdict=verdict, reason=f"task {why}")
        # The pool forks the dead child's replacement about now: the fork waits for the guard.
        with _GUARD:
            if settle_once_sync(task._process().store, command) is None:
                done = "held" if verdict is Verdict.HOLD else "released"
                logger.warning("idempo: task %s[%s] %s; its idempotency key was %s", task.name, task_id, why, done)
    except Exception:
        logger.exception("idempo: cannot settle the key of task %s[%s]; its lease will lapse", task.name, task_id)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped by the pool, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: signal 0 (a zombie still counts until reaped)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
