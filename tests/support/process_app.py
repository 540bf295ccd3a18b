"""The contract app behind idempo with an SQLite store, for servers in child processes.

``uvicorn tests.support.process_app:create_app --factory`` (ASGI frameworks) or
``waitress-serve --call tests.support.process_app:create_app`` (WSGI) reads:
``IDEMPO_TEST_FRAMEWORK`` (a name of ``tests.support.frameworks.FRAMEWORKS``,
default ``starlette``), ``IDEMPO_TEST_DB`` (the shared SQLite file),
``IDEMPO_TEST_CALLS_FILE`` (one line appended per execution),
``IDEMPO_TEST_LEASE`` (lease seconds, default 30) and ``IDEMPO_TEST_WAIT``
(wait seconds, default 0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from idempo import Policy
from tests.support.frameworks import FRAMEWORKS
from tests.support.orders import Orders


def create_app() -> Any:
    """Build the app from the environment (see the module docstring)."""
    framework = FRAMEWORKS[os.environ.get("IDEMPO_TEST_FRAMEWORK", "starlette")]
    orders = Orders(calls_file=Path(os.environ["IDEMPO_TEST_CALLS_FILE"]))
    policy = Policy(
        lease_ttl=float(os.environ.get("IDEMPO_TEST_LEASE", "30")),
        wait=float(os.environ.get("IDEMPO_TEST_WAIT", "0")),
    )
    # The store's real clock: processes share its time, as in production.
    store = framework.sqlite_store(Path(os.environ["IDEMPO_TEST_DB"]), clock=None)
    return framework.build(orders, store, policy, {})
