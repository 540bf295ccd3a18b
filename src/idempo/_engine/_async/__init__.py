"""The engine's I/O, written once, async: the source ``_engine/_sync/`` is generated from (``scripts/unasync``).

:mod:`.drivers`: ``drive_async`` runs a step generator against a store, and
``AsyncTransactionalExecution`` is the execution of a leased request (whose
transaction's commit path the same driver carries out). :mod:`.store`:
``settle_once_async``, the one store call that settles a record.

Edit it, then run ``.venv/bin/python scripts/unasync``; never edit
``_engine/_sync/`` by hand (``scripts/unasync --check``, run by
``scripts/test``, fails when the two differ).
"""
