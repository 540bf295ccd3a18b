"""The engine: what carries the sans-I/O protocol of :mod:`idempo._core` out against a store.

- :mod:`.drivers`: ``drive_sync`` / ``drive_async`` run a step generator,
  carrying out each command it yields (a store call, a sleep, the front's
  own I/O) and sending the result back: the only code that differs between
  the blocking and the async fronts. Also the one store call that settles a
  record (``settle_once_sync`` / ``settle_once_async``).
- :mod:`.begin`: what a request does before its handler runs: the first
  ``begin``, the legacy lookup, waiting for a running duplicate (wait rooms),
  holding a taken-over key.
- :mod:`.admission`: the server secret, the request's identity, ``begin``,
  and the one fail-open decision when the store fails.
- :mod:`.lease`: lease renewal while the handler runs, and the retries of a
  save the store refused.
- :mod:`.execution`: one executing request's lease, settled exactly once.
- :mod:`.calls`: :class:`~idempo._engine.calls.Engine`, the protocol of
  ``@idempotent`` and the consumers.
"""
