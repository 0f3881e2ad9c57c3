"""`fleet emit`: send events from the command line or a JSON-lines file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from workers.cli.context import console, ensure_servers
from workers.events.envelope import InvalidEvent

BATCH = 100


def emit(
    event_type: str = typer.Argument(None, help="e.g. user.signed_up (omit with --file)"),
    user: str = typer.Option(None, "--user", help="user email or UUID"),
    data: str = typer.Option("{}", "--data", help="event data as a JSON object"),
    event_id: str = typer.Option(None, "--event-id", help="idempotency key (UUID)"),
    file: Path = typer.Option(None, "--file", exists=True, dir_okay=False,
                              help="JSON lines, one event envelope per line"),
) -> None:
    """Publish one event, or every line of a JSON-lines file in batches of 100."""
    ensure_servers()
    # After ensure_servers(): the Celery app reads the broker's URL from the settings when
    # first imported, and an embedded broker's URL is known only now.
    from workers.producer import send_event, send_events

    if file is not None:
        _emit_file(file, send_events)
        return
    if not event_type or not user:
        raise typer.BadParameter("give EVENT_TYPE and --user, or --file")
    try:
        payload = json.loads(data)
        sent = send_event(event_type, user=user, data=payload, event_id=event_id)
    except (ValueError, InvalidEvent) as exc:
        console.print(f"[red]invalid event:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(f"sent {sent}")


def _emit_file(path: Path, send_events: Any) -> None:
    """Lines go as they are (bad ones are dead-lettered by the workers, never lost)."""
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    sent = unparsable = 0
    batch: list[Any] = []
    columns = (TextColumn("emitting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
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
                sent += send_events(batch, validate=False)
                batch = []
            progress.advance(task)
        if batch:
            sent += send_events(batch, validate=False)
    console.print(f"sent {sent} events ({unparsable} lines were not JSON and will be dead-lettered)")
