"""Named fault points: where a crash test (or ``idempo demo --kill-workers``) makes a process fail.

A transactional execution passes through four moments whose failure the outcome
table of TRANSACTIONAL.md answers differently: ``after-claim`` (``begin`` has
committed the lease, the handler has not run), ``before-commit`` (the handler's
writes and the record's ``complete`` are in the open transaction),
``after-commit`` (COMMIT returned, nothing sent yet) and ``before-send`` (the
response is about to leave). The engine calls :func:`reach` at each; when the
point is armed, the action runs:

- ``kill``: the process sends itself SIGKILL (no ``finally``, no atexit: a crash);
- ``drop-connection``: the database connection passed to :func:`reach` is cut
  at the socket (PostgreSQL) or closed (SQLite), so the next statement fails as
  if the network had dropped it;
- ``raise``: :class:`InjectedFault` is raised.

Points are armed from the ``IDEMPO_FAULTS`` environment variable when this
module is first imported (``IDEMPO_FAULTS="before-commit=kill"``, several
separated by commas) or by :func:`arm`. When nothing is armed, :func:`reach`
is one dict lookup.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Mapping

__all__ = ["ACTIONS", "ENV", "POINTS", "InjectedFault", "arm", "armed", "reach"]

ENV = "IDEMPO_FAULTS"
"""The environment variable read at import: ``point=action[,point=action...]``."""

POINTS = ("after-claim", "before-commit", "after-commit", "before-send")
"""The fault points, in the order an execution reaches them."""

ACTIONS = ("kill", "drop-connection", "raise")
"""What an armed point does."""


class InjectedFault(Exception):
    """Raised by :func:`reach` at a point armed with ``raise``.

    Args:
        point: The fault point that raised (one of :data:`POINTS`).
    """

    def __init__(self, point: str) -> None:
        super().__init__(f"fault injected at {point!r} ({ENV})")
        self.point = point


def _parse(spec: str) -> dict[str, str]:
    armed: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        point, sep, action = item.partition("=")
        point, action = point.strip(), action.strip()
        if not sep or point not in POINTS or action not in ACTIONS:
            raise ValueError(
                f"{ENV}: {item!r} is not point=action (points: {', '.join(POINTS)}; actions: {', '.join(ACTIONS)})"
            )
        armed[point] = action
    return armed


_armed: dict[str, str] = _parse(os.environ.get(ENV, ""))


def arm(spec: str | Mapping[str, str] | None) -> None:
    """Arm fault points for this process, replacing what was armed.

    Args:
        spec: ``"point=action,..."`` as in ``IDEMPO_FAULTS``, a mapping of point
            to action, or None (or ``""``) to disarm every point.

    Raises:
        ValueError: A point or an action is not one of :data:`POINTS` / :data:`ACTIONS`.
    """
    global _armed
    if spec is None or isinstance(spec, str):
        _armed = _parse(spec or "")
    else:
        _armed = _parse(",".join(f"{p}={a}" for p, a in spec.items()))


def armed() -> dict[str, str]:
    """Return a copy of the armed points: point -> action."""
    return dict(_armed)


def reach(point: str, connection: object | None = None) -> None:
    """Mark that an execution reached ``point``; if it is armed, fail there.

    Args:
        point: One of :data:`POINTS`.
        connection: The database connection of the transaction, for
            ``drop-connection``: a psycopg connection (its socket is shut down),
            or anything with ``close()`` (a sqlite3 connection is closed).

    Raises:
        InjectedFault: The point is armed with ``raise`` (or with
            ``drop-connection`` and no connection was given).
    """
    action = _armed.get(point)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "drop-connection" and connection is not None:
        _drop(connection)
        return
    raise InjectedFault(point)


def _drop(connection: object) -> None:
    # psycopg (sync or async): shut the socket down under libpq, so the server
    # sees the connection go and the next statement fails with OperationalError.
    pgconn = getattr(connection, "pgconn", None)
    if pgconn is not None:
        fd = pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        return
    # SQLAlchemy connections and sessions: reach the DBAPI connection underneath.
    for attribute in ("driver_connection", "dbapi_connection", "connection"):
        inner = getattr(connection, attribute, None)
        if inner is not None and inner is not connection:
            _drop(inner)
            return
    close = getattr(connection, "close", None)
    if callable(close):
        close()
