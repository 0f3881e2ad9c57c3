"""`fleet emit`: send events from the command line or a JSON-lines file."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from workers.cli.context import ensure_servers, err, json_object_option, out
from workers.cli.workspaces import current_name
from workers.events.envelope import InvalidEvent
from workers.settings import get_settings

BATCH = 100


def emit(
    event_type: str = typer.Argument(None, help="e.g. user.signed_up (omit with --file)"),
    user: str = typer.Option(None, "--user", help="user email or UUID"),
    data: str = typer.Option("{}", "--data", help="event data as a JSON object"),
    event_id: str = typer.Option(None, "--event-id", help="idempotency key (UUID)"),
    file: Path = typer.Option(None, "--file", exists=True, dir_okay=False,
                              help="JSON lines, one event envelope per line"),
) -> None:
    """Publish one event, or every line of a JSON-lines file in batches of 100.

    The events go to `fleet --workspace` (lines of the file that name a workspace keep it).
    """
    payload = None if file is not None else json_object_option(data)
    workspace = _producer_workspace()
    ensure_servers()
    # After ensure_servers(): the Celery app reads the broker's URL from the settings when
    # first imported, and an embedded broker's URL is known only now.
    from workers.producer import send_event, send_events

    if file is not None:
        _emit_file(file, send_events, workspace)
        return
    if not event_type or not user:
        raise typer.BadParameter("give EVENT_TYPE and --user, or --file")
    known = _user_id_known(user)
    if known is False:
        err.print(f"[red]no user with id {escape(user)}[/]: events for unknown ids are "
                      "dead-lettered (give the user's email to create one)")
        raise typer.Exit(2)
    try:
        sent = send_event(event_type, user=user, data=payload, event_id=event_id,
                          workspace=workspace)
    except InvalidEvent as exc:
        err.print(f"[red]invalid event:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    out.print(f"sent {sent}", markup=False, highlight=False)
    if known is None:
        err.print(f"could not check user id {escape(user)} (database unreachable): "
                      "if no user has it, the event will be dead-lettered")


def _producer_workspace() -> str | None:
    """The global --workspace for the producer; None where FLEET_WORKSPACE names it already
    (the producer's own default), so a default-workspace envelope stays without the field."""
    name = current_name()
    return None if name == get_settings().workspace else name


def _user_id_known(user: str) -> bool | None:
    """Whether a user with this UUID exists (None: an email, or the database is unreachable).

    An email creates its user; an unknown UUID cannot, so its event is dead-lettered.
    """
    try:
        user_id = uuid.UUID(user)
    except ValueError:
        return True
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from db.models import User
    from db.session import session_scope

    try:
        with session_scope() as session:
            return session.execute(select(User.id).where(User.id == user_id)).first() is not None
    except SQLAlchemyError:
        return None


def _emit_file(path: Path, send_events: Any, workspace: str | None) -> None:
    """Lines go as they are (bad ones are dead-lettered by the workers, never lost)."""
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    sent = unparsable = 0
    batch: list[Any] = []
    columns = (TextColumn("emitting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("emit", total=len(lines))
        for line in lines:
            if not line.strip():
                progress.advance(task)
                continue
            try:
                batch.append(json.loads(line))
            except ValueError:
                unparsable += 1
                batch.append(line)  # the worker dead-letters it with the raw text
            if len(batch) == BATCH:
                sent += send_events(batch, validate=False, workspace=workspace)
                batch = []
            progress.advance(task)
        if batch:
            sent += send_events(batch, validate=False, workspace=workspace)
    out.print(f"sent {sent} events ({unparsable} lines were not JSON and will be dead-lettered)")
