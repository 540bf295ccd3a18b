"""Idempotent Celery tasks with real worker processes on a real Redis broker.

Each test sends its tasks to a queue of its own and starts the workers that
consume it; executions are counted from the ledger file the tasks write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import TimeLimitExceeded  # the conftest skips without idempo[celery]

from tests.celery_tasks.conftest import ROOT, Worker, executions, wait_for

pytestmark = pytest.mark.redis

#: Bounds a hang; nothing here is timed.
TIMEOUT = 45.0


def started(ledger: Path, order_id: str) -> Callable[[], bool]:
    return lambda: executions(ledger, order_id)[0] >= 1


def test_a_duplicate_task_gets_the_first_runs_result_without_running(
    tasks: Any, start_worker: Callable[..., Worker], queue: str, ledger: Path
) -> None:
    """A second task with the same key (another task id) returns the first run's result through the backend."""
    worker = start_worker(queue)
    # At its start the worker warned of the one task whose lease outlasts the visibility timeout.
    assert "shorter than the lease of task tests.celery_tasks.tasks.long_lease (3600 s)" in worker.output()
    first = tasks.charge.apply_async(("ord-1", 1999, str(ledger)), queue=queue)
    result = first.get(timeout=TIMEOUT)
    second = tasks.charge.apply_async(("ord-1", 1999, str(ledger)), queue=queue)
    assert second.id != first.id
    assert second.get(timeout=TIMEOUT) == result
    assert executions(ledger, "ord-1") == (1, 1)


def test_a_duplicate_of_a_running_task_is_retried_until_the_result_is_there(
    tasks: Any, start_worker: Callable[..., Worker], queue: str, ledger: Path
) -> None:
    """While the first run holds the key, a duplicate on another worker is retried (Celery's retry), then replays."""
    a, b = start_worker(queue), start_worker(queue)
    first = tasks.charge.apply_async(("ord-2", 500, str(ledger), 2.0), queue=queue)
    wait_for(started(ledger, "ord-2"), TIMEOUT, "the first run's start")
    second = tasks.charge.apply_async(("ord-2", 500, str(ledger), 2.0), queue=queue)
    assert second.get(timeout=TIMEOUT) == first.get(timeout=TIMEOUT)
    assert executions(ledger, "ord-2") == (1, 1)
    assert "retried in" in a.output() + b.output()


def test_a_duplicate_of_a_running_task_can_be_dropped_with_a_log_line(
    tasks: Any, start_worker: Callable[..., Worker], queue: str, ledger: Path
) -> None:
    """on_duplicate='drop': the duplicate is acknowledged without running or storing a result, and logged."""
    a, b = start_worker(queue), start_worker(queue)
    first = tasks.charge_or_drop.apply_async(("ord-3", 700, str(ledger), 2.0), queue=queue)
    wait_for(started(ledger, "ord-3"), TIMEOUT, "the first run's start")
    second = tasks.charge_or_drop.apply_async(("ord-3", 700, str(ledger), 2.0), queue=queue)
    wait_for(lambda: "dropped (on_duplicate='drop')" in a.output() + b.output(), TIMEOUT, "the drop's log line")
    assert first.get(timeout=TIMEOUT)["order_id"] == "ord-3"
    assert second.state == "PENDING"  # dropped: nothing stored under its id
    assert executions(ledger, "ord-3") == (1, 1)


def test_a_task_redelivered_while_it_runs_is_not_run_again(
    tasks: Any, start_worker: Callable[..., Worker], queue: str, ledger: Path
) -> None:
    """A task longer than the visibility timeout (3 s) is redelivered to another worker while it runs: run once."""
    a, b = start_worker(queue), start_worker(queue)
    # 7 s: the redelivery (3 s, then the other worker's sweep every second) comes well within it.
    first = tasks.charge.apply_async(("ord-4", 900, str(ledger), 7.0), queue=queue)
    assert first.get(timeout=TIMEOUT)["order_id"] == "ord-4"
    assert executions(ledger, "ord-4") == (1, 1)
    assert f"charge[{first.id}] is a duplicate" in a.output() + b.output()  # it was redelivered


@pytest.mark.parametrize(("task", "expected"), [("charge", (2, 1)), ("charge_or_hold", (1, 0))])
def test_a_task_of_a_worker_killed_mid_task_runs_once_after_the_lease_or_is_held(
    tasks: Any, start_worker: Callable[..., Worker], queue: str, ledger: Path, task: str, expected: tuple[int, int]
) -> None:
    """SIGKILL the worker mid-task: the redelivered task runs once after the lease (or fails held, on_takeover)."""
    doomed = start_worker(queue)
    sent = getattr(tasks, task).apply_async(("ord-5", 1200, str(ledger), 2.0), queue=queue)
    wait_for(started(ledger, "ord-5"), TIMEOUT, "the first run's start")
    doomed.kill()
    killed = time.monotonic()
    start_worker(queue)
    if task == "charge":
        assert sent.get(timeout=TIMEOUT)["order_id"] == "ord-5"
        # A figure for docs/celery.md, never asserted: the visibility timeout (3 s) dominates it.
        print(f"SIGKILL to the redelivered run's result: {time.monotonic() - killed:.2f} s")
    else:
        from idempo.exceptions import KeyHeld

        # Rebuilt from the result backend by name (Celery's json result serializer).
        with pytest.raises(Exception, match="the key is held") as raised:
            sent.get(timeout=TIMEOUT)
        assert raised.type.__name__ == KeyHeld.__name__
    assert executions(ledger, "ord-5") == expected


def test_the_example_runs_as_documented(celery_env: dict[str, str], tmp_path: Path) -> None:
    """`python examples/celery_app.py` with a worker: 6 tasks, 3 charges, each duplicate gets its order's receipt."""
    prefix = f"{celery_env['IDEMPO_CELERY_PREFIX']}example-{uuid.uuid4().hex[:6]}:"
    env = {**celery_env, "REDIS_URL": celery_env["IDEMPO_CELERY_BROKER"], "PREFIX": prefix}
    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "examples.celery_app", "worker", "--pool=solo", "--loglevel=INFO"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            run = subprocess.run(
                [sys.executable, str(ROOT / "examples" / "celery_app.py")],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
    assert run.returncode == 0, run.stderr + log.read_text()
    assert "6 tasks, 3 charges in all; each duplicate got its order's receipt: True" in run.stdout


#: How long a next delivery may wait for a settled key: half the tasks' 120 s lease, so it passes
#: only when the killed run's key was settled, not left to lapse; room for a slow pool restart.
SETTLED = 60.0


@pytest.mark.parametrize("task", ["charge_limited", "charge_limited_hold"])
def test_a_task_killed_by_its_hard_time_limit_releases_or_holds_its_key(
    tasks: Any, start_worker: Callable[..., Worker], queue: str, ledger: Path, task: str
) -> None:
    """The pool kills the child at the hard time limit; the worker settles its lease by the verdict, never leaves it."""
    worker = start_worker(queue, pool="prefork")
    first = getattr(tasks, task).apply_async(("ord-6", 100, str(ledger), 10.0), queue=queue)
    with pytest.raises(TimeLimitExceeded):
        first.get(timeout=TIMEOUT)
    done = "held" if task.endswith("hold") else "released"
    line = f"[{first.id}] exceeded its hard time limit; its idempotency key was {done}"
    wait_for(lambda: line in worker.output(), TIMEOUT, "the settle's log line")
    second = getattr(tasks, task).apply_async(("ord-6", 100, str(ledger), 0.0), queue=queue)
    if done == "released":
        assert second.get(timeout=SETTLED)["order_id"] == "ord-6"
        assert executions(ledger, "ord-6") == (2, 1)
    else:
        with pytest.raises(Exception, match="the key is held"):
            second.get(timeout=SETTLED)
        assert executions(ledger, "ord-6") == (1, 0)


def test_a_task_revoked_with_terminate_releases_its_key(
    tasks: Any, start_worker: Callable[..., Worker], queue: str, ledger: Path
) -> None:
    """revoke(terminate=True) kills the child mid-task; the worker releases its key; the next delivery runs."""
    worker = start_worker(queue, pool="prefork")
    first = tasks.charge_revocable.apply_async(("ord-7", 100, str(ledger), 10.0), queue=queue)
    wait_for(started(ledger, "ord-7"), TIMEOUT, "the first run's start")
    tasks.app.control.revoke(first.id, terminate=True)
    line = f"[{first.id}] was revoked and terminated; its idempotency key was released"
    wait_for(lambda: line in worker.output(), TIMEOUT, "the settle's log line")
    assert first.state == "REVOKED"
    # The record is gone (released), read from the store.
    from idempo.decorator import record_key
    from idempo.secrets import store_secret
    from idempo.stores import store_from_url

    store = store_from_url(os.environ["IDEMPO_CELERY_STORE"])
    try:
        key = record_key("tests.celery_tasks.tasks.charge_revocable", "ord-7", secret=store_secret(store))
        assert store.get(key) is None
    finally:
        store.close()
    # The pool's new child runs the next delivery (this task has no time limit: a child forked while
    # the worker settled the key could hang on a lock for good).
    second = tasks.charge_revocable.apply_async(("ord-7", 100, str(ledger), 0.0), queue=queue)
    assert second.get(timeout=SETTLED)["order_id"] == "ord-7"
    assert executions(ledger, "ord-7") == (2, 1)


def test_check_broker_warns_of_a_visibility_timeout_shorter_than_a_lease_or_a_time_limit(tasks: Any) -> None:
    """check_broker names each task whose lease or time limit outlasts the visibility timeout; a worker logs it."""
    from celery import Celery

    from idempo.celery import IdempotentTask, check_broker

    app = Celery("visibility", broker="redis://127.0.0.1:6379/7", set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": 5}

    @app.task(base=IdempotentTask, idempotency_key="key", idempotency_lease_ttl=2.0, time_limit=60)
    def slow(key: str) -> None: ...

    @app.task(base=IdempotentTask, idempotency_key="key", idempotency_lease_ttl=30.0, name="leased")
    def leased(key: str) -> None: ...

    @app.task(idempotency_key="key", time_limit=600)  # not idempotent: not checked
    def plain(key: str) -> None: ...

    # Celery shares every @app.task with every app (shared=True): keep to this test's tasks.
    warnings = [line for line in check_broker(app) if "leased" in line or "test_celery" in line]
    assert len(warnings) == 2
    assert "lease of task leased (30 s)" in warnings[0]
    assert "time limit of task" in warnings[1]
    assert "slow (60 s)" in warnings[1]
    app.conf.broker_transport_options = {"visibility_timeout": 7200}
    assert check_broker(app) == []
    app.conf.broker_url = "sqs://"  # no timeout set: SQS's 30 min, shorter than leased's 1 h lease
    app.conf.broker_transport_options = {}
    leased.idempotency_lease_ttl = 3600.0
    assert [line for line in check_broker(app) if "task leased" in line] == [
        "idempo: the broker's visibility timeout (1800 s) is shorter than the lease of task leased (3600 s): "
        "a dead worker's task is redelivered while its lease still blocks it; "
        "raise broker_transport_options['visibility_timeout'] or lower idempotency_lease_ttl"
    ]
    app.conf.broker_url = "amqp://127.0.0.1:5672//"  # no visibility timeout: nothing to say
    app.conf.broker_transport_options = {"visibility_timeout": 1}
    assert check_broker(app) == []


def test_a_bound_task_with_a_key_function_runs_once_when_called_directly(tasks: Any) -> None:
    """bind=True and a key callable: a direct call runs once per key, replays equal, refuses other arguments."""
    from celery import Celery

    from idempo import FingerprintMismatch, KeyInProgress
    from idempo.celery import IdempotentTask

    app = Celery("direct", set_as_current=False)
    app.conf.idempo_store = "memory://"
    runs: list[str] = []

    @app.task(bind=True, base=IdempotentTask, idempotency_key=lambda args: args["order"]["id"], shared=False)
    def ship(self: Any, order: dict[str, str], carrier: str) -> str:
        runs.append(order["id"])
        assert self.name.endswith("ship")
        return f"{order['id']} by {carrier}"

    assert ship({"id": "o-1"}, "post") == "o-1 by post"
    assert ship({"id": "o-1"}, "post") == "o-1 by post"
    assert runs == ["o-1"]
    with pytest.raises(FingerprintMismatch):
        ship({"id": "o-1"}, "courier")
    assert KeyInProgress.__name__ == "KeyInProgress"


def test_a_task_without_a_key_or_with_an_unknown_duplicate_rule_is_refused_when_made(tasks: Any) -> None:
    """The options are checked when Celery makes the task (the app's finalisation: a worker's start), not on a run."""
    from celery import Celery

    from idempo import ConfigurationError
    from idempo.celery import IdempotentTask, idempotent_task

    app = Celery("refused", set_as_current=False)

    @app.task(base=IdempotentTask, shared=False)
    def keyless(order_id: str) -> None: ...

    @idempotent_task(app, key="order_id", on_duplicate="ignore", shared=False)  # type: ignore[arg-type]
    def unknown(order_id: str) -> None: ...

    with pytest.raises(ConfigurationError, match="needs idempotency_key"):
        _ = keyless.name  # Celery makes a task on its first use

    @idempotent_task(app, key="order_id", lease_ttl=0, shared=False)
    def leaseless(order_id: str) -> None: ...

    with pytest.raises(ConfigurationError, match="'retry' or 'drop'"):
        _ = unknown.name
    with pytest.raises(ConfigurationError, match="positive"):
        _ = leaseless.name
