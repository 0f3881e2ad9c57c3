"""`fleet user forget|export` (erasure and data-access requests) and `fleet retention
scrub-archives` (tombstones applied to archives already written)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from db import tenancy
from db.session import get_engine, session_scope
from workers.cli.context import ensure_servers, err, out
from workers.cli.output import print_json
from workers.cli.workspaces import current_name
from workers.privacy import erasure
from workers.privacy.archives import ArchiveError, scrub_archives
from workers.privacy.erasure import AmbiguousUser, Erasure, NothingFound
from workers.privacy.tombstones import ErasedUsers, UnknownWorkspace

app = typer.Typer(help="A user's personal data: erase it (forget) or write it out (export).",
                  no_args_is_help=True)
WHO = typer.Argument(..., help="the user's email, id, or external id (attributes.external_id)")


def _refused(exc: Exception, code: int) -> typer.Exit:
    err.print(f"[red]{escape(str(exc))}[/]", soft_wrap=True)
    return typer.Exit(code)


def _erasure_json(done: Erasure) -> dict[str, Any]:
    how = {t.name: t.how for t in erasure.REGISTRY}
    return {
        "workspace": done.workspace, "user_found": done.user_found,
        "already_erased": done.already_erased, "cancelled_executions": done.cancelled,
        "tombstone": {"id": done.tombstone.id, "user_ref": done.tombstone.user_ref,
                      "erased_at": done.tombstone.erased_at,
                      "requested_by": done.tombstone.requested_by},
        "tables": [{"table": t, "rows": n, "how": how[t]} for t, n in done.counts.items()],
    }


def _confirm(who: str) -> None:
    """Show what would go and ask; without a terminal, refuse (exit 2) unless --yes was given."""
    with session_scope() as session:  # in the global --workspace, as the erasure after it
        _, found, counts = erasure.preview(session, who)
    rows = {t: n for t, n in counts.items() if n}
    err.print(f"{'the user' if found else 'no user, but rows mentioning'} {escape(who)}: "
              + (", ".join(f"{t} {n}" for t, n in rows.items()) or "nothing found"))
    if not sys.stdin.isatty():
        err.print("not a terminal: pass --yes to erase")
        raise typer.Exit(2)
    if not typer.confirm("erase all of it, for good?", err=True):
        raise typer.Exit(1)


@app.command()
def forget(
    who: str = WHO,
    yes: bool = typer.Option(False, "--yes", help="erase without asking"),
    requested_by: str | None = typer.Option(
        None, "--by", help="who asked for it, kept in the tombstone (default: the OS user)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Erase a user's personal data everywhere the fleet keeps it, and record a tombstone.

    The user of the workspace `fleet --workspace` names (default: the default one).

    Their active executions are cancelled first. The user row, their executions and
    everything under them, memberships, consents, messages, suppressions of their
    address, and the dead letters and outbox events that mention them are deleted; their
    audit and trigger-log rows keep type, stage and times, with no data and no user.
    Running it again is harmless: it erases what arrived since and keeps one tombstone.
    """
    ensure_servers(broker=False)
    try:
        if not yes:
            _confirm(who)
        done = erasure.forget_user(who, requested_by=requested_by, workspace=current_name())
    except NothingFound as exc:
        raise _refused(exc, 1) from None
    except UnknownWorkspace as exc:
        raise _refused(exc, 1) from None
    except AmbiguousUser as exc:
        raise _refused(exc, 2) from None
    if as_json:
        print_json(_erasure_json(done))
        return
    table = Table("table", "rows", "what erasure does",
                  title=f"erased (tombstone {done.tombstone.id})")
    for name, count in done.counts.items():
        how = next(t.how for t in erasure.REGISTRY if t.name == name)
        table.add_row(name, str(count), how)
    out.print(table)
    if done.cancelled:
        out.print(f"{done.cancelled} active executions cancelled first")
    if done.already_erased:
        out.print(f"already erased on {done.tombstone.erased_at.isoformat()}: this run found "
                  f"{sum(done.counts.values())} rows more", markup=False, highlight=False)


@app.command()
def export(
    who: str = WHO,
    out_file: Path | None = typer.Option(None, "--out", dir_okay=False,
                                         help="write here (mode 0600) instead of stdout"),
) -> None:
    """Write everything the fleet keeps about a user as one JSON document (a data-access request).

    The user of the workspace `fleet --workspace` names (default: the default one).

    Every table that can hold their data, times ISO 8601 in UTC, bytes in base64.
    """
    ensure_servers(broker=False)
    try:
        with session_scope() as session:
            document = erasure.export(session, who, workspace=current_name())
    except NothingFound as exc:
        raise _refused(exc, 1) from None
    except AmbiguousUser as exc:
        raise _refused(exc, 2) from None
    body = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    rows = sum(len(r) for r in document["tables"].values())
    if out_file is None:
        typer.echo(body, nl=False)
        return
    descriptor = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(body)
    err.print(f"{rows} rows of {len(document['tables'])} tables written to {out_file}",
              markup=False, highlight=False)


def scrub_archives_command(
    directory: Path | None = typer.Argument(
        None, file_okay=False, help="the archives' folder (default: FLEET_ARCHIVE_DIR, else "
                                    "FLEET_HOME/archive)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Apply the erasure tombstones to archives already written (before one is restored).

    Erased users' rows are scrubbed as in the database; the manifests are updated.
    """
    settings = ensure_servers(broker=False)
    folder = directory or settings.archive_dir or settings.home / "archive"
    # Archives hold every workspace's rows: every workspace's tombstones apply.
    with tenancy.all_workspaces(), get_engine().connect() as conn:
        erased = ErasedUsers.load(conn)
    try:
        done = scrub_archives(folder, erased) if folder.is_dir() else []
    except ArchiveError as exc:
        raise _refused(exc, 1) from None
    if as_json:
        print_json([{"archive": str(d.archive), "partition": d.partition, "rows": d.rows,
                     "scrubbed": d.scrubbed} for d in done])
        return
    table = Table("partition", "rows", "scrubbed", title=f"archives in {folder} "
                  f"({erased.tombstones} tombstones)")
    for d in done:
        table.add_row(d.partition, str(d.rows), str(d.scrubbed))
    out.print(table)
