"""``idempo inspect``, ``idempo resolve``, ``idempo stats`` and ``idempo purge``: look into any store, and keep it tidy.

Each takes ``--store URL`` (or ``$IDEMPO_STORE``), the same URLs the
middleware takes, and ``--json`` for scripts. They use the blocking store
front. Times are shown as UTC dates with seconds remaining: ``stats``
measures them by the store's clock, ``inspect`` by this machine's.

A store they cannot use ends them with exit status 1 and one line, the same
in every command (and in ``idempo demo`` and ``idempo migrate``): ``cannot
use the store at <URL, password masked>: <cause>``. They only look at a
store, so an SQLite file that does not exist is such a cause: they never
create one.
"""

from __future__ import annotations

import base64
import inspect as _inspect
import json
import logging
import os
import stat
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .._core.digests import Digests
from .._core.keys import parse_key_value
from .._core.records import Marker, Record, RecordState, StoreStats, StoredResponse
from ..exceptions import ConfigurationError, IdempoError, InvalidKey, LeaseLost
from ..observability._observation import logger
from ..principals import credentials
from ..secrets import SECRET_RECORD_KEY, configured_secret, is_reserved
from ..stores._base import cannot_use
from ..stores._url import resolve as resolve_url
from ..typing import Store, SupportsStats

__all__ = ["inspect", "purge", "resolve", "stats"]

_store_option = click.option(
    "--store",
    "url",
    envvar="IDEMPO_STORE",
    required=True,
    metavar="URL",
    help="The store URL, e.g. sqlite:////var/lib/app/idempo.db or postgresql://app@db/app?schema=idempo "
    "(or $IDEMPO_STORE).",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables.")


def open_store(url: str, *, must_exist: bool = True) -> Store:
    """Open the blocking store at ``url`` for a command, checked now (one PING, a schema check).

    Args:
        url: the store URL.
        must_exist: refuse an SQLite file that does not exist rather than create it.

    Raises:
        click.BadParameter: the URL is malformed or its scheme unknown (exit 2).
        click.ClickException: the store cannot be used (exit 1), in the one wording of
            :func:`~idempo.stores._base.cannot_use`: unreachable, misconfigured,
            a missing SQLite file.
    """
    try:
        cls, args = resolve_url(url, 0)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from exc
    path = args.get("path")
    problem = None if path is None or path == ":memory:" else sqlite_file_problem(str(path), must_exist=must_exist)
    if problem is not None:
        raise click.ClickException(cannot_use(url, problem))
    if "check_schema" in _inspect.signature(cls).parameters:
        args["check_schema"] = False  # checked once, by open() below
    store: Store | None = None
    idempo_logger = logger
    level = idempo_logger.level
    # A command reports an unreachable store as its error, not also as the start-up warning.
    idempo_logger.setLevel(logging.ERROR)
    try:
        store = cls(**args)
        open_ = getattr(store, "open", None)
        if open_ is not None:
            open_()
    except IdempoError as exc:
        if store is not None:
            store.close()
        raise click.ClickException(cannot_use(url, exc)) from exc
    finally:
        idempo_logger.setLevel(level)
    assert store is not None
    return store


def sqlite_file_problem(path: str, *, must_exist: bool) -> str | None:
    """Why the SQLite file at ``path`` cannot be opened, in a few words with the fix; None when it can be tried.

    SQLite itself says ``unable to open database file`` for each of these
    causes, so they are told apart here first: a file that does not exist
    (when ``must_exist``), a directory, a permission missing on the file or
    on a directory of its path.
    """
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if must_exist:
            return (
                f"the SQLite file {path} does not exist; check the path (sqlite:///relative.db is relative "
                "to the current directory, sqlite:////absolute.db is absolute)"
            )
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            return f"the directory of the SQLite file {path} does not exist; create it or fix the path"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot create the SQLite file {path}: permission denied on its directory {parent}"
        return None
    except PermissionError:
        return f"the SQLite file {path} cannot be reached: permission denied on a directory of its path"
    except OSError as exc:
        return f"the SQLite file {path} cannot be opened: {exc.strerror or exc}"
    if stat.S_ISDIR(info.st_mode):
        return f"{path} is a directory, not an SQLite file; name a file (sqlite:////var/lib/app/idempo.db)"
    if not os.access(path, os.R_OK | os.W_OK):
        return (
            f"the SQLite file {path} cannot be opened: permission denied (this user needs to read and write it, "
            "and its directory for the -wal and -shm files)"
        )
    return None


def _failed(url: str, exc: IdempoError, after: str = "") -> click.ClickException:
    return click.ClickException(cannot_use(url, f"{exc}{after}"))


def _date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _seconds(ms: int) -> float:
    return round(ms / 1000, 3)


def _console() -> Console:
    # Never wrap a record key or a date, even on an 80-column pipe.
    return Console(highlight=False, soft_wrap=True)


# --- idempo inspect ----------------------------------------------------------------------


def _key_options(command: Any) -> Any:
    """The options that find a record: KEY with its scope, or --record-key (inspect, resolve)."""
    for option in reversed(
        [
            click.argument("key", required=False),
            _store_option,
            click.option(
                "--record-key", help="The record key itself (32 hex characters, the idempo_record_key log field)."
            ),
            click.option(
                "--principal",
                help="Who sent the request, as the principal resolver returns it (a tenant or user id; "
                "'addr:10.0.0.7' for an anonymous client under the default resolver).",
            ),
            click.option(
                "--authorization",
                metavar="VALUE",
                help="The request's Authorization header: the principal is its digest, as the default resolver "
                "computes it for a request without a framework user or session cookie.",
            ),
            click.option(
                "--secret",
                envvar="IDEMPO_SECRET",
                metavar="SECRET",
                help="The server secret the app keys its record keys with (or $IDEMPO_SECRET); without one, the "
                "secret the store keeps.",
            ),
            click.option(
                "--method",
                default="POST",
                show_default=True,
                help="The request method (the decorator: its scope name).",
            ),
            click.option("--path", help="The request path the key was sent to, e.g. /payments."),
        ]
    ):
        command = option(command)
    return command


@click.command()
@_key_options
@click.option(
    "--body-bytes",
    type=click.IntRange(0),
    default=512,
    show_default=True,
    help="Bytes of the stored body to preview.",
)
@_json_option
def inspect(
    key: str | None,
    url: str,
    record_key: str | None,
    principal: str | None,
    authorization: str | None,
    secret: str | None,
    method: str,
    path: str | None,
    body_bytes: int,
    as_json: bool,
) -> None:
    """Show the record an idempotency KEY has in the store: state, lease, stored response.

    The record key is computed from the key's scope (--principal or
    --authorization, --method, --path) as the middleware computes it, or given
    with --record-key. Record keys are keyed with the server secret: --secret
    (or $IDEMPO_SECRET) where the app has one, else the store's own. Exits 1
    when there is no live record.
    """
    configured, scope = _scope(secret, record_key, key, principal, authorization, method, path)
    store = open_store(url)
    try:
        if scope is not None:
            record_key = _record_key(store, configured, scope)
        record = store.get(record_key) if record_key is not None else None
    except IdempoError as exc:
        raise _failed(url, exc) from exc
    finally:
        store.close()
    now_ms = int(time.time() * 1000)
    if record is not None and is_reserved(record.record_key):
        raise click.ClickException(f"{record.record_key!r} is idempo's own record, not a request's")
    if record is None:
        if as_json:
            click.echo(json.dumps({"record_key": record_key, "found": False}))
        elif record_key is None:
            click.echo(
                "no live record found: the store keeps no secret, so an app that made records keys them with "
                "a secret of its own: give it with --secret or $IDEMPO_SECRET"
            )
        else:
            click.echo(_absent(record_key, configured, scope))
        raise click.exceptions.Exit(1)
    document = _record_document(record, now_ms, body_bytes)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        _print_record(document)


Scope = tuple[str, str, str, str]


def _scope(
    secret: str | None,
    record_key: str | None,
    key: str | None,
    principal: str | None,
    authorization: str | None,
    method: str,
    path: str | None,
) -> tuple[bytes | None, Scope | None]:
    """The configured secret, and the (principal, method, path, key) to compute the record key from.

    The scope is None when --record-key names the record.
    """
    try:
        configured = configured_secret(secret)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="--secret") from exc
    if record_key is not None:
        return configured, None
    if key is None or path is None or (principal is None) == (authorization is None):
        raise click.UsageError("give KEY with --path and one of --principal / --authorization, or give --record-key")
    try:
        # The key as the client sent it: a bare value or the draft's "sf-string".
        parsed = parse_key_value(key.encode("latin-1"))
    except (InvalidKey, UnicodeEncodeError) as exc:
        raise click.BadParameter(str(exc), param_hint="KEY") from exc
    if principal is None:
        assert authorization is not None
        principal = credentials({"HTTP_AUTHORIZATION": authorization})
        if principal is None:
            raise click.BadParameter(
                "a placeholder (Bearer null, an empty bearer) carries no identity: such a request is scoped by "
                "its address; pass --principal addr:<ip>",
                param_hint="--authorization",
            )
    return configured, (principal, method.upper(), path, parsed)


def _absent(record_key: str | None, configured: bytes | None, scope: Scope | None) -> str:
    """The line for a record not found; for a record key computed here, which secret computed it.

    A record key computed with another secret than the app's finds nothing,
    which reads like a key never used (a new user's trial set $IDEMPO_SECRET
    for the CLI after starting the app without one).
    """
    line = f"no live record {record_key} (never created, released, or expired"
    if scope is None:
        return line + ")"
    used = "--secret / $IDEMPO_SECRET" if configured is not None else "the secret the store keeps (none was given)"
    return f"{line}; or the app keys its records with another secret: this one was computed with {used})"


def _record_key(store: Store, secret: bytes | None, scope: Scope) -> str | None:
    """The record key of a scope, keyed with ``secret`` or the store's; None when the store holds no secret yet."""
    if secret is None:
        # The store's own secret, read without writing one.
        kept = store.get(SECRET_RECORD_KEY)
        if kept is None:
            return None
        secret = bytes.fromhex(kept.fingerprint.rpartition(":")[2])
    return Digests(secret).record_key(*scope)


def _record_document(record: Record, now_ms: int, body_bytes: int) -> dict[str, Any]:
    in_progress = record.state is RecordState.IN_PROGRESS
    document: dict[str, Any] = {
        "record_key": record.record_key,
        "found": True,
        "state": record.state.value,
        "fingerprint": record.fingerprint,
        "token": record.token,
        "created_at": _date(record.created_at_ms),
        "created_at_ms": record.created_at_ms,
        "age_s": _seconds(now_ms - record.created_at_ms),
        "lease_expires_at": _date(record.lease_expires_at_ms) if in_progress else None,
        "lease_expires_at_ms": record.lease_expires_at_ms if in_progress else None,
        "lease_remaining_s": _seconds(record.lease_expires_at_ms - now_ms) if in_progress else None,
        "expires_at": _date(record.expires_at_ms),
        "expires_at_ms": record.expires_at_ms,
        "expires_in_s": _seconds(record.expires_at_ms - now_ms),
        "held": None,
        "not_replayable": None,
        "response": None,
    }
    response = record.response
    marker = record.marker
    if marker is not None:
        document["held" if marker.kind == Marker.HELD else "not_replayable"] = {
            "reason": marker.reason,
            "first_status": marker.status,
            "first_body_size": marker.size,
        }
    elif response is not None:
        preview = response.body[:body_bytes].decode("utf-8", "replace")
        document["response"] = {
            "status": response.status,
            "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in response.headers],
            "body_size": len(response.body),
            "body_preview": preview,
            "body_truncated": len(response.body) > body_bytes,
            "body_base64": base64.b64encode(response.body).decode("ascii"),
        }
    return document


def _print_record(document: dict[str, Any]) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("record", document["record_key"])
    table.add_row("state", document["state"])
    table.add_row("fingerprint", document["fingerprint"])
    table.add_row("token", str(document["token"]))
    table.add_row("created", f"{document['created_at']} ({document['age_s']:.1f} s ago)")
    if document["lease_expires_at"] is not None:
        remaining = document["lease_remaining_s"]
        when = f"in {remaining:.1f} s" if remaining > 0 else f"{-remaining:.1f} s ago: a new request takes it over"
        table.add_row("lease expires", f"{document['lease_expires_at']} ({when})")
    table.add_row("record expires", f"{document['expires_at']} (in {document['expires_in_s']:.1f} s)")
    for kind, what in (("held", "held"), ("not_replayable", "not replayable")):
        marker = document[kind]
        if marker is not None:
            first = f", first answer {marker['first_status']}" if marker["first_status"] is not None else ""
            table.add_row(what, f"yes: {marker['reason']}{first}")
    response = document["response"]
    if response is not None:
        table.add_row("status", str(response["status"]))
        headers = "\n".join(f"{name}: {value}" for name, value in response["headers"]) or "(none)"
        table.add_row("headers", escape(headers))
        more = ", preview" + (" truncated" if response["body_truncated"] else "")
        table.add_row("body", f"{response['body_size']} bytes{more}:\n" + escape(response["body_preview"]))
    _console().print(table)


# --- idempo resolve ------------------------------------------------------------------------


@click.command()
@_key_options
@click.option("--release", "release", is_flag=True, help="Remove the record: the next request with the key executes.")
@click.option(
    "--complete-with-status",
    "status",
    type=click.IntRange(100, 599),
    help="Complete the record with this status: every retry gets it replayed (with --body, if given).",
)
@click.option("--body", default="", help="The body of the completed answer (UTF-8 text; default empty).")
@click.option("--content-type", default="application/json", show_default=True, help="The content type of --body.")
@click.option(
    "--ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=86400.0,
    show_default=True,
    help="Seconds the completed answer is kept.",
)
def resolve(
    key: str | None,
    url: str,
    record_key: str | None,
    principal: str | None,
    authorization: str | None,
    secret: str | None,
    method: str,
    path: str | None,
    release: bool,
    status: int | None,
    body: str,
    content_type: str,
    ttl: float,
) -> None:
    """End the hold on a KEY whose first outcome is unknown: --release it, or --complete-with-status N.

    A key is held after a HOLD verdict or a takeover under on_takeover="hold"
    (idempo inspect shows it, and why); retries get 409 outcome-unknown until
    it expires. Once you know what the first request did, --release lets the
    next request execute, and --complete-with-status replays that status to
    every retry. A record answering 410 (its answer was not kept) can be
    released the same way. Only such records are changed, and only if they
    still hold the token read (no race with a request). Exits 1 otherwise.
    """
    if release == (status is not None):
        raise click.UsageError("give exactly one of --release and --complete-with-status N")
    configured, scope = _scope(secret, record_key, key, principal, authorization, method, path)
    store = open_store(url)
    try:
        if scope is not None:
            record_key = _record_key(store, configured, scope)
        record = store.get(record_key) if record_key is not None else None
        if record is None or record_key is None:
            click.echo(_absent(record_key, configured, scope))
            raise click.exceptions.Exit(1)
        marker = record.marker
        if marker is None:
            state = "in progress" if record.state is RecordState.IN_PROGRESS else "completed with a stored answer"
            click.echo(f"record {record_key} is not held ({state}); nothing changed")
            raise click.exceptions.Exit(1)
        if release:
            store.release(record_key, record.token)
            click.echo(f"released record {record_key} (was {marker.kind}: {marker.reason}); the next request executes")
            return
        assert status is not None
        data = body.encode("utf-8")
        headers = ((b"content-type", content_type.encode("latin-1")),) if data else ()
        store.complete(record_key, record.token, StoredResponse(status, headers, data), int(ttl * 1000))
        click.echo(f"completed record {record_key} with status {status} (was {marker.kind}: {marker.reason})")
    except LeaseLost as exc:
        raise click.ClickException(
            f"record {record_key} changed meanwhile; nothing changed (inspect it again)"
        ) from exc
    except IdempoError as exc:
        raise _failed(url, exc) from exc
    finally:
        store.close()


# --- idempo stats --------------------------------------------------------------------------


@click.command()
@_store_option
@_json_option
def stats(url: str, as_json: bool) -> None:
    """Count the store's records by state, the expired ones awaiting purge, and show the oldest lease.

    Reads every record (maintenance, not for the request path). A lease much
    older than the slowest handler means a holder that is stuck or crashed;
    see it with `idempo inspect --record-key`.
    """
    store = open_store(url)
    try:
        if not isinstance(store, SupportsStats):
            raise click.ClickException(f"the {urlsplit(url).scheme}:// store cannot count its records")
        try:
            counted = store.stats()
        except IdempoError as exc:
            raise _failed(url, exc) from exc
    finally:
        store.close()
    document = _stats_document(counted)
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("in progress", str(document["in_progress"]))
    table.add_row("completed", str(document["completed"]))
    table.add_row("expired (to purge)", str(document["expired"]))
    table.add_row("total", str(document["total"]))
    oldest = document["oldest_lease"]
    if oldest is None:
        table.add_row("oldest lease", "none")
    else:
        table.add_row("oldest lease", f"{oldest['record_key']}, taken {oldest['age_s']:.1f} s ago")
        table.add_row("", f"expires {oldest['lease_expires_at']} (in {oldest['lease_remaining_s']:.1f} s)")
    table.add_row("store clock", document["now"])
    _console().print(table)


def _stats_document(counted: StoreStats) -> dict[str, Any]:
    now = counted.now_ms
    oldest = counted.oldest_lease
    return {
        "now": _date(now),
        "now_ms": now,
        "in_progress": counted.in_progress,
        "completed": counted.completed,
        "expired": counted.expired,
        "total": counted.in_progress + counted.completed + counted.expired,
        "oldest_lease": None
        if oldest is None
        else {
            "record_key": oldest.record_key,
            "token": oldest.token,
            "created_at": _date(oldest.created_at_ms),
            "created_at_ms": oldest.created_at_ms,
            "age_s": _seconds(now - oldest.created_at_ms),
            "lease_expires_at": _date(oldest.lease_expires_at_ms),
            "lease_expires_at_ms": oldest.lease_expires_at_ms,
            "lease_remaining_s": _seconds(oldest.lease_expires_at_ms - now),
        },
    }


# --- idempo purge --------------------------------------------------------------------------


@click.command()
@_store_option
@click.option(
    "--batch",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Records deleted per store call; each call is one short transaction.",
)
@_json_option
def purge(url: str, batch: int, as_json: bool) -> None:
    """Delete expired records, in batches, until none is left; print how many.

    Expired records already behave as absent; purging reclaims their space.
    Safe while the application runs. Run it periodically (cron, a systemd
    timer): see docs/operating.md.
    """
    store = open_store(url)
    purged = batches = 0
    started = time.monotonic()
    try:
        total = None
        if isinstance(store, SupportsStats):
            try:
                total = store.stats().expired
            except IdempoError as exc:
                raise _failed(url, exc) from exc
        console = Console(stderr=True, highlight=False)
        columns = (TextColumn("purging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, disable=as_json or not console.is_terminal) as progress:
            task = progress.add_task("purge", total=total)
            while True:
                try:
                    deleted = store.purge_expired(batch)
                except IdempoError as exc:
                    raise _failed(url, exc, f" (after {purged} records were purged)") from exc
                purged += deleted
                batches += 1
                if total is not None and purged > total:
                    total = purged  # more expired meanwhile
                progress.update(task, completed=purged, total=total)
                if deleted < batch:
                    break
    finally:
        store.close()
    seconds = round(time.monotonic() - started, 3)
    if as_json:
        click.echo(json.dumps({"purged": purged, "batches": batches, "seconds": seconds}))
    else:
        noun = "record" if purged == 1 else "records"
        click.echo(f"purged {purged} expired {noun} in {batches} batch{'es' if batches != 1 else ''} ({seconds:.1f} s)")
