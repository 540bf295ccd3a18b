"""The I/O primitives whose blocking and async forms differ by more than ``await``.

The engine's async code (``_engine/_async/``) is the source its blocking twin
(``_engine/_sync/``) is generated from (``scripts/unasync``): ``async`` and
``await`` are dropped and each ``*_async`` name below becomes its ``*_sync``
twin. So a sleep, a worker thread, a shield from cancellation and a time
bound are written as these calls, here once each, not as ``anyio`` calls in
the source. The blocking forms of the shield and the bound do nothing: a
blocking call is not cancelled from outside, and the blocking drivers have no
bound of their own (each store call has its deadline).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

__all__ = [
    "deadline_async",
    "deadline_sync",
    "offload_async",
    "offload_sync",
    "shield_async",
    "shield_sync",
    "sleep_async",
    "sleep_sync",
]

T = TypeVar("T")


async def sleep_async(seconds: float) -> None:
    """Sleep ``seconds`` without blocking the event loop."""
    await anyio.sleep(seconds)


def sleep_sync(seconds: float) -> None:
    """Sleep ``seconds`` (the thread blocks)."""
    time.sleep(seconds)


async def offload_async(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` (CPU only) in a worker thread, so the event loop keeps serving."""
    return await anyio.to_thread.run_sync(fn, *args)


def offload_sync(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, here: a blocking front's thread is the request's own."""
    return fn(*args)


def shield_async() -> anyio.CancelScope:
    """A scope its body runs in to the end even when the request is cancelled (a settle, a finalisation)."""
    return anyio.CancelScope(shield=True)


def shield_sync() -> contextlib.nullcontext[None]:
    """Nothing to shield from: a blocking call is not cancelled from outside."""
    return contextlib.nullcontext()


def deadline_async(seconds: float) -> anyio.CancelScope:
    """A scope that cancels its body after ``seconds`` and goes on after it (``anyio.move_on_after``)."""
    return anyio.move_on_after(seconds)


def deadline_sync(seconds: float) -> contextlib.nullcontext[None]:
    """No bound: each of the body's store or database calls has its own deadline."""
    return contextlib.nullcontext()
