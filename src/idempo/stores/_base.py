"""What every store shares: the SQL loader, the row codec, error mapping, call deadlines and start-up.

Deadlines (DESIGN "Stores"): every call of a network store has one deadline,
connect, pool wait and query together, :data:`DEFAULT_DEADLINE` seconds
unless the store is given ``deadline=`` (or ``?deadline=`` in its URL). Past
it the call raises :class:`~idempo.exceptions.StoreUnavailable`, which the
fronts answer with 503 and ``Retry-After``.

Open and close (one rule for every store, blocking and async alike):
building a store checks its arguments and does no I/O. ``open()`` (``await
store.open()`` on an async store) makes the start-up check: it connects on a
connection of its own and checks what the store needs there (PostgreSQL: the
server and the schema version; Redis: a ``PING``, a cluster's slot map;
SQLite: the file and its schema); once it succeeded, calling it again does
nothing. A store that
was not opened opens on its first call, within that call's deadline. The
fronts open their store at start-up (the ASGI middleware at lifespan
start-up, the blocking fronts when built: :func:`open_at_startup`).
``close()`` / ``aclose()`` releases the store's connections; calling it again
is harmless, and any other call on a closed store raises
:class:`~idempo.exceptions.StoreError` (:func:`closed`).

Start-up: a store that cannot be reached when the application starts logs
one warning (:func:`warn_unreachable_at_startup`) and the application starts
anyway, answering 503 until the store is back, so a store blip cannot stop a
deploy. A store that is reached but refuses the configuration (a wrong
password or role, a missing database or schema, a host name that does not
resolve, an SQLite file that cannot be created) raises
:class:`~idempo.exceptions.ConfigurationError` with one line naming the
cause and the fix, which fails the start-up.
"""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
from collections.abc import Awaitable, Sequence
from datetime import timedelta
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .._core.records import Record, RecordState, StoredResponse, decode_headers
from ..exceptions import ConfigurationError, StoreError, StoreUnavailable
from ..observability._observation import logger

__all__ = [
    "DEFAULT_DEADLINE",
    "IN_PROGRESS_GRACE",
    "ErrorMap",
    "cannot_use",
    "closed",
    "deadline_seconds",
    "ending_statement",
    "load_queries",
    "load_sql",
    "map_errors",
    "misconfigured",
    "open_at_startup",
    "past_deadline",
    "record_from_row",
    "redact_url",
    "sqlite_kind",
    "warn_unreachable_at_startup",
    "within_deadline",
]

#: Seconds an in-progress record outlives its lease before any store deletes it
#: (purge, the memory store's eviction, Redis key expiry): 24 h, the default
#: ``record_ttl``. A process holding a result whose save failed renews and
#: retries until the store is back; while nobody took the lease over, its
#: same-token renewal and save still land then, however long the outage was
#: within this grace (DESIGN "HTTP behaviour", a failed save). A takeover
#: still happens at the lease's expiry: only the deletion waits. Set a store's
#: ``grace`` (memory, Redis) at least to the longest record_ttl it serves.
IN_PROGRESS_GRACE = 86400.0

#: Seconds one call of a network store (PostgreSQL, Redis) may take by
#: default, connect, pool wait and query together. A healthy call takes about
#: a millisecond and stays under 100 ms at the bench's load, so 2 s passes
#: every slow moment short of an outage (a checkpoint, a failover's first
#: connect) while a client whose own timeout is 5 s or more still gets the
#: 503 and its Retry-After rather than timing out itself.
DEFAULT_DEADLINE = 2.0

_T = TypeVar("_T")

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


def deadline_seconds(value: float | timedelta | str, name: str = "deadline") -> float:
    """Read a deadline (seconds as a number or a string, or a timedelta) as float seconds.

    Raises:
        ConfigurationError: the value is not a finite number of seconds > 0.
    """
    try:
        seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigurationError(f"{name} must be a number of seconds > 0, got {value!r}")
    return seconds


def past_deadline(deadline: float) -> StoreUnavailable:
    """The error of a call that found no answer within its deadline (seconds)."""
    return StoreUnavailable(f"no answer from the store within the {deadline:g} s deadline")


async def within_deadline(deadline: float, call: Awaitable[_T]) -> _T:
    """Await ``call``, cancelled after ``deadline`` seconds.

    For async drivers whose own timeouts do not cover a whole call (redis-py's
    socket timeout bounds one read; a retry or a pool wait adds to it). Those
    drivers need asyncio, so the deadline is asyncio's own
    (``asyncio.timeout``: one timer), not an anyio cancel scope, which costs a
    call its async-backend lookup and task bookkeeping besides the timer.

    Raises:
        StoreUnavailable: the deadline passed (the driver's call was cancelled).
    """
    try:
        async with asyncio.timeout(deadline):
            return await call
    except TimeoutError as exc:
        raise past_deadline(deadline) from exc


def redact_url(url: str) -> str:
    """The store URL with its password replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def warn_unreachable_at_startup(url: str, exc: BaseException) -> None:
    """Log the one warning of a store found unreachable at start-up (the application starts anyway)."""
    logger.warning(
        "idempo: the store at %s cannot be reached at start-up (%s); starting anyway, "
        "requests with a key are answered 503 until it is back",
        redact_url(url),
        " ".join(str(exc).split()),
        extra={"idempo_event": "store_unreachable_at_startup"},
    )


def misconfigured(url: str, cause: str, fix: str) -> ConfigurationError:
    """A one-line ConfigurationError naming the store (password masked), the cause and the fix."""
    return ConfigurationError(cannot_use(url, f"{cause}; {fix}"))


def cannot_use(url: str, cause: BaseException | str) -> str:
    """The one wording of a command that cannot use a store, on one line.

    ``cannot use the store at <URL, password masked>: <cause>``; a cause that
    already says so (a :func:`misconfigured` error) is returned as it is.
    """
    text = " ".join(str(cause).split())
    if text.startswith("cannot use the store at "):
        return text
    return f"cannot use the store at {redact_url(url)}: {text}"


def closed(url: str) -> StoreError:
    """The error of a call on a store that was closed (the store's URL, password masked)."""
    return StoreError(f"the store at {redact_url(url)} is closed")


def open_at_startup(store: object, url: str | None = None) -> None:
    """Open a blocking store at start-up, as a front does when it is built (see the module docstring).

    Calls ``store.open()`` where the store has one. An unreachable store is
    one warning (:func:`warn_unreachable_at_startup`) and the start-up goes
    on; its calls answer StoreUnavailable until it is back.

    Args:
        store: the store (any object; one without ``open`` is left as it is).
        url: the URL to name in the warning (default: the store's ``url``).

    Raises:
        ConfigurationError: the store refuses the configuration (one line,
            the cause and the fix).
        StoreError: the store failed otherwise.
    """
    open_ = getattr(store, "open", None)
    if open_ is None:
        return
    try:
        open_()
    except StoreUnavailable as exc:
        warn_unreachable_at_startup(url or str(getattr(store, "url", type(store).__name__)), exc)


# --- statements that end a transaction (transactional mode's guards) ---------------------

# Statements that end the transaction they run in (PostgreSQL and SQLite): COMMIT, END, ROLLBACK
# (but not ROLLBACK TO, a savepoint's partial rollback), ABORT, PREPARE TRANSACTION (two-phase
# commit's first phase: the transaction leaves the session). BEGIN / START TRANSACTION inside a
# transaction end nothing (PostgreSQL warns, SQLite fails).
_ENDING = frozenset({"COMMIT", "END", "ROLLBACK", "ABORT", "PREPARE"})
# Whitespace and SQL comments before a statement's first keyword.
_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$))*", re.DOTALL)
_COMMENT = re.compile(r"--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$)", re.DOTALL)
_WORD = re.compile(r"\w+")
# What a ';' inside does not end: string literals (E'...' with backslash escapes), quoted names,
# comments, dollar quotes ($$...$$, $tag$...$tag$; not $1, a parameter); and the ';' that does.
_SPLIT = re.compile(
    r"(?<!\w)[eE]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/"
    r"|\$(?:[A-Za-z_]\w*)?\$|;",
    re.DOTALL,
)


def _ending_head(statement: str) -> str | None:
    """The keyword of one statement if it ends the transaction (``ROLLBACK TO`` does not), else None."""
    rest = statement[_LEADING.match(statement).end() :]  # type: ignore[union-attr]  # matches the empty string
    words = _WORD.match(rest)
    head = words.group().upper() if words else ""
    if head not in _ENDING:
        return None
    if head in ("ROLLBACK", "PREPARE"):
        following = [w.upper() for w in _WORD.findall(_COMMENT.sub(" ", rest))[1:3]]
        if head == "PREPARE":
            return "PREPARE TRANSACTION" if following[:1] == ["TRANSACTION"] else None
        if following[:1] == ["TO"] or (following[:1] in (["TRANSACTION"], ["WORK"]) and following[1:] == ["TO"]):
            return None
    return head


def ending_statement(sql: str) -> str | None:
    """The keyword of the first statement in ``sql`` that ends the transaction, or None.

    ``sql`` may hold several statements (psycopg runs them when no parameters
    are passed): each one after a ``;`` outside a string, a quoted name, a
    comment or a dollar quote is read too. A dollar-quoted body (a ``DO`` block)
    is skipped whole: PostgreSQL refuses a COMMIT there inside a transaction block.
    """
    head = _ending_head(sql)
    if head is not None or ";" not in sql:
        return head
    pos = 0
    while (match := _SPLIT.search(sql, pos)) is not None:
        token = match.group()
        if token == ";":
            head = _ending_head(sql[match.end() :])
            if head is not None:
                return head
            pos = match.end()
        elif token.startswith("$"):
            close = sql.find(token, match.end())  # the dollar quote's end
            pos = len(sql) if close < 0 else close + len(token)
        else:
            pos = match.end()
    return None


def sqlite_kind(exc: BaseException) -> str:
    """A SQLite failure's kind for :mod:`idempo._engine.transaction` (the sqlite3 driver's, through the SQLite
    store or a SQLAlchemy engine): ``conflict`` (the database is busy or locked: run again), ``lost`` (the
    connection was closed) or ``failed``."""
    if isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    ):
        return "conflict"
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc):
        return "lost"
    return "failed"
