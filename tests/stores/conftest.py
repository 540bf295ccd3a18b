"""Fixtures for the store tests (helpers live in store_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from store_helpers import RoundTripProxy


@pytest.fixture
def round_trip_proxy() -> Iterator[Callable[[str, int], RoundTripProxy]]:
    """Start round-trip counting proxies; each is closed afterwards."""
    proxies: list[RoundTripProxy] = []

    def start(host: str, port: int) -> RoundTripProxy:
        proxy = RoundTripProxy(host, port)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()
