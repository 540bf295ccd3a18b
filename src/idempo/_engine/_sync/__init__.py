"""The engine's blocking I/O, generated from ``_engine/_async/`` by ``scripts/unasync``: do not edit.

:mod:`.drivers`: ``drive_sync`` runs a step generator against a blocking
store, and ``TransactionalExecution`` is the execution of a leased request.
:mod:`.store`: ``settle_once_sync``, the one store call that settles a record.
"""
