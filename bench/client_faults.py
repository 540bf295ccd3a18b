"""Bench: N logical payments through AsyncIdempotentTransport against a fault-injecting proxy.

    .venv/bin/python bench/client_faults.py --payments 1000 --drop 0.3
    .venv/bin/python bench/client_faults.py --payments 5000 --drop 0.2 --reset 0.1 --unavailable 0.05

Runs the payments once without faults and once with them (the same refs, a
fresh server each time), then prints executions, answers, attempts, faults
and wall time, and whether every final answer matches the fault-free run.
Exits 1 when any payment executed other than once or any answer differs.
The test suite runs the 30%-drop case with 1000 payments
(tests/client/test_acceptance.py); this script is for other sizes and mixes.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.client.payments_app import PaymentsApp, protected, send_payments

from idempo.faults import FaultProxy, random_faults, serve_app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--drop", type=float, default=0.3, help="fraction of answers dropped after execution")
    parser.add_argument("--reset", type=float, default=0.0, help="fraction reset before the body is read")
    parser.add_argument("--unavailable", type=float, default=0.0, help="fraction answered 503, Retry-After: 0")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    refs = [f"p{i:06d}" for i in range(args.payments)]

    runs = {}
    for name, plan in (
        ("clean", random_faults(args.seed)),
        (
            "faulty",
            random_faults(
                args.seed,
                drop_answer=args.drop,
                reset_before_body=args.reset,
                unavailable=args.unavailable,
                retry_after=0,
            ),
        ),
    ):
        app = PaymentsApp()
        with serve_app(protected(app)) as upstream, FaultProxy(upstream, plan) as proxy:
            result = anyio.run(partial(send_payments, proxy.url, refs, concurrency=args.concurrency))
        runs[name] = (result, app, proxy)
        faults = {kind.value: count for kind, count in sorted(proxy.fault_counts().items(), key=lambda i: i[0].value)}
        statuses: dict[object, int] = {}
        for status, _ in result.answers.values():
            statuses[status] = statuses.get(status, 0) + 1
        print(
            f"{name:>6}: {args.payments} payments, {sum(app.executions.values())} executions "
            f"({sum(1 for n in app.executions.values() if n > 1)} executed twice or more), "
            f"{len(result.answers)} answers {statuses}, {result.attempts} attempts, "
            f"faults {faults}, {result.seconds:.2f}s"
        )
    clean, faulty = runs["clean"][0], runs["faulty"][0]
    same = sum(1 for ref in refs if faulty.answers.get(ref) == clean.answers.get(ref))
    once = all(runs["faulty"][1].executions[ref] == 1 for ref in refs)
    print(f"answers identical to the fault-free run: {same}/{args.payments}; every payment executed once: {once}")
    return 0 if same == args.payments and once else 1


if __name__ == "__main__":
    sys.exit(main())
