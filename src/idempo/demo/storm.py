"""The retry storm: many payments sent over real HTTP the way real clients send them.

Each logical payment gets a fresh ``Idempotency-Key`` (UUIDv4) and is sent
until it gets a final answer, every retry reusing the key. A seeded share of
the payments is sent in harder ways (:class:`Share`):

- double click: the same request 2-3 times at the same instant;
- client timeout: the provider is slow for this order (the
  ``X-Demo-Provider-Delay`` header), the client's timeout is shorter than the
  handler, so the retry arrives while the first request still runs;
- key reused: once the payment succeeded, the same key is sent again with
  another amount, which must be refused with 422 (draft section 2.7).

The retries are idempo's own client half: every request goes through
:class:`idempo.client.AsyncIdempotentTransport` (over httpx's
``AsyncHTTPTransport``), which retries timeouts, connection errors, 409, 429,
500, 502, 503 and 504 under the request's key, honouring ``Retry-After``. The storm
puts the key in the ``Idempotency-Key`` header itself, so that the 2-3 clients
of a double click send the same key; the transport keeps a key it is given.

:func:`run_storm` drives the plan with bounded concurrency and counts every
attempt from the transport's ``on_attempt`` hook; :func:`summarize` joins
those counts with what the app's database holds
(:class:`~idempo.demo.payments.Ledger`) into a :class:`RunReport`.
"""

from __future__ import annotations

import enum
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from .._core.problems import FINGERPRINT_MISMATCH
from ..client import AsyncIdempotentTransport, RetryPolicy
from ..client import Attempt as ClientAttempt
from .payments import PROVIDER_DELAY_HEADER, Ledger

__all__ = [
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
]


# --- the plan ------------------------------------------------------------------------


class Share(enum.Enum):
    """How a logical payment is sent."""

    PLAIN = "plain"
    DOUBLE_CLICK = "double click"
    CLIENT_TIMEOUT = "client timeout"
    KEY_REUSE = "key reused"


@dataclass(frozen=True, slots=True)
class Shares:
    """Fractions (0-1) of the payments sent in each hard way; the rest are plain."""

    double_click: float = 0.2
    client_timeout: float = 0.1
    key_reuse: float = 0.1

    def __post_init__(self) -> None:
        parts = (self.double_click, self.client_timeout, self.key_reuse)
        if any(part < 0 for part in parts) or sum(parts) > 1:
            raise ValueError(f"shares must be non-negative and sum to at most 1, got {self}")


@dataclass(frozen=True, slots=True)
class PlannedPayment:
    """One logical payment of the storm.

    Attributes:
        order_id: the merchant's order, unique in the plan.
        amount: minor units.
        currency: ISO 4217 code.
        share: how it is sent.
        clicks: how many identical requests are sent at once (1 unless a double click).
    """

    order_id: str
    amount: int
    currency: str
    share: Share
    clicks: int = 1

    def body(self, amount: int | None = None) -> bytes:
        """The JSON body of ``POST /payments``, with another amount if given."""
        payload = {"order_id": self.order_id, "amount": self.amount if amount is None else amount}
        payload["currency"] = self.currency
        return json.dumps(payload, separators=(",", ":")).encode()


def plan_payments(count: int, *, seed: int, shares: Shares | None = None) -> list[PlannedPayment]:
    """Draw ``count`` payments; the same seed gives the same plan.

    Each share gets ``round(count * fraction)`` payments, placed at random.
    """
    shares = shares if shares is not None else Shares()
    rng = random.Random(seed)
    kinds = (
        [Share.DOUBLE_CLICK] * round(count * shares.double_click)
        + [Share.CLIENT_TIMEOUT] * round(count * shares.client_timeout)
        + [Share.KEY_REUSE] * round(count * shares.key_reuse)
    )[:count]
    kinds += [Share.PLAIN] * (count - len(kinds))
    rng.shuffle(kinds)
    return [
        PlannedPayment(
            order_id=f"order-{index:06d}",
            amount=rng.randrange(100, 100_000),
            currency=rng.choice(("EUR", "USD", "GBP", "CHF")),
            share=kind,
            clicks=rng.choice((2, 2, 3)) if kind is Share.DOUBLE_CLICK else 1,
        )
        for index, kind in enumerate(kinds, start=1)
    ]


# --- what each attempt and each client ended with -------------------------------------


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """How one HTTP attempt ended, as the storm counts it.

    Attributes:
        status: the response status, or None when no response came.
        replayed: the response carried ``Idempotent-Replayed: true``.
        problem: the RFC 9457 ``type`` of a problem+json response, else None.
        error: the httpx exception's class name when no response came.
        timed_out: the client gave up waiting (connect, read, write or pool timeout).
    """

    status: int | None
    replayed: bool = False
    problem: str | None = None
    error: str | None = None
    timed_out: bool = False

    @property
    def kind(self) -> str:
        """A short name for what came back: ``"201"``, ``"503 store-unavailable"``, ``"RemoteProtocolError"``."""
        if self.status is None:
            return self.error or "no answer"
        if self.problem is None:
            return str(self.status)
        return f"{self.status} {self.problem.rstrip('/').rpartition('/')[2]}"

    @classmethod
    def of(cls, attempt: ClientAttempt[Any]) -> AttemptOutcome:
        """Read an attempt reported by the transport's ``on_attempt`` hook.

        The transport has read the body of a keyed answer into memory before
        it reports the attempt (so that a body lost half-way is retried); the
        body is taken from there, so the caller still gets it whole.
        """
        response = attempt.response
        if response is None:
            error = attempt.error
            return cls(
                None,
                error=type(error).__name__ if error is not None else None,
                timed_out=isinstance(error, httpx.TimeoutException),
            )
        assert isinstance(response, httpx.Response)
        return cls(
            response.status_code,
            replayed=response.headers.get("idempotent-replayed") == "true",
            problem=_problem_type(response),
        )


def _problem_type(response: httpx.Response) -> str | None:
    """The RFC 9457 ``type`` of a problem+json answer; None for any other answer.

    Reads the body when it is not read yet (it must be in memory, as the
    transport's answers to keyed requests are).
    """
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return None
    try:
        content = response.content
    except httpx.ResponseNotRead:
        content = response.read()
    try:
        problem = json.loads(content)
    except ValueError:
        return None
    kind = problem.get("type") if isinstance(problem, dict) else None
    return kind if isinstance(kind, str) else None


@dataclass(frozen=True, slots=True)
class FinalAnswer:
    """What one client ends with after its retries.

    Attributes:
        status: the status of the last answer: a final one, or a retryable one
            (409, 503, ...) when the transport's attempts or time ran out;
            None when the last attempt failed without an answer (the
            transport raised its exception).
        body: the last answer's body (empty without an answer).
        attempts: every attempt of this client, in order.
    """

    status: int | None
    body: bytes
    attempts: tuple[AttemptOutcome, ...]

    @property
    def ok(self) -> bool:
        """A 2xx final answer."""
        return self.status is not None and 200 <= self.status < 300


# The attempts of the client whose task is running: the transport's hook is
# called in the task that sends the request, so each click's task collects its own.
_CLIENT_ATTEMPTS: ContextVar[list[AttemptOutcome] | None] = ContextVar("_CLIENT_ATTEMPTS", default=None)


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> FinalAnswer:
    """Send through the retrying transport; return the final answer, never raise for HTTP or transport errors."""
    attempts: list[AttemptOutcome] = []
    token = _CLIENT_ATTEMPTS.set(attempts)
    try:
        response = await client.send(request)
    except httpx.TransportError:
        # The transport gave up after a transport error (or one not worth a retry).
        return FinalAnswer(None, b"", tuple(attempts))
    finally:
        _CLIENT_ATTEMPTS.reset(token)
    return FinalAnswer(response.status_code, response.content, tuple(attempts))


# --- running the storm -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StormSettings:
    """How the storm is driven.

    Attributes:
        concurrency: logical payments in flight at once (a double click
            counts once but sends 2-3 requests).
        client_timeout: the clients' timeout, seconds.
        short_timeout: the client timeout of the client-timeout share, seconds.
        slow_charge: seconds the provider takes for the client-timeout share;
            longer than ``short_timeout``.
        max_attempts: attempts per client before it gives up.
        deadline: seconds per client after which no retry starts; it also
            bounds the waits a ``Retry-After`` asks for.
        backoff: the first backoff bound, seconds (doubled per retry, with
            full jitter) when an answer has no ``Retry-After``.
        backoff_cap: the largest backoff bound, seconds.
    """

    concurrency: int = 64
    client_timeout: float = 10.0
    short_timeout: float = 0.5
    slow_charge: float = 1.5
    max_attempts: int = 20
    deadline: float = 60.0
    backoff: float = 0.05
    backoff_cap: float = 1.0

    def retry_policy(self) -> RetryPolicy:
        """The clients' :class:`~idempo.client.RetryPolicy`: these attempts, deadline and backoff."""
        return RetryPolicy(
            attempts=self.max_attempts, timeout=self.deadline, wait_initial=self.backoff, wait_max=self.backoff_cap
        )


@dataclass
class Tally:
    """Counts of the attempts of a storm, as they happen.

    ``other_kinds`` splits ``other_errors`` by :attr:`AttemptOutcome.kind`
    (a status and problem slug, or an exception's class name).
    """

    requests: int = 0
    replays: int = 0
    conflicts: int = 0
    mismatches: int = 0
    timeouts: int = 0
    other_errors: int = 0
    other_kinds: Counter[str] = field(default_factory=Counter)

    def count(self, attempt: AttemptOutcome) -> None:
        """Count one attempt."""
        self.requests += 1
        if attempt.replayed:
            self.replays += 1
        if attempt.status == 409:
            self.conflicts += 1
        elif attempt.status == 422 and attempt.problem == FINGERPRINT_MISMATCH.type:
            self.mismatches += 1
        elif attempt.timed_out:
            self.timeouts += 1
        elif attempt.status is None or attempt.status >= 400:
            self.other_errors += 1
            self.other_kinds[attempt.kind] += 1


@dataclass(frozen=True, slots=True)
class PaymentOutcome:
    """How one logical payment ended.

    Attributes:
        planned: the plan.
        key: its idempotency key.
        answers: the final answer of each client that sent it (one per click).
        reuse_answer: for the key-reuse share, the answer to the same key
            with another amount; else None.
    """

    planned: PlannedPayment
    key: str
    answers: tuple[FinalAnswer, ...]
    reuse_answer: FinalAnswer | None = None

    @property
    def succeeded(self) -> bool:
        """At least one client got a 2xx final answer."""
        return any(answer.ok for answer in self.answers)


@dataclass(frozen=True, slots=True)
class StormResult:
    """Everything the storm saw: the outcomes, the attempt counts and the wall time (seconds)."""

    outcomes: tuple[PaymentOutcome, ...]
    tally: Tally
    wall_time: float


async def run_storm(
    base_url: str,
    plan: Sequence[PlannedPayment],
    settings: StormSettings | None = None,
    *,
    on_payment: Callable[[PaymentOutcome], None] | None = None,
    on_attempt: Callable[[AttemptOutcome], None] | None = None,
) -> StormResult:
    """Send every planned payment to ``base_url`` until each has its final answers.

    Args:
        base_url: the payments API, e.g. ``"http://127.0.0.1:8000"``.
        plan: the payments, from :func:`plan_payments`.
        settings: concurrency, timeouts and the retry policy.
        on_payment: called as each logical payment ends (progress).
        on_attempt: called as each HTTP attempt ends (from the transport's
            ``on_attempt`` hook, in the task that sent it).

    Returns:
        The outcomes in plan order, the tally and the wall time.
    """
    settings = settings if settings is not None else StormSettings()
    tally = Tally()

    def count(attempt: ClientAttempt[Any]) -> None:
        outcome = AttemptOutcome.of(attempt)
        tally.count(outcome)
        client_attempts = _CLIENT_ATTEMPTS.get()
        if client_attempts is not None:
            client_attempts.append(outcome)
        if on_attempt is not None:
            on_attempt(outcome)

    connections = settings.concurrency * 3
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    transport = AsyncIdempotentTransport(
        httpx.AsyncHTTPTransport(limits=limits), retry=settings.retry_policy(), on_attempt=count
    )
    # trust_env=False: the API is on 127.0.0.1; a proxy from the environment
    # must not carry it (it would also be mounted beside the transport, not through it).
    async with httpx.AsyncClient(
        base_url=base_url, transport=transport, timeout=settings.client_timeout, trust_env=False
    ) as client:
        outcomes: list[PaymentOutcome | None] = [None] * len(plan)
        pending = iter(enumerate(plan))

        async def worker() -> None:
            for index, planned in pending:
                outcome = await _send_payment(client, planned, settings)
                outcomes[index] = outcome
                if on_payment is not None:
                    on_payment(outcome)

        started = time.monotonic()
        async with anyio.create_task_group() as group:
            for _ in range(min(settings.concurrency, len(plan))):
                group.start_soon(worker)
        wall_time = time.monotonic() - started
    return StormResult(tuple(o for o in outcomes if o is not None), tally, wall_time)


async def _send_payment(client: httpx.AsyncClient, planned: PlannedPayment, settings: StormSettings) -> PaymentOutcome:
    # A fresh key per logical payment and per run: a store that outlives the
    # run (PostgreSQL, Redis) must not answer this run with the last one's records.
    key = str(uuid.uuid4())
    # The key is given in the header, so every click sends this one; the transport keeps it across retries.
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    timeout = httpx.Timeout(settings.client_timeout)
    if planned.share is Share.CLIENT_TIMEOUT:
        headers[PROVIDER_DELAY_HEADER] = str(settings.slow_charge)
        # Only the wait for the answer is short; a wait for a pooled connection is not the server's doing.
        timeout = httpx.Timeout(settings.short_timeout, pool=settings.client_timeout)
    body = planned.body()
    answers: list[FinalAnswer | None] = [None] * planned.clicks

    async def click(index: int) -> None:
        request = client.build_request("POST", "/payments", content=body, headers=headers, timeout=timeout)
        answers[index] = await _send(client, request)

    # Started in one pass of the event loop: the clicks leave at the same instant.
    async with anyio.create_task_group() as group:
        for index in range(planned.clicks):
            group.start_soon(click, index)
    final = tuple(answer for answer in answers if answer is not None)

    reuse_answer = None
    if planned.share is Share.KEY_REUSE and any(answer.ok for answer in final):
        changed = planned.body(amount=planned.amount + 100)
        request = client.build_request("POST", "/payments", content=changed, headers=headers, timeout=timeout)
        reuse_answer = await _send(client, request)
    return PaymentOutcome(planned, key, final, reuse_answer)


# --- the report --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunReport:
    """The numbers of one storm against one API, client side and database side.

    Attributes:
        payments: logical payments sent.
        requests: HTTP attempts made.
        handler_executions: entries into the ``POST /payments`` handler.
        replays: answers with ``Idempotent-Replayed: true``.
        conflicts: 409 answers (the key's first request still ran).
        mismatches: 422 fingerprint-mismatch answers (idempo's problem type).
        timeouts: attempts the client gave up waiting on.
        other_errors: other failed attempts (5xx, other 4xx, connection errors).
        other_kinds: ``other_errors`` by kind, e.g. ``{"500": 3, "RemoteProtocolError": 1}``.
        payment_rows: rows in the ``payments`` table.
        provider_charges: charge calls the provider received.
        double_charges: orders the provider charged more than once.
        lost: logical payments without a 2xx final answer or without a row.
        told_failed_but_charged: clients whose final answer was a failure
            although the provider charged their order.
        key_reuses: payments whose key was sent again with another amount.
        key_reuses_refused: of those, how many got the 422 mismatch.
        wall_time: seconds from the first request to the last final answer.
        workers_killed: API workers SIGKILLed during the storm (``idempo demo --kill-workers``).
    """

    payments: int
    requests: int
    handler_executions: int
    replays: int
    conflicts: int
    mismatches: int
    timeouts: int
    other_errors: int
    payment_rows: int
    provider_charges: int
    double_charges: int
    lost: int
    told_failed_but_charged: int
    key_reuses: int
    key_reuses_refused: int
    wall_time: float
    other_kinds: dict[str, int] = field(default_factory=dict)
    workers_killed: int = 0

    def check(self) -> list[str]:
        """What breaks idempo's promise in this run; empty when it held.

        No order charged twice, no logical payment lost, no client told
        "failed" for a payment that went through, every reused key refused.
        """
        problems = []
        if self.double_charges:
            problems.append(f"{self.double_charges} orders were charged more than once")
        if self.lost:
            problems.append(f"{self.lost} logical payments were lost")
        if self.told_failed_but_charged:
            problems.append(f"{self.told_failed_but_charged} clients were told 'failed' although charged")
        if self.key_reuses_refused != self.key_reuses:
            refused, reuses = self.key_reuses_refused, self.key_reuses
            problems.append(f"only {refused} of {reuses} keys reused with another amount got 422")
        return problems


def summarize(result: StormResult, ledger: Ledger) -> RunReport:
    """Join what the clients saw with what the app's database holds."""
    lost = told_failed = reuses = refused = 0
    for outcome in result.outcomes:
        order = outcome.planned.order_id
        if not outcome.succeeded or order not in ledger.payment_orders:
            lost += 1
        if ledger.charges_by_order.get(order, 0) > 0:
            told_failed += sum(1 for answer in outcome.answers if not answer.ok)
        if outcome.planned.share is Share.KEY_REUSE:
            reuses += 1
            answer = outcome.reuse_answer
            if answer is not None and answer.status == 422 and answer.attempts[-1].problem == FINGERPRINT_MISMATCH.type:
                refused += 1
    tally = result.tally
    return RunReport(
        payments=len(result.outcomes),
        requests=tally.requests,
        handler_executions=ledger.handler_executions,
        replays=tally.replays,
        conflicts=tally.conflicts,
        mismatches=tally.mismatches,
        timeouts=tally.timeouts,
        other_errors=tally.other_errors,
        payment_rows=ledger.payments,
        provider_charges=ledger.provider_charges,
        double_charges=ledger.double_charged_orders,
        lost=lost,
        told_failed_but_charged=told_failed,
        key_reuses=reuses,
        key_reuses_refused=refused,
        wall_time=result.wall_time,
        other_kinds=dict(tally.other_kinds.most_common()),
    )
