"""`fleet dlq`: inspect and replay dead letters."""

from __future__ import annotations

import json

import typer
from rich.table import Table
from sqlalchemy import func, select

from db.models import DeadLetter
from db.session import session_scope
from workers.cli.context import console, ensure_servers

app = typer.Typer(help="Dead letters: input the fleet could not process.", no_args_is_help=True)


@app.command("list")
def list_(
    status: str = typer.Option("pending", help="pending, replayed, discarded or all"),
    limit: int = typer.Option(50),
) -> None:
    """List dead letters, newest first, with their reason."""
    ensure_servers()
    with session_scope() as session:
        query = select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)
        if status != "all":
            query = query.where(DeadLetter.status == status)
        rows = session.execute(query).scalars().all()
        counts = dict(session.execute(
            select(DeadLetter.status, func.count()).group_by(DeadLetter.status)).all())
    table = Table("id", "received", "source", "status", "reason", "payload")
    for row in rows:
        table.add_row(str(row.id), f"{row.received_at:%Y-%m-%d %H:%M:%S}", row.source, row.status,
                      row.reason[:80], row.raw_payload[:60].decode("utf-8", "replace"))
    console.print(table)
    console.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no dead letters")


@app.command()
def replay(
    dead_letter_id: int = typer.Argument(..., help="the id shown by `fleet dlq list`"),
    payload: str = typer.Option(None, "--payload", help="a corrected payload (JSON) to send"),
) -> None:
    """Re-send a dead letter (optionally corrected); a new failure makes a new dead letter."""
    ensure_servers()
    # After ensure_servers(): the Celery app reads the broker's URL from the settings when
    # first imported, and an embedded broker's URL is known only now.
    from workers.events.replay import replay as do_replay

    with session_scope() as session:
        sent = do_replay(session, dead_letter_id, json.loads(payload) if payload else None)
    console.print(f"replayed dead letter {dead_letter_id} as {sent}")
