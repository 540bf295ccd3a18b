"""The stores' blocking I/O, generated from ``stores/_async/`` by ``scripts/unasync``: do not edit.

:mod:`.postgres`: ``PostgresStore``, its transactor on the application's pool
and its store on a SQLAlchemy engine.
"""
