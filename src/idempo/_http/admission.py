"""The admission of one HTTP request, written once for the ASGI, WSGI and Django fronts.

:func:`admission` is a step generator (:mod:`idempo._engine.commands`) that
a front drives with :func:`~idempo._engine._async.drivers.drive_async` (ASGI) or
:func:`~idempo._engine._sync.drivers.drive_sync` (WSGI, Django). In order:

1. the key (:func:`~idempo._core.http.check_key`): none, and none required,
   passes the request through; a malformed or missing one is a 400;
2. the content type (:func:`~idempo._core.http.content_type_of`): two is a 400;
3. the principal (the front's resolver): none is a 400;
4. the body (the front's own reader): too large is a 413; cut short is a 400
   (or, on ASGI, no answer at all: the client is gone);
5. the secret, the identity and ``begin`` (:func:`idempo._engine.admission.admit`),
   where a store failure fails open or closed (503);
6. the answer for a decision that does not run the handler (replay, 409,
   410, 422), or the lease (:class:`Execute`) for one that does.

Every way out but a pass-through and :class:`Execute` / :class:`Bypass` has
finished the request's observation.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from .._core.fingerprint import BodySource
from .._core.flow import LegacyIdentity, Proceed
from .._core.frozen import fast_init
from .._core.http import (
    body_incomplete_answer,
    body_too_large_answer,
    check_key,
    content_type_of,
    decision_answer,
    fingerprint_off_loop,
    legacy_identity,
    method_ambiguous_answer,
    principal_required_answer,
    request_identity,
    store_unavailable_answer,
)
from .._core.policy import Policy
from .._core.records import StoredResponse
from .._engine.admission import StoreFailed, admit
from .._engine.commands import Call, Command, Lease
from .._engine.execution import AsyncExecution, Execution
from ..exceptions import StoreError
from ..observability._observation import Outcome, RequestObservation, observe_request
from ..secrets import SecretSource

__all__ = ["GONE", "Bypass", "BodyIncomplete", "ClientGone", "Execute", "admission"]


class BodyIncomplete(Exception):
    """The request body ended before its declared length: the client left mid-upload (a 400)."""


class ClientGone(BodyIncomplete):
    """The client disconnected before its request body was complete: there is no one to answer."""


class _Gone:
    """The type of :data:`GONE`."""

    __slots__ = ()


#: The client left mid-upload (ASGI): nothing run, nothing stored, nothing to answer.
GONE = _Gone()


@fast_init
@dataclass(frozen=True, slots=True)
class Execute:
    """The request holds the lease: run the handler with ``body``, then settle through ``execution``.

    ``body`` is bytes, or what the front's body reader made of it (``idempo
    proxy`` spools it: a :class:`~idempo._core.fingerprint.BodySource`).
    """

    execution: Execution | AsyncExecution
    observation: RequestObservation
    body: bytes | BodySource


@fast_init
@dataclass(frozen=True, slots=True)
class Bypass:
    """The store failed and the policy fails open: the handler runs unprotected, its answer marked bypassed.

    The front finishes ``observation`` as ``bypassed`` with ``error`` once
    the handler is done (:meth:`finish`).
    """

    observation: RequestObservation
    error: StoreError
    body: bytes | BodySource

    def finish(self, status: int | None) -> None:
        """The handler is done and answered ``status`` (None: nothing): finish the observation as ``bypassed``."""
        self.observation.handler_finished(status)
        self.observation.finish(Outcome.BYPASSED, error=self.error)


#: What an admission ends in: None (pass the request through untouched), an
#: answer, GONE, the lease, or a bypass.
Admission = StoredResponse | Execute | Bypass | _Gone | None


def admission(
    store: object,
    policy: Policy,
    source: SecretSource,
    *,
    front: str,
    route: str,
    method: str,
    path: str,
    identity_path: str,
    query: bytes | str,
    key_values: Sequence[bytes],
    content_types: Sequence[bytes],
    principal: Callable[[], str | None],
    legacy_principal: Callable[[str], str | None],
    read_body: Callable[[], Any],
) -> Generator[Command, Any, Admission]:
    """The steps that admit one request (see the module docstring); the caller checked :func:`takes_part`.

    Args:
        store: the store the commands go to.
        policy: the route's policy.
        source: the front's server secret.
        front: ``"asgi"``, ``"wsgi"``, ``"django"``: labels the observation.
        route: the route label of logs, metrics and spans (a pattern, never a raw path).
        method: the request method.
        path: the request path, as logs and problem details show it.
        identity_path: the path record keys and fingerprints are made of
            (bytes that are not UTF-8 kept).
        query: the raw query string.
        key_values: the raw values of every key header line.
        content_types: the raw values of every ``Content-Type`` line.
        principal: who sent the request (the front's resolver, bound to it).
        legacy_principal: the principal a version before keyed digests gave
            the request, from the one given now.
        read_body: reads the whole body (``Call``: awaited on ASGI); returns
            the bytes (or a :class:`~idempo._core.fingerprint.BodySource`), or
            None past ``policy.max_request_body``; raises
            :class:`BodyIncomplete` (or :class:`ClientGone`) when it ends short.
    """
    key = check_key(policy, method, path, key_values)
    if key is None:
        return None
    observation = observe_request(front, method, route, path)
    yield observation  # the driver times the store calls for it
    if isinstance(key, StoredResponse):
        observation.finish(Outcome.INVALID_KEY if key_values else Outcome.MISSING_KEY, key.status)
        return key
    if method not in policy.methods:
        observation.finish(Outcome.METHOD_AMBIGUOUS, 400)
        return method_ambiguous_answer(method)
    content_type = content_type_of(content_types)
    if isinstance(content_type, StoredResponse):
        observation.finish(Outcome.CONTENT_TYPE_AMBIGUOUS, content_type.status)
        return content_type
    who = principal()
    if who is None:
        observation.finish(Outcome.NO_PRINCIPAL, 400)
        return principal_required_answer()
    try:
        body: bytes | BodySource | None = yield Call(read_body)
    except ClientGone:
        observation.finish(Outcome.BODY_INCOMPLETE)
        return GONE  # no one to answer, nothing run, nothing stored
    except BodyIncomplete:
        observation.finish(Outcome.BODY_INCOMPLETE, 400)
        return body_incomplete_answer()
    if body is None:
        observation.finish(Outcome.BODY_TOO_LARGE, 413)
        return body_too_large_answer(policy)

    def identify(digests: Any) -> tuple[str, str]:
        identity = request_identity(policy, digests, who, method, identity_path, query, content_type, body, key)
        return identity.record_key, identity.fingerprint

    legacy = None
    if source.legacy_possible():

        def legacy() -> LegacyIdentity | None:
            # After a fresh lease: where a version before keyed digests kept the record.
            old = legacy_principal(who)
            if old is None:
                return None
            return legacy_identity(policy, old, method, path, query, content_type, body, key)

    # A large body's fingerprint (canonical JSON: about 1 s for 10 MiB) is
    # computed in a worker thread on ASGI: the loop keeps serving meanwhile.
    offload = fingerprint_off_loop(policy, content_type, len(body))
    admitted = yield from admit(
        store, policy, source, observation, identify, principal=who, key=key, offload=offload, legacy=legacy
    )
    if isinstance(admitted, StoreFailed):
        if admitted.bypass:
            return Bypass(observation, admitted.error, body)
        answer = store_unavailable_answer(policy)
        observation.finish(Outcome.STORE_ERROR, answer.status, admitted.error)
        return answer
    decision = admitted.decision
    if not isinstance(decision, Proceed):
        answer = decision_answer(decision)
        observation.finish(status=answer.status)
        return answer
    execution = yield Lease(policy, admitted.record_key, decision.token, observation)
    return Execute(execution, observation, body)
