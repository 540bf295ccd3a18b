"""A fault-injecting HTTP/1.1 proxy, for testing retrying clients over real sockets.

Put :class:`FaultProxy` in front of any HTTP server; per request, a *fault
plan* decides what goes wrong:

* :data:`PASS`: forward the request, return the answer.
* :data:`DROP_ANSWER`: forward the request (the handler runs), read the whole
  answer, then close the client's connection without sending it: the answer
  is lost after the side effect happened, the case idempotency keys exist for.
* :meth:`Fault.stall`: forward, then hold the answer for some seconds before
  sending it; beyond the client's timeout, the client gives up first.
* :meth:`Fault.respond`: answer by itself without forwarding, e.g. ``503`` with
  ``Retry-After`` (an overloaded gateway).
* :data:`RESET_BEFORE_BODY`: read the request head, then reset the connection
  (TCP RST) before reading the body; nothing reaches the server.

Plans: :func:`scripted` (a fixed sequence), :func:`random_faults` (seeded
fractions), or any callable taking a :class:`RequestHead`. Every request the
proxy saw, with its headers exactly as sent and the fault applied, is in
:attr:`FaultProxy.log`.

::

    from idempo.faults import FaultProxy, random_faults, serve_app

    with serve_app(app) as upstream, FaultProxy(upstream, random_faults(1, drop_answer=0.3)) as proxy:
        httpx.post(proxy.url + "/payments", json={...})

Needs h11 (installed with httpx: ``idempo[client]``); :func:`serve_app` also
needs uvicorn (``idempo[demo]``). The proxy runs its own event loop in a
thread, so sync and async clients alike can use it. For tests and demos only:
it buffers whole requests and answers in memory.
"""

from __future__ import annotations

from .testing._faults import (
    DROP_ANSWER,
    PASS,
    RESET_BEFORE_BODY,
    Fault,
    FaultKind,
    FaultPlan,
    FaultProxy,
    RequestHead,
    SeenRequest,
    random_faults,
    scripted,
    serve_app,
)

__all__ = [
    "DROP_ANSWER",
    "PASS",
    "RESET_BEFORE_BODY",
    "Fault",
    "FaultKind",
    "FaultPlan",
    "FaultProxy",
    "RequestHead",
    "SeenRequest",
    "random_faults",
    "scripted",
    "serve_app",
]
