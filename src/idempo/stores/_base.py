"""What every store shares: the SQL loader, the row codec and error mapping."""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

from .._core.records import Record, RecordState, StoredResponse, decode_headers
from ..exceptions import StoreError, StoreUnavailable

__all__ = ["ErrorMap", "load_queries", "load_sql", "map_errors", "record_from_row"]

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_sql(dialect: str, filename: str) -> str:
    """Return a ``.sql`` file shipped in ``idempo/stores/sql/<dialect>/``."""
    return resources.files("idempo.stores.sql").joinpath(dialect, filename).read_text(encoding="utf-8")


def load_queries(dialect: str, filename: str = "queries.sql") -> dict[str, str]:
    """Split a ``queries.sql`` file into its ``-- name: <name>`` blocks.

    Returns:
        name -> statement text, comments and trailing ``;`` kept as written.
    """
    text = load_sql(dialect, filename)
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


_STATES = {state.value: state for state in RecordState}


def record_from_row(record_key: str, row: Sequence[Any]) -> Record:
    """Build a Record from a row ``(state, fingerprint, token, lease_expires_at,
    created_at, expires_at, status, headers, body)``; SQL stores select in this order.

    Raises:
        StoreError: the row cannot be read as a record (an unknown state,
            headers that are not the codec's JSON, a non-numeric time). The
            fronts answer it as any store failure (503, the handler not run),
            never with a raw exception (DESIGN guarantee 5).
    """
    try:
        state, fingerprint, token, lease_expires_at, created_at, expires_at, status, headers, body = row
        if isinstance(state, bytes):  # Redis replies carry bytes
            state, fingerprint = state.decode("ascii"), fingerprint.decode("utf-8")
        record_state = _STATES.get(state)
        if record_state is None:
            raise ValueError(f"{state!r} is not a valid RecordState")
        response = None
        if record_state is RecordState.COMPLETED:
            response = StoredResponse(int(status), decode_headers(headers), bytes(body))
        return Record(
            record_key,
            record_state,
            fingerprint,
            int(token),
            int(lease_expires_at),
            int(created_at),
            int(expires_at),
            response,
        )
    except (ValueError, TypeError, KeyError, IndexError, UnicodeError, AttributeError) as exc:
        raise StoreError(f"record {record_key} is unreadable: {type(exc).__name__}: {exc}") from exc


class ErrorMap:
    """A reusable context manager that re-raises a backend's exceptions as idempo's.

    Stateless, so one instance per store module serves every call: cheaper on
    the request path than a generator-based context manager made per call.
    The original exception is kept as ``__cause__``.
    """

    __slots__ = ("failed", "unavailable")

    def __init__(self, unavailable: tuple[type[BaseException], ...], failed: tuple[type[BaseException], ...]) -> None:
        self.unavailable = unavailable
        self.failed = failed

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        # Returns None: an exception is never swallowed, only replaced.
        if exc is None:
            return
        if isinstance(exc, self.unavailable):
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if isinstance(exc, self.failed):
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc


def map_errors(unavailable: tuple[type[BaseException], ...], failed: tuple[type[BaseException], ...]) -> ErrorMap:
    """Re-raise a backend's exceptions as idempo's, keeping the original as ``__cause__``.

    Args:
        unavailable: exception classes meaning the store could not be reached
            (raised as :class:`~idempo.exceptions.StoreUnavailable`).
        failed: exception classes meaning any other store failure
            (:class:`~idempo.exceptions.StoreError`).

    Returns:
        A context manager; it can be kept and reused (see :class:`ErrorMap`).
    """
    return ErrorMap(unavailable, failed)
