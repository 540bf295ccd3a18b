"""The engine: what carries the sans-I/O protocol of :mod:`idempo._core` out against a store.

- :mod:`._async`: the I/O, written once, async: ``drive_async`` runs a step
  generator, carrying out each command it yields (a store call, a sleep, the
  front's own I/O) and sending the result back; ``AsyncTransactionalExecution``,
  the execution of a leased request, whose transaction's commit path it drives. :mod:`._sync`, the blocking twin
  (``drive_sync``, ``TransactionalExecution``), is generated from it by
  ``scripts/unasync``; :mod:`.primitives` holds the few calls the two
  differ in beyond ``await``.
- :mod:`.store`: the one store call that settles a record: which store
  method a command means, and the log of a failure (the call itself,
  ``settle_once_async``, is in :mod:`._async`, and its generated twin
  ``settle_once_sync`` in :mod:`._sync`).
- :mod:`.begin`: what a request does before its handler runs: the first
  ``begin``, the legacy lookup, waiting for a running duplicate (wait rooms),
  holding a taken-over key.
- :mod:`.admission`: the server secret, the request's identity, ``begin``,
  and the one fail-open decision when the store fails.
- :mod:`.lease`: lease renewal while the handler runs, and the retries of a
  save the store refused.
- :mod:`.execution`: one executing request's lease, settled exactly once.
- :mod:`.transaction`: transactional mode's commit path (:func:`~idempo._engine.transaction.finalize_steps`),
  the transactor protocol, what the two transactional executions share.
- :mod:`.calls`: :class:`~idempo._engine.calls.Engine`, the protocol of
  ``@idempotent`` and the consumers.
"""
