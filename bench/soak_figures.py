"""What the soak recorded, and the figures it prints: pure functions over plain records.

Every time is ``time.monotonic()`` seconds. On Linux that clock
(CLOCK_MONOTONIC) is one clock for the whole machine, so the workers' ledger,
the supervisor's kills, the relay's cuts and the clients' attempts can be
compared directly.

The one judgement the figures make is :func:`classify_repeats`: of two
executions of one key, was the second a takeover the contract allows (the
first holder died before its result could be saved) or one it forbids (the
first execution reached the handler's end and its process lived on long
enough to save the result)? See its docstring for the rule.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

# --- what the soak records ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Execution:
    """One entry into the handler.

    Attributes:
        key: the idempotency key.
        id: unique per execution (the worker's name and a counter); the
            answer's body carries it, so two answers of one key tell which
            execution each came from.
        worker: the worker incarnation that ran it (see :class:`WorkerLife`).
        start: when the handler started.
        end: when the handler returned its answer to idempo, or None when it
            never did (its process died first).
    """

    key: str
    id: str
    worker: str
    start: float
    end: float | None


@dataclass(frozen=True, slots=True)
class WorkerLife:
    """One worker process, from spawn to exit (a restart is a new life).

    Attributes:
        name: ``w<slot>.<n>``, the ``n``-th process of slot ``slot``.
        pid: its process id.
        started: when it was spawned.
        ready: when its port first accepted a connection; None if never.
        ended: when it died (for a kill: when SIGKILL was sent); None if it
            lived to the end of the run.
        killed: the supervisor SIGKILLed it (else it exited on its own).
    """

    name: str
    pid: int
    started: float
    ready: float | None = None
    ended: float | None = None
    killed: bool = False


@dataclass(frozen=True, slots=True)
class Outage:
    """One cut of the relay between the workers and the store: ``kind`` is ``blackhole`` or ``refuse``."""

    kind: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One HTTP attempt a client made.

    Attributes:
        key: its idempotency key.
        start: when it was sent (after it got one of the in-flight slots).
        end: when its answer was read, or when it failed.
        status: the answer's status; None when no answer came.
        replayed: the answer carried ``Idempotent-Replayed: true``.
        error: the transport exception's class name when no answer came.
    """

    key: str
    start: float
    end: float
    status: int | None
    replayed: bool = False
    error: str | None = None

    @property
    def seconds(self) -> float:
        """How long the attempt waited."""
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class ClientAnswer:
    """The final answer one client got for a key, after its retries.

    Attributes:
        key: the idempotency key.
        role: ``first`` (the key's first client), ``concurrent`` (a duplicate
            sent at the same instant) or ``later`` (a duplicate sent after the
            first client's final answer).
        status: the last answer's status: a 2xx, or what was left when the
            retry budget ran out; None when the last attempt got no answer.
        body: the last answer's body.
        start: when the client started.
        end: when it had its final answer (or gave up).
        error: the exception's class name when it ended without an answer.
    """

    key: str
    role: str
    status: int | None
    body: bytes
    start: float
    end: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        """A 2xx final answer."""
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class Settings:
    """The run's parameters the figures are judged against (seconds).

    Attributes:
        deadline: the store deadline the run expects (issue 10: 2 s or less);
            a 503 and any wait during an outage must stay within it plus 1 s.
        lease: the routes' lease TTL.
        save_grace: how long after its handler returned (or after the store
            came back) a live holder has to save its result: a holder that
            died later than that had saved, or should have.
    """

    deadline: float
    lease: float
    save_grace: float


# --- the judgement -----------------------------------------------------------------------

#: The second execution was a takeover the contract allows: the first holder died unsaved.
TAKEOVER = "takeover after the holder died"
#: The first execution reached the handler's end and its process lived past the time to save it.
ALIVE = "first execution ended, its process lived"
#: The first execution never reached the end and its process did not die: nothing explains it.
UNEXPLAINED = "first execution unfinished, process alive"


def save_due(end: float, outages: Sequence[Outage], grace: float) -> float:
    """The latest time a live holder whose handler returned at ``end`` can have saved its result.

    ``grace`` seconds after ``end``; when the store is cut at ``end`` or
    within the grace, counted from the end of that cut instead (and of any
    cut that follows within the grace again).
    """
    due = end + grace
    for outage in sorted(outages, key=lambda o: o.start):
        if outage.end < end:
            continue
        if outage.start <= due:
            due = max(due, outage.end + grace)
    return due


def classify_repeats(
    executions: Iterable[Execution], lives: Iterable[WorkerLife], outages: Sequence[Outage], grace: float
) -> dict[str, list[tuple[Execution, Execution, str]]]:
    """Classify every key that executed more than once.

    For each pair of consecutive executions of a key (``first``, ``second``):

    - :data:`TAKEOVER` (allowed): the first's process died before the second
      started, and either the first never reached the handler's end or it died
      before :func:`save_due` (it could not have saved yet: killed between
      the handler's return and the save, or while the store was cut and it
      was still retrying the save).
    - :data:`ALIVE` (forbidden, issue 10 item 1): the first reached the
      handler's end and its process lived past ``save_due`` (or never died
      before the second started): its result was lost although its process
      lived long enough to save it.
    - :data:`UNEXPLAINED`: the first never reached the end and its process
      did not die before the second started (a lease shorter than the
      handler would do it; the soak's handler takes milliseconds).

    A key with several pairs takes the worst: ALIVE, then UNEXPLAINED, then TAKEOVER.

    Returns:
        ``{key: [(first, second, verdict), ...]}`` for every key with two or more executions.
    """
    death = {life.name: life.ended for life in lives if life.ended is not None}
    by_key: dict[str, list[Execution]] = defaultdict(list)
    for execution in executions:
        by_key[execution.key].append(execution)
    result: dict[str, list[tuple[Execution, Execution, str]]] = {}
    for key, runs in by_key.items():
        if len(runs) < 2:
            continue
        runs.sort(key=lambda e: e.start)
        pairs = []
        for first, second in pairwise(runs):
            died = death.get(first.worker)
            died_before = died is not None and died < second.start
            if first.end is None:
                verdict = TAKEOVER if died_before else UNEXPLAINED
            elif died_before and died is not None and died < save_due(first.end, outages, grace):
                verdict = TAKEOVER
            else:
                verdict = ALIVE
            pairs.append((first, second, verdict))
        result[key] = pairs
    return result


def key_verdict(pairs: Sequence[tuple[Execution, Execution, str]]) -> str:
    """The worst verdict of a key's pairs (ALIVE, then UNEXPLAINED, then TAKEOVER)."""
    verdicts = {verdict for _, _, verdict in pairs}
    for worst in (ALIVE, UNEXPLAINED):
        if worst in verdicts:
            return worst
    return TAKEOVER


# --- the figures -------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _overlaps(start: float, end: float, outages: Sequence[Outage]) -> Outage | None:
    for outage in outages:
        if start < outage.end and end > outage.start:
            return outage
    return None


def _latency(values: Sequence[float], bound: float) -> dict[str, Any]:
    return {
        "count": len(values),
        "max_s": _round(max(values) if values else None),
        "p99_s": _round(quantile(values, 0.99)),
        "p50_s": _round(quantile(values, 0.50)),
        "over_bound": sum(1 for v in values if v > bound),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class Recorded:
    """Everything one run recorded, for :func:`compute`."""

    settings: Settings
    executions: list[Execution]
    lives: list[WorkerLife]
    outages: list[Outage]
    attempts: list[AttemptRecord]
    answers: list[ClientAnswer]
    rerouted: int = 0
    load_seconds: float = 0.0
    t0: float = 0.0
    left_in_progress: int | None = None
    verify: dict[str, int] = field(default_factory=dict)


def compute(rec: Recorded) -> dict[str, Any]:
    """The soak's figures as a JSON-ready document (see bench/README.md for each one)."""
    s = rec.settings
    bound = s.deadline + 1.0
    keys = {a.key for a in rec.answers}
    per_key = Counter(e.key for e in rec.executions)
    histogram = Counter(min(per_key.get(key, 0), 3) for key in keys)
    repeats = classify_repeats(rec.executions, rec.lives, rec.outages, s.save_grace)
    verdicts = Counter(key_verdict(pairs) for pairs in repeats.values())

    statuses = Counter(str(a.status) if a.status is not None else (a.error or "no answer") for a in rec.attempts)
    five_xx = {k: v for k, v in statuses.items() if k.isdigit() and int(k) >= 500}
    latency_503 = [a.seconds for a in rec.attempts if a.status == 503]
    during: dict[str, list[float]] = defaultdict(list)
    during_503: list[float] = []
    for a in rec.attempts:
        outage = _overlaps(a.start, a.end, rec.outages)
        if outage is not None:
            during[outage.kind].append(a.seconds)
            if a.status == 503:
                during_503.append(a.seconds)
    waits = [w for ws in during.values() for w in ws]

    lost = [a for a in rec.answers if not a.ok]
    ok_bodies: dict[str, set[bytes]] = defaultdict(set)
    for answer in rec.answers:
        if answer.ok:
            ok_bodies[answer.key].add(answer.body)
    different = sum(1 for bodies in ok_bodies.values() if len(bodies) > 1)

    blocked: list[float] = []
    blocked_excluded = 0
    death = {life.name: life.ended for life in rec.lives if life.ended is not None}
    for pairs in repeats.values():
        for first, second, verdict in pairs:
            died = death.get(first.worker)
            if verdict != TAKEOVER or died is None:
                continue
            if _overlaps(died, second.start, rec.outages) is not None:
                blocked_excluded += 1
            else:
                blocked.append(second.start - died)

    killed = [life for life in rec.lives if life.killed]
    exited = [life for life in rec.lives if life.ended is not None and not life.killed]
    restarts = [life.ready - life.started for life in rec.lives if life.ready is not None]
    outage_kinds: dict[str, dict[str, float]] = {}
    for outage in rec.outages:
        entry = outage_kinds.setdefault(outage.kind, {"count": 0, "seconds": 0.0})
        entry["count"] += 1
        entry["seconds"] = round(entry["seconds"] + outage.end - outage.start, 2)

    return {
        "settings": {"deadline_s": s.deadline, "lease_s": s.lease, "save_grace_s": s.save_grace, "bound_s": bound},
        "requests": len(rec.attempts),
        "logical_requests": len(rec.answers),
        "keys": len(keys),
        "load_seconds": round(rec.load_seconds, 1),
        "requests_per_second": round(len(rec.attempts) / rec.load_seconds, 1) if rec.load_seconds else None,
        "answers": dict(statuses.most_common()),
        "replays": sum(1 for a in rec.attempts if a.replayed),
        "rerouted_connects": rec.rerouted,
        "executions": len(rec.executions),
        "executions_per_key": {("3+" if n == 3 else str(n)): histogram.get(n, 0) for n in range(4)},
        "keys_executed_twice": {
            "total": len(repeats),
            "first_ended_process_lived": verdicts.get(ALIVE, 0),
            "holder_died_unsaved": verdicts.get(TAKEOVER, 0),
            "unexplained": verdicts.get(UNEXPLAINED, 0),
        },
        "five_xx": five_xx,
        "latency_503": _latency(latency_503, bound),
        "latency_503_during_outages": _latency(during_503, bound),
        "wait_during_outages": {
            "all": _latency(waits, bound),
            **{kind: _latency(values, bound) for kind, values in sorted(during.items())},
        },
        "lost_answers": {
            "count": len(lost),
            "by_last_answer": dict(
                Counter(str(a.status) if a.status is not None else (a.error or "no answer") for a in lost)
            ),
        },
        "keys_with_different_answers": different,
        "blocked_after_kill": {
            "count": len(blocked),
            "max_s": _round(max(blocked) if blocked else None),
            "p50_s": _round(quantile(blocked, 0.5)),
            "p90_s": _round(quantile(blocked, 0.9)),
            "excluded_outage_between": blocked_excluded,
        },
        "workers": {
            "lives": len(rec.lives),
            "killed": len(killed),
            "exited_on_their_own": len(exited),
            "spawn_to_ready_p50_s": _round(quantile(restarts, 0.5)),
            "spawn_to_ready_max_s": _round(max(restarts) if restarts else None),
        },
        "outages": {"count": len(rec.outages), "by_kind": outage_kinds},
        "left_in_progress": rec.left_in_progress,
        "verify": dict(rec.verify),
        "events": {
            "t0_monotonic": rec.t0,
            "outages": [[o.kind, round(o.start - rec.t0, 3), round(o.end - rec.t0, 3)] for o in rec.outages],
            "kills": [[life.name, round(life.ended - rec.t0, 3)] for life in killed if life.ended is not None],
            "keys_executed_twice": {key: _story(key, pairs, rec) for key, pairs in repeats.items()},
        },
    }


def _story(key: str, pairs: list[tuple[Execution, Execution, str]], rec: Recorded) -> dict[str, Any]:
    """A key executed twice, for the JSON report: verdicts, executions and attempts (seconds from the load's start)."""

    def at(t: float | None) -> float | None:
        return None if t is None else round(t - rec.t0, 3)

    runs = [pairs[0][0], *(second for _, second, _ in pairs)]
    return {
        "verdicts": [verdict for _, _, verdict in pairs],
        "executions": [[e.id, at(e.start), at(e.end)] for e in runs],
        "attempts": [
            [at(a.start), at(a.end), a.status if a.status is not None else a.error]
            for a in rec.attempts
            if a.key == key
        ],
    }


def checks(figures: dict[str, Any], *, committed: bool = False) -> list[tuple[bool, str]]:
    """The pass/fail lines: issue 10's "Done when" and the guarantees the soak can see.

    Args:
        figures: from :func:`compute`.
        committed: the executions are committed rows of the app's business
            table (a transactional route, issue 12), not handler entries: then
            any key with two of them fails, a takeover included, because a
            killed holder's writes must have rolled back with it.

    Returns:
        ``(passed, text)`` per check.
    """
    bound = figures["settings"]["bound_s"]
    twice = figures["keys_executed_twice"]
    if committed:
        result = [(twice["total"] == 0, f"keys with two committed rows: {twice['total']} (must be 0)")]
    else:
        result = [
            (
                twice["first_ended_process_lived"] == 0,
                f"keys executed twice whose first execution ended while its process lived: "
                f"{twice['first_ended_process_lived']} (must be 0)",
            ),
            (twice["unexplained"] == 0, f"keys executed twice without a death to explain it: {twice['unexplained']}"),
        ]
    if figures["outages"]["count"]:
        latency = figures["latency_503"]
        wait = figures["wait_during_outages"]["all"]
        result += [
            (
                latency["over_bound"] == 0,
                f"503s within the store deadline + 1 s ({bound:g} s): "
                f"max {_fmt(latency['max_s'])}, {latency['over_bound']} over",
            ),
            (
                wait["over_bound"] == 0,
                f"no request waits longer than {bound:g} s during an outage: "
                f"longest {_fmt(wait['max_s'])}, {wait['over_bound']} over",
            ),
        ]
    result += [
        (figures["lost_answers"]["count"] == 0, f"lost answers: {figures['lost_answers']['count']}"),
        (
            figures["keys_with_different_answers"] == 0,
            f"keys whose clients got different 2xx answers: {figures['keys_with_different_answers']}",
        ),
    ]
    return result


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def _counts(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in mapping.items()) or "none"


def render(figures: dict[str, Any]) -> str:
    """The figures as the text the soak prints."""
    f = figures
    bound = f["settings"]["bound_s"]
    twice = f["keys_executed_twice"]
    lat = f["latency_503"]
    wait = f["wait_during_outages"]
    blocked = f["blocked_after_kill"]
    workers = f["workers"]
    kinds = f["outages"]["by_kind"]
    verify = f["verify"]
    lines = [
        f"requests               {f['requests']:,} attempts, {f['logical_requests']:,} clients, {f['keys']:,} keys "
        f"in {f['load_seconds']} s ({f['requests_per_second']} req/s); {f['rerouted_connects']:,} connects to a "
        "dead worker rerouted",
        f"answers                {_counts(f['answers'])} (replays: {f['replays']:,})",
        f"executions per key     {_counts(f['executions_per_key'])} ({f['executions']:,} executions)",
        f"keys executed twice    {twice['total']}: first execution ended while its process lived: "
        f"{twice['first_ended_process_lived']} (must be 0); holder died before saving (takeover): "
        f"{twice['holder_died_unsaved']}; unexplained: {twice['unexplained']}",
        f"5xx                    {_counts(f['five_xx'])}",
        f"503 latency            max {_fmt(lat['max_s'])}, p99 {_fmt(lat['p99_s'])}, p50 {_fmt(lat['p50_s'])} "
        f"over {lat['count']:,}; {lat['over_bound']:,} over the deadline + 1 s ({bound:g} s)",
    ]
    if f["outages"]["count"]:
        per_kind = "; ".join(
            f"{kind} {_fmt(v['max_s'])} (p99 {_fmt(v['p99_s'])}, {v['over_bound']:,} of {v['count']:,} over)"
            for kind, v in wait.items()
            if kind != "all"
        )
        lines.append(f"longest wait in outage {_fmt(wait['all']['max_s'])}: {per_kind}")
    lost = f["lost_answers"]
    lines += [
        f"lost answers           {lost['count']:,}"
        + (f" (last answer: {_counts(lost['by_last_answer'])})" if lost["count"] else ""),
        f"different 2xx answers  {f['keys_with_different_answers']:,} keys",
        f"blocked after a kill   longest {_fmt(blocked['max_s'])}, p90 {_fmt(blocked['p90_s'])}, "
        f"p50 {_fmt(blocked['p50_s'])} over "
        f"{blocked['count']:,} takeovers (lease {f['settings']['lease_s']:g} s); "
        f"{blocked['excluded_outage_between']} left out (an outage in between)",
        f"workers killed         {workers['killed']:,} (exited on their own: {workers['exited_on_their_own']}; "
        f"spawn to ready p50 {_fmt(workers['spawn_to_ready_p50_s'])}, max {_fmt(workers['spawn_to_ready_max_s'])})",
        "outages injected       "
        + (
            ", ".join(f"{kind} {v['count']} ({v['seconds']:g} s)" for kind, v in sorted(kinds.items()))
            if kinds
            else "none"
        ),
        "left in progress       "
        + ("-" if f["left_in_progress"] is None else f"{f['left_in_progress']:,} records after the run"),
        "replay check           "
        + (
            f"{verify['keys']:,} keys ({verify['ended_in_an_outage']:,} whose handler returned during a cut): "
            + _counts({k: v for k, v in verify.items() if k not in ("keys", "ended_in_an_outage")})
            if verify
            else "-"
        ),
    ]
    return "\n".join(lines)
