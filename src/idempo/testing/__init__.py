"""Testing: the testing mode for your own test suite, fakes, and the store conformance suite for any store.

The testing mode makes idempo a fast, deterministic pass in an application's
tests (as stamina's ``set_testing`` does for retries)::

    # conftest.py
    import idempo.testing

    idempo.testing.set_testing()   # or: with idempo.testing.set_testing(): ...

:func:`set_testing` says exactly what it changes: every store URL names one
memory store of the process, the server secret is the fixed :data:`SECRET`,
and nothing runs in the background (no lease renewal, no save retry).

Every store idempo ships passes :class:`StoreContract`; a third-party store
runs the same suite by subclassing it and providing a ``subject`` fixture::

    import pytest
    from idempo.testing import FakeClock, StoreContract, StoreSubject

    class TestMyStore(StoreContract):
        @pytest.fixture
        def subject(self):
            clock = FakeClock()
            store = MyStore(clock=clock)
            yield StoreSubject(store=store, wait=clock.advance, short_ms=1000, server_clock=False)
            store.close()

An async store runs the same suite through :class:`BlockingStore`. The suite
needs pytest (its tests skip through ``pytest.skip``); put
``pytest.register_assert_rewrite("idempo.testing")`` in your ``conftest.py``
for detailed assertion messages. The fault-injecting proxy is :mod:`idempo.faults`.

Fault points make a transactional execution fail at a named moment, so a
crash matrix can run on your own handlers: ``IDEMPO_FAULTS="before-commit=kill"``
in the server's environment (read at import), or :func:`arm_faults` in
process. The points are :data:`FAULT_POINTS` (``after-claim``,
``before-commit``, ``after-commit``, ``before-send``); the actions ``kill``
(SIGKILL), ``drop-connection`` and ``raise`` (:class:`InjectedFault`).
"""

from __future__ import annotations

from idempo._engine.faultpoints import POINTS as FAULT_POINTS
from idempo._engine.faultpoints import InjectedFault
from idempo._engine.faultpoints import arm as arm_faults
from idempo._engine.faultpoints import armed as armed_faults

from ._contract import LONG_MS, RawRecord, StoreContract, StoreSubject, record_fields
from ._fakes import BlockingStore, FakeClock, skewed_clock
from ._mode import SECRET, current_store, is_testing, set_testing

__all__ = [
    "FAULT_POINTS",
    "LONG_MS",
    "SECRET",
    "BlockingStore",
    "FakeClock",
    "InjectedFault",
    "RawRecord",
    "StoreContract",
    "StoreSubject",
    "arm_faults",
    "armed_faults",
    "current_store",
    "is_testing",
    "record_fields",
    "set_testing",
    "skewed_clock",
]
