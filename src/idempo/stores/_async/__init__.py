"""The stores' I/O written once, async: the source ``stores/_sync/`` is generated from (``scripts/unasync``).

:mod:`.postgres`: ``AsyncPostgresStore``, its transactor on the application's
pool and its store on a SQLAlchemy engine.

Edit it, then run ``.venv/bin/python scripts/unasync``; never edit
``stores/_sync/`` by hand (``scripts/unasync --check``, run by
``scripts/test``, fails when the two differ).
"""
