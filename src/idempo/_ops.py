"""``idempo inspect``, ``idempo stats`` and ``idempo purge``: look into any store, and keep it tidy.

Each takes ``--store URL`` (or ``$IDEMPO_STORE``), the same URLs the
middleware takes, and ``--json`` for scripts. They use the blocking store
front. Times are shown as UTC dates with seconds remaining: ``stats``
measures them by the store's clock, ``inspect`` by this machine's.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._core.keys import make_record_key, parse_key_value, principal_from_credentials
from ._core.records import Record, RecordState, StoreStats
from .exceptions import ConfigurationError, IdempoError, InvalidKey, StoreError
from .stores import store_from_url
from .typing import Store, SupportsStats

__all__ = ["inspect", "purge", "stats"]

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


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _open(url: str) -> Store:
    try:
        return store_from_url(url)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from exc
    except StoreError as exc:
        raise click.ClickException(f"cannot open the store at {_redacted(url)}: {exc}") from exc


def _date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _seconds(ms: int) -> float:
    return round(ms / 1000, 3)


def _console() -> Console:
    # Never wrap a record key or a date, even on an 80-column pipe.
    return Console(highlight=False, soft_wrap=True)


# --- idempo inspect ----------------------------------------------------------------------


@click.command()
@click.argument("key", required=False)
@_store_option
@click.option("--record-key", help="The record key itself (32 hex characters, the idempo_record_key log field).")
@click.option(
    "--principal",
    help="Who sent the request, as the principal resolver returns it (a tenant or user id; 'addr:10.0.0.7' for an "
    "anonymous client under the default resolver).",
)
@click.option(
    "--authorization",
    metavar="VALUE",
    help="The request's Authorization header: the principal is its hash, as the default resolver computes it.",
)
@click.option("--method", default="POST", show_default=True, help="The request method (the decorator: its scope name).")
@click.option("--path", help="The request path the key was sent to, e.g. /payments.")
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
    method: str,
    path: str | None,
    body_bytes: int,
    as_json: bool,
) -> None:
    """Show the record an idempotency KEY has in the store: state, lease, stored response.

    The record key is computed from the key's scope (--principal or
    --authorization, --method, --path) as the middleware computes it, or given
    with --record-key. Exits 1 when there is no live record.
    """
    if record_key is None:
        record_key = _record_key(key, principal, authorization, method, path)
    store = _open(url)
    try:
        record = store.get(record_key)
    except IdempoError as exc:
        raise click.ClickException(f"the store failed: {exc}") from exc
    finally:
        store.close()
    now_ms = int(time.time() * 1000)
    if record is None:
        if as_json:
            click.echo(json.dumps({"record_key": record_key, "found": False}))
        else:
            click.echo(f"no live record {record_key} (never created, released, or expired)")
        raise click.exceptions.Exit(1)
    document = _record_document(record, now_ms, body_bytes)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        _print_record(document)


def _record_key(
    key: str | None, principal: str | None, authorization: str | None, method: str, path: str | None
) -> str:
    if key is None or path is None or (principal is None) == (authorization is None):
        raise click.UsageError("give KEY with --path and one of --principal / --authorization, or give --record-key")
    try:
        # The key as the client sent it: a bare value or the draft's "sf-string".
        parsed = parse_key_value(key.encode("latin-1"))
    except (InvalidKey, UnicodeEncodeError) as exc:
        raise click.BadParameter(str(exc), param_hint="KEY") from exc
    if principal is None:
        assert authorization is not None
        principal = principal_from_credentials(authorization.encode("latin-1"))
    return make_record_key(principal, method.upper(), path, parsed)


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
        "response": None,
    }
    response = record.response
    if response is not None:
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
    response = document["response"]
    if response is not None:
        table.add_row("status", str(response["status"]))
        headers = "\n".join(f"{name}: {value}" for name, value in response["headers"]) or "(none)"
        table.add_row("headers", escape(headers))
        more = ", preview" + (" truncated" if response["body_truncated"] else "")
        table.add_row("body", f"{response['body_size']} bytes{more}:\n" + escape(response["body_preview"]))
    _console().print(table)


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
    store = _open(url)
    try:
        if not isinstance(store, SupportsStats):
            raise click.ClickException(f"the {urlsplit(url).scheme}:// store cannot count its records")
        try:
            counted = store.stats()
        except IdempoError as exc:
            raise click.ClickException(f"the store failed: {exc}") from exc
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
    store = _open(url)
    purged = batches = 0
    started = time.monotonic()
    try:
        total = None
        if isinstance(store, SupportsStats):
            try:
                total = store.stats().expired
            except IdempoError as exc:
                raise click.ClickException(f"the store failed: {exc}") from exc
        console = Console(stderr=True, highlight=False)
        columns = (TextColumn("purging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, disable=as_json or not console.is_terminal) as progress:
            task = progress.add_task("purge", total=total)
            while True:
                try:
                    deleted = store.purge_expired(batch)
                except IdempoError as exc:
                    raise click.ClickException(f"the store failed after {purged} records were purged: {exc}") from exc
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
