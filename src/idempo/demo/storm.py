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

:func:`run_storm` drives the plan with bounded concurrency and counts every
attempt; :func:`summarize` joins those counts with what the app's database
holds (:class:`~idempo.demo.payments.Ledger`) into a :class:`RunReport`.

The retry loop is :class:`RetryingSender`, kept apart on purpose: idempo's
httpx retry transport (issue 5) will take its place.
"""

from __future__ import annotations

import enum
import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import anyio
import httpx

from .._core.problems import FINGERPRINT_MISMATCH
from .payments import PROVIDER_DELAY_HEADER, Ledger

__all__ = [
    "Attempt",
    "FinalAnswer",
    "PaymentOutcome",
    "PlannedPayment",
    "RetryingSender",
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


# --- the retry loop (to be replaced by idempo's httpx retry transport, issue 5) ------


@dataclass(frozen=True, slots=True)
class Attempt:
    """One HTTP attempt.

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


@dataclass(frozen=True, slots=True)
class FinalAnswer:
    """What one client ends with after its retries.

    Attributes:
        status: the final status; None when the client gave up (attempts or
            deadline spent).
        body: the final response body.
        attempts: every attempt, in order.
    """

    status: int | None
    body: bytes
    attempts: tuple[Attempt, ...]

    @property
    def ok(self) -> bool:
        """A 2xx final answer."""
        return self.status is not None and 200 <= self.status < 300


class RetryingSender:
    """Send one request until it gets a final answer, reusing its ``Idempotency-Key``.

    The request is sent again unchanged (same key, same bytes) after a
    timeout or connection error, and after 409 (the first request with this
    key still runs), 429, 502, 503 and 504. A ``Retry-After`` (seconds or an
    HTTP date, RFC 9110 section 10.2.3) sets the wait, capped at
    ``max_retry_after``; otherwise the wait is exponential backoff with full
    jitter. Every other answer is final, 4xx included: a 422 means the key
    belongs to another request, and retrying cannot change that.

    Args:
        client: the httpx client to send with.
        max_attempts: attempts before giving up.
        deadline: seconds from the first attempt after which no retry starts.
        backoff: the first backoff bound, seconds; doubled per attempt.
        backoff_cap: the largest backoff bound, seconds.
        max_retry_after: the longest ``Retry-After`` honoured, seconds.
        on_attempt: called with each :class:`Attempt` as it ends.
    """

    RETRY_STATUSES = frozenset({409, 429, 502, 503, 504})

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        max_attempts: int = 20,
        deadline: float = 60.0,
        backoff: float = 0.05,
        backoff_cap: float = 1.0,
        max_retry_after: float = 5.0,
        on_attempt: Callable[[Attempt], None] | None = None,
    ) -> None:
        self._client = client
        self.max_attempts = max_attempts
        self.deadline = deadline
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.max_retry_after = max_retry_after
        self._on_attempt = on_attempt

    async def send(self, request: httpx.Request) -> FinalAnswer:
        """Send ``request`` until a final answer; never raises for HTTP or transport errors."""
        attempts: list[Attempt] = []
        started = time.monotonic()
        for number in range(1, self.max_attempts + 1):
            try:
                response = await self._client.send(request)
            except httpx.TransportError as exc:
                attempt = Attempt(None, error=type(exc).__name__, timed_out=isinstance(exc, httpx.TimeoutException))
                wait = self._backoff(number)
            else:
                attempt = Attempt(
                    response.status_code,
                    replayed=response.headers.get("idempotent-replayed") == "true",
                    problem=_problem_type(response),
                )
                if response.status_code not in self.RETRY_STATUSES:
                    self._record(attempts, attempt)
                    return FinalAnswer(response.status_code, response.content, tuple(attempts))
                advised = self._retry_after(response)
                wait = self._backoff(number) if advised is None else advised
            self._record(attempts, attempt)
            if time.monotonic() - started + wait > self.deadline:
                break
            await anyio.sleep(wait)
        return FinalAnswer(None, b"", tuple(attempts))

    def _record(self, attempts: list[Attempt], attempt: Attempt) -> None:
        attempts.append(attempt)
        if self._on_attempt is not None:
            self._on_attempt(attempt)

    def _backoff(self, number: int) -> float:
        return random.uniform(0, min(self.backoff_cap, self.backoff * 2 ** (number - 1)))

    def _retry_after(self, response: httpx.Response) -> float | None:
        value = response.headers.get("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
        return min(max(seconds, 0.0), self.max_retry_after)


def _problem_type(response: httpx.Response) -> str | None:
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return None
    try:
        problem = json.loads(response.content)
    except ValueError:
        return None
    kind = problem.get("type") if isinstance(problem, dict) else None
    return kind if isinstance(kind, str) else None


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
        deadline: seconds per client after which no retry starts.
    """

    concurrency: int = 64
    client_timeout: float = 10.0
    short_timeout: float = 0.5
    slow_charge: float = 1.5
    max_attempts: int = 20
    deadline: float = 60.0


@dataclass
class Tally:
    """Counts of the attempts of a storm, as they happen."""

    requests: int = 0
    replays: int = 0
    conflicts: int = 0
    mismatches: int = 0
    timeouts: int = 0
    other_errors: int = 0

    def count(self, attempt: Attempt) -> None:
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
    on_attempt: Callable[[Attempt], None] | None = None,
) -> StormResult:
    """Send every planned payment to ``base_url`` until each has its final answers.

    Args:
        base_url: the payments API, e.g. ``"http://127.0.0.1:8000"``.
        plan: the payments, from :func:`plan_payments`.
        settings: concurrency and timeouts.
        on_payment: called as each logical payment ends (progress).
        on_attempt: called as each HTTP attempt ends.

    Returns:
        The outcomes in plan order, the tally and the wall time.
    """
    settings = settings if settings is not None else StormSettings()
    tally = Tally()

    def count(attempt: Attempt) -> None:
        tally.count(attempt)
        if on_attempt is not None:
            on_attempt(attempt)

    connections = settings.concurrency * 3
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    # trust_env=False: the API is on 127.0.0.1; a proxy from the environment must not carry it.
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=settings.client_timeout, trust_env=False
    ) as client:
        sender = RetryingSender(
            client, max_attempts=settings.max_attempts, deadline=settings.deadline, on_attempt=count
        )
        outcomes: list[PaymentOutcome | None] = [None] * len(plan)
        pending = iter(enumerate(plan))

        async def worker() -> None:
            for index, planned in pending:
                outcome = await _send_payment(client, sender, planned, settings)
                outcomes[index] = outcome
                if on_payment is not None:
                    on_payment(outcome)

        started = time.monotonic()
        async with anyio.create_task_group() as group:
            for _ in range(min(settings.concurrency, len(plan))):
                group.start_soon(worker)
        wall_time = time.monotonic() - started
    return StormResult(tuple(o for o in outcomes if o is not None), tally, wall_time)


async def _send_payment(
    client: httpx.AsyncClient, sender: RetryingSender, planned: PlannedPayment, settings: StormSettings
) -> PaymentOutcome:
    key = str(uuid.uuid4())
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
        answers[index] = await sender.send(request)

    # Started in one pass of the event loop: the clicks leave at the same instant.
    async with anyio.create_task_group() as group:
        for index in range(planned.clicks):
            group.start_soon(click, index)
    final = tuple(answer for answer in answers if answer is not None)

    reuse_answer = None
    if planned.share is Share.KEY_REUSE and any(answer.ok for answer in final):
        changed = planned.body(amount=planned.amount + 100)
        request = client.build_request("POST", "/payments", content=changed, headers=headers, timeout=timeout)
        reuse_answer = await sender.send(request)
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
        payment_rows: rows in the ``payments`` table.
        provider_charges: charge calls the provider received.
        double_charges: orders the provider charged more than once.
        lost: logical payments without a 2xx final answer or without a row.
        told_failed_but_charged: clients whose final answer was a failure
            although the provider charged their order.
        key_reuses: payments whose key was sent again with another amount.
        key_reuses_refused: of those, how many got the 422 mismatch.
        wall_time: seconds from the first request to the last final answer.
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
    )
