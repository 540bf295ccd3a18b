"""The commands a step generator yields to its driver, beside the store commands of :mod:`idempo._core.flow`.

A step generator (:func:`idempo._engine.begin.begin_steps`,
:func:`idempo._engine.admission.admit`, the HTTP admission, the engine of
``@idempotent``) holds the whole protocol; it yields a command wherever it
needs I/O, and :func:`~idempo._engine._sync.drivers.drive_sync` or
:func:`~idempo._engine._async.drivers.drive_async` carries it out and sends the
result back (or throws the command's exception in). So every rule is written
once, and a blocking and an async front differ only in how a command is
carried out.

=========================  ======================================  ======================================
command                    blocking driver                         async driver
=========================  ======================================  ======================================
``Begin``, ``Get``         ``store.begin(...)``, ``store.get(...)`` the same, awaited
``Sleep``                  ``time.sleep``                          ``anyio.sleep``
``RequestObservation``     times every later store call for it;    the same
(the observation itself)   the result is the observation
``Complete``, ``Release``, ``settle_once_sync`` (never raises)     ``settle_once_async``, shielded from
``Extend``                                                         cancellation
:class:`LoadDigests`       ``source.load(store)``                  ``await source.aload(store)``
:class:`LegacyWindow`      ``source.legacy_open(store)``           ``await source.alegacy_open(store)``
:class:`Offload`           ``fn(*args)``                           ``anyio.to_thread.run_sync(fn, *args)``
:class:`Call`              ``fn()``                                ``await fn()``
:class:`Lease`             an :class:`Execution`                   an :class:`AsyncExecution`
=========================  ======================================  ======================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._core.flow import Begin, Complete, Extend, Get, Release, Sleep
from .._core.frozen import fast_init
from .._core.policy import Policy
from ..observability._observation import RequestObservation
from ..secrets import SecretSource

__all__ = ["Call", "Command", "Lease", "LegacyWindow", "LoadDigests", "Offload"]


@dataclass(frozen=True, slots=True)
class LoadDigests:
    """Read the store's secret (the first time a front needs it); the result is the :class:`Digests`."""

    source: SecretSource


@dataclass(frozen=True, slots=True)
class LegacyWindow:
    """Whether the legacy window is open (read from the store the first time); the result is a bool."""

    source: SecretSource


@fast_init
@dataclass(frozen=True, slots=True)
class Offload:
    """Compute ``fn(*args)`` (CPU only): in a worker thread on an async front, so the event loop keeps serving."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


@fast_init
@dataclass(frozen=True, slots=True)
class Call:
    """Call the front's own I/O: ``fn()`` on a blocking front, ``await fn()`` on an async one."""

    fn: Callable[[], Any]


@fast_init
@dataclass(frozen=True, slots=True)
class Lease:
    """Hold the lease while the handler runs; the result is the (Async)Execution that settles the record."""

    policy: Policy
    record_key: str
    token: int
    observation: RequestObservation | None


#: Everything a step generator may yield.
Command = (
    Begin
    | Get
    | Sleep
    | Complete
    | Release
    | Extend
    | RequestObservation
    | LoadDigests
    | LegacyWindow
    | Offload
    | Call
    | Lease
)
