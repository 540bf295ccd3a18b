"""The statement guard on a psycopg connection idempo's transaction holds (transactional mode).

While a transactional handler runs, its connection's ``cursor_factory`` is a subclass of the
connection's own with :class:`_GuardedCursor` mixed in, so that ``Connection.execute()`` and a cursor's
``execute()``, ``executemany()`` and ``stream()`` refuse a statement that would end idempo's
transaction before it is sent, and the connection's own ``commit()`` and ``rollback()`` refuse too
(:class:`~idempo.exceptions.TransactionControlled`, remembered like a refused statement, where psycopg
alone raised a ``ProgrammingError`` that left the key to be released). Used by ``stores.postgres``
(``from_pool``) and ``idempo.django`` (Django's own psycopg 3 connection). libpq itself
(``conn.pgconn.exec_``) is past it.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

from psycopg import sql

from ..exceptions import TransactionControlled
from ._base import ending_statement

__all__ = ["check_statement", "guard", "guarded_cursor", "unguard"]

#: Why a connection's guard refused a statement, kept for the transactor's ``ended`` (the handler may
#: have caught the error: the request is answered as for a transaction it ended all the same).
_REFUSALS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _query_text(query: Any, conn: Any) -> str:
    """The text of a psycopg query: a str, bytes, a ``sql.Composable``, or a Template (Python 3.14)."""
    if isinstance(query, str):
        return query
    if isinstance(query, bytes | bytearray | memoryview):
        return bytes(query).decode("utf-8", "replace")
    if isinstance(query, sql.Composable):
        return query.as_string(conn)
    strings = getattr(query, "strings", None)
    return "".join(strings) if isinstance(strings, tuple) else ""


def check_statement(conn: Any, query: Any) -> None:
    """Refuse a statement that would end the transaction idempo holds on ``conn``.

    A ``COMMIT``, ``END``, ``ROLLBACK`` (not ``ROLLBACK TO``), ``ABORT`` or
    ``PREPARE TRANSACTION``, however written (see :func:`idempo.stores._base.ending_statement`):
    it would commit the handler's writes before the record's completion (DESIGN
    "transactional route"), so a kill before the handler returned meant a second execution.

    Raises:
        TransactionControlled: the statement is one of them; nothing was sent.
    """
    head = ending_statement(_query_text(query, conn))
    if head is not None:
        _REFUSALS[conn] = f"it tried a {head} statement through tx.connection, refused before it ran"
        raise TransactionControlled(
            f"a {head} statement would end idempo's transaction before the record's completion, refused "
            "(transactional mode: idempo commits the handler's writes with the record once the handler "
            "returned). Use tx.connection.transaction() (a savepoint) for a partial rollback, and raise to "
            "roll everything back"
        )


class _GuardedCursor:
    """A cursor of a connection idempo's transaction holds: ``execute``, ``executemany`` and
    ``stream`` check the statement (:func:`check_statement`) before the cursor's own run it.

    Mixed in before the connection's own cursor class (:func:`guarded_cursor`); the same
    methods serve psycopg's blocking and async cursors (the call returns what the cursor's
    own returns: a coroutine or an async generator on an ``AsyncCursor``).
    """

    connection: Any

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        check_statement(self.connection, query)
        return super().execute(query, params, **kwargs)  # type: ignore[misc]

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> Any:
        check_statement(self.connection, query)
        return super().executemany(query, params_seq, **kwargs)  # type: ignore[misc]

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        check_statement(self.connection, query)
        return super().stream(query, params, **kwargs)  # type: ignore[misc]


@functools.lru_cache(maxsize=32)
def guarded_cursor(factory: type[Any]) -> type[Any]:
    """``factory`` (a psycopg cursor class: the connection's ``cursor_factory``) with the guard mixed in."""
    if issubclass(factory, _GuardedCursor):
        return factory
    return type(f"Guarded{factory.__name__}", (_GuardedCursor, factory), {})


#: The connection methods that end its transaction, shadowed on the instance while the guard is on.
_ENDING_METHODS = ("commit", "rollback")


def _refusing(conn: Any, name: str) -> Callable[..., Any]:
    """``conn.<name>()`` while the guard is on: remember the attempt and raise, sending nothing.

    Holds ``conn`` weakly: the function is kept in the connection's own ``__dict__``.
    """
    ref = weakref.ref(conn)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        target = ref()
        if target is not None:
            _REFUSALS[target] = f"it tried {name}() through tx.connection, refused before it ran"
        raise TransactionControlled(
            f"{name}() would end idempo's transaction before the record's completion, refused (transactional "
            "mode: idempo commits the handler's writes with the record once the handler returned). Use "
            "tx.connection.transaction() (a savepoint) for a partial rollback, and raise to roll everything back"
        )

    return refuse


def guard(conn: Any) -> Any:
    """Put the guard on ``conn`` (its cursors, its ``execute``, its ``commit()`` and ``rollback()``); return the
    factory to restore."""
    factory = conn.cursor_factory
    conn.cursor_factory = guarded_cursor(factory)
    attributes = getattr(conn, "__dict__", None)
    if attributes is not None:  # a connection class without a __dict__ keeps psycopg's own refusal
        for name in _ENDING_METHODS:
            attributes[name] = _refusing(conn, name)
    return factory


def unguard(conn: Any, factory: Any) -> str | None:
    """Take the guard off ``conn`` (``factory``: what :func:`guard` returned); why it refused a statement or a
    ``commit()`` / ``rollback()``, or None."""
    if conn.cursor_factory is not factory:
        conn.cursor_factory = factory
    attributes = getattr(conn, "__dict__", None)
    if attributes is not None:
        for name in _ENDING_METHODS:
            attributes.pop(name, None)
    return _REFUSALS.pop(conn, None)
