"""The prefork pool forks a replacement child while the worker's main process settles a killed run's key.

Run in a subprocess of its own (it forks, with threads running), without a broker.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.celery_tasks.conftest import ROOT

# The main process's settle thread is made to stop inside the task's first use (building its
# store); a fork is taken meanwhile, as the pool's replacement of the killed child would be.
# The child then makes its own first use of the task, as its first task does; an alarm bounds
# a hang (a child that inherited a held lock never returns). Prints the child's exit code.
SCRIPT = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, threading

    from celery import Celery
    from celery.exceptions import TimeLimitExceeded

    import idempo.celery as idempo_celery

    app = Celery("fork", set_as_current=False)
    app.conf.idempo_store = "memory://"

    @app.task(base=idempo_celery.IdempotentTask, idempotency_key="order_id", shared=False)
    def charge(order_id):
        return order_id

    building, go, forking = threading.Event(), threading.Event(), threading.Event()
    real_sync_store = idempo_celery.sync_store

    def slow_sync_store(store, scope):
        building.set()
        go.wait(30)
        return real_sync_store(store, scope)

    idempo_celery.sync_store = slow_sync_store
    # Registered after idempo.celery's, so it runs first: the fork has begun.
    os.register_at_fork(before=forking.set)

    dead = subprocess.Popen(["true"])
    dead.wait()
    handoff = os.path.join(sys.argv[1], "handoff")
    with open(handoff, "w") as file:
        json.dump(["record", 1, dead.pid], file)
    from pathlib import Path

    settle = threading.Thread(
        target=idempo_celery._settle_killed_run,
        args=(charge, "task-id", Path(handoff), TimeLimitExceeded(1), "exceeded its hard time limit"),
    )
    settle.start()
    building.wait(30)
    status = []

    def fork():
        pid = os.fork()
        if pid == 0:
            signal.alarm(5)
            charge._process()
            os._exit(0)
        status.append(os.waitpid(pid, 0)[1])

    forker = threading.Thread(target=fork)
    forker.start()
    forking.wait(30)
    go.set()
    forker.join(60)
    settle.join(60)
    print(os.waitstatus_to_exitcode(status[0]))
    """
)


def test_a_child_forked_while_the_main_process_settles_a_killed_runs_key_runs_its_tasks(tmp_path: object) -> None:
    """A fork taken while the settle thread builds the task's store waits for it; the child's first use returns."""
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    # Not -14 (SIGALRM): the child did not hang on a lock the settle thread held at the fork.
    assert run.stdout.split() == ["0"], run.stderr
