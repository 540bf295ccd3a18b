"""What every store shares: the SQL loader, the row codec and error mapping."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

from .._core.records import Record, RecordState, StoredResponse, decode_headers
from ..exceptions import StoreError, StoreUnavailable

__all__ = ["load_queries", "load_sql", "map_errors", "record_from_row"]

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


def record_from_row(record_key: str, row: tuple[Any, ...]) -> Record:
    """Build a Record from a row ``(state, fingerprint, token, lease_expires_at,
    created_at, expires_at, status, headers, body)``; SQL stores select in this order.
    """
    state, fingerprint, token, lease_expires_at, created_at, expires_at, status, headers, body = row
    response = None
    if state == RecordState.COMPLETED.value:
        response = StoredResponse(int(status), decode_headers(headers), bytes(body))
    return Record(
        record_key,
        RecordState(state),
        fingerprint,
        int(token),
        int(lease_expires_at),
        int(created_at),
        int(expires_at),
        response,
    )


@contextmanager
def map_errors(unavailable: tuple[type[BaseException], ...], failed: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Re-raise a backend's exceptions as idempo's, keeping the original as ``__cause__``.

    Args:
        unavailable: exception classes meaning the store could not be reached.
        failed: exception classes meaning any other store failure.
    """
    try:
        yield
    except unavailable as exc:
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
    except failed as exc:
        raise StoreError(f"{type(exc).__name__}: {exc}") from exc
