"""Fixtures for the proxy tests: the Node upstream (``tests/proxy/upstream/server.mjs``).

Tests that need Node skip with the reason when ``node`` is missing or too old,
unless ``IDEMPO_REQUIRE_SERVICES=1`` (CI, where ``.ci/run`` installs it), where
they fail instead.

Fixtures:
    node_binary: the ``node`` executable (session).
    start_node_upstream: a function starting a :class:`NodeUpstream` of the
        test's own (each in its own directory, with its own ledger); every one is
        stopped afterwards.
    node_upstream: one started upstream; ``.url``, ``.ledger()``,
        ``.executions(key)``, ``.stats()``, ``.release(n, key)``, ``.wait_waiting()``,
        ``.stop()`` / ``.start()`` (same port), ``.kill()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import service_missing
from tests.proxy.upstream import NodeUpstream, find_node


@pytest.fixture(scope="session")
def node_binary() -> str:
    """The ``node`` executable; skips (or fails, with IDEMPO_REQUIRE_SERVICES=1) when there is none."""
    node, reason = find_node()
    if node is None:
        service_missing(reason)
    assert node is not None
    return node


@pytest.fixture
def start_node_upstream(node_binary: str, tmp_path: Path) -> Iterator[Callable[[], NodeUpstream]]:
    """Start Node upstreams of the test's own; each is stopped afterwards."""
    upstreams: list[NodeUpstream] = []

    def start() -> NodeUpstream:
        upstream = NodeUpstream(node_binary, tmp_path / f"upstream-{len(upstreams)}")
        upstreams.append(upstream)
        upstream.start()
        return upstream

    yield start
    for upstream in upstreams:
        upstream.stop()


@pytest.fixture
def node_upstream(start_node_upstream: Callable[[], NodeUpstream]) -> NodeUpstream:
    """One running Node upstream, stopped after the test."""
    return start_node_upstream()
