"""The contract app behind idempo with an SQLite store, for servers in child processes.

``uvicorn tests.support.process_app:create_app --factory`` reads:
``IDEMPO_TEST_DB`` (the shared SQLite file), ``IDEMPO_TEST_CALLS_FILE`` (one
line appended per execution), ``IDEMPO_TEST_LEASE`` (lease seconds, default 30)
and ``IDEMPO_TEST_WAIT`` (wait seconds, default 0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from idempo import Policy
from idempo.asgi import IdempotencyMiddleware
from idempo.stores.sqlite import AsyncSQLiteStore
from tests.support.orders import Orders, starlette_app


def create_app() -> Any:
    """Build the app from the environment (see the module docstring)."""
    orders = Orders(calls_file=Path(os.environ["IDEMPO_TEST_CALLS_FILE"]))
    policy = Policy(
        lease_ttl=float(os.environ.get("IDEMPO_TEST_LEASE", "30")),
        wait=float(os.environ.get("IDEMPO_TEST_WAIT", "0")),
    )
    store = AsyncSQLiteStore(os.environ["IDEMPO_TEST_DB"])
    return IdempotencyMiddleware(starlette_app(orders), store, policy=policy)
