"""Idempotent consumers: process each message at most once per message id, for at-least-once brokers.

Brokers such as Redis Streams, RabbitMQ, SQS or Kafka deliver a message at
least once: a consumer that dies before acknowledging it, a lost ack, or a
producer that retries its publish all bring the message back. An
:class:`IdempotentConsumer` wraps the handler so that each message id is
handled once, with the protocol of ``@idempotent`` (the same engine, stores
and lease):

==============================  ====================================  =======
the message id is               :meth:`IdempotentConsumer.process`     ack?
==============================  ====================================  =======
new                             runs the handler: ``PROCESSED``        yes
already processed (a repeat)    skips the handler: ``DUPLICATE``       yes
being processed elsewhere       skips the handler: ``IN_PROGRESS``     no: leave it for redelivery
held by a crashed consumer      after its lease: runs the handler      yes
==============================  ====================================  =======

A handler that raises releases the id (or holds it, per
``exception_verdicts``) and the exception propagates: do not ack, so the
broker redelivers and the retry runs the handler again.

The guarantee is "at most once per id while the record lives" for the
handler's *completion*: a consumer killed in the middle of the handler did
not complete it, so after its lease expires the redelivered message runs the
handler again. Make the handler's own side effect atomic (one transaction)
for "exactly once" in effect.

:class:`RedisStreamConsumer` runs an :class:`IdempotentConsumer` over a Redis
Streams consumer group (``XREADGROUP``, ``XACK``, and ``XAUTOCLAIM`` to take
over the messages of consumers that died); it needs the ``redis`` extra, and
only a client handed in: this module imports no broker library.
"""

from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from uuid import UUID

from ._core.policy import Policy, Verdict
from ._engine.calls import Engine, async_store, canonical_form, key_text, scope_of, sync_store
from ._engine.transaction import require_transactor
from .exceptions import KeyHeld, KeyInProgress, MissingKey, ResultNotReplayable
from .observability._observation import logger
from .secrets import SecretSource
from .serializers import JSONSerializer, fingerprint_form
from .typing import AsyncStore, Store

if TYPE_CHECKING:
    import redis

__all__ = [
    "AsyncIdempotentConsumer",
    "IdempotentConsumer",
    "MessageId",
    "Outcome",
    "RedisStreamConsumer",
    "StreamMessage",
]

M = TypeVar("M")

#: Returns a message's id (a str, an int or a UUID); None is refused with MissingKey.
MessageId = Callable[[M], "str | int | UUID | None"]


class Outcome(enum.Enum):
    """What became of one delivery of a message.

    Attributes:
        ack: True when the broker may forget the message (PROCESSED, DUPLICATE).
    """

    #: The handler ran and completed now.
    PROCESSED = "processed"
    #: The message id was processed before: the handler was skipped.
    DUPLICATE = "duplicate"
    #: Another consumer is processing this message id now: leave it unacked.
    IN_PROGRESS = "in_progress"
    #: Reported by :class:`RedisStreamConsumer` when processing raised: left unacked.
    FAILED = "failed"
    #: The id is held: its first processing's outcome is unknown (a HOLD verdict, or a
    #: takeover under ``on_takeover="hold"``). Left unacked until the hold expires or an
    #: operator resolves it (``idempo resolve``).
    HELD = "held"

    @property
    def ack(self) -> bool:
        """True when the message should be acknowledged."""
        return self in (Outcome.PROCESSED, Outcome.DUPLICATE)


H = TypeVar("H", bound=Callable[..., Any])
S = TypeVar("S")

# What process() returns for a message it did not run: KeyInProgress, KeyHeld, ResultNotReplayable.
_NOT_RUN: dict[type[Exception], Outcome] = {
    KeyInProgress: Outcome.IN_PROGRESS,
    KeyHeld: Outcome.HELD,
    ResultNotReplayable: Outcome.DUPLICATE,  # it ran; its result was not kept
}


class _Consumer(Generic[M, H, S]):
    """What the sync and async consumers share: everything but the handler's call (see :class:`IdempotentConsumer`)."""

    def __init__(
        self,
        handler: H,
        *,
        store: S | str,
        message_id: MessageId[M],
        scope: str | None = None,
        fingerprint: Callable[[M], Any] | None = None,
        record_ttl: float | timedelta = 86400.0,
        lease_ttl: float | timedelta = 30.0,
        exception_verdicts: Mapping[type[BaseException], Verdict] | None = None,
        hold_ttl: float | timedelta | None = None,
        on_takeover: str = "execute",
        secret: str | bytes | None = None,
        transactional: bool = False,
    ) -> None:
        self.handler = handler
        self.transactional = transactional
        self.scope = scope if scope is not None else scope_of(handler)
        self._message_id = message_id
        self._fingerprint = fingerprint
        policy = Policy(
            record_ttl=record_ttl,
            lease_ttl=lease_ttl,
            exception_verdicts=exception_verdicts,
            hold_ttl=hold_ttl,
            require_key=True,
            on_takeover=on_takeover,
        )
        # The handler's return value is not kept: a duplicate is skipped, not answered.
        self._engine = Engine(self.scope, policy, JSONSerializer(), lambda: None, SecretSource(secret))
        self.store: S = self._open(store)
        if transactional:
            require_transactor(self.store, self.scope)

    def _open(self, store: S | str) -> S:
        raise NotImplementedError

    def _identify(self, message: M) -> tuple[str, bytes | None]:
        key = key_text(self._message_id(message), self.scope)
        if key is None:
            raise MissingKey(f"{self.scope}: the message has no id")
        if self._fingerprint is None:
            return key, None
        return key, canonical_form(fingerprint_form(self._fingerprint(message)))


def _not_run(exc: Exception) -> Outcome:
    return next(outcome for cls, outcome in _NOT_RUN.items() if isinstance(exc, cls))


def _outcome(replayed: bool) -> Outcome:
    return Outcome.DUPLICATE if replayed else Outcome.PROCESSED


class IdempotentConsumer(_Consumer[M, Callable[[M], Any], Store]):
    """Process each message at most once per message id (blocking handlers).

    Args:
        handler: called with the message; its return value is discarded.
        store: a :class:`~idempo.typing.Store` or a store URL; with several
            consumer processes, a store they share (SQLite file, PostgreSQL, Redis).
        message_id: returns the message's id. Prefer an id the producer
            chose (it survives a re-publish) over the broker's delivery id.
        scope: what ids are unique within; default the handler's
            ``module.qualname``. Use the queue or stream name to keep records
            across a rename of the handler.
        fingerprint: returns what the message asks for (a value with a canonical
            form, :func:`~idempo.serializers.fingerprint_form`);
            the same id with a different fingerprint raises
            :class:`~idempo.FingerprintMismatch`. Default: not checked.
        record_ttl: seconds (or a timedelta) a processed id is remembered;
            make it longer than the broker can take to redeliver (default 24 h).
        lease_ttl: seconds of the lease a consumer holds on an id while its
            handler runs, renewed every third of it: a consumer that dies
            delays the message by at most this long (default 30 s).
        exception_verdicts: per exception class, ``Verdict.RELEASE`` (default:
            redelivery runs the handler again) or ``Verdict.HOLD`` (the id
            is held, reported as HELD, for ``hold_ttl``).
        hold_ttl: seconds a HOLD keeps the id (default ``record_ttl``).
        on_takeover: ``"execute"`` (default) or ``"hold"``: what a delivery does
            when it finds the lease of a consumer that died mid-handler
            (:class:`~idempo.Policy` ``on_takeover``); a held id is reported
            as HELD.
        secret: the server secret record keys and fingerprints are keyed with
            (HMAC-SHA256); default ``$IDEMPO_SECRET``, else a random one kept
            in the store (see :mod:`idempo.secrets`).
        transactional: call ``handler(message, tx=...)`` inside a transaction
            on the store's own database (``PostgresStore.from_pool`` /
            ``from_engine``, an SQLite store on the app's file); the id's record
            completes as its last statement, so the handler's writes commit if
            and only if the message counts as processed (DESIGN guarantee 6). A
            transaction that did not commit raises (TransactionConflict,
            CommitFailed, CommitUnknown, TransactionError): do not ack, redeliver.

    Raises:
        ConfigurationError: a TTL is not positive, the store is async or its
            URL unknown, the secret is shorter than 16 bytes, or ``transactional``
            with a store that cannot open transactions.
    """

    def _open(self, store: Store | str) -> Store:
        return sync_store(store, self.scope)

    def process(self, message: M) -> Outcome:
        """Handle one delivery of a message; return whether to ack it.

        Returns:
            PROCESSED or DUPLICATE (ack it), or IN_PROGRESS or HELD (do not ack).

        Raises:
            MissingKey, InvalidKey: the message has no usable id.
            FingerprintMismatch: the id was processed for another message.
            StoreError: the store failed before the handler ran (do not ack).
            Whatever the handler raises, unchanged, once its id is released (do not ack).
        """
        key, fingerprint = self._identify(message)
        call = functools.partial(_discard, self.handler, message)
        try:
            _, replayed = self._engine.run_sync(self.store, key, fingerprint, call, self.transactional)
        except (KeyInProgress, KeyHeld, ResultNotReplayable) as exc:
            return _not_run(exc)
        return _outcome(replayed)


class AsyncIdempotentConsumer(_Consumer[M, Callable[[M], Awaitable[Any]], AsyncStore]):
    """Process each message at most once per message id (async handlers).

    Args: as :class:`IdempotentConsumer`, with an async ``handler`` and an
    :class:`~idempo.typing.AsyncStore` (or a store URL).
    """

    def _open(self, store: AsyncStore | str) -> AsyncStore:
        return async_store(store, self.scope)

    async def process(self, message: M) -> Outcome:
        """See :meth:`IdempotentConsumer.process`."""
        key, fingerprint = self._identify(message)
        call = functools.partial(_adiscard, self.handler, message)
        try:
            _, replayed = await self._engine.run_async(self.store, key, fingerprint, call, self.transactional)
        except (KeyInProgress, KeyHeld, ResultNotReplayable) as exc:
            return _not_run(exc)
        return _outcome(replayed)


def _discard(handler: Callable[..., Any], message: M, tx: Any = None) -> None:
    if tx is None:
        handler(message)
    else:
        handler(message, tx=tx)


async def _adiscard(handler: Callable[..., Awaitable[Any]], message: M, tx: Any = None) -> None:
    if tx is None:
        await handler(message)
    else:
        await handler(message, tx=tx)


# --- Redis Streams ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One entry of a Redis stream, as delivered to a consumer group.

    Attributes:
        stream: the stream's key.
        id: the entry id (``"<ms>-<seq>"``), the broker's delivery id.
        fields: the entry's field/value pairs, as the client returns them
            (str with ``decode_responses=True``, else bytes).
    """

    stream: str
    id: str
    fields: Mapping[Any, Any]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RedisStreamConsumer:
    """Feed a Redis Streams consumer group to an :class:`IdempotentConsumer`, and ack what it settled.

    Each :meth:`poll` first takes over, with ``XAUTOCLAIM``, the entries other
    consumers (or this one) left pending for ``claim_idle`` seconds (their
    consumer died, or their handler failed), then reads new entries with
    ``XREADGROUP``. Every entry goes through ``consumer.process``:
    PROCESSED and DUPLICATE are acked (``XACK``) at once; IN_PROGRESS and
    failures stay pending, to be claimed again after ``claim_idle``.

    Args:
        client: a ``redis.Redis`` client (this class does not close it).
        stream: the stream's key.
        group: the consumer group; created at the stream's start (``0``),
            with the stream, when missing and ``create_group``.
        name: this consumer's name in the group (unique per process).
        consumer: the idempotent consumer of :class:`StreamMessage`.
        claim_idle: seconds (or a timedelta) an entry stays pending before
            another consumer takes it over; about the consumer's lease TTL
            (a shorter one only claims entries still in progress, which stay
            pending). None disables claiming.
        block: seconds ``XREADGROUP`` waits for new entries (0: no wait).
        count: entries read per call.
        create_group: create the group when missing.
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        name: str,
        consumer: IdempotentConsumer[StreamMessage],
        *,
        claim_idle: float | timedelta | None = 60.0,
        block: float = 1.0,
        count: int = 10,
        create_group: bool = True,
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.name = name
        self.consumer = consumer
        if isinstance(claim_idle, timedelta):
            claim_idle = claim_idle.total_seconds()
        self._claim_idle_ms = None if claim_idle is None else max(0, int(claim_idle * 1000))
        self._block_ms = int(block * 1000) or None
        self._count = count
        self._cursor = "0-0"
        if create_group:
            self._create_group()

    def _create_group(self) -> None:
        import redis as redis_module

        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis_module.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _claim(self) -> list[StreamMessage]:
        if self._claim_idle_ms is None:
            return []
        reply = self.client.xautoclaim(
            self.stream, self.group, self.name, self._claim_idle_ms, start_id=self._cursor, count=self._count
        )
        self._cursor = _text(reply[0])
        messages = []
        for entry_id, fields in reply[1]:
            if fields is None:  # deleted from the stream while pending (Redis 6.2)
                self.client.xack(self.stream, self.group, entry_id)
                continue
            messages.append(StreamMessage(self.stream, _text(entry_id), fields))
        return messages

    def _read(self, block: bool) -> list[StreamMessage]:
        reply: Any = self.client.xreadgroup(
            self.group, self.name, {self.stream: ">"}, count=self._count, block=self._block_ms if block else None
        )
        if not reply:
            return []
        # RESP2 answers [[stream, entries]], RESP3 {stream: [entries]}.
        streams: Sequence[Any] = list(reply.items()) if isinstance(reply, dict) else reply
        messages = []
        for _stream, entries in streams:
            if entries and isinstance(entries[0], list) and len(entries) == 1 and isinstance(entries[0][0], list):
                entries = entries[0]
            for entry_id, fields in entries:
                messages.append(StreamMessage(self.stream, _text(entry_id), fields or {}))
        return messages

    def poll(self) -> list[tuple[StreamMessage, Outcome]]:
        """Claim idle pending entries, read new ones, process and ack them; return what happened.

        A failing handler, a fingerprint mismatch or a store failure is logged
        (logger ``idempo``) and reported as FAILED; the entry stays pending.

        Raises:
            redis.RedisError: the broker failed.
        """
        messages = self._claim()
        messages += self._read(block=not messages)
        results = []
        for message in messages:
            try:
                outcome = self.consumer.process(message)
            except Exception:
                logger.exception(
                    "idempo: entry %s of stream %s failed; left pending for redelivery", message.id, message.stream
                )
                outcome = Outcome.FAILED
            if outcome.ack:
                self.client.xack(self.stream, self.group, message.id)
            results.append((message, outcome))
        return results

    def run(self, stop: threading.Event | None = None) -> None:
        """Poll until ``stop`` is set (forever without one)."""
        while stop is None or not stop.is_set():
            self.poll()
