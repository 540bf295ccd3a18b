"""The end of every admission: the secret, the identity, ``begin``, and the one fail-open decision.

Every front (the HTTP admission of :mod:`idempo._http.admission`, the engine
of ``@idempotent`` and the consumers) ends its admission with
:func:`admit`: read the server secret (the store's, the first time), make
the request's record key and fingerprint, run :func:`~idempo._engine.begin.begin_steps`.
When the store fails on the way, the policy decides here, and only here,
whether the handler runs unprotected (``Policy.fail_open``) or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from .._core.digests import Digests
from .._core.flow import Decision, LegacyIdentity
from .._core.frozen import fast_init
from .._core.policy import Policy
from ..exceptions import StoreError
from ..observability._observation import RequestObservation
from ..secrets import SecretSource
from .begin import Legacy, begin_steps
from .commands import Command, LoadDigests, Offload

__all__ = ["Admitted", "StoreFailed", "admit"]

#: Makes a request's record key and fingerprint from the digests.
Identify = Callable[[Digests], tuple[str, str]]


@fast_init
@dataclass(frozen=True, slots=True)
class Admitted:
    """The store answered: what this request does (``decision``), under which record key."""

    record_key: str
    decision: Decision


@fast_init
@dataclass(frozen=True, slots=True)
class StoreFailed:
    """The store failed before the handler ran: nothing was taken, nothing decided.

    Attributes:
        error: the store's error.
        bypass: True when the policy fails open (``Policy.fail_open``): the
            handler runs unprotected, its answer marked bypassed; False: it
            does not run (503, or the error raised to the caller).
    """

    error: StoreError
    bypass: bool


def admit(
    store: object,
    policy: Policy,
    source: SecretSource,
    observation: RequestObservation,
    identify: Identify,
    *,
    principal: str,
    key: str,
    offload: bool = False,
    legacy: Callable[[], LegacyIdentity | None] | None = None,
) -> Generator[Command, Any, Admitted | StoreFailed]:
    """The steps from the server secret to the decision (a step generator, see :mod:`idempo._engine.commands`).

    Args:
        store: the store the commands go to.
        policy: the route's or function's policy.
        source: the front's server secret.
        observation: the request's observation; told who sent the request,
            under which key and record key, and the decision.
        identify: makes the record key and fingerprint from the digests.
        principal: who sent the request ("" for a function call).
        key: the idempotency key.
        offload: compute ``identify`` in a worker thread on an async front
            (a large body's fingerprint).
        legacy: where a version before keyed digests kept this request's
            record; looked up while the legacy window is open.

    Returns:
        :class:`Admitted`, or :class:`StoreFailed` when the store failed
        (the observation is not finished: the front knows how it answers).
    """
    try:
        digests = source.digests or (yield LoadDigests(source))
        record_key, fingerprint = (yield Offload(identify, (digests,))) if offload else identify(digests)
        observation.identify(principal, key, record_key, digests)
        lookup = Legacy(source, legacy) if legacy is not None and source.legacy_possible() else None
        decision = yield from begin_steps(store, record_key, fingerprint, policy, observation, lookup)
    except StoreError as exc:
        return StoreFailed(exc, bypass=policy.fail_open)
    return Admitted(record_key, decision)
